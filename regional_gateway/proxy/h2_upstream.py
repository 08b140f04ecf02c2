"""Cleartext HTTP/2 from the gateway to one backend (or another region's gateway), and the streams it carries.

A `Stream` is one client stream of an `h2proxy.H2Downstream` and, once routed, its stream on an
`H2Upstream`: the request's data waiting for the upstream window (`to_up`), the response's
waiting for the client's (`to_down`), and how far each side got. An `H2Upstream` belongs to one
client connection (no flow-control state is shared between clients); it opens its streams as the
backend's concurrency limit allows, starting each with the client's headers and the client-address
headers the gateway writes (a connection to another region's gateway starts with a PROXY v2
`preamble`). What the backend sends goes to the client connection through the `H2Client`
methods; frames it produces are written when the client connection flushes, once per event-loop
callback (`mark_dirty`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from time import monotonic
from typing import Any, Protocol

import h2.connection
import h2.errors
import h2.events
import h2.exceptions

from regional_gateway.proxy.h2_streams import DROP_HEADERS, h2_config, open_connection, send_windowed
from regional_gateway.proxy.host import ConnectionHost
from regional_gateway.proxy.http_errors import ProxyError, UpstreamFailed
from regional_gateway.proxy.route_state import BackendRuntime
from regional_gateway.proxy.targets import Target

log = logging.getLogger("geomesh.gateway.h2")


class Stream:
    """One client stream and, once routed, its upstream stream."""

    __slots__ = ("sid", "headers", "grpc", "up", "up_sid", "target", "attempts", "tried", "to_up", "up_end",
                 "up_trailers", "to_down", "down_end", "down_trailers", "client_done", "response_started", "status", "t_sent",
                 "counted", "backend", "finished")

    def __init__(self, sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.sid = sid
        self.headers = headers
        self.grpc = any(n == b"content-type" and v.startswith(b"application/grpc") for n, v in headers)
        self.up: H2Upstream | None = None
        self.up_sid = 0
        self.target: Target | None = None
        self.attempts = 0
        self.tried: tuple[str, ...] = ()
        self.to_up: deque[tuple[bytes, int]] = deque()  # (data, flow-controlled length to ack downstream)
        self.up_end = False  # the client ended its request: end the upstream stream once to_up is sent
        self.up_trailers: list[tuple[bytes, bytes]] | None = None  # request trailers, sent last
        self.to_down: deque[tuple[bytes, int]] = deque()  # (data, length to ack upstream)
        self.down_end = False
        self.down_trailers: list[tuple[bytes, bytes]] | None = None
        self.client_done = False
        self.response_started = False
        self.status = 0
        self.t_sent = 0.0
        self.counted = False  # counted in `backend.inflight` (`attempt.begin` .. `attempt.end`)
        self.backend: BackendRuntime | None = None  # of the current try
        self.finished = False


class H2Client(Protocol):
    """What an `H2Upstream` asks of the client connection it serves (`h2proxy.H2Downstream`)."""

    server: ConnectionHost
    closed: bool
    deadline: float
    addr_headers: list[tuple[bytes, bytes]]

    def flush(self) -> None: ...
    def mark_dirty(self, up: H2Upstream) -> None: ...
    def ack_down(self, length: int, sid: int) -> None: ...
    def answer(self, st: Stream, err: ProxyError, *, refused: bool = False) -> None: ...
    def upstream_failed(self, up: H2Upstream, why: str, *, before_connect: bool, timeout: bool = False) -> None: ...
    def upstream_closed(self, up: H2Upstream) -> None: ...
    def upstream_reset(self, st: Stream, code: int) -> None: ...
    def response_headers(self, st: Stream, headers: list[tuple[bytes, bytes]], end: bool, *,
                         informational: bool = False) -> None: ...
    def response_data(self, st: Stream, data: bytes, length: int, end: bool) -> None: ...
    def response_end(self, st: Stream, trailers: list[tuple[bytes, bytes]] | None) -> None: ...


class H2Upstream(asyncio.Protocol):
    """Cleartext HTTP/2 to one backend (or another region's gateway) for one client connection."""

    def __init__(self, down: H2Client, addr: tuple[str, int], backend: BackendRuntime, preamble: bytes) -> None:
        self.down = down
        self.addr = addr
        self.backend = backend
        self.preamble = preamble
        self.transport: Any = None
        self.conn = h2.connection.H2Connection(config=h2_config(client_side=True))
        self.pending: list[Stream] = []  # attached before the connection is up
        self.active: dict[int, Stream] = {}  # upstream stream id -> stream
        self.connected = False
        self.closed = False
        self.goaway = False
        self.write_paused = False

    async def connect(self) -> None:
        server = self.down.server
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.create_connection(lambda: self, *self.addr), server.settings.connect_timeout)
        except TimeoutError:
            self._failed(f"connect to {self.backend.label} timed out after {server.settings.connect_timeout:g}s",
                         timeout=True)
            return
        except OSError as exc:
            self._failed(f"cannot connect to {self.backend.label}: {exc.strerror or exc}")
            return
        if self.down.closed:
            self.close()

    def _failed(self, why: str, *, timeout: bool = False) -> None:
        self.closed = True
        self.down.upstream_failed(self, why, before_connect=True, timeout=timeout)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.connected = True
        self.backend.health.connected()
        if self.preamble:
            transport.write(self.preamble)
        open_connection(self.conn)
        self._open_pending()
        self.flush()
        self.down.flush()

    def _open_pending(self) -> None:
        while self.pending and self._has_room():
            self._open(self.pending.pop(0))

    def attach(self, st: Stream) -> None:
        st.up = self
        if self.connected and not self.closed and self._has_room():
            self._open(st)
            self.touch()
        else:
            self.pending.append(st)  # until connected, or until a stream ends (the backend's limit)

    def _has_room(self) -> bool:
        return self.conn.open_outbound_streams < self.conn.remote_settings.max_concurrent_streams

    def _open(self, st: Stream) -> None:
        """Start the upstream stream: the client's headers, with the client-address headers replaced."""
        if st.finished:
            return
        sid = self.conn.get_next_available_stream_id()
        headers = [(n, v) for n, v in st.headers if n not in DROP_HEADERS]
        headers += self.down.addr_headers
        end = st.up_end and not st.to_up and st.up_trailers is None
        try:
            self.conn.send_headers(sid, headers, end_stream=end)
        except h2.exceptions.ProtocolError as exc:
            self.down.answer(st, UpstreamFailed(f"{self.backend.label} refused the stream: {exc}"))
            return
        st.client_done = end
        st.up_sid = sid
        st.t_sent = monotonic()
        self.active[sid] = st
        if st.to_up or (st.up_end and not end):
            self.down.ack_down(self.send_body(st), st.sid)

    def send_body(self, st: Stream) -> int:
        """Send queued request data on `st`'s upstream stream; returns the flow-controlled bytes sent."""
        if self.write_paused or not st.up_sid or self.closed:
            return 0
        conn = self.conn
        done = 0
        try:
            done = send_windowed(conn, st.up_sid, st.to_up)
            if not st.to_up and st.up_end and not st.client_done:
                if st.up_trailers is not None:
                    conn.send_headers(st.up_sid, st.up_trailers, end_stream=True)
                else:
                    conn.end_stream(st.up_sid)
                st.client_done = True
        except h2.exceptions.StreamClosedError:
            st.to_up.clear()  # the backend already ended or reset the stream
        return done

    def ack(self, sid: int, length: int) -> None:
        if length and not self.closed:
            try:
                self.conn.acknowledge_received_data(length, sid)
            except h2.exceptions.ProtocolError:
                pass

    def reset(self, sid: int, code: int) -> None:
        st = self.active.pop(sid, None)
        if st is not None:
            st.up = None
        if self.connected and not self.closed:
            try:
                self.conn.reset_stream(sid, code)
            except h2.exceptions.ProtocolError:
                pass
            self.touch()

    def detach(self, st: Stream) -> None:
        if st.up_sid:
            self.active.pop(st.up_sid, None)
            if self.pending and self.connected and not self.closed:
                self._open_pending()  # a slot under the backend's stream limit is free again
                self.touch()
        elif st in self.pending:
            self.pending.remove(st)

    def touch(self) -> None:
        """Frames are waiting: written when the client connection flushes (end of the callback)."""
        self.down.mark_dirty(self)

    def flush(self) -> None:
        if self.transport is not None and not self.closed:
            data = self.conn.data_to_send()
            if data:
                self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # -- asyncio.Protocol ------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        down = self.down
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.closed = True
            self.transport.close()
            down.upstream_failed(self, f"malformed HTTP/2 from {self.backend.label}: {exc}", before_connect=False)
            return
        try:
            for ev in events:
                try:
                    self._event(ev)
                except h2.exceptions.StreamClosedError:
                    pass  # the client's stream closed while we acted on it
        except Exception as exc:  # a bug must not take the event loop's callback down silently
            log.error("HTTP/2 upstream connection failed", exc_info=exc)
            self.closed = True
            self.transport.close()
            down.upstream_failed(self, f"internal error on the connection to {self.backend.label}",
                                 before_connect=False)
            return
        self.flush()
        down.flush()
        down.deadline = down.server.now + down.server.settings.tunnel_idle_timeout

    def _event(self, ev: Any) -> None:
        """One event from the backend, passed on to the client's stream it belongs to."""
        down = self.down
        t = type(ev)
        st = self.active.get(getattr(ev, "stream_id", 0) or 0)
        if t is h2.events.ResponseReceived and st is not None:
            down.response_headers(st, ev.headers, ev.stream_ended is not None)
        elif t is h2.events.InformationalResponseReceived and st is not None:
            down.response_headers(st, ev.headers, False, informational=True)
        elif t is h2.events.DataReceived:
            if st is None:
                self.ack(ev.stream_id, ev.flow_controlled_length)
            else:
                down.response_data(st, ev.data, ev.flow_controlled_length, ev.stream_ended is not None)
        elif t is h2.events.TrailersReceived and st is not None:
            down.response_end(st, ev.headers)
        elif t is h2.events.StreamEnded and st is not None:
            if not st.down_end and st.down_trailers is None and st.response_started:
                down.response_end(st, None)
        elif t is h2.events.StreamReset and st is not None:
            self.active.pop(ev.stream_id, None)
            st.up = None
            down.upstream_reset(st, ev.error_code)
        elif t is h2.events.WindowUpdated:
            for s in list(self.active.values()) if ev.stream_id == 0 else ([st] if st is not None else []):
                down.ack_down(self.send_body(s), s.sid)
        elif t is h2.events.RemoteSettingsChanged:  # a new window or stream limit
            for s in list(self.active.values()):
                down.ack_down(self.send_body(s), s.sid)
            self._open_pending()
        elif t is h2.events.ConnectionTerminated:
            self.goaway = True  # no new streams here; streams above last_stream_id were not processed
            last = ev.last_stream_id or 0
            for s in [s for sid, s in self.active.items() if sid > last]:
                self.active.pop(s.up_sid, None)
                s.up, s.up_sid = None, 0
                down.upstream_reset(s, h2.errors.ErrorCodes.REFUSED_STREAM)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed = self.closed
        self.closed = True
        if self.active and not self.down.closed:
            why = f"{self.backend.label} closed the connection" + (f": {exc}" if exc else "")
            self.down.upstream_failed(self, why, before_connect=False)
        elif not was_closed:
            self.down.upstream_closed(self)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for st in list(self.active.values()):
            self.down.ack_down(self.send_body(st), st.sid)
        self.flush()
        self.down.flush()
