"""The client side of the HTTP/1.1 proxy: one `ClientConnection` (asyncio Protocol) per connection.

This is the reading half; what happens to a request once its head is parsed (routing, the
backend, the answer, retries) is `http1_exchanges.Http1Exchanges`, its base class. Request bytes
go through the C parser (httptools / llhttp), whose head callbacks feed a `request_head.HeadBuilder`
(the head rebuilt for the backend: hop-by-hop headers dropped, client-address headers set, see
`client_address`); the body is streamed as it arrives (chunked bodies re-chunked), never held
whole. Responses come back verbatim (`upstream.UpstreamConnection`).

Pipelining: requests are answered strictly in order. A request parsed while another is in
flight waits in a queue (its head, and any body bytes that arrived in the same read); reading
from the client pauses meanwhile (`flow_control`), so the queue stays bounded by one read.

Errors the gateway answers itself (`http_errors`) take their place in that order too; those
that end the connection (400, 408, 413, 431, ...) half-close it after the response and discard
what the client still sends for a moment, so the client reads the answer instead of a reset.

The connection's lifecycle is one `conn_state.ConnState` (NEW, SNIFFING, IDLE, HEAD, BODY, ...,
CLOSED) whose moves are the table in `conn_state`. Timeouts come from one coarse clock
(`server.now`, ticked by the server's sweeper): each connection carries a `deadline` the sweeper
checks; what happens on expiry depends on the state and on the exchange in flight (idle -> close,
head incomplete -> 408, body silent or trickling -> 408, waiting for the backend -> 504, stalled
-> close; `conn_state.DEADLINES`).

Against hostile clients (request smuggling and the like; the rules are in `request_head` and
`hostnames.parse_authority`): the backend gets exactly the request the gateway parsed. The
gateway writes the body's framing itself (its own Content-Length, or chunked with its own chunk
sizes), never the client's header; `Connection` cannot remove framing, routing or
client-address headers (400); a bad Transfer-Encoding, Host or HTTP version is refused before
anything is sent; an absolute-form target is routed by its authority and forwarded in
origin-form; bytes after an `Upgrade:` request wait for the backend's 101 and are dropped on any
other answer; an upstream connection goes back to the pool only after exactly one complete
request and one complete response. A mesh connection that starts with a PROXY v2 header was
forwarded by another gateway and goes to `mesh_intake`.
"""

from __future__ import annotations

import logging
from typing import Any

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

from regional_gateway.proxy import client_hello, flow_control, mesh_intake, proxy_protocol
from regional_gateway.proxy.attempt import end
from regional_gateway.proxy.client_address import public_headers
from regional_gateway.proxy.conn_state import (
    BODY,
    CLOSED,
    CLOSING,
    DONE,
    HEAD,
    IDLE,
    LAST_BODY,
    LINGERING,
    NEW,
    READING,
    SNIFFING,
    TUNNEL,
    TUNNEL_CLIENT_EOF,
    TUNNEL_UPSTREAM_EOF,
    TUNNELS,
    UPGRADING,
)
from regional_gateway.proxy.exchange import Exchange
from regional_gateway.proxy.host import ConnectionHost
from regional_gateway.proxy.http1_exchanges import Http1Exchanges
from regional_gateway.proxy.http_errors import (
    BadRequest,
    BodyTimeout,
    BodyTooLarge,
    HeadersTooLarge,
    IncompleteRequest,
    Overloaded,
    ProxyError,
    RequestTimeout,
    ShuttingDown,
    UpstreamTimeout,
    render,
)
from regional_gateway.proxy.request_head import HeadBuilder, ParserCallbacks
from regional_gateway.proxy.upstream import UpstreamConnection

log = logging.getLogger("geomesh.gateway.proxy")

MAX_PENDING = 256 * 1024  # body bytes held for a request whose upstream is not connected yet


class ClientConnection(Http1Exchanges):
    """A client connection on an HTTP listener (plain, TLS-terminated, or mesh)."""

    def __init__(self, server: ConnectionHost, kind: str, scheme: str, trusted: bool, sni: str = "") -> None:
        super().__init__(server, sni.encode() if sni else None)
        self.kind = kind
        self.scheme = scheme
        self.trusted = trusted
        self.parser: HttpRequestParser | None = None
        self.client_ip = ""
        self.client_port = 0
        self.head_bytes = 0  # bytes of the reads a head in progress spans (an upper bound of its size)
        self.head_low = 0  # bytes it holds for sure (`_partial_head`)
        self.feed_len = 0  # bytes of the read being parsed
        self.cl_ended = False  # a Content-Length body ended (in the current read, or since the last look)
        self.sniffed = bytearray()  # what was read while SNIFFING
        if kind == "mesh":
            self.state = SNIFFING
        self.head: HeadBuilder | None = None  # the request head in progress (`request_head`)

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: Any) -> None:
        self.transport = self.flow.transport = transport
        server = self.server
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.client_ip, self.client_port = peer[0], peer[1]
        else:
            self.client_ip, self.client_port = "0.0.0.0", 0
        self.client_key = self.client_ip.encode()
        if not self.trusted:
            if self.client_ip in server.trusted_peers:
                self.trusted = True
                if self.kind == "http":  # the peer's forwarded tunnels (PROXY v2 first) arrive here too
                    self.state = SNIFFING
            elif server.mesh_local_ips and self.kind == "http":
                local = transport.get_extra_info("sockname")
                if isinstance(local, tuple) and local and local[0] in server.mesh_local_ips:
                    self.trusted = True  # reached on our mesh address through a wildcard listener
                    self.kind = "mesh"
                    self.state = SNIFFING
        addr_headers = b"" if self.trusted else public_headers(self.client_ip, self.scheme)
        if not server.conn_opened(self):
            err = ShuttingDown("the gateway is shutting down") if server.draining else \
                Overloaded(f"the gateway has reached its connection limit ({server.settings.max_connections})")
            server.metrics.error(err.cause)
            transport.write(render(err, close=True))
            self._linger()
            return
        settings = server.settings
        self.head = HeadBuilder(trusted=self.trusted, sni=self.sni, client_ip=self.client_ip, scheme=self.scheme,
                                addr_headers=addr_headers, max_headers=settings.max_headers,
                                max_header_bytes=settings.max_header_bytes, max_body_bytes=settings.max_body_bytes)
        self.parser = HttpRequestParser(ParserCallbacks(self, self.head))
        self.deadline = server.now + settings.header_timeout

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state is not IDLE:  # IDLE: the next request of a keep-alive connection, the common case
            if state is TUNNEL or state is TUNNEL_UPSTREAM_EOF:
                self.tunnel.transport.write(data)  # type: ignore[union-attr]
                self.deadline = self.server.now + self.server.settings.tunnel_idle_timeout
                return
            if state is SNIFFING:
                data = self._sniff(data)
                if not data:
                    return
            elif state is UPGRADING:
                self._hold(data)
                return
            elif state not in READING:  # DONE, LINGERING, CLOSING, CLOSED: dropped
                return
        self.feed_len = len(data)
        try:
            self.parser.feed_data(data)  # type: ignore[union-attr]
        except HttpParserUpgrade as exc:
            self._client_upgraded(data[exc.args[0]:])
            return
        except HttpParserError as exc:
            self._parse_error(exc)
            return
        if self.state is HEAD:  # the read ended inside a head (rare): bound it before it completes
            n = len(data)
            if not self.head_bytes:  # it began in this read, maybe after other requests
                self.head_low = self._partial_head(data)
            else:  # it began in an earlier read: all of this one is head
                self.head_low += n
            self.head_bytes += n
            if self.head_low > self.settings.max_header_bytes:  # too large for sure (else measured when complete)
                self._fail_head(HeadersTooLarge(f"request head over {self.settings.max_header_bytes} bytes"))

    def _partial_head(self, data: bytes) -> int:
        """A lower bound of the bytes of the head in progress that `data` (the read it began in) holds.

        Not the whole read: it may carry complete requests before it. The fields parsed so far are
        counted (`HeadBuilder.size`); so is the line in progress (after the read's last CRLF) unless a
        Content-Length body ended in this read, whose last bytes may come after that CRLF."""
        low = self.head.size()  # type: ignore[union-attr]
        if not self.cl_ended:
            i = data.rfind(b"\r\n")
            low = max(low, len(data) - i - 2 if i >= 0 else len(data))
        self.cl_ended = False
        return low

    def eof_received(self) -> bool | None:
        state = self.state
        if state in TUNNELS:
            if flow_control.pass_eof(self.tunnel.transport, state is not TUNNEL):  # type: ignore[union-attr]
                self.state = TUNNEL_CLIENT_EOF
                return True
            self._end()  # both directions finished: close (connection_lost closes the upstream)
            return None
        if state is LINGERING:
            return None
        cur = self.cur
        if cur is not None and not cur.req_done and cur.error is None:
            # the client ended inside a request body: it can never complete, answer now and let
            # the upstream connection go (instead of holding it until upstream_timeout)
            return self._cut_short(cur, IncompleteRequest(
                f"the client closed its side of the connection after {cur.body_len} bytes of the request "
                "body, before its end"))
        if state is HEAD:
            self._fail_head(IncompleteRequest("the client closed its side of the connection inside a request head"))
            return None if self.state is LINGERING else True
        ex = self.active
        if ex is not None:
            self.keep_alive = False
            return True
        return None

    def _cut_short(self, ex: Exchange, err: ProxyError) -> bool | None:
        """`ex`'s request cannot complete (client EOF): answer `err` in its turn, release its upstream."""
        self._stop_reading()
        self.cur = None
        ex.keep_alive = False
        if ex is not self.active:
            ex.error = err  # answered in its turn, after the exchanges before it (then the connection ends)
            return True
        up = ex.upstream
        if ex.resp_done or (up is not None and up.got):
            # the backend answered (or is answering) already: nothing to say, end both connections
            if up is not None:
                ex.upstream = None
                up.close()
            self.server.metrics.error(err.cause)
            self.server.metrics.request(ex.app, ex.backend_label, ex.status or 502)
            end(ex)
            self.active = None
            self._close_after_write()
            return None
        self._local(ex, err)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is CLOSED:
            return
        self.state = CLOSED
        self.flow.stop()
        self.server.conn_closed(self)
        if self.tunnel is not None:
            self.tunnel.tunnel = None
            self.tunnel.close()
            self.tunnel = None
        for ex in (self.active, *self.queue):
            if ex is not None:
                self._abandon(ex)
        self.active = None
        self.queue.clear()

    def pause_writing(self) -> None:
        ex = self.active
        up = self.tunnel or (ex.upstream if ex is not None else None)
        if up is not None and not up.closed:
            up.transport.pause_reading()

    def resume_writing(self) -> None:
        ex = self.active
        up = self.tunnel or (ex.upstream if ex is not None else None)
        if up is not None and not up.closed:
            up.transport.resume_reading()

    # ---------------------------------------------------------------- httptools callbacks

    def on_message_begin(self) -> None:
        # the head fields were reset when the previous head completed (`HeadBuilder.complete`)
        state = self.state
        if state is IDLE or state is NEW:  # else reading stopped earlier in this read: it stays stopped
            self.state = HEAD
        if self.active is None:
            self.deadline = self.server.now + self.settings.header_timeout

    def on_headers_complete(self) -> None:
        parser = self.parser
        ex = Exchange()
        method = parser.get_method()  # type: ignore[union-attr]
        ex.method = method
        keep = ex.keep_alive = parser.should_keep_alive()  # type: ignore[union-attr]
        if method == b"HEAD":
            ex.head_only = True
        # the head is inside the bytes read since it began: an upper bound of its size
        keep = self.head.complete(ex, keep, self.head_bytes + self.feed_len, parser)  # type: ignore[union-attr,arg-type]
        self.head_bytes = 0
        if ex.upgrade:
            self.up_ex = ex  # the exchange whose upgrade request ends the parsing
        self.cur = ex
        if keep and ex.keep_alive:  # (`complete` returns False for an error that closes)
            if self.state is HEAD:  # else reading stopped earlier in this read
                self.state = BODY if ex.has_body else IDLE
        elif self.state is HEAD:  # Connection: close (or a closing error): with a body, read it, then stop
            self.state = LAST_BODY if ex.has_body and ex.error is None else DONE
        if self.active is None:
            self.active = ex
            self._dispatch(ex)
        else:
            self.queue.append(ex)
            self.flow.pause(flow_control.PIPELINE)

    def on_body(self, data: bytes) -> None:
        ex = self.cur
        if ex is None or ex.discard or ex.error is not None:
            if ex is not None and ex is self.active:  # dropped as it comes, for as long as it keeps coming
                self.deadline = self.server.now + self.settings.body_timeout
            return
        ex.body_len += len(data)
        limit = self.server.settings.max_body_bytes
        if limit and ex.body_len > limit:
            self._body_too_large(ex, limit)
            return
        if ex.chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        if self._forward(ex, data) and ex.pending_len > MAX_PENDING:
            self.flow.pause(flow_control.PENDING)
        if ex is self.active:  # body progress: the next check is at the end of the rate window at the latest
            now = self.server.now
            self.body_last = now
            self.body_win_bytes += len(data)
            self.deadline = self.body_win_start + self.settings.body_timeout

    def on_message_complete(self) -> None:
        ex = self.cur
        if ex is None:
            return
        self.cur = None
        ex.req_done = True
        if ex.has_body:
            if ex.chunked and not ex.discard and ex.error is None:
                self._forward(ex, b"0\r\n\r\n")
            if not ex.chunked:
                self.cl_ended = True
            state = self.state
            if state is BODY:
                self.state = IDLE
            elif state is LAST_BODY:
                self.state = DONE
            if ex is self.active and not ex.resp_done:  # the whole request is out: wait for the answer
                self.deadline = self.server.now + self.settings.upstream_timeout
        if ex.resp_done and ex is self.active:
            self._finish(ex)

    # ---------------------------------------------------------------- upgrade / tunnel

    def _client_upgraded(self, rest: bytes) -> None:
        """The client's request asked for a protocol upgrade: what follows it is not HTTP any more.

        Those bytes are held, not sent: a backend that does not answer 101 would read them as its
        next request (a request smuggled past the gateway's routing and header rules). They go out
        when the 101 arrives (`upstream_upgraded`) and are dropped on any other answer."""
        ex = self.up_ex
        if ex is None or ex.error is not None:
            self._stop_reading()  # refused: nothing will be forwarded after it
            return
        if self.state is DONE:  # an upgrade request is never keep-alive (`request_head`): reading stopped at it
            self.state = UPGRADING
        ex.req_done = True
        if rest:
            self._hold(rest)

    def _hold(self, data: bytes) -> None:
        ex = self.up_ex
        if ex is None or self.tunnel is not None:
            return
        if ex.held is None:
            ex.held = []
        ex.held.append(data)
        ex.held_len += len(data)
        if ex.held_len > MAX_PENDING:
            self.flow.pause(flow_control.PENDING)

    def upstream_upgraded(self, up: UpstreamConnection, data: bytes) -> None:
        """The backend's response to the active exchange ends with an upgrade (101)."""
        ex = self.active
        self.transport.write(data)
        if ex is None or ex.upstream is not up:
            up.close()
            return
        status = up.parser.get_status_code()
        ex.status = status
        self.server.metrics.request(ex.app, ex.backend_label, status)
        if status != 101 or not ex.upgrade:
            self._drop_held(ex)
            end(ex)
            up.close()
            self.active = None
            self._close_after_write()
            return
        end(ex)
        self.active = None
        up.client = None
        up.ex = None
        up.tunnel = self
        self.tunnel = up
        self.state = TUNNEL
        self.up_ex = None
        for chunk in ex.held or ():
            up.transport.write(chunk)
        ex.held = None
        self.flow.resume(flow_control.ALL)
        self.deadline = self.server.now + self.server.settings.tunnel_idle_timeout

    def tunnel_data(self, data: bytes) -> None:
        self.transport.write(data)
        self.deadline = self.server.now + self.server.settings.tunnel_idle_timeout

    def tunnel_eof(self) -> bool:
        """The upstream finished sending; True if its transport should stay open (half-close)."""
        state = self.state
        if state in TUNNELS and flow_control.pass_eof(self.transport, state is not TUNNEL):
            self.state = TUNNEL_UPSTREAM_EOF
            return True
        self._end()
        return False

    def tunnel_closed(self) -> None:
        self.tunnel = None
        self._end()

    # ---------------------------------------------------------------- errors and timeouts

    def _parse_error(self, exc: HttpParserError) -> None:
        self._stop_reading()
        if self.state is LINGERING:
            return
        detail = str(exc) or type(exc).__name__
        if exc.__context__ is not None:
            detail = f"{detail} ({exc.__context__})"
            log.error("request callback failed", exc_info=exc.__context__)
        if self.cur is None and self.head.h_url == b"*" and self.parser.get_method() == b"PRI":  # type: ignore
            err: ProxyError = BadRequest(
                "HTTP/2 with prior knowledge (h2c) is not served on this port: use HTTP/1.1, or HTTP/2 over "
                "TLS with ALPN h2")
        else:
            err = BadRequest(f"malformed request: {detail}")
        ex = self.cur
        if ex is not None and not ex.req_done:  # the error is inside this request's body
            self.cur = None
            ex.keep_alive = False
            if ex is not self.active:
                ex.error = err  # answered in its turn
                return
            if ex.resp_done:
                self._finish(ex)  # the backend's answer went out already: just end the connection
                return
            if ex.upstream is not None and ex.upstream.got:
                self.keep_alive = False  # the answer is on its way: close after it
                return
            self._local(ex, err)
            return
        if not self.keep_alive and self.active is None:
            return
        self._fail_head(err)

    def _fail_head(self, err: ProxyError) -> None:
        """A request that cannot be parsed or is too large: answer in order, then close."""
        self._stop_reading()
        ex = Exchange()
        ex.error = err
        ex.keep_alive = False
        if self.active is None:
            self.active = ex
            self._dispatch(ex)
        else:
            self.queue.append(ex)

    def _body_too_large(self, ex: Exchange, limit: int) -> None:
        self._stop_reading()
        if ex is self.active and (ex.upstream is None or ex.upstream.got == 0):
            self._local(ex, BodyTooLarge(f"request body over the limit of {limit} bytes"))
        else:
            self.server.metrics.error("body-too-large")
            self._end()

    def _body_stalled(self, ex: Exchange) -> None:
        """The active request's body is incomplete at its deadline: the end of a rate window, or
        `body_timeout` without a byte. 408 if the client is to blame; the gateway's own pauses
        (backend not reading, connecting) are not held against it, up to `upstream_timeout`."""
        now = self.server.now
        last = self.body_last
        settings = self.settings
        if self.flow.reasons or self.flow.paused_in_window:
            if now - last < settings.upstream_timeout:
                self._body_window(now)
                self.body_last = last  # the time of the last progress stays
                return
            label = ex.backend.label if ex.backend is not None else "the backend"
            self._local(ex, UpstreamTimeout(f"{label} did not take the request body for "
                                            f"{settings.upstream_timeout:g}s"))
            self._close_after_write()
            return
        timeout = settings.body_timeout
        if now - last >= timeout - 0.001:
            err = BodyTimeout(f"no request body bytes for {timeout:g}s ({ex.body_len} received)")
        elif settings.body_min_rate and self.body_win_bytes < settings.body_min_rate * (now - self.body_win_start):
            rate = self.body_win_bytes / max(now - self.body_win_start, 0.001)
            err = BodyTimeout(f"request body arriving at {rate:.0f} bytes/s, under the minimum of "
                              f"{settings.body_min_rate} bytes/s")
        else:  # fine: a new window
            self._body_window(now)
            self.body_last = last
            self.deadline = min(last + timeout, now + timeout)
            return
        self._stop_reading()
        self._local(ex, err)

    def timed_out(self) -> None:
        """The sweeper found this connection past its deadline."""
        settings = self.server.settings
        state = self.state
        if state is LINGERING or state is CLOSING or state in TUNNELS:
            self._end()
            return
        ex = self.active
        if ex is None:
            if state is HEAD or self.head_bytes:
                err = RequestTimeout(f"request head not received within {settings.header_timeout:g}s")
                self._fail_head(err)
            else:
                self._end()  # idle keep-alive connection
            return
        up = ex.upstream
        if up is not None and up.got:
            self.server.metrics.error("response-stalled")
            self._end()
            return
        if ex.req_done and (up is not None or ex.backend is not None):
            label = ex.backend.label if ex.backend is not None else "the backend"
            if ex.backend is not None and ex.backend.health.response(504, self.server.now):
                self.server.health_changed(ex.backend)
            self._local(ex, UpstreamTimeout(f"{label} did not answer within {settings.upstream_timeout:g}s"))
            return
        if not ex.resp_done:
            self._body_stalled(ex)
        else:
            self._end()

    def drain(self) -> None:
        """Server shutdown: close now if idle, else after the exchange in flight."""
        self.keep_alive = False
        state = self.state
        if self.active is None and state is not HEAD and state not in TUNNELS:
            self._end()

    def abort(self) -> None:
        if self.tunnel is not None:
            self.tunnel.close()
        self.transport.abort()

    # ---------------------------------------------------------------- mesh: forwarded passthrough

    def _sniff(self, data: bytes) -> bytes:
        """Mesh listener only: a connection starting with PROXY v2 was forwarded by another gateway.

        Without an authority TLV it is a TLS passthrough, named by the ClientHello that follows
        (waited for). With one it is a `g` connection the sender already decrypted: clear HTTP/2
        follows, maybe not yet (the client speaks when it likes), so nothing more is waited for.
        """
        buf = self.sniffed
        if not buf and not proxy_protocol.could_be_v2(data[:12]):
            self.state = NEW
            return data
        buf += data
        try:
            header = proxy_protocol.parse_v2(bytes(buf))
        except proxy_protocol.ProxyProtocolError as exc:
            self.server.metrics.error("bad-proxy-header")
            self.transport.write(render(BadRequest(f"bad PROXY protocol header: {exc}"), close=True))
            self._linger()
            return b""
        if header is None:
            return b""
        rest = bytes(buf[header.length:])
        hello = None if header.authority is not None else client_hello.parse(rest)
        if hello is client_hello.NEED_MORE:
            return b""
        self.state = DONE
        mesh_intake.from_mesh(self.server, self, header, hello, rest)  # type: ignore[arg-type]
        return b""

    def handed_over(self) -> None:
        """The transport went to the protocol that serves the forwarded connection (`mesh_intake`)."""
        self.state = CLOSED
        self.flow.stop()

    def _stop_reading(self) -> None:
        """No more requests are read (an error, the client's EOF inside a request): DONE, unless
        reading stopped already (UPGRADING, LINGERING, a tunnel, ...)."""
        if self.state in READING:
            self.state = DONE

