"""Pure: host names to targets, the routes file's validation (errors name the field), the routing table
to `Routes`, cross-region candidates."""

from __future__ import annotations

from pathlib import Path

import pytest

from geomesh.errors import ValidationError
from geomesh.model import App, Domain, Gateway, Instance, LbPolicy, Region
from geomesh.routing_table import RoutingTable
from regional_gateway.proxy.cross_region import candidate_regions
from regional_gateway.proxy.hostnames import Mode, NameMatch, UnknownName, normalize_host, resolve
from regional_gateway.proxy.routes import HealthCheck, routes_from_table
from regional_gateway.proxy.routes_file import parse_routes

ZONE = "apps.test"
BASE = {
    "zone": ZONE, "region": "eu", "latitude": 48.86, "longitude": 2.35,
    "apps": [{"name": "shop", "backends": ["10.0.0.1:80", {"address": "10.0.0.2", "port": 80, "id": "shop-b"}],
              "ports": [8080, 50051, 9000]},
             {"name": "api-2", "backends": ["10.0.0.3:80"], "ports": [80, 8443]}],
    "domains": [{"fqdn": "www.shop.example", "app": "shop"},
                {"fqdn": "secure.shop.example", "app": "shop", "port": 443, "passthrough": True}],
    "regions": [{"name": "us", "latitude": 40.7, "longitude": -74.0, "apps": ["remote", "shop"],
                 "instances": ["remote-1"], "gateways": [{"name": "gw-us", "mesh_ip": "10.9.0.2", "proxy_port": 8080}]},
                {"name": "ap", "latitude": 35.7, "longitude": 139.7, "apps": ["remote"],
                 "gateways": [{"name": "gw-ap", "mesh_ip": "10.9.0.3", "proxy_port": 8080}]},
                {"name": "empty", "latitude": 0, "longitude": 0, "apps": ["remote"]}],
}


def routes(**over):
    routes, _ = parse_routes({**BASE, **over}, Path("/"))
    return routes


@pytest.mark.parametrize("host,want", [
    (f"shop.{ZONE}", NameMatch("shop")),
    (f"shop-8080.{ZONE}", NameMatch("shop", 8080)),
    (f"shop-443s.{ZONE}", NameMatch("shop", 443, Mode.PASSTHROUGH)),
    (f"shop-50051g.{ZONE}", NameMatch("shop", 50051, Mode.H2)),
    (f"shop-b.{ZONE}", NameMatch("shop", 0, Mode.HTTP, "shop-b")),
    (f"shop-b-9000.{ZONE}", NameMatch("shop", 9000, Mode.HTTP, "shop-b")),
    (f"api-2.{ZONE}", NameMatch("api-2")),  # an app named like the port form wins
    (f"api-2-8443.{ZONE}", NameMatch("api-2", 8443)),
    (f"remote.{ZONE}", NameMatch("remote")),  # known only in other regions
    (f"remote-1.{ZONE}", NameMatch("", 0, Mode.HTTP, "remote-1")),
    ("www.shop.example", NameMatch("shop")),
    ("secure.shop.example", NameMatch("shop", 443, Mode.PASSTHROUGH)),
])
def test_name_forms(host, want):
    assert resolve(routes(), normalize_host(host)) == want


@pytest.mark.parametrize("host,reason", [
    (f"nope.{ZONE}", "no app or instance named 'nope'"),
    (f"nope-80.{ZONE}", "no app or instance named 'nope'"),
    (f"api-2-9000.{ZONE}", "does not expose port 9000"),
    (f"shop-0.{ZONE}", "outside 1-65535"),
    (f"shop-70000.{ZONE}", "outside 1-65535"),
    (f"x.shop.{ZONE}", "more than one label"),
    (ZONE, "not under the zone"),
    (f"x{ZONE}", "not under the zone"),
    ("example.org", "not under the zone"),
    ("", "no host name"),
])
def test_unknown_names(host, reason):
    got = resolve(routes(), normalize_host(host))
    assert isinstance(got, UnknownName) and reason in got.reason


def test_normalize_host():
    assert normalize_host("Shop.Apps.Test.:8080") == "shop.apps.test"
    assert normalize_host("[::1]:80") == "[::1]"
    assert normalize_host("  a.b ") == "a.b"


def test_regions_sorted_nearest_first_and_candidates():
    r = routes()
    assert [x.name for x in r.regions] == ["empty", "us", "ap"]  # (0,0) is nearer to Paris than New York
    assert [x.name for x in candidate_regions(r, NameMatch("remote"))] == ["us", "ap"]  # no gateway: skipped
    assert [x.name for x in candidate_regions(r, NameMatch("", 0, Mode.HTTP, "remote-1"))] == ["us"]
    assert candidate_regions(r, NameMatch("shop", 0, Mode.HTTP, "shop-b")) == ()  # a local instance stays local
    assert candidate_regions(r, NameMatch("nothing")) == ()


@pytest.mark.parametrize("change,field", [
    ({"zone": "not a zone"}, "zone"),
    ({"zone": None}, "zone"),
    ({"colour": "blue"}, "colour"),
    ({"apps": [{"name": "Shop"}]}, "apps[0].name"),
    ({"apps": [{"backends": []}]}, "apps[0].name"),
    ({"apps": [{"name": "a", "lb": "random"}]}, "apps[0].lb"),
    ({"apps": [{"name": "a", "backends": ["10.0.0.1"]}]}, "apps[0].backends[0]"),
    ({"apps": [{"name": "a", "backends": ["300.0.0.1:80"]}]}, "apps[0].backends[0].address"),
    ({"apps": [{"name": "a", "backends": [{"address": "10.0.0.1"}]}]}, "apps[0].backends[0].port"),
    ({"apps": [{"name": "a", "backends": ["10.0.0.1:80", "10.0.0.1:80"]}]}, "apps[0].backends[1]"),
    ({"apps": [{"name": "a", "ports": [0]}]}, "apps[0].ports[0]"),
    ({"apps": [{"name": "a", "proxy_protocol": "yes"}]}, "apps[0].proxy_protocol"),
    ({"apps": [{"name": "a", "health": {"check": "icmp"}}]}, "apps[0].health.check"),
    ({"apps": [{"name": "a", "health": {"interval": 0}}]}, "apps[0].health.interval"),
    ({"apps": [{"name": "a", "health": {"rise": 0}}]}, "apps[0].health.rise"),
    ({"apps": [{"name": "a", "health": {"path": "no-slash"}}]}, "apps[0].health.path"),
    ({"apps": [{"name": "a"}, {"name": "a"}]}, "apps[1].name"),
    ({"health": {"fall": "two"}}, "health.fall"),
    ({"domains": [{"fqdn": "x.example", "app": "ghost"}]}, "domains[0].app"),
    ({"domains": [{"fqdn": "shop.apps.test", "app": "shop"}]}, "domains[0].fqdn"),
    ({"domains": [{"fqdn": "x.example", "app": "shop", "passthrough": True}]}, "domains[0].port"),
    ({"domains": [{"app": "shop"}]}, "domains[0].fqdn"),
    ({"certificates": [{"cert": "/nonexistent.pem", "key": "/nonexistent.key"}]}, "certificates[0]"),
    ({"certificates": [{"cert": "x.pem"}]}, "certificates[0].key"),
    ({"regions": [{"name": "us", "latitude": 100, "longitude": 0}]}, "regions[0].latitude"),
    ({"regions": [{"name": "us", "latitude": 1, "longitude": 0, "gateways": [{"name": "g", "mesh_ip": "x",
                                                                              "proxy_port": 1}]}]},
     "regions[0].gateways[0].mesh_ip"),
    ({"regions": [{"name": "eu", "latitude": 1, "longitude": 0}]}, "regions"),
    ({"latitude": 10, "longitude": None}, "latitude"),
    ({"server": {"nope": 1}}, "server.nope"),
])
def test_routes_file_errors_name_the_field(change, field):
    data = {**BASE, **change}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(ValidationError) as info:
        parse_routes(data, Path("/"))
    assert info.value.field == field, str(info.value)


def test_routes_from_the_coordinator_table():
    key = "A" * 43 + "="
    table = RoutingTable.from_resources(7, [
        Region("eu", 48.86, 2.35), Region("us", 40.7, -74.0), Region("ap", 35.7, 139.7), Region("sa", -23.5, -46.6),
        Gateway("gw-eu", "eu", "192.0.2.1", 51820, key, "10.9.0.1", 8080, alive=True),
        Gateway("gw-us", "us", "192.0.2.2", 51820, key, "10.9.0.2", 8080, alive=True),
        Gateway("gw-us-dead", "us", "192.0.2.3", 51820, key, "10.9.0.3", 8080, alive=False),
        Gateway("gw-ap", "ap", "192.0.2.4", 51820, key, "10.9.0.4", 8081, alive=True),
        App("shop", LbPolicy.IP_HASH), App("pinned", pinned_regions=("ap",)), App("solo"),
        Instance("shop", "shop-eu-1", "eu", "10.1.0.1", 8000),
        Instance("shop", "shop-eu-2", "eu", "10.1.0.2", 8000, healthy=False),
        Instance("shop", "shop-us-1", "us", "10.2.0.1", 8000),
        Instance("pinned", "pinned-us-1", "us", "10.2.0.2", 8000),
        Instance("pinned", "pinned-ap-1", "ap", "10.3.0.2", 8000),
        Instance("solo", "solo-sa-1", "sa", "10.4.0.1", 8000),
        Instance("solo", "solo-ap-1", "ap", "10.3.0.9", 8000, healthy=False),
        Domain("www.shop.example", "shop", verified=True),
        Domain("pending.shop.example", "shop"),  # pinned, its TXT record not seen yet: not routed
    ])
    r = routes_from_table(table, region="eu", zone=ZONE, self_name="gw-eu", health=HealthCheck(check="http"))
    assert (r.latitude, r.longitude, r.self_name, r.version) == (48.86, 2.35, "gw-eu", "rev7")
    shop = r.apps["shop"]
    assert shop.lb_policy is LbPolicy.IP_HASH and shop.health.check == "http"
    assert [(b.address, b.port, b.instance_id) for b in shop.backends] == [
        ("10.1.0.1", 8000, "shop-eu-1"), ("10.1.0.2", 8000, "shop-eu-2")]  # our own probes judge health
    assert r.apps["solo"].backends == ()
    assert [x.name for x in r.regions] == ["us", "ap"]  # sa has no routable gateway
    us = r.regions[0]
    assert us.apps == {"shop"} and [g.name for g in us.gateways] == ["gw-us"]  # pinned: not us; dead: skipped
    assert (us.gateways[0].mesh_ip, us.gateways[0].proxy_port) == ("10.9.0.2", 8080)
    assert r.regions[1].apps == {"pinned"}  # solo's ap instance is unhealthy
    assert "shop-us-1" in r.remote_instances and "shop-eu-1" in r.instances
    assert r.domains["www.shop.example"].app == "shop" and "pending.shop.example" not in r.domains
    assert candidate_regions(r, NameMatch("solo")) == ()
    public = routes_from_table(table, region="eu", zone=ZONE, self_name="gw-eu", forward_via="public")
    assert public.regions[0].gateways[0].mesh_ip == "192.0.2.2"
    with pytest.raises(ValidationError):
        routes_from_table(table, region="eu", zone=ZONE, self_name="gw-eu", forward_via="carrier pigeon")


def test_route_state_carries_health_inflight_and_balancers_over():
    from regional_gateway.proxy.route_state import RouteState

    data = {"zone": ZONE, "apps": [{"name": "a", "lb": "ip_hash", "backends": ["10.0.0.1:80", "10.0.0.2:80"]},
                                   {"name": "b", "backends": ["10.0.0.3:80"]}]}
    first = RouteState.compile(parse_routes(data, Path("/"))[0])
    b1 = first.apps["a"].backends[0]
    b1.inflight = 3
    b1.health.probed_up = False
    b1.sync()
    assert [x.key for x in first.apps["a"].ready] == ["10.0.0.2:80"]
    data["apps"].append({"name": "c", "backends": ["10.0.0.4:80"]})
    second = RouteState.compile(parse_routes(data, Path("/"))[0], first)
    assert second.apps["a"].backends[0] is b1 and b1.inflight == 3 and not b1.available
    assert second.apps["a"].balancer is first.apps["a"].balancer  # the ring is not rebuilt
    assert [x.key for x in second.apps["a"].ready] == ["10.0.0.2:80"]
    data["apps"][0]["backends"].append("10.0.0.5:80")
    third = RouteState.compile(parse_routes(data, Path("/"))[0], second)
    assert third.apps["a"].balancer is not second.apps["a"].balancer
    data["apps"][0]["health"] = {"check": "http"}  # new health settings: fresh verdicts, in-flight kept
    fourth = RouteState.compile(parse_routes(data, Path("/"))[0], third)
    assert fourth.apps["a"].backends[0] is b1 and b1.available and b1.inflight == 3
    assert b1.health.check.check == "http"


# -- the port allow-list (probe finding 15) ---------------------------------------------------------

PORTS = {
    "zone": ZONE, "region": "eu", "latitude": 48.86, "longitude": 2.35,
    "apps": [{"name": "web", "backends": ["10.0.0.1:8080", {"address": "10.0.0.2", "port": 8081, "id": "web-b"}],
              "ports": [9000]},
             {"name": "bare", "backends": ["10.0.0.3:80"]}],
    "domains": [{"fqdn": "tls.web.example", "app": "web", "port": 8443, "passthrough": True}],
    "regions": [{"name": "us", "latitude": 40.7, "longitude": -74.0, "apps": ["far"], "instances": ["far-1"],
                 "gateways": [{"name": "gw-us", "mesh_ip": "10.9.0.2", "proxy_port": 8080}]}],
}


@pytest.mark.parametrize("host,refused", [
    (f"web.{ZONE}", None),
    (f"web-8080.{ZONE}", None),  # a backend's own port (of either backend: the app's set)
    (f"web-8081s.{ZONE}", None),
    (f"web-9000g.{ZONE}", None),  # declared
    (f"web-8443.{ZONE}", None),  # named by one of its custom domains
    (f"web-22.{ZONE}", "app 'web' does not expose port 22"),
    (f"web-18082s.{ZONE}", "app 'web' does not expose port 18082"),
    (f"web-9001g.{ZONE}", "app 'web' does not expose port 9001"),
    (f"web-b-9000.{ZONE}", None),
    (f"web-b-22.{ZONE}", "does not expose port 22"),
    (f"bare-80.{ZONE}", None),
    (f"bare-9000.{ZONE}", "app 'bare' does not expose port 9000"),  # default: the backends' ports only
    (f"far-22.{ZONE}", None),  # known here by name only: the far gateway applies its own list
    (f"far-1-22.{ZONE}", None),
    (f"nope-22.{ZONE}", "no app or instance named 'nope'"),
])
def test_names_reach_only_exposed_ports(host, refused):
    from regional_gateway.proxy.route_state import RouteState

    state = RouteState.compile(parse_routes(PORTS, Path("/"))[0])
    got = state.lookup(host.encode())
    if refused is None:
        assert isinstance(got, NameMatch), got
    else:
        assert isinstance(got, UnknownName) and refused in got.reason, got
    assert (host.encode() in state.refused) == (refused is not None and "does not expose" in refused)


def test_a_refused_port_is_counted_and_never_on_the_fast_path():
    from prometheus_client import REGISTRY

    from regional_gateway.proxy.route_state import RouteState

    state = RouteState.compile(parse_routes(PORTS, Path("/"))[0])

    def count() -> float:
        return REGISTRY.get_sample_value("geomesh_gateway_ports_refused_total", {"app": "web"}) or 0.0

    before = count()
    for _ in range(3):  # cached after the first: still counted every time
        assert isinstance(state.lookup(f"web-22.{ZONE}".encode()), UnknownName)
    state.lookup(f"nope-22.{ZONE}".encode())  # an unknown name is not a port refusal
    assert count() == before + 3
    assert state.lookup(f"web-9000.{ZONE}".encode()) == NameMatch("web", 9000)
    assert state.fast[f"web-9000.{ZONE}".encode()][1] == 9000
    assert f"web-22.{ZONE}".encode() not in state.fast


@pytest.mark.parametrize("ports,field", [
    ([0], "apps[0].ports[0]"),
    ([80, 70000], "apps[0].ports[1]"),
    ([80, 443, 80], "apps[0].ports[2]"),
    (["80"], "apps[0].ports[0]"),
    ([True], "apps[0].ports[0]"),
    (list(range(1, 66)), "apps[0].ports"),
    ("80", "apps[0].ports"),
])
def test_routes_file_ports_are_validated(ports, field):
    with pytest.raises(ValidationError) as info:
        parse_routes({"zone": ZONE, "apps": [{"name": "a", "ports": ports}]}, Path("/"))
    assert info.value.field == field, str(info.value)


def _ports_table():
    key = "A" * 43 + "="
    return RoutingTable.from_resources(9, [
        Region("eu", 48.86, 2.35), Region("us", 40.7, -74.0), Region("ap", 35.7, 139.7),
        Gateway("gw-eu", "eu", "192.0.2.1", 51820, key, "10.9.0.1", 8080, alive=True),
        Gateway("gw-us", "us", "192.0.2.2", 51820, key, "10.9.0.2", 8080, alive=True),
        Gateway("gw-ap", "ap", "192.0.2.4", 51820, key, "10.9.0.4", 8080, alive=True),
        App("shop", ports=(9000,)), App("far"),
        Instance("shop", "shop-eu-1", "eu", "10.1.0.1", 8000),
        Instance("shop", "shop-us-1", "us", "10.2.0.1", 7000),
        Instance("far", "far-us-1", "us", "10.2.0.2", 8000),
        Instance("far", "far-ap-1", "ap", "10.3.0.2", 6000),
    ])


def test_coordinator_mode_carries_the_ports_and_forwards_only_where_served():
    from regional_gateway.proxy.route_state import RouteState
    from regional_gateway.proxy.targets import Target, choose

    r = routes_from_table(_ports_table(), region="eu", zone=ZONE, self_name="gw-eu")
    shop, far = r.apps["shop"], r.apps["far"]
    assert shop.ports == (9000,) and shop.served == {8000, 9000} and shop.remote_ports == {7000, 9000}
    assert far.served == frozenset() and far.remote_ports == {8000, 6000}
    us = next(x for x in r.regions if x.name == "us")
    assert us.app_ports == {"shop": {7000, 9000}, "far": {8000}} and us.instance_ports["far-us-1"] == {8000}
    state = RouteState.compile(r)

    def where(host: str) -> str:
        match = state.lookup(f"{host}.{ZONE}".encode())
        if isinstance(match, UnknownName):
            return "refused: " + match.reason
        t = choose(state, match, b"c", may_forward=True)
        assert isinstance(t, Target), t
        return t.region.name if t.region else f"local {t.where}"

    assert where("shop") == "local 10.1.0.1:8000"
    assert where("shop-9000") == "local 10.1.0.1:9000"  # declared: served here first (the tried port, named)
    assert where("shop-7000") == "us"  # only us's instance listens on 7000: never 10.1.0.1:7000
    assert where("shop-6000").startswith("refused: app 'shop' does not expose port 6000")
    assert where("far-8000") == "us" and where("far-6000") == "ap"  # each far region's own list
    assert where("far-22").startswith("refused: app 'far' does not expose port 22")
    assert where("far-us-1-8000") == "us"
    assert where("far-us-1-6000").startswith("refused: instance 'far-us-1' does not expose port 6000")
    assert where("shop-eu-1-7000").startswith("refused: instance 'shop-eu-1' of app 'shop' does not expose")
    # a request forwarded to us for a port only another region serves is not sent to a local backend
    match = state.lookup(f"shop-7000.{ZONE}".encode())
    got = choose(state, match, b"c", may_forward=False)
    assert not isinstance(got, Target) and got.status == 404 and "does not expose port 7000" in got.message
