"""`<instance-id>.<zone>` names (and their `-<port>[s|g]` forms): table tests of the answer path.

The gateways route these names to one instance (`regional_gateway.proxy.hostnames`); GeoDNS must
answer them with the gateways of the region that hosts the instance, wherever the client is, and
read every name form the way the gateways read it (an app's name wins over an instance id, a whole
label wins over the `-<port>` reading). Records are compared as text; the routing table is real.
"""

from __future__ import annotations

import base64
import socket
import tomllib
from pathlib import Path

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from geodns import static_state, zone
from geodns.answer import Responder
from geodns.nearest import Locator
from geodns.view import View, ZoneConfig
from geomesh.errors import ValidationError
from geomesh.model import App, Gateway, Instance, Region
from geomesh.routing_table import RoutingTable
from regional_gateway.proxy.hostnames import NameMatch, resolve
from regional_gateway.proxy.routes import routes_from_table

from .clients import query

ZONE = "geo.example.com"
SOA = f"{ZONE}. 30 SOA ns1.{ZONE}. hostmaster.{ZONE}. 42 3600 600 86400 30"
EU, US, AP = "192.0.2.1", "192.0.2.10", "192.0.2.20"


def key(i: int) -> str:
    return base64.b64encode(i.to_bytes(32, "big")).decode()


def table() -> RoutingTable:
    """eu and us healthy; ap's only gateway found unreachable (fail-open); sa has no gateway."""
    regions = [Region("eu", 50.1, 8.7), Region("us", 39.0, -77.5), Region("ap", 1.3, 103.8),
               Region("sa", -23.5, -46.6)]
    gws = [Gateway("eu-a", "eu", EU, 51820, key(1), "10.88.0.1", 8080, public_ipv6="2001:db8::1", alive=True),
           Gateway("us-a", "us", US, 51820, key(2), "10.88.0.10", 8080, alive=True),
           Gateway("ap-a", "ap", AP, 51820, key(3), "10.88.0.20", 8080, alive=True, unreachable=True)]
    apps = [App("web", ports=(443, 50051)), App("shop", ports=(443,)), App("api")]
    insts = [Instance("web", "w1", "eu", "10.0.0.1", 8080),
             Instance("web", "w2", "us", "10.0.0.2", 8080, healthy=False),  # unhealthy: still its own region
             Instance("shop", "shop-1", "us", "10.0.0.3", 8080),  # reads as an id, not as shop on port 1
             # an id equal to an app name: the app wins (in a region without a gateway: a gateway of
             # the instance's region refuses such routes, "instance id 'web' is also an app name")
             Instance("api", "web", "sa", "10.0.0.4", 8080),
             Instance("web", "dup", "ap", "10.0.0.5", 8080),  # one id in two apps and regions
             Instance("api", "dup", "eu", "10.0.0.6", 8080),
             Instance("api", "a1", "ap", "10.0.0.7", 8080),  # its region has only unreachable gateways
             Instance("api", "s1", "sa", "10.0.0.8", 8080)]  # its region has no gateway
    return RoutingTable.from_resources(42, [*regions, *gws, *apps, *insts])


@pytest.fixture(scope="module")
def view() -> View:
    return View.from_table(table(), ZoneConfig(ZONE))


@pytest.fixture(scope="module")
def locator(mmdb: Path) -> Locator:
    return Locator(mmdb)


def ask(r: Responder, wire: bytes) -> DNSRecord:
    ans = r.answer(wire, socket.inet_aton("127.0.0.1"))
    assert ans.wire is not None
    return DNSRecord.parse(ans.wire)


def rrs(section: list) -> list[str]:
    return sorted(f"{rr.rname} {rr.ttl} {QTYPE[rr.rtype]} {rr.rdata}" for rr in section)


def test_the_view_knows_where_each_instance_lives(view: View) -> None:
    assert dict(view.instances) == {"w1": ("eu",), "w2": ("us",), "shop-1": ("us",), "web": ("sa",),
                                    "dup": ("ap", "eu"), "a1": ("ap",), "s1": ("sa",)}


@pytest.mark.parametrize("label, qtype, rcode, answer, authority", [
    # every form of an instance name: its region's gateways, whatever the port or mode
    ("w1", "A", "NOERROR", [f"w1.{ZONE}. 30 A {EU}"], []),
    ("w1-8080", "A", "NOERROR", [f"w1-8080.{ZONE}. 30 A {EU}"], []),
    ("w1-443s", "A", "NOERROR", [f"w1-443s.{ZONE}. 30 A {EU}"], []),
    ("w1-50051g", "A", "NOERROR", [f"w1-50051g.{ZONE}. 30 A {EU}"], []),
    ("W1-443S", "A", "NOERROR", [f"W1-443S.{ZONE}. 30 A {EU}"], []),  # case kept in the owner
    ("w1", "AAAA", "NOERROR", [f"w1.{ZONE}. 30 AAAA 2001:db8::1"], []),
    ("w1-443s", "ANY", "NOERROR", [f"w1-443s.{ZONE}. 30 A {EU}"], []),
    ("w1", "MX", "NOERROR", [], [SOA]),
    # an unhealthy instance is still reached through its own region (the gateway answers for it)
    ("w2", "A", "NOERROR", [f"w2.{ZONE}. 30 A {US}"], []),
    ("w2-8080g", "A", "NOERROR", [f"w2-8080g.{ZONE}. 30 A {US}"], []),
    # an id that looks like <app>-<port>: the whole label wins, as at the gateway
    ("shop-1", "A", "NOERROR", [f"shop-1.{ZONE}. 30 A {US}"], []),
    ("shop-1-443s", "A", "NOERROR", [f"shop-1-443s.{ZONE}. 30 A {US}"], []),
    # one id in two regions: the first by name with a reachable gateway (ap has none)
    ("dup", "A", "NOERROR", [f"dup.{ZONE}. 30 A {EU}"], []),
    ("dup-8080", "A", "NOERROR", [f"dup-8080.{ZONE}. 30 A {EU}"], []),
    # its region's gateways are all unreachable: they answer anyway (fail-open)
    ("a1", "A", "NOERROR", [f"a1.{ZONE}. 30 A {AP}"], []),
    ("a1-443s", "A", "NOERROR", [f"a1-443s.{ZONE}. 30 A {AP}"], []),
    # its region has no gateway: nobody can take the name, NODATA (not another region)
    ("s1", "A", "NOERROR", [], [SOA]),
    ("s1-8080", "A", "NOERROR", [], [SOA]),
    # not a name: NXDOMAIN, as for apps
    ("w1-0", "A", "NXDOMAIN", [], [SOA]),
    ("w1-65536", "A", "NXDOMAIN", [], [SOA]),
    ("w1-443x", "A", "NXDOMAIN", [], [SOA]),
    ("w1-", "A", "NXDOMAIN", [], [SOA]),
    ("w3", "A", "NXDOMAIN", [], [SOA]),
    ("w3-443s", "A", "NXDOMAIN", [], [SOA]),
    ("x.w1", "A", "NXDOMAIN", [], [SOA]),
])
def test_instance_names(locator: Locator, view: View, label: str, qtype: str, rcode: str,
                        answer: list[str], authority: list[str]) -> None:
    reply = ask(Responder(view, locator), query(f"{label}.{ZONE}", qtype, ecs="193.0.6.0/24"))
    assert RCODE[reply.header.rcode] == rcode
    assert rrs(reply.rr) == sorted(answer) and rrs(reply.auth) == authority


@pytest.mark.parametrize("client", ["193.0.6.0/24", "8.8.8.0/24", "1.0.16.0/24", "200.160.0.0/24"])
def test_an_instance_name_does_not_depend_on_the_client(locator: Locator, view: View, client: str) -> None:
    """Clients on every continent get the instance's region; the ECS scope says so (0)."""
    reply = ask(Responder(view, locator), query(f"w2-443s.{ZONE}", ecs=client))
    assert {str(rr.rdata) for rr in reply.rr} == {US}
    opt = next(ar for ar in reply.ar if ar.rtype == QTYPE.OPT)
    (ecs,) = [o for o in opt.rdata if o.code == 8]
    assert ecs.data[3] == 0, "scope 0: the answer is the same for every client"


def test_an_app_name_still_wins_and_is_placed_by_the_client(locator: Locator, view: View) -> None:
    """`web` is both an app and an instance id of app api: the app, placed by the client."""
    target = zone.classify(view, (b"web",))
    assert isinstance(target, zone.AppName) and target.app.name == "web"
    target = zone.classify(view, (b"web-443s",))
    assert isinstance(target, zone.AppName) and (target.port, target.mode) == (443, "s")


def test_not_ready_view_is_servfail(locator: Locator) -> None:
    reply = ask(Responder(View.empty(ZoneConfig(ZONE)), locator), query(f"w1.{ZONE}"))
    assert reply.header.rcode == RCODE.SERVFAIL


LABELS = ["w1", "w1-8080", "w1-443s", "w1-50051g", "w2", "w2-8080g", "shop-1", "shop-1-443s", "dup", "dup-8080",
          "a1", "a1-443s", "web", "web-443", "web-443s", "web-50051g", "shop", "shop-443s", "api", "w3", "w3-443s"]


@pytest.mark.parametrize("gateway_region", ["eu", "us", "ap"])
def test_dns_reads_every_name_form_as_the_gateways_do(view: View, gateway_region: str) -> None:
    """The same label is the same app or instance, port and mode for DNS and for the gateway; a
    port the app does not expose is refused by the gateway (404 naming the rule), not by DNS."""
    gw = {"eu": "eu-a", "us": "us-a", "ap": "ap-a"}[gateway_region]
    routes = routes_from_table(table(), region=gateway_region, zone=ZONE, self_name=gw)
    for label in LABELS:
        theirs = resolve(routes, f"{label}.{ZONE}")
        ours = zone.classify(view, (label.encode(),))
        if isinstance(ours, zone.NoSuchName):
            assert not isinstance(theirs, NameMatch), (label, theirs)
            continue
        if not isinstance(theirs, NameMatch) and "does not expose port" in theirs.reason:
            # the port allow-list is the gateway's to apply (a 404 naming the rule); DNS answers the name
            assert isinstance(ours, (zone.AppName, zone.InstanceName)) and ours.port, (label, theirs)
            continue
        assert isinstance(theirs, NameMatch), (label, theirs)
        mode = {"http": "", "passthrough": "s", "h2": "g"}[theirs.mode.value]
        if isinstance(ours, zone.InstanceName):
            assert (ours.instance, ours.port, ours.mode) == (theirs.instance, theirs.port, mode), label
        else:
            assert isinstance(ours, zone.AppName) and not theirs.instance, (label, theirs)
            assert (ours.app.name, ours.port, ours.mode) == (theirs.app, theirs.port, mode), label


def test_static_state_places_instances(locator: Locator) -> None:
    text = (f'[zone]\nname = "{ZONE}"\n'
            '[[regions]]\nname = "eu"\nlatitude = 50\nlongitude = 8\ngateways = [{ name = "e", ipv4 = "192.0.2.1" }]\n'
            '[[regions]]\nname = "us"\nlatitude = 39\nlongitude = -77\ngateways = [{ name = "u", ipv4 = "192.0.2.2" }]\n'
            '[[apps]]\nname = "shop"\nregions = ["eu", "us"]\ninstances = { shop-eu-1 = "eu", shop-us-1 = "us" }\n')
    view = static_state.view_from(tomllib.loads(text), revision=1)
    assert dict(view.instances) == {"shop-eu-1": ("eu",), "shop-us-1": ("us",)}
    r = Responder(view, locator)
    assert rrs(ask(r, query(f"shop-us-1-443s.{ZONE}", ecs="193.0.6.0/24")).rr) == [
        f"shop-us-1-443s.{ZONE}. 30 A 192.0.2.2"]


@pytest.mark.parametrize("instances, field", [
    ('{ shop-1 = "mars" }', "apps[0].instances.shop-1"),
    ('{ "Shop_1" = "eu" }', "apps[0].instances"),
    ('["shop-1"]', "apps[0].instances"),
])
def test_static_state_instance_mistakes_name_the_key(instances: str, field: str) -> None:
    text = (f'[zone]\nname = "{ZONE}"\n[[regions]]\nname = "eu"\nlatitude = 50\nlongitude = 8\n'
            f'[[apps]]\nname = "shop"\ninstances = {instances}\n')
    with pytest.raises(ValidationError) as exc:
        static_state.view_from(tomllib.loads(text), revision=1)
    assert exc.value.field == field
