"""DNS over TCP (RFC 7766): length-prefixed messages, several per connection, idle timeout.

One `asyncio.Protocol` per connection feeds its bytes to a `Framer` (sans-IO: bytes in, events
out) and answers each complete message through `Responder.answer(..., tcp=True)` (no size limit
short of 65535, never TC, never rate limited: TCP proves the source address). Pipelined queries
are answered in order, at most `MESSAGES_PER_TURN` per event-loop turn: when more are buffered,
reading pauses and the rest are answered on the next turns, so a client pipelining many messages
shares the loop with UDP and other connections instead of holding it.

A message that no query can be is judged from its length prefix and header alone (`abuse_of`):
over `wire.MAX_QUERY_OCTETS`, or a query (QR clear, opcode QUERY) with answer or authority records
or more than `wire.MAX_ADDITIONAL` additional records. Its body is never read: the client gets
the FORMERR `geodns.answer` gives such a message (header only; nothing for a message with QR set),
then the server half-closes (FIN after the reply), stops reading and resets the connection
`ABUSE_LINGER` seconds later (RFC 7766 section 6.2.4: "connections can be closed by either end
under unusual conditions such as defending against an attack"). The client goes into the
penalty box of `geodns.tcp_admission` (which counts the closure by reason) at once, for a
cool-down counted from that reset: its reconnections are reset at accept until then.

A connection is also closed after `idle_timeout` seconds without a complete query, when the
client closes, on a zero-length message (it cannot be a DNS message), or when the server stops.
While the client does not read its replies (transport paused), reading stops too, so a slow
reader cannot make the server buffer without bound. `TcpConnections` admits connections through
`geodns.tcp_admission`: a penalised client, or past `max_connections`, or past the client's share
`max_per_client`, a new connection is reset at once and counted in `Stats.tcp_refused` by reason.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from dataclasses import dataclass

from geodns.answer import Responder
from geodns.stats import Stats
from geodns.tcp_admission import Abuse, PenaltyBox, TcpAdmission
from geodns.wire import HEADER_LEN, MAX_ADDITIONAL, MAX_QUERY_OCTETS, OPCODE_MASK, QR

log = logging.getLogger("geodns.tcp")

DEFAULT_IDLE_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 1000
MESSAGES_PER_TURN = 32  # answered per connection before yielding to the loop
ABUSE_LINGER = 1.0  # seconds a connection closed for abuse stays half-closed before its reset
COMPACT_AT = 1 << 16  # consumed octets dropped from the front of the buffer once this many
_COUNTS = struct.Struct("!HHHH")  # QDCOUNT, ANCOUNT, NSCOUNT, ARCOUNT


def abuse_of(size: int, header: bytes | bytearray | memoryview) -> Abuse | None:
    """The verdict on a message of `size` octets from its first `HEADER_LEN` octets (`header`
    may be shorter when `size` is); None for a message to read and answer. The same rules as
    `wire.parse_query`'s checks before decoding, which answer these messages with FORMERR."""
    if size > MAX_QUERY_OCTETS:
        return Abuse.OVERSIZE
    if size < HEADER_LEN:
        return None  # no header: dropped by the answer path, costs nothing
    flags = (header[2] << 8) | header[3]
    if flags & QR or flags & OPCODE_MASK:
        return None  # a response (dropped) or another opcode (NOTIMP): records may belong there
    _, an, ns, ar = _COUNTS.unpack_from(header, 4)
    if an or ns:
        return Abuse.RECORDS
    if ar > MAX_ADDITIONAL:
        return Abuse.ADDITIONAL
    return None


# -- framing (sans-IO) -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """A complete message to answer."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Abusive:
    """A message refused from its header; its body was not (and will not be) read."""

    abuse: Abuse
    header: bytes  # the first HEADER_LEN octets


@dataclass(frozen=True, slots=True)
class ZeroLength:
    """A zero length prefix: not a DNS message; the connection ends."""


Event = Message | Abusive | ZeroLength


class Framer:
    """Length-prefixed DNS messages out of a byte stream (RFC 1035 4.2.2).

    `feed(data)` appends what was read; `next_event()` returns the next `Event`, or None until
    more bytes are needed. Messages are taken from one bytearray by offset (one copy each), and
    the consumed front is dropped only once it is large (`COMPACT_AT`) or everything was
    consumed, so a large buffer is never copied once per message. A message is judged as soon as
    its length prefix and header are in (`abuse_of`); after an `Abusive` or `ZeroLength` event
    the framer is done and drops what it holds and what it is fed.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self.done = False

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        if self._pos:
            if self._pos >= len(self._buf):
                self._buf.clear()
                self._pos = 0
            elif self._pos >= COMPACT_AT:
                del self._buf[:self._pos]
                self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Octets received and not yet framed."""
        return len(self._buf) - self._pos

    def next_event(self) -> Event | None:
        if self.done:
            return None
        buf, pos = self._buf, self._pos
        have = len(buf) - pos
        if have < 2:
            return None
        size = (buf[pos] << 8) | buf[pos + 1]
        if size == 0:
            return self._finish(ZeroLength())
        if size >= HEADER_LEN and have >= 2 + HEADER_LEN:
            head = bytes(buf[pos + 2:pos + 2 + HEADER_LEN])
            abuse = abuse_of(size, head)
            if abuse is not None:  # the header is enough: the body is never looked at
                return self._finish(Abusive(abuse, head))
        if have < 2 + size:
            return None
        with memoryview(buf) as view:
            data = bytes(view[pos + 2:pos + 2 + size])
        self._pos = pos + 2 + size
        return Message(data)

    def _finish(self, event: Event) -> Event:
        self.done = True
        self._buf = bytearray()
        self._pos = 0
        return event


# -- the connections ------------------------------------------------------------------------------


class TcpConnections:
    """The live connections of one process (so shutdown can close them) and who may open more."""

    def __init__(self, max_connections: int = DEFAULT_MAX_CONNECTIONS, max_per_client: int | None = None,
                 penalty: PenaltyBox | None = None) -> None:
        self.admission = TcpAdmission(max_connections, max_per_client, penalty)
        self.live: set[DnsTcpProtocol] = set()

    @property
    def max_connections(self) -> int:
        return self.admission.max_connections

    @property
    def penalty(self) -> PenaltyBox:
        return self.admission.penalty

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
        self._framer = Framer()
        self._transport: asyncio.Transport | None = None
        self._client = b""
        self._admitted = False
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False  # the client does not read: reading is paused
        self._backlog = False  # complete messages wait for the next turn: reading is paused
        self._later: asyncio.Handle | None = None
        self._pending: Event | None = None  # framed but over this turn's budget

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
        refusal = self._connections.admission.admit(self._client, time.monotonic())
        if refusal is not None:
            refused = self._stats.tcp_refused
            refused[refusal.value] = refused.get(refusal.value, 0) + 1
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
        self._framer.feed(data)
        self._drain()

    def eof_received(self) -> bool | None:
        return False  # close our side too once the replies are written

    def pause_writing(self) -> None:
        self._paused = True
        if self._transport is not None and not self._backlog:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        if self._transport is not None and not self._framer.done:
            if not self._backlog:
                self._transport.resume_reading()
            self._drain()

    # -- answering ---------------------------------------------------------------------------

    def _drain(self) -> None:
        if self._later is not None:
            self._later.cancel()
            self._later = None
        framer = self._framer
        responder = self._responder
        budget = MESSAGES_PER_TURN
        answered = False
        while not self._paused and self._transport is not None:
            ev, self._pending = self._pending or framer.next_event(), None
            if ev is None:
                break
            if not budget:
                # more is buffered: answer it on the next turn, read nothing more until then
                self._pending = ev
                if not self._backlog:
                    self._backlog = True
                    self._transport.pause_reading()
                self._later = asyncio.get_running_loop().call_soon(self._drain)
                self._arm()
                return
            budget -= 1
            if type(ev) is Message:
                ans = responder.answer(ev.data, self._client, tcp=True)
                answered = True
                if ans.wire is None:
                    continue
                self._stats.tcp[ans.index] += 1
                self._transport.write(len(ans.wire).to_bytes(2, "big") + ans.wire)
            elif type(ev) is Abusive:
                self._close_for_abuse(ev)
                return
            else:
                self.close()
                return
        if answered:
            self._arm()
        if self._backlog and not self._paused and self._transport is not None:
            self._backlog = False
            self._transport.resume_reading()

    def _close_for_abuse(self, ev: Abusive) -> None:
        """FORMERR, FIN, no more reading; the reset follows after ABUSE_LINGER seconds."""
        transport = self._transport
        assert transport is not None
        if ev.abuse is Abuse.OVERSIZE:
            ans = self._responder.oversize(ev.header, self._client)
        else:  # the header alone gets the same FORMERR as the whole message
            ans = self._responder.answer(ev.header, self._client, tcp=True)
        if ans.wire is not None:
            self._stats.tcp[ans.index] += 1
            transport.write(len(ans.wire).to_bytes(2, "big") + ans.wire)
        # the cool-down counts from the reset; reconnections before it are refused too
        self._connections.penalty.offend(self._client, time.monotonic() + ABUSE_LINGER, ev.abuse)
        transport.pause_reading()
        try:
            transport.write_eof()
        except OSError:
            transport.abort()
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(ABUSE_LINGER, transport.abort)

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
