"""The proxy server: listeners, the live routes, the upstream pool, timers and the shutdown order.

`ProxyServer(settings, routes)` has no side effects; `await start()` binds the listeners (plain
HTTP, TLS, mesh) and starts two background tasks: the sweeper (ticks the coarse clock, enforces
connection deadlines, re-admits ejected backends, closes idle upstream connections, reloads
changed certificates) and the prober (active health checks). `update_routes(routes)` swaps the
routing state in one assignment, keeping health and in-flight counts of unchanged backends, and
can be called at any time from the loop thread; requests in flight finish on the state they
started with. `shutdown()` follows the house order: stop accepting, close idle connections and
let busy ones finish their exchange until `drain_timeout`, then abort the rest, stop the tasks
and close the pool.

Admission at accept (`admission`): the cap is `max_connections` lowered to what the file
descriptor limit carries (`fd_pressure.connection_cap`, logged at start and exported as
`geomesh_gateway_connection_limit`); it counts the established connections of every listener and
the TLS connections still on their way (ClientHello awaited, handshake, `pending_tls`). A client
(IPv4 address, IPv6 /64) may hold `max_connections_per_client` of them, and a client in the
penalty box (a connection of its closed for abuse: `penalise`) none. The mesh listener and
`--trusted-peers` are exempt from both. Plain listeners take each connection through `_Gate`,
which refuses it before any HTTP parsing with a `503` naming the rule and closes it at once (no
lingering: a refused connection holds no descriptor); the TLS listener closes it before the
handshake. A head or body that times out (the sweeper) is an offence, as are the HTTP/2 GOAWAYs
`h2_guard` calls for and the TLS ClientHello that never comes. Running out of file descriptors
anyway is what `fd_pressure` is about: the TLS listener backs off on EMFILE itself. The plain
listeners are the event loop's own. uvloop (libuv) accepts and closes pending
connections with a spare descriptor it keeps for that: no spin, no log. CPython's asyncio pauses
the listener for 1 s but, in the same callback, retries up to `backlog` times, reporting each
failure to the loop's exception handler (thousands of error lines a second):
`_throttle_accept_errors` installs a handler that counts those (`accept-<errno>`) and logs one
line per interval, passing every other report to the default handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import socket
from collections.abc import Coroutine, Iterable
from typing import Any

from geomesh.logs import event
from regional_gateway.proxy.admission import Admission, PenaltyBox, Refusal, client_key, per_client_limit
from regional_gateway.proxy.certificates import CertificateStore
from regional_gateway.proxy.custom_domains import CustomDomains
from regional_gateway.proxy.downstream import ClientConnection
from regional_gateway.proxy.fd_pressure import RESERVED_FDS, AcceptBackoff, connection_cap
from regional_gateway.proxy.host import ServedConnection
from regional_gateway.proxy.http_errors import ProxyError, render
from regional_gateway.proxy.metrics import ProxyMetrics
from regional_gateway.proxy.on_demand import OnDemandCertificates
from regional_gateway.proxy.port80 import HttpsRedirect, challenge_table
from regional_gateway.proxy.prober import Prober
from regional_gateway.proxy.route_state import BackendRuntime, RouteState
from regional_gateway.proxy.routes import Routes
from regional_gateway.proxy.settings import ProxySettings, parse_listen
from regional_gateway.proxy.tls_listener import TlsListener
from regional_gateway.proxy.upstream import Pool

log = logging.getLogger("geomesh.gateway")
SWEEP_INTERVAL = 0.25


class ProxyServer:
    def __init__(self, settings: ProxySettings, routes: Routes,
                 certificates: CertificateStore | None = None) -> None:
        self.settings = settings
        self.state = RouteState.compile(routes)
        self.certs = certificates if certificates is not None else CertificateStore.from_specs(routes.certificates)
        self.pool = Pool(settings.pool_max_idle, settings.pool_idle_timeout)
        self.metrics = ProxyMetrics(self)
        self.connections: set[ServedConnection] = set()
        self.pending_tls = 0  # TLS connections accepted, not yet served (ClientHello, handshake)
        # the cap in force: max_connections, lowered by start() to what the descriptors carry
        self.max_connections = settings.max_connections
        self.admission = Admission(self.max_connections,
                                   per_client_limit(settings.max_connections_per_client, self.max_connections),
                                   PenaltyBox(settings.penalty_cooldown, settings.penalty_cooldown_max,
                                              settings.penalty_clients))
        self.admission.clock = lambda: self.now
        self._client_keys: dict[ServedConnection, str] = {}  # established connection -> its client, if not exempt
        self._handing_over: Any = None  # the protocol a mesh connection is being handed to (exempt)
        self.kind_counts: dict[str, int] = {"http": 0, "https": 0, "mesh": 0, "tunnel": 0, "h2": 0}
        self.now = 0.0
        self.draining = False
        self.mark = (routes.self_name or routes.region or "gateway").encode()
        # peers whose forwarded requests are believed on every listener, as on the mesh listener
        # (assign a new set at any time, e.g. the other gateways' addresses when there is no mesh)
        self.trusted_peers: frozenset[str] = frozenset(settings.trusted_peers)
        # local addresses that make a connection accepted by a wildcard listener a mesh connection
        self.mesh_local_ips: frozenset[str] = frozenset()
        self.addresses: dict[str, list[tuple[str, int]]] = {"http": [], "https": [], "mesh": []}
        self._servers: list[asyncio.AbstractServer] = []
        self._tls: list[TlsListener] = []
        self._tasks: set[asyncio.Task] = set()
        self._background: list[asyncio.Task] = []
        self._next_cert_check = 0.0
        # custom domains by TXT record (None without --resolver): docs/custom-domains.md
        self.custom_domains = CustomDomains.from_settings(settings, clock=lambda: self.now)
        # port 80 (`port80`): the ACME HTTP-01 challenges to answer, the redirect to HTTPS (set at start)
        self.acme_challenges: dict[bytes, bytes] = {}
        # certificates on demand for custom domains (`on_demand`): set by the agent, which can ask
        self.on_demand: OnDemandCertificates | None = None
        self.https_redirect: HttpsRedirect | None = None

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.now = loop.time()
        self.pool.now = self.now
        self._throttle_accept_errors(loop)
        try:
            wildcard_ports = {parse_listen("http", item)[1] for item in self.settings.http
                              if parse_listen("http", item)[0] in ("0.0.0.0", "::")}
            for kind, items in (("http", self.settings.http), ("mesh", self.settings.mesh)):
                trusted = kind == "mesh"
                for i, item in enumerate(items):
                    host, port = parse_listen(f"{kind}[{i}]", item)
                    if kind == "mesh" and port in wildcard_ports:
                        # the wildcard HTTP listener already owns this port (Linux refuses a second bind):
                        # connections it accepts on this address are treated as the mesh listener's
                        self.mesh_local_ips = self.mesh_local_ips | {host}
                        self.addresses["mesh"].append((host, port))
                        continue
                    srv = await loop.create_server(
                        lambda k=kind, t=trusted: _Gate(self, k, t), host, port,
                        backlog=self.settings.backlog, reuse_address=True)
                    self._servers.append(srv)
                    self.addresses[kind].append(srv.sockets[0].getsockname()[:2])
            for i, item in enumerate(self.settings.https):
                host, port = parse_listen(f"https[{i}]", item)
                sock = _listen_socket(host, port, self.settings.backlog)
                listener = TlsListener(self, sock)
                self._tls.append(listener)
                self.addresses["https"].append(listener.address)
        except OSError:
            await self.shutdown()
            raise
        self._fit_connection_cap(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        if self.settings.https_redirect and self.addresses["https"]:
            self.https_redirect = HttpsRedirect(self.certs, self.addresses["https"][0][1])
        self._background = [asyncio.create_task(self._sweep(), name="proxy-sweeper"),
                            asyncio.create_task(Prober(self).run(), name="proxy-prober")]
        event(log, "proxy listening", **{k: " ".join(f"{h}:{p}" for h, p in v) for k, v in self.addresses.items()},
              routes=self.state.routes.version, apps=len(self.state.apps))

    def _fit_connection_cap(self, fd_limit: int) -> None:
        """Lower the connection cap to what `fd_limit` descriptors carry, and log the limits."""
        settings = self.settings
        cap = connection_cap(settings.max_connections, fd_limit)
        per_client = per_client_limit(settings.max_connections_per_client, cap)
        self.max_connections = self.admission.max_connections = cap
        self.admission.per_client = per_client
        if cap < settings.max_connections:
            event(log, "connection cap lowered to fit the file descriptor limit", logging.WARNING,
                  max_connections=settings.max_connections, effective=cap, fd_limit=fd_limit,
                  reserved_fds=RESERVED_FDS, hint="raise LimitNOFILE (or ulimit -n) to allow more")
        event(log, "connection limits", max_connections=cap, per_client=per_client or "off",
              penalty_cooldown=settings.penalty_cooldown or "off", penalty_cooldown_max=settings.penalty_cooldown_max)

    def _throttle_accept_errors(self, loop: asyncio.AbstractEventLoop) -> None:
        """Count asyncio's accept failures and log them once per interval (see the module doc);
        a loop that has a handler of its own already keeps it."""
        if loop.get_exception_handler() is not None:
            return
        throttle = AcceptBackoff()

        def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            exc = context.get("exception")
            if context.get("message") != "socket.accept() out of system resource" or not isinstance(exc, OSError):
                loop.default_exception_handler(context)
                return
            self.metrics.error(f"accept-{errno.errorcode.get(exc.errno or 0, 'unknown').lower()}")
            suppressed = throttle.failed(loop.time())[1]
            if suppressed is not None:
                event(log, "accept failed, the event loop pauses the listener", logging.WARNING, error=str(exc),
                      not_logged_since_last=suppressed)

        loop.set_exception_handler(handler)

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting, drain connections (up to `timeout`, default drain_timeout), stop."""
        if self.draining:
            return
        self.draining = True
        deadline = asyncio.get_running_loop().time() + (self.settings.drain_timeout if timeout is None else timeout)
        for srv in self._servers:
            srv.close()
        for tl in self._tls:
            tl.close()
        for conn in list(self.connections):
            conn.drain()
        event(log, "draining", connections=len(self.connections))
        while self.connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        left = len(self.connections)
        for conn in list(self.connections):
            conn.abort()
        for task in self._background:
            task.cancel()
        if self.custom_domains is not None:
            self.custom_domains.close()
        if self.on_demand is not None:
            self.on_demand.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._background, *self._tasks, return_exceptions=True)
        self.pool.close_all()
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 1.0)
        event(log, "stopped", aborted=left)

    # ---------------------------------------------------------------- control plane API

    def update_routes(self, routes: Routes) -> None:
        """Serve `routes` from now on (call from the event loop thread)."""
        self.state = RouteState.compile(routes, self.state)
        self.certs.update(routes.certificates)
        self.mark = (routes.self_name or routes.region or "gateway").encode()
        self.metrics.reload("applied")
        event(log, "routes updated", version=routes.version, apps=len(routes.apps),
              regions=len(routes.regions), certificates=len(routes.certificates))

    def set_http_challenges(self, challenges: Iterable[tuple[str, str]]) -> list[str]:
        """Answer exactly these ACME HTTP-01 challenges (token, key authorization) from now on;
        returns the refused ones, each named with its reason."""
        self.acme_challenges, refused = challenge_table(challenges)
        return refused

    # ---------------------------------------------------------------- connection bookkeeping

    def admit(self, key: str | None) -> Refusal | None:
        """Why a new connection of client `key` (None: exempt) is refused at accept, or None.
        A connection taken is counted by `conn_opened`, or by the TLS listener until then."""
        return self.admission.check(key, self.now, len(self.connections) + self.pending_tls)

    def client_of(self, ip: str) -> str | None:
        """The admission key of a public client at `ip`; None for a trusted peer (exempt)."""
        return None if ip in self.trusted_peers else client_key(ip)

    def penalise(self, key: str | None, reason: str) -> None:
        """A connection of client `key` was closed for abuse (`reason`, an error cause): into
        the penalty box (counted; logged when a cool-down starts). None (exempt): nothing."""
        if key is None:
            return
        cooldown = self.admission.penalty.offend(key, self.now, reason)
        if cooldown is not None:
            event(log, "client penalised: new connections refused", logging.INFO, client=key, reason=reason,
                  cooldown=cooldown)

    def penalise_ip(self, ip: str, reason: str) -> None:
        self.penalise(self.client_of(ip), reason)

    def refusal_message(self, refusal: Refusal, key: str | None) -> str:
        if refusal is Refusal.PENALISED:
            left = self.admission.penalty.penalised(key or "", self.now)
            return f"client {key} is refused for {left:.0f}s more after a connection of its was closed for abuse"
        if refusal is Refusal.PER_CLIENT:
            return f"client {key} holds its share of {self.admission.per_client} connections"
        return f"the gateway has reached its connection limit ({self.max_connections})"

    def conn_opened(self, conn: ServedConnection) -> bool:
        if self.draining or len(self.connections) >= self.max_connections:
            return False
        self.connections.add(conn)
        self.kind_counts[conn.kind] += 1
        key = self._key_of(conn)
        if key is not None:
            self._client_keys[conn] = key
            self.admission.hold(key)
        return True

    def _key_of(self, conn: Any) -> str | None:
        """The client an established connection counts for; None if exempt (mesh, trusted peers)."""
        if conn is self._handing_over:  # came over the mesh listener
            return None
        if isinstance(conn, ClientConnection):
            return None if conn.trusted else client_key(conn.client_ip)
        peer = conn.transport.get_extra_info("peername")
        return self.client_of(peer[0]) if isinstance(peer, tuple) and peer else None

    def conn_closed(self, conn: ServedConnection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.kind_counts[conn.kind] -= 1
            key = self._client_keys.pop(conn, None)
            if key is not None:
                self.admission.release(key)

    def connection_counts(self) -> dict[str, int]:
        return dict(self.kind_counts)

    def backend_states(self) -> list[tuple[str, str, str, bool]]:
        out = []
        for name, app in list(self.state.apps.items()):
            for b in app.backends:
                out.append((name, b.key, b.health.state.value, b.available))
        for gw in list(self.state.gateways.values()):
            out.append(("-", gw.label, gw.health.state.value, gw.available))
        return out

    def spawn(self, coro: Coroutine) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not isinstance(exc, (OSError, ConnectionError, asyncio.TimeoutError)):
            log.error("background task failed", exc_info=exc)

    def health_changed(self, rt: BackendRuntime) -> None:
        if rt.sync():
            h = rt.health
            event(log, "backend available" if rt.available else "backend unavailable",
                  logging.INFO if rt.available else logging.WARNING,
                  app=rt.app.spec.name if rt.app else "-", backend=rt.label, state=h.state.value, reason=h.reason)

    def hand_over(self, conn: ServedConnection, transport: Any, protocol: Any) -> None:
        """Move a mesh connection from the HTTP protocol that sniffed it to the one that serves it
        (`mesh_intake.from_mesh`); it counts as the mesh listener's (exempt from admission)."""
        self.conn_closed(conn)
        transport.set_protocol(protocol)
        self._handing_over = protocol
        try:
            protocol.connection_made(transport)
        finally:
            self._handing_over = None

    # ---------------------------------------------------------------- timers

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = self.now = loop.time()
            try:
                self.pool.sweep(now)
                for conn in list(self.connections):
                    d = conn.deadline
                    if d and d < now:
                        conn.deadline = 0.0
                        conn.timed_out()
                for rt in self.state.all_backends():
                    if rt.health.ejected_until and rt.health.expire(now):
                        self.health_changed(rt)
                if now >= self._next_cert_check:
                    self._next_cert_check = now + self.settings.cert_check_interval
                    self.certs.refresh()
            except Exception:  # the sweeper must survive anything a connection does
                log.exception("sweeper pass failed")


class _Refused(ProxyError):
    """A connection refused at accept (`Refusal`): 503, its cause the refusal."""

    status, closes = 503, True

    def __init__(self, refusal: Refusal, message: str) -> None:
        super().__init__(message)
        self.cause = refusal.value


class _Gate(asyncio.Protocol):
    """The first protocol of a plain listener's connection: admission (`ProxyServer.admit`)
    before any HTTP, then the connection goes to a `ClientConnection`. A refused one gets a
    `503` naming the rule and is closed at once, without reading it (a refused connection must
    not hold a descriptor, whatever its client does)."""

    __slots__ = ("server", "kind", "trusted")

    def __init__(self, server: ProxyServer, kind: str, trusted: bool) -> None:
        self.server = server
        self.kind = kind
        self.trusted = trusted

    def connection_made(self, transport: Any) -> None:
        server = self.server
        key = None if self.trusted else self._client(transport)
        refusal = None if server.draining else server.admit(key)  # draining: the connection says so
        if refusal is not None:
            server.metrics.error(refusal.value)
            transport.write(render(_Refused(refusal, server.refusal_message(refusal, key)), close=True))
            transport.close()
            return
        conn = ClientConnection(server, self.kind, "http", self.trusted)
        transport.set_protocol(conn)
        conn.connection_made(transport)

    def _client(self, transport: Any) -> str | None:
        """The client of a public listener's connection; None if exempt, as `ClientConnection`
        decides: a trusted peer, or our mesh address reached through a wildcard listener."""
        server = self.server
        peer = transport.get_extra_info("peername")
        ip = peer[0] if isinstance(peer, tuple) and peer else ""
        if ip in server.trusted_peers:
            return None
        if server.mesh_local_ips and self.kind == "http":
            local = transport.get_extra_info("sockname")
            if isinstance(local, tuple) and local and local[0] in server.mesh_local_ips:
                return None
        return client_key(ip)

    def data_received(self, data: bytes) -> None:
        pass  # refused and closing: what it sent is dropped

    def eof_received(self) -> bool | None:
        return None


def _listen_socket(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock
