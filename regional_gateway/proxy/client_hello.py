"""Reading the server name (SNI) and ALPN list out of a TLS ClientHello without terminating TLS.

The TLS listener peeks at the first bytes of a connection and decides from the SNI whether to
pass the TLS stream through untouched (the `s` name form), to terminate it with the matching
certificate, or to terminate with ALPN h2 (the `g` form). Pure: bytes in, `ClientHello`,
`NEED_MORE` or `NotTls` out. Handles a ClientHello split over several TLS records. Refs: RFC 8446
4.1.2 (ClientHello), RFC 6066 3 (server_name), RFC 7301 (ALPN).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_HELLO = 16384 + 5  # a ClientHello larger than this is refused
_HANDSHAKE = 22
_CLIENT_HELLO = 1
_EXT_SNI = 0
_EXT_ALPN = 16


@dataclass(frozen=True, slots=True)
class ClientHello:
    server_name: str  # "" when the client sent none
    alpn: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NotTls:
    reason: str


class _NeedMore:
    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE = _NeedMore()


def looks_like_tls(first: bytes) -> bool:
    return bool(first) and first[0] == _HANDSHAKE


def parse(data: bytes) -> ClientHello | NotTls | _NeedMore:
    """Parse the ClientHello at the start of `data` (record layer included)."""
    hs = bytearray()
    pos = 0
    need = None
    while True:
        if len(data) < pos + 5:
            return NEED_MORE if len(data) < MAX_HELLO else NotTls("ClientHello too large")
        ctype, major = data[pos], data[pos + 1]
        length = int.from_bytes(data[pos + 3:pos + 5], "big")
        if ctype != _HANDSHAKE:
            return NotTls(f"first record type {ctype} is not handshake (22)")
        if major != 3:
            return NotTls(f"record version {major}.{data[pos + 2]} is not TLS")
        if length == 0 or length > 16384:
            return NotTls(f"record length {length} is invalid")
        if len(data) < pos + 5 + length:
            return NEED_MORE if pos + 5 + length <= MAX_HELLO else NotTls("ClientHello too large")
        hs += data[pos + 5:pos + 5 + length]
        pos += 5 + length
        if need is None and len(hs) >= 4:
            if hs[0] != _CLIENT_HELLO:
                return NotTls(f"handshake type {hs[0]} is not ClientHello (1)")
            need = 4 + int.from_bytes(hs[1:4], "big")
            if need > MAX_HELLO:
                return NotTls("ClientHello too large")
        if need is not None and len(hs) >= need:
            try:
                return _hello(bytes(hs[4:need]))
            except (IndexError, ValueError) as exc:
                return NotTls(f"malformed ClientHello: {exc}")


def _vec(buf: bytes, pos: int, width: int) -> tuple[bytes, int]:
    n = int.from_bytes(buf[pos:pos + width], "big")
    end = pos + width + n
    if end > len(buf) or pos + width > len(buf):
        raise ValueError("vector runs past the end")
    return buf[pos + width:end], end


def _hello(body: bytes) -> ClientHello:
    pos = 2 + 32  # legacy_version, random
    _, pos = _vec(body, pos, 1)  # session id
    _, pos = _vec(body, pos, 2)  # cipher suites
    _, pos = _vec(body, pos, 1)  # compression methods
    if pos == len(body):
        return ClientHello("")
    exts, _ = _vec(body, pos, 2)
    name = ""
    alpn: tuple[str, ...] = ()
    p = 0
    while p + 4 <= len(exts):
        etype = int.from_bytes(exts[p:p + 2], "big")
        edata, p = _vec(exts, p + 2, 2)
        if etype == _EXT_SNI:
            names, _ = _vec(edata, 0, 2)
            q = 0
            while q + 3 <= len(names):
                kind = names[q]
                value, q = _vec(names, q + 1, 2)
                if kind == 0:
                    name = value.decode("ascii").lower().rstrip(".")
                    break
        elif etype == _EXT_ALPN:
            protos, _ = _vec(edata, 0, 2)
            out = []
            q = 0
            while q < len(protos):
                value, q = _vec(protos, q, 1)
                out.append(value.decode("ascii", "replace"))
            alpn = tuple(out)
    return ClientHello(name, alpn)
