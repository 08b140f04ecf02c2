"""The lifecycle of one HTTP/1.1 client connection (`downstream.ClientConnection`): one state, one table.

A connection is in exactly one `ConnState`; `MOVES` lists every move between states with the
event that makes it, `DEADLINES` the timeout a state sets and what happens when it expires, and
`transition(old, new)` checks a move against the table (`IllegalTransition` naming both ends).
The connection itself assigns states as plain attributes on its hot path, through the module-level
names below (`HEAD`, `IDLE`, ...): Python 3.11 finds `ConnState.HEAD` through the enum's
metaclass at about 60 ns a time, a module global at about 1. The table is checked where it costs
nothing per request: the proxy tests watch every assignment of every connection they run
(`tests/proxy/state_watch.py`).

Rules of the table:
- Reading: NEW -> HEAD -> BODY | IDLE | LAST_BODY | DONE, then BODY -> IDLE and LAST_BODY -> DONE
  as the request ends. IDLE and HEAD say nothing of the answers: exchanges may be in flight in any
  reading state (pipelining), and while one is, its phase sets the deadline (body_timeout while
  its body comes, upstream_timeout while the backend is awaited, idle_timeout while the answer is
  written), not the reading state.
- DONE: no more requests are read (Connection: close, a request error, the client's EOF inside a
  request, a forwarded mesh connection on its way to `mesh_intake`); input is dropped, the
  exchanges already read are answered, and the last one ends the connection.
- The parser runs the callbacks of a whole read: requests after one that moved the connection out
  of reading are still parsed in that read, but never move it back (only NEW and IDLE go to HEAD).
- Keep-alive is not a state: `keep_alive` (False: close after the exchange being answered) can fall
  in any state (shutdown, a backend's extra response) while the request in progress must still be
  read to its end; as in h11, it is a flag beside the state, not a copy of every reading state.
- UPGRADING holds what the client sends after an upgrade request until the backend answers:
  101 -> TUNNEL, anything else -> DONE (the held bytes are dropped). It comes from DONE: an upgrade
  request never keeps the connection alive (`request_head`), and llhttp ends it before it stops.
- A tunnel half-closes one direction at a time (`flow_control.pass_eof`); the second EOF closes.
- A state in which the gateway may still answer can go to LINGERING (an answer that ends the
  connection: EOF written, what the client still sends dropped for `exchange.LINGER`); not HEAD: a
  request is answered once its head is complete, and the head leaves HEAD before; every state
  but CLOSED to CLOSING (`transport.close()` called, the last bytes flushing) and to CLOSED
  (`connection_lost`, or the transport handed to another protocol). CLOSED is final. Assigning
  the state a connection is in is not a move.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from regional_gateway.proxy.exchange import LINGER


class ConnState(enum.Enum):
    NEW = "new"  # accepted, no request yet
    SNIFFING = "sniffing"  # mesh or trusted peer: a PROXY v2 header may come first (`downstream._sniff`)
    IDLE = "idle"  # between requests (answers may be in flight)
    HEAD = "head"  # a request head is being read
    BODY = "body"  # a request body is being read
    LAST_BODY = "last-body"  # the body of the last request read (Connection: close with a body)
    DONE = "done"  # no more requests are read; those read are answered, then the connection ends
    UPGRADING = "upgrading"  # an upgrade request was read: what follows is held for the backend's 101
    TUNNEL = "tunnel"  # after the 101: bytes both ways
    TUNNEL_CLIENT_EOF = "tunnel-client-eof"  # the client finished sending (passed on to the backend)
    TUNNEL_UPSTREAM_EOF = "tunnel-upstream-eof"  # the backend finished sending (passed on to the client)
    LINGERING = "lingering"  # after an answer that ends the connection: input dropped for LINGER
    CLOSING = "closing"  # transport.close() called: the last bytes flush, then connection_lost
    CLOSED = "closed"  # the transport is gone, or went to another protocol (`mesh_intake`)

    # members are singletons compared by identity: hash them so too (Enum hashes the name, in
    # Python, about 50 ns; `state in READING` is on the path of every read that is not IDLE)
    __hash__ = object.__hash__


NEW = ConnState.NEW
SNIFFING = ConnState.SNIFFING
IDLE = ConnState.IDLE
HEAD = ConnState.HEAD
BODY = ConnState.BODY
LAST_BODY = ConnState.LAST_BODY
DONE = ConnState.DONE
UPGRADING = ConnState.UPGRADING
TUNNEL = ConnState.TUNNEL
TUNNEL_CLIENT_EOF = ConnState.TUNNEL_CLIENT_EOF
TUNNEL_UPSTREAM_EOF = ConnState.TUNNEL_UPSTREAM_EOF
LINGERING = ConnState.LINGERING
CLOSING = ConnState.CLOSING
CLOSED = ConnState.CLOSED

READING = frozenset((NEW, IDLE, HEAD, BODY, LAST_BODY))  # requests are parsed (those go to DONE when reading stops)
TUNNELS = frozenset((TUNNEL, TUNNEL_CLIENT_EOF, TUNNEL_UPSTREAM_EOF))


@dataclass(frozen=True, slots=True)
class Move:
    old: ConnState
    new: ConnState
    on: str  # the event that makes it


_LOST = "connection_lost, or the transport handed to another protocol"
_CLOSE = "transport.close(): the last answer went out, a timeout, shutdown"
_ENDS = "an answer that ends the connection (400, 408, 413, 431, 503): EOF written"
_STOPS = "reading stops: a malformed request, a body too large or too slow, the client's EOF inside it"

MOVES: tuple[Move, ...] = (
    Move(NEW, SNIFFING, "accepted from a trusted peer or on a mesh address: PROXY v2 may come first"),
    Move(NEW, HEAD, "the first request begins"),
    Move(NEW, LINGERING, "refused at accept (connection limit, shutdown): " + _ENDS),
    Move(NEW, CLOSING, "no request within header_timeout, or shutdown"),
    Move(NEW, CLOSED, _LOST),
    Move(SNIFFING, NEW, "the first bytes are not a PROXY v2 header: HTTP follows"),
    Move(SNIFFING, DONE, "a PROXY v2 header: the connection goes to mesh_intake"),
    Move(SNIFFING, LINGERING, "a bad PROXY v2 header, or refused at accept: " + _ENDS),
    Move(SNIFFING, CLOSING, "no header within header_timeout, or shutdown"),
    Move(SNIFFING, CLOSED, _LOST),
    Move(IDLE, HEAD, "the next request begins"),
    Move(IDLE, DONE, "the parser stopped at an upgrade request refused without closing (421)"),
    Move(IDLE, LINGERING, "the request read is refused: " + _ENDS),
    Move(IDLE, CLOSING, "idle_timeout, shutdown, or " + _CLOSE),
    Move(IDLE, CLOSED, _LOST),
    Move(HEAD, BODY, "a head with a body, keep-alive"),
    Move(HEAD, IDLE, "a head without a body, keep-alive"),
    Move(HEAD, LAST_BODY, "a head with a body that ends reading (Connection: close)"),
    Move(HEAD, DONE, "a head without a body that ends reading (Connection: close, an error); " + _STOPS),
    Move(HEAD, CLOSING, "the answer before it was the last: " + _CLOSE),
    Move(HEAD, CLOSED, _LOST),
    Move(BODY, IDLE, "the body ends"),
    Move(BODY, DONE, _STOPS),
    Move(BODY, LINGERING, "its request is refused: " + _ENDS),
    Move(BODY, CLOSING, _CLOSE),
    Move(BODY, CLOSED, _LOST),
    Move(LAST_BODY, DONE, "the last body ends; " + _STOPS),
    Move(LAST_BODY, LINGERING, "its request is refused: " + _ENDS),
    Move(LAST_BODY, CLOSING, _CLOSE),
    Move(LAST_BODY, CLOSED, _LOST),
    Move(DONE, UPGRADING, "the parser stopped at the end of an upgrade request (never keep-alive)"),
    Move(DONE, LINGERING, "a request read is refused: " + _ENDS),
    Move(DONE, CLOSING, "the last answer went out: " + _CLOSE),
    Move(DONE, CLOSED, _LOST),
    Move(UPGRADING, TUNNEL, "the backend answered 101: the held bytes go to it"),
    Move(UPGRADING, DONE, "the backend answered, not 101: the held bytes are dropped"),
    Move(UPGRADING, LINGERING, "the upgrade request, queued, is refused in its turn: " + _ENDS),
    Move(UPGRADING, CLOSING, _CLOSE),
    Move(UPGRADING, CLOSED, _LOST),
    Move(TUNNEL, TUNNEL_CLIENT_EOF, "the client's EOF, passed on to the backend"),
    Move(TUNNEL, TUNNEL_UPSTREAM_EOF, "the backend's EOF, passed on to the client"),
    Move(TUNNEL, CLOSING, "the backend connection closed, tunnel_idle_timeout, or an EOF that cannot be passed on"),
    Move(TUNNEL, CLOSED, _LOST),
    Move(TUNNEL_CLIENT_EOF, CLOSING, "the backend's EOF too, or tunnel_idle_timeout"),
    Move(TUNNEL_CLIENT_EOF, CLOSED, _LOST),
    Move(TUNNEL_UPSTREAM_EOF, CLOSING, "the client's EOF too, or tunnel_idle_timeout"),
    Move(TUNNEL_UPSTREAM_EOF, CLOSED, _LOST),
    Move(LINGERING, CLOSING, "LINGER passed, or the EOF could not be written"),
    Move(LINGERING, CLOSED, _LOST),
    Move(CLOSING, CLOSED, "connection_lost: the last bytes went out"),
)
ALLOWED: Mapping[ConnState, frozenset[ConnState]] = {
    state: frozenset(m.new for m in MOVES if m.old is state) for state in ConnState}


@dataclass(frozen=True, slots=True)
class Deadline:
    timeout: str  # a `ProxySettings` field, "linger" (`exchange.LINGER`), or "" (no new deadline)
    expiry: str  # what the connection does when it passes


DEADLINES: Mapping[ConnState, Deadline] = {
    NEW: Deadline("header_timeout", "close: no request came"),
    SNIFFING: Deadline("header_timeout", "close: no complete PROXY header or ClientHello came"),
    IDLE: Deadline("idle_timeout", "close: an idle keep-alive connection"),
    HEAD: Deadline("header_timeout", "408: the head did not complete"),
    BODY: Deadline("body_timeout", "408: the body went silent or under body_min_rate (504 if the gateway held "
                                   "it up past upstream_timeout)"),
    LAST_BODY: Deadline("body_timeout", "as BODY"),
    DONE: Deadline("", "as the exchange in flight decides (504, close)"),
    UPGRADING: Deadline("upstream_timeout", "504: the backend did not answer the upgrade request"),
    TUNNEL: Deadline("tunnel_idle_timeout", "close: no bytes either way"),
    TUNNEL_CLIENT_EOF: Deadline("tunnel_idle_timeout", "close"),
    TUNNEL_UPSTREAM_EOF: Deadline("tunnel_idle_timeout", "close"),
    LINGERING: Deadline("linger", "close: the client had its moment to read the answer"),
    CLOSING: Deadline("", "close (again)"),
    CLOSED: Deadline("", "none: the sweeper has forgotten the connection"),
}


def timeout_of(state: ConnState, settings: object) -> float | None:
    """Seconds of the deadline `state` sets (from `settings`, a `ProxySettings`); None: it sets none
    (the exchange in flight decides, or the deadline set before stands)."""
    name = DEADLINES[state].timeout
    if not name:
        return None
    return LINGER if name == "linger" else float(getattr(settings, name))


class IllegalTransition(ValueError):
    """A move that is not in `MOVES`: a bug in the connection, never the client's doing."""

    field = "state"

    def __init__(self, old: ConnState, new: ConnState) -> None:
        allowed = ", ".join(sorted(s.name for s in ALLOWED[old])) or "none, it is final"
        super().__init__(f"state: {old.name} -> {new.name} is not a move of the connection table "
                         f"(from {old.name}: {allowed})")
        self.old = old
        self.new = new


def transition(old: ConnState, new: ConnState) -> ConnState:
    """`new` if the table allows moving to it from `old` (or it is `old`); else IllegalTransition."""
    if new is not old and new not in ALLOWED[old]:
        raise IllegalTransition(old, new)
    return new
