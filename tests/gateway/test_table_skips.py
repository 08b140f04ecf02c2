"""One bad routing-table entry never blocks a region's routing (issue 13): the data plane skips it,
counts it in `geomesh_gateway_table_entries_skipped_total{kind,reason}` and applies the rest."""

from __future__ import annotations

from prometheus_client import REGISTRY

from geomesh.model import App, Domain, Gateway, Instance, Region
from geomesh.routing_table import RoutingTable
from regional_gateway.proxy.routes import SkippedEntry, checked_routes_from_table, routes_from_table

ZONE = "geo.test"
KEY = "q" * 43 + "="


def _forged(inst: Instance, **values: object) -> Instance:
    """A record as an older coordinator could have sent it (the model would refuse it now)."""
    for name, value in values.items():
        object.__setattr__(inst, name, value)
    return inst


def _table(*extra: object) -> RoutingTable:
    return RoutingTable.from_resources(9, [
        Region("eu", 48.86, 2.35), Region("us", 40.7, -74.0),
        Gateway("gw-eu", "eu", "192.0.2.1", 51820, KEY, "10.9.0.1", 8080, alive=True),
        Gateway("gw-us", "us", "192.0.2.2", 51820, KEY, "10.9.0.2", 8080, alive=True),
        App("web"), App("shop"), App("i9"),
        Instance("web", "w1", "eu", "10.1.0.1", 8000),
        Instance("shop", "s1", "eu", "10.1.0.5", 8000),
        Instance("shop", "s2", "us", "10.2.0.5", 8000),
        Domain("www.shop.example", "shop", verified=True),
        Domain("pending.shop.example", "shop"),  # its TXT record not seen yet: not routed
        *extra,  # type: ignore[list-item]
    ])


def _skipped(kind: str, reason: str) -> float:
    return REGISTRY.get_sample_value("geomesh_gateway_table_entries_skipped_total",
                                     {"kind": kind, "reason": reason}) or 0.0


def test_a_clean_table_skips_nothing():
    routes, skipped = checked_routes_from_table(_table(), region="eu", zone=ZONE, self_name="gw-eu")
    assert skipped == ()
    assert set(routes.instances) == {"w1", "s1"}


def test_bad_entries_are_skipped_and_the_rest_applies():
    table = _table(
        Instance("shop", "w1", "eu", "10.1.0.9", 8000),   # id w1 is web's in eu already
        Instance("web", "i9", "eu", "10.1.0.10", 8000),   # id equal to the app i9
        _forged(Instance("web", "w3", "eu", "10.1.0.11", 8000), address="fe80::1%eth0"),  # probe finding 7
        Instance("web", "s1", "us", "10.2.0.9", 8000),    # an id of eu used in another region is fine
        Instance("web", "w2", "eu", "10.1.0.2", 8000),    # a good change next to the bad ones
    )
    routes, skipped = checked_routes_from_table(table, region="eu", zone=ZONE, self_name="gw-eu")
    assert sorted((s.kind, s.name, s.reason) for s in skipped) == [
        ("instance", "web/i9", "id_is_app_name"),
        ("instance", "web/w1", "duplicate_id"),  # the first by "<app>/<id>" keeps the id
        ("instance", "web/w3", "invalid"),
    ]
    assert {i: r.app for i, r in routes.instances.items()} == {"w1": "shop", "w2": "web", "s1": "shop"}
    assert [b.instance_id for b in routes.apps["web"].backends] == ["w2"]
    assert routes.domains["www.shop.example"].app == "shop"
    assert "pending.shop.example" not in routes.domains
    assert routes.regions[0].name == "us" and "s1" in routes.regions[0].instances
    assert all(isinstance(s, SkippedEntry) and s.detail for s in skipped)


def test_the_agent_entry_point_counts_every_skip_and_still_returns_routes():
    table = _table(Instance("shop", "w1", "eu", "10.1.0.9", 8000))
    before = _skipped("instance", "duplicate_id")
    routes = routes_from_table(table, region="eu", zone=ZONE, self_name="gw-count")
    routes = routes_from_table(table, region="eu", zone=ZONE, self_name="gw-count")
    assert _skipped("instance", "duplicate_id") == before + 2
    assert routes.instances["w1"].app == "shop" and routes.instances["s1"].app == "shop"


def test_a_remote_gateway_the_data_plane_refuses_is_skipped():
    gw = Gateway("gw-us-2", "us", "192.0.2.3", 51820, KEY, "10.9.0.3", 8080, alive=True)
    object.__setattr__(gw, "mesh_ip", "10.9.0.3%x")
    routes, skipped = checked_routes_from_table(_table(gw), region="eu", zone=ZONE, self_name="gw-eu")
    assert [(s.kind, s.name, s.reason) for s in skipped] == [("gateway", "gw-us-2", "invalid")]
    assert [g.name for g in routes.regions[0].gateways] == ["gw-us"]
