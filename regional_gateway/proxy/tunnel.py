"""Byte tunnels: TLS passthrough (`s` names), also when forwarded between regions.

A `TunnelClient` is the accepted side. It picks a target with `targets.choose` (retrying other
backends when a connect fails), writes an optional preamble (a PROXY v2 header when the app
asked for one, or always when the target is another region's gateway, which needs the client
address), then copies bytes both ways with back-pressure (a full write buffer on one side
pauses reading on the other) and half-close. When no target can be reached, the client gets a
TLS alert (internal_error, or unrecognized_name for an unknown name) rather than a silent
close: it is in the middle of a TLS handshake and that is the only thing it can read.
`g` names are tunnelled too when the gateway runs with `g_mode = "tunnel"` (the clear HTTP/2
connection after TLS termination; to another region with the name in the PROXY header's
authority TLV); by default `h2proxy` routes each of their HTTP/2 streams instead.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from geomesh.logs import event
from regional_gateway.proxy import proxy_protocol
from regional_gateway.proxy.attempt import TUNNEL, connect_failed
from regional_gateway.proxy.exchange import LINGER
from regional_gateway.proxy.flow_control import pass_eof
from regional_gateway.proxy.host import ConnectionHost
from regional_gateway.proxy.hostnames import NameMatch
from regional_gateway.proxy.http_errors import ProxyError, UnknownHost
from regional_gateway.proxy.targets import Target, choose

log = logging.getLogger("geomesh.gateway.tunnel")
ALERT_INTERNAL_ERROR = 80
ALERT_UNRECOGNIZED_NAME = 112
ALERT_HANDSHAKE_FAILURE = 40


def tls_alert(description: int) -> bytes:
    """A fatal TLS alert record (RFC 8446 6), readable by a client waiting for ServerHello."""
    return bytes((21, 3, 3, 0, 2, 2, description))


@dataclass(slots=True)
class TunnelPlan:
    match: NameMatch
    client: tuple[str, int]  # the real client (from the socket or a PROXY header)
    local: tuple[str, int]  # where the client connected to
    may_forward: bool
    raw_tls: bool  # the client is mid-handshake: failures are answered with a TLS alert
    authority: str | None = None  # a `g` host name (tunnel mode): sent to another region's gateway


class TunnelUpstream(asyncio.Protocol):
    __slots__ = ("peer", "transport", "closed")

    def __init__(self, peer: TunnelClient) -> None:
        self.peer = peer
        self.transport: Any = None
        self.closed = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.peer.transport.write(data)
        self.peer.deadline = self.peer.server.now + self.peer.server.settings.tunnel_idle_timeout

    def eof_received(self) -> bool | None:
        peer = self.peer
        peer.upstream_eof = True
        if pass_eof(peer.transport, peer.client_eof):
            return True
        peer.transport.close()  # both directions are finished (or cannot be half-closed)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.peer.transport.close()

    def pause_writing(self) -> None:
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.peer.transport.resume_reading()


class TunnelClient(asyncio.Protocol):
    kind = "tunnel"

    def __init__(self, server: ConnectionHost, plan: TunnelPlan, preread: bytes = b"") -> None:
        self.server = server
        self.plan = plan
        self.preread = preread
        self.transport: Any = None
        self.upstream: TunnelUpstream | None = None
        self.pending: list[bytes] = []
        self.deadline = 0.0
        self.closed = False
        self.counted = False
        self.failed = False
        self.client_eof = False
        self.upstream_eof = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        server = self.server
        if not server.conn_opened(self):
            server.metrics.error("too-many-connections")
            if self.plan.raw_tls:
                transport.write(tls_alert(ALERT_INTERNAL_ERROR))
            transport.close()
            return
        self.counted = True
        self.deadline = server.now + server.settings.connect_timeout + server.settings.header_timeout
        transport.pause_reading()
        server.spawn(self._open())

    async def _open(self) -> None:
        server = self.server
        plan = self.plan
        loop = asyncio.get_running_loop()
        exclude: tuple[str, ...] = ()
        last: ProxyError | str = ""
        for _ in range(TUNNEL.max_attempts):  # each failure is a connect failure, which TUNNEL retries
            target = choose(server.state, plan.match, plan.client[0].encode(), may_forward=plan.may_forward,
                            exclude=exclude)
            if not isinstance(target, Target):
                last = target if not exclude else last
                break
            rt = target.backend
            exclude += (rt.key,)
            try:
                _, up = await asyncio.wait_for(
                    loop.create_connection(lambda: TunnelUpstream(self), *target.addr),
                    server.settings.connect_timeout)
            except (OSError, TimeoutError) as exc:
                why = f"cannot connect to {rt.label}: {getattr(exc, 'strerror', None) or exc or 'timeout'}"
                last = why
                server.metrics.error("upstream-connect")
                connect_failed(server, rt, why)
                continue
            rt.health.connected()
            if self.closed:
                up.transport.close()  # type: ignore[attr-defined]
                return
            self.upstream = up  # type: ignore[assignment]
            if target.region is not None:
                server.metrics.forward(target.app, target.region.name)
            server.metrics.request(target.app, rt.label if target.region else rt.key, 0)
            preamble = self._preamble(target)
            w = up.transport.write  # type: ignore[attr-defined]
            if preamble:
                w(preamble)
            if self.preread:
                w(self.preread)
                self.preread = b""
            for chunk in self.pending:
                w(chunk)
            self.pending = []
            self.deadline = server.now + server.settings.tunnel_idle_timeout
            self.transport.resume_reading()
            return
        self._fail(last)

    def _preamble(self, target: Target) -> bytes:
        """The PROXY v2 header to send before the client's bytes, or b"" for none: another region's
        gateway always gets one (it needs the client address, and for a `g` connection, whose TLS
        ended here, the host name in an authority TLV), a local backend when its app asks."""
        plan = self.plan
        if target.region is not None:
            return proxy_protocol.encode_v2(*plan.client, *plan.local, authority=plan.authority)
        app = self.server.state.apps.get(target.app)
        if app is not None and app.spec.proxy_protocol:
            return proxy_protocol.encode_v2(*plan.client, *plan.local)
        return b""

    def _fail(self, why: ProxyError | str) -> None:
        server = self.server
        unknown = isinstance(why, UnknownHost)
        text = why.message if isinstance(why, ProxyError) else why
        server.metrics.error(why.cause if isinstance(why, ProxyError) else "upstream-failed")
        event(log, "tunnel refused", logging.INFO, client=self.plan.client[0], app=self.plan.match.app or
              self.plan.match.instance, reason=text)
        if self.closed:
            return
        if not self.plan.raw_tls:
            self.transport.close()
            return
        # answer with an alert, then read and drop what the client still sends for a moment, so that
        # closing does not turn into a reset that destroys the alert before the client reads it
        self.failed = True
        self.pending = []
        self.transport.write(tls_alert(ALERT_UNRECOGNIZED_NAME if unknown else ALERT_INTERNAL_ERROR))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.transport.resume_reading()
        self.deadline = server.now + LINGER

    def data_received(self, data: bytes) -> None:
        if self.failed:
            return
        up = self.upstream
        if up is not None:
            up.transport.write(data)
            self.deadline = self.server.now + self.server.settings.tunnel_idle_timeout
        else:
            self.pending.append(data)

    def eof_received(self) -> bool | None:
        up = self.upstream
        self.client_eof = True
        if self.failed or up is None or not pass_eof(up.transport, self.upstream_eof):
            return None  # the transport closes; connection_lost closes the upstream
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.counted:
            self.counted = False
            self.server.conn_closed(self)
        if self.upstream is not None:
            self.upstream.transport.close()

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.resume_reading()

    # ServedConnection (host.py)
    def timed_out(self) -> None:
        self.transport.close()

    def drain(self) -> None:
        pass  # tunnels end when the drain deadline passes

    def abort(self) -> None:
        self.transport.abort()
