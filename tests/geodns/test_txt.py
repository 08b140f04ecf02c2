"""TXT records (ACME DNS-01 challenges) in the answer path: which names answer TXT, with which
values and TTL, what other types and the names around them get, and that no cache (reply cache,
templates, the fast path from the bytes) ever serves a TXT the view no longer holds. Pure: query
bytes in, reply bytes out, records compared as zone-file text."""

from __future__ import annotations

import math
import struct
import tomllib
from array import array
from pathlib import Path

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from geodns import static_state
from geodns.answer import Responder
from geodns.nearest import Locator
from geodns.region_map import Networks, RegionMap, compile_map, sites_of
from geodns.view import View, ZoneConfig
from geomesh.model import Region, TxtRecord
from geomesh.routing_table import RoutingTable

from .clients import query
from .conftest import ZONE, state_toml

CHALLENGE = f"_acme-challenge.{ZONE}"
CLIENT = b"\x7f\0\0\1"


@pytest.fixture(scope="module")
def locator(mmdb: Path) -> Locator:
    return Locator(mmdb)


def view(txt: dict[str, tuple[tuple[str, ...], int]], revision: int = 7) -> View:
    base = static_state.view_from(tomllib.loads(state_toml()), revision=revision)
    return View.build(base.zone, revision, base.regions.values(), base.apps.values(), instances=base.instances,
                      txt=txt)


def ask(r: Responder, wire: bytes, tcp: bool = False) -> DNSRecord:
    ans = r.answer(wire, CLIENT, tcp=tcp)
    assert ans.wire is not None, "no reply"
    return DNSRecord.parse(ans.wire)


def section(rrs: list) -> list[str]:
    return sorted(f"{rr.rname} {rr.ttl} {QTYPE[rr.rtype]} {rr.rdata}" for rr in rrs)


def tiny_map(v: View) -> RegionMap:
    """A region map whose every address stands in Frankfurt: enough for the fast path to run."""
    nets = Networks(array("d", [math.nan, 50.1]), array("d", [math.nan, 8.7]), array("I", [0]), array("I", [1]),
                    array("Q", [0]), array("Q", [0]), array("I", [1]), (), 0, "GeoLite2-City", "", 1)
    return compile_map(nets, sites_of(v.regions.values()), v.zone.default_region)


def ecs_query(name: str, qtype: int = 16, qid: int = 7) -> bytes:
    """The resolver shape the fast path answers from the bytes: one question and an OPT holding
    one Client Subnet option (193.0.6.0/24)."""
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    option = struct.pack("!HHHBB", 8, 7, 1, 24, 0) + bytes([193, 0, 6])
    opt = b"\0" + struct.pack("!HHBBHH", 41, 1232, 0, 0, 0, len(option)) + option
    return struct.pack("!HHHHHH", qid, 0, 1, 0, 0, 1) + qname + struct.pack("!HH", qtype, 1) + opt


SOA = f"{ZONE}. 60 SOA ns1.{ZONE}. hostmaster.{ZONE}. 7 3600 600 86400 60"
TXT = {CHALLENGE: (("token-one", "token-two"), 5), f"_acme-challenge.www.{ZONE}": (("deep",), 120),
       ZONE: (("v=apex",), 300), "_acme-challenge.example.org": (("outside",), 5)}


@pytest.mark.parametrize("name, qtype, rcode, answer, authority", [
    (CHALLENGE, "TXT", "NOERROR", [f'{CHALLENGE}. 5 TXT "token-one"', f'{CHALLENGE}. 5 TXT "token-two"'], []),
    (CHALLENGE, "ANY", "NOERROR", [f'{CHALLENGE}. 5 TXT "token-one"', f'{CHALLENGE}. 5 TXT "token-two"'], []),
    (CHALLENGE, "A", "NOERROR", [], [SOA]),  # NODATA
    (CHALLENGE, "AAAA", "NOERROR", [], [SOA]),
    (f"x.{CHALLENGE}", "TXT", "NXDOMAIN", [], [SOA]),  # below a TXT owner: an unknown name
    (f"_acme-challenge.www.{ZONE}", "TXT", "NOERROR", [f'_acme-challenge.www.{ZONE}. 120 TXT "deep"'], []),
    (f"www.{ZONE}", "TXT", "NOERROR", [], [SOA]),  # an empty non-terminal above a TXT owner
    (f"_acme-challenge.nope.{ZONE}", "TXT", "NXDOMAIN", [], [SOA]),
    (ZONE, "TXT", "NOERROR", [f'{ZONE}. 300 TXT "v=apex"'], []),
    (ZONE, "ANY", "NOERROR", [SOA], []),  # the apex's ANY stays its SOA
    ("_acme-challenge.example.org", "TXT", "REFUSED", [], []),  # outside the zone: never served
    (f"shop.{ZONE}", "TXT", "NOERROR", [], [SOA]),  # an app has no TXT
])
def test_txt_names(locator: Locator, name: str, qtype: str, rcode: str, answer: list[str],
                   authority: list[str]) -> None:
    r = Responder(view(TXT), locator)
    for tcp in (False, True):
        reply = ask(r, query(name, qtype), tcp=tcp)
        assert RCODE[reply.header.rcode] == rcode
        assert section(reply.rr) == answer and section(reply.auth) == authority
        assert bool(reply.header.aa) == (rcode != "REFUSED")


def test_the_question_keeps_its_case_and_the_lookup_ignores_it(locator: Locator) -> None:
    r = Responder(view(TXT), locator)
    mixed = "_AcMe-ChAlLeNgE.gEo.ExAmPlE.cOm"
    for _ in range(3):  # computed, then from the template, then from the reply cache
        reply = ask(r, query(mixed, "TXT"))
        assert str(reply.q.qname) == mixed + "."
        assert [(str(rr.rname), str(rr.rdata)) for rr in reply.rr] == [(mixed + ".", '"token-one"'),
                                                                        (mixed + ".", '"token-two"')]
    assert r.exact, "a TXT answer does not depend on the client: the reply cache keeps it"


def test_many_values_are_truncated_over_udp_and_whole_over_tcp(locator: Locator) -> None:
    values = tuple(f"{i:02d}" + "v" * 200 for i in range(16))
    r = Responder(view({CHALLENGE: (values, 60)}), locator)
    udp = ask(r, query(CHALLENGE, "TXT"))
    assert udp.header.tc and not udp.rr
    tcp = ask(r, query(CHALLENGE, "TXT"), tcp=True)
    assert not tcp.header.tc and sorted(str(rr.rdata).strip('"') for rr in tcp.rr) == sorted(values)


def test_a_view_change_is_seen_by_every_cache(locator: Locator) -> None:
    """The reply cache and the templates (fast path included) start empty with a new view: the
    challenge's new value, then its removal, are answered at once."""
    first = view({CHALLENGE: (("old",), 5)})
    r = Responder(first, locator, region_map=tiny_map(first))

    def txt(wire: bytes) -> tuple[str, list[str]]:
        reply = DNSRecord.parse(r.answer(wire, CLIENT).wire)
        return RCODE[reply.header.rcode], [str(rr.rdata) for rr in reply.rr]

    for qid in range(3):  # full path, then the template from the bytes, then the reply cache
        assert txt(ecs_query(CHALLENGE, qid=qid)) == ("NOERROR", ['"old"'])
        assert txt(query(CHALLENGE, "TXT", qid=qid)) == ("NOERROR", ['"old"'])
    wire = ecs_query(CHALLENGE, qid=9)
    assert r._fast(wire, 9, 0, wire[2:]) is not None, "the fast path answers the TXT from its template"
    r.set_view(view({CHALLENGE: (("new",), 5)}, revision=8))
    assert txt(ecs_query(CHALLENGE, qid=10)) == ("NOERROR", ['"new"'])
    assert txt(query(CHALLENGE, "TXT", qid=10)) == ("NOERROR", ['"new"'])
    r.set_view(view({}, revision=9))
    assert txt(ecs_query(CHALLENGE, qid=11)) == ("NXDOMAIN", [])
    assert txt(query(CHALLENGE, "TXT", qid=11)) == ("NXDOMAIN", [])


def test_the_view_takes_the_tables_txt_records_inside_the_zone() -> None:
    zone = ZoneConfig(ZONE)
    table = RoutingTable.from_resources(3, [
        Region("eu", 50.1, 8.7), TxtRecord(CHALLENGE.upper(), ("a", "b"), ttl=9),
        TxtRecord("_acme-challenge.a.b.geo.example.com", ("c",)), TxtRecord("_acme-challenge.example.org", ("x",))])
    v = View.from_table(table, zone)
    assert dict(v.txt) == {CHALLENGE: (("a", "b"), 9), f"_acme-challenge.a.b.{ZONE}": (("c",), 60)}
    assert v.txt_parents == {f"a.b.{ZONE}", f"b.{ZONE}"}


def test_a_feed_hold_keeps_the_txt_records(locator: Locator) -> None:
    """A snapshot that empties a region (gateways held for a while) still brings its TXT records."""
    from geodns.feed import hold_dropped
    from geomesh.model import Gateway

    gw = Gateway("eu-1", "eu", "192.0.2.1", 51820, "A" * 43 + "=", "10.88.0.1", 8080, alive=True)
    served = RoutingTable.from_resources(3, [Region("eu", 50.1, 8.7), gw])
    new = RoutingTable.from_resources(4, [Region("eu", 50.1, 8.7), TxtRecord(CHALLENGE, ("tok",))])
    table, held = hold_dropped(served, new, snapshot=True, held={}, now=0.0, hold=15.0)
    assert held and "eu-1" in table.gateways and table.txt[CHALLENGE].values == ("tok",)

