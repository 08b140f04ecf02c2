"""The HTTP/1 request-head rules the gateway enforces before it forwards anything.

Pure functions over header values: each returns what the gateway forwards, or a `Refusal` (the
status and the message of the answer). `downstream.ClientConnection` calls them only for heads
that are not plain (a special header, an odd target or method), so a common request pays
nothing for them. The rules are the ones HAProxy and nginx apply against request smuggling:

- `Connection` may name hop-by-hop headers to drop, but never the framing (`Content-Length`,
  `Transfer-Encoding`), the routing (`Host`) or a header the gateway sets itself (the
  client-address headers, `X-Geomesh-Forwarded`): naming one is a 400 (RFC 9110 section 7.6.1
  lets a proxy drop what `Connection` names, which would desynchronise gateway and backend);
- `Transfer-Encoding` must end with exactly one `chunked` (RFC 9112 section 6.1); anything else
  (`identity`, `xchunked`, `chunked, identity`, two `chunked`) is a 400 before the head is sent,
  and in an HTTP/1.0 request it is refused too (the framing cannot be trusted);
- an absolute-form target (`GET http://host/path`) is split into its authority (routed by, and
  compared with Host) and the origin-form forwarded (RFC 9112 section 3.2.2);
- only HTTP/1.0 and HTTP/1.1 are forwarded: other versions get a 505.
"""

from __future__ import annotations

from dataclasses import dataclass

from regional_gateway.proxy.client_address import CLIENT_ADDRESS_HEADERS, LOOKALIKE_HEADERS

# Connection tokens that are hop-by-hop anyway (the gateway writes its own connection management)
CONNECTION_OPTIONS = frozenset((b"close", b"keep-alive", b"upgrade"))
# headers `Connection` may never remove: framing, routing, and what the gateway sets or trusts
PROTECTED_HEADERS = frozenset((b"host", b"content-length", b"transfer-encoding")) | CLIENT_ADDRESS_HEADERS \
    | LOOKALIKE_HEADERS
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a head is refused: `kind` picks the error class (see `downstream`), `message` names the rule."""

    kind: str  # "protected-header", "framing", "host", "version"
    message: str


def connection_drops(value: bytes) -> frozenset[bytes] | Refusal:
    """The header names a `Connection` value (all fields joined by ',') asks to drop, lower case."""
    names = frozenset(t.strip(b" \t").lower() for t in value.split(b",")) - CONNECTION_OPTIONS - {b""}
    bad = sorted(names & PROTECTED_HEADERS)
    if bad:
        shown = bad[0].decode("latin-1")
        return Refusal("protected-header", f"Connection names {shown!r}: the gateway does not let a client "
                                           "remove framing, routing or client-address headers")
    return names


def transfer_coding(value: bytes, version: str) -> bytes | Refusal:
    """The Transfer-Encoding to forward for the received value(s) (joined by ','), or a refusal."""
    if version == "1.0":
        return Refusal("framing", "Transfer-Encoding in an HTTP/1.0 request (RFC 9112 section 6.1)")
    codings = [t.strip(b" \t").lower() for t in value.split(b",")]
    if not codings or codings[-1] != b"chunked":
        return Refusal("framing", f"Transfer-Encoding {_show(value)} does not end with chunked")
    if codings.count(b"chunked") > 1:
        return Refusal("framing", f"Transfer-Encoding {_show(value)} applies chunked more than once")
    for c in codings:
        name = c.split(b";", 1)[0].strip(b" \t")
        if not name or not set(name) <= _TCHAR:
            return Refusal("framing", f"Transfer-Encoding {_show(value)} has an empty or invalid coding")
    return b", ".join(codings)


def split_target(url: bytes) -> tuple[bytes, bytes] | Refusal:
    """An absolute-form target -> (authority, origin-form target); refused if not http(s)://host[...]."""
    scheme, sep, rest = url.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return Refusal("host", f"request target {_show(url)} is neither a path nor an http(s) URL")
    end = len(rest)
    for ch in (b"/", b"?", b"#"):
        i = rest.find(ch)
        if 0 <= i < end:
            end = i
    authority, tail = rest[:end], rest[end:]
    if b"@" in authority:
        return Refusal("host", "a user name in the request target is not allowed")
    if not authority:
        return Refusal("host", f"request target {_show(url)} has no host")
    if tail.startswith(b"#"):
        return Refusal("host", "a fragment in the request target is not allowed")
    if not tail.startswith(b"/"):
        tail = b"/" + tail
    return authority, tail


def version_refusal(version: str) -> Refusal | None:
    """None for the versions forwarded (1.0, 1.1); a 505 otherwise (HTTP/2.0 request lines, 0.9)."""
    if version == "1.1" or version == "1.0":
        return None
    return Refusal("version", f"HTTP/{version} requests are not served here: use HTTP/1.1, or HTTP/2 over TLS "
                              "with ALPN h2")


def _show(value: bytes) -> str:
    return repr(value[:80].decode("latin-1"))
