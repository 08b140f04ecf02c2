"""Connections from the gateway to backends (and to other gateways), and their keep-alive pool.

An `UpstreamConnection` carries one exchange at a time. Response bytes are written to the client
exactly as they arrive (no re-encoding, nothing buffered beyond one read); the C parser
(httptools) only watches them to learn the status and where the response ends, so the
connection can go back to the pool when the backend keeps it alive. A 101 response turns the
pair into a byte tunnel (WebSocket and other upgrades). The pool keeps idle connections per
backend address, most recently used first; a connection the backend closes leaves the pool at
once, and idle ones are closed after `pool_idle_timeout`.

A connection goes back to the pool only when its exchange ended cleanly in both directions: the
whole request written (the client side decides, `Http1Exchanges.response_done`) and exactly
one complete response read. A backend that sends anything after the response (a second
response in the same read, junk) has lost track of the exchange; the connection is closed, and
so is the client's, which has received those bytes.
"""

from __future__ import annotations

import asyncio
from time import monotonic
from typing import Any, Protocol

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from regional_gateway.proxy.flow_control import BACKPRESSURE

Address = tuple[str, int]


class ResponseRecord(Protocol):
    """What an upstream connection writes of the exchange it carries (`exchange.Exchange`)."""

    status: int
    t_head: float
    head_only: bool


class ExchangeOwner(Protocol):
    """The client connection an upstream connection answers (`downstream.ClientConnection`):
    the response bytes go to its transport, the end of the response and failures to its methods."""

    transport: Any

    def response_done(self, up: UpstreamConnection) -> None: ...
    def response_progress(self) -> None: ...
    def response_overrun(self, count: bool = True) -> None: ...
    def upstream_lost(self, up: UpstreamConnection, exc: Exception | None) -> None: ...
    def upstream_broken(self, up: UpstreamConnection, why: str) -> None: ...
    def upstream_upgraded(self, up: UpstreamConnection, data: bytes) -> None: ...
    def pause_reading(self, reason: int) -> None: ...
    def resume_reading(self, reason: int) -> None: ...


class TunnelEnd(Protocol):
    """The client side of an upgraded (101) connection: bytes and half-close go to it as they come."""

    def tunnel_data(self, data: bytes) -> None: ...
    def tunnel_eof(self) -> bool: ...
    def tunnel_closed(self) -> None: ...
    def pause_reading(self, reason: int) -> None: ...
    def resume_reading(self, reason: int) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    __slots__ = ("transport", "addr", "pool", "parser", "client", "ex", "idle_since", "closed", "done",
                 "got", "reused", "tunnel", "fresh_parser", "keep")

    def __init__(self, pool: Pool, addr: Address) -> None:
        self.pool = pool
        self.addr = addr
        self.transport: Any = None
        self.parser = HttpResponseParser(self)
        self.client: ExchangeOwner | None = None
        self.ex: ResponseRecord | None = None
        self.idle_since = 0.0
        self.closed = False
        self.done = False
        self.got = 0
        self.reused = False
        self.tunnel: TunnelEnd | None = None
        self.fresh_parser = False
        self.keep = False

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.tunnel_data(data)
            return
        client = self.client
        if client is None:  # bytes from a backend while idle: it is not speaking HTTP to us
            self.transport.close()
            return
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade:
            client.upstream_upgraded(self, data)
            return
        except HttpParserError as exc:
            if self.done:  # a complete response followed by junk: deliver it, then end both connections
                self.done = False
                self.keep = False
                client.transport.write(data)
                client.response_overrun(count=False)
                client.response_done(self)
                return
            client.upstream_broken(self, f"malformed response from the backend: {exc}")
            return
        self.got += len(data)
        client.transport.write(data)
        if self.done:
            self.done = False
            client.response_done(self)
        else:
            client.response_progress()

    def eof_received(self) -> bool | None:
        if self.tunnel is not None:
            return True if self.tunnel.tunnel_eof() else None
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.tunnel is not None:
            self.tunnel.tunnel_closed()
            self.tunnel = None
            return
        client = self.client
        if client is None:
            self.pool.discard(self)
            return
        client.upstream_lost(self, exc)

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.pause_reading(BACKPRESSURE)
        elif self.tunnel is not None:
            self.tunnel.pause_reading(BACKPRESSURE)

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.resume_reading(BACKPRESSURE)
        elif self.tunnel is not None:
            self.tunnel.resume_reading(BACKPRESSURE)

    # -- httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.done:  # another response after the complete one, in the same read: never reuse this connection
            self.keep = False
            self.ex = None  # the callbacks of the extra response touch no exchange
            client = self.client
            if client is not None:  # the client got the extra bytes too: its connection ends after this
                client.response_overrun()

    def on_headers_complete(self) -> None:
        ex = self.ex
        status = self.parser.get_status_code()
        if status >= 200 and ex is not None:
            ex.status = status
            ex.t_head = monotonic()
            self.keep = self.parser.should_keep_alive()
            if ex.head_only:  # no body follows a response to HEAD; llhttp cannot be told, so we end here
                self.done = True
                self.fresh_parser = True

    def on_message_complete(self) -> None:
        ex = self.ex
        if ex is not None and ex.status >= 200:
            self.done = True

    # -- pool side ----------------------------------------------------------------------

    def detach(self, reusable: bool) -> None:
        """The exchange is over: back to the pool if the backend keeps the connection alive."""
        self.client = None
        self.ex = None
        self.done = False
        keep = reusable and not self.closed and self.keep
        self.keep = False
        if self.fresh_parser:
            self.parser = HttpResponseParser(self)
            self.fresh_parser = False
        if keep:
            self.pool.put(self)
        else:
            self.close()

    def close(self) -> None:
        self.client = None
        self.ex = None
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True


class Pool:
    """Idle keep-alive connections per backend address: `take` one for an exchange, `put` it back
    after a clean exchange; the only code that touches the idle lists."""

    def __init__(self, max_idle: int, idle_timeout: float) -> None:
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self._idle: dict[Address, list[UpstreamConnection]] = {}
        self.now = 0.0
        self.closing = False

    def take(self, addr: Address) -> UpstreamConnection | None:
        """An idle connection to `addr` for the next exchange, most recently used first; None if none."""
        conns = self._idle.get(addr)
        while conns:
            conn = conns.pop()
            if not conn.closed:
                return conn
        return None

    def put(self, conn: UpstreamConnection) -> None:
        conns = self._idle.get(conn.addr)
        if conns is None:
            conns = self._idle[conn.addr] = []
        if self.closing or len(conns) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = self.now
        conn.reused = True
        conns.append(conn)

    def discard(self, conn: UpstreamConnection) -> None:
        conns = self._idle.get(conn.addr)
        if conns:
            try:
                conns.remove(conn)
            except ValueError:
                pass

    def sweep(self, now: float) -> None:
        """Close connections idle for longer than `idle_timeout`."""
        self.now = now
        limit = now - self.idle_timeout
        for addr, conns in list(self._idle.items()):
            if conns and conns[0].idle_since < limit:
                keep = [c for c in conns if c.idle_since >= limit and not c.closed]
                for c in conns:
                    if c.idle_since < limit:
                        c.close()
                conns[:] = keep
            if not conns:
                del self._idle[addr]

    def close_all(self) -> None:
        self.closing = True
        for conns in self._idle.values():
            for c in conns:
                c.close()
        self._idle.clear()

    def count(self) -> int:
        return sum(len(c) for c in self._idle.values())
