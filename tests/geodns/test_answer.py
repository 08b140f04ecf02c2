"""Table-driven tests of the pure answer path (`Responder.answer`): query bytes in, reply bytes out,
with the real GeoLite2 database. Records are compared as zone-file text."""

from __future__ import annotations

import socket
import struct
import tomllib
from pathlib import Path

import maxminddb
import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from geodns import static_state
from geodns.answer import Responder
from geodns.nearest import Locator
from geodns.view import View
from geomesh.geo import great_circle_km

from .clients import query
from .conftest import REGIONS, ZONE, gateway_ip, state_toml


@pytest.fixture(scope="module")
def locator(mmdb: Path) -> Locator:
    return Locator(mmdb)


def make_view(text: str | None = None) -> View:
    return static_state.view_from(tomllib.loads(text or state_toml()), revision=7)


@pytest.fixture
def responder(locator: Locator) -> Responder:
    return Responder(make_view(), locator)


def ask(r: Responder, wire: bytes, client: str = "127.0.0.1", tcp: bool = False) -> DNSRecord:
    family = socket.AF_INET6 if ":" in client else socket.AF_INET
    ans = r.answer(wire, socket.inet_pton(family, client), tcp=tcp)
    assert ans.wire is not None, "no reply"
    return DNSRecord.parse(ans.wire)


def rrs(section: list) -> list[str]:
    return sorted(f"{rr.rname} {rr.ttl} {QTYPE[rr.rtype]} {rr.rdata}" for rr in section)


def addrs(reply: DNSRecord) -> set[str]:
    return {str(rr.rdata) for rr in reply.rr if rr.rtype in (QTYPE.A, QTYPE.AAAA)}


def ecs_of(reply: DNSRecord) -> tuple[int, int, int, bytes] | None:
    for ar in reply.ar:
        if ar.rtype == QTYPE.OPT:
            for o in ar.rdata:
                if o.code == 8:
                    fam, src, scope = struct.unpack_from("!HBB", o.data)
                    return fam, src, scope, o.data[4:]
    return None


def opt_of(reply: DNSRecord):
    return next((ar for ar in reply.ar if ar.rtype == QTYPE.OPT), None)


def soa_line(serial: int = 7) -> str:
    return (f"{ZONE}. 60 SOA ns1.{ZONE}. hostmaster.{ZONE}. {serial} 3600 600 86400 60")


# -- nearest region by ECS, by source address ---------------------------------------------------


def test_ecs_clients_on_every_continent_get_their_nearest_region(responder: Responder, clients, mmdb: Path) -> None:
    with maxminddb.open_database(str(mmdb)) as db:
        for region, picks in clients.items():
            for c in picks:
                reply = ask(responder, query(f"shop.{ZONE}", ecs=c.subnet))
                assert reply.header.rcode == RCODE.NOERROR and reply.header.aa
                assert addrs(reply) == gateway_ip(region), f"{c} got {addrs(reply)}"
                fam, src, scope, address = ecs_of(reply)
                _, db_prefix = db.get_with_prefix_len(c.subnet.split("/")[0])
                assert (fam, src, address) == (1, 24, socket.inet_aton(c.subnet.split("/")[0])[:3])
                assert scope == min(24, db_prefix), "scope must be the GeoIP network used, at most the source"


def test_source_address_without_ecs(responder: Responder, clients) -> None:
    c = clients["au-east"][0]
    host = c.subnet.split("/")[0].rsplit(".", 1)[0] + ".77"
    reply = ask(responder, query(f"shop.{ZONE}"), client=host)
    assert addrs(reply) == gateway_ip("au-east") and ecs_of(reply) is None
    assert not responder.exact, "an answer that depends on the source address must not be in the exact cache"


def test_private_and_unknown_clients_get_the_default_region(responder: Responder) -> None:
    assert addrs(ask(responder, query(f"shop.{ZONE}"), client="10.1.2.3")) == {"192.0.2.20"}
    reply = ask(responder, query(f"shop.{ZONE}", ecs="10.0.0.0/8"))
    assert addrs(reply) == {"192.0.2.20"}  # eu-2 is draining: never answered
    assert ecs_of(reply)[2] == 8  # the special-purpose block 10.0.0.0/8 decided it
    assert addrs(ask(responder, query(f"shop.{ZONE}", ecs="2001:db8::/32"))) == {"192.0.2.20"}


def test_ecs_source_prefix_zero_uses_the_source_and_scope_zero(responder: Responder, clients) -> None:
    host = clients["sa-east"][0].subnet.split("/")[0].rsplit(".", 1)[0] + ".9"
    reply = ask(responder, query(f"shop.{ZONE}", ecs="0.0.0.0/0"), client=host)
    assert addrs(reply) == gateway_ip("sa-east")
    assert ecs_of(reply) == (1, 0, 0, b"")


def test_ipv6_ecs(responder: Responder, ipv6_client) -> None:
    subnet, region = ipv6_client
    reply = ask(responder, query(f"shop.{ZONE}", ecs=subnet))
    assert addrs(reply) == gateway_ip(region)
    fam, src, scope, _ = ecs_of(reply)
    assert (fam, src) == (2, 48) and scope <= 48


# -- the platform's names and the health rules --------------------------------------------------


@pytest.mark.parametrize("label", ["shop", "shop-443", "shop-443s", "shop-8080g", "SHOP-65535S"])
def test_app_name_forms(responder: Responder, clients, label: str) -> None:
    reply = ask(responder, query(f"{label}.{ZONE}", ecs=clients["eu-central"][0].subnet))
    assert addrs(reply) == {"192.0.2.20"}
    assert str(reply.rr[0].rname) == f"{label}.{ZONE}.", "owner name keeps the case of the question"


@pytest.mark.parametrize("label", ["shop-0", "shop-65536", "shop-443x", "shop-", "nosuchapp-443"])
def test_bad_app_forms_are_nxdomain(responder: Responder, label: str) -> None:
    reply = ask(responder, query(f"{label}.{ZONE}"))
    assert reply.header.rcode == RCODE.NXDOMAIN and rrs(reply.auth) == [soa_line()]


def test_nearest_hosting_region_wins_over_nearer_ones(responder: Responder, clients) -> None:
    # blog runs only in us-east: a European client is sent there
    assert addrs(ask(responder, query(f"blog.{ZONE}", ecs=clients["eu-central"][0].subnet))) == gateway_ip("us-east")


def test_unhealthy_region_fails_over_to_the_next_nearest(responder: Responder, japan_client) -> None:
    # ap-northeast hosts shop but its only gateway drains: the next nearest hosting region answers
    hosting_healthy = [r for r in REGIONS if r not in ("ap-northeast", "us-west")]
    want = min(hosting_healthy, key=lambda r: (great_circle_km(japan_client.latitude, japan_client.longitude,
                                                                REGIONS[r][0], REGIONS[r][1]), r))
    reply = ask(responder, query(f"shop.{ZONE}", ecs=japan_client.subnet))
    assert addrs(reply) == gateway_ip(want)


def test_app_without_instances_gets_the_nearest_healthy_gateway(responder: Responder, clients) -> None:
    assert addrs(ask(responder, query(f"orphan.{ZONE}", ecs=clients["af-south"][0].subnet))) == gateway_ip("af-south")


def test_pinned_app_never_leaves_its_regions(responder: Responder, clients) -> None:
    assert addrs(ask(responder, query(f"pinned.{ZONE}", ecs=clients["au-east"][0].subnet))) == {"192.0.2.20"}


def test_aaaa_and_nodata(responder: Responder, clients) -> None:
    reply = ask(responder, query(f"shop.{ZONE}", "AAAA", ecs=clients["eu-central"][0].subnet))
    assert rrs(reply.rr) == [f"shop.{ZONE}. 30 AAAA 2001:db8::20"]
    reply = ask(responder, query(f"shop.{ZONE}", "AAAA", ecs=clients["af-south"][0].subnet))
    assert reply.header.rcode == RCODE.NOERROR and not reply.rr and rrs(reply.auth) == [soa_line()]
    reply = ask(responder, query(f"shop.{ZONE}", "MX", ecs=clients["af-south"][0].subnet))
    assert reply.header.rcode == RCODE.NOERROR and not reply.rr and rrs(reply.auth) == [soa_line()]


def test_any_gets_one_rrset(responder: Responder, clients) -> None:
    reply = ask(responder, query(f"shop.{ZONE}", "ANY", ecs=clients["us-east"][0].subnet))
    assert {QTYPE[rr.rtype] for rr in reply.rr} == {"A"} and addrs(reply) == gateway_ip("us-east")
    assert rrs(ask(responder, query(ZONE, "ANY")).rr) == [soa_line()]


# -- the zone's own names ------------------------------------------------------------------------


@pytest.mark.parametrize("name, qtype, rcode, answer, authority", [
    (ZONE, "SOA", "NOERROR", [soa_line()], []),
    (ZONE, "NS", "NOERROR", [f"{ZONE}. 3600 NS ns1.{ZONE}.", f"{ZONE}. 3600 NS ns2.{ZONE}."], []),
    (ZONE, "A", "NOERROR", [], [soa_line()]),
    (f"ns1.{ZONE}", "A", "NOERROR", [f"ns1.{ZONE}. 3600 A 192.0.2.53"], []),
    (f"ns2.{ZONE}", "AAAA", "NOERROR", [f"ns2.{ZONE}. 3600 AAAA 2001:db8::54"], []),
    (f"ns1.{ZONE}", "AAAA", "NOERROR", [], [soa_line()]),
    (f"gw.us-east.{ZONE}", "A", "NOERROR", [f"gw.us-east.{ZONE}. 30 A 192.0.2.10", f"gw.us-east.{ZONE}. 30 A 192.0.2.11"], []),
    (f"gw.eu-central.{ZONE}", "AAAA", "NOERROR", [f"gw.eu-central.{ZONE}. 30 AAAA 2001:db8::20"], []),
    (f"gw.ap-northeast.{ZONE}", "A", "NOERROR", [], [soa_line()]),  # no routable gateway
    (f"gw.mars.{ZONE}", "A", "NXDOMAIN", [], [soa_line()]),
    (f"eu-central.{ZONE}", "A", "NOERROR", [], [soa_line()]),  # empty non-terminal
    (f"nope.{ZONE}", "A", "NXDOMAIN", [], [soa_line()]),
    (f"a.shop.{ZONE}", "A", "NXDOMAIN", [], [soa_line()]),
    ("www.example.org", "A", "REFUSED", [], []),
    ("example.com", "A", "REFUSED", [], []),
    (f"nope.{ZONE}", "AXFR", "REFUSED", [], []),
    (f"nope.{ZONE}", "OPT", "FORMERR", [], []),
])
def test_zone_names(responder: Responder, name: str, qtype: str, rcode: str, answer: list[str],
                    authority: list[str]) -> None:
    reply = ask(responder, query(name, qtype))
    assert RCODE[reply.header.rcode] == rcode
    assert rrs(reply.rr) == sorted(answer)
    assert rrs(reply.auth) == sorted(authority)
    assert bool(reply.header.aa) == (rcode not in ("REFUSED", "FORMERR"))


def test_ns_answer_carries_glue(responder: Responder) -> None:
    reply = ask(responder, query(ZONE, "NS", edns=False))
    assert rrs(reply.ar) == [f"ns1.{ZONE}. 3600 A 192.0.2.53", f"ns2.{ZONE}. 3600 A 192.0.2.54",
                             f"ns2.{ZONE}. 3600 AAAA 2001:db8::54"]


def test_other_classes_are_refused(responder: Responder) -> None:
    m = DNSRecord.question("version.bind", "TXT", "CH")
    assert RCODE[ask(responder, bytes(m.pack())).header.rcode] == "REFUSED"


# -- protocol ------------------------------------------------------------------------------------


def test_case_is_preserved_even_from_the_cache(responder: Responder, clients) -> None:
    subnet = clients["us-east"][1].subnet
    ask(responder, query(f"shop.{ZONE}", ecs=subnet))
    reply = ask(responder, query("ShOp.GeO.eXaMpLe.CoM", ecs=subnet))
    assert str(reply.q.qname) == "ShOp.GeO.eXaMpLe.CoM." and str(reply.rr[0].rname) == "ShOp.GeO.eXaMpLe.CoM."
    assert responder.stats.cache_hits == 1


def test_exact_cache_hit_only_patches_the_id(responder: Responder, clients) -> None:
    wire = query(f"shop.{ZONE}", ecs=clients["sa-east"][1].subnet, qid=1)
    responder.answer(wire, b"\x7f\0\0\1")
    assert wire[2:] not in responder.exact, "kept on the second sight only"
    first = responder.answer(wire, b"\x7f\0\0\1")
    cached = responder.exact[wire[2:]]
    assert cached == (first.wire[2:], first.index)
    again = query(f"shop.{ZONE}", ecs=clients["sa-east"][1].subnet, qid=0xBEEF)
    assert again[:2] + cached[0] == b"\xbe\xef" + first.wire[2:]


def test_opt_rules(responder: Responder) -> None:
    plain = ask(responder, query(f"shop.{ZONE}", edns=False))
    assert opt_of(plain) is None, "no OPT in the query: none in the reply"
    reply = ask(responder, query(f"shop.{ZONE}", do=True, payload=4096))
    opt = opt_of(reply)
    assert opt is not None and opt.edns_len == 1232 and opt.edns_do and opt.edns_ver == 0
    assert ecs_of(reply) is None, "ECS only in replies to queries that had it"
    reply = ask(responder, query(f"nope.{ZONE}", ecs="193.0.6.0/24"))
    assert ecs_of(reply) == (1, 24, 0, bytes([193, 0, 6])), "an answer that does not depend on the subnet has scope 0"


def test_badvers(responder: Responder) -> None:
    m = DNSRecord.question(f"shop.{ZONE}")
    m.add_ar(__import__("dnslib").EDNS0(udp_len=1232, version=1))
    reply = ask(responder, bytes(m.pack()))
    opt = opt_of(reply)
    assert reply.header.rcode == 0 and opt is not None and (opt.ttl >> 24) == 1  # BADVERS = 16
    assert opt.edns_ver == 0 and not reply.rr


def test_flags_rd_and_cd_are_copied(responder: Responder) -> None:
    wire = bytearray(query(f"nope.{ZONE}", rd=True))
    wire[3] |= 0x10  # CD
    reply = ask(responder, bytes(wire))
    assert reply.header.rd and reply.header.cd and reply.header.qr and not reply.header.ra


@pytest.mark.parametrize("opcode", [1, 2, 4, 5])
def test_unknown_opcodes_get_notimp(responder: Responder, opcode: int) -> None:
    wire = bytearray(query(f"shop.{ZONE}", edns=False))
    wire[2] |= opcode << 3
    reply = ask(responder, bytes(wire))
    assert RCODE[reply.header.rcode] == "NOTIMP" and reply.header.opcode == opcode


@pytest.mark.parametrize("hexdata", [
    "abcd00000000000000000000",  # no question
    "abcd0000000100000000000104736f6d650000010001" + "00002904d000000000000b0008000700031800c10006",  # ECS family 3
])
def test_malformed_gets_formerr_with_the_id(responder: Responder, hexdata: str) -> None:
    reply = ask(responder, bytes.fromhex(hexdata))
    assert RCODE[reply.header.rcode] == "FORMERR" and reply.header.id == 0xABCD and reply.header.qr


@pytest.mark.parametrize("data", [b"", b"\x12\x34\x00", bytes.fromhex("1234" + "8000" + "0001" + "0000" * 3)])
def test_unanswerable_packets_are_dropped(responder: Responder, data: bytes) -> None:
    assert responder.answer(data, b"\x7f\0\0\1").wire is None
    assert responder.stats.dropped == 1


def test_oversize_udp_answer_is_truncated_and_tcp_is_not(responder: Responder) -> None:
    small = ask(responder, query(f"big.{ZONE}", edns=False))
    assert small.header.tc and not small.rr
    small = ask(responder, query(f"big.{ZONE}", payload=512))
    assert small.header.tc and not small.rr and opt_of(small) is not None
    full = ask(responder, query(f"big.{ZONE}", payload=1232))
    assert not full.header.tc and len(full.rr) == 40
    tcp = ask(responder, query(f"big.{ZONE}", edns=False), tcp=True)
    assert not tcp.header.tc and len(tcp.rr) == 40


def test_view_change_drops_the_caches(responder: Responder, clients) -> None:
    wire = query(f"shop.{ZONE}", ecs=clients["us-east"][0].subnet)
    assert addrs(ask(responder, wire)) == {"192.0.2.10", "192.0.2.11"}
    changed = {**REGIONS, "us-east": (39.04, -77.49, [("us-1", "192.0.2.10", "", "active"),
                                                      ("us-2", "192.0.2.11", "", "draining")])}
    responder.set_view(make_view(state_toml(changed)))
    assert not responder.exact
    assert addrs(ask(responder, wire)) == {"192.0.2.10"}


def test_not_ready_view_is_servfail_for_apps_only(locator: Locator) -> None:
    r = Responder(View.empty(make_view().zone), locator)
    assert RCODE[ask(r, query(f"shop.{ZONE}")).header.rcode] == "SERVFAIL"
    assert RCODE[ask(r, query(f"nope.{ZONE}")).header.rcode] == "SERVFAIL"
    assert RCODE[ask(r, query(ZONE, "SOA")).header.rcode] == "NOERROR"


class BrokenLocator:
    def locate(self, packed: bytes, prefix: int | None = None):
        raise RuntimeError("database gone")


def test_a_failing_stage_gives_servfail_not_an_exception() -> None:
    r = Responder(make_view(), BrokenLocator())  # type: ignore[arg-type]
    reply = ask(r, query(f"shop.{ZONE}", ecs="193.0.6.0/24"))
    assert RCODE[reply.header.rcode] == "SERVFAIL" and str(reply.q.qname) == f"shop.{ZONE}."
    assert RCODE[ask(r, query(f"nope.{ZONE}")).header.rcode] == "NXDOMAIN"  # no location needed


def test_stats_index_rcode_and_region(responder: Responder, clients) -> None:
    a = responder.answer(query(f"shop.{ZONE}", ecs=clients["us-east"][0].subnet), b"\x7f\0\0\1")
    b = responder.answer(query(f"nope.{ZONE}"), b"\x7f\0\0\1")
    assert responder.stats.labels[a.index] == ("NOERROR", "us-east")
    assert responder.stats.labels[b.index] == ("NXDOMAIN", "")


def test_cache_size_zero_computes_every_answer(locator: Locator) -> None:
    r = Responder(make_view(), locator, cache_size=0)
    for qid in (1, 2, 3):
        assert addrs(ask(r, query(f"shop.{ZONE}", ecs="193.0.6.0/24", qid=qid))) == {"192.0.2.20"}
    assert not r.exact and r.stats.cache_hits == 0 and r.stats.cache_misses == 3


def test_a_parser_failure_gives_formerr_not_an_exception(responder: Responder, monkeypatch) -> None:
    def broken(data: bytes):
        raise IndexError("parser bug")

    monkeypatch.setattr("geodns.answer.parse_query", broken)
    reply = ask(responder, query(f"shop.{ZONE}", qid=77))
    assert RCODE[reply.header.rcode] == "FORMERR" and reply.header.id == 77


# -- reachability: unreachable gateways leave the answer; fail-open, never NODATA ---------------

# three placed regions, two gateways each; `down` lists the gateways found unreachable
REACH_REGIONS = {"eu-central": (50.11, 8.68, ["eu-1", "eu-2"]), "us-east": (39.04, -77.49, ["us-1", "us-2"]),
                 "ap-southeast": (1.29, 103.85, ["ap-1", "ap-2"])}
REACH_IPS = {"eu-1": "192.0.2.21", "eu-2": "192.0.2.22", "us-1": "192.0.2.11", "us-2": "192.0.2.12",
             "ap-1": "192.0.2.31", "ap-2": "192.0.2.32"}


def reach_view(down: set[str], dead: set[str] = frozenset(), pinned: tuple[str, ...] = ()) -> View:
    out = [f'[zone]\nname = "{ZONE}"\ndefault_region = "eu-central"\n']
    for name, (lat, lon, gws) in REACH_REGIONS.items():
        items = ", ".join(f'{{ name = "{g}", ipv4 = "{REACH_IPS[g]}", reachable = {str(g not in down).lower()}, '
                          f'alive = {str(g not in dead).lower()} }}' for g in gws)
        out.append(f'[[regions]]\nname = "{name}"\nlatitude = {lat}\nlongitude = {lon}\ngateways = [{items}]\n')
    out.append('[[apps]]\nname = "shop"\nregions = ["eu-central", "us-east"]\n')
    out.append('[[apps]]\nname = "pin"\nregions = ["eu-central"]\npinned_regions = ["eu-central"]\n')
    out.append('[[apps]]\nname = "orphan"\nregions = []\n')
    return static_state.view_from(tomllib.loads("".join(out)), revision=9)


EU_ALL, US_ALL, AP_ALL = {"eu-1", "eu-2"}, {"us-1", "us-2"}, {"ap-1", "ap-2"}


def served(r: Responder, wire: bytes, client: str = "127.0.0.1", tcp: bool = False) -> DNSRecord:
    """`ask`, counted the way the transports count an answer they send (`Stats.slow`/`tcp`)."""
    ans = r.answer(wire, socket.inet_pton(socket.AF_INET, client), tcp=tcp)
    assert ans.wire is not None and ans.index >= 0
    (r.stats.tcp if tcp else r.stats.slow)[ans.index] += 1
    return DNSRecord.parse(ans.wire)


@pytest.mark.parametrize("app, down, dead, answer, fail_open", [
    # one of the nearest hosting region's gateways is unreachable: only the other is answered
    ("shop", {"eu-2"}, set(), {"eu-1"}, False),
    # the whole nearest hosting region is unreachable: the next hosting region that users reach
    ("shop", EU_ALL, set(), US_ALL, False),
    # no hosting region is reachable: the nearest reachable region (its gateway forwards over the mesh)
    ("shop", EU_ALL | US_ALL, set(), AP_ALL, False),
    # an app without instances: the nearest reachable gateway, as before
    ("orphan", EU_ALL, set(), US_ALL, False),
    # every gateway unreachable: fail-open, the nearest hosting region's routable gateways
    ("shop", EU_ALL | US_ALL | AP_ALL, set(), EU_ALL, True),
    ("orphan", EU_ALL | US_ALL | AP_ALL, set(), EU_ALL, True),
    # fail-open only among routable gateways: a dead one is never answered
    ("shop", EU_ALL | US_ALL | AP_ALL, {"eu-1"}, {"eu-2"}, True),
    ("shop", US_ALL | AP_ALL, EU_ALL, US_ALL, True),
    # a pinned app never leaves its regions, not even to a reachable one: fail-open inside them
    ("pin", EU_ALL, set(), EU_ALL, True),
    ("pin", {"eu-1"}, set(), {"eu-2"}, False),
])
def test_unreachable_gateways_are_left_out_and_everything_unreachable_fails_open(
        locator: Locator, clients, app: str, down: set[str], dead: set[str], answer: set[str],
        fail_open: bool) -> None:
    r = Responder(reach_view(down, dead), locator)
    wire = query(f"{app}.{ZONE}", ecs=clients["eu-central"][0].subnet)
    for _ in range(2):  # computed, then from the cache: both counted
        reply = served(r, wire)
        assert reply.header.rcode == RCODE.NOERROR and addrs(reply) == {REACH_IPS[g] for g in answer}
    assert r.stats.snapshot()["fail_open"] == (2 if fail_open else 0)


def test_fail_open_is_never_nodata_and_is_exported(locator: Locator, clients) -> None:
    from geodns.metrics import GeoDnsCollector
    from geodns.stats import merge

    r = Responder(reach_view(EU_ALL | US_ALL | AP_ALL), locator)
    for client in ("us-east", "ap-southeast", "sa-east"):
        for qtype in ("A", "ANY"):
            reply = served(r, query(f"shop.{ZONE}", qtype, ecs=clients[client][0].subnet))
            assert reply.header.rcode == RCODE.NOERROR and reply.rr, (client, qtype)
    # gw.<region> fails open too
    assert addrs(served(r, query(f"gw.ap-southeast.{ZONE}"))) == {REACH_IPS[g] for g in AP_ALL}
    # over TCP as well
    assert addrs(served(r, query(f"shop.{ZONE}", ecs=clients["us-east"][0].subnet), tcp=True)) == \
        {REACH_IPS[g] for g in US_ALL}
    snap = merge([r.stats.snapshot(), r.stats.snapshot()])
    assert snap["fail_open"] == 2 * 8
    families = {m.name: m for m in GeoDnsCollector(lambda: snap).collect()}
    assert families["geomesh_dns_fail_open"].samples[0].value == 16
    assert families["geomesh_dns_fail_open"].samples[0].name == "geomesh_dns_fail_open_total"
    # and nothing is counted once a gateway is reachable again
    r.set_view(reach_view(EU_ALL | US_ALL | {"ap-1"}))
    before = r.stats.snapshot()["fail_open"]
    assert addrs(served(r, query(f"shop.{ZONE}", ecs=clients["us-east"][0].subnet))) == {"192.0.2.32"}
    assert r.stats.snapshot()["fail_open"] == before
