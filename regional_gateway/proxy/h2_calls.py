"""The life of each stream of an HTTP/2 client connection: routed, carried, ended.

`H2Calls` is the half of `h2proxy.H2Downstream` that deals in streams (one gRPC call, one
HTTP/2 request): `_route` picks a target for a stream with `targets.choose` and attaches it to
the upstream connection for that address (opened lazily, `h2_upstream.H2Upstream`);
`upstream_failed` retries the streams a failed connection carried elsewhere when they were
untouched (as `attempt.HTTP2` allows) or answers them; data moves both ways within
the flow-control windows (`_push_up`, `_push_down`) and is acknowledged to its sender only once
passed on; `answer` ends a stream with the gateway's own response (a gRPC trailers-only
`grpc-status` for gRPC calls, else the HTTP status with a text body and `x-geomesh-error`), and
`_finish` with the backend's, telling the backend's health about 5xx and counting the request.
The connection itself (reading, the client's frames, budgets, GOAWAY) is `h2proxy`.
"""

from __future__ import annotations

import asyncio
from time import monotonic
from typing import Any
from urllib.parse import quote

import h2.connection
import h2.errors
import h2.exceptions

from regional_gateway.proxy import proxy_protocol
from regional_gateway.proxy.attempt import HTTP2, Failure, begin, connect_failed, end, failed
from regional_gateway.proxy.h2_guard import RateBudget, data_credit
from regional_gateway.proxy.h2_streams import (
    GRPC_DEADLINE_EXCEEDED,
    GRPC_UNAVAILABLE,
    HOP_HEADERS,
    send_windowed,
)
from regional_gateway.proxy.h2_upstream import H2Upstream, Stream
from regional_gateway.proxy.host import ConnectionHost
from regional_gateway.proxy.hostnames import NameMatch
from regional_gateway.proxy.http_errors import ProxyError, ShuttingDown, UpstreamFailed, UpstreamTimeout
from regional_gateway.proxy.targets import Target, choose


class H2Calls(asyncio.Protocol):
    """The streams of one client connection (the state is set up by `H2Downstream.__init__`)."""

    server: ConnectionHost
    match: NameMatch
    client: tuple[str, int]
    client_key: bytes
    local: tuple[str, int]
    authority: str
    may_forward: bool
    transport: Any
    conn: h2.connection.H2Connection
    streams: dict[int, Stream]
    upstreams: dict[tuple[str, int], H2Upstream]
    resets: RateBudget
    noop: RateBudget
    closed: bool
    draining: bool
    write_paused: bool

    @property
    def gone(self) -> bool:
        raise NotImplementedError

    def flush(self) -> None:
        raise NotImplementedError

    # ---------------------------------------------------------------- routing a stream

    def _route(self, st: Stream, failed: ProxyError | None = None) -> None:
        """Pick a target for `st` and open it there; `failed`: why the previous attempt failed (the
        answer when no other target is left, more useful than "no healthy backend")."""
        server = self.server
        if self.draining:
            self.answer(st, ShuttingDown("the gateway is shutting down"), refused=True)
            return
        target = choose(server.state, self.match, self.client_key, may_forward=self.may_forward, exclude=st.tried)
        if not isinstance(target, Target):
            self.answer(st, failed or target)
            return
        st.target = target
        rt = target.backend
        begin(st, rt)
        if target.region is not None:
            server.metrics.forward(target.app, target.region.name)
        up = self.upstreams.get(target.addr)
        if up is None or up.closed or up.goaway:
            preamble = b""
            if target.region is not None:  # another region's gateway: it needs the client and the name
                preamble = proxy_protocol.encode_v2(*self.client, *self.local, authority=self.authority)
            up = H2Upstream(self, target.addr, rt, preamble)
            self.upstreams[target.addr] = up
            server.spawn(up.connect())
        up.attach(st)

    def upstream_failed(self, up: H2Upstream, why: str, *, before_connect: bool, timeout: bool = False) -> None:
        """An upstream connection failed; its streams are retried elsewhere or answered."""
        server = self.server
        if self.gone:
            up.pending.clear()
            up.active.clear()
            return
        rt = up.backend
        if self.upstreams.get(up.addr) is up:
            del self.upstreams[up.addr]
        if before_connect:
            connect_failed(server, rt, why)
        server.metrics.error("upstream-connect" if before_connect else "upstream-reset")
        for st in list(up.pending) + list(up.active.values()):
            if st.finished or self.streams.get(st.sid) is not st:
                continue
            st.up, st.up_sid = None, 0
            err = UpstreamTimeout(why) if timeout else UpstreamFailed(why)
            untouched = before_connect or (not st.response_started and not st.t_sent)
            if failed(st, HTTP2, Failure.CONNECT if untouched else Failure.RESET_BEFORE_ANSWER):
                st.tried += (rt.key,)
                self._route(st, err)
                continue
            if st.response_started:
                self._reset(st, h2.errors.ErrorCodes.INTERNAL_ERROR)
            else:
                self.answer(st, err)
        up.pending.clear()
        up.active.clear()
        self.flush()

    # ---------------------------------------------------------------- moving data

    def _push_up(self, st: Stream) -> None:
        """Send what the client sent on `st` to its upstream stream, as far as windows allow (what
        cannot go yet waits in `st.to_up`, unacknowledged, until the upstream stream opens or its
        window grows)."""
        up = st.up
        if up is None or not st.up_sid or up.closed:
            return
        self.ack_down(up.send_body(st), st.sid)
        up.touch()

    def _push_down(self, st: Stream) -> None:
        """Send what the backend sent on `st` to the client, as far as the window and transport allow."""
        if self.gone or self.write_paused:
            return
        conn = self.conn
        sent = send_windowed(conn, st.sid, st.to_down)
        if sent:  # the client may acknowledge what it receives (WINDOW_UPDATE, a bandwidth PING)
            self.noop.credit(data_credit(sent))
        if not st.to_down and (st.down_end or st.down_trailers is not None) and not st.finished:
            if st.down_trailers is not None:
                conn.send_headers(st.sid, st.down_trailers, end_stream=True)
            else:
                conn.end_stream(st.sid)
            self._finish(st)
        if sent and st.up is not None and st.up_sid:
            st.up.ack(st.up_sid, sent)
            st.up.touch()

    def response_headers(self, st: Stream, headers: list[tuple[bytes, bytes]], end: bool, *,
                         informational: bool = False) -> None:
        if self.gone or st.finished or self.streams.get(st.sid) is not st:
            return
        out = [(n, v) for n, v in headers if n not in HOP_HEADERS]
        if informational:
            self.conn.send_headers(st.sid, out)
            return
        st.response_started = True
        for n, v in headers:
            if n == b":status":
                st.status = int(v) if v.isdigit() else 0
        if st.t_sent:
            self.server.metrics.observe(st.target.app if st.target else "-", monotonic() - st.t_sent)
        self.conn.send_headers(st.sid, out, end_stream=end)
        if end:
            self._finish(st)

    def response_data(self, st: Stream, data: bytes, length: int, end: bool) -> None:
        if self.gone or st.finished or self.streams.get(st.sid) is not st:
            if st.up is not None and st.up_sid:
                st.up.ack(st.up_sid, length)
            return
        st.to_down.append((data, length))
        if end:
            st.down_end = True
        self._push_down(st)

    def response_end(self, st: Stream, trailers: list[tuple[bytes, bytes]] | None) -> None:
        if self.gone or st.finished or self.streams.get(st.sid) is not st:
            return
        if trailers is not None:
            st.down_trailers = [(n, v) for n, v in trailers if n not in HOP_HEADERS]
        else:
            st.down_end = True
        self._push_down(st)

    def upstream_reset(self, st: Stream, code: int) -> None:
        """The backend reset its stream: the client's stream is reset too (or answered, if untouched)."""
        if self.gone or st.finished or self.streams.get(st.sid) is not st:
            return
        if not st.response_started and code == h2.errors.ErrorCodes.REFUSED_STREAM and \
                failed(st, HTTP2, Failure.REFUSED_STREAM):
            # the backend did not process it (RFC 9113 8.7): safe to send elsewhere
            st.tried += (st.target.backend.key,) if st.target else ()
            self._route(st)
            return
        self._reset(st, code)

    # ---------------------------------------------------------------- stream endings

    def answer(self, st: Stream, err: ProxyError, *, refused: bool = False) -> None:
        """Answer the stream from the gateway itself (no backend could take it)."""
        server = self.server
        if self.gone:
            return
        server.metrics.error(err.cause)
        if refused:  # counted like a client reset (the next one over the budget ends the connection)
            self.resets.hit(server.now)
        conn = self.conn
        try:
            self._send_error(st, err)
        except h2.exceptions.ProtocolError:  # no window left for the body, or the stream is gone
            try:
                conn.reset_stream(st.sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
            except h2.exceptions.ProtocolError:
                pass
        if not st.up_end:  # the request body is not needed any more (RFC 9113 8.1)
            try:
                conn.reset_stream(st.sid, h2.errors.ErrorCodes.REFUSED_STREAM if refused else h2.errors.ErrorCodes.NO_ERROR)
            except h2.exceptions.ProtocolError:
                pass  # the client's END_STREAM was in the same read: the stream is closed already
        for _, length in st.to_up:
            self.ack_down(length, st.sid)
        st.to_up.clear()
        server.metrics.request(st.target.app if st.target else (self.match.app or self.match.instance), "-", st.status)
        st.finished = True
        self._end_stream_state(st)
        self.streams.pop(st.sid, None)

    def _send_error(self, st: Stream, err: ProxyError) -> None:
        conn = self.conn
        if st.grpc:  # a trailers-only response, what gRPC clients read as a call status
            code = GRPC_DEADLINE_EXCEEDED if isinstance(err, UpstreamTimeout) else GRPC_UNAVAILABLE
            conn.send_headers(st.sid, [(b":status", b"200"), (b"content-type", b"application/grpc"),
                                       (b"grpc-status", str(code).encode()),
                                       (b"grpc-message", quote(err.message, safe=" ").encode()),
                                       (b"x-geomesh-error", err.cause.encode())], end_stream=True)
            st.status = 200
        else:
            body = f"{err.status} {err.message}\n".encode()
            conn.send_headers(st.sid, [(b":status", str(err.status).encode()),
                                       (b"content-type", b"text/plain; charset=utf-8"),
                                       (b"content-length", str(len(body)).encode()),
                                       (b"x-geomesh-error", err.cause.encode())])
            conn.send_data(st.sid, body, end_stream=True)
            st.status = err.status

    def _reset(self, st: Stream, code: int) -> None:
        try:
            self.conn.reset_stream(st.sid, code)
        except h2.exceptions.ProtocolError:
            pass  # the stream or the connection is closed already
        self.server.metrics.error("upstream-reset")
        st.finished = True
        self._end_stream_state(st)
        self.streams.pop(st.sid, None)

    def _finish(self, st: Stream) -> None:
        st.finished = True
        self.resets.credit(1)  # a completed call earns back one reset
        if not st.client_done:  # the response is complete before the request (RFC 9113 8.1)
            if st.up is not None and st.up_sid:
                st.up.reset(st.up_sid, h2.errors.ErrorCodes.CANCEL)
            try:
                self.conn.reset_stream(st.sid, h2.errors.ErrorCodes.NO_ERROR)
            except h2.exceptions.ProtocolError:
                pass  # the client had ended its side in the meantime
        rt = st.target.backend if st.target is not None else None
        server = self.server
        if rt is not None:
            if st.status >= 500 or rt.health.errors_5xx:
                if rt.health.response(st.status, server.now):
                    server.health_changed(rt)
            label = rt.label if st.target.region is not None else rt.key  # type: ignore[union-attr]
            server.metrics.request(st.target.app, label, st.status)  # type: ignore[union-attr]
        self._end_stream_state(st)
        self.streams.pop(st.sid, None)
        if self.draining and not self.streams:
            self.flush()
            self.transport.close()

    def _end_stream_state(self, st: Stream) -> None:
        end(st)
        up = st.up
        if up is not None:
            up.detach(st)
        st.up = None

    def ack_down(self, length: int, sid: int) -> None:
        if length and not self.closed:
            try:
                self.conn.acknowledge_received_data(length, sid)
            except h2.exceptions.ProtocolError:
                pass

    def upstream_closed(self, up: H2Upstream) -> None:
        """`up` closed with no stream on it: forget it (the next stream for its address opens another)."""
        if self.upstreams.get(up.addr) is up:
            del self.upstreams[up.addr]
