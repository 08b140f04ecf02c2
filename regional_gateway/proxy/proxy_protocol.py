"""PROXY protocol version 2 (HAProxy's binary header): encode for backends, parse from peers.

On a TLS passthrough connection the proxy cannot add X-Forwarded-For, so when an app asks for
it the proxy sends a PROXY v2 header (client address and port, the address it was reached on)
before the first TLS byte. Gateways also use it among themselves: a connection forwarded to
another region's gateway over the mesh starts with one, so the far side knows the real client.
A forwarded TLS passthrough is followed by the ClientHello, which names the host; a forwarded
`g` connection was already decrypted, so no ClientHello follows and the header carries the host
name itself, in a PP2_TYPE_AUTHORITY TLV (spec section 2.2.2). Other TLV types are skipped.
Pure: addresses in, bytes out; bytes in, a header or "need more" out.
Spec: https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt, section 2.2.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_PROXY = 0x21
_V2_LOCAL = 0x20
_TCP4 = 0x11
_TCP6 = 0x21
MAX_LENGTH = 1024  # address block + TLVs we are willing to read
PP2_TYPE_AUTHORITY = 0x02
_TLV_HEAD = 3  # type (1 byte) + value length (2 bytes, big-endian)


class ProxyProtocolError(ValueError):
    """A malformed PROXY v2 header."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    source: str  # "" for a LOCAL header (health checks) or an unknown family
    source_port: int
    destination: str
    destination_port: int
    length: int  # bytes the header took, to strip before the payload
    authority: str | None = None  # the PP2_TYPE_AUTHORITY TLV: the host name the client asked for


def encode_v2(source: str, source_port: int, destination: str, destination_port: int,
              authority: str | None = None) -> bytes:
    """A PROXY v2 header for a TCP connection from source to destination, with the host name in a
    PP2_TYPE_AUTHORITY TLV when `authority` is given."""
    src = ipaddress.ip_address(source)
    dst = ipaddress.ip_address(destination)
    if src.version != dst.version:  # mixed families: map the IPv4 side into IPv6
        src = ipaddress.IPv6Address(f"::ffff:{src}") if src.version == 4 else src
        dst = ipaddress.IPv6Address(f"::ffff:{dst}") if dst.version == 4 else dst
    if src.version == 4:
        body = src.packed + dst.packed + struct.pack("!HH", source_port, destination_port)
        fam = _TCP4
    else:
        body = src.packed + dst.packed + struct.pack("!HH", source_port, destination_port)
        fam = _TCP6
    if authority is not None:
        body += _tlv(PP2_TYPE_AUTHORITY, authority.encode())
    return SIGNATURE + bytes((_V2_PROXY, fam)) + struct.pack("!H", len(body)) + body


def could_be_v2(data: bytes) -> bool:
    """True if `data` is a prefix of a PROXY v2 header (or starts with one)."""
    n = min(len(data), len(SIGNATURE))
    return data[:n] == SIGNATURE[:n]


def parse_v2(data: bytes) -> ProxyHeader | None:
    """The header at the start of `data`, or None if more bytes are needed."""
    if len(data) < 16:
        if not could_be_v2(data):
            raise ProxyProtocolError("no PROXY v2 signature")
        return None
    if data[:12] != SIGNATURE:
        raise ProxyProtocolError("no PROXY v2 signature")
    ver_cmd, fam = data[12], data[13]
    (length,) = struct.unpack_from("!H", data, 14)
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError(f"version {ver_cmd >> 4} is not 2")
    if length > MAX_LENGTH:
        raise ProxyProtocolError(f"header length {length} is over {MAX_LENGTH}")
    if len(data) < 16 + length:
        return None
    total = 16 + length
    if ver_cmd == _V2_LOCAL:
        return ProxyHeader("", 0, "", 0, total)
    if ver_cmd != _V2_PROXY:
        raise ProxyProtocolError(f"command {ver_cmd & 0xF} is neither LOCAL nor PROXY")
    if fam == _TCP4:
        if length < 12:
            raise ProxyProtocolError("IPv4 address block shorter than 12 bytes")
        src, dst = ipaddress.IPv4Address(data[16:20]), ipaddress.IPv4Address(data[20:24])
        sport, dport = struct.unpack_from("!HH", data, 24)
        tlvs = 28
    elif fam == _TCP6:
        if length < 36:
            raise ProxyProtocolError("IPv6 address block shorter than 36 bytes")
        src, dst = ipaddress.IPv6Address(data[16:32]), ipaddress.IPv6Address(data[32:48])
        sport, dport = struct.unpack_from("!HH", data, 48)
        tlvs = 52
    else:
        return ProxyHeader("", 0, "", 0, total)
    return ProxyHeader(str(src), sport, str(dst), dport, total, _authority(data[tlvs:total]))


def _tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def _authority(tlvs: bytes) -> str | None:
    """The PP2_TYPE_AUTHORITY value among the TLVs after the address block (None if absent).

    Strict about the framing, because the authority decides where a forwarded connection goes: a
    TLV that does not fit in the header's declared length is an error, not something to guess
    around. TLV types we do not use are skipped, as the spec allows.
    """
    authority = None
    pos = 0
    while pos < len(tlvs):
        if len(tlvs) - pos < _TLV_HEAD:
            raise ProxyProtocolError(f"TLV truncated: {len(tlvs) - pos} byte(s) left in the header for its "
                                     f"{_TLV_HEAD}-byte type and length")
        kind, size = struct.unpack_from("!BH", tlvs, pos)
        start, pos = pos + _TLV_HEAD, pos + _TLV_HEAD + size
        if pos > len(tlvs):
            raise ProxyProtocolError(f"TLV type 0x{kind:02x} declares {size} bytes but runs past the header end "
                                     f"({len(tlvs) - start} left)")
        if kind == PP2_TYPE_AUTHORITY:
            try:
                authority = tlvs[start:pos].decode()
            except UnicodeDecodeError as exc:
                raise ProxyProtocolError(f"authority TLV is not UTF-8: {exc}") from None
    return authority
