"""Cross-region forwarding skips gateways the coordinator found unreachable (docs/reachability.md).

A real gateway A (eu, no instance of the app) gets its routes from a coordinator routing table
(`routes_from_table`) naming two gateways of region us, each a real gateway whose mesh listener
serves the app from its own backend. While one of them is unreachable every request goes to the
other; when both are, they are used anyway (fail-open) and the fail-open counter moves; when the
verdict clears, both take requests again. The rule itself is table-tested too.
"""

from __future__ import annotations

import base64

import pytest
from prometheus_client import REGISTRY

from geomesh.model import App, Gateway, Instance, Region
from geomesh.routing_table import RoutingTable
from regional_gateway.proxy.cross_region import forwarding_order
from regional_gateway.proxy.routes import RemoteGateway, routes_from_table
from tests.proxy.client import get

ZONE = "apps.test"


def gw(name: str, unreachable: bool = False) -> RemoteGateway:
    return RemoteGateway(name, "10.88.0.1", 8080, unreachable=unreachable)


@pytest.mark.parametrize("gateways, want, fail_open", [
    ([], [], False),
    ([gw("a"), gw("b")], ["a", "b"], False),
    ([gw("a", True), gw("b")], ["b"], False),            # the unreachable one is skipped
    ([gw("a", True), gw("b", True)], ["a", "b"], True),  # all unreachable: all of them (fail-open)
    ([gw("a", True)], ["a"], True),
])
def test_forwarding_order(gateways: list[RemoteGateway], want: list[str], fail_open: bool) -> None:
    assert forwarding_order([(g, g.name) for g in gateways]) == (want, fail_open)


def key(i: int) -> str:
    return base64.b64encode(i.to_bytes(32, "big")).decode()


def table(ports: dict[str, int], unreachable: set[str], revision: int) -> RoutingTable:
    regions = [Region("eu", 48.86, 2.35), Region("us", 40.71, -74.0)]
    gws = [Gateway("gw-a", "eu", "192.0.2.1", 51820, key(1), "10.88.0.1", 8080, alive=True)]
    gws += [Gateway(name, "us", f"192.0.2.{10 + i}", 51820, key(10 + i), "127.0.0.1", port, alive=True,
                    unreachable=name in unreachable)
            for i, (name, port) in enumerate(sorted(ports.items()))]
    return RoutingTable.from_resources(revision, [*regions, *gws, App("shop"),
                                                  Instance("shop", "s1", "us", "10.90.0.1", 80)])


def fail_open_count() -> float:
    return REGISTRY.get_sample_value("geomesh_gateway_forward_fail_open_total", {"region": "us"}) or 0.0


def test_forwarding_skips_unreachable_gateways_and_fails_open(backends, gateway):
    b1_backend, b2_backend = backends(2, prefix="shop-us")
    far = {}
    for name, backend in (("gw-b1", b1_backend), ("gw-b2", b2_backend)):
        far[name] = gateway({"zone": ZONE, "name": name, "region": "us", "health": {"check": "none"},
                             "apps": [{"name": "shop", "backends": [backend.address]}]},
                            http=(), mesh=("127.0.0.1:0",))
    ports = {name: g.mesh[1] for name, g in far.items()}
    a = gateway({"zone": ZONE, "name": "gw-a", "region": "eu"})

    def use(unreachable: set[str], revision: int) -> None:
        routes = routes_from_table(table(ports, unreachable, revision), region="eu", zone=ZONE, self_name="gw-a")
        assert {g.name: g.unreachable for r in routes.regions for g in r.gateways} == \
            {n: n in unreachable for n in ports}
        a.run(a.server.update_routes, routes)

    def served_by(n: int = 8) -> list[str]:
        out = []
        for _ in range(n):
            r = get(a.http, f"shop.{ZONE}")
            assert r.status == 200, r
            out.append(r.header("x-backend"))
        return out

    use(set(), 1)
    assert set(served_by()) == {"shop-us1", "shop-us2"}  # both far gateways take requests
    use({"gw-b1"}, 2)
    before = fail_open_count()
    assert set(served_by()) == {"shop-us2"}  # the unreachable one gets none
    assert fail_open_count() == before
    use({"gw-b1", "gw-b2"}, 3)
    assert set(served_by()) == {"shop-us1", "shop-us2"}  # every candidate unreachable: used anyway
    assert fail_open_count() == before + 8
    use(set(), 4)
    assert set(served_by()) == {"shop-us1", "shop-us2"}
    assert fail_open_count() == before + 8
