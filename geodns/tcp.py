"""DNS over TCP (RFC 7766): length-prefixed messages, several per connection, idle timeout.

One `asyncio.Protocol` per connection feeds its bytes to a framer and answers each complete
message through `Responder.answer(..., tcp=True)` (no size limit short of 65535, never TC, never
rate limited: TCP proves the source address). Pipelined queries are answered in order, at most
`MESSAGES_PER_TURN` per event-loop turn: when more are buffered, reading pauses and the rest are
answered on the next turns, so a client pipelining heavy messages shares the loop with UDP and
other connections instead of holding it. A connection is closed after `idle_timeout` seconds
without a complete query, when the client closes, on a zero-length message (it cannot be a DNS
message), or when the server stops. While the client does not read its replies (transport
paused), reading stops too, so a slow reader cannot make the server buffer without bound.
`TcpConnections` admits connections through `geodns.tcp_admission`: past `max_connections`, or
past the client's share `max_per_client`, a new connection is reset at once and counted in
`Stats.tcp_refused` by reason.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from geodns.answer import Responder
from geodns.stats import Stats
from geodns.tcp_admission import TcpAdmission

log = logging.getLogger("geodns.tcp")

DEFAULT_IDLE_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 1000
MESSAGES_PER_TURN = 32  # answered per connection before yielding to the loop


class TcpConnections:
    """The live connections of one process (so shutdown can close them) and who may open more."""

    def __init__(self, max_connections: int = DEFAULT_MAX_CONNECTIONS, max_per_client: int | None = None) -> None:
        self.admission = TcpAdmission(max_connections, max_per_client)
        self.live: set[DnsTcpProtocol] = set()

    @property
    def max_connections(self) -> int:
        return self.admission.max_connections

    def close_all(self) -> None:
        for conn in list(self.live):
            conn.close()


class DnsTcpProtocol(asyncio.Protocol):
    def __init__(self, responder: Responder, stats: Stats, connections: TcpConnections,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
        self._responder = responder
        self._stats = stats
        self._connections = connections
        self._idle_timeout = idle_timeout
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._client = b""
        self._admitted = False
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False  # the client does not read: reading is paused
        self._backlog = False  # complete messages wait for the next turn: reading is paused
        self._later: asyncio.Handle | None = None

    # -- asyncio callbacks -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        try:
            host = peer[0]
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self._client = socket.inet_pton(family, host.split("%", 1)[0])
        except (TypeError, IndexError, OSError, ValueError):
            self._client = b"\0\0\0\0"
        refusal = self._connections.admission.admit(self._client)
        if refusal is not None:
            self._stats.tcp_refused[refusal.value] += 1
            transport.abort()
            return
        self._admitted = True
        self._connections.live.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._admitted:
            self._admitted = False
            self._connections.admission.release(self._client)
        self._connections.live.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._later is not None:
            self._later.cancel()
            self._later = None
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self._drain()

    def eof_received(self) -> bool | None:
        return False  # close our side too once the replies are written

    def pause_writing(self) -> None:
        self._paused = True
        if self._transport is not None and not self._backlog:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        if self._transport is not None:
            if not self._backlog:
                self._transport.resume_reading()
            self._drain()

    # -- framing -----------------------------------------------------------------------------

    def _drain(self) -> None:
        if self._later is not None:
            self._later.cancel()
            self._later = None
        buf = self._buf
        responder = self._responder
        budget = MESSAGES_PER_TURN
        answered = False
        while not self._paused and self._transport is not None and len(buf) >= 2:
            size = (buf[0] << 8) | buf[1]
            if size == 0:
                self.close()
                return
            if len(buf) < 2 + size:
                break
            if not budget:
                # more is buffered: answer it on the next turn, read nothing more until then
                if not self._backlog:
                    self._backlog = True
                    self._transport.pause_reading()
                self._later = asyncio.get_running_loop().call_soon(self._drain)
                self._arm()
                return
            budget -= 1
            msg = bytes(buf[2:2 + size])
            del buf[:2 + size]
            ans = responder.answer(msg, self._client, tcp=True)
            answered = True
            if ans.wire is None:
                continue
            self._stats.tcp[ans.index] += 1
            self._transport.write(len(ans.wire).to_bytes(2, "big") + ans.wire)
        if answered:
            self._arm()
        if self._backlog and not self._paused and self._transport is not None:
            self._backlog = False
            self._transport.resume_reading()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._transport is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._idle_timeout, self._idle)

    def _idle(self) -> None:
        self._timer = None
        self.close()

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
