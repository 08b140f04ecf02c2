"""Load-balancing policies through the real proxy, and the consistent-hash property on 10,000 clients."""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import Counter

import pytest

from regional_gateway.proxy.balancers import IpHash, LeastConnections, RoundRobin
from regional_gateway.proxy.consistent_hash import HashRing
from tests.proxy.client import Conn, get

ZONE = "apps.test"


def routes(policy: str, backends: list) -> dict:
    return {"zone": ZONE, "health": {"check": "none"},
            "apps": [{"name": "shop", "lb": policy, "backends": backends}]}


def test_round_robin_spreads_evenly(backends, gateway):
    bs = backends(3)
    g = gateway(routes("round_robin", [b.address for b in bs]))
    with Conn(g.http) as c:
        seen = Counter(c.request(f"shop.{ZONE}").header("x-backend") for _ in range(300))
    assert seen == {"b1": 100, "b2": 100, "b3": 100}
    seen = Counter(get(g.http, f"shop.{ZONE}").header("x-backend") for _ in range(30))  # new connections too
    assert seen == {"b1": 10, "b2": 10, "b3": 10}


def _hold_slow(addr, host: str, n: int, ms: int) -> list[threading.Thread]:
    threads = [threading.Thread(target=get, args=(addr, host, f"/slow?ms={ms}"), daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def _wait(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


@pytest.mark.parametrize("policy,expect_on_busy", [("least_connections", 0), ("round_robin", 10)])
def test_least_connections_avoids_the_backend_holding_slow_requests(backends, gateway, policy, expect_on_busy):
    b1, b2, b3 = backends(3)
    g = gateway(routes(policy, [{"address": "127.0.0.1", "port": b1.port, "id": "slow-one"}, b2.address,
                                b3.address]))
    held = _hold_slow(g.http, f"slow-one.{ZONE}", 4, 1500)  # four requests in flight on b1 only
    _wait(lambda: b1.inflight == 4)
    with Conn(g.http) as c:
        seen = Counter(c.request(f"shop.{ZONE}").header("x-backend") for _ in range(30))
    assert seen["b1"] == expect_on_busy, seen
    assert seen["b2"] + seen["b3"] == 30 - expect_on_busy
    for t in held:
        t.join(5)
    # with nothing in flight, least connections spreads again
    with Conn(g.http) as c:
        seen = Counter(c.request(f"shop.{ZONE}").header("x-backend") for _ in range(30))
    assert set(seen) == {"b1", "b2", "b3"}


def test_ip_hash_keeps_each_client_on_one_backend(backends, gateway):
    bs = backends(3)
    data = routes("ip_hash", [b.address for b in bs])
    g = gateway(data)
    clients = [f"127.0.0.{i}" for i in range(10, 40)]
    owner = {}
    for ip in clients:
        seen = {get(g.http, f"shop.{ZONE}", source=ip).header("x-backend") for _ in range(4)}
        assert len(seen) == 1, (ip, seen)
        owner[ip] = seen.pop()
    assert len(set(owner.values())) == 3  # 30 clients land on every backend
    # b2 leaves: its clients move, everybody else stays where they were
    g.update(routes("ip_hash", [bs[0].address, bs[2].address]))
    for ip in clients:
        now = get(g.http, f"shop.{ZONE}", source=ip).header("x-backend")
        if owner[ip] != "b2":
            assert now == owner[ip], ip
        else:
            assert now in ("b1", "b3")
    # a backend that is down is skipped without moving anyone else (no rebuild)
    g.update(data)
    bs[1].stop()
    for ip in clients:
        now = get(g.http, f"shop.{ZONE}", source=ip).header("x-backend")
        assert now == owner[ip] if owner[ip] != "b2" else now in ("b1", "b3")


def _addresses(n: int) -> list[bytes]:
    base = int(ipaddress.IPv4Address("10.0.0.0"))
    return [str(ipaddress.IPv4Address(base + i * 7919)).encode() for i in range(n)]


@pytest.mark.parametrize("n", [2, 3, 5, 10, 25])
def test_removing_one_of_n_backends_moves_at_most_1_5_over_n(n):
    keys = [f"10.1.{i // 250}.{i % 250}:8080" for i in range(n)]
    clients = _addresses(10_000)
    full = HashRing(keys, str)
    before = {c: full.lookup(c) for c in clients}
    share = Counter(before.values())
    assert max(share.values()) < 10_000 * 1.5 / n, share  # no backend gets far more than its share
    for gone in keys:
        ring = HashRing([k for k in keys if k != gone], str)
        moved = sum(1 for c in clients if ring.lookup(c) != before[c])
        assert moved <= 10_000 * 1.5 / n, (gone, moved)
        # exactly the clients of the removed backend moved
        assert moved == share[gone]
        # and skipping it as unavailable gives the same answer as rebuilding without it
        assert all(full.lookup(c, lambda k, g=gone: k != g) == ring.lookup(c) for c in clients[:500])
    grown = HashRing([*keys, "10.9.9.9:8080"], str)
    moved = sum(1 for c in clients if grown.lookup(c) != before[c])
    assert moved <= 10_000 * 1.5 / (n + 1)


class _B:
    def __init__(self, key: str) -> None:
        self.key = key
        self.inflight = 0
        self.available = True


def test_policies_as_pure_decisions():
    bs = [_B(f"b{i}") for i in range(4)]
    rr = RoundRobin(bs)
    assert [rr.pick(bs, b"").key for _ in range(8)] == ["b0", "b1", "b2", "b3"] * 2
    assert rr.pick([], b"") is None
    lc = LeastConnections(bs)
    bs[0].inflight, bs[1].inflight, bs[2].inflight, bs[3].inflight = 5, 1, 0, 3
    assert lc.pick(bs, b"").key == "b2"
    bs[2].inflight = 9
    assert lc.pick(bs, b"").key == "b1"
    for b in bs:
        b.inflight = 0
    assert Counter(lc.pick(bs, b"").key for _ in range(40)) == {b.key: 10 for b in bs}  # ties rotate
    ih = IpHash(bs)
    first = ih.pick(bs, b"192.0.2.1")
    assert all(ih.pick(bs, b"192.0.2.1") is first for _ in range(5))
    first.available = False
    other = ih.pick([b for b in bs if b.available], b"192.0.2.1")
    assert other is not first and other is not None
    assert IpHash([]).pick([], b"x") is None
