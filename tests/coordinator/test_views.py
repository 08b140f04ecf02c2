"""Table tests of the coordinator's views on hand-built snapshots: no etcd, no State.

Each case is gateways and regions in, the peers / update / carrier / overview out."""

from __future__ import annotations

import base64
from types import MappingProxyType

import pytest

from coordinator import views
from coordinator.reach_keys import ReachRecord
from coordinator.snapshot import Delta, Snapshot
from geomesh.api import geomesh_pb2 as pb
from geomesh.model import App, Gateway, GatewayState, Instance, Region, SessionState

K = pb.ResourceKey


def gw(name: str, region: str, i: int, *, mesh_ip: str | None = None, state: GatewayState = GatewayState.ACTIVE) -> Gateway:
    return Gateway(name=name, region=region, public_ip=f"192.0.2.{i}", wg_port=51820,
                   wg_public_key=base64.b64encode(bytes([i]) * 32).decode(),
                   mesh_ip=f"10.88.0.{i}" if mesh_ip is None else mesh_ip, proxy_port=8080, state=state)


EU = Region("eu", 50, 8, instance_subnet="10.90.2.0/24")
US = Region("us", 39, -77, instance_subnet="10.90.3.0/24")
AP = Region("ap", 1, 103)  # no instance subnet


def snap(*gateways: Gateway, regions: tuple[Region, ...] = (EU, US, AP), revision: int = 10,
         alive: dict[str, SessionState] | None = None, reach: dict[str, ReachRecord] | None = None,
         apps: tuple[App, ...] = (), instances: tuple[Instance, ...] = ()) -> Snapshot:
    return Snapshot(revision, regions=MappingProxyType({r.name: r for r in regions}),
                    gateways=MappingProxyType({g.name: g for g in gateways}),
                    apps=MappingProxyType({a.name: a for a in apps}),
                    instances=MappingProxyType({i.key: i for i in instances}),
                    sessions=MappingProxyType(alive or {}), reach=MappingProxyType(reach or {}))


@pytest.mark.parametrize(("names", "carrier"), [
    ([], None),
    (["b"], "b"),
    (["b", "a", "c"], "a"),
    (["gw-10", "gw-9"], "gw-10"),  # by name, not by number
])
def test_subnet_carrier_is_the_first_gateway_by_name(names, carrier):
    assert views.subnet_carrier(names) == carrier


MESH = (gw("a", "eu", 1), gw("b", "eu", 2), gw("c", "us", 3), gw("d", "ap", 4), gw("e", "eu", 5, mesh_ip=""))


@pytest.mark.parametrize(("peer", "viewer_region", "allowed"), [
    ("a", "us", ["10.88.0.1/32", "10.90.2.0/24"]),  # eu's carrier, seen from another region
    ("a", None, ["10.88.0.1/32", "10.90.2.0/24"]),  # a viewer with no record yet
    ("a", "eu", ["10.88.0.1/32"]),                  # never towards its own region
    ("b", "us", ["10.88.0.2/32"]),                  # not the carrier: its own address only
    ("c", "eu", ["10.88.0.3/32", "10.90.3.0/24"]),
    ("d", "eu", ["10.88.0.4/32"]),                  # ap has no instance subnet
    ("e", "us", None),                              # no mesh address yet: not a peer
    ("zz", "us", None),                             # not registered
])
def test_mesh_peer_allowed_ips(peer, viewer_region, allowed):
    got = views.mesh_peer(snap(*MESH), peer, viewer_region)
    assert (None if got is None else list(got.allowed_ips)) == allowed


def test_mesh_peer_carries_ports_endpoint_and_the_reach_verdict():
    s = snap(*MESH, reach={"c": ReachRecord(unreachable=True)})
    c = views.mesh_peer(s, "c", "eu")
    assert c is not None and c.unreachable and c.endpoint == "192.0.2.3:51820" and c.proxy_port == 8080
    assert not views.mesh_peer(s, "a", "us").unreachable  # type: ignore[union-attr]


def test_ipv6_mesh_address_is_a_host_route():
    s = snap(gw("a", "ap", 1, mesh_ip="fd00::1"))
    assert list(views.mesh_peer(s, "a", "eu").allowed_ips) == ["fd00::1/128"]  # type: ignore[union-attr]


@pytest.mark.parametrize(("mesh", "viewer_region", "upserts", "removals", "snapshot"), [
    (None, "us", ["a", "b", "c", "d"], [], True),     # snapshot: every gateway with a mesh address
    (frozenset(), "us", [], [], False),                # nothing changed
    (frozenset({"c", "gone"}), "eu", ["c"], ["gone"], False),
    (frozenset({"e"}), "eu", [], ["e"], False),        # lost its address: removed as a peer
])
def test_mesh_update(mesh, viewer_region, upserts, removals, snapshot):
    update = views.mesh_update(snap(*MESH), Delta(10, frozenset(), mesh), viewer_region)
    assert ([p.name for p in update.upserts], list(update.removals), update.snapshot) == (upserts, removals, snapshot)
    assert update.revision == 10


@pytest.mark.parametrize(("viewer", "upserts", "removals", "same"), [
    ("x", ["a", "b"], ["r"], True),  # not in it: the shared object itself
    ("a", ["b"], ["r"], False),
    ("r", ["a", "b"], [], False),
])
def test_without_viewer(viewer, upserts, removals, same):
    shared = pb.MeshUpdate(revision=3, upserts=[pb.MeshPeer(name="a"), pb.MeshPeer(name="b")], removals=["r"])
    out = views.without_viewer(shared, viewer)
    assert ([p.name for p in out.upserts], list(out.removals), out is shared) == (upserts, removals, same)


def test_routing_update_delta_and_snapshot():
    s = snap(gw("a", "eu", 1), alive={"a": SessionState.OPEN}, apps=(App("shop"),))
    delta = views.routing_update(s, Delta(10, frozenset({(K.KIND_GATEWAY, "a"), (K.KIND_APP, "gone"),
                                                          (K.KIND_REGION, "eu")}), frozenset()))
    assert not delta.snapshot and delta.revision == 10
    assert [u.WhichOneof("kind") for u in delta.upserts] == ["region", "gateway"]
    assert delta.upserts[1].gateway.alive  # the gateway joined with its session
    assert [(r.kind, r.name) for r in delta.removals] == [(K.KIND_APP, "gone")]
    full = views.routing_update(s, Delta(10, None, None))
    assert full.snapshot and full.revision == 10
    assert views.table(s) is views.table(s)  # built once per snapshot


def test_gateway_view_joins_session_and_reach():
    s = snap(gw("a", "eu", 1), gw("b", "eu", 2), alive={"a": SessionState.TIMED_OUT},
             reach={"b": ReachRecord(unreachable=True)})
    a, b = s.gateway("a"), s.gateway("b")
    assert a is not None and a.alive and a.session is SessionState.TIMED_OUT and not a.unreachable
    assert b is not None and not b.alive and b.session is SessionState.CLOSED and b.unreachable
    assert s.gateway("zz") is None


def test_overview_counts_and_bounded_dead_links():
    s = snap(gw("a", "eu", 1), gw("b", "eu", 2, state=GatewayState.DRAINING), gw("c", "us", 3),
             alive={"a": SessionState.OPEN, "b": SessionState.OPEN},
             instances=(Instance(app="shop", id="i1", region="eu", address="10.90.2.5", port=80, healthy=True),),
             apps=(App("shop"),))
    ov = views.overview(s)
    assert (ov.revision, ov.apps, ov.links_total, ov.links_up) == (10, 1, 3, 1)
    assert sorted((link.a, link.b) for link in ov.links) == [("a", "c"), ("b", "c")]
    eu = next(r for r in ov.regions if r.region.name == "eu")
    assert (eu.gateways, eu.gateways_alive, eu.gateways_draining, eu.instances, eu.instances_healthy) == (2, 2, 1, 1, 1)
    assert [g.name for g in ov.gateways] == ["a", "b", "c"] and ov.gateways[1].draining
    many = snap(*(gw(f"g{i:03}", "eu", i % 250 + 1) for i in range(60)))  # none alive: 1770 dead pairs
    assert len(views.overview(many).links) == views.MAX_OVERVIEW_LINKS


def test_snapshot_of_the_mirror_does_not_change_after_later_writes():
    from coordinator.state import State, key
    from coordinator.store import Event
    state = State()
    state.apply_batch([Event(key("gateways", "a"), gw("a", "eu", 1).to_json(), 5)])
    before = state.snapshot()
    assert state.snapshot() is before  # one per revision
    state.apply_batch([Event(key("gateways", "b"), gw("b", "eu", 2).to_json(), 6),
                       Event(key("alive", "a"), b"1", 6)])
    after = state.snapshot()
    assert list(before.gateways) == ["a"] and not before.alive("a") and before.revision == 5
    assert sorted(after.gateways) == ["a", "b"] and after.alive("a") and after.revision == 6
    assert after.regions is before.regions  # an untouched directory shares its copy
    with pytest.raises(TypeError):
        before.gateways["x"] = gw("x", "eu", 9)  # type: ignore[index]


def test_fanout_shares_one_message_per_revision_and_forgets_it_at_the_next():
    from coordinator.fanout import Fanout
    from coordinator.state import State, key
    from coordinator.store import Event
    state = State()
    feed = Fanout(state)
    state.apply_batch([Event(key("regions", "eu"), EU.to_json(), 5),
                       Event(key("gateways", "a"), gw("a", "eu", 1).to_json(), 5),
                       Event(key("gateways", "c"), gw("c", "us", 3).to_json(), 5)])
    first = feed.routing_wire(feed.changes_since(-1), since=-1)
    assert feed.routing_wire(feed.changes_since(99), since=99) is first  # every snapshot of a revision: one bytes
    assert feed.mesh_update(feed.changes_since(-1), "a", since=-1) is not None
    us_1 = feed.mesh_update(feed.changes_since(-1), "c", since=-1)
    assert [p.name for p in us_1.upserts] == ["a"]  # the viewer left out of the shared region message
    state.apply_batch([Event(key("gateways", "b"), gw("b", "eu", 2).to_json(), 6)])
    assert feed.routing_wire(feed.changes_since(-1), since=-1) is not first  # a new revision, a new message
    delta = feed.mesh_update(feed.changes_since(5), "c", since=5)
    assert [p.name for p in delta.upserts] == ["b"] and delta.revision == 6
