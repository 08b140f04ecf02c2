"""The view: built from a routing table (same rules as RoutingTable's queries) or from a static
state file (every mistake named by its key)."""

from __future__ import annotations

import base64
import dataclasses
import tomllib
from pathlib import Path

import pytest

from geodns import static_state
from geodns.view import View, ZoneConfig
from geomesh.model import App, Gateway, GatewayState, Instance, Region
from geomesh.routing_table import RoutingTable

from .conftest import state_toml

ZONE = ZoneConfig("geo.example.com")


def key(i: int) -> str:
    return base64.b64encode(i.to_bytes(32, "big")).decode()


def table() -> RoutingTable:
    regions = [Region("eu", 50.1, 8.7), Region("us", 39.0, -77.5), Region("ap", 1.3, 103.8)]
    gws = [
        Gateway("eu-b", "eu", "192.0.2.2", 51820, key(1), "10.88.0.2", 8080, alive=True),
        Gateway("eu-a", "eu", "192.0.2.1", 51820, key(2), "10.88.0.1", 8080, public_ipv6="2001:db8::1", alive=True),
        Gateway("eu-c", "eu", "192.0.2.3", 51820, key(3), "10.88.0.3", 8080, state=GatewayState.DRAINING, alive=True),
        Gateway("us-a", "us", "192.0.2.10", 51820, key(4), "10.88.0.10", 8080, alive=False),
        Gateway("ap-a", "ap", "192.0.2.20", 51820, key(5), "10.88.0.20", 8080, alive=True),
    ]
    apps = [App("web"), App("pin", pinned_regions=("us",)), App("idle")]
    insts = [Instance("web", "i1", "eu", "10.0.0.1", 80), Instance("web", "i2", "us", "10.0.0.2", 80),
             Instance("web", "i3", "ap", "10.0.0.3", 80, healthy=False),
             Instance("pin", "p1", "eu", "10.0.0.4", 80), Instance("pin", "p2", "us", "10.0.0.5", 80)]
    return RoutingTable.from_resources(42, [*regions, *gws, *apps, *insts])


def test_view_from_table_follows_the_tables_rules() -> None:
    t = table()
    view = View.from_table(t, ZONE)
    assert view.revision == 42 and view.serial == 42 and view.ready
    for name in t.regions:
        gws = t.gateways_in(name)
        assert view.regions[name].ipv4 == tuple(g.public_ip for g in gws)
        assert view.regions[name].ipv6 == tuple(g.public_ipv6 for g in gws if g.public_ipv6)
    for name in t.apps:
        assert view.apps[name].hosting == frozenset(t.hosting_regions(name))
    assert view.regions["eu"].ipv4 == ("192.0.2.1", "192.0.2.2")  # sorted by gateway name, draining out
    assert not view.regions["us"].healthy  # its gateway is not alive
    assert view.apps["pin"].hosting == {"us"} and view.apps["pin"].pinned == ("us",)
    assert view.apps["idle"].hosting == frozenset()


def test_unreachable_gateways_leave_the_answer_but_stay_the_fail_open_set() -> None:
    """`reachable_routable` decides what DNS answers; every routable gateway stays the fallback."""
    t = table()
    eu_a = dataclasses.replace(t.gateways["eu-a"], unreachable=True)
    t = RoutingTable.from_resources(43, [*t.regions.values(), *(t.gateways | {"eu-a": eu_a}).values(),
                                         *t.apps.values(), *t.instances.values()])
    eu = View.from_table(t, ZONE).regions["eu"]
    assert eu.ipv4 == ("192.0.2.2",) and eu.ipv6 == () and eu.healthy
    assert eu.routable_ipv4 == ("192.0.2.1", "192.0.2.2") and eu.routable_ipv6 == ("2001:db8::1",)
    assert eu.addresses(4) == (("192.0.2.2",), False)
    assert eu.addresses(6) == (("2001:db8::1",), True)  # the only AAAA gateway is unreachable: fail-open
    ap_a = dataclasses.replace(t.gateways["ap-a"], unreachable=True)
    ap = View.from_table(RoutingTable.from_resources(44, [*t.regions.values(), ap_a]), ZONE).regions["ap"]
    assert not ap.healthy and ap.routable and ap.addresses(4) == (("192.0.2.20",), True)
    # a dead or draining gateway is not even a fail-open candidate
    assert not View.from_table(t, ZONE).regions["us"].routable


def test_static_state_reachable_flag(tmp_path: Path) -> None:
    p = tmp_path / "state.toml"
    p.write_text("[zone]\nname = 'geo.example.com'\n[[regions]]\nname = 'eu'\nlatitude = 1\nlongitude = 0\n"
                 "gateways = [{ name = 'a', ipv4 = '192.0.2.1', reachable = false },\n"
                 "            { name = 'b', ipv4 = '192.0.2.2', reachable = true },\n"
                 "            { name = 'c', ipv4 = '192.0.2.3', reachable = false, state = 'draining' }]\n")
    eu = static_state.load(p).regions["eu"]
    assert eu.ipv4 == ("192.0.2.2",) and eu.routable_ipv4 == ("192.0.2.1", "192.0.2.2")
    p.write_text("[zone]\nname = 'geo.example.com'\n[[regions]]\nname = 'eu'\nlatitude = 1\nlongitude = 0\n"
                 "gateways = [{ name = 'a', ipv4 = '192.0.2.1', reachable = 'no' }]\n")
    with pytest.raises(static_state.StateError, match=r"regions\[0\]\.gateways\[0\]\.reachable: must be true or false"):
        static_state.load(p)


def test_empty_view_is_not_ready() -> None:
    v = View.empty(ZONE)
    assert not v.ready and not v.regions and v.zone.soa_mname == "ns1.geo.example.com"


def test_static_state_file_loads(tmp_path: Path) -> None:
    p = tmp_path / "state.toml"
    p.write_text(state_toml())
    view = static_state.load(p)
    assert view.zone.name == "geo.example.com" and view.zone.negative_ttl == 60
    assert view.regions["eu-central"].ipv4 == ("192.0.2.20",)  # eu-2 drains
    assert view.apps["pinned"].pinned == ("eu-central",) and view.apps["pinned"].hosting == frozenset()
    over = static_state.load(p, {"name": "other.example.net", "ttl": 5})
    assert over.zone.name == "other.example.net" and over.zone.ttl == 5


@pytest.mark.parametrize("change, field", [
    ("[zone]\nname = 'geo.example.com'\ncolour = 'red'\n", "zone: unknown key(s) colour"),
    ("[zone]\nttl = 30\n", "zone.name: is required"),
    ("[zone]\nname = 'geo.example.com'\nttl = -1\n", "zone.ttl"),
    ("[zone]\nname = 'geo.example.com'\ndefault_region = 'mars'\n", "zone.default_region"),
    ("[zone]\nname = 'geo.example.com'\nnameservers = ['ns1=not-an-ip']\n", "zone.nameservers[0]"),
    ("[zone]\nname = 'geo.example.com'\n[[regions]]\nname = 'eu'\nlatitude = 91\nlongitude = 0\n",
     "regions[0].latitude"),
    ("[zone]\nname = 'geo.example.com'\n[[regions]]\nname = 'eu'\nlatitude = 1\nlongitude = 0\n"
     "gateways = [{ name = 'g', ipv4 = '2001:db8::1' }]\n", "regions[0].gateways[0].ipv4"),
    ("[zone]\nname = 'geo.example.com'\n[[regions]]\nname = 'eu'\nlatitude = 1\nlongitude = 0\n"
     "gateways = [{ name = 'g' }]\n", "regions[0].gateways[0]: needs ipv4"),
    ("[zone]\nname = 'geo.example.com'\n[[regions]]\nname = 'eu'\nlatitude = 1\nlongitude = 0\n"
     "gateways = [{ name = 'g', ipv4 = '192.0.2.1', state = 'asleep' }]\n", "regions[0].gateways[0].state"),
    ("[zone]\nname = 'geo.example.com'\n[[apps]]\nname = 'web'\nregions = ['mars']\n", "apps[0].regions[0]"),
    ("[zone]\nname = 'geo.example.com'\n[[apps]]\nname = 'Web'\n", "apps[0].name"),
    ("[zone]\nname = 'geo.example.com'\n[[apps]]\nname = 'web'\n[[apps]]\nname = 'web'\n", "apps[1].name"),
    ("zone = 3\n", "zone: must be a table"),
    ("[zone\n", "is not valid TOML"),
])
def test_static_state_errors_name_the_key(tmp_path: Path, change: str, field: str) -> None:
    p = tmp_path / "state.toml"
    p.write_text(change)
    with pytest.raises(static_state.StateError) as err:
        static_state.load(p)
    assert field in str(err.value) and str(p) in str(err.value)


def test_missing_state_file(tmp_path: Path) -> None:
    with pytest.raises(static_state.StateError, match="cannot read"):
        static_state.load(tmp_path / "nope.toml")


def test_view_from_parsed_data_uses_the_serial() -> None:
    data = tomllib.loads(state_toml(extra_zone="serial = 2024060101"))
    assert static_state.view_from(data, revision=5).serial == 2024060101


def test_regions_compare_equal_across_an_update_that_leaves_the_gateways() -> None:
    """`Responder.set_view` keeps templates only when the new view's regions equal the old one's:
    views built from two tables that differ in instances and apps must compare equal there, and
    a gateway's change must not."""
    t = table()
    before = View.from_table(t, ZONE)
    resources = [*t.regions.values(), *t.gateways.values(), *t.apps.values(), App("new"),
                 *(dataclasses.replace(i, healthy=True) for i in t.instances.values())]
    apps_only = View.from_table(RoutingTable.from_resources(43, resources), ZONE)
    assert apps_only.apps != before.apps and apps_only.regions == before.regions
    drained = [dataclasses.replace(g, state=GatewayState.DRAINING) if g.name == "eu-a" else g
               for g in t.gateways.values()]
    gateway_changed = View.from_table(RoutingTable.from_resources(44, [*t.regions.values(), *drained,
                                                                       *t.apps.values(), *t.instances.values()]), ZONE)
    assert gateway_changed.regions != before.regions
