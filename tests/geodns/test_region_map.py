"""The compiled region map against direct database look-ups and the haversine ranking, and the
answer path on top of it: templates keep the question's case, answers rotate, and a map being
rebuilt never answers."""

from __future__ import annotations

import dataclasses
import math
import os
import random
import signal
import socket
import struct
import threading
import tomllib
from array import array
from bisect import bisect_right
from pathlib import Path

import pytest
from dnslib import DNSRecord

from geodns import static_state
from geodns.answer import Responder
from geodns.map_builder import BuilderGone, MapBuilder
from geodns.nearest import Locator, region_order
from geodns.region_map import (
    ALIAS,
    Networks,
    RegionMap,
    RegionSite,
    _overlay,
    _scope,
    compile_map,
    merge_runs,
    read_networks,
    sites_of,
    v4_index,
)
from geodns.view import View

from .clients import query
from .conftest import APPS, REGIONS, ZONE, gateway_ip, state_toml

SAMPLES = 100_000


@pytest.fixture(scope="session")
def networks(mmdb: Path) -> Networks:
    """The database walked once per session (several seconds)."""
    return read_networks(mmdb)


@pytest.fixture(scope="module")
def view() -> View:
    return static_state.view_from(tomllib.loads(state_toml()), revision=7)


@pytest.fixture(scope="module")
def region_map(networks: Networks, view: View) -> RegionMap:
    return compile_map(networks, sites_of(view.regions.values()), view.zone.default_region)


@pytest.fixture(scope="module")
def locator(mmdb: Path) -> Locator:
    return Locator(mmdb, memo_size=1 << 20)


def _v6_samples(networks: Networks, rng: random.Random, n: int) -> list[int]:
    """Addresses inside the database's IPv6 runs (a random run, a random address in it): random
    128-bit addresses would almost all fall in unallocated space."""
    starts = networks.v6_starts
    out = []
    for _ in range(n):
        i = rng.randrange(len(starts))
        end = starts[i + 1] if i + 1 < len(starts) else 1 << 128
        out.append(starts[i] + rng.randrange(end - starts[i]))
    return out


def test_map_agrees_with_the_database_and_the_haversine(region_map: RegionMap, locator: Locator, view: View,
                                                        networks: Networks) -> None:
    """On 100k random IPv4 and IPv6 addresses: the same ranking as a City look-up plus
    `region_order`, and a scope no narrower than the database network that placed the address.
    On a sample, the scope is honest: its first and last addresses rank the same."""
    rng = random.Random(18)
    v4 = [rng.getrandbits(32).to_bytes(4, "big") for _ in range(SAMPLES // 2)]
    v6 = [a.to_bytes(16, "big") for a in _v6_samples(networks, rng, SAMPLES // 2)]
    regions, default = view.regions, view.zone.default_region
    orders: dict[tuple, tuple[str, ...]] = {}

    def expected(packed: bytes, prefix: int | None = None) -> tuple[tuple[str, ...], int]:
        place = locator.locate(packed, prefix)
        where = (place.latitude, place.longitude) if place.known else None
        order = orders.get(where)  # type: ignore[arg-type]
        if order is None:
            order = orders[where] = tuple(r.name for r in region_order(regions, place, default))  # type: ignore[index]
        return order, place.prefix

    placed = 0
    for i, packed in enumerate(v4 + v6):
        ranking, scope = region_map.lookup(packed)
        want, db_prefix = expected(packed)
        assert ranking == want, f"{_text(packed)}: map {ranking[:3]}, database {want[:3]}"
        assert scope <= db_prefix, f"{_text(packed)}: scope /{scope} narrower than the database's /{db_prefix}"
        placed += want[0] != default
        if i % 20 == 0:  # honesty: the whole scope network ranks the same
            bits = len(packed) * 8
            a = int.from_bytes(packed, "big")
            first = a >> (bits - scope) << (bits - scope) if scope else 0
            last = first | ((1 << (bits - scope)) - 1)
            for edge in (first, last):
                assert expected(edge.to_bytes(len(packed), "big"))[0] == ranking, (
                    f"{_text(packed)}/{scope}: {_text(edge.to_bytes(len(packed), 'big'))} ranks differently")
    assert placed > SAMPLES // 20, "the sample hardly touched placed networks"


def test_ecs_prefixes_rank_like_the_masked_address(region_map: RegionMap, locator: Locator, view: View) -> None:
    rng = random.Random(7)
    for _ in range(5000):
        packed = rng.getrandbits(32).to_bytes(4, "big")
        ranking, scope = region_map.lookup(packed, 24)
        place = locator.locate(packed, 24)
        assert ranking == tuple(r.name for r in region_order(view.regions, place, view.zone.default_region))
        masked = int.from_bytes(packed, "big") >> 8 << 8
        assert region_map.lookup(masked.to_bytes(4, "big"))[0] == ranking


@pytest.mark.parametrize("address, prefix", [
    ("10.1.2.3", 32), ("192.168.7.0", 24), ("127.0.0.1", None), ("::1", None), ("fd00:1::", 48),
    ("2001:db8::", 32), ("::ffff:10.0.0.1", None),
])
def test_special_purpose_addresses_stand_at_the_default_region(region_map: RegionMap, view: View, address: str,
                                                               prefix: int | None) -> None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    ranking, _ = region_map.lookup(socket.inet_pton(family, address), prefix)
    assert ranking[0] == view.zone.default_region


def test_ipv4_mapped_and_6to4_follow_into_the_ipv4_map(region_map: RegionMap, networks: Networks) -> None:
    assert len(networks.v6_aliases) >= 2
    v4 = socket.inet_aton("193.0.6.1")
    ranking, scope = region_map.lookup(v4)
    for text, depth in (("::ffff:193.0.6.1", 96), ("2002:c100:601::", 16)):
        mapped, mscope = region_map.lookup(socket.inet_pton(socket.AF_INET6, text))
        assert mapped == ranking, text
        assert mscope == depth + scope or text.startswith("::ffff"), text


# -- pure pieces, table tests -------------------------------------------------------------------


@pytest.mark.parametrize("a, lo, hi, bits, want", [
    (0x0A000000, 0x0A000000, 0x0B000000, 32, 8),  # the whole /8 block
    (0x0A000100, 0x0A000000, 0x0A000300, 32, 23),  # [10.0.0.0, 10.0.3.0): the /23 is inside, the /22 is not
    (0x0A000000, 0x0A000000, 0x0A000300, 32, 23),
    (0x0A000200, 0x0A000000, 0x0A000300, 32, 24),
    (5, 0, 1 << 32, 32, 0),  # one block for everything: scope 0
    (0x0A000080, 0x0A000080, 0x0A0000C0, 32, 26),
])
def test_scope(a: int, lo: int, hi: int, bits: int, want: int) -> None:
    assert _scope(a, lo, hi, bits) == want


@pytest.mark.parametrize("starts", [
    [0],
    [0, 1, 0xFFFF, 0x10000, 0x10001, 0xFFFF0000, 0xFFFFFFFF],
    [0, 0x0A000000, 0x0A000100, 0x0A010000, 0xC0A80000, 0xC0A80001, 0xC0A90000],
    [0, *range(0x01000000, 0x01000000 + 5000 * 256, 256)],
])
def test_v4_index_bisects_like_the_whole_array(starts: list[int]) -> None:
    """The /16 index narrows a look-up to its /16's blocks and still finds the block a whole-array
    bisect finds: at every start, one either side of it, /16 edges, and random addresses."""
    arr = array("I", starts)
    index = v4_index(arr)
    rng = random.Random(5)
    probes = {a for s in starts for a in (s - 1, s, s + 1) if 0 <= a < 1 << 32}
    probes |= {p << 16 | e for p in (0, 1, 0x0A00, 0x0A01, 0xC0A8, 0xFFFF) for e in (0, 0xFFFF)}
    probes |= {rng.getrandbits(32) for _ in range(2000)}
    for a in probes:
        top = a >> 16
        assert bisect_right(arr, a, index[top], index[top + 1]) - 1 == bisect_right(arr, a) - 1, hex(a)


def test_overlay_and_merge() -> None:
    starts, values = array("I", [0, 100, 200]), array("I", [1, 2, 3])
    s, v = _overlay(starts, values, [(150, 250)], 0, 1000)
    assert (list(s), list(v)) == ([0, 100, 150, 250], [1, 2, 0, 3])
    s, v = _overlay(starts, values, [(0, 100)], 0, 1000)
    assert (list(s), list(v)) == ([0, 100, 200], [0, 2, 3])
    s, v = _overlay(starts, values, [(900, 1000)], 0, 1000)
    assert (list(s), list(v)) == ([0, 100, 200, 900], [1, 2, 3, 0])
    s, v = merge_runs(array("I", [0, 5, 9, 12]), array("I", [4, 4, 7, 4]))
    assert (list(s), list(v)) == ([0, 9, 12], [4, 7, 4])


def test_rankings_ties_and_unplaced() -> None:
    tiny = Networks(array("d", [math.nan, 0.0, 50.1]), array("d", [math.nan, 0.0, 8.7]),
                    array("I", [0, 1 << 24, 2 << 24]), array("I", [0, 1, 2]), array("Q", [0]), array("Q", [0]),
                    array("I", [0]), (), 0, "GeoLite2-City", "", 3)
    sites = [RegionSite("b", 0, 10), RegionSite("a", 0, -10), RegionSite("eu", 50.1, 8.7)]
    m = compile_map(tiny, sites, "eu")
    assert m.lookup(bytes([0, 0, 0, 1]))[0][0] == "eu"  # unplaced: stands at the default region
    assert m.lookup(bytes([1, 0, 0, 1]))[0][:2] == ("a", "b")  # equal distance: by name
    assert m.lookup(bytes([2, 0, 0, 1]))[0][0] == "eu"
    assert compile_map(tiny, sites, "").lookup(bytes([0, 0, 0, 1]))[0] == ("a", "b", "eu")  # by name
    assert not any(r & ALIAS for r in m.v4_ranks)


# -- the answer path on the map ---------------------------------------------------------------------


def _ask(r: Responder, wire: bytes, client: bytes = b"\x7f\0\0\1", tcp: bool = False) -> DNSRecord:
    ans = r.answer(wire, client, tcp=tcp)
    assert ans.wire is not None
    return DNSRecord.parse(ans.wire)


def _addrs(reply: DNSRecord) -> list[str]:
    return [str(rr.rdata) for rr in reply.rr]


def test_map_answers_like_the_lookup_path(region_map: RegionMap, locator: Locator, view: View, clients) -> None:
    with_map = Responder(view, locator, region_map=region_map)
    without = Responder(view, locator)
    for picks in clients.values():
        for c in picks:
            wire = query(f"shop.{ZONE}", ecs=c.subnet)
            assert set(_addrs(_ask(with_map, wire))) == set(_addrs(_ask(without, wire))) == gateway_ip(c.nearest)


def test_question_case_is_kept(region_map: RegionMap, locator: Locator, view: View, clients) -> None:
    r = Responder(view, locator, region_map=region_map, reply_cache=False)
    subnet = clients["eu-central"][0].subnet
    for name in ("ShOp.GeO.ExAmPlE.cOm", f"shop.{ZONE}", f"SHOP.{ZONE.upper()}"):
        reply = _ask(r, query(name, ecs=subnet))
        assert str(reply.q.qname) == name + "."
        assert all(str(rr.rname) == name + "." for rr in reply.rr)


def test_answers_rotate_across_a_regions_gateways(region_map: RegionMap, locator: Locator, view: View,
                                                  clients) -> None:
    """us-east has two healthy gateways: consecutive answers list them in turn."""
    r = Responder(view, locator, region_map=region_map, reply_cache=False)
    subnet = clients["sa-east"][0].subnet  # blog is hosted in us-east only
    firsts = [_addrs(_ask(r, query(f"blog.{ZONE}", ecs=subnet, qid=i)))[0] for i in range(6)]
    assert set(firsts) == {"192.0.2.10", "192.0.2.11"} and firsts[0] != firsts[1]
    tcp = [_addrs(_ask(r, query(f"big.{ZONE}", qid=i), tcp=True)) for i in range(3)]
    assert all(sorted(t) == sorted(tcp[0]) and len(t) == 40 for t in tcp)
    assert tcp[1] == tcp[0][1:] + tcp[0][:1] and tcp[2] == tcp[0][2:] + tcp[0][:2]


def test_a_rebuild_under_load_never_answers_from_a_half_built_map(networks: Networks, locator: Locator,
                                                                 view: View, clients) -> None:
    """While a thread compiles a map for moved regions, the answer loop keeps answering from the
    old map; once swapped, from the new one; never anything else."""
    old = compile_map(networks, sites_of(view.regions.values()), view.zone.default_region)
    # move every region but eu-central to the antipodes: the new map sends Europe elsewhere
    moved = [RegionSite(s.name, s.latitude, s.longitude) if s.name == "eu-central" else
             RegionSite(s.name, -s.latitude, s.longitude + 180 if s.longitude <= 0 else s.longitude - 180)
             for s in sites_of(view.regions.values())]
    new_holder: list[RegionMap] = []
    builder = threading.Thread(target=lambda: new_holder.append(compile_map(networks, moved, "eu-central")))
    r = Responder(view, locator, region_map=old, reply_cache=False, cache_size=0)
    eu = clients["au-east"][0].subnet
    want_old = gateway_ip("au-east")
    builder.start()
    answered = 0
    while builder.is_alive() and answered < 200_000:
        got = set(_addrs(_ask(r, query(f"shop.{ZONE}", ecs=eu, qid=answered & 0xFFFF))))
        assert got == want_old, f"answer {answered} during the build: {got}"
        answered += 1
    builder.join(timeout=60)
    assert new_holder and answered > 0
    r.set_map(new_holder[0])
    new = new_holder[0].lookup(socket.inet_aton(eu.split("/")[0]), 24)[0]
    assert new != old.lookup(socket.inet_aton(eu.split("/")[0]), 24)[0]
    got = set(_addrs(_ask(r, query(f"shop.{ZONE}", ecs=eu))))
    first_hosting = next(name for name in new if name in REGIONS and name != "ap-northeast" and name != "us-west")
    assert got == gateway_ip(first_hosting)


def _text(packed: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed)


# -- the fast path: the same bytes as the full path, and the same refusals -----------------------


def _ecs_query(name: str, family: int, source: int, address: bytes, *, scope: int = 0, qid: int = 7,
               payload: int = 1232, do: bool = False, version: int = 0) -> bytes:
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    option = struct.pack("!HHHBB", 8, 4 + len(address), family, source, scope) + address
    opt = b"\0" + struct.pack("!HHBBHH", 41, payload, 0, version, 0x8000 if do else 0, len(option)) + option
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 1) + qname + struct.pack("!HH", 1, 1) + opt


@pytest.mark.parametrize("name, family, source, address, payload, do", [
    ("ShOp.GeO.eXaMpLe.CoM", 1, 24, bytes([193, 0, 6]), 1232, False),
    ("shop.geo.example.com", 1, 20, bytes([193, 0, 0]), 512, True),
    ("pinned.geo.example.com", 1, 32, bytes([8, 8, 8, 8]), 4096, False),
    ("shop.geo.example.com", 2, 48, bytes.fromhex("2a0014500000"), 1232, False),
    ("shop.geo.example.com", 2, 56, bytes.fromhex("2a001450000000"), 1232, False),
    ("nope.geo.example.com", 1, 24, bytes([193, 0, 6]), 1232, False),  # NXDOMAIN, scope 0
    ("geo.example.com", 1, 24, bytes([193, 0, 6]), 1232, False),
])
def test_the_fast_path_gives_the_full_paths_bytes(region_map: RegionMap, locator: Locator, view: View, name: str,
                                                  family: int, source: int, address: bytes, payload: int,
                                                  do: bool) -> None:
    r = Responder(view, locator, region_map=region_map, reply_cache=False)
    wire = _ecs_query(name, family, source, address, payload=payload, do=do)
    full = r.answer(wire, b"\x7f\0\0\1")
    assert r._fast(wire, 7, 0x0100, wire[2:]) is not None, "the second ask is answered from the template"
    fast = r.answer(_ecs_query(name, family, source, address, payload=payload, do=do, qid=8), b"\x7f\0\0\1")
    assert full.wire is not None and fast.wire is not None
    assert fast.wire[2:] == full.wire[2:] and fast.wire[:2] == b"\0\x08" and fast.index == full.index
    qend = wire.index(b"\0", 12) + 5
    assert fast.wire[12:qend] == wire[12:qend]  # the question as asked, case kept


@pytest.mark.parametrize("family, source, address, scope", [
    (2, 129, bytes(17), 0),  # prefix longer than the address
    (1, 33, bytes(5), 0),
    (2, 56, bytes(6), 0),  # 6 octets for a /56
    (2, 56, bytes(7) + b"\1", 0),  # 8 octets for a /56
    (1, 24, bytes([193, 0, 6]), 24),  # a scope in a query
    (3, 24, bytes([193, 0, 6]), 0),  # no such family
    (1, 20, bytes([193, 0, 0x0F]), 0),  # bits past the prefix
])
def test_malformed_client_subnet_is_formerr_with_the_map(region_map: RegionMap, locator: Locator, view: View,
                                                         family: int, source: int, address: bytes,
                                                         scope: int) -> None:
    r = Responder(view, locator, region_map=region_map)
    good = _ecs_query("shop.geo.example.com", 1, 24, bytes([193, 0, 6]))
    r.answer(good, b"\x7f\0\0\1")  # a template is ready
    wire = _ecs_query("shop.geo.example.com", family, source, address, scope=scope)
    reply = DNSRecord.parse(r.answer(wire, b"\x7f\0\0\1").wire)
    assert reply.header.rcode == 1  # FORMERR


@pytest.mark.parametrize("family, source, address", [(2, 0, b""), (1, 0, b""), (2, 56, bytes(7))])
def test_ecs_zero_and_56_with_the_map(region_map: RegionMap, locator: Locator, view: View, family: int, source: int,
                                      address: bytes) -> None:
    r = Responder(view, locator, region_map=region_map)
    for _ in range(2):  # full path, then from the template
        reply = DNSRecord.parse(r.answer(_ecs_query("shop.geo.example.com", family, source, address),
                                         b"\x7f\0\0\1").wire)
        assert reply.header.rcode == 0 and reply.rr
        echo = next(o for ar in reply.ar if ar.rtype == 41 for o in ar.rdata if o.code == 8)
        fam, src, scope = struct.unpack_from("!HBB", echo.data)
        assert (fam, src) == (family, source) and (scope == 0 if source == 0 else scope <= 128)


def test_truncated_opt_is_formerr_with_the_map(region_map: RegionMap, locator: Locator, view: View) -> None:
    r = Responder(view, locator, region_map=region_map)
    good = _ecs_query("shop.geo.example.com", 1, 24, bytes([193, 0, 6]))
    r.answer(good, b"\x7f\0\0\1")
    for cut in (1, 3, 8):
        reply = r.answer(good[:-cut], b"\x7f\0\0\1")
        assert reply.wire is not None and DNSRecord.parse(reply.wire[:12] + b"").header.rcode == 1


def test_the_fast_path_keeps_a_reply_on_its_second_sight(region_map: RegionMap, locator: Locator,
                                                         view: View) -> None:
    """The fast path's doorkeeper (fed the reply-cache key the look-up cut) keeps a reply on the
    second sight of the query's bytes, not the first; the cached reply then differs only in ID."""
    r = Responder(view, locator, region_map=region_map)
    wire = _ecs_query("ShOp.GeO.eXaMpLe.CoM", 1, 24, bytes([193, 0, 7]), qid=1)
    r.answer(_ecs_query("shop.geo.example.com", 1, 24, bytes([193, 0, 6])), b"\x7f\0\0\1")  # builds the template
    first = r._fast(wire, 1, 0x0100, wire[2:])
    assert first is not None and wire[2:] not in r.exact, "the first sight is only remembered"
    second = r._fast(wire, 1, 0x0100, wire[2:])
    assert second is not None and r.exact[wire[2:]] == (second.wire[2:], second.index)
    again = r.answer(b"\xbe\xef" + wire[2:], b"\x7f\0\0\1")
    assert again.wire == b"\xbe\xef" + second.wire[2:] and b"ShOp" in again.wire


def test_every_ranking_is_kept_without_turning_the_cache_over(region_map: RegionMap, locator: Locator,
                                                               view: View) -> None:
    """Clients from many rankings asking a few names: far more (name, ranking) pairs than a
    cache generation of 16 entries holds. The answers are kept per ranking in the name's entry,
    so nothing is evicted, the second pass is answered from the cache alone, and every answer
    names the gateways a fresh server gives."""
    rng = random.Random(11)
    subnets: dict[int, bytes] = {}
    while len(subnets) < 60:  # one /24 per ranking, 60 rankings
        a = rng.getrandbits(24).to_bytes(3, "big")
        rank, _ = region_map.locate(a + b"\0", 24)
        if a[0] not in (0, 10, 127) and a[0] < 224:
            subnets.setdefault(rank, a)
    names = ["shop.geo.example.com", "blog.geo.example.com", "pinned.geo.example.com"]
    r = Responder(view, locator, region_map=region_map, reply_cache=False, cache_size=32)
    queries = [_ecs_query(n, 1, 24, a, qid=i) for i, (n, a) in enumerate((n, a) for n in names
                                                                        for a in subnets.values())]
    first = [r.answer(q, b"\x7f\0\0\1").wire for q in queries]
    misses, hits = r.stats.cache_misses, r.stats.cache_hits
    assert 0 < misses < len(subnets)  # built once per (name, region), not per ranking
    second = [r.answer(q, b"\x7f\0\0\1").wire for q in queries]
    assert r.stats.cache_misses == misses and r.stats.cache_hits == hits + len(queries)
    assert r.templates.evictions == 0
    fresh = [Responder(view, locator, region_map=region_map, reply_cache=False).answer(q, b"\x7f\0\0\1").wire
             for q in queries]
    def addresses(wires: list[bytes | None]) -> list[set[str]]:  # a region's gateways rotate
        return [set(_addrs(DNSRecord.parse(w))) for w in wires if w is not None]

    assert addresses(first) == addresses(second) == addresses(fresh) and len(addresses(first)) == len(queries)


def test_a_zero_octet_inside_a_label_is_left_to_the_full_path(region_map: RegionMap, locator: Locator,
                                                                view: View) -> None:
    """The fast path takes a name to end at its first zero octet; a label holding one makes that
    a name no cache key can be, so the full path answers it, and the same way every time."""
    r = Responder(view, locator, region_map=region_map, reply_cache=False)
    odd = _ecs_query("sh\0p.geo.example.com", 1, 24, bytes([193, 0, 6]))
    first = r.answer(odd, b"\x7f\0\0\1")
    assert r._fast(odd, 7, 0x0100, odd[2:]) is None
    again = r.answer(odd, b"\x7f\0\0\1")
    assert first.wire is not None and again.wire == first.wire
    reply = DNSRecord.parse(first.wire)
    assert reply.header.rcode == 3 and reply.q.qname.label[0] == b"sh\0p"  # NXDOMAIN, the name as asked


def test_the_builder_process_compiles_the_map_the_server_would(mmdb: Path, networks: Networks, view: View,
                                                               region_map: RegionMap, tmp_path: Path) -> None:
    """The map builder (a child process) walks the database and compiles the same map as the
    stages run here; a failed load keeps the database it had; a builder that died says so and the
    next load starts a new one."""
    builder = MapBuilder(timeout=120)
    want = (sites_of(view.regions.values()), view.zone.default_region)
    try:
        info = builder.load(mmdb)
        assert (info.leaves, info.build_epoch, info.places) == (networks.leaves, networks.build_epoch,
                                                                len(networks.latitudes) - 1)
        built = builder.compile(*want)
        for f in dataclasses.fields(RegionMap):
            assert getattr(built, f.name) == getattr(region_map, f.name), f.name
        with pytest.raises(ValueError):
            builder.load(tmp_path / "missing.mmdb")
        assert builder.compile(*want).v4_ranks == region_map.v4_ranks  # the database loaded before
        pid = builder.pid
        assert pid is not None and pid != os.getpid()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(BuilderGone):
            builder.compile(*want)
        assert builder.pid is None and builder.loaded is None
        assert builder.load(mmdb).leaves == networks.leaves and builder.pid not in (None, pid)
    finally:
        builder.close()


def test_an_app_update_keeps_the_fast_path_of_the_other_names(region_map: RegionMap, locator: Locator,
                                                              view: View, clients) -> None:
    """With the map, a name's templates live in its `GeoMarker`'s slots: an update that moves
    one app keeps the other names' slots (answered by the fast path straight away) and drops
    the moved app's marker, whose target held its old hosting, and the slots of answers without
    records (their SOA carries the old serial); every answer is the one a fresh server on the new
    view gives."""
    r = Responder(view, locator, region_map=region_map)
    subnets = [c.subnet for picks in clients.values() for c in picks]
    shop = [query(f"shop.{ZONE}", qtype, ecs=s) for qtype in ("A", "AAAA") for s in subnets]
    blog = [query(f"blog.{ZONE}", qtype, ecs=s) for qtype in ("A", "AAAA") for s in subnets]
    big_aaaa = [query(f"big.{ZONE}", "AAAA", ecs=s) for s in subnets]  # us-west has no IPv6 gateway: NODATA
    for w in shop + blog + big_aaaa:
        r.answer(w, b"\x7f\0\0\1")
    moved = static_state.view_from(tomllib.loads(state_toml(apps={**APPS, "shop": ["au-east"]})), revision=8)
    r.set_view(moved)
    fresh = Responder(moved, locator, region_map=region_map)
    assert all(r._fast(w, 4242, 0, w[2:]) is not None for w in blog), "blog's slots were dropped"
    assert all(r._fast(w, 4242, 0, w[2:]) is None for w in shop), "shop kept a template of its old hosting"
    assert all(r._fast(w, 4242, 0, w[2:]) is None for w in big_aaaa), "a NODATA slot outlived its view"
    for w in shop + blog + big_aaaa:
        mine, theirs = _ask(r, w), _ask(fresh, w)
        assert set(_addrs(mine)) == set(_addrs(theirs)) and str(mine.auth) == str(theirs.auth), mine
    assert all(" 8 " in str(_ask(r, w).auth) for w in big_aaaa)  # the SOA of the new view's revision
    assert all(set(_addrs(_ask(r, w))) == gateway_ip("au-east") for w in shop[:len(subnets)])
