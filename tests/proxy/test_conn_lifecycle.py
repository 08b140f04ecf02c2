"""The connection state table against the real `ClientConnection`: every move of `conn_state.MOVES`
made by a scenario, the deadline each state sets, and what its expiry does.

The connection runs in-process on a real (not started) `ProxyServer` with idle upstream
connections in its pool, over transports that record what is written (as `bench/proxy_path.py`
drives it): no sockets, and a clock (`server.now`) that moves only when a test moves it, so a
deadline is compared exactly. The moves are observed by `state_watch` (the autouse fixture of
tests/proxy/conftest.py), which also fails any test whose connection makes a move the table lacks.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from regional_gateway.proxy import proxy_protocol
from regional_gateway.proxy.conn_state import DEADLINES, MOVES, ConnState, timeout_of
from regional_gateway.proxy.downstream import ClientConnection
from regional_gateway.proxy.routes_file import parse_routes
from regional_gateway.proxy.server import ProxyServer
from regional_gateway.proxy.settings import ProxySettings
from regional_gateway.proxy.upstream import UpstreamConnection

S = ConnState
NOW = 1000.0
CLIENT = ("192.0.2.7", 40000)
BACKEND = ("127.0.0.1", 9101)  # never connected to: the pool holds recorded connections to it
TIMEOUTS = dict(header_timeout=11.0, body_timeout=13.0, idle_timeout=17.0, upstream_timeout=19.0,
                tunnel_idle_timeout=23.0, body_min_rate=0)
ROUTES = 'zone = "lc.test"\nname = "gw"\n[health]\ncheck = "tcp"\n[[apps]]\nname = "app"\nbackends = ["127.0.0.1:9101"]\n'

GET = b"GET / HTTP/1.1\r\nHost: app.lc.test\r\n\r\n"
GET_CLOSE = b"GET / HTTP/1.1\r\nHost: app.lc.test\r\nConnection: close\r\n\r\n"
POST = b"POST / HTTP/1.1\r\nHost: app.lc.test\r\nContent-Length: 10\r\n\r\n12345"
POST_CLOSE = b"POST / HTTP/1.1\r\nHost: app.lc.test\r\nContent-Length: 10\r\nConnection: close\r\n\r\n12345"
UPGRADE = b"GET /ws HTTP/1.1\r\nHost: app.lc.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
PARTIAL = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nab"  # a response cut short by the backend


class Wire:
    """A transport that records: what was written, whether EOF was written, whether it was closed."""

    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        self.data = bytearray()
        self.eof = False
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def get_extra_info(self, name: str) -> Any:
        return self.peer if name == "peername" else ("127.0.0.1", 80)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


class Rig:
    """One client connection on a real `ProxyServer`, and the upstream connections it may take."""

    def __init__(self, kind: str = "http", *, trusted: bool = False, sni: str = "", peer_trusted: bool = False,
                 draining: bool = False) -> None:
        routes, _ = parse_routes(tomllib.loads(ROUTES), Path("."))
        self.settings = ProxySettings(http=("127.0.0.1:0",), **TIMEOUTS)
        self.server = ProxyServer(self.settings, routes)
        self.server.now = NOW
        self.server.draining = draining
        if peer_trusted:
            self.server.trusted_peers = frozenset((CLIENT[0],))
        for _ in range(2):
            up = UpstreamConnection(self.server.pool, BACKEND)
            up.connection_made(Wire(BACKEND))
            self.server.pool.put(up)
        self.conn = ClientConnection(self.server, kind, "https" if sni else "http", trusted, sni)
        self.wire = Wire(CLIENT)

    @property
    def state(self) -> ConnState:
        return self.conn.state

    def accept(self) -> Rig:
        self.conn.connection_made(self.wire)
        return self

    def send(self, data: bytes) -> Rig:
        self.conn.data_received(data)
        return self

    def upstream(self) -> UpstreamConnection:
        if self.conn.tunnel is not None:
            return self.conn.tunnel
        assert self.conn.active is not None and self.conn.active.upstream is not None
        return self.conn.active.upstream

    def answer(self, data: bytes) -> Rig:
        self.upstream().data_received(data)
        return self

    def upstream_lost(self) -> Rig:
        up = self.upstream()
        up.transport.close()
        up.connection_lost(None)
        return self

    def expire(self) -> Rig:
        """The sweeper finds the connection past its deadline."""
        self.server.now = self.conn.deadline
        self.conn.timed_out()
        return self

    def lost(self) -> Rig:
        self.conn.connection_lost(None)
        return self

    def answers(self) -> bytes:
        return bytes(self.wire.data)


def bad_host(request: bytes) -> bytes:
    """`request` with a Host that is not a host name: 400 when it is routed, which ends the connection."""
    return request.replace(b"Host: app.lc.test", b"Host: app lc test")


# how to bring a fresh connection into each state
REACH: dict[ConnState, Callable[[], Rig]] = {
    S.NEW: lambda: Rig().accept(),
    S.SNIFFING: lambda: Rig("mesh", trusted=True).accept(),
    S.IDLE: lambda: Rig().accept().send(GET).answer(OK),
    S.HEAD: lambda: Rig().accept().send(b"GET / HTTP/1.1\r\nHost: app"),
    S.BODY: lambda: Rig().accept().send(POST),
    S.LAST_BODY: lambda: Rig().accept().send(POST_CLOSE),
    S.DONE: lambda: Rig().accept().send(GET_CLOSE),
    S.UPGRADING: lambda: Rig().accept().send(UPGRADE + b"held"),
    S.TUNNEL: lambda: REACH[S.UPGRADING]().answer(SWITCH),
    S.TUNNEL_CLIENT_EOF: lambda: _client_eof(REACH[S.TUNNEL]()),
    S.TUNNEL_UPSTREAM_EOF: lambda: _upstream_eof(REACH[S.TUNNEL]()),
    S.LINGERING: lambda: Rig().accept().send(b"BLAH / HTTP/1.1\r\n\r\n"),
    S.CLOSING: lambda: REACH[S.IDLE]().expire(),
    S.CLOSED: lambda: Rig().accept().lost(),
}


def _client_eof(r: Rig) -> Rig:
    r.conn.eof_received()
    return r


def _upstream_eof(r: Rig) -> Rig:
    r.upstream().eof_received()
    return r


def _in_flight_then_head() -> Rig:
    """An answer in flight, the next head half read, shutdown: the answer ends the connection."""
    r = Rig().accept().send(GET).send(b"GET /next HTTP/1.1\r\n")
    r.conn.drain()
    return r.answer(OK)


def _sni_mismatch_upgrade() -> Rig:
    """An upgrade request on a TLS connection for another name: 421, which does not close, but
    reading stops where the parser stopped."""
    r = Rig("https", sni="app.lc.test").accept()
    return r.send(UPGRADE.replace(b"Host: app.lc.test", b"Host: other.lc.test"))


def _pipelined_bad_upgrade() -> Rig:
    """An upgrade request queued behind another, refused (400) when its turn comes."""
    return Rig().accept().send(GET + bad_host(UPGRADE)).answer(OK)


SCENARIOS: dict[tuple[ConnState, ConnState], Callable[[], Rig]] = {
    (S.NEW, S.SNIFFING): lambda: Rig(peer_trusted=True).accept(),
    (S.NEW, S.HEAD): lambda: REACH[S.HEAD](),
    (S.NEW, S.LINGERING): lambda: Rig(draining=True).accept(),
    (S.NEW, S.CLOSING): lambda: REACH[S.NEW]().expire(),
    (S.SNIFFING, S.NEW): lambda: REACH[S.SNIFFING]().send(GET),
    (S.SNIFFING, S.DONE): lambda: REACH[S.SNIFFING]().send(
        proxy_protocol.encode_v2("192.0.2.9", 5000, "192.0.2.1", 443, authority="nope.lc.test")),
    (S.SNIFFING, S.LINGERING): lambda: REACH[S.SNIFFING]().send(proxy_protocol.SIGNATURE + b"\x31\x11\x00\x0c"),
    (S.SNIFFING, S.CLOSING): lambda: REACH[S.SNIFFING]().expire(),
    (S.IDLE, S.HEAD): lambda: REACH[S.IDLE]().send(b"GET "),
    (S.IDLE, S.DONE): _sni_mismatch_upgrade,
    (S.IDLE, S.LINGERING): lambda: Rig().accept().send(bad_host(GET)),
    (S.IDLE, S.CLOSING): lambda: REACH[S.IDLE]().expire(),
    (S.HEAD, S.BODY): lambda: REACH[S.BODY](),
    (S.HEAD, S.IDLE): lambda: Rig().accept().send(GET),
    (S.HEAD, S.LAST_BODY): lambda: REACH[S.LAST_BODY](),
    (S.HEAD, S.DONE): lambda: REACH[S.DONE](),
    (S.HEAD, S.CLOSING): _in_flight_then_head,
    (S.BODY, S.IDLE): lambda: REACH[S.BODY]().send(b"67890"),
    (S.BODY, S.DONE): lambda: _client_eof(REACH[S.BODY]()),
    (S.BODY, S.LINGERING): lambda: Rig().accept().send(bad_host(POST)),
    (S.BODY, S.CLOSING): lambda: REACH[S.BODY]().answer(PARTIAL).upstream_lost(),
    (S.LAST_BODY, S.DONE): lambda: REACH[S.LAST_BODY]().send(b"67890"),
    (S.LAST_BODY, S.LINGERING): lambda: Rig().accept().send(bad_host(POST_CLOSE)),
    (S.LAST_BODY, S.CLOSING): lambda: REACH[S.LAST_BODY]().answer(PARTIAL).upstream_lost(),
    (S.DONE, S.UPGRADING): lambda: REACH[S.UPGRADING](),
    (S.DONE, S.LINGERING): lambda: Rig().accept().send(bad_host(GET_CLOSE)),
    (S.DONE, S.CLOSING): lambda: REACH[S.DONE]().answer(OK),
    (S.UPGRADING, S.TUNNEL): lambda: REACH[S.TUNNEL](),
    (S.UPGRADING, S.DONE): lambda: REACH[S.UPGRADING]().answer(OK),
    (S.UPGRADING, S.LINGERING): _pipelined_bad_upgrade,
    (S.UPGRADING, S.CLOSING): lambda: REACH[S.UPGRADING]().answer(PARTIAL).upstream_lost(),
    (S.TUNNEL, S.TUNNEL_CLIENT_EOF): lambda: REACH[S.TUNNEL_CLIENT_EOF](),
    (S.TUNNEL, S.TUNNEL_UPSTREAM_EOF): lambda: REACH[S.TUNNEL_UPSTREAM_EOF](),
    (S.TUNNEL, S.CLOSING): lambda: REACH[S.TUNNEL]().upstream_lost(),
    (S.TUNNEL_CLIENT_EOF, S.CLOSING): lambda: _upstream_eof(REACH[S.TUNNEL_CLIENT_EOF]()),
    (S.TUNNEL_UPSTREAM_EOF, S.CLOSING): lambda: _client_eof(REACH[S.TUNNEL_UPSTREAM_EOF]()),
    (S.LINGERING, S.CLOSING): lambda: REACH[S.LINGERING]().expire(),
} | {(state, S.CLOSED): (lambda state=state: REACH[state]().lost()) for state in S if state is not S.CLOSED}


def test_every_move_of_the_table_has_a_scenario():
    assert set(SCENARIOS) == {(m.old, m.new) for m in MOVES}


@pytest.mark.parametrize("move", sorted(SCENARIOS, key=lambda m: (m[0].name, m[1].name)),
                         ids=lambda m: f"{m[0].name}->{m[1].name}")
def test_the_connection_makes_the_move(move, connection_state_moves):
    before = connection_state_moves.moves[move]
    SCENARIOS[move]()
    assert connection_state_moves.moves[move] > before, f"no {move[0].name} -> {move[1].name}"


@pytest.mark.parametrize("state", list(REACH), ids=lambda s: s.name)
def test_reach(state):
    assert REACH[state]().state is state


@pytest.mark.parametrize("state", [s for s in S if DEADLINES[s].timeout], ids=lambda s: s.name)
def test_the_deadline_a_state_sets(state):
    r = REACH[state]()
    assert r.conn.deadline == NOW + timeout_of(state, r.settings)


@pytest.mark.parametrize("state,status,after", [
    (S.NEW, b"", S.CLOSING),  # no request came: closed without a word
    (S.SNIFFING, b"", S.CLOSING),
    (S.IDLE, b"", S.CLOSING),
    (S.HEAD, b"HTTP/1.1 408 ", S.LINGERING),
    (S.BODY, b"HTTP/1.1 408 ", S.LINGERING),
    (S.LAST_BODY, b"HTTP/1.1 408 ", S.LINGERING),
    (S.UPGRADING, b"HTTP/1.1 504 ", S.CLOSING),
    (S.TUNNEL, b"", S.CLOSING),
    (S.LINGERING, b"", S.CLOSING),
], ids=lambda v: v.name if isinstance(v, ConnState) else None)
def test_what_expiry_does(state, status, after):
    r = REACH[state]()
    written = len(r.wire.data)
    r.expire()
    assert r.state is after
    new = r.answers()[written:]
    assert new.startswith(status) if status else new == b""
    if after is S.CLOSING:
        assert r.wire.closed


def test_held_bytes_go_out_only_after_the_101():
    r = REACH[S.UPGRADING]()
    up = r.upstream()
    assert not up.transport.data.endswith(b"held")
    r.answer(SWITCH)
    assert up.transport.data.endswith(b"held")
    r.send(b"more")
    assert up.transport.data.endswith(b"heldmore")


def test_held_bytes_are_dropped_on_any_other_answer():
    r = REACH[S.UPGRADING]()
    up = r.upstream()
    r.answer(OK).send(b"after")
    assert r.state is S.CLOSING  # UPGRADING -> DONE, and the answer was the last one
    assert r.answers().endswith(b"ok")
    assert b"held" not in up.transport.data and b"after" not in up.transport.data


def test_reading_stays_stopped_for_requests_later_in_the_same_read():
    """Connection: close, then another request in the same read: it is not served."""
    r = Rig().accept().send(GET_CLOSE + GET)
    assert r.state is S.DONE
    assert r.upstream().transport.data.count(b"GET / ") == 1


def test_shutdown_lets_the_head_in_progress_be_answered_then_closes():
    r = REACH[S.HEAD]()
    r.conn.drain()
    assert r.state is S.HEAD and not r.wire.closed
    r.send(b".lc.test\r\n\r\n").answer(OK)
    assert r.state is S.CLOSING and r.wire.closed
    assert r.answers().endswith(b"ok")


def test_a_connection_keeps_its_attributes_in_the_instance():
    """At most 29: CPython 3.11 keeps that many attributes in the instance itself, and one more
    makes every attribute access of the hot path a dict lookup (`Http1Exchanges.__init__`)."""
    for state in (S.IDLE, S.TUNNEL, S.LINGERING):
        r = REACH[state]()
        assert len(vars(r.conn)) <= 29, sorted(vars(r.conn))
    mesh = REACH[S.SNIFFING]()
    assert len(vars(mesh.conn)) <= 29
