"""Table tests of the coordinator's pure reachability rules: vote checks and merges, the instance
health owner, the etcd values of alive/votes/reach, which reach/ keys a decision writes, and which
gateways GeoDNS answers with (`in_dns`, fail-open included)."""

from __future__ import annotations

import pytest

from coordinator.heartbeats import check_votes, health_owner, merge_votes
from coordinator.reach_keys import (
    ReachRecord,
    alive_value,
    reach_writes,
    session_of,
    votes_from_json,
    votes_of,
    votes_to_json,
)
from coordinator.reachability import Decision, Verdict, Vote
from coordinator.views import dns_presence
from geomesh.api import geomesh_pb2 as pb
from geomesh.model import App, Gateway, GatewayState, SessionState

REGIONS = {"a1": "eu", "a2": "eu", "b1": "us", "c1": "ap"}
NAN = float("nan")


def v(target: str, up: bool = True, rtt: float = 1.0) -> pb.ReachVote:
    return pb.ReachVote(target=target, up=up, rtt_ms=rtt)


@pytest.mark.parametrize(("votes", "limit", "accepted", "ignored"), [
    ([v("b1"), v("c1", False, 0)], 4096, {"b1": (True, 1.0), "c1": (False, 0.0)}, {}),
    ([v("a1")], 4096, {}, {"self": 1}),
    ([v("a2")], 4096, {}, {"same-region": 1}),
    ([v("zz"), v("")], 4096, {}, {"unknown-target": 2}),
    ([v("b1", False), v("b1", True)], 4096, {"b1": (False, 1.0)}, {"duplicate": 1}),  # the first counts
    ([v("b1", rtt=NAN), v("c1", rtt=-1), v("c1", rtt=float("inf"))], 4096, {}, {"bad-rtt": 3}),
    ([v("b1", rtt=1.23456)], 4096, {"b1": (True, 1.235)}, {}),
    ([v("b1"), v("zz"), v("c1"), v("b1")], 2, {"b1": (True, 1.0)}, {"unknown-target": 1, "too-many": 2}),
])
def test_check_votes(votes, limit, accepted, ignored) -> None:
    got, counts = check_votes("a1", votes, REGIONS.get, limit=limit)
    assert got == accepted
    assert dict(counts) == ignored


def test_check_votes_bounds_a_flood() -> None:
    flood = [v("b1")] + [v(f"ghost-{i}") for i in range(10_000)]
    got, counts = check_votes("a1", flood, REGIONS.get)
    assert got == {"b1": (True, 1.0)}
    assert counts == {"unknown-target": 4095, "too-many": 10_001 - 4096}


@pytest.mark.parametrize(("current", "accepted", "complete", "known", "merged"), [
    ({"b1": (True, 1.0)}, {"c1": (False, 0.0)}, False, REGIONS, {"b1": (True, 1.0), "c1": (False, 0.0)}),
    ({"b1": (True, 1.0)}, {"b1": (False, 0.0)}, False, REGIONS, {"b1": (False, 0.0)}),
    ({"b1": (True, 1.0)}, {"c1": (True, 2.0)}, True, REGIONS, {"c1": (True, 2.0)}),    # the whole set
    ({"b1": (True, 1.0)}, {}, True, REGIONS, {}),                                        # nothing to probe now
    ({"gone": (True, 1.0), "b1": (True, 1.0)}, {}, False, REGIONS, {"b1": (True, 1.0)}),  # removed gateways drop
])
def test_merge_votes(current, accepted, complete, known, merged) -> None:
    assert merge_votes(current, accepted, complete, known) == merged


def test_health_owner_is_stable_and_moves_only_what_it_must() -> None:
    assert health_owner("web/a", []) is None
    assert health_owner("web/a", ["g1"]) == "g1"
    keys = [f"web/i{i}" for i in range(200)]
    two = {k: health_owner(k, ["g1", "g2"]) for k in keys}
    assert two == {k: health_owner(k, ["g2", "g1"]) for k in keys}  # order does not matter
    assert 60 < sum(1 for o in two.values() if o == "g1") < 140     # spread
    three = {k: health_owner(k, ["g1", "g2", "g3"]) for k in keys}
    # g3 joining takes instances only for itself: no instance moves between g1 and g2
    assert all(three[k] in (two[k], "g3") for k in keys)


@pytest.mark.parametrize(("value", "session"), [
    (alive_value(SessionState.OPEN), SessionState.OPEN),
    (alive_value(SessionState.TIMED_OUT), SessionState.TIMED_OUT),
    (b"1", SessionState.OPEN),            # older coordinators
    (b"{not json", SessionState.OPEN),    # the key exists: alive
    (b'{"session": "weird"}', SessionState.OPEN),
    (b"[]", SessionState.OPEN),
])
def test_alive_values(value: bytes, session: SessionState) -> None:
    assert session_of(value) is session


def test_alive_value_is_the_contract_json() -> None:
    assert alive_value(SessionState.TIMED_OUT) == b'{"session":"timed_out"}'


@pytest.mark.parametrize(("raw", "votes"), [
    (b'{"b1":{"up":false,"rtt_ms":0.0},"c1":{"up":true,"rtt_ms":3.5}}', {"b1": (False, 0.0), "c1": (True, 3.5)}),
    (b'{"b1":{"up":"yes"},"c1":{"up":true}}', {"c1": (True, 0.0)}),       # a bad entry is skipped
    (b'{"b1":{"up":true,"rtt_ms":-4}}', {"b1": (True, 0.0)}),
    (b'{"b1":{"up":true,"rtt_ms":true}}', {"b1": (True, 0.0)}),
    (b'[1,2]', {}), (b"garbage", {}), (b'{"b1": 7}', {}),
])
def test_votes_from_json(raw: bytes, votes: dict) -> None:
    assert votes_from_json(raw) == votes


def test_votes_round_trip_and_as_decide_votes() -> None:
    votes = {"c1": (True, 3.5), "b1": (False, 0.0)}
    assert votes_from_json(votes_to_json(votes)) == votes
    assert votes_to_json(votes) == b'{"b1":{"up":false,"rtt_ms":0.0},"c1":{"up":true,"rtt_ms":3.5}}'
    assert votes_of({"a1": votes}) == [Vote("a1", "b1", False, 0.0), Vote("a1", "c1", True, 3.5)]


@pytest.mark.parametrize(("raw", "record"), [
    (ReachRecord(True, ("ap",), ("us", "eu"), 4.5).to_json(), ReachRecord(True, ("ap",), ("us", "eu"), 4.5)),
    (b'{"unreachable": "yes"}', ReachRecord()),  # only true is true
    (b'{"unreachable": true, "seen_by": "ap", "probe_rtt_ms": "x"}', ReachRecord(True)),
    (b"nope", ReachRecord()), (b"[]", ReachRecord()),
])
def test_reach_record_from_json(raw: bytes, record: ReachRecord) -> None:
    assert ReachRecord.from_json(raw) == record


def test_reach_writes_only_what_changed() -> None:
    decision = Decision({"a1": Verdict(True, ("us",), (), 2.0), "b1": Verdict(False, (), ("ap", "eu")),
                         "c1": Verdict(True)})
    current = {"a1": ReachRecord(False, ("us",), (), 2.0)}
    # a1 unchanged, c1 is the default (absent key), b1 is new
    assert reach_writes(decision, current) == {"b1": ReachRecord(True, (), ("ap", "eu"), 0.0)}
    assert reach_writes(decision, {**current, "b1": ReachRecord(True, (), ("ap", "eu"))}) == {}
    # who sees it changed: written, the verdict did not
    assert reach_writes(Decision({"a1": Verdict(True, ("ap", "us"), (), 2.0)}), current) == {
        "a1": ReachRecord(False, ("ap", "us"), (), 2.0)}


def gw(name: str, region: str, *, alive: bool = True, unreachable: bool = False,
       draining: bool = False) -> Gateway:
    return Gateway(name, region, "192.0.2.1", 51820, "q" * 43 + "=", "", 8080, alive=alive, unreachable=unreachable,
                   state=GatewayState.DRAINING if draining else GatewayState.ACTIVE)


@pytest.mark.parametrize(("gateways", "apps", "in_dns"), [
    # reachable routable ones only
    ([gw("e1", "eu"), gw("e2", "eu", unreachable=True), gw("u1", "us")], [], {"e1", "u1"}),
    # not alive or draining: never
    ([gw("e1", "eu", alive=False), gw("e2", "eu", draining=True), gw("u1", "us")], [], {"u1"}),
    # everything unreachable: fail-open, every routable one may be answered (the nearest region's)
    ([gw("e1", "eu", unreachable=True), gw("u1", "us", unreachable=True), gw("x", "us", alive=False,
                                                                             unreachable=True)], [], {"e1", "u1"}),
    # an app pinned to eu, whose gateways are all unreachable: fail-open for eu only
    ([gw("e1", "eu", unreachable=True), gw("u1", "us")], [App("shop", pinned_regions=("eu",))], {"e1", "u1"}),
    # ... but not when the app is not pinned: us serves it
    ([gw("e1", "eu", unreachable=True), gw("u1", "us")], [App("shop")], {"u1"}),
])
def test_dns_presence(gateways, apps, in_dns) -> None:
    assert dns_presence(gateways, apps) == frozenset(in_dns)


def test_gateway_model_session_and_verdict() -> None:
    g = gw("e1", "eu", unreachable=True)
    assert g.session is SessionState.OPEN and g.routable and not g.reachable_routable
    assert gw("e1", "eu", alive=False).session is SessionState.CLOSED
    back = Gateway.from_proto(g.to_proto())
    assert back == g and back.to_proto().session == pb.SESSION_STATE_OPEN
    assert b"unreachable" not in g.to_json() and b'"https_port":0' in g.to_json()  # not stored in its key
