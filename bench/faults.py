#!/usr/bin/env python3
"""Fault benchmark: the coordinator on a 3-member TLS etcd cluster while members die, and the data
plane riding out control-plane outages (static stability).

    .venv/bin/python bench/faults.py [--scenarios all] [--duration 15] [--ops 10000] [--json FILE]
    .venv/bin/python bench/faults.py --quick        # shorter runs, 2,000 ops (what tests/bench runs)

Every scenario starts a fresh cluster from `deploy/etcd/etcd-cluster.env.example` (all members on
127.0.0.1, TLS with client certificates; `geomesh.lab.processes.EtcdCluster`) and, where it needs
one, a coordinator listing all three members over TLS at its shipped defaults (lease TTL 3 s,
etcd call deadline 2 s). Scenarios are one list (`SCENARIOS`); each returns one table row:

    leader-kill      50 Admin/CreateApp writes/s through the coordinator and, in the same run,
                     50 raw etcd puts/s through the same client library straight to the cluster
                     (the floor); the leader is SIGKILLed a third of the way in. Reported: writes
                     acknowledged, acknowledged writes missing from etcd afterwards (lost), and the
                     longest time between two acknowledged writes (unavailability).
    own-member       two simulated gateways hold sessions (enrolled, registered, heartbeating);
                     the member the coordinator uses (from its metrics) is SIGKILLed under 50
                     Admin writes/s. Reported: time until the coordinator names another member,
                     the longest write gap, and `alive/` keys deleted meanwhile (a deleted alive
                     key takes its gateway out of DNS; target 0).
    linearizability  per-key registers (4 keys, one writer each with increasing values, 4
                     readers each starting on another member) through the coordinator's etcd
                     client, while the leader is killed (25 %), restarted (50 %) and the new leader
                     killed (75 %); the history is checked by `geomesh.register_history`.

Each writer keeps one call in flight and retries a failed write with the same name (an
ALREADY_EXISTS after a failed try counts as acknowledged: the failed try had applied).

The static-* scenarios (issue 14, docs/static-stability.md) run on their own small topology
(see the section below: etcd, a coordinator, two gateway agents, two geomesh-dns with
--state-dir, all on loopback) under a steady load of DNS queries from a client of every region
and HTTP through every gateway, and report DNS answers and HTTP requests failed (target 0) and
the largest latency of each:

    static-etcd         etcd SIGKILLed for --outage seconds (default 60), then restarted
    static-coordinator  the coordinator SIGKILLed for --outage seconds, then restarted
    static-both         both SIGKILLed; a third of the way in one gateway and one DNS server are
                        restarted (they serve from their saved state); the restart gaps are reported
    static-planned      the single coordinator replica stopped (SIGTERM) and started again

`--long-outage MINUTES` adds static-both with that many minutes down, timers scaled (lease TTL
1 s, DNS TTL and negative TTL 1 s, so every cache and lease turns over many times); not in the
default run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import grpc

if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:  # bench/http.py is not `http`
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import urllib.request  # noqa: E402, I001 - after the path fix

from bench._procs import CoordinatorProc, make_pki, workdir  # noqa: E402
from bench._simulated_gateways import enroll_request, register_request  # noqa: E402
from bench._static_topology import Topology, static_fault  # noqa: E402
from coordinator.state import PREFIX, key  # noqa: E402
from coordinator.store import Compacted, EtcdConfig, EtcdStore  # noqa: E402
from geomesh.api import geomesh_pb2 as pb  # noqa: E402
from geomesh.api import geomesh_pb2_grpc as pbg  # noqa: E402
from geomesh.channel import client_channel  # noqa: E402
from geomesh.errors import StoreUnavailableError  # noqa: E402
from geomesh.lab.processes import EtcdCluster, free_port  # noqa: E402
from geomesh.pki import Pki  # noqa: E402
from geomesh.register_history import Read, Write, check  # noqa: E402

RATE = 50.0
RETRY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass(frozen=True, slots=True)
class Settings:
    duration: float  # seconds of load in the write scenarios
    ops: int         # operations in the linearizability history
    work: Path
    pki: Pki
    outage: float = 60.0  # seconds the control plane is down in the static-stability scenarios


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    run: Callable[[Settings], Awaitable[dict]]


# -- processes ----------------------------------------------------------------------------------

def start_cluster(s: Settings, name: str) -> EtcdCluster:
    cluster = EtcdCluster(s.work / name)
    cluster.start()
    return cluster


def store_for(cluster: EtcdCluster, first: int = 0) -> EtcdStore:
    eps = cluster.endpoints[first:] + cluster.endpoints[:first]
    return EtcdStore(EtcdConfig.parse(eps, ca=cluster.tls.ca, cert=cluster.tls.client_cert,
                                      key=cluster.tls.client_key), timeout=2.0)


def start_coordinator(s: Settings, cluster: EtcdCluster, name: str) -> tuple[CoordinatorProc, int]:
    metrics_port = free_port()
    shim = SimpleNamespace(endpoint=",".join(cluster.endpoints))
    proc = CoordinatorProc(shim, s.pki, s.work / name, lease_ttl=3, extra=[  # type: ignore[arg-type]
        "--etcd-ca", str(cluster.tls.ca), "--etcd-cert", str(cluster.tls.client_cert),
        "--etcd-key", str(cluster.tls.client_key), "--metrics-port", str(metrics_port)])
    proc.start()
    return proc, metrics_port


def current_member(metrics_port: int) -> str | None:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2).read().decode()
    except OSError:
        return None
    found = re.findall(r'geomesh_etcd_endpoint_current\{endpoint="([^"]+)"\} 1\.0', text)
    return found[0] if len(found) == 1 else None


# -- load -----------------------------------------------------------------------------------------

class Writer:
    """One call in flight at `rate`/s; a failed write is retried with the same name."""

    def __init__(self, write: Callable[[str], Awaitable[None]], prefix: str, exists: type[Exception] | None = None) -> None:
        self.write, self.prefix = write, prefix
        self.acked: dict[str, float] = {}
        self.failures = 0

    async def run(self, seconds: float, rate: float = RATE) -> None:
        n, start = 0, time.monotonic()
        tried = False
        while time.monotonic() - start < seconds:
            name = f"{self.prefix}{n:06d}"
            try:
                await self.write(name)
            except grpc.aio.AioRpcError as exc:
                if not (tried and exc.code() == grpc.StatusCode.ALREADY_EXISTS):
                    if exc.code() not in RETRY_CODES:
                        raise
                    self.failures, tried = self.failures + 1, True
                    await asyncio.sleep(1 / rate)
                    continue
            except StoreUnavailableError:
                self.failures, tried = self.failures + 1, True
                await asyncio.sleep(1 / rate)
                continue
            self.acked[name] = time.monotonic()
            n, tried = n + 1, False
            await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))

    def longest_gap(self) -> float:
        times = sorted(self.acked.values())
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=float("inf"))

    def first_after(self, t: float) -> float:
        return min((x for x in self.acked.values() if x > t), default=float("inf")) - t


async def stored(cluster: EtcdCluster, prefix: bytes) -> set[str]:
    store = store_for(cluster, first=next(i for i, m in enumerate(cluster.members) if m.alive()))
    try:
        _, kvs = await store.get_prefix(prefix)
        return {kv.key.decode().rsplit("/", 1)[1] for kv in kvs}
    finally:
        await store.close()


# -- scenarios ------------------------------------------------------------------------------------

async def leader_kill(s: Settings) -> dict:
    cluster = start_cluster(s, "leader-kill")
    coordinator = None
    try:
        coordinator, _ = start_coordinator(s, cluster, "leader-kill-coordinator")
        admin = pbg.AdminStub(client_channel(coordinator.address, s.pki.identity("admin", "bench")))
        raw_store = store_for(cluster, first=1)

        async def admin_write(name: str) -> None:
            await admin.CreateApp(pb.App(name=name), timeout=2)

        async def raw_write(name: str) -> None:
            await raw_store.put(f"/bench/raw/{name}".encode(), b"x")

        ours, raw = Writer(admin_write, "w"), Writer(raw_write, "r")
        load = asyncio.gather(ours.run(s.duration), raw.run(s.duration))
        await asyncio.sleep(s.duration / 3)
        leader = await asyncio.to_thread(cluster.leader)
        cluster.members[leader].kill()
        await load
        await raw_store.close()
        lost = len(set(ours.acked) - await stored(cluster, key("apps", "")))
        raw_lost = len(set(raw.acked) - await stored(cluster, b"/bench/raw/"))
        return {"scenario": "leader-kill", "writes": len(ours.acked), "lost": lost,
                "unavailable_s": round(ours.longest_gap(), 3), "failed_tries": ours.failures,
                "raw_writes": len(raw.acked), "raw_lost": raw_lost, "raw_unavailable_s": round(raw.longest_gap(), 3)}
    finally:
        if coordinator is not None:
            coordinator.stop()
        cluster.stop()


async def own_member(s: Settings) -> dict:
    cluster = start_cluster(s, "own-member")
    coordinator = None
    calls: list[grpc.aio.StreamStreamCall] = []
    try:
        coordinator, metrics_port = start_coordinator(s, cluster, "own-member-coordinator")
        admin = pbg.AdminStub(client_channel(coordinator.address, s.pki.identity("admin", "bench")))
        for region, lat in (("eu", 50.1), ("us", 39.0)):
            await admin.CreateRegion(pb.Region(name=region, latitude=lat, longitude=8.7), timeout=10)
        for i, (name, region) in enumerate((("gw-a", "eu"), ("gw-b", "us"))):
            try:
                await admin.EnrollGateway(enroll_request(name, region, i), timeout=10)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
            gc = pbg.GatewayControlStub(client_channel(coordinator.address, s.pki.identity("gateway", name)))
            await gc.Register(register_request(name, region, i), timeout=10)
            call = gc.Session()
            await call.write(pb.SessionUp(hello=pb.SessionHello(name=name)))
            calls.append(call)

        async def beat(call: grpc.aio.StreamStreamCall) -> None:
            reader = asyncio.create_task(_drain(call))
            try:
                while True:
                    await call.write(pb.SessionUp(heartbeat=pb.Heartbeat(load=0.1)))
                    await asyncio.sleep(1.0)
            finally:
                reader.cancel()

        beaters = [asyncio.create_task(beat(c)) for c in calls]
        probe = store_for(cluster)
        deadline = time.monotonic() + 20
        while len((await probe.get_prefix(key("alive", "")))[1]) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError("the simulated gateways never became alive")
            await asyncio.sleep(0.05)
        revision, _ = await probe.get_prefix(key("alive", ""))
        await probe.close()

        async def admin_write(name: str) -> None:
            await admin.CreateApp(pb.App(name=name), timeout=2)

        ours = Writer(admin_write, "o")
        load = asyncio.create_task(ours.run(s.duration))
        await asyncio.sleep(s.duration / 3)
        used = current_member(metrics_port)
        assert used is not None
        was_leader = cluster.index_of(used) == await asyncio.to_thread(cluster.leader)
        cluster.members[cluster.index_of(used)].kill()
        killed = time.monotonic()
        switched = float("inf")
        while time.monotonic() - killed < s.duration:
            now_used = current_member(metrics_port)
            if now_used is not None and now_used != used:
                switched = time.monotonic() - killed
                break
            await asyncio.sleep(0.02)
        await load
        # the revision to check up to, taken while the sessions are still open (ending a session
        # deletes its alive key, as it should)
        probe = store_for(cluster, first=(cluster.index_of(used) + 1) % 3)
        now, _ = await probe.get_prefix(PREFIX)
        for b in beaters:
            b.cancel()
        deleted: list[str] = []
        async with asyncio.timeout(30):
            async for batch in probe.watch_prefix(PREFIX, revision + 1):
                assert not isinstance(batch, Compacted)
                deleted += [f"{e.key.decode()}@{e.mod_revision}" for e in batch
                            if e.value is None and e.key.startswith(key("alive", ""))]
                if batch[-1].mod_revision >= now:
                    break
        await probe.close()
        return {"scenario": "own-member", "writes": len(ours.acked), "failover_s": round(switched, 3),
                "first_write_after_kill_s": round(ours.first_after(killed), 3),
                "unavailable_s": round(ours.longest_gap(), 3), "alive_deleted": len(deleted),
                "alive_deleted_keys": deleted[:5], "killed_was_leader": was_leader,
                "lost": len(set(ours.acked) - await stored(cluster, key("apps", "")))}
    finally:
        for c in calls:
            c.cancel()
        if coordinator is not None:
            coordinator.stop()
        cluster.stop()


async def _drain(call: grpc.aio.StreamStreamCall) -> None:
    while await call.read() is not grpc.aio.EOF:
        pass


async def linearizability(s: Settings) -> dict:
    cluster = start_cluster(s, "linearizability")
    try:
        writes, reads, faults = await history(cluster, s.ops)
        violations = check(writes, reads)
        return {"scenario": "linearizability", "ops": len(writes) + len(reads), "writes": len(writes),
                "writes_unacknowledged": sum(w.end is None for w in writes), "reads": len(reads),
                "faults": faults, "violations": len(violations),
                "examples": [f"{v.key}: {v.rule}: {v.detail}" for v in violations[:3]]}
    finally:
        cluster.stop()


async def history(cluster: EtcdCluster, ops: int, keys: int = 4, readers: int = 4) -> tuple[list[Write], list[Read], list[str]]:
    writes: list[Write] = []
    reads: list[Read] = []
    faults: list[str] = []
    deadline = time.monotonic() + max(60.0, ops / 50)

    def done() -> int:
        return len(writes) + len(reads)

    def more() -> bool:
        return done() < ops and time.monotonic() < deadline

    async def writer(k: int) -> None:
        store = store_for(cluster, first=k % 3)
        value = 0
        while more():
            value += 1
            start = time.monotonic()
            try:
                await store.put(f"/lin/{k}".encode(), str(value).encode())
                writes.append(Write(str(k), value, start, time.monotonic()))
            except StoreUnavailableError:
                writes.append(Write(str(k), value, start, None))
                await asyncio.sleep(0.01)
        await store.close()

    async def reader(r: int) -> None:
        store = store_for(cluster, first=(r + 1) % 3)
        i = 0
        while more():
            k = (r + i) % keys
            i += 1
            start = time.monotonic()
            try:
                kv = await store.get(f"/lin/{k}".encode())
            except StoreUnavailableError:
                await asyncio.sleep(0.01)
                continue
            reads.append(Read(str(k), int(kv.value) if kv else None, start, time.monotonic()))
        await store.close()

    async def at(share: float) -> bool:
        while more() and done() < share * ops:
            await asyncio.sleep(0.01)
        return more()

    async def fault_plan() -> None:
        if not await at(0.25):
            return
        first = await asyncio.to_thread(cluster.leader)
        cluster.members[first].kill()
        faults.append(f"kill leader {cluster.members[first].name}")
        if not await at(0.5):
            return
        await asyncio.to_thread(cluster.members[first].start)
        faults.append(f"restart {cluster.members[first].name}")
        if not await at(0.75):
            return
        second = await asyncio.to_thread(cluster.leader)
        cluster.members[second].kill()
        faults.append(f"kill leader {cluster.members[second].name}")

    await asyncio.gather(*(writer(k) for k in range(keys)), *(reader(r) for r in range(readers)), fault_plan())
    return writes, reads, faults


# -- static stability (issue 14): the topology and its faults are in bench/_static_topology.py ---------

STATIC_LABELS = {"etcd": "etcd down", "coordinator": "coordinator down", "both": "both down, gateway + geodns restarted",
                 "planned": "single coordinator replica restarted (planned)"}


async def static_scenario(s: Settings, kind: str, *, outage: float | None = None, long: bool = False,
                          settle: float | None = None) -> dict:
    """One static-stability scenario on a fresh topology; `settle`: seconds of load after the
    control plane is back (default 2 + 3 lease TTLs: old leases expire, everything reconnects)."""
    outage = s.outage if outage is None else outage
    topo = Topology(s, f"static-{kind}", lease_ttl=1 if long else 3, dns_ttl=1 if long else 30)
    settle = 2.0 + 3 * topo.lease_ttl if settle is None else settle
    try:
        await topo.start()
        load = topo.load()

        def drive() -> dict:
            import threading

            runner = threading.Thread(target=load.run, args=(time.monotonic() + 3600 * 24,), daemon=True)
            runner.start()
            time.sleep(1.0)
            notes = static_fault(topo, kind, outage, load)
            time.sleep(settle)  # the control plane is back: sessions and feeds reconnect under load
            load.stop_at = time.monotonic()
            runner.join(10)
            return notes

        notes = await asyncio.to_thread(drive)
    finally:
        await asyncio.to_thread(topo.stop)
    return {"scenario": f"static-{kind}" + ("-long" if long else ""), "outage_s": outage,
            "dns_queries": load.dns_total, "dns_failed": load.dns_failed, "dns_max_ms": round(load.dns_max_s * 1e3, 1),
            "http_requests": load.http_total, "http_failed": load.http_failed,
            "http_max_ms": round(load.http_max_s * 1e3, 1), "first_failures": load.failures[:10], **notes}


def _static(kind: str) -> Callable[[Settings], Awaitable[dict]]:
    async def run(s: Settings) -> dict:
        return await static_scenario(s, kind)
    return run


SCENARIOS: list[Scenario] = [
    Scenario("leader-kill", leader_kill),
    Scenario("own-member", own_member),
    Scenario("linearizability", linearizability),
    Scenario("static-etcd", _static("etcd")),
    Scenario("static-coordinator", _static("coordinator")),
    Scenario("static-both", _static("both")),
    Scenario("static-planned", _static("planned")),
]


def table(rows: list[dict]) -> str:
    out = ["| scenario | figure | result | target |", "|---|---|---|---|"]
    for r in rows:
        if r["scenario"] == "leader-kill":
            out += [f"| leader kill | acknowledged writes lost (of {r['writes']}) | {r['lost']} | 0 |",
                    f"| | longest write unavailability | {r['unavailable_s']:.2f} s | ≤ 2.5 s |",
                    f"| | raw etcd, same run: lost (of {r['raw_writes']}) / unavailability | "
                    f"{r['raw_lost']} / {r['raw_unavailable_s']:.2f} s | floor |"]
        elif r["scenario"] == "own-member":
            lead = " (it was the leader)" if r["killed_was_leader"] else ""
            out += [f"| own member dies{lead} | coordinator on another member after | {r['failover_s']:.2f} s | ≤ 2.5 s |",
                    f"| | first write after the kill / longest write gap | {r['first_write_after_kill_s']:.2f} s / "
                    f"{r['unavailable_s']:.2f} s | |",
                    f"| | gateways' alive keys deleted (left DNS) / writes lost | {r['alive_deleted']} / {r['lost']} | 0 / 0 |"]
        elif r["scenario"] == "linearizability":
            out += [f"| linearizability | violations in {r['ops']} ops ({r['reads']} reads, {r['writes']} writes, "
                    f"{r['writes_unacknowledged']} unacknowledged; {', '.join(r['faults'])}) | {r['violations']} | 0 |"]
        elif r["scenario"].startswith("static-"):
            kind = r["scenario"].removeprefix("static-").removesuffix("-long")
            label = STATIC_LABELS[kind] + (f" {r['outage_s']:g} s" if kind != "planned" else "")
            label += " (time-compressed: lease TTL 1 s, DNS TTLs 1 s)" if r["scenario"].endswith("-long") else ""
            restarts = ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.1f} s" for k, v in r.items()
                                 if k.endswith("_restart_s"))
            out += [f"| {label} | DNS answers failed (of {r['dns_queries']}) / largest latency | "
                    f"{r['dns_failed']} / {r['dns_max_ms']:.0f} ms | 0 |",
                    f"| | HTTP requests failed (of {r['http_requests']}) / largest latency | "
                    f"{r['http_failed']} / {r['http_max_ms']:.0f} ms | 0 |"]
            if restarts:
                out.append(f"| | serving again after the restart | {restarts} | |")
        else:
            out.append(f"| {r['scenario']} | {json.dumps(r)} | | |")
    return "\n".join(out)


async def run(args: argparse.Namespace) -> list[dict]:
    names = [sc.name for sc in SCENARIOS] if args.scenarios == "all" else args.scenarios.split(",")
    unknown = set(names) - {sc.name for sc in SCENARIOS}
    if unknown:
        raise SystemExit(f"unknown scenarios: {', '.join(sorted(unknown))}")
    rows = []
    with workdir(args.keep, "geomesh-faults-") as work:
        settings = Settings(args.duration, args.ops, work, make_pki(work / "pki"), args.outage)
        for sc in SCENARIOS:
            if sc.name in names:
                row = await sc.run(settings)
                print(json.dumps(row), flush=True)
                rows.append(row)
        if args.long_outage:
            row = await static_scenario(settings, "both", outage=args.long_outage * 60, long=True)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default="all", help=f"comma-separated, of {', '.join(s.name for s in SCENARIOS)}")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of write load per scenario (default %(default)s)")
    ap.add_argument("--ops", type=int, default=10_000, help="operations in the linearizability history (default %(default)s)")
    ap.add_argument("--quick", action="store_true", help="6 s of load, 2,000 ops (what tests/bench runs)")
    ap.add_argument("--keep", type=Path, help="keep data dirs, certificates and logs here")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--outage", type=float, default=60.0,
                    help="seconds etcd/the coordinator stay down in the static-* scenarios (default %(default)s)")
    ap.add_argument("--long-outage", type=float, default=0.0, metavar="MINUTES",
                    help="also run static-both time-compressed (lease TTL 1 s, DNS TTLs 1 s) with this many minutes "
                         "down (at least 10 for the 24-hour argument, docs/static-stability.md); not in the default run")
    args = ap.parse_args(argv)
    if args.quick:
        args.duration, args.ops, args.outage = 6.0, 2000, 4.0
    rows = asyncio.run(run(args))
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
