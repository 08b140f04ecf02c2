"""HTTP/2 proxying for `g` names (gRPC and other h2c apps): each stream balanced on its own.

A client of a `<app>-<port>g` name speaks HTTP/2 over TLS (ALPN h2) and typically keeps one
connection for everything (a gRPC channel). Tunnelling that connection to one backend would pin
all its calls there; here the gateway terminates HTTP/2 itself (the `h2` library, sans-IO) and
routes every *stream* — one gRPC call, one HTTP/2 request — with `targets.choose`, so the app's
policy applies per call: round robin spreads calls, least connections counts streams in flight,
IP hash keeps a client's calls on one backend.

Shape: one `H2Downstream` per client connection (server side of HTTP/2): this module holds the
connection (reading, the client's frames, budgets, GOAWAY, shutdown); the life of each stream
(routing, retries, data both ways, the answer) is its base class `h2_calls.H2Calls`. It opens,
lazily, one `h2_upstream.H2Upstream` (client side of HTTP/2, cleartext h2c) per target address
it needs, owned by that client connection alone, so no flow-control state is shared between
clients. A target in
another region is that region's gateway: its upstream connection starts with a PROXY v2 header
carrying the client address and the `g` host name (authority TLV), and the far gateway's mesh
listener runs an `H2Downstream` of its own that never forwards again (one hop).

Flow control: data is passed on as the receiving side's HTTP/2 window and transport allow, and
acknowledged to its sender (WINDOW_UPDATE) only once passed on, so a slow reader slows its
writer through HTTP/2 itself and the gateway holds at most one window per stream.

Errors are answered per stream, never by dropping the connection: a request with no reachable
backend gets a complete response — for gRPC (`content-type: application/grpc...`) a
trailers-only response with `grpc-status: 14` (UNAVAILABLE) and a message naming the cause, as
gRPC clients expect from proxies; otherwise the HTTP status (502/503/504) with a plain-text body
and `x-geomesh-error`. A backend that resets a stream resets the client's stream; a backend
connection lost before answering is a 502/UNAVAILABLE, after answering a reset. Malformed HTTP/2
from a client ends that connection with GOAWAY (PROTOCOL_ERROR), logged and counted; a request
head `h2` accepts but `h2_guard.request_problem` refuses gets a 400 and RST_STREAM
(PROTOCOL_ERROR), and nothing reaches a backend.

Hostile clients (`h2_guard`): the upstream stream of a request is opened only once the whole
read that carried its HEADERS has been processed, so a HEADERS+RST_STREAM pair costs a backend
nothing; client resets and no-op frames are counted per connection, with GOAWAY
(ENHANCE_YOUR_CALM) past the budgets, and the client goes into the penalty box
(`ProxyServer.penalise`: its reconnections are refused at accept for a while); reading stops
while the client does not read what the gateway writes (PING and SETTINGS ACKs cannot pile up).
A read is fed to the `h2` state machine at most `h2_guard.FEED_FRAMES` frames per event-loop
callback (`FrameCutter`); the rest waits for the next turn with reading paused, so one client's
256 KiB of tiny frames cannot hold the loop for half a second.
"""

from __future__ import annotations

import asyncio
import logging
from time import monotonic
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame

from geomesh.logs import event
from regional_gateway.proxy.client_address import forwarded_node
from regional_gateway.proxy.h2_calls import H2Calls
from regional_gateway.proxy.h2_guard import (
    MAX_QUEUED_CONTROL,
    Calm,
    FrameCutter,
    RateBudget,
    request_problem,
)
from regional_gateway.proxy.h2_streams import HOP_HEADERS, h2_config, open_connection
from regional_gateway.proxy.h2_upstream import H2Upstream, Stream
from regional_gateway.proxy.host import ConnectionHost
from regional_gateway.proxy.hostnames import NameMatch

log = logging.getLogger("geomesh.gateway.h2")
# a client has this long to read the GOAWAY that ends its connection for an error, as long as it
# sends no more than this meanwhile (what it sends is dropped; beyond, the connection is reset)
GOAWAY_LINGER = 1.0
GOAWAY_LINGER_BYTES = 256 * 1024


class _Calmed(Exception):
    """Raised out of event handling when the connection went over a budget (GOAWAY sent)."""


class H2Downstream(H2Calls):
    """A client's HTTP/2 connection for a `g` name: every stream routed on its own."""

    kind = "h2"

    def __init__(self, server: ConnectionHost, match: NameMatch, client: tuple[str, int], local: tuple[str, int],
                 authority: str, *, may_forward: bool, preread: bytes = b"") -> None:
        self.server = server
        self.match = match
        self.client = client
        self.client_key = client[0].encode()
        self.local = local
        self.authority = authority
        self.may_forward = may_forward
        self.preread = preread
        self.transport: Any = None
        self.conn = h2.connection.H2Connection(config=h2_config(client_side=False))
        self.streams: dict[int, Stream] = {}
        self.upstreams: dict[tuple[str, int], H2Upstream] = {}
        self.dirty: set[H2Upstream] = set()  # upstreams with frames to write at the next flush
        self.deadline = 0.0
        self.closed = False
        self.counted = False
        self.draining = False
        self.write_paused = False
        self.ended = False  # a GOAWAY was received or sent: nothing can be sent any more
        self.linger_bytes = GOAWAY_LINGER_BYTES
        self.fresh: list[Stream] = []  # streams opened in this read: routed once the read is processed
        self.cutter = FrameCutter()  # the client preface, then frames
        self.backlog = b""  # the part of a read not fed to the state machine yet (reading paused)
        self.backlog_at = 0  # where in `backlog` it starts
        self.feeding: asyncio.Handle | None = None  # the callback that feeds the backlog
        self.resets = RateBudget(server.settings.h2_max_resets, now=server.now)
        self.noop = RateBudget(server.settings.h2_max_control_frames, now=server.now)
        self.unread_replies = 0  # PING/SETTINGS ACKs produced while the client was not reading
        self.addr_headers = [(b"x-forwarded-for", client[0].encode()), (b"x-forwarded-proto", b"https"),
                             (b"forwarded", f"for={forwarded_node(client[0])};proto=https".encode())]

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        server = self.server
        if not server.conn_opened(self):
            server.metrics.error("too-many-connections")
            transport.close()
            return
        self.counted = True
        open_connection(self.conn, {h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 256})
        self.flush()
        self.deadline = server.now + server.settings.header_timeout
        if self.preread:
            data, self.preread = self.preread, b""
            self.data_received(data)

    def data_received(self, data: bytes) -> None:
        if self.closed or self.ended:  # after a GOAWAY: what still arrives is dropped, up to a point
            self.linger_bytes -= len(data)
            if self.linger_bytes < 0 and not self.closed:
                self.transport.abort()
            return
        if self.backlog:  # read before reading paused: after what waits
            self.backlog = self.backlog[self.backlog_at:] + data
            self.backlog_at = 0
            return
        self._feed(data, 0)

    def _feed(self, data: bytes, start: int) -> None:
        """Feed `data[start:]` to the state machine, `FEED_FRAMES` frames now and the rest on
        later turns of the event loop, each after a pause as long as the feed before it took
        (reading paused meanwhile)."""
        end = self.cutter.cut(data, start)
        if end < len(data):
            self.backlog, self.backlog_at = data, end
            self.transport.pause_reading()
            data = data[start:end]
        elif start:
            data = data[start:]
        if not self.backlog:
            self._process(data)
            return
        t0 = monotonic()
        self._process(data)
        if self.backlog and self.feeding is None:  # (gone if the feed ended the connection)
            # the rest after a pause as long as this feed took: a connection that floods the
            # gateway gets about half of the event loop, the other connections the rest
            self.feeding = asyncio.get_running_loop().call_later(monotonic() - t0, self._feed_backlog)

    def _feed_backlog(self) -> None:
        self.feeding = None
        if self.gone or not self.backlog:
            self.backlog = b""
            return
        # fed even while the client does not read: what it already sent is bounded (one read),
        # and the replies it causes meanwhile are capped (unread_replies)
        data, at = self.backlog, self.backlog_at
        self.backlog, self.backlog_at = b"", 0
        self._feed(data, at)
        if not self.backlog and not self.write_paused and not self.gone:
            self.transport.resume_reading()

    def _process(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.backlog = b""
            self._protocol_error(exc)
            return
        try:
            for ev in events:
                try:
                    self._event(ev)
                except h2.exceptions.StreamClosedError:
                    pass  # the stream closed while we acted on it (the client ended or reset it): done
            if self.fresh and not self.backlog:  # open upstream streams only for requests not reset in the same read
                fresh, self.fresh = self.fresh, []
                for st in fresh:
                    if self.streams.get(st.sid) is st and not st.finished:
                        self._route(st)
        except _Calmed:
            self.fresh.clear()
            self.backlog = b""
            return
        except Exception as exc:  # a bug must not take the event loop's callback down silently
            log.error("HTTP/2 connection failed", exc_info=exc)
            self.server.metrics.error("internal")
            self.backlog = b""
            self._goaway(h2.errors.ErrorCodes.INTERNAL_ERROR)
            self.transport.close()
            return
        self.flush()
        self.deadline = self.server.now + self.server.settings.tunnel_idle_timeout

    def eof_received(self) -> bool | None:
        return None  # HTTP/2 has no half-close of the connection: close it

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        if self.counted:
            self.counted = False
            self.server.conn_closed(self)
        self._release()

    def _release(self) -> None:
        """End every stream and close the upstream connections (the client connection is done)."""
        for st in list(self.streams.values()):
            self._end_stream_state(st)
        self.streams.clear()
        for up in list(self.upstreams.values()):
            up.close()
        self.upstreams.clear()

    def _close_after_goaway(self) -> None:
        """After a GOAWAY for an error: release the calls, then close once the client had
        `GOAWAY_LINGER` seconds to read the GOAWAY. Closing at once, with its unread frames in
        the socket, would reset the connection and could destroy the GOAWAY before the client
        reads it; meanwhile what it sends is dropped unparsed (up to `GOAWAY_LINGER_BYTES`). A
        client that does not read is cut at once."""
        self.ended = True
        self.backlog = b""
        self._release()
        if self.write_paused:
            self.transport.abort()
            return
        self.transport.resume_reading()  # paused if a read was being fed: what comes now is counted
        asyncio.get_running_loop().call_later(GOAWAY_LINGER, self._linger_done)

    def _linger_done(self) -> None:
        if not self.closed:
            if self.write_paused:
                self.transport.abort()
            else:
                self.transport.close()

    def pause_writing(self) -> None:
        # the client is not reading what we write: stop reading it, so nothing it sends can make
        # us queue more (PING and SETTINGS ACKs in particular)
        self.write_paused = True
        if not self.closed:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.unread_replies = 0
        if not self.backlog and not self.closed and not self.ended:  # else once the read is fed
            self.transport.resume_reading()
        for st in list(self.streams.values()):
            self._push_down(st)
        self.flush()

    @property
    def gone(self) -> bool:
        """Nothing can be sent to the client any more (closed, or it sent GOAWAY)."""
        return self.closed or self.ended

    # ---------------------------------------------------------------- client events

    def _event(self, ev: Any) -> None:
        t = type(ev)
        if t is h2.events.RequestReceived:
            st = Stream(ev.stream_id, ev.headers)
            if ev.stream_ended is not None:
                st.up_end = True
            problem = request_problem(ev.headers)
            if problem is not None:
                self._malformed(st, problem)
                return
            self.streams[ev.stream_id] = st
            self.fresh.append(st)
        elif t is h2.events.DataReceived:
            if not ev.data and ev.stream_ended is None and self.noop.hit(self.server.now):
                self._calm(Calm.CONTROL_FLOOD)
            st = self.streams.get(ev.stream_id)
            if st is None:  # answered already (an error): just give the window back
                self.ack_down(ev.flow_controlled_length, ev.stream_id)
                return
            st.to_up.append((ev.data, ev.flow_controlled_length))
            if ev.stream_ended is not None:
                st.up_end = True
            self._push_up(st)
        elif t is h2.events.StreamEnded:
            st = self.streams.get(ev.stream_id)
            if st is not None and not st.up_end:
                st.up_end = True
                self._push_up(st)
        elif t is h2.events.TrailersReceived:
            st = self.streams.get(ev.stream_id)
            if st is not None:  # request trailers: sent after the body, ending the upstream stream
                st.up_trailers = [(n, v) for n, v in ev.headers if n not in HOP_HEADERS]
                st.up_end = True
                self._push_up(st)
        elif t is h2.events.StreamReset:
            st = self.streams.pop(ev.stream_id, None)
            if st is not None:
                if st.up is not None and st.up_sid:
                    st.up.reset(st.up_sid, h2.errors.ErrorCodes.CANCEL)
                self._end_stream_state(st)
            if self.resets.hit(self.server.now):
                self._calm(Calm.RAPID_RESET)
        elif t is h2.events.WindowUpdated:
            if self.noop.hit(self.server.now):
                self._calm(Calm.CONTROL_FLOOD)
            targets = self.streams.values() if ev.stream_id == 0 else \
                [s for s in (self.streams.get(ev.stream_id),) if s is not None]
            for st in list(targets):
                self._push_down(st)
        elif t is h2.events.RemoteSettingsChanged:  # a new initial window can unblock every stream
            self._control_frame(reply=True)
            for st in list(self.streams.values()):
                self._push_down(st)
        elif t is h2.events.PingReceived:
            self._control_frame(reply=True)
        elif t is h2.events.ConnectionTerminated:
            # the client is going away; after its GOAWAY the h2 state machine sends nothing more on
            # this connection, so what is in progress cannot be answered: close (upstreams follow)
            self.ended = True
            self.transport.close()
        else:  # PRIORITY, SETTINGS and PING ACKs, unknown frames...
            self._control_frame(reply=False)

    def _control_frame(self, *, reply: bool) -> None:
        """Count a frame that carries nothing; `reply`: h2 queued an ACK for it."""
        if self.noop.hit(self.server.now):
            self._calm(Calm.CONTROL_FLOOD)
        if reply and self.write_paused:
            self.unread_replies += 1
            if self.unread_replies > MAX_QUEUED_CONTROL:
                self._calm(Calm.UNREAD_REPLIES)

    def _calm(self, reason: Calm) -> None:
        """Over a budget: GOAWAY (ENHANCE_YOUR_CALM), close, and stop handling this read."""
        self.server.metrics.error(reason.value)
        event(log, "HTTP/2 client over a limit, GOAWAY", logging.INFO, client=self.client[0], reason=reason.value)
        if self.may_forward:  # a public client (a forwarded connection's client is the other gateway's)
            self.server.penalise_ip(self.client[0], reason.value)
        self._goaway(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        self._close_after_goaway()
        raise _Calmed

    def _malformed(self, st: Stream, problem: str) -> None:
        """A request `h2` let through but `request_problem` refuses: 400 naming the field, then
        RST_STREAM (PROTOCOL_ERROR) if the client is still sending (RFC 9113 8.1.1)."""
        server = self.server
        server.metrics.error("h2-malformed-request")
        body = f"400 malformed request: {problem}\n".encode()
        conn = self.conn
        try:
            conn.send_headers(st.sid, [(b":status", b"400"), (b"content-type", b"text/plain; charset=utf-8"),
                                       (b"content-length", str(len(body)).encode()),
                                       (b"x-geomesh-error", b"h2-malformed-request")])
            conn.send_data(st.sid, body, end_stream=True)
        except h2.exceptions.ProtocolError:
            pass
        if not st.up_end:
            try:
                conn.reset_stream(st.sid, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            except h2.exceptions.ProtocolError:
                pass
        server.metrics.request(self.match.app or self.match.instance, "-", 400)
        if self.resets.hit(server.now):  # a refused stream counts like a reset
            self._calm(Calm.RAPID_RESET)

    def _protocol_error(self, exc: Exception) -> None:
        self.server.metrics.error("h2-protocol-error")
        event(log, "malformed HTTP/2 from client", logging.INFO, client=self.client[0], error=str(exc) or type(exc).__name__)
        try:
            self.conn.close_connection(error_code=h2.errors.ErrorCodes.PROTOCOL_ERROR)
        except h2.exceptions.ProtocolError:
            pass  # h2 queued the GOAWAY itself
        self.flush()
        self._close_after_goaway()

    def mark_dirty(self, up: H2Upstream) -> None:
        """`up` has frames to write: they go out at the next `flush` (end of this callback)."""
        self.dirty.add(up)

    def flush(self) -> None:
        """Write what the HTTP/2 state machines produced: the upstreams touched since the last
        flush, then this connection. Called once at the end of each event-loop callback, so a
        response's headers, data and trailers leave in one write (one TLS record, one syscall)."""
        if self.dirty:
            ups, self.dirty = self.dirty, set()
            for up in ups:
                up.flush()
        if self.closed or self.transport is None:
            return
        data = self.conn.data_to_send()
        if data:
            self.transport.write(data)

    # ---------------------------------------------------------------- server hooks

    def timed_out(self) -> None:
        if self.streams:  # calls in progress (a long stream may be quiet): only idle connections time out
            self.deadline = self.server.now + self.server.settings.tunnel_idle_timeout
            return
        self._goaway()
        self.transport.close()

    def drain(self) -> None:
        """Shutdown: tell the client (GOAWAY) to open no new streams; the ones in progress finish."""
        self.draining = True
        if not self.streams:
            self._goaway()
            self.transport.close()
            return
        # h2's close_connection() would end the streams in progress too: write the frame ourselves
        self.flush()
        frame = hyperframe.frame.GoAwayFrame(0)
        frame.last_stream_id = self.conn.highest_inbound_stream_id
        frame.error_code = h2.errors.ErrorCodes.NO_ERROR
        self.transport.write(frame.serialize())

    def abort(self) -> None:
        self.transport.abort()

    def _goaway(self, code: int = h2.errors.ErrorCodes.NO_ERROR) -> None:
        try:
            self.conn.close_connection(error_code=code)
        except h2.exceptions.ProtocolError:
            pass
        self.flush()
