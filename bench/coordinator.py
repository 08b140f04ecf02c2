"""Benchmark: admin writes/s and watch delivery latency through the coordinator vs raw aetcd.

One run starts one real etcd and one real coordinator (mTLS, `python -m coordinator.main`) and
measures, in 3 interleaved rounds (every phase once per round, back to back), against that same
etcd:

writes  (a) `Admin.CreateApp` through the coordinator: validation, a txn "create if absent",
            then waiting until the coordinator's own watch has applied the write (read your
            writes) before answering;
        vs  raw aetcd: a plain put, a txn of the same shape (compare create_revision == 0, put),
            and that txn followed by waiting for the client's own watch to see it (the raw
            equivalent of the coordinator's read-your-writes), each sequential and with 32
            concurrent callers (one gRPC channel each side).
watch   (b) one raw etcd put of an app record under the coordinator's prefix, timed until a
            `RoutingFeed.Watch` subscriber receives the delta that carries it,
        vs  the same put timed until a raw aetcd watch on that key range delivers the event;
        plus `Admin.CreateApp` acknowledged -> RoutingFeed delta (the end-to-end admin path).
floor   (c) `grpc.health.v1.Health/Check` on the coordinator over the same mTLS channel: a gRPC
            call that does no work. Any write through a Python gRPC front costs at least this
            plus the etcd txn, so "no-op RPC + raw txn" over "raw txn" is the least overhead
            this design can have; it is printed next to the aim.

Placement (2-core machine): the coordinator and etcd run pinned to the server CPU (default 1),
this load generator to the client CPU (default 0), so the coordinator's CPU cost competes with
etcd's exactly as it would on a shared control-plane host; `--etcd-cpu none` leaves etcd
unpinned. Every phase is bounded in count and time. Prints a table of ours vs raw with ratios
and whether the aims hold: the coordinator adds under 30% to a write and under 1 ms p99 to watch
delivery.

Run:  .venv/bin/python bench/coordinator.py            (about 2 minutes)
      .venv/bin/python bench/coordinator.py --quick    (a few seconds; what the smoke test runs)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository, not from bench/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import aetcd  # noqa: E402
import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from bench import _procs, _stats  # noqa: E402
from geomesh.api import geomesh_pb2 as pb  # noqa: E402
from geomesh.api import geomesh_pb2_grpc as pbg  # noqa: E402
from geomesh.channel import client_channel  # noqa: E402
from geomesh.model import App  # noqa: E402

PREFIX = b"/geomesh/v1/"
WRITE_AIM = 0.30      # the coordinator adds under 30% to a write
WATCH_AIM_MS = 1.0    # ... and under 1 ms p99 to watch delivery


@dataclass
class Sample:
    """One phase of one round."""

    ops: int = 0
    seconds: float = 0.0
    lat_ms: list[float] = field(default_factory=list)        # per op (writes) / from write start (watch)
    ack_ms: list[float] = field(default_factory=list)        # watch only: from the write's ack
    coord_cpu: float = 0.0
    etcd_cpu: float = 0.0
    errors: int = 0

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else math.nan


class Bench:
    def __init__(self, args: argparse.Namespace, coord: _procs.CoordinatorProc, etcd_pid: int | None) -> None:
        self.args = args
        self.coord = coord
        self.etcd_pid = etcd_pid
        self.names = itertools.count()
        pki = coord.pki
        self.admin_channel = client_channel(coord.address, pki.identity("admin", "bench-admin"))
        self.admin = pbg.AdminStub(self.admin_channel)
        self.health = health_pb2_grpc.HealthStub(self.admin_channel)
        self.feed_channel = client_channel(coord.address, pki.identity("dns", "bench-dns"))
        self.feed = pbg.RoutingFeedStub(self.feed_channel)
        host, port = coord.etcd.endpoint.rsplit(":", 1)
        self.raw = aetcd.Client(host=host, port=int(port), timeout=5)
        self.raw_watcher = aetcd.Client(host=host, port=int(port), timeout=5)
        # the raw "txn + own watch" client: one watch on its prefix, futures keyed by key
        self._own: dict[bytes, asyncio.Future] = {}
        self._own_watch = None
        self._own_task: asyncio.Task | None = None

    def name(self, tag: str) -> str:
        return f"b{tag}-{next(self.names)}"

    async def start(self) -> None:
        await self.raw.connect()
        await self.raw_watcher.connect()
        self._own_watch = await self.raw.watch_prefix(b"/bench/rtw/")
        self._own_task = asyncio.create_task(self._own_events())
        await self.admin.ListApps(pb.Empty(), timeout=10)  # TLS handshake out of the way

    async def close(self) -> None:
        if self._own_task is not None:
            self._own_task.cancel()
            await asyncio.gather(self._own_task, return_exceptions=True)
        if self._own_watch is not None:
            await self._own_watch.cancel()
        await self.raw.close()
        await self.raw_watcher.close()
        await self.admin_channel.close()
        await self.feed_channel.close()

    async def _own_events(self) -> None:
        assert self._own_watch is not None
        async for ev in self._own_watch:
            fut = self._own.pop(bytes(ev.kv.key), None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    # -- one write of each kind ------------------------------------------------------------

    async def ours_write(self, tag: str) -> None:
        await self.admin.CreateApp(pb.App(name=self.name(tag), lb_policy=pb.LB_POLICY_ROUND_ROBIN), timeout=10)

    async def noop_rpc(self, tag: str) -> None:
        await self.health.Check(health_pb2.HealthCheckRequest(), timeout=10)

    async def raw_put(self, tag: str) -> None:
        n = self.name(tag)
        await self.raw.put(b"/bench/put/" + n.encode(), App(n).to_json())

    async def raw_txn(self, tag: str) -> None:
        n = self.name(tag)
        k = b"/bench/txn/" + n.encode()
        ok, _ = await self.raw.transaction(compare=[self.raw.transactions.create(k) == 0],
                                           success=[self.raw.transactions.put(k, App(n).to_json())], failure=[])
        if not ok:
            raise RuntimeError(f"raw txn on {k!r} did not succeed")

    async def raw_txn_watch(self, tag: str) -> None:
        n = self.name(tag)
        k = b"/bench/rtw/" + n.encode()
        fut = asyncio.get_running_loop().create_future()
        self._own[k] = fut
        ok, _ = await self.raw.transaction(compare=[self.raw.transactions.create(k) == 0],
                                           success=[self.raw.transactions.put(k, App(n).to_json())], failure=[])
        if not ok:
            raise RuntimeError(f"raw txn on {k!r} did not succeed")
        await asyncio.wait_for(fut, 2)

    # -- phases ------------------------------------------------------------------------------

    async def writes(self, op: Callable[[str], Awaitable[None]], tag: str, concurrency: int) -> Sample:
        """`op` by `concurrency` callers until --max-ops or --seconds is reached."""
        s = Sample()
        limit = self.args.max_ops
        deadline = time.monotonic() + self.args.seconds
        started = 0

        async def caller() -> None:
            nonlocal started
            while started < limit and time.monotonic() < deadline:
                started += 1
                t = time.perf_counter()
                try:
                    await op(tag)
                except (grpc.aio.AioRpcError, RuntimeError, TimeoutError):
                    s.errors += 1
                    continue
                s.lat_ms.append((time.perf_counter() - t) * 1000)

        c0, e0 = _procs.cpu_seconds(self.coord.pid), _procs.cpu_seconds(self.etcd_pid)
        t0 = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        s.seconds = time.perf_counter() - t0
        s.coord_cpu = _procs.cpu_seconds(self.coord.pid) - c0
        s.etcd_cpu = _procs.cpu_seconds(self.etcd_pid) - e0
        s.ops = len(s.lat_ms)
        return s

    async def watch_raw(self) -> Sample:
        """Raw etcd: put -> aetcd watch event, one write at a time."""
        prefix = b"/bench/watch/"
        arrived: dict[bytes, float] = {}
        waiting: dict[bytes, asyncio.Event] = {}
        watch = await self.raw_watcher.watch_prefix(prefix)

        async def reader() -> None:
            async for ev in watch:
                k = bytes(ev.kv.key)
                arrived[k] = time.perf_counter()
                if k in waiting:
                    waiting[k].set()

        async def write(k: bytes) -> None:  # the same bytes as the app records in watch_ours
            await self.raw.put(k, App(k.rsplit(b"/", 1)[1].decode()).to_json())

        task = asyncio.create_task(reader())
        try:
            await self._settle_watch(write, prefix, waiting)
            return await self._watch_loop(prefix, arrived, waiting, write)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await watch.cancel()

    async def watch_ours(self, via_admin: bool) -> Sample:
        """Through the coordinator: a write -> the RoutingFeed.Watch delta carrying it.

        via_admin=False: the write is the same raw etcd put as in `watch_raw` (of an app record,
        under the coordinator's prefix), so the difference is the coordinator's hop alone.
        via_admin=True: the write is Admin.CreateApp (end to end, ack = the RPC's answer).
        """
        arrived: dict[bytes, float] = {}
        waiting: dict[bytes, asyncio.Event] = {}
        call = self.feed.Watch(pb.WatchRoutingRequest())
        first = await asyncio.wait_for(call.read(), 20)
        if first is grpc.aio.EOF or not first.snapshot:
            raise RuntimeError("RoutingFeed.Watch did not start with a snapshot")

        async def reader() -> None:
            while (update := await call.read()) is not grpc.aio.EOF:
                t = time.perf_counter()
                for r in update.upserts:
                    if r.WhichOneof("kind") == "app":
                        k = PREFIX + b"apps/" + r.app.name.encode()
                        arrived[k] = t
                        if k in waiting:
                            waiting[k].set()

        task = asyncio.create_task(reader())
        try:
            if via_admin:
                async def write(k: bytes) -> None:
                    await self.admin.CreateApp(pb.App(name=k.rsplit(b"/", 1)[1].decode()), timeout=10)
            else:
                async def write(k: bytes) -> None:
                    await self.raw.put(k, App(k.rsplit(b"/", 1)[1].decode()).to_json())
            await self._settle_watch(write, PREFIX + b"apps/", waiting)
            return await self._watch_loop(PREFIX + b"apps/", arrived, waiting, write)
        finally:
            task.cancel()
            call.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _settle_watch(self, write: Callable[[bytes], Awaitable[object]], prefix: bytes,
                            waiting: dict[bytes, asyncio.Event]) -> None:
        """Write until one event comes back: the watch exists server-side before we time."""
        for _ in range(50):
            k = prefix + self.name("ws").encode()
            ev = waiting.setdefault(k, asyncio.Event())
            await write(k)
            try:
                await asyncio.wait_for(ev.wait(), 0.5)
                return
            except TimeoutError:
                continue
        raise RuntimeError(f"no watch event for {prefix!r} after 50 writes")

    async def _watch_loop(self, prefix: bytes, arrived: dict[bytes, float], waiting: dict[bytes, asyncio.Event],
                          write: Callable[[bytes], Awaitable[object]]) -> Sample:
        s = Sample()
        deadline = time.monotonic() + self.args.seconds
        c0, e0 = _procs.cpu_seconds(self.coord.pid), _procs.cpu_seconds(self.etcd_pid)
        t0 = time.perf_counter()
        for _ in range(self.args.watch_n):
            if time.monotonic() > deadline:
                break
            k = prefix + self.name("w").encode()
            ev = waiting.setdefault(k, asyncio.Event())
            start = time.perf_counter()
            await write(k)
            ack = time.perf_counter()
            try:
                await asyncio.wait_for(ev.wait(), 2)
            except TimeoutError:
                s.errors += 1
                continue
            s.lat_ms.append((arrived[k] - start) * 1000)
            s.ack_ms.append((arrived[k] - ack) * 1000)
            await asyncio.sleep(0.001)  # one write in flight at a time, as the anchor does
        s.seconds = time.perf_counter() - t0
        s.coord_cpu = _procs.cpu_seconds(self.coord.pid) - c0
        s.etcd_cpu = _procs.cpu_seconds(self.etcd_pid) - e0
        s.ops = len(s.lat_ms)
        return s


# phase key -> (label, kind)
WRITE_PHASES = {
    "ours_seq": "coordinator CreateApp, sequential",
    "raw_put_seq": "raw aetcd put, sequential",
    "raw_txn_seq": "raw aetcd txn create-if-absent, sequential",
    "raw_txnw_seq": "raw aetcd txn + own watch ack, sequential",
    "noop_seq": "coordinator no-op RPC (health Check), sequential",
    "ours_c": "coordinator CreateApp, {c} concurrent",
    "raw_put_c": "raw aetcd put, {c} concurrent",
    "raw_txn_c": "raw aetcd txn create-if-absent, {c} concurrent",
    "raw_txnw_c": "raw aetcd txn + own watch ack, {c} concurrent",
    "noop_c": "coordinator no-op RPC (health Check), {c} concurrent",
}
WATCH_PHASES = {
    "watch_raw": "raw etcd put -> aetcd watch event",
    "watch_ours": "raw etcd put -> RoutingFeed (coordinator)",
    "watch_admin": "Admin.CreateApp -> RoutingFeed",
}


async def run_round(b: Bench, r: int, results: dict[str, list[Sample]]) -> None:
    c = b.args.concurrency
    ops = {"ours": b.ours_write, "raw_put": b.raw_put, "raw_txn": b.raw_txn, "raw_txnw": b.raw_txn_watch,
           "noop": b.noop_rpc}
    # alternate the order per round so no system always runs first
    order = list(ops) if r % 2 == 0 else list(reversed(ops))
    for kind in order:
        results[f"{kind}_seq"].append(await b.writes(ops[kind], f"{r}s", 1))
    for kind in order:
        results[f"{kind}_c"].append(await b.writes(ops[kind], f"{r}c", c))
    watch_order = ["watch_raw", "watch_ours", "watch_admin"]
    if r % 2:
        watch_order.reverse()
    for key in watch_order:
        if key == "watch_raw":
            results[key].append(await b.watch_raw())
        else:
            results[key].append(await b.watch_ours(via_admin=key == "watch_admin"))


def summarise(results: dict[str, list[Sample]]) -> dict[str, dict[str, float]]:
    """Per phase: medians over rounds of rate, p50, p99 (and ack-based p50/p99 for watches)."""
    out: dict[str, dict[str, float]] = {}
    for key, samples in results.items():
        out[key] = {
            "rate": _stats.median([s.rate for s in samples]),
            "p50": _stats.median([_stats.pct(s.lat_ms, 0.50) for s in samples]),
            "p99": _stats.median([_stats.pct(s.lat_ms, 0.99) for s in samples]),
            "ack_p50": _stats.median([_stats.pct(s.ack_ms, 0.50) for s in samples]),
            "ack_p99": _stats.median([_stats.pct(s.ack_ms, 0.99) for s in samples]),
            "coord_cpu_ms": _stats.median([1000 * s.coord_cpu / s.ops if s.ops else math.nan for s in samples]),
            "etcd_cpu_ms": _stats.median([1000 * s.etcd_cpu / s.ops if s.ops else math.nan for s in samples]),
            "ops": sum(s.ops for s in samples),
            "errors": sum(s.errors for s in samples),
            "rounds": [round(s.rate, 1) for s in samples],
        }
    return out


def verdicts(m: dict[str, dict[str, float]]) -> list[tuple[str, float, float, float, str, bool]]:
    """(what, ours, raw, overhead, unit, holds) for each aim."""
    rows = []
    # writes: latency (sequential) and throughput (concurrent) vs the raw txn of the same shape
    seq = _stats.ratio(m["ours_seq"]["p50"], m["raw_txn_seq"]["p50"]) - 1
    rows.append(("write latency p50, sequential (ms)", m["ours_seq"]["p50"], m["raw_txn_seq"]["p50"], seq, "%",
                 seq < WRITE_AIM))
    conc = _stats.ratio(m["raw_txn_c"]["rate"], m["ours_c"]["rate"]) - 1
    rows.append(("writes/s, concurrent", m["ours_c"]["rate"], m["raw_txn_c"]["rate"], conc, "%", conc < WRITE_AIM))
    floor = m["noop_seq"]["p50"] + m["raw_txn_seq"]["p50"]
    over_floor = _stats.ratio(floor, m["raw_txn_seq"]["p50"]) - 1
    rows.append(("  floor: no-op RPC p50 + raw txn p50 (ms)", floor, m["raw_txn_seq"]["p50"], over_floor, "%",
                 over_floor < WRITE_AIM))
    seqw = _stats.ratio(m["ours_seq"]["p50"], m["raw_txnw_seq"]["p50"]) - 1
    rows.append(("  same, vs raw txn + own watch ack (seq p50 ms)", m["ours_seq"]["p50"], m["raw_txnw_seq"]["p50"],
                 seqw, "%", seqw < WRITE_AIM))
    concw = _stats.ratio(m["raw_txnw_c"]["rate"], m["ours_c"]["rate"]) - 1
    rows.append(("  same, vs raw txn + own watch ack (conc writes/s)", m["ours_c"]["rate"], m["raw_txnw_c"]["rate"],
                 concw, "%", concw < WRITE_AIM))
    added = m["watch_ours"]["p99"] - m["watch_raw"]["p99"]
    rows.append(("watch delivery p99 from write start (ms)", m["watch_ours"]["p99"], m["watch_raw"]["p99"], added,
                 "ms", added < WATCH_AIM_MS))
    added_ack = m["watch_ours"]["ack_p99"] - m["watch_raw"]["ack_p99"]
    rows.append(("watch delivery p99 from write ack (ms)", m["watch_ours"]["ack_p99"], m["watch_raw"]["ack_p99"],
                 added_ack, "ms", added_ack < WATCH_AIM_MS))
    return rows


def print_report(args: argparse.Namespace, m: dict[str, dict[str, float]], placement: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    c = args.concurrency
    t = Table(title=f"coordinator writes: medians of {args.rounds} interleaved rounds ({placement})")
    for col in ("phase", "writes/s", "p50 ms", "p99 ms", "coord CPU ms/op", "etcd CPU ms/op", "ops", "err",
                "writes/s per round"):
        t.add_column(col, justify="left" if col == "phase" else "right")
    for key, label in WRITE_PHASES.items():
        x = m[key]
        t.add_row(label.format(c=c), _stats.fmt(x["rate"], 0), _stats.fmt(x["p50"]), _stats.fmt(x["p99"]),
                  _stats.fmt(x["coord_cpu_ms"], 3), _stats.fmt(x["etcd_cpu_ms"], 3), str(x["ops"]),
                  str(x["errors"]), " ".join(str(v) for v in x["rounds"]))
    console.print(t)

    w = Table(title=f"watch delivery, one write at a time: medians of {args.rounds} rounds")
    for col in ("path", "p50 ms (from write)", "p99 ms (from write)", "p50 ms (from ack)", "p99 ms (from ack)",
                "events", "timeouts"):
        w.add_column(col, justify="left" if col == "path" else "right")
    for key, label in WATCH_PHASES.items():
        x = m[key]
        w.add_row(label, _stats.fmt(x["p50"], 3), _stats.fmt(x["p99"], 3), _stats.fmt(x["ack_p50"], 3),
                  _stats.fmt(x["ack_p99"], 3), str(x["ops"]), str(x["errors"]))
    console.print(w)

    v = Table(title="ours vs raw etcd (aims: a write +<30%, watch delivery +<1 ms p99)")
    for col in ("measure", "ours", "raw", "overhead", "aim holds"):
        v.add_column(col, justify="left" if col == "measure" else "right")
    for what, ours, raw, over, unit, holds in verdicts(m):
        over_s = f"{over * 100:+.0f}%" if unit == "%" else f"{over:+.3f} ms"
        digits = 0 if "writes/s" in what else (3 if what.startswith("watch") else 2)
        v.add_row(what, _stats.fmt(ours, digits), _stats.fmt(raw, digits), over_s, "yes" if holds else "NO")
    console.print(v)
    console.print(
        "A coordinator write is Admin.CreateApp over mTLS: validate, etcd txn (create_revision == 0), then wait until "
        "the coordinator's own etcd watch has applied that revision (read your writes) before answering. 'raw txn' is "
        "the same txn from aetcd with no watch wait; 'raw txn + own watch ack' adds that wait, so the gap to it is the "
        "cost of the gRPC hop and the coordinator's Python. Watch: same raw etcd put of an app record, delivered "
        "by etcd's watch straight to aetcd vs via the coordinator's one watch, cache and RoutingFeed stream; "
        "'from ack' can be negative when the event overtakes the put's answer. 'floor' adds a no-op gRPC call to the "
        "coordinator (grpc.health Check, same mTLS channel) to the raw txn: the least any write through a Python gRPC "
        "front can cost; when the floor itself misses the aim, no coordinator code can meet it.")


async def amain(args: argparse.Namespace) -> int:
    client_cpu = _procs.pin_self(args.client_cpu)
    with _procs.workdir(args.keep, "geomesh-bench-coord-") as workdir:
        pki = _procs.make_pki(workdir / "pki")
        etcd = _procs.start_etcd(workdir, args.etcd_cpu)
        coord = _procs.CoordinatorProc(etcd, pki, workdir, cpu=args.server_cpu, lease_ttl=30, profile=args.profile,
                                     extra=args.coordinator_flags.split())
        bench: Bench | None = None
        try:
            coord.start()
            placement = (f"coordinator on CPU {_procs.usable(args.server_cpu)}, etcd on CPU {_procs.usable(args.etcd_cpu)}, "
                         f"client on CPU {client_cpu}")
            print(f"etcd {etcd.endpoint} (pid {etcd.proc.pid if etcd.proc else '?'}), coordinator {coord.address} "
                  f"(pid {coord.pid}); {placement}", file=sys.stderr)
            bench = Bench(args, coord, etcd.proc.pid if etcd.proc else None)
            await bench.start()
            # warm up every path once (connections, code paths), untimed
            for op in (bench.ours_write, bench.raw_put, bench.raw_txn, bench.raw_txn_watch):
                for _ in range(20):
                    await op("wu")
            results: dict[str, list[Sample]] = {k: [] for k in (*WRITE_PHASES, *WATCH_PHASES)}
            for r in range(args.rounds):
                t = time.monotonic()
                await run_round(bench, r, results)
                print(f"round {r + 1}/{args.rounds} done in {time.monotonic() - t:.1f}s", file=sys.stderr)
        finally:
            if bench is not None:
                await bench.close()
            coord.stop()
            etcd.cleanup()
    m = summarise(results)
    print_report(args, m, placement)
    if args.json:
        payload = {"placement": placement, "phases": m,
                   "aims": [dict(zip(("measure", "ours", "raw", "overhead", "unit", "holds"), row, strict=True))
                            for row in verdicts(m)],
                   "samples": {k: [asdict(s) | {"lat_ms": len(s.lat_ms), "ack_ms": len(s.ack_ms)} for s in v]
                               for k, v in results.items()}}
        args.json.write_text(json.dumps(payload, indent=1, default=str))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="coordinator vs raw aetcd: admin writes/s and watch delivery latency "
                                            "against one real etcd, in interleaved rounds")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default %(default)s)")
    p.add_argument("--seconds", type=float, default=3.0, help="time bound of each phase (default %(default)s)")
    p.add_argument("--max-ops", type=int, default=5000, help="count bound of each write phase (default %(default)s)")
    p.add_argument("--watch-n", type=int, default=400, help="writes per watch phase (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent callers in the concurrent phases "
                   "(default %(default)s)")
    p.add_argument("--server-cpu", type=_procs.parse_cpu, default=1, help="CPU for the coordinator, or 'none' "
                   "(default %(default)s)")
    p.add_argument("--etcd-cpu", type=_procs.parse_cpu, default=1, help="CPU for etcd, or 'none' (default "
                   "%(default)s: shares the server CPU with the coordinator)")
    p.add_argument("--client-cpu", type=_procs.parse_cpu, default=0, help="CPU for this load generator, or 'none' "
                   "(default %(default)s)")
    p.add_argument("--quick", action="store_true", help="1 round, 0.5 s phases, 50 watch writes: proves it runs")
    p.add_argument("--keep", type=Path, metavar="DIR", help="work in DIR and keep it: PKI, etcd data, "
                   "coordinator and client logs (default: a temporary directory, removed)")
    p.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    p.add_argument("--profile", type=Path, help="run the coordinator under cProfile and write the profile here")
    p.add_argument("--coordinator-flags", default="", metavar="FLAGS",
                   help="extra geomesh-coordinator flags, e.g. '--no-uvloop' (split on spaces)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.watch_n, args.max_ops = 1, 0.5, 50, 300
    if args.rounds < 1 or args.seconds <= 0 or args.watch_n < 1 or args.concurrency < 1 or args.max_ops < 1:
        parser().error("--rounds, --seconds, --watch-n, --concurrency and --max-ops must be positive")
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
