"""The exchanges of one HTTP/1.1 client connection: routing, the backend, the answer, in order.

`Http1Exchanges` is the half of `downstream.ClientConnection` that drives each request's
`Exchange` once its head is parsed: `_dispatch` answers it locally (an error, the health path,
an ACME HTTP-01 challenge or the redirect to HTTPS: `port80`) or routes it (the fast path of
`route_state`, else `targets.choose`); `_send` takes a pooled upstream connection or opens
one, writes the head and the body bytes held meanwhile; the
upstream connection calls back (`response_done`, `upstream_lost`, `upstream_broken`, and the
`upstream.ExchangeOwner` rest) and `_finish` moves to the next pipelined exchange. Retries
(`_retry`, as `attempt.HTTP1` allows) avoid the backends that failed; the health of a
backend is told by its connect failures and 5xx answers; in-flight counts and metrics are kept
here. Answers the gateway writes itself (`http_errors`) take their turn like any other; one that
ends the connection lingers (`_linger`) so the client reads it. The reading side (parsing,
pipelining, body and head timeouts, upgrades, the mesh hand-over) is `downstream`; the
connection's lifecycle state (`state`) and its moves are `conn_state`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from time import monotonic
from typing import Any

from regional_gateway.proxy import flow_control
from regional_gateway.proxy.admission import client_key
from regional_gateway.proxy.attempt import HTTP1, Failure, begin, connect_failed, end, failed
from regional_gateway.proxy.client_address import FORWARDED_MARK
from regional_gateway.proxy.conn_state import CLOSED, CLOSING, DONE, HEAD, LINGERING, NEW, UPGRADING
from regional_gateway.proxy.custom_domains import Lookup, failure_error, refusal_error
from regional_gateway.proxy.exchange import LINGER, Exchange
from regional_gateway.proxy.flow_control import FlowControl
from regional_gateway.proxy.host import ConnectionHost
from regional_gateway.proxy.hostnames import (
    Authority,
    Mode,
    NameMatch,
    UnknownName,
    custom_candidate,
    normalize_host,
    parse_authority,
    resolve_custom,
)
from regional_gateway.proxy.http_errors import (
    BadHost,
    LookupFailed,
    MisdirectedRequest,
    ProxyError,
    ShuttingDown,
    UnknownHost,
    UpstreamFailed,
    UpstreamTimeout,
    render,
)
from regional_gateway.proxy.lookup_budget import Refusal
from regional_gateway.proxy.port80 import ACME_GET, challenge_answer, redirect_answer
from regional_gateway.proxy.request_head import with_host
from regional_gateway.proxy.route_state import BackendRuntime
from regional_gateway.proxy.routes import RemoteRegion
from regional_gateway.proxy.targets import Target, choose
from regional_gateway.proxy.upstream import UpstreamConnection
from regional_gateway.reach_prober import HEALTH_PATH, health_response

_IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))
_HEALTH_GET = b"GET " + HEALTH_PATH.encode() + b" "  # the reserved health path, answered by the gateway


class Http1Exchanges(asyncio.Protocol):
    """The exchanges of a client connection, from a parsed head to the end of the answer."""

    trusted = False  # a mesh or trusted-peer connection (`downstream` sets both)
    client_ip = ""
    kind = "http"  # the listener: "http" (plain, public), "mesh" or "https" (`downstream` sets both)
    scheme = "http"

    def __init__(self, server: ConnectionHost, sni: bytes | None) -> None:
        # At most 29 attributes here and in `ClientConnection` together: CPython 3.11 keeps that many
        # in the instance itself; one more and every attribute access on the hot path is a dict
        # lookup, about 30% slower (tests/proxy/test_conn_lifecycle.py holds the line).
        self.server = server
        self.settings = server.settings  # timeouts and limits (one slotted value, not a copy of each)
        self.sni = sni  # the TLS server name: routes a request without Host
        self.transport: Any = None
        self.client_key = b""  # the client's address, for the balancers
        self.deadline = 0.0
        self.active: Exchange | None = None  # the exchange being answered
        self.cur: Exchange | None = None  # the exchange whose request is being read
        self.queue: deque[Exchange] = deque()  # pipelined exchanges waiting for their turn
        self.state = NEW  # where the connection is in its lifecycle (`conn_state`)
        self.keep_alive = True  # False: close once the exchange being answered is done
        self.flow = FlowControl()  # why reading is paused (`flow_control`)
        self.body_last = 0.0  # when the active exchange's body last made progress
        self.body_win_start = 0.0  # the body-rate window: since when, and bytes received in it
        self.body_win_bytes = 0
        self.up_ex: Exchange | None = None  # the exchange whose upgrade request ended the parsing
        self.tunnel: UpstreamConnection | None = None  # after a 101: the backend end of the byte tunnel

    # ---------------------------------------------------------------- reading control

    def pause_reading(self, reason: int) -> None:
        """Stop reading from the client for `reason` (a `flow_control` bit; the upstream's back-pressure)."""
        self.flow.pause(reason)

    def resume_reading(self, reason: int) -> None:
        self.flow.resume(reason)

    # ---------------------------------------------------------------- dispatch

    def _dispatch(self, ex: Exchange) -> None:
        """Route the active exchange and send its head upstream (or answer it locally)."""
        if ex.error is not None:
            self._local(ex, ex.error)
            return
        if ex.head.startswith(_HEALTH_GET):  # any Host: the outside-in probes (docs/reachability.md)
            self._health(ex)
            return
        server = self.server
        if ex.head.startswith(ACME_GET) and self.scheme == "http":  # any Host: ACME HTTP-01 (`port80`)
            self._answer(ex, *challenge_answer(ex.head, server.acme_challenges, close=not (ex.keep_alive and self.keep_alive)))
            return
        if server.https_redirect is not None and self.kind == "http" and not self.trusted:
            location = server.https_redirect.location(ex.host, ex.head, ex.method)
            if location is not None:  # a host served over TLS: to https:// (`port80`)
                self._answer(ex, *redirect_answer(location, ex.method, close=not (ex.keep_alive and self.keep_alive)))
                return
        state = server.state
        host = ex.host if ex.host is not None else self.sni
        fast = state.fast.get(host)  # type: ignore[arg-type]
        if fast is not None:  # the fast path: a local app by name, a backend by its policy
            app, port = fast
            if app.ready:
                rt = app.balancer.pick(app.ready, self.client_key)
                if rt is not None:
                    ex.app = app.name
                    self._send(ex, rt, rt.addr if not port else (rt.host, port), None)
                    return
        self._route_checked(ex, host)  # type: ignore[arg-type]

    def _route_checked(self, ex: Exchange, host: bytes) -> None:
        """Route a host that is not on the fast path: its syntax is checked (400 when it is not a
        host name) and the head carries its canonical form (`hostnames.parse_authority`). The
        fast path needs neither: it holds only names that resolved, looked up in canonical form."""
        auth = parse_authority(host.decode("latin-1"))
        if type(auth) is not Authority:
            self._local(ex, BadHost(f"bad Host {host[:100].decode('latin-1')!r}: {auth.reason}"))  # type: ignore
            return
        canon = auth.render().encode()
        if canon != host:
            ex.head = with_host(ex.head, canon, ex.host is not None)
            ex.host = canon
        elif ex.host is None:  # routed by SNI: the backend gets it as Host
            ex.head = with_host(ex.head, canon, False)
            ex.host = canon
        match = self.server.state.lookup(canon)
        if type(match) is UnknownName and self.server.custom_domains is not None \
                and custom_candidate(self.server.state.routes, auth.host):  # type: ignore[union-attr]
            self._route_custom(ex, auth.host)  # type: ignore[union-attr]
            return
        self._route(ex, match)

    def _route_custom(self, ex: Exchange, host: str) -> None:
        """A host that may be a custom domain by TXT record (docs/custom-domains.md): routed by the
        cached answer, else once the look-up lands (reading paused meanwhile; body bytes that came
        are held as for a connect); refused when the look-up budget is spent."""
        domains = self.server.custom_domains
        found = domains.peek(host)  # type: ignore[union-attr]
        if found is not None:
            self._route_found(ex, host, found)
            return
        pending = domains.lookup(host, None if self.trusted else client_key(self.client_ip))  # type: ignore
        if isinstance(pending, Refusal):
            self._local(ex, refusal_error(host, pending))
            return
        self.flow.pause(flow_control.CONNECT)
        now = self.server.now
        if ex.has_body and not ex.req_done:  # as for a connect: the gateway's pause is not the client's fault
            self._body_window(now)
        else:  # the look-up ends (answer or failure) within max_wait
            self.deadline = now + max(self.settings.upstream_timeout, domains.max_wait)  # type: ignore[union-attr]
        pending.add_done_callback(lambda f: self._custom_landed(ex, host, f))

    def _custom_landed(self, ex: Exchange, host: str, done: asyncio.Future) -> None:
        self.flow.resume(flow_control.CONNECT)
        if self.state is CLOSED or ex is not self.active or ex.resp_done:
            return
        if done.cancelled() or done.exception() is not None:
            self._local(ex, ShuttingDown("the gateway is shutting down") if done.cancelled()
                        else LookupFailed(f"the look-up of custom domain {host} failed"))
            return
        self._route_found(ex, host, done.result())

    def _route_found(self, ex: Exchange, host: str, found: Lookup) -> None:
        if found.failure:
            self._local(ex, failure_error(host, found))
        elif found.address is None:
            self._route(ex, self.server.state.lookup(ex.host or b""))  # no mapping: the unknown host's answer
        else:
            self._route(ex, resolve_custom(self.server.state.routes, host, found.address))

    def _route(self, ex: Exchange, match: NameMatch | UnknownName) -> None:
        if type(match) is not NameMatch:
            self._local(ex, UnknownHost(f"unknown host: {match.reason}"))  # type: ignore[union-attr]
            return
        host = ex.host if ex.host is not None else self.sni
        if match.mode is not Mode.HTTP:
            how = "TLS passthrough (connect with TLS to the gateway's TLS port)" if match.mode is Mode.PASSTHROUGH \
                else "HTTP/2 over TLS (connect with TLS and ALPN h2 to the gateway's TLS port)"
            self._local(ex, MisdirectedRequest(f"{host.decode('latin-1')} is a {how} name"))  # type: ignore[union-attr]
            return
        target = choose(self.server.state, match, self.client_key, may_forward=not ex.marked, exclude=ex.tried)
        if not isinstance(target, Target):
            self._local(ex, target)
            return
        ex.app = target.app
        self._send(ex, target.backend, target.addr, target.region)

    def _send(self, ex: Exchange, rt: BackendRuntime, addr: tuple[str, int], region: RemoteRegion | None) -> None:
        """A try of `ex` on `rt` at `addr`, on a pooled connection if there is one. Its first four
        lines are `attempt.begin(ex, rt)` inlined: on this hot path a call costs 1% per request."""
        ex.backend = rt
        ex.addr = addr
        rt.inflight += 1
        ex.counted = True
        ex.attempts += 1
        server = self.server
        if region is not None:
            ex.region = region
            ex.backend_label = rt.label
            ex.final_head = ex.head[:-2] + FORWARDED_MARK + b": " + server.mark + b"\r\n\r\n"
            server.metrics.forward(ex.app, region.name)
        else:
            if ex.region is not None:  # a retry after a forward went local
                ex.region = None
            ex.backend_label = rt.key
            ex.final_head = ex.head
        if ex.has_body and not ex.req_done:  # the body is still coming: body_timeout / body_min_rate apply
            self._body_window(server.now)
        else:
            self.deadline = server.now + self.settings.upstream_timeout
        up = server.pool.take(addr)
        if up is not None:
            ex.upstream = up
            up.ex = ex
            up.client = self
            up.got = 0
            ex.t_sent = monotonic()
            up.transport.write(ex.final_head)
            if ex.pending:
                self._flush_pending(ex, up)
            return
        self.flow.pause(flow_control.CONNECT)
        server.spawn(self._connect(ex, rt, addr))

    async def _connect(self, ex: Exchange, rt: BackendRuntime, addr: tuple[str, int]) -> None:
        server = self.server
        loop = asyncio.get_running_loop()
        try:
            _, up = await asyncio.wait_for(
                loop.create_connection(lambda: UpstreamConnection(server.pool, addr), addr[0], addr[1]),
                server.settings.connect_timeout)
        except TimeoutError:
            self._connect_failed(ex, rt, f"connect to {rt.label} timed out after "
                                         f"{server.settings.connect_timeout:g}s", timeout=True)
            return
        except OSError as exc:
            why = exc.strerror or str(exc) or type(exc).__name__
            self._connect_failed(ex, rt, f"cannot connect to {rt.label}: {why}")
            return
        rt.health.connected()
        if self.state is CLOSED or ex is not self.active or ex.resp_done:
            server.pool.put(up)  # type: ignore[arg-type]
            return
        self.flow.resume(flow_control.CONNECT)
        self._attach(ex, up)  # type: ignore[arg-type]

    def _attach(self, ex: Exchange, up: UpstreamConnection) -> None:
        ex.upstream = up
        up.ex = ex
        up.client = self
        up.got = 0
        up.done = False
        ex.t_sent = monotonic()
        up.transport.write(ex.final_head)
        if ex.pending:
            self._flush_pending(ex, up)

    def _forward(self, ex: Exchange, data: bytes) -> bool:
        """Request bytes for `ex`'s backend: written now, or queued (True) until its upstream
        connection is up (`_flush_pending` sends them)."""
        up = ex.upstream
        if up is not None and not up.closed:
            up.transport.write(data)
            return False
        if ex.pending is None:
            ex.pending = []
        ex.pending.append(data)
        ex.pending_len += len(data)
        return True

    def _flush_pending(self, ex: Exchange, up: UpstreamConnection) -> None:
        w = up.transport.write
        for chunk in ex.pending:  # type: ignore[union-attr]
            w(chunk)
        ex.pending = None
        ex.pending_len = 0
        self.flow.resume(flow_control.PENDING)

    def _connect_failed(self, ex: Exchange, rt: BackendRuntime, why: str, *, timeout: bool = False) -> None:
        server = self.server
        server.metrics.error("upstream-connect")
        connect_failed(server, rt, why)
        retry = failed(ex, HTTP1, Failure.CONNECT, body_sent=bool(ex.pending_len and not ex.req_done))
        self.flow.resume(flow_control.CONNECT)
        if self.state is CLOSED or ex is not self.active:
            return
        ex.tried += (rt.key,)
        if retry:
            if self._retry(ex, ex.tried):
                return
        self._local(ex, UpstreamTimeout(why) if timeout else UpstreamFailed(why))

    def _retry(self, ex: Exchange, exclude: tuple[str, ...], *, fresh_to: tuple[str, int] | None = None) -> bool:
        """Send the exchange again, avoiding `exclude`; False if there is nowhere to send it."""
        state = self.server.state
        raw = ex.host if ex.host is not None else self.sni
        match = state.lookup(raw)  # type: ignore[arg-type]
        if type(match) is UnknownName and self.server.custom_domains is not None:
            host = normalize_host(raw.decode("latin-1"))  # type: ignore[union-attr]
            found = self.server.custom_domains.peek(host, count=False)  # routed by it a moment ago
            if found is not None and found.address is not None:
                match = resolve_custom(state.routes, host, found.address)
        if type(match) is not NameMatch:
            return False
        nxt = choose(state, match, self.client_key, may_forward=not ex.marked, exclude=exclude)
        if not isinstance(nxt, Target):
            return False
        ex.app = nxt.app
        if fresh_to is not None and nxt.addr == fresh_to:  # a stale pooled connection: retry on a new one
            rt = nxt.backend
            ex.addr, ex.region = nxt.addr, nxt.region
            begin(ex, rt)
            self.flow.pause(flow_control.CONNECT)
            self.server.spawn(self._connect(ex, rt, nxt.addr))
        else:
            self._send(ex, nxt.backend, nxt.addr, nxt.region)
        return True

    # ---------------------------------------------------------------- responses

    def response_done(self, up: UpstreamConnection) -> None:
        """The upstream delivered a complete response to the active exchange."""
        ex = self.active
        if ex is None or ex.upstream is not up:
            up.close()
            return
        server = self.server
        status = ex.status
        rt = ex.backend
        if rt is not None and (status >= 500 or rt.health.errors_5xx):
            if rt.health.response(status, server.now):
                server.health_changed(rt)
        took = ex.t_head - ex.t_sent if ex.t_head else -1.0  # -1: no response head timed
        ex.upstream = None
        ex.resp_done = True
        up.client = None
        up.ex = None
        if ex.req_done and up.keep and not up.fresh_parser and not ex.upgrade and not up.closed:
            up.keep = False
            server.pool.put(up)
        else:
            if ex.upgrade:
                self._drop_held(ex)
            up.detach(ex.req_done and not ex.upgrade)
        metrics = server.metrics
        if not ex.req_done or self.queue or not self.keep_alive or not ex.keep_alive:  # (a CLOSED one has no active)
            if took >= 0.0:
                metrics.observe(ex.app, took)
            if not ex.req_done:  # the backend answered before the whole body arrived: drain the rest, then go on
                ex.discard = True
                return
            self._finish(ex)
            return
        # inlined _finish for the common case (keep-alive, nothing queued)
        self.active = None
        metrics.record(ex.app, ex.backend_label, status, took)
        if ex.counted:  # attempt.end(ex), inlined: the HTTP/1.1 hot path
            ex.counted = False
            rt.inflight -= 1  # type: ignore[union-attr]
        settings = self.settings
        self.deadline = server.now + (settings.header_timeout if self.state is HEAD else settings.idle_timeout)

    def response_progress(self) -> None:
        """Part of the active exchange's response went out: the client is reading, wait on."""
        self.deadline = self.server.now + self.settings.idle_timeout

    def response_overrun(self, count: bool = True) -> None:
        """The backend sent more after the complete response (a second one: counted; junk): the
        client got those bytes too, so its connection ends after this exchange."""
        self.keep_alive = False
        if count:
            self.server.metrics.error("upstream-extra-response")

    def _finish(self, ex: Exchange) -> None:
        self.active = None
        self.server.metrics.request(ex.app, ex.backend_label, ex.status)
        end(ex)
        if self.state is CLOSED:
            return
        if not self.keep_alive or not ex.keep_alive:
            self._close_after_write()
            return
        if self.queue:
            nxt = self.queue.popleft()
            self.active = nxt
            if not self.queue:
                self.flow.resume(flow_control.PIPELINE)
            self._dispatch(nxt)
            return
        settings = self.settings
        self.deadline = self.server.now + (settings.header_timeout if self.state is HEAD else settings.idle_timeout)

    def _local(self, ex: Exchange, err: ProxyError) -> None:
        """Answer the active exchange from the gateway itself."""
        server = self.server
        server.metrics.error(err.cause)
        ex.status = err.status
        close = err.closes or not ex.keep_alive or not self.keep_alive
        if ex.upstream is not None:
            up, ex.upstream = ex.upstream, None
            up.close()
        self.transport.write(render(err, close=close, head_only=ex.head_only))
        ex.resp_done = True
        ex.discard = True
        if err.closes:
            self.server.metrics.request(ex.app, "-", ex.status)
            end(ex)
            self.active = None
            self._linger()
            return
        if close:
            self.keep_alive = False
        if ex.req_done:
            ex.backend_label = "-"
            self._finish(ex)
        else:  # the rest of the body is read and dropped, as long as it keeps coming
            self.deadline = server.now + self.settings.body_timeout

    def _health(self, ex: Exchange) -> None:
        """Answer `GET /.well-known/geomesh/health` from the gateway itself: 200 naming it
        (`reach_prober.health_response`), in its turn like any local answer."""
        answer = health_response(self.server.mark.decode())
        if not ex.keep_alive or not self.keep_alive:
            answer = answer.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n", 1)
        self._answer(ex, 200, answer)

    def _answer(self, ex: Exchange, status: int, answer: bytes) -> None:
        """Write a complete answer of the gateway's own (no backend) for the active exchange."""
        close = not ex.keep_alive or not self.keep_alive
        self.transport.write(answer)
        ex.status = status
        ex.resp_done = True
        ex.discard = True
        ex.backend_label = "-"
        if close:
            self.keep_alive = False
        if ex.req_done:
            self._finish(ex)
        else:  # a body is read and dropped
            self.deadline = self.server.now + self.settings.body_timeout

    def upstream_lost(self, up: UpstreamConnection, exc: Exception | None) -> None:
        """The upstream connection closed while carrying the active exchange."""
        ex = self.active
        up.client = None
        up.ex = None
        if ex is None or ex.upstream is not up:
            return
        ex.upstream = None
        server = self.server
        rt = ex.backend
        label = rt.label if rt is not None else "the backend"
        if up.got == 0:
            why = f"{label} reset the connection: {exc}" if exc is not None else \
                f"{label} closed the connection before answering"
            if rt is not None and not up.reused:
                connect_failed(server, rt, why)
            retry = failed(ex, HTTP1, Failure.STALE_POOLED if up.reused else Failure.RESET_BEFORE_ANSWER,
                           idempotent=ex.method in _IDEMPOTENT, body_sent=ex.has_body)
            if retry and rt is not None:
                if not up.reused:  # a fresh connection failed: avoid that backend; a stale pooled one: retry it
                    ex.tried += (rt.key,)
                if self._retry(ex, ex.tried, fresh_to=up.addr if up.reused else None):
                    return
            server.metrics.error("upstream-reset")
            self._local(ex, UpstreamFailed(why))
            return
        # the response had started: it cannot be replaced, only cut short
        server.metrics.error("upstream-reset")
        if ex.status == 0:
            ex.status = 502
        server.metrics.request(ex.app, ex.backend_label, ex.status)
        end(ex)
        self.active = None
        self._close_after_write()

    def upstream_broken(self, up: UpstreamConnection, why: str) -> None:
        """The backend sent something that is not an HTTP response."""
        ex = self.active
        up.close()
        if ex is None or ex.upstream is not up:
            return
        ex.upstream = None
        if up.got == 0:
            self._local(ex, UpstreamFailed(why))
        else:
            self.server.metrics.error("upstream-malformed")
            end(ex)
            self.active = None
            self._close_after_write()


    def _drop_held(self, ex: Exchange) -> None:
        """The backend did not switch protocols: what the client sent after its upgrade request is dropped."""
        if ex.held:
            self.server.metrics.error("upgrade-data-dropped")
        ex.held = None
        self.up_ex = None
        if self.state is UPGRADING:  # reading stopped at the upgrade request
            self.state = DONE

    # ---------------------------------------------------------------- body deadlines and the end of a connection

    def _body_window(self, now: float) -> None:
        """Start a body-rate window (and the body idle timer) at `now`."""
        self.body_last = self.body_win_start = now
        self.body_win_bytes = 0
        self.flow.new_window()
        self.deadline = now + self.settings.body_timeout


    def _linger(self) -> None:
        """After a closing error: stop sending, discard input for a moment, then close."""
        self.state = LINGERING
        self.keep_alive = False
        self.flow.resume(flow_control.ALL)
        self.deadline = self.server.now + LINGER
        transport = self.transport
        if transport.can_write_eof():
            try:
                transport.write_eof()
            except (OSError, RuntimeError):
                self._end()
        else:
            self._end()

    def _close_after_write(self) -> None:
        self.keep_alive = False
        self._end()

    def _end(self) -> None:
        """Close the transport: the last answer flushes, then `connection_lost` (CLOSING, then CLOSED)."""
        if self.state is not CLOSED:
            self.state = CLOSING
            self.transport.close()

    def _abandon(self, ex: Exchange) -> None:
        up = ex.upstream
        ex.upstream = None
        if up is not None:
            up.close()
        end(ex)
