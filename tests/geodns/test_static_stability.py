"""GeoDNS static stability (issue 14): the saved view and the resync hold.

- `hold_dropped` (pure, table tests): a snapshot that leaves a region without a routable gateway
  keeps its previous gateways for the hold; a delta does not; the hold ends when one is back.
- A restarted geomesh-dns with no coordinator reachable answers the pre-outage gateways at once
  from its `--state-dir`; a corrupt saved file is refused with a log line and the server starts
  as if it had none (SERVFAIL for app names, never a crash).
- A coordinator restarted after its lease expired (the alive keys gone) sends a snapshot without
  routable gateways: the answers stay the pre-outage set for `--resync-hold`, then follow the
  table.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from geodns.feed import hold_dropped
from geomesh.model import Gateway, GatewayState, Region
from geomesh.routing_table import RoutingTable

from .clients import DnsProcess, dig
from .test_failover import GATEWAYS, ZONE, answer_set, seed_gateways, wait_answer, wg_key


def table(revision: int, **alive: bool) -> RoutingTable:
    gateways = [Gateway(name=n, region=GATEWAYS[n][0], public_ip=GATEWAYS[n][1], wg_port=51820,
                        wg_public_key=wg_key(i + 1), mesh_ip=f"10.99.0.{i + 1}", proxy_port=8080,
                        state=GatewayState.ACTIVE, alive=alive.get(n.replace("-", "_"), False))
                for i, n in enumerate(GATEWAYS)]
    regions = [Region(name="eu-central", latitude=50.11, longitude=8.68),
               Region(name="us-east", latitude=39.04, longitude=-77.49)]
    return RoutingTable.from_resources(revision, [*regions, *gateways])


def routable(t: RoutingTable) -> set[str]:
    return {n for n, g in t.gateways.items() if g.routable}


ALL = {"gw_eu_1": True, "gw_eu_2": True, "gw_us_1": True}
HOLD_CASES = [
    # (name, served, new, snapshot, held, now, want routable, want held)
    ("snapshot drops everything: all held", table(1, **ALL), table(2), True, {}, 100.0,
     {"gw-eu-1", "gw-eu-2", "gw-us-1"}, {"gw-eu-1": 115.0, "gw-eu-2": 115.0, "gw-us-1": 115.0}),
    ("snapshot keeps one in eu: eu not held, us held", table(1, **ALL), table(2, gw_eu_2=True), True, {}, 100.0,
     {"gw-eu-2", "gw-us-1"}, {"gw-us-1": 115.0}),
    ("delta drops a region: a real change", table(1, **ALL), table(2, gw_eu_1=True), False, {}, 100.0,
     {"gw-eu-1"}, {}),
    ("held, a delta: still held", table(1, **ALL), table(3), False, {"gw-us-1": 115.0}, 110.0,
     {"gw-us-1"}, {"gw-us-1": 115.0}),
    ("held, the hold is over", table(1, **ALL), table(3), False, {"gw-us-1": 115.0}, 116.0, set(), {}),
    ("held, one of its own back: hold over", table(1, **ALL), table(3, gw_us_1=True), False,
     {"gw-us-1": 115.0}, 110.0, {"gw-us-1"}, {}),
    ("nothing routable before: nothing to hold", table(1), table(2), True, {}, 100.0, set(), {}),
]


@pytest.mark.parametrize(("name", "served", "new", "snapshot", "held", "now", "want", "want_held"), HOLD_CASES,
                         ids=[c[0] for c in HOLD_CASES])
def test_hold_dropped(name, served, new, snapshot, held, now, want, want_held) -> None:
    out, kept = hold_dropped(served, new, snapshot=snapshot, held=held, now=now, hold=15.0)
    assert routable(out) == want
    assert kept == want_held
    assert out.revision == new.revision  # the feed resumes from what etcd said, held or not


def test_hold_off() -> None:
    out, kept = hold_dropped(table(1, **ALL), table(2), snapshot=True, held={}, now=1.0, hold=0)
    assert routable(out) == set() and kept == {}


def _dns(tmp_path: Path, coordinator_address: str, pki, mmdb: Path, state_dir: Path, *extra: str) -> DnsProcess:
    ident = pki.identity("dns", "dns-ss")
    return DnsProcess(tmp_path, "--coordinator", coordinator_address, "--zone", ZONE, "--ns", "ns1=192.0.2.53",
                      "--default-region", "eu-central", "--tls-ca", str(ident.ca), "--tls-cert", str(ident.cert),
                      "--tls-key", str(ident.key), "--geoip-db", str(mmdb), "--state-dir", str(state_dir),
                      *extra)


async def _wait_file(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(path.exists):
        assert time.monotonic() < deadline, f"{path} was never written"
        await asyncio.sleep(0.05)


async def test_restart_with_no_coordinator_serves_the_saved_view(coordinator, pki, mmdb: Path,
                                                                 tmp_path: Path) -> None:
    _controls, sessions = await seed_gateways(coordinator)
    state_dir = tmp_path / "dns-state"
    dns = _dns(tmp_path, coordinator.address, pki, mmdb, state_dir).start()
    try:
        await wait_answer(dns.port, {"192.0.2.21", "192.0.2.22"})
        await _wait_file(state_dir / "geodns.state")
        await asyncio.sleep(0.8)  # the debounced write of the last change
    finally:
        dns.stop()
    for call in sessions.values():
        call.cancel()
    coordinator.kill()  # and the control plane is gone

    dns = _dns(tmp_path, coordinator.address, pki, mmdb, state_dir).start()
    try:
        # at once (the first query after start), from the saved view
        assert await asyncio.to_thread(answer_set, dns.port) == ("NOERROR", frozenset({"192.0.2.21", "192.0.2.22"}))
        assert dig(dns.port, f"shop.{ZONE}", subnet="8.8.8.0/24").addresses() == {"192.0.2.31"}
        assert '"source": "saved state"' in dns.log()
    finally:
        dns.stop()

    # a corrupt saved view: refused with a clear line, started as if it had none
    path = state_dir / "geodns.state"
    path.write_bytes(path.read_bytes()[:-5] + b"XXXXX")
    dns = _dns(tmp_path, coordinator.address, pki, mmdb, state_dir).start()
    try:
        assert dig(dns.port, f"shop.{ZONE}").status == "SERVFAIL"  # not ready: no view, no false answer
        assert "saved state refused, starting without it" in dns.log() and "checksum" in dns.log()
        assert dns.alive()
    finally:
        dns.stop()


async def test_snapshot_before_gateways_reconnect_keeps_the_answers(coordinator, pki, mmdb: Path,
                                                                    tmp_path: Path) -> None:
    _controls, sessions = await seed_gateways(coordinator)
    dns = _dns(tmp_path, coordinator.address, pki, mmdb, tmp_path / "dns-state", "--resync-hold", "4").start()
    try:
        want = ("NOERROR", frozenset({"192.0.2.21", "192.0.2.22"}))
        await wait_answer(dns.port, set(want[1]))
        coordinator.kill()  # a crash: its lease (TTL 2 s in tests) expires and the alive keys go
        for call in sessions.values():
            call.cancel()
        await asyncio.sleep(3.5)
        assert await asyncio.to_thread(answer_set, dns.port) == want
        coordinator.start()
        deadline = time.monotonic() + 20
        while dns.log().count("routing feed connected") < 2:
            assert time.monotonic() < deadline, dns.log()[-3000:]
            assert await asyncio.to_thread(answer_set, dns.port) == want
            await asyncio.sleep(0.05)
        # the snapshot says no gateway is alive: held, so still answered
        for _ in range(20):
            assert await asyncio.to_thread(answer_set, dns.port) == want
            await asyncio.sleep(0.05)
        assert "gateways held after a snapshot dropped their region" in dns.log()
        # nobody came back: the hold ends and the answers follow the table (NODATA)
        deadline = time.monotonic() + 10
        while (await asyncio.to_thread(answer_set, dns.port))[1]:
            assert time.monotonic() < deadline, "the hold never ended"
            await asyncio.sleep(0.1)
        assert "gateway hold over" in dns.log()
    finally:
        for call in sessions.values():
            call.cancel()
        dns.stop()
