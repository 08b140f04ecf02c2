"""Table tests of `conn_state`: the moves allowed and refused, the shape of the table, the deadline of
each state. The same table against the running connection: test_conn_lifecycle.py."""

from __future__ import annotations

import itertools

import pytest

from regional_gateway.proxy import conn_state
from regional_gateway.proxy.conn_state import (
    ALLOWED,
    DEADLINES,
    MOVES,
    ConnState,
    IllegalTransition,
    timeout_of,
    transition,
)
from regional_gateway.proxy.exchange import LINGER
from regional_gateway.proxy.settings import ProxySettings

S = ConnState
PAIRS = {(m.old, m.new) for m in MOVES}

# the table, written out: a change to it is a change to this list
EXPECTED = {
    S.NEW: {S.SNIFFING, S.HEAD, S.LINGERING, S.CLOSING, S.CLOSED},
    S.SNIFFING: {S.NEW, S.DONE, S.LINGERING, S.CLOSING, S.CLOSED},
    S.IDLE: {S.HEAD, S.DONE, S.LINGERING, S.CLOSING, S.CLOSED},
    S.HEAD: {S.BODY, S.IDLE, S.LAST_BODY, S.DONE, S.CLOSING, S.CLOSED},
    S.BODY: {S.IDLE, S.DONE, S.LINGERING, S.CLOSING, S.CLOSED},
    S.LAST_BODY: {S.DONE, S.LINGERING, S.CLOSING, S.CLOSED},
    S.DONE: {S.UPGRADING, S.LINGERING, S.CLOSING, S.CLOSED},
    S.UPGRADING: {S.TUNNEL, S.DONE, S.LINGERING, S.CLOSING, S.CLOSED},
    S.TUNNEL: {S.TUNNEL_CLIENT_EOF, S.TUNNEL_UPSTREAM_EOF, S.CLOSING, S.CLOSED},
    S.TUNNEL_CLIENT_EOF: {S.CLOSING, S.CLOSED},
    S.TUNNEL_UPSTREAM_EOF: {S.CLOSING, S.CLOSED},
    S.LINGERING: {S.CLOSING, S.CLOSED},
    S.CLOSING: {S.CLOSED},
    S.CLOSED: set(),
}


def test_the_table_is_as_written_out():
    assert {s: set(ALLOWED[s]) for s in S} == EXPECTED


@pytest.mark.parametrize("move", sorted(PAIRS, key=lambda m: (m[0].name, m[1].name)),
                         ids=lambda m: f"{m[0].name}->{m[1].name}")
def test_every_allowed_move(move):
    old, new = move
    assert transition(old, new) is new


@pytest.mark.parametrize("old,new", [
    (S.CLOSED, S.NEW),  # final
    (S.CLOSED, S.IDLE),
    (S.CLOSING, S.LINGERING),  # closed already: nothing more is answered
    (S.LINGERING, S.IDLE),  # an answer that ends the connection never lets it read again
    (S.DONE, S.HEAD),  # reading stopped stays stopped
    (S.DONE, S.IDLE),
    (S.HEAD, S.TUNNEL),  # a tunnel only after the backend's 101
    (S.IDLE, S.TUNNEL),
    (S.IDLE, S.UPGRADING),  # an upgrade request is never keep-alive
    (S.HEAD, S.LINGERING),  # a head is answered once complete, after it left HEAD
    (S.NEW, S.BODY),  # no body before its head
    (S.TUNNEL, S.HEAD),  # no HTTP after a tunnel
    (S.TUNNEL_CLIENT_EOF, S.TUNNEL_UPSTREAM_EOF),  # the second EOF closes
    (S.TUNNEL_CLIENT_EOF, S.TUNNEL),
    (S.UPGRADING, S.IDLE),  # after an upgrade request the client's stream is not HTTP
    (S.SNIFFING, S.HEAD),  # through NEW, which starts the HTTP of a sniffed connection
    (S.TUNNEL, S.LINGERING),
])
def test_illegal_moves_are_refused_naming_both_ends(old, new):
    with pytest.raises(IllegalTransition) as caught:
        transition(old, new)
    assert caught.value.old is old and caught.value.new is new
    assert caught.value.field == "state"
    message = str(caught.value)
    assert message.startswith(f"state: {old.name} -> {new.name} is not a move")
    assert all(s.name in message for s in ALLOWED[old])


def test_every_pair_outside_the_table_is_refused():
    for old, new in itertools.product(S, S):
        if old is new or (old, new) in PAIRS:
            assert transition(old, new) is new
        else:
            with pytest.raises(IllegalTransition):
                transition(old, new)


def test_staying_is_not_a_move():
    assert all(transition(s, s) is s for s in S)
    assert not any(m.old is m.new for m in MOVES)


def test_each_move_is_listed_once_and_says_what_makes_it():
    assert len(PAIRS) == len(MOVES)
    assert all(m.on for m in MOVES)


def test_every_state_is_reachable_from_a_new_connection_and_can_end():
    reached, todo = {S.NEW}, [S.NEW]
    while todo:
        for nxt in ALLOWED[todo.pop()]:
            if nxt not in reached:
                reached.add(nxt)
                todo.append(nxt)
    assert reached == set(S)
    assert all(S.CLOSED in ALLOWED[s] for s in S if s is not S.CLOSED)
    assert ALLOWED[S.CLOSED] == frozenset()


def test_the_module_names_are_the_members():
    for state in S:
        assert getattr(conn_state, state.name) is state
    assert conn_state.READING == {S.NEW, S.IDLE, S.HEAD, S.BODY, S.LAST_BODY}
    assert conn_state.TUNNELS == {S.TUNNEL, S.TUNNEL_CLIENT_EOF, S.TUNNEL_UPSTREAM_EOF}


SETTINGS = ProxySettings(http=("127.0.0.1:0",), header_timeout=11.0, body_timeout=13.0, idle_timeout=17.0, upstream_timeout=19.0,
                         tunnel_idle_timeout=23.0)


@pytest.mark.parametrize("state,seconds", [
    (S.NEW, 11.0),
    (S.SNIFFING, 11.0),
    (S.IDLE, 17.0),
    (S.HEAD, 11.0),
    (S.BODY, 13.0),
    (S.LAST_BODY, 13.0),
    (S.DONE, None),  # the exchange in flight decides
    (S.UPGRADING, 19.0),
    (S.TUNNEL, 23.0),
    (S.TUNNEL_CLIENT_EOF, 23.0),
    (S.TUNNEL_UPSTREAM_EOF, 23.0),
    (S.LINGERING, LINGER),
    (S.CLOSING, None),  # the deadline set before stands
    (S.CLOSED, None),
], ids=lambda v: v.name if isinstance(v, ConnState) else None)
def test_the_timeout_of_each_state(state, seconds):
    assert timeout_of(state, SETTINGS) == seconds
    assert DEADLINES[state].expiry
