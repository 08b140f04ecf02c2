"""HTTP/2 proxying for `g` names (gRPC and other h2c apps): each stream balanced on its own.

A client of a `<app>-<port>g` name speaks HTTP/2 over TLS (ALPN h2) and typically keeps one
connection for everything (a gRPC channel). Tunnelling that connection to one backend would pin
all its calls there; here the gateway terminates HTTP/2 itself (the `h2` library, sans-IO) and
routes every *stream* — one gRPC call, one HTTP/2 request — with `targets.choose`, so the app's
policy applies per call: round robin spreads calls, least connections counts streams in flight,
IP hash keeps a client's calls on one backend.

Shape: one `H2Downstream` per client connection (server side of HTTP/2). It opens, lazily, one
`H2Upstream` (client side of HTTP/2, cleartext h2c) per target address it needs, owned by that
client connection alone, so no flow-control state is shared between clients. A target in
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
from collections import deque
from time import monotonic
from typing import Any
from urllib.parse import quote

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame

from geomesh.logs import event
from regional_gateway.proxy import proxy_protocol
from regional_gateway.proxy.client_address import CLIENT_ADDRESS_HEADERS, forwarded_node
from regional_gateway.proxy.exchange import MAX_ATTEMPTS
from regional_gateway.proxy.h2_guard import (
    MAX_QUEUED_CONTROL,
    Calm,
    FrameCutter,
    RateBudget,
    data_credit,
    request_problem,
)
from regional_gateway.proxy.host import ConnectionHost
from regional_gateway.proxy.hostnames import NameMatch
from regional_gateway.proxy.http_errors import ProxyError, ShuttingDown, UpstreamFailed, UpstreamTimeout
from regional_gateway.proxy.route_state import BackendRuntime
from regional_gateway.proxy.targets import Target, choose

log = logging.getLogger("geomesh.gateway.h2")
GRPC_UNAVAILABLE = 14
GRPC_DEADLINE_EXCEEDED = 4
# connection-specific headers have no place in HTTP/2 (RFC 9113 8.2.2); h2 refuses them anyway
_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"))
_DROP = _HOP | CLIENT_ADDRESS_HEADERS
# receive windows: 256 KiB per stream, 1 MiB per connection (HTTP/2's default 64 KiB would cap a
# forwarded call at 64 KiB per round trip between regions); the connection window bounds what one
# connection can make the gateway hold
STREAM_WINDOW = 256 * 1024
CONNECTION_WINDOW = 1024 * 1024
# a client has this long to read the GOAWAY that ends its connection for an error, as long as it
# sends no more than this meanwhile (what it sends is dropped; beyond, the connection is reset)
GOAWAY_LINGER = 1.0
GOAWAY_LINGER_BYTES = 256 * 1024


def _config(client_side: bool) -> h2.config.H2Configuration:
    # inbound headers are validated on both sides; what goes out is those headers (plus the gateway's
    # own), so outbound validation would only check them twice: it is off, for speed
    return h2.config.H2Configuration(client_side=client_side, header_encoding=None, validate_inbound_headers=True,
                                     validate_outbound_headers=False, normalize_outbound_headers=False)


def _open_connection(conn: h2.connection.H2Connection, settings: dict[int, int] | None = None) -> None:
    """Send the connection preface with our settings and the larger connection window (the
    settings go in the preface itself: a SETTINGS frame queued before it would precede a client's
    connection magic)."""
    conn.local_settings = h2.settings.Settings(
        client=conn.config.client_side,
        initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW, **(settings or {})})
    conn.initiate_connection()
    conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)


def send_windowed(conn: h2.connection.H2Connection, sid: int, queue: deque[tuple[bytes, int]]) -> int:
    """Send queued (data, length) chunks on stream `sid` as far as its flow-control window and the
    frame size allow; what does not fit stays queued (split if need be). Returns the sum of the
    `length`s of the chunks fully sent: what may now be acknowledged to the side they came from."""
    done = 0
    while queue:
        data, length = queue[0]
        room = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
        if len(data) > room:
            if room <= 0:
                break
            conn.send_data(sid, data[:room])
            queue[0] = (data[room:], length)
            continue
        queue.popleft()
        if data:
            conn.send_data(sid, data)
        done += length
    return done


class _Calmed(Exception):
    """Raised out of event handling when the connection went over a budget (GOAWAY sent)."""


class Stream:
    """One client stream and, once routed, its upstream stream."""

    __slots__ = ("sid", "headers", "grpc", "up", "up_sid", "target", "attempts", "tried", "to_up", "up_end",
                 "up_trailers", "to_down", "down_end", "down_trailers", "client_done", "response_started", "status", "t_sent",
                 "counted", "finished")

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
        self.counted = False
        self.finished = False


class H2Downstream(asyncio.Protocol):
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
        self.conn = h2.connection.H2Connection(config=_config(client_side=False))
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
        _open_connection(self.conn, {h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 256})
        self._flush()
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
        self._flush()
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
        self._flush()

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
                self._ack_down(ev.flow_controlled_length, ev.stream_id)
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
                st.up_trailers = [(n, v) for n, v in ev.headers if n not in _HOP]
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
        self._flush()
        self._close_after_goaway()

    # ---------------------------------------------------------------- routing a stream

    def _route(self, st: Stream, failed: ProxyError | None = None) -> None:
        """Pick a target for `st` and open it there; `failed`: why the previous attempt failed (the
        answer when no other target is left, more useful than "no healthy backend")."""
        server = self.server
        if self.draining:
            self._answer(st, ShuttingDown("the gateway is shutting down"), refused=True)
            return
        target = choose(server.state, self.match, self.client_key, may_forward=self.may_forward, exclude=st.tried)
        if not isinstance(target, Target):
            self._answer(st, failed or target)
            return
        st.target = target
        st.attempts += 1
        rt = target.backend
        rt.inflight += 1
        st.counted = True
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
        if before_connect and rt.health.connect_failed(server.now, why):
            server.health_changed(rt)
        server.metrics.error("upstream-connect" if before_connect else "upstream-reset")
        for st in list(up.pending) + list(up.active.values()):
            if st.finished or self.streams.get(st.sid) is not st:
                continue
            self._uncount(st)
            st.up, st.up_sid = None, 0
            err = UpstreamTimeout(why) if timeout else UpstreamFailed(why)
            untouched = before_connect or (not st.response_started and not st.t_sent)
            if untouched and st.attempts < MAX_ATTEMPTS:
                st.tried += (rt.key,)
                self._route(st, err)
                continue
            if st.response_started:
                self._reset(st, h2.errors.ErrorCodes.INTERNAL_ERROR)
            else:
                self._answer(st, err)
        up.pending.clear()
        up.active.clear()
        self._flush()

    # ---------------------------------------------------------------- moving data

    def _push_up(self, st: Stream) -> None:
        """Send what the client sent on `st` to its upstream stream, as far as windows allow (what
        cannot go yet waits in `st.to_up`, unacknowledged, until the upstream stream opens or its
        window grows)."""
        up = st.up
        if up is None or not st.up_sid or up.closed:
            return
        self._ack_down(up.send_body(st), st.sid)
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
        out = [(n, v) for n, v in headers if n not in _HOP]
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
            st.down_trailers = [(n, v) for n, v in trailers if n not in _HOP]
        else:
            st.down_end = True
        self._push_down(st)

    def upstream_reset(self, st: Stream, code: int) -> None:
        """The backend reset its stream: the client's stream is reset too (or answered, if untouched)."""
        if self.gone or st.finished or self.streams.get(st.sid) is not st:
            return
        if not st.response_started and code == h2.errors.ErrorCodes.REFUSED_STREAM and st.attempts < MAX_ATTEMPTS:
            # the backend did not process it (RFC 9113 8.7): safe to send elsewhere
            self._uncount(st)
            st.tried += (st.target.backend.key,) if st.target else ()
            self._route(st)
            return
        self._reset(st, code)

    # ---------------------------------------------------------------- stream endings

    def _answer(self, st: Stream, err: ProxyError, *, refused: bool = False) -> None:
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
            self._ack_down(length, st.sid)
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
            self._flush()
            self.transport.close()

    def _end_stream_state(self, st: Stream) -> None:
        self._uncount(st)
        up = st.up
        if up is not None:
            up.detach(st)
        st.up = None

    def _uncount(self, st: Stream) -> None:
        if st.counted and st.target is not None:
            st.counted = False
            st.target.backend.inflight -= 1

    def _ack_down(self, length: int, sid: int) -> None:
        if length and not self.closed:
            try:
                self.conn.acknowledge_received_data(length, sid)
            except h2.exceptions.ProtocolError:
                pass

    def _flush(self) -> None:
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
        self._flush()
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
        self._flush()


class H2Upstream(asyncio.Protocol):
    """Cleartext HTTP/2 to one backend (or another region's gateway) for one client connection."""

    def __init__(self, down: H2Downstream, addr: tuple[str, int], backend: BackendRuntime, preamble: bytes) -> None:
        self.down = down
        self.addr = addr
        self.backend = backend
        self.preamble = preamble
        self.transport: Any = None
        self.conn = h2.connection.H2Connection(config=_config(client_side=True))
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
        _open_connection(self.conn)
        self._open_pending()
        self.flush()
        self.down._flush()

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
        headers = [(n, v) for n, v in st.headers if n not in _DROP]
        headers += self.down.addr_headers
        end = st.up_end and not st.to_up and st.up_trailers is None
        try:
            self.conn.send_headers(sid, headers, end_stream=end)
        except h2.exceptions.ProtocolError as exc:
            self.down._answer(st, UpstreamFailed(f"{self.backend.label} refused the stream: {exc}"))
            return
        st.client_done = end
        st.up_sid = sid
        st.t_sent = monotonic()
        self.active[sid] = st
        if st.to_up or (st.up_end and not end):
            self.down._ack_down(self.send_body(st), st.sid)

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
        self.down.dirty.add(self)

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
        down._flush()
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
                down._ack_down(self.send_body(s), s.sid)
        elif t is h2.events.RemoteSettingsChanged:  # a new window or stream limit
            for s in list(self.active.values()):
                down._ack_down(self.send_body(s), s.sid)
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
        elif not was_closed and self.down.upstreams.get(self.addr) is self:
            del self.down.upstreams[self.addr]

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for st in list(self.active.values()):
            self.down._ack_down(self.send_body(st), st.sid)
        self.flush()
        self.down._flush()
