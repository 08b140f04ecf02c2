"""The TLS listener: read the SNI without consuming it, then terminate or pass through.

Connections are accepted here (not by `loop.create_server`) so the first bytes can be *peeked*
(`MSG_PEEK`): the ClientHello stays in the socket while `client_hello.parse` reads the server
name. Then the socket is handed to the event loop as one of:

- TLS passthrough (`<app>-<port>s` names, passthrough custom domains): a `TunnelClient` that
  forwards the untouched TLS stream, ClientHello included;
- HTTP/2 (`<app>-<port>g` names): terminated with ALPN h2 and served by an `h2proxy.H2Downstream`,
  which routes every stream (gRPC call) on its own, to a local backend (h2c) or another region's
  gateway. A client that does not offer h2 in its ALPN list is terminated as HTTP/1.1 instead
  and answered `421` (connect with ALPN h2);
- everything else: terminated with the certificate for that name (`CertificateStore`) and served
  by a `ClientConnection` like plain HTTP (unknown names get a 404 over TLS when a default
  certificate exists, else a TLS `unrecognized_name` alert). A custom domain (its TXT record names
  an app here) or a verified pinned domain that no certificate covers waits, alone, for one
  obtained on demand (`on_demand`), then its handshake goes on; refused or not in time, it gets
  the `unrecognized_name` alert.

Plain HTTP sent to this port gets a 400 saying so. A ClientHello that does not arrive within
`header_timeout` ends the connection.

Limits: a connection counts against the connection cap and its client's share from the moment
it is accepted (while its ClientHello is awaited and during the TLS handshake,
`ProxyServer.pending_tls`), so beyond either, or while its client is in the penalty box, a new
connection is closed at once, before any TLS (`too-many-connections`, `client-over-share`,
`client-penalised`; `ProxyServer.admit`). When `accept()` fails for
lack of file descriptors the listener stops reading its socket for a growing pause and logs at
most once per interval (`fd_pressure.AcceptBackoff`), counting every failure as
`accept-<errno>` (e.g. `accept-emfile`) in the error counter.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Coroutine
from typing import Any

from geomesh.logs import event
from regional_gateway.proxy import client_hello
from regional_gateway.proxy.downstream import ClientConnection
from regional_gateway.proxy.fd_pressure import NO_FD_ERRNOS, TRANSIENT_ERRNOS, AcceptBackoff
from regional_gateway.proxy.h2proxy import H2Downstream
from regional_gateway.proxy.host import ListenerHost
from regional_gateway.proxy.hostnames import NameMatch, UnknownName, custom_candidate
from regional_gateway.proxy.http_errors import BadRequest, render
from regional_gateway.proxy.mesh_intake import AsH2, AsHttp1, AsTunnel, Origin, plan_connection
from regional_gateway.proxy.tunnel import (
    ALERT_INTERNAL_ERROR,
    ALERT_UNRECOGNIZED_NAME,
    TunnelClient,
    TunnelPlan,
    tls_alert,
)

log = logging.getLogger("geomesh.gateway.tls")
ACCEPT_BATCH = 64
REPEEK_DELAY = 0.005


class TlsListener:
    def __init__(self, server: ListenerHost, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.closed = False
        self.pending: set[_Sniffer] = set()
        self.backoff = AcceptBackoff()
        self.paused: asyncio.TimerHandle | None = None
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._accept)

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]

    def _accept(self) -> None:
        server = self.server
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in TRANSIENT_ERRNOS:  # about that one connection: next
                    continue
                self._failed(exc)  # out of descriptors (or worse): pause, do not spin
                return
            self.backoff.succeeded()
            key = server.client_of(addr[0])
            refusal = None if server.draining else server.admit(key)
            if refusal is not None or server.draining:
                server.metrics.error(refusal.value if refusal is not None else "shutting-down")
                conn.close()
                continue
            conn.setblocking(False)
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            s = _Sniffer(self, conn, addr, key)
            self.pending.add(s)
            self.count(key, 1)
            s.start()

    def _failed(self, exc: OSError) -> None:
        """Stop reading the listening socket for a while (it stays readable: retrying at once
        would spin), count the failure, log it if the last line is old enough."""
        name = errno.errorcode.get(exc.errno or 0, "unknown").lower()
        self.server.metrics.error(f"accept-{name}")
        delay, suppressed = self.backoff.failed(self.loop.time())
        if suppressed is not None:
            event(log, "accept failed, pausing the listener", logging.WARNING, error=str(exc),
                  out_of_descriptors=exc.errno in NO_FD_ERRNOS, pause=delay, not_logged_since_last=suppressed,
                  listener=f"{self.address[0]}:{self.address[1]}")
        self.loop.remove_reader(self.sock.fileno())
        self.paused = self.loop.call_later(delay, self._resume)

    def _resume(self) -> None:
        self.paused = None
        if not self.closed:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def count(self, key: str | None, n: int) -> None:
        """A connection on its way (ClientHello, handshake) of client `key` comes (n=1) or goes (-1)."""
        server = self.server
        server.pending_tls += n
        if key is not None:
            if n > 0:
                server.admission.hold(key)
            else:
                server.admission.release(key)

    def handed_over(self, coro: Coroutine, key: str | None) -> Coroutine:
        """`coro` (the TLS handshake and protocol start) keeps its connection counted until done."""
        self.count(key, 1)

        async def counted() -> Any:
            try:
                return await coro
            finally:
                self.count(key, -1)
        return counted()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.paused is not None:
            self.paused.cancel()
        else:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for s in list(self.pending):
            s.finish()


class _Sniffer:
    __slots__ = ("listener", "sock", "fd", "addr", "key", "seen", "timer", "retry", "done")

    def __init__(self, listener: TlsListener, sock: socket.socket, addr: tuple, key: str | None) -> None:
        self.listener = listener
        self.sock = sock
        self.fd = sock.fileno()
        self.addr = addr
        self.key = key  # its client (admission), None if exempt
        self.seen = -1
        self.timer: asyncio.TimerHandle | None = None
        self.retry: asyncio.TimerHandle | None = None
        self.done = False

    def start(self) -> None:
        loop = self.listener.loop
        self.timer = loop.call_later(self.listener.server.settings.header_timeout, self._timeout)
        loop.add_reader(self.fd, self._readable)

    def _stop_reading(self) -> None:
        try:
            self.listener.loop.remove_reader(self.fd)
        except (ValueError, OSError):
            pass

    def finish(self, keep_socket: bool = False) -> None:
        if self.done:
            return
        self.done = True
        self._stop_reading()
        for h in (self.timer, self.retry):
            if h is not None:
                h.cancel()
        self.listener.pending.discard(self)
        self.listener.count(self.key, -1)
        if not keep_socket:
            self.sock.close()

    def _timeout(self) -> None:
        server = self.listener.server
        server.metrics.error("tls-hello-timeout")
        self.finish()

    def _refuse(self, payload: bytes, cause: str) -> None:
        self.listener.server.metrics.error(cause)
        self.finish(keep_socket=True)  # unregister the reader while the descriptor is still ours
        _answer_and_close(self.sock, payload)

    def _readable(self) -> None:
        try:
            data = self.sock.recv(client_hello.MAX_HELLO, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.finish()
            return
        if not data:
            self.finish()
            return
        result = client_hello.parse(data)
        if result is client_hello.NEED_MORE:
            if len(data) == self.seen:  # level-triggered readiness with nothing new: back off a little
                self._stop_reading()
                self.retry = self.listener.loop.call_later(REPEEK_DELAY, self._rearm)
            self.seen = len(data)
            return
        if isinstance(result, client_hello.NotTls):
            if not client_hello.looks_like_tls(data):
                self._refuse(render(BadRequest("plain HTTP sent to the TLS port; use https://"), close=True),
                             "plain-http-on-tls-port")
            else:
                self._refuse(tls_alert(ALERT_INTERNAL_ERROR), "bad-client-hello")
            return
        self._dispatch(result)  # type: ignore[arg-type]

    def _rearm(self) -> None:
        self.retry = None
        if not self.done:
            self.listener.loop.add_reader(self.fd, self._readable)

    def _dispatch(self, hello: client_hello.ClientHello) -> None:
        server = self.listener.server
        name = hello.server_name
        match = server.state.lookup(name.encode()) if name else None
        local = self.sock.getsockname()[:2]
        client = (self.addr[0], self.addr[1])
        sock = self.sock
        key = self.key
        self.finish(keep_socket=True)
        loop = self.listener.loop
        listener = self.listener
        plan = plan_connection(match, hello.alpn, server.settings.g_mode, Origin.TLS, name)
        if type(plan) is AsTunnel:
            if plan.raw_tls:  # TLS passthrough: the bytes as they came, ClientHello first
                tunnel = TunnelPlan(match, client, local, may_forward=True, raw_tls=True)  # type: ignore[arg-type]
                server.spawn(listener.handed_over(loop.connect_accepted_socket(
                    lambda: TunnelClient(server, tunnel), sock), key))
                return
            protocol: Any = lambda: TunnelClient(server, TunnelPlan(  # noqa: E731
                match, client, local, may_forward=True, raw_tls=False, authority=plan.authority))  # type: ignore
        elif type(plan) is AsH2:
            protocol = lambda: H2Downstream(server, match, client, local, name, may_forward=True)  # noqa: E731
        else:
            protocol = lambda: ClientConnection(server, "https", "https", trusted=False, sni=name)  # noqa: E731
        if type(plan) is AsHttp1 and on_demand_candidate(server, match, name):  # a custom domain's first handshake
            server.spawn(listener.handed_over(_on_demand(server, sock, name, match, protocol, key), key))
            return
        start = _start_tls(server, sock, name, protocol, h2=type(plan) is not AsHttp1)
        if start is not None:
            server.spawn(listener.handed_over(start, key))


def _start_tls(server: ListenerHost, sock: socket.socket, name: str, protocol: Any, *, h2: bool) -> Coroutine | None:
    """The TLS handshake with the certificate for `name` (to await), or None: refused with an alert."""
    # TLS terminated here (the name is lower-cased already, client_hello.parse: a far gateway
    # resolves it as is); a `g` name gets the certificate with h2 in its ALPN
    ctx = server.certs.context_for(name, h2=h2)
    if ctx is None:
        _late_refuse(server, sock, ALERT_UNRECOGNIZED_NAME, "no-certificate")
        return None
    return asyncio.get_running_loop().connect_accepted_socket(
        protocol, sock, ssl=ctx, ssl_handshake_timeout=server.settings.header_timeout)


def on_demand_candidate(server: ListenerHost, match: NameMatch | UnknownName | None, name: str) -> bool:
    """Worth a certificate on demand: no certificate in service covers `name`, and it is a verified
    pinned domain or a possible custom domain (its TXT record is looked up next)."""
    if server.on_demand is None or not name or server.certs.covers(name):
        return False
    routes = server.state.routes
    if name in routes.domains:
        return True
    return server.custom_domains is not None and type(match) is UnknownName and custom_candidate(routes, name)


async def _on_demand(server: ListenerHost, sock: socket.socket, name: str, match: NameMatch | UnknownName | None,
                     protocol: Any, key: str | None) -> None:
    """The connection waits (only it) while its TXT record is checked and its certificate obtained
    (`on_demand`); then the handshake, or an `unrecognized_name` alert (the reason is logged)."""
    assert server.on_demand is not None
    try:
        if name not in server.state.routes.domains:
            assert server.custom_domains is not None
            found = await server.custom_domains.verify(server.state.routes, name, key)
            if type(found) is not NameMatch:  # no record naming an app here: as any unknown name
                start = _start_tls(server, sock, name, protocol, h2=False)
                if start is not None:
                    await start
                return
        reason = await server.on_demand.obtain(name)
    except asyncio.CancelledError:
        _late_refuse(server, sock, ALERT_UNRECOGNIZED_NAME, "on-demand-cancelled")
        raise
    if reason:
        # `on_demand` logged the reason once per refusal; each handshake is counted here
        event(log, "TLS refused: no certificate on demand", logging.DEBUG, name=name, reason=reason[:300])
        _late_refuse(server, sock, ALERT_UNRECOGNIZED_NAME, "on-demand-no-certificate")
        return
    start = _start_tls(server, sock, name, protocol, h2=False)
    if start is not None:
        await start


def _late_refuse(server: ListenerHost, sock: socket.socket, alert: int, cause: str) -> None:
    server.metrics.error(cause)
    _answer_and_close(sock, tls_alert(alert))


def _answer_and_close(sock: socket.socket, payload: bytes) -> None:
    """Consume what the client sent (so closing does not reset the answer away), answer, close."""
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass
    try:
        sock.send(payload)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    sock.close()
