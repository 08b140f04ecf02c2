"""Carrying the client's address to the app: X-Forwarded-For, Forwarded, X-Forwarded-Proto.

Which incoming values are believed depends on the listener. On the public listeners anything a
client sends in these headers (and in X-Real-IP, X-Forwarded-Host, X-Geomesh-Forwarded) is
dropped and replaced by what the gateway saw: the TCP peer address and the scheme. On the mesh
listener the peer is another geomesh gateway, so the incoming chain is kept and the peer is
appended, as RFC 7239 section 5.2 describes for a chain of proxies. Pure: strings in, header
bytes out.
"""

from __future__ import annotations

# Headers whose incoming values are dropped on the public listeners (lowercase).
CLIENT_ADDRESS_HEADERS = frozenset((b"x-forwarded-for", b"forwarded", b"x-forwarded-proto",
                                    b"x-forwarded-host", b"x-real-ip", b"x-geomesh-forwarded"))
FORWARDED_MARK = b"X-Geomesh-Forwarded"


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
