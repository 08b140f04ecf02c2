"""The coordinator's cache and views as pure functions: mesh view, deltas, resume, overview."""

from __future__ import annotations

import base64

from coordinator.fanout import Fanout
from coordinator.state import State, key
from coordinator.store import KV, Event
from coordinator.views import overview
from geomesh.model import Gateway, Region


def gw(name: str, region: str, i: int) -> Gateway:
    return Gateway(name=name, region=region, public_ip=f"192.0.2.{i}", wg_port=51820,
                   wg_public_key=base64.b64encode(bytes([i]) * 32).decode(), mesh_ip=f"10.88.0.{i}", proxy_port=8080)


def put(state: State, rev: int, *items: tuple[bytes, bytes | None]) -> None:
    state.apply_batch([Event(k, v, rev) for k, v in items])


def loaded() -> State:
    s = State()
    kvs = [KV(key("regions", "eu"), Region("eu", 50, 8, instance_subnet="10.90.2.0/24").to_json(), 1, 2),
           KV(key("regions", "us"), Region("us", 39, -77).to_json(), 1, 3)]
    for i, (name, region) in enumerate([("a", "eu"), ("b", "eu"), ("c", "us")], start=1):
        kvs.append(KV(key("gateways", name), gw(name, region, i).to_json(), 4, 4 + i))
    s.load(10, kvs)
    return s


def test_mesh_view_excludes_self_and_routes_region_subnet_once():
    s = loaded()
    f = Fanout(s)
    snap = f.mesh_update(s.changes_since(-1), "c")
    assert snap.snapshot and [p.name for p in snap.upserts] == ["a", "b"]
    # eu's subnet rides on its first gateway only, and only towards other regions
    assert [list(p.allowed_ips) for p in snap.upserts] == [["10.88.0.1/32", "10.90.2.0/24"], ["10.88.0.2/32"]]
    from_a = f.mesh_update(s.changes_since(-1), "a")
    assert [list(p.allowed_ips) for p in from_a.upserts] == [["10.88.0.2/32"], ["10.88.0.3/32"]]


def test_join_costs_one_peer_and_resume_coalesces():
    s = loaded()
    f = Fanout(s)
    put(s, 11, (key("gateways", "d"), gw("d", "us", 4).to_json()))
    delta = s.changes_since(10)
    mesh = f.mesh_update(delta, "a")
    assert not mesh.snapshot and [p.name for p in mesh.upserts] == ["d"]  # one peer per join
    assert f.mesh_update(delta, "d").upserts == []  # the joiner gets its peers from its snapshot
    # a join that takes over a region's subnet (name sorts first) also re-sends the old carrier
    put(s, 12, (key("gateways", "0a"), gw("0a", "eu", 9).to_json()))
    moved = f.mesh_update(s.changes_since(11), "c", since=11)
    assert [(p.name, list(p.allowed_ips)[1:]) for p in moved.upserts] == [("0a", ["10.90.2.0/24"]), ("a", [])]
    # memoised per revision range and region: the same object for every viewer of that region
    assert f.mesh_update(s.changes_since(11), "d", since=11) is moved
    put(s, 13, (key("gateways", "0a"), None))
    # several changes after a revision coalesce into one message with the latest values
    put(s, 14, (key("alive", "a"), b"1"))
    put(s, 15, (key("gateways", "d"), None))
    routing = f.routing_update(s.changes_since(10))
    assert routing.revision == 15 and not routing.snapshot
    assert [r.gateway.name for r in routing.upserts] == ["a"] and routing.upserts[0].gateway.alive
    assert sorted(k.name for k in routing.removals) == ["0a", "d"]
    # nothing after the current revision; the future or before the floor: snapshot
    assert f.routing_update(s.changes_since(15)).upserts == []
    assert s.changes_since(9).routing is None and s.changes_since(99).routing is None


def test_overview_counts_links_without_listing_the_full_mesh():
    s = loaded()
    put(s, 11, (key("alive", "a"), b"1"), (key("alive", "b"), b"1"))
    ov = overview(s.snapshot())
    assert (ov.links_total, ov.links_up) == (3, 1)
    assert sorted((link.a, link.b) for link in ov.links) == [("a", "c"), ("b", "c")]
    eu = next(r for r in ov.regions if r.region.name == "eu")
    assert (eu.gateways, eu.gateways_alive) == (2, 2)


def test_foreign_or_corrupt_values_are_ignored_not_fatal():
    s = loaded()
    put(s, 11, (key("regions", "bad"), b"{not json"), (b"/other/prefix/x", b"1"))
    assert "bad" not in s.regions and s.revision == 11


def test_a_challenge_txt_record_rides_the_routing_feed_and_its_removal_too():
    from geomesh.model import TxtRecord
    from geomesh.routing_table import RoutingTable

    s = loaded()
    f = Fanout(s)
    table = RoutingTable().apply(f.routing_update(s.changes_since(-1)))
    assert dict(table.txt) == {}
    rec = TxtRecord("_acme-challenge.geo.example.com", ("tok-1", "tok-2"), ttl=5)
    put(s, 11, (key("txt", rec.name), rec.to_json()))
    update = f.routing_update(s.changes_since(10))
    assert not update.snapshot and [u.WhichOneof("kind") for u in update.upserts] == ["txt"]
    table = table.apply(update)
    assert table.txt[rec.name] == rec
    put(s, 12, (key("txt", rec.name), None))
    table = table.apply(f.routing_update(s.changes_since(11)))
    assert rec.name not in table.txt
    # a snapshot carries it as well
    put(s, 13, (key("txt", rec.name), rec.to_json()))
    assert RoutingTable().apply(f.routing_update(s.changes_since(-1))).txt[rec.name].values == ("tok-1", "tok-2")


def test_a_txt_record_that_breaks_the_rules_is_refused_naming_the_field():
    import pytest

    from geomesh.errors import ValidationError
    from geomesh.model import TxtRecord

    for bad, field in [(dict(values=()), "values"), (dict(values=("x" * 256,)), "values[0]"),
                       (dict(values=("ok",), ttl=-1), "ttl"), (dict(name="nodot", values=("ok",)), "name")]:
        args = {"name": "_acme-challenge.geo.example.com", **bad}
        with pytest.raises(ValidationError) as info:
            TxtRecord(**args)
        assert info.value.field == field
