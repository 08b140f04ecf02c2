#!/usr/bin/env python3
"""Fault benchmark: the coordinator on a 3-member TLS etcd cluster while members die, and the data
plane riding out control-plane outages (static stability).

    .venv/bin/python bench/faults.py [--scenarios all] [--duration 15] [--ops 10000] [--json FILE]
    .venv/bin/python bench/faults.py --quick        # shorter runs, 2,000 ops (what tests/bench runs)

Every scenario starts a fresh cluster from `deploy/etcd/etcd-cluster.env.example` (all members on
127.0.0.1, TLS with client certificates; `geomesh.etcd_process.EtcdCluster`) and, where it needs
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
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import grpc

if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:  # bench/http.py is not `http`
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import urllib.request  # noqa: E402, I001 - after the path fix

from bench._procs import CoordinatorProc, make_pki, workdir  # noqa: E402
from bench._simulated_gateways import enroll_request, register_request  # noqa: E402
from coordinator.state import PREFIX, key  # noqa: E402
from coordinator.store import Compacted, EtcdConfig, EtcdStore  # noqa: E402
from geomesh.api import geomesh_pb2 as pb  # noqa: E402
from geomesh.api import geomesh_pb2_grpc as pbg  # noqa: E402
from geomesh.channel import client_channel  # noqa: E402
from geomesh.errors import StoreUnavailableError  # noqa: E402
from geomesh.etcd_process import EtcdCluster, EtcdProcess, free_port  # noqa: E402
from geomesh.pki import Pki  # noqa: E402
from geomesh.register_history import Read, Write, check  # noqa: E402
from geomesh.service_process import ServiceProcess  # noqa: E402

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


# -- static stability (issue 14) -------------------------------------------------------------------
#
# A small real topology on loopback: one etcd, one coordinator (fixed port, lease TTL 3 s), two
# regions each with a gateway agent process (`geomesh-gateway --config`, WireGuard off, the proxy
# on 127.0.0.1 in front of one backend per region) and two geomesh-dns processes following the
# coordinator with --state-dir. A load thread sends, every 100 ms, a DNS query for the app from a
# client of every region (ECS) to every DNS server, and an HTTP request through every gateway.
# A client's DNS answer fails when no server gives it a non-empty NOERROR (a resolver tries the
# next name server); an HTTP request fails when it is not a 200 from the backend. The process a
# scenario restarts is not counted while it is down (that gap is reported as its restart time).

STATIC_ZONE = "geo.example.com"
STATIC_APP_HOST = "shop.apps.test"
STATIC_REGIONS = {  # region: (latitude, longitude, client subnet placed there by GeoLite2, gateway public IP)
    "eu-central": (50.11, 8.68, "193.0.6.0/24", "192.0.2.21"),
    "us-east": (39.04, -77.49, "8.8.8.0/24", "192.0.2.31"),
}


class _Backend:
    """An HTTP/1.1 backend on loopback answering 200 with X-Backend: its name."""

    def __init__(self, name: str) -> None:
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                body = name.encode()
                self.send_response(200)
                self.send_header("X-Backend", name)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _GatewayProc:
    """`python -m regional_gateway.main --config FILE`, ready when its proxy answers."""

    def __init__(self, work: Path, name: str, region: str, public_ip: str, coordinator: str, pki: Pki) -> None:
        ident = pki.identity("gateway", name)
        self.name, self.region, self.public_ip = name, region, public_ip
        self.port = free_port()
        self.dir = work / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = self.dir / "gateway.toml"
        self.config.write_text(
            f'name = "{name}"\nregion = "{region}"\ncoordinators = ["{coordinator}"]\npublic_ip = "{public_ip}"\n'
            f'zone = "apps.test"\nproxy_listen = "127.0.0.1"\nproxy_port = {self.port}\nheartbeat_interval = 0.5\n'
            f'[tls]\nca = "{ident.ca}"\ncert = "{ident.cert}"\nkey = "{ident.key}"\n'
            f'[wireguard]\nbackend = "none"\nkey_file = "{self.dir / "wg.key"}"\n')
        self.proc: subprocess.Popen | None = None
        self.log_path = self.dir / "gateway.log"

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen([sys.executable, "-m", "regional_gateway.main", "--config", str(self.config),
                                      "--log-level", "info"], stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                     cwd=Path(__file__).resolve().parent.parent, start_new_session=True)
        log.close()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def _dns_query(port: int, subnet: str, timeout: float = 1.0) -> list[str] | None:
    """The A records answered for the app to a client in `subnet`; None: no answer or not NOERROR."""
    from dnslib import EDNS0, QTYPE, DNSHeader, DNSQuestion, DNSRecord, EDNSOption

    addr, _, plen = subnet.partition("/")
    prefix = int(plen)
    ecs = struct.pack("!HBB", 1, prefix, 0) + socket.inet_aton(addr)[:(prefix + 7) // 8]
    q = DNSRecord(DNSHeader(id=random.randrange(65536)), q=DNSQuestion(f"shop.{STATIC_ZONE}", QTYPE.A))
    q.add_ar(EDNS0(udp_len=1232, opts=[EDNSOption(8, ecs)]))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(bytes(q.pack()), ("127.0.0.1", port))
            reply = DNSRecord.parse(s.recv(4096))
        except OSError:
            return None
    if reply.header.rcode != 0:
        return None
    return [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A]


def _http_get(port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(f"GET / HTTP/1.1\r\nHost: {STATIC_APP_HOST}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        return data.startswith(b"HTTP/1.1 200") and b"x-backend: shop-" in data.lower()
    except OSError:
        return False


@dataclass
class _Load:
    """The steady client load of the static-stability scenarios (a thread; see above)."""

    dns_ports: dict[str, int]
    http_ports: dict[str, int]
    interval: float = 0.1
    excluded: set[str] = field(default_factory=set)  # processes being restarted: not counted
    dns_total: int = 0
    dns_failed: int = 0
    http_total: int = 0
    http_failed: int = 0
    dns_max_s: float = 0.0
    http_max_s: float = 0.0
    failures: list[str] = field(default_factory=list)
    stop_at: float = 0.0

    def run(self, until: float) -> None:
        while time.monotonic() < until and (not self.stop_at or time.monotonic() < self.stop_at):
            started = time.monotonic()
            for region, (_lat, _lon, subnet, _ip) in STATIC_REGIONS.items():
                ok = False
                servers = [n for n in self.dns_ports if n not in self.excluded]
                for name in servers:
                    t0 = time.monotonic()
                    answer = _dns_query(self.dns_ports[name], subnet)
                    if answer:
                        self.dns_max_s = max(self.dns_max_s, time.monotonic() - t0)
                        ok = True
                        break
                if not ok and any(n in self.excluded for n in servers):
                    continue  # a server stopped while asked: the resolver's retry is the next round
                self.dns_total += 1
                if not ok:
                    self.dns_failed += 1
                    self.failures.append(f"{time.monotonic():.1f} dns {region}")
            for name, port in self.http_ports.items():
                if name in self.excluded:
                    continue
                t0 = time.monotonic()
                good = _http_get(port)
                if name in self.excluded:
                    continue  # stopped while this request was in flight: the restart gap, not counted
                self.http_total += 1
                if good:
                    self.http_max_s = max(self.http_max_s, time.monotonic() - t0)
                else:
                    self.http_failed += 1
                    self.failures.append(f"{time.monotonic():.1f} http {name}")
            time.sleep(max(0.0, self.interval - (time.monotonic() - started)))


class _Topology:
    """etcd, a coordinator, two gateway agents, two geomesh-dns (see the section's comment)."""

    def __init__(self, s: Settings, name: str, *, lease_ttl: int = 3, dns_ttl: int = 30) -> None:
        self.work = s.work / name
        self.work.mkdir(parents=True, exist_ok=True)
        self.pki = s.pki
        self.etcd = EtcdProcess(self.work / "etcd", log_path=self.work / "etcd.log")
        self.coordinator_port = free_port()
        self.lease_ttl = lease_ttl
        self.dns_ttl = dns_ttl
        self.coordinator: CoordinatorProc | None = None
        self.backends: dict[str, _Backend] = {}
        self.gateways: dict[str, _GatewayProc] = {}
        self.dns: dict[str, ServiceProcess] = {}

    @property
    def coordinator_address(self) -> str:
        return f"127.0.0.1:{self.coordinator_port}"

    def start_coordinator(self) -> None:
        assert self.coordinator is not None
        self.coordinator.start()

    async def start(self) -> None:
        self.etcd.start()
        self.coordinator = CoordinatorProc(self.etcd, self.pki, self.work / "coordinator", lease_ttl=self.lease_ttl,
                                           extra=["--listen", self.coordinator_address,
                                                  "--allow-loopback-instances"])
        self.coordinator.start()
        ch = client_channel(self.coordinator_address, self.pki.identity("admin", "bench"))
        admin = pbg.AdminStub(ch)
        await admin.CreateApp(pb.App(name="shop"))
        for i, (region, (lat, lon, _subnet, ip)) in enumerate(STATIC_REGIONS.items()):
            await admin.CreateRegion(pb.Region(name=region, latitude=lat, longitude=lon))
            self.backends[region] = _Backend(f"shop-{region}")
            await admin.AddInstance(pb.Instance(app="shop", id=f"s{i}", region=region, address="127.0.0.1",
                                                port=self.backends[region].port))
            name = f"gw-{region}"
            await admin.EnrollGateway(pb.Enrollment(name=name, region=region, public_ips=[ip]))
            self.gateways[name] = _GatewayProc(self.work, name, region, ip, self.coordinator_address, self.pki)
        await ch.close()
        for gw in self.gateways.values():
            gw.start()
        for i in (1, 2):
            self.dns[f"dns-{i}"] = self._dns(f"dns-{i}")
            self.dns[f"dns-{i}"].start()
        await asyncio.to_thread(self.wait_serving, 60.0)

    def _dns(self, name: str) -> ServiceProcess:
        ident = self.pki.identity("dns", name)
        return ServiceProcess("geodns.main", [
            "--listen", "127.0.0.1:0", "--coordinator", self.coordinator_address, "--zone", STATIC_ZONE,
            "--ns", "ns1=192.0.2.53", "--tls-ca", str(ident.ca), "--tls-cert", str(ident.cert),
            "--tls-key", str(ident.key), "--state-dir", str(self.work / name / "state"), "--no-region-map",
            "--ttl", str(self.dns_ttl), "--negative-ttl", str(self.dns_ttl), "--name", name],
            self.work / name, name=name)

    def restart_dns(self, name: str) -> None:
        """Stop and start one DNS server on the same port (a resolver has it as a name server)."""
        proc = self.dns[name]
        proc.stop()
        proc.args[proc.args.index("--listen") + 1] = f"127.0.0.1:{proc.port}"
        proc.start()

    def wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dns_ok = all(_dns_query(p.port, subnet) for p in self.dns.values()
                         for (_a, _b, subnet, _ip) in STATIC_REGIONS.values())
            http_ok = all(_http_get(g.port) for g in self.gateways.values())
            if dns_ok and http_ok:
                return
            time.sleep(0.2)
        raise TimeoutError("the static-stability topology did not come up")

    def load(self) -> _Load:
        return _Load({n: p.port for n, p in self.dns.items()}, {n: g.port for n, g in self.gateways.items()})

    def stop(self) -> None:
        for proc in self.dns.values():
            proc.stop()
        for gw in self.gateways.values():
            gw.stop()
        if self.coordinator is not None:
            self.coordinator.stop()
        self.etcd.stop()
        for b in self.backends.values():
            b.close()


def _static_fault(topo: _Topology, kind: str, outage: float, load: _Load) -> dict:
    """Run one fault while `load` runs in this thread's sibling; returns what happened when."""
    notes: dict = {}
    if kind == "etcd":
        topo.etcd.kill()
        time.sleep(outage)
        topo.etcd.start()
    elif kind == "coordinator":
        assert topo.coordinator is not None
        topo.coordinator.kill()
        time.sleep(outage)
        topo.start_coordinator()
    elif kind == "both":
        assert topo.coordinator is not None
        topo.coordinator.kill()
        topo.etcd.kill()
        time.sleep(outage / 3)
        gw = next(iter(topo.gateways.values()))
        load.excluded |= {gw.name, "dns-1"}
        t0 = time.monotonic()
        gw.stop()
        gw.start()
        topo.restart_dns("dns-1")
        while not _http_get(gw.port, timeout=0.5):
            time.sleep(0.05)
            assert time.monotonic() - t0 < 60, "the restarted gateway never served"
        notes["gateway_restart_s"] = round(time.monotonic() - t0, 2)
        while not _dns_query(topo.dns["dns-1"].port, STATIC_REGIONS["eu-central"][2]):
            time.sleep(0.05)
            assert time.monotonic() - t0 < 60, "the restarted DNS server never answered"
        notes["dns_restart_s"] = round(time.monotonic() - t0, 2)
        load.excluded.clear()
        time.sleep(max(0.0, outage - outage / 3 - (time.monotonic() - t0)))
        topo.etcd.start()
        topo.start_coordinator()
    elif kind == "planned":
        assert topo.coordinator is not None
        t0 = time.monotonic()
        topo.coordinator.stop()  # SIGTERM: a planned stop
        topo.start_coordinator()
        notes["coordinator_restart_s"] = round(time.monotonic() - t0, 2)
    else:
        raise ValueError(kind)
    return notes


STATIC_LABELS = {"etcd": "etcd down", "coordinator": "coordinator down", "both": "both down, gateway + geodns restarted",
                 "planned": "single coordinator replica restarted (planned)"}


async def static_scenario(s: Settings, kind: str, *, outage: float | None = None, long: bool = False,
                          settle: float | None = None) -> dict:
    """One static-stability scenario on a fresh topology; `settle`: seconds of load after the
    control plane is back (default 2 + 3 lease TTLs: old leases expire, everything reconnects)."""
    outage = s.outage if outage is None else outage
    topo = _Topology(s, f"static-{kind}", lease_ttl=1 if long else 3, dns_ttl=1 if long else 30)
    settle = 2.0 + 3 * topo.lease_ttl if settle is None else settle
    try:
        await topo.start()
        load = topo.load()

        def drive() -> dict:
            import threading

            runner = threading.Thread(target=load.run, args=(time.monotonic() + 3600 * 24,), daemon=True)
            runner.start()
            time.sleep(1.0)
            notes = _static_fault(topo, kind, outage, load)
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
