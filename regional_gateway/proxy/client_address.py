"""Carrying the client's address to the app: X-Forwarded-For, Forwarded, X-Forwarded-Proto.

Which incoming values are believed depends on the listener. On the public listeners anything a
client sends in these headers (and in X-Real-IP, X-Forwarded-Host, X-Geomesh-Forwarded) is
dropped and replaced by what the gateway saw: the TCP peer address and the scheme. On the mesh
listener the peer is another geomesh gateway, so the incoming chain is kept and the peer is
appended, as RFC 7239 section 5.2 describes for a chain of proxies. Pure: strings in, header
bytes out.

Look-alikes are dropped on the public listeners too: the same names spelt with `_` for `-`
(`X_Forwarded_For`: CGI and WSGI servers map both spellings to `HTTP_X_FORWARDED_FOR`), and the
client-IP headers other proxies and CDNs set (`True-Client-IP`, `X-Client-IP`,
`CF-Connecting-IP`, `X-Cluster-Client-IP`, `Fastly-Client-IP`), which an app may believe.
"""

from __future__ import annotations

# Headers whose incoming values are dropped on the public listeners (lowercase).
CLIENT_ADDRESS_HEADERS = frozenset((b"x-forwarded-for", b"forwarded", b"x-forwarded-proto",
                                    b"x-forwarded-host", b"x-real-ip", b"x-geomesh-forwarded"))
FORWARDED_MARK = b"X-Geomesh-Forwarded"
_OTHER_CLIENT_IP = (b"true-client-ip", b"x-client-ip", b"cf-connecting-ip", b"x-cluster-client-ip",
                    b"fastly-client-ip")


def _spellings(name: bytes) -> set[bytes]:
    """`name` with each '-' as '-' or '_'."""
    out = {b""}
    for part in name.split(b"-"):
        out = {o + sep + part for o in out for sep in ((b"-", b"_") if o else (b"",))}
    return out


# Dropped on the public listeners with the headers above (lowercase): not the names themselves
LOOKALIKE_HEADERS = frozenset(s for n in (*CLIENT_ADDRESS_HEADERS, *_OTHER_CLIENT_IP) for s in _spellings(n)) \
    - CLIENT_ADDRESS_HEADERS


def forwarded_node(ip: str) -> str:
    """An address as an RFC 7239 node: IPv6 in brackets and quotes."""
    return f'"[{ip}]"' if ":" in ip else ip


def _safe(value: bytes) -> bytes:
    return value.replace(b"\r", b"").replace(b"\n", b"")


def public_headers(client_ip: str, scheme: str) -> bytes:
    """The address headers for a request received from the client `client_ip` over `scheme`."""
    return (f"X-Forwarded-For: {client_ip}\r\n"
            f"X-Forwarded-Proto: {scheme}\r\n"
            f"Forwarded: for={forwarded_node(client_ip)};proto={scheme}\r\n").encode()


def mesh_headers(peer_ip: str, scheme: str, xff: bytes | None, forwarded: bytes | None,
                 proto: bytes | None) -> bytes:
    """The address headers for a request received from the gateway `peer_ip` on the mesh."""
    xff_out = (_safe(xff) + b", " + peer_ip.encode()) if xff else peer_ip.encode()
    fwd_part = f"for={forwarded_node(peer_ip)}".encode()
    fwd_out = (_safe(forwarded) + b", " + fwd_part) if forwarded else fwd_part + f";proto={scheme}".encode()
    proto_out = _safe(proto) if proto else scheme.encode()
    return (b"X-Forwarded-For: " + xff_out + b"\r\nX-Forwarded-Proto: " + proto_out
            + b"\r\nForwarded: " + fwd_out + b"\r\n")
