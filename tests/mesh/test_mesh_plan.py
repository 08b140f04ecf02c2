"""The pure diff between desired and actual WireGuard peers."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from geomesh.errors import ValidationError
from regional_gateway.wireguard.peers import (
    Peer,
    PeerUpdate,
    Plan,
    check_disjoint,
    hold_keepalives,
    keepalive_delay,
    plan,
)


def key(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


def peer(n: int, **kw: object) -> Peer:
    base: dict[str, object] = {"public_key": key(n), "endpoint": f"192.0.2.{n}:51820",
                               "allowed_ips": (f"10.77.0.{n}/32",), "persistent_keepalive": 25}
    base.update(kw)
    return Peer(**base)  # type: ignore[arg-type]


def by_key(*peers: Peer) -> dict[str, Peer]:
    return {p.public_key: p for p in peers}


def test_equal_sets_give_empty_plan() -> None:
    desired = by_key(peer(1), peer(2), peer(3))
    result = plan(desired, dict(desired))
    assert result.empty and result == Plan()


def test_observed_fields_do_not_count() -> None:
    desired = by_key(peer(1))
    actual = by_key(peer(1, last_handshake=1700000000.5, rx_bytes=10, tx_bytes=20, name="x"))
    assert plan(desired, actual).empty


def test_allowed_ips_order_and_form_do_not_matter() -> None:
    a = peer(1, allowed_ips=("10.77.0.1/32", "10.200.1.0/24"))
    b = peer(1, allowed_ips=["10.200.1.7/24", "10.77.0.1", "10.77.0.1/32"])
    assert a == b and b.allowed_ips == ("10.77.0.1/32", "10.200.1.0/24")
    assert plan(by_key(a), by_key(b)).empty


def test_adds_updates_removes() -> None:
    actual = by_key(peer(1), peer(2), peer(3))
    desired = by_key(peer(1), peer(2, endpoint="198.51.100.2:51820"), peer(4))
    result = plan(desired, actual)
    assert result.adds == (peer(4),)
    assert result.updates == (PeerUpdate(peer(2, endpoint="198.51.100.2:51820"), frozenset({"endpoint"})),)
    assert result.removes == (key(3),)
    assert result.summary() == {"adds": 1, "updates": 1, "removes": 1}
    assert result.touches_allowed_ips


def test_update_names_every_changed_field() -> None:
    result = plan(by_key(peer(1, allowed_ips=("10.77.0.9/32",), persistent_keepalive=0)), by_key(peer(1)))
    assert result.updates[0].changed == frozenset({"allowed_ips", "persistent_keepalive"})
    endpoint_only = plan(by_key(peer(1, endpoint="192.0.2.99:1")), by_key(peer(1)))
    assert not endpoint_only.touches_allowed_ips


def test_desired_without_endpoint_accepts_the_learned_one() -> None:
    assert plan(by_key(peer(1, endpoint=None)), by_key(peer(1))).empty


def test_plan_is_idempotent_after_applying() -> None:
    actual = by_key(peer(1), peer(2), peer(3))
    desired = by_key(peer(2, persistent_keepalive=0), peer(3), peer(5))
    result = plan(desired, actual)
    applied = {k: v for k, v in actual.items() if k not in result.removes}
    applied.update({u.peer.public_key: u.peer for u in result.updates})
    applied.update({p.public_key: p for p in result.adds})
    assert plan(desired, applied).empty


def test_mapping_key_must_be_the_peer_key() -> None:
    with pytest.raises(ValidationError, match="not the peer's public key"):
        plan({key(9): peer(1)}, {})


def test_two_peers_claiming_one_allowed_ip_lose_only_that_range() -> None:
    # probe finding 9: two regions on one instance subnet; the plan still applies everything else
    a = peer(1, allowed_ips=("10.77.0.1/32", "10.50.0.0/16"))
    b = peer(2, allowed_ips=("10.77.0.2/32", "10.50.0.0/16"))
    c = peer(3, allowed_ips=("10.77.0.3/32", "10.60.0.0/16"))
    before = REGISTRY.get_sample_value("geomesh_mesh_allowed_ips_skipped_total", {"reason": "claimed_twice"}) or 0
    result = plan(by_key(a, b, c), {})
    assert {p.public_key: p.allowed_ips for p in result.adds} == {
        key(1): ("10.77.0.1/32",), key(2): ("10.77.0.2/32",), key(3): ("10.60.0.0/16", "10.77.0.3/32")}
    assert [(x.allowed_ip, x.public_keys) for x in result.conflicts] == [("10.50.0.0/16", (key(1), key(2)))]
    after = REGISTRY.get_sample_value("geomesh_mesh_allowed_ips_skipped_total", {"reason": "claimed_twice"})
    assert after == before + 2
    # applied, the same desired set gives an empty plan (no flapping)
    assert plan(by_key(a, b, c), {p.public_key: p for p in result.adds}).empty
    # a peer that claims its neighbour's mesh /32 loses it, the neighbour too; nothing raises
    result = plan(by_key(peer(1), peer(2, allowed_ips=("10.77.0.1/32", "10.77.0.2/32"))), {})
    assert {p.public_key: p.allowed_ips for p in result.adds} == {key(1): (), key(2): ("10.77.0.2/32",)}
    with pytest.raises(ValidationError, match="claimed by both"):
        check_disjoint(by_key(a, b))


@pytest.mark.parametrize("kw, field", [
    ({"public_key": "short"}, "public_key"),
    ({"endpoint": "gw.example:51820"}, "endpoint"),
    ({"endpoint": "192.0.2.1"}, "endpoint"),
    ({"endpoint": "192.0.2.1:0"}, "endpoint"),
    ({"allowed_ips": ("10.77.0.300/32",)}, "allowed_ips"),
    ({"persistent_keepalive": -1}, "persistent_keepalive"),
    ({"persistent_keepalive": 70000}, "persistent_keepalive"),
])
def test_bad_peer_fields_name_the_field(kw: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        peer(1, **kw)
    assert info.value.field == field


def test_ipv6_endpoint_is_bracketed() -> None:
    p = peer(1, endpoint="[2001:db8::0001]:51820")
    assert p.endpoint == "[2001:db8::1]:51820" and p.endpoint_host_port == ("2001:db8::1", 51820)


peer_strategy = st.builds(
    lambda n, port, ka, extra: peer(n, endpoint=f"192.0.2.{n}:{port}", persistent_keepalive=ka,
                                    allowed_ips=(f"10.77.0.{n}/32",) + ((f"10.{n}.0.0/16",) if extra else ())),
    st.integers(1, 40), st.sampled_from([51820, 51821]), st.sampled_from([0, 25]), st.booleans(),
)
peer_sets = st.lists(peer_strategy, max_size=12).map(lambda ps: {p.public_key: p for p in ps})


@given(peer_sets, peer_sets)
def test_applying_the_plan_reaches_desired(desired: dict[str, Peer], actual: dict[str, Peer]) -> None:
    result = plan(desired, actual)
    state = {k: v for k, v in actual.items() if k not in result.removes}
    for u in result.updates:
        assert u.peer.public_key in actual and u.changed
        state[u.peer.public_key] = u.peer
    for p in result.adds:
        assert p.public_key not in actual
        state[p.public_key] = p
    assert state == desired
    assert plan(desired, state).empty
    untouched = desired.keys() & actual.keys() - {u.peer.public_key for u in result.updates}
    assert all(desired[k] == actual[k] for k in untouched)


def test_keepalive_delay_picks_one_end_of_each_link() -> None:
    assert keepalive_delay(key(1), key(2), 1.0) == 1.0
    assert keepalive_delay(key(2), key(1), 1.0) == 2.0


def test_hold_keepalives_adds_without_and_drops_keepalive_only_updates() -> None:
    todo = Plan(
        adds=(peer(1), peer(2)),
        updates=(PeerUpdate(peer(3), frozenset({"persistent_keepalive"})),
                 PeerUpdate(peer(4), frozenset({"persistent_keepalive", "endpoint"}))),
        removes=(key(5),),
    )
    held = {key(1): 10.0, key(3): 10.0, key(4): 10.0, key(2): 4.0}
    out = hold_keepalives(todo, held, now=5.0)
    assert out.adds == (peer(1, persistent_keepalive=0), peer(2))  # key(2)'s hold is over
    assert out.adds[0].persistent_keepalive == 0 and out.adds[1].persistent_keepalive == 25
    assert out.updates == (PeerUpdate(peer(4), frozenset({"endpoint"})),)
    assert out.removes == (key(5),)
    assert hold_keepalives(todo, held, now=11.0) == todo
