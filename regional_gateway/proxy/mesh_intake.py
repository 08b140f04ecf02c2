"""Which protocol serves a connection, and the hand-over of forwarded mesh connections.

`plan_connection(match, alpn, g_mode, origin)` is the one pure decision: from the name the client
asked for (`hostnames.NameMatch`, or why it is unknown), the ALPN protocols it offered, the
gateway's `g_mode` and where the connection came from (`Origin`), it returns how to serve it:
`AsTunnel` (a byte tunnel, `tunnel.TunnelClient`), `AsH2` (HTTP/2 terminated here,
`h2proxy.H2Downstream`), `AsHttp1` (HTTP/1.1 terminated here, `downstream.ClientConnection`) or
`Refused` (the error cause and the reason). The TLS listener asks it for a ClientHello; the mesh
listener's connections ask it once their PROXY v2 header (and, for a passthrough, the ClientHello
after it) is read: `from_mesh` plans and hands the transport over to the protocol that serves it
(`ConnectionHost.hand_over`). A forwarded connection never takes a second hop (`may_forward` is
off), and its client address is the one in the PROXY header.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Any, Protocol

from geomesh.logs import event
from regional_gateway.proxy import client_hello
from regional_gateway.proxy.h2proxy import H2Downstream
from regional_gateway.proxy.host import ConnectionHost, ServedConnection
from regional_gateway.proxy.hostnames import Mode, NameMatch, UnknownName
from regional_gateway.proxy.proxy_protocol import ProxyHeader
from regional_gateway.proxy.tunnel import ALERT_UNRECOGNIZED_NAME, TunnelClient, TunnelPlan, tls_alert

log = logging.getLogger("geomesh.gateway")


class Origin(enum.Enum):
    TLS = "tls"  # the public TLS listener, named by the ClientHello
    MESH_PASSTHROUGH = "mesh-passthrough"  # another gateway's forwarded TLS passthrough (ClientHello follows)
    MESH_H2 = "mesh-h2"  # another gateway's forwarded `g` connection, TLS ended there (clear HTTP/2)


@dataclass(frozen=True, slots=True)
class AsTunnel:
    raw_tls: bool  # the client is mid-handshake: failures are answered with a TLS alert
    may_forward: bool
    authority: str | None = None  # a `g` name tunnelled to another region's gateway


@dataclass(frozen=True, slots=True)
class AsH2:
    may_forward: bool


@dataclass(frozen=True, slots=True)
class AsHttp1:
    pass


@dataclass(frozen=True, slots=True)
class Refused:
    cause: str  # the error cause counted in geomesh_gateway_errors_total
    reason: str


Plan = AsTunnel | AsH2 | AsHttp1 | Refused


def plan_connection(match: NameMatch | UnknownName | None, alpn: tuple[str, ...] | list[str], g_mode: str,
                    origin: Origin, name: str = "") -> Plan:
    """How to serve a connection for `match` (None: no name given); `name` is the host name asked for."""
    mode = match.mode if type(match) is NameMatch else None
    if origin is Origin.TLS:
        if mode is Mode.PASSTHROUGH:
            return AsTunnel(raw_tls=True, may_forward=True)
        if mode is Mode.H2 and "h2" in alpn:
            return AsTunnel(raw_tls=False, may_forward=True, authority=name) if g_mode == "tunnel" \
                else AsH2(may_forward=True)
        # HTTP/1.1 termination; also a `g` name whose client does not offer h2: it gets the 421 that
        # tells it to connect with ALPN h2, instead of a tunnel that would answer it in HTTP/2 frames
        return AsHttp1()
    if origin is Origin.MESH_PASSTHROUGH:
        if mode is Mode.PASSTHROUGH:
            return AsTunnel(raw_tls=True, may_forward=False)
        return Refused("bad-forwarded-passthrough", f"{name!r} is not a TLS passthrough name here")
    if mode is Mode.H2:
        return AsTunnel(raw_tls=False, may_forward=False) if g_mode == "tunnel" else AsH2(may_forward=False)
    why = match.reason if type(match) is UnknownName else f"{name!r} is not a `g` name"
    return Refused("bad-forwarded-h2", why)


class SniffedConnection(ServedConnection, Protocol):
    """The mesh listener's HTTP/1.1 connection that read the PROXY header (`ClientConnection`)."""

    transport: Any
    client_ip: str
    client_port: int

    def handed_over(self) -> None:
        """Its transport now belongs to another protocol: it must not act on it any more."""


def from_mesh(host: ConnectionHost, conn: SniffedConnection, header: ProxyHeader,
              hello: client_hello.ClientHello | client_hello.NotTls | None, data: bytes) -> None:
    """A forwarded connection arrived on the mesh listener: serve it with a local backend.

    Without an authority TLV (`hello` given) it is a TLS passthrough named by its ClientHello; a
    name that is not a passthrough name here gets a TLS alert. With one (`hello` None) it is a
    `g` connection whose clear HTTP/2 streams go to local backends; one that is not a `g` name
    here is refused by closing: the peer is a gateway, not a client mid-handshake, so there is
    nobody to send a TLS alert to; the log and the `bad-forwarded-h2` error count say why.
    `data` (what followed the header) is replayed to the protocol that takes over.
    """
    if hello is not None:
        name = hello.server_name if isinstance(hello, client_hello.ClientHello) else ""
        origin = Origin.MESH_PASSTHROUGH
    else:
        name = header.authority or ""
        origin = Origin.MESH_H2
    match = host.state.lookup(name.encode()) if name else None
    plan = plan_connection(match, (), host.settings.g_mode, origin, name)
    if type(plan) is Refused:
        host.metrics.error(plan.cause)
        if origin is Origin.MESH_PASSTHROUGH:
            conn.transport.write(tls_alert(ALERT_UNRECOGNIZED_NAME))
        else:
            event(log, "forwarded h2 refused", logging.WARNING, peer=conn.client_ip, authority=name,
                  reason=plan.reason)
        conn.transport.close()
        return
    assert type(match) is NameMatch
    client = (header.source or conn.client_ip, header.source_port or conn.client_port)
    local = (header.destination or "0.0.0.0", header.destination_port)
    protocol: Any
    if type(plan) is AsTunnel:
        protocol = TunnelClient(host, TunnelPlan(match, client, local, may_forward=False, raw_tls=plan.raw_tls),
                                preread=data)
    else:
        protocol = H2Downstream(host, match, client, local, name, may_forward=False, preread=data)
    transport = conn.transport
    conn.handed_over()
    host.hand_over(conn, transport, protocol)
