"""What gateways report about themselves (load, connections, version, handshake ages) reaching
GetOverview: the pure rules (`heartbeats.check_handshakes`, `GatewayStats`, `views.overview`)
as tables, then through a real coordinator and etcd with simulated sessions (test_reach.py's)."""

from __future__ import annotations

import asyncio
import math

import pytest

from coordinator.heartbeats import GatewayStats, check_handshakes, checked_version
from geomesh.api import geomesh_pb2 as pb
from geomesh.lab.processes import free_port

from .test_reach import REGIONS, SimGateway, health, metrics, until

KNOWN = {"gw-a", "gw-b", "gw-c"}


def _hs(*entries: tuple[str, float]) -> list[pb.PeerHandshake]:
    return [pb.PeerHandshake(name=n, age_seconds=a) for n, a in entries]


@pytest.mark.parametrize(("entries", "limit", "accepted", "ignored"), [
    ([("gw-b", 3.0), ("gw-c", 0.0)], 3, {"gw-b": 3.0, "gw-c": 0.0}, {}),
    ([("gw-a", 1.0)], 3, {}, {"self": 1}),
    ([("ghost", 1.0)], 3, {}, {"unknown-peer": 1}),
    ([("gw-b", math.nan), ("gw-c", -1.0)], 3, {}, {"bad-age": 2}),
    ([("gw-b", math.inf)], 3, {}, {"bad-age": 1}),
    ([("gw-b", 2.0), ("gw-b", 9.0)], 3, {"gw-b": 2.0}, {"duplicate": 1}),
    ([("gw-b", 2.0), ("gw-c", 1.0), ("gw-b", 1.0), ("x", 1.0)], 2, {"gw-b": 2.0, "gw-c": 1.0}, {"too-many": 2}),
])
def test_check_handshakes(entries, limit, accepted, ignored):
    got, dropped = check_handshakes("gw-a", _hs(*entries), KNOWN, limit)
    assert got == accepted and dict(dropped) == ignored


def test_stats_ages_grow_never_stays_never_and_an_old_session_does_not_drop_a_new_one():
    stats = GatewayStats()
    first = stats.open("gw-a", "0.1.0")
    first.handshakes, first.handshakes_at = {"gw-b": 4.0, "gw-c": 0.0}, 100.0
    assert stats.handshakes("gw-a", 110.0) == {"gw-b": 14.0, "gw-c": 0.0}
    second = stats.open("gw-a", "0.2.0\x1b[31m" + "x" * 100)  # a new session replaces the report
    stats.close("gw-a", first)  # the old session's end leaves the new one's report
    assert stats.reports["gw-a"] is second and second.version == "0.2.0[31m" + "x" * 55
    stats.close("gw-a", second)
    assert stats.handshakes("gw-a", 0.0) == {} and "gw-a" not in stats.reports
    assert checked_version("1.2.3") == "1.2.3"


async def _mesh(coordinator, gateways: dict[str, str]) -> dict[str, SimGateway]:
    admin = coordinator.admin()
    for region in sorted(set(gateways.values())):
        lat, lon = REGIONS[region]
        await admin.CreateRegion(pb.Region(name=region, latitude=lat, longitude=lon))
    return {n: await SimGateway(coordinator, n, r, i + 1, version=f"9.{i}").start()
            for i, (n, r) in enumerate(gateways.items())}


async def test_heartbeats_reach_the_overview_and_bad_entries_are_ignored_and_counted(coordinator_factory):
    port = free_port()
    coordinator = coordinator_factory("--metrics-port", str(port))
    admin = coordinator.admin()
    sims = await _mesh(coordinator, {"gw-a": "eu", "gw-b": "us", "gw-c": "ap"})
    try:
        a = sims["gw-a"]
        a.beater.cancel()  # this test sends gw-a's heartbeats itself
        await a.send(pb.Heartbeat(load=0.25, active_connections=7, peers=_hs(("gw-b", 3.0), ("gw-c", 0.0))))
        h = await until(lambda: _with(admin, "gw-a", lambda h: len(h.peers) == 2), "gw-a's handshakes")
        assert (h.load, h.active_connections, h.version) == (0.25, 7, "9.0")
        ages = {p.name: p.age_seconds for p in h.peers}
        assert 3.0 <= ages["gw-b"] < 30 and ages["gw-c"] == 0.0  # 0: never
        assert (await health(admin, "gw-b")).version == "9.1"
        # a heartbeat without peers keeps the last set; bad entries are ignored, the session lives
        await a.send(pb.Heartbeat(load=0.5, active_connections=1))
        await until(lambda: _with(admin, "gw-a", lambda h: h.load == 0.5), "gw-a's new load")
        # at most the mesh size (3) entries are looked at: the last three are too many
        await a.send(pb.Heartbeat(load=0.5, peers=_hs(("gw-b", math.nan), ("gw-c", 1.5), ("ghost", 1.0),
                                                      ("gw-a", 1.0), ("gw-c", -2.0), ("gw-b", 2.0))))
        h = await until(lambda: _with(admin, "gw-a", lambda h: [p.name for p in h.peers] == ["gw-c"]),
                        "gw-a's checked handshakes")
        assert h.session == pb.SESSION_STATE_OPEN and not a.reader.done()
        text = await asyncio.to_thread(metrics, port)
        for reason, count in (("bad-age", 1), ("unknown-peer", 1), ("too-many", 3)):
            assert f'geomesh_coordinator_handshake_reports_ignored_total{{reason="{reason}"}} {count}.0' in text, reason
        # the session ends: its report goes with it
        a.reset()
        h = await until(lambda: _with(admin, "gw-a", lambda h: h.session != pb.SESSION_STATE_OPEN), "gw-a's end")
        assert (h.load, h.version, len(h.peers)) == (0.0, "", 0)
    finally:
        for sim in sims.values():
            sim.reset()


async def _with(admin, name: str, check) -> pb.GatewayHealth | None:
    h = await health(admin, name)
    return h if check(h) else None
