"""A routing update that changes only apps, instances or TXT records keeps the templates of the
names it leaves as they were (`Responder.set_view`, `answer.same_answer`): those names stay on the
fast path, and every answer is still the one a server started on the new view gives.

The oracle is a fresh `Responder` on each view: after every update, each question (names of every
kind, several record types, ECS clients on several continents) gets the same rcode, the same
records and the same ECS scope from the updated responder as from the fresh one."""

from __future__ import annotations

import socket
import tomllib
from pathlib import Path

import pytest
from dnslib import QTYPE, DNSRecord

from geodns import answer, static_state
from geodns.answer import Responder
from geodns.cache import BoundedCache
from geodns.nearest import Locator
from geodns.view import View

from .clients import query
from .conftest import APPS, REGIONS, ZONE, state_toml

CLIENT = socket.inet_pton(socket.AF_INET, "127.0.0.1")
NAMES = ["shop", "blog", "big", "orphan", "pinned", "newapp", "nope", "shop-8443s", "newapp-80", "gw.us-east",
         "ns1", ""]
QTYPES = ["A", "AAAA", "TXT", "SOA"]


@pytest.fixture(scope="module")
def locator(mmdb: Path) -> Locator:
    return Locator(mmdb)


def view(apps: dict, revision: int, regions: dict = REGIONS) -> View:
    return static_state.view_from(tomllib.loads(state_toml(regions, apps)), revision=revision)


def questions(clients) -> list[bytes]:
    subnets = [c.subnet for picks in clients.values() for c in picks[:1]]
    out = []
    for name in NAMES:
        fqdn = f"{name}.{ZONE}" if name else ZONE
        for qtype in QTYPES:
            out.append(query(fqdn, qtype, edns=False))
            out += [query(fqdn, qtype, ecs=s) for s in subnets]
    return out


def seen(r: Responder, wire: bytes) -> tuple:
    """What a client sees of the reply: rcode, flags, each section's records (order aside) and the OPT."""
    ans = r.answer(wire, CLIENT)
    assert ans.wire is not None
    rec = DNSRecord.parse(ans.wire)
    def section(rrs: list) -> list[str]:
        return sorted(f"{rr.rname} {rr.ttl} {QTYPE[rr.rtype]} {rr.rdata}" for rr in rrs)
    opt = [(o.code, o.data) for ar in rec.ar if ar.rtype == QTYPE.OPT for o in ar.rdata]
    return (rec.header.rcode, rec.header.aa, rec.header.tc, section(rec.rr), section(rec.auth),
            section([ar for ar in rec.ar if ar.rtype != QTYPE.OPT]), opt)


def test_answers_after_each_update_are_those_of_a_fresh_server(locator: Locator, clients) -> None:
    updates = [
        APPS,
        {**APPS, "shop": ["eu-central"]},                       # an app moved
        {**APPS, "shop": ["eu-central"], "newapp": ["au-east"]},  # an app added (was NXDOMAIN)
        {k: v for k, v in APPS.items() if k != "blog"},          # an app removed
        {k: v for k, v in APPS.items() if k != "blog"},          # nothing but the revision
        {**APPS, "orphan": ["sa-east"], "big": []},              # one app gets a home, another loses it
    ]
    wires = questions(clients)
    r = Responder(view(updates[0], 10), locator)
    for i, apps in enumerate(updates):
        v = view(apps, 10 + i)
        r.set_view(v)
        fresh = Responder(v, locator)
        for _ in range(2):  # the first pass fills the caches, the second answers from them
            for w in wires:
                assert seen(r, w) == seen(fresh, w), (i, DNSRecord.parse(w).q)


def test_names_the_update_leaves_alone_stay_cached_and_the_moved_app_does_not(locator: Locator, clients) -> None:
    r = Responder(view(APPS, 1), locator)
    ecs = next(iter(clients.values()))[0].subnet
    shop, blog = query(f"shop.{ZONE}", ecs=ecs), query(f"blog.{ZONE}", ecs=ecs)
    r.answer(shop, CLIENT)
    r.answer(blog, CLIENT)
    r.set_view(view({**APPS, "shop": ["au-east"]}, 2))
    hits, misses = r.stats.cache_hits, r.stats.cache_misses
    assert seen(r, blog)[3] == seen(Responder(view(APPS, 2), locator), blog)[3]
    assert (r.stats.cache_hits, r.stats.cache_misses) == (hits + 1, misses), "blog's template was dropped"
    assert {rr.split()[-1] for rr in seen(r, shop)[3]} == {"192.0.2.60"}  # au-east's gateway now
    assert r.stats.cache_misses == misses + 1, "shop answered from the template of its old hosting"


def test_negative_answers_carry_the_new_serial(locator: Locator) -> None:
    r = Responder(view(APPS, 5), locator)
    nope = query(f"nope.{ZONE}")
    assert " 5 " in seen(r, nope)[4][0]  # NXDOMAIN with the SOA of revision 5
    r.set_view(view(APPS, 6))
    assert " 6 " in seen(r, nope)[4][0]


def test_a_gateway_change_drops_every_template(locator: Locator, clients) -> None:
    r = Responder(view(APPS, 1), locator)
    wire = query(f"shop.{ZONE}", ecs=clients["us-east"][0].subnet)
    assert {rr.split()[-1] for rr in seen(r, wire)[3]} == {"192.0.2.10", "192.0.2.11"}
    drained = {**REGIONS, "us-east": (39.04, -77.49, [("us-1", "192.0.2.10", "", "active"),
                                                      ("us-2", "192.0.2.11", "", "draining")])}
    r.set_view(view(APPS, 2, drained))
    assert len(r.templates) == 0
    assert {rr.split()[-1] for rr in seen(r, wire)[3]} == {"192.0.2.10"}


def sized(key: str, value: str) -> int:
    return len(key) + len(value)


def test_retain_keeps_replaces_and_drops_in_each_generation() -> None:
    c: BoundedCache[str, str] = BoundedCache(1000, 100, sized)
    c.put("a", "x" * 300)
    c.put("b", "y" * 300)  # a now in the previous generation
    c.put("c", "z" * 10)
    dropped = c.retain(lambda k, v: None if k == "b" else (v[:5] if k == "a" else v))
    assert dropped == 1
    assert c.get("a") == "xxxxx" and c.get("b") is None and c.get("c") == "z" * 10
    assert c.bytes == sized("a", "xxxxx") + sized("c", "z" * 10)
    assert c.evictions == 0


def test_a_cache_too_large_to_check_starts_empty(locator: Locator, clients, monkeypatch: pytest.MonkeyPatch) -> None:
    r = Responder(view(APPS, 1), locator)
    for w in questions(clients)[:40]:
        r.answer(w, CLIENT)
    assert len(r.templates) > 3
    monkeypatch.setattr(answer, "RETAIN_MAX", len(r.templates) - 1)
    r.set_view(view(APPS, 2))  # the same apps: every record answer would otherwise stay
    assert len(r.templates) == 0
