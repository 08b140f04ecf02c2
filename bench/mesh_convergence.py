"""Benchmark: how fast a gateway join reaches an N-gateway mesh, and what it costs each gateway.

For each N (default 100, 300, 1000) and each strategy, a fresh real etcd and a real coordinator
(mTLS) serve N simulated gateways: real `GatewayControl.Register` calls and real `Session`
streams (heartbeats up, `SessionDown` down), one mTLS identity and one gRPC channel per gateway,
spread over several client processes (`bench/_simulated_gateways.py`). No WireGuard. Then
`--joins` new gateways join one after another; for each join we measure

  convergence   the time from the joiner's `Register` returning until every one of the N
                gateways has read a `SessionDown` carrying the joiner as a mesh peer (max over
                the N; p50/p99 over the joins), and the per-gateway delivery times;
  bytes         what each existing gateway receives for the join: the serialized `SessionDown`
                messages read from arming the join until that gateway has the joiner as a peer
                and has seen it alive in its routing table (the join is two etcd revisions:
                Register, then the joiner's session marking it alive).

Strategies, in the same run, against the same kind of setup:

  delta     geomesh's coordinator as shipped (`python -m coordinator.main`): a join sends each
            gateway the one new peer (plus the routing delta of that gateway record);
  full-map  the same coordinator code with one swap (`bench/full_map_coordinator.py`): every mesh
            change sends every gateway its complete peer list, as headscale-style control planes
            send the whole map; routing deltas unchanged. Built once per revision and region,
            copied per gateway, so the cost measured is the strategy's, not a naive builder's.

Placement (2-core machine): the coordinator alone on the server CPU (default 1); etcd, the
client processes and this orchestrator on the client CPU (default 0). Client and coordinator
CPU use during the joins are printed so a saturated client would show. Gateways are spread over
`--regions` regions, each with an instance subnet (as `deploy/regions/` has). Every wait is
bounded (`--join-timeout`, `--phase-seconds`). Aims: p99 under 1 s at N = 1000, and bytes per
join flat in N.

Run:  .venv/bin/python bench/mesh_convergence.py                 (N = 100, 300, 1000; minutes)
      .venv/bin/python bench/mesh_convergence.py --n 300 --joins 10
      .venv/bin/python bench/mesh_convergence.py --quick         (N = 20, a few joins: smoke)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository, not from bench/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import grpc  # noqa: E402

from bench import _procs  # noqa: E402
from bench._mesh_report import STRATEGIES, Join, Phase, print_report  # noqa: E402
from bench._simulated_gateways import SESSION, enroll_request, register_request  # noqa: E402
from geomesh.api import geomesh_pb2 as pb  # noqa: E402
from geomesh.api import geomesh_pb2_grpc as pbg  # noqa: E402
from geomesh.channel import client_channel  # noqa: E402
from geomesh.pki import Pki  # noqa: E402


def gateway_name(i: int) -> str:
    return f"g-{i:04d}"


def joiner_name(strategy: str, k: int) -> str:
    return f"j{strategy[0]}-{k:03d}"


def region_name(r: int) -> str:
    return f"r-{r:02d}"



class WorkerProc:
    """One `bench/_simulated_gateways.py` process, driven by JSON lines."""

    def __init__(self, index: int, log: Path) -> None:
        self.index = index
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, cpu: int | None) -> None:
        log = self.log.open("ab")  # noqa: ASYNC230 - a local log file, opened once
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *_procs.taskset_prefix(cpu), sys.executable, "-m", "bench._simulated_gateways",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log, cwd=_procs.ROOT,
                limit=2**26, start_new_session=True)
        finally:
            log.close()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def send(self, msg: dict) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(msg) + "\n").encode())

    async def recv(self, op: str, timeout: float) -> dict:
        """The next reply whose op is `op` (earlier stale replies are skipped)."""
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"worker {self.index}: no {op!r} within {timeout}s (see {self.log})")
            line = await asyncio.wait_for(self.proc.stdout.readline(), remaining)
            if not line:
                raise RuntimeError(f"worker {self.index} exited (see {self.log})")
            msg = json.loads(line)
            if msg.get("op") == op:
                return msg

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        try:
            self.send({"op": "exit"})
            await asyncio.wait_for(self.proc.wait(), 20)
        except (TimeoutError, BrokenPipeError, ConnectionResetError):
            self.proc.kill()
            await self.proc.wait()


class JoinerSession:
    """A joining gateway: Register, then keep its session open (read and heartbeat) like a real one."""

    def __init__(self, address: str, pki: Pki, name: str, region: str, i: int, hb: float) -> None:
        self.channel = client_channel(address, pki.identity("gateway", name))
        self.name, self.region, self.i, self.hb = name, region, i, hb
        self.call: grpc.aio.StreamStreamCall | None = None
        self.tasks: list[asyncio.Task] = []
        self.not_found = 0

    async def register(self) -> None:
        await pbg.GatewayControlStub(self.channel).Register(register_request(self.name, self.region, self.i),
                                                             timeout=30)

    async def open(self) -> int:
        """Open the session and read its snapshot; retries NOT_FOUND as a real agent would.

        NOT_FOUND right after a successful Register means the coordinator answered Register before
        its own cache had the write (its read-your-writes wait timed out); `not_found` counts those.
        """
        session = self.channel.stream_stream(SESSION, request_serializer=pb.SessionUp.SerializeToString,
                                             response_deserializer=None)
        deadline = time.monotonic() + 60
        while True:
            self.call = session()
            try:
                await self.call.write(pb.SessionUp(hello=pb.SessionHello(name=self.name)))
                first = await asyncio.wait_for(self.call.read(), max(deadline - time.monotonic(), 0.1))
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                    raise
                self.not_found += 1
                await asyncio.sleep(0.05)
        self.tasks = [asyncio.create_task(self._drain()), asyncio.create_task(self._heartbeats())]
        return 0 if first is grpc.aio.EOF else len(first)

    async def _drain(self) -> None:
        assert self.call is not None
        try:
            while await self.call.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError:
            pass

    async def _heartbeats(self) -> None:
        assert self.call is not None
        while not self.call.done():
            await asyncio.sleep(self.hb)
            try:
                await self.call.write(pb.SessionUp(heartbeat=pb.Heartbeat(load=0.1)))
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, RuntimeError):
                return

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        if self.call is not None:
            self.call.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.channel.close()


async def create_regions(admin: pbg.AdminStub, count: int) -> list[str]:
    names = []
    for r in range(count):
        name = region_name(r)
        lat = -60 + (120 * r / max(count - 1, 1))
        lon = -170 + (340 * ((r * 0.618) % 1.0))
        await admin.CreateRegion(pb.Region(name=name, latitude=lat, longitude=lon, display_name=f"bench {r}",
                                           instance_subnet=f"10.90.{r}.0/24"), timeout=10)
        names.append(name)
    return names


async def enroll_all(admin: pbg.AdminStub, gateways: list[tuple[str, str, int]]) -> None:
    """Enroll (name, region, i) gateways as an admin does before they register (32 calls in flight)."""
    sem = asyncio.Semaphore(32)

    async def one(name: str, region: str, i: int) -> None:
        async with sem:
            await admin.EnrollGateway(enroll_request(name, region, i), timeout=30)

    await asyncio.gather(*(one(*g) for g in gateways))


async def run_phase(args: argparse.Namespace, workdir: Path, pki: Pki, workers: list[WorkerProc],
                    n: int, strategy: str) -> Phase:
    phase = Phase(n, strategy)
    pdir = workdir / f"n{n}-{strategy}"
    pdir.mkdir(exist_ok=True)
    etcd = _procs.start_etcd(pdir, args.etcd_cpu)
    profile = args.profile / f"coordinator-n{n}-{strategy}.prof" if args.profile else None
    coord = _procs.CoordinatorProc(etcd, pki, pdir, cpu=args.server_cpu, lease_ttl=args.lease_ttl,
                                   module=STRATEGIES[strategy], profile=profile)
    hb = args.lease_ttl / 3
    joiners: list[JoinerSession] = []
    admin_channel = None
    try:
        coord.start()
        admin_channel = client_channel(coord.address, pki.identity("admin", "bench-admin"))
        regions = await create_regions(pbg.AdminStub(admin_channel), args.regions)
        shares: list[list[dict]] = [[] for _ in workers]
        for i in range(n):
            shares[i % len(workers)].append({"name": gateway_name(i), "region": regions[i % len(regions)], "i": i})
        await enroll_all(pbg.AdminStub(admin_channel),
                         [(gateway_name(i), regions[i % len(regions)], i) for i in range(n)])
        for w, share in zip(workers, shares, strict=True):
            w.send({"op": "register", "target": coord.address, "pki": str(pki.dir), "gateways": share})
        replies = await asyncio.gather(*(w.recv("registered", args.phase_seconds) for w in workers))
        phase.register_s = max(r["seconds"] for r in replies)
        revision = max(r["revision"] for r in replies)
        failed = sum(r["failed"] for r in replies)
        if failed:
            raise RuntimeError(f"{failed} registrations failed: {[r['errors'] for r in replies if r['errors']]}")
        wpids = [w.pid for w in workers]
        c0, w0, t0 = _procs.cpu_seconds(coord.pid), sum(_procs.cpu_seconds(p) for p in wpids), time.monotonic()
        for w in workers:
            w.send({"op": "open", "hb": hb, "last_revision": 0 if args.snapshots else revision,
                    "timeout": args.phase_seconds, "rate": args.open_rate / len(workers)})
        replies = await asyncio.gather(*(w.recv("opened", args.phase_seconds + 30) for w in workers))
        phase.open_s = max(r["seconds"] for r in replies)
        wall = time.monotonic() - t0
        phase.open_coord_cpu_pct = 100 * (_procs.cpu_seconds(coord.pid) - c0) / wall
        phase.open_client_cpu_pct = 100 * (sum(_procs.cpu_seconds(p) for p in wpids) - w0) / wall
        firsts = [b for r in replies for b in r["first_bytes"]]
        phase.sessions = len(firsts)
        phase.open_retries = sum(r["retries"] for r in replies)
        phase.first_bytes_mean = sum(firsts) / len(firsts) if firsts else math.nan
        if phase.sessions < n:
            errs = [e for r in replies for e in r["errors"]]
            phase.note = f"only {phase.sessions}/{n} sessions opened in time (e.g. {errs[0] if errs else '?'})."
        print(f"  N={n} {strategy}: registered in {phase.register_s:.1f}s, {phase.sessions} sessions open in "
              f"{phase.open_s:.1f}s", file=sys.stderr)

        phase.settle_s, phase.settled = await settle(coord.pid, args.settle_seconds)
        budget_end = time.monotonic() + args.phase_seconds
        c0, w0, t0 = _procs.cpu_seconds(coord.pid), sum(_procs.cpu_seconds(p) for p in wpids), time.monotonic()
        for k in range(args.joins):
            if time.monotonic() > budget_end:
                phase.note += f" stopped after {k} joins: --phase-seconds {args.phase_seconds} reached"
                break
            joiner = JoinerSession(coord.address, pki, joiner_name(strategy, k), regions[k % len(regions)],
                                   n + k, hb)
            joiners.append(joiner)
            await enroll_all(pbg.AdminStub(admin_channel), [(joiner.name, joiner.region, n + k)])  # untimed
            for w in workers:
                w.send({"op": "arm", "joiner": joiner.name})
            await asyncio.gather(*(w.recv("armed", 30) for w in workers))
            cpu0 = _procs.cpu_seconds(coord.pid)
            start = time.monotonic_ns()
            try:
                await joiner.register()
            except grpc.aio.AioRpcError as exc:
                phase.note += f" {joiner.name}: Register failed ({exc.code().name} {exc.details()}): stopped"
                break
            registered = time.monotonic_ns()
            opening = asyncio.create_task(joiner.open())
            reports = await asyncio.gather(*(collect(w, args.join_timeout) for w in workers))
            try:
                snapshot_bytes = await asyncio.wait_for(opening, 30)
            except (TimeoutError, grpc.aio.AioRpcError) as exc:
                snapshot_bytes = 0
                phase.note += f" {joiner.name}: its own session did not start ({type(exc).__name__})."
            cpu1 = _procs.cpu_seconds(coord.pid)
            peer_ns = [x for r in reports for x in r["peer_ns"]]
            got = [x for x in peer_ns if x is not None]
            per_gw = [(x - registered) / 1e6 for x in got]
            join = Join(
                joiner=joiner.name, complete=all(r["complete"] for r in reports) and len(got) == phase.sessions,
                register_ms=(registered - start) / 1e6, converge_ms=max(per_gw, default=math.nan),
                converge_from_call_ms=(max(got) - start) / 1e6 if got else math.nan,
                per_gateway_ms=per_gw, bytes_per_gateway=[b for r in reports for b in r["bytes"]],
                msgs_per_gateway=[m for r in reports for m in r["msgs"]], missing=n - len(got),
                coord_cpu_ms=(cpu1 - cpu0) * 1000, joiner_snapshot_bytes=snapshot_bytes,
                session_not_found=joiner.not_found)
            phase.joins.append(join)
            if not join.complete:
                phase.note += (f" join {k + 1} reached {len(got)}/{phase.sessions} gateways within "
                               f"--join-timeout {args.join_timeout}s: no further joins.")
                break
            await asyncio.sleep(args.pause)
        wall = time.monotonic() - t0
        phase.joins_seconds = wall
        phase.coord_cpu_pct = 100 * (_procs.cpu_seconds(coord.pid) - c0) / wall
        phase.client_cpu_pct = 100 * (sum(_procs.cpu_seconds(p) for p in wpids) - w0) / wall
    finally:
        coord.stop()  # first: gateways closing one by one would each be broadcast to the rest
        for w in workers:
            try:
                w.send({"op": "close"})
            except (BrokenPipeError, ConnectionResetError):
                pass
        await asyncio.gather(*(w.recv("closed", 60) for w in workers), return_exceptions=True)
        await asyncio.gather(*(j.close() for j in joiners), return_exceptions=True)
        if admin_channel is not None:
            await admin_channel.close()
        etcd.cleanup()
    return phase


async def settle(pid: int | None, limit: float, window: float = 2.0, idle_pct: float = 30.0) -> tuple[float, bool]:
    """Wait until the coordinator's CPU use over `window` seconds drops below `idle_pct`.

    Set-up leaves work behind (deltas still being fanned out, lease renewals); joins measured
    on a busy coordinator would measure the backlog. Returns (seconds waited, settled?).
    """
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        c0 = _procs.cpu_seconds(pid)
        await asyncio.sleep(window)
        if 100 * (_procs.cpu_seconds(pid) - c0) / window < idle_pct:
            return time.monotonic() - t0, True
    return time.monotonic() - t0, False


async def collect(w: WorkerProc, timeout: float) -> dict:
    try:
        return await w.recv("joined", timeout)
    except TimeoutError:
        w.send({"op": "collect"})
        return await w.recv("joined", 30)


async def amain(args: argparse.Namespace) -> int:
    client_cpu = _procs.pin_self(args.client_cpu)
    placement = (f"coordinator on CPU {_procs.usable(args.server_cpu)}, etcd on CPU {_procs.usable(args.etcd_cpu)}, "
                 f"{args.workers} client processes on CPU {client_cpu}")
    phases: list[Phase] = []
    with _procs.workdir(args.keep, "geomesh-bench-mesh-") as workdir:
        pki = _procs.make_pki(workdir / "pki")
        t = time.monotonic()
        for i in range(max(args.n)):
            pki.identity("gateway", gateway_name(i))
        for s in args.strategies:
            for k in range(args.joins):
                pki.identity("gateway", joiner_name(s, k))
        print(f"issued {max(args.n) + len(args.strategies) * args.joins} gateway certificates in "
              f"{time.monotonic() - t:.1f}s", file=sys.stderr)
        workers = [WorkerProc(i, workdir / f"worker{i}.log") for i in range(args.workers)]
        try:
            for w in workers:
                await w.start(args.client_cpu)
            for idx, n in enumerate(args.n):
                order = list(args.strategies) if idx % 2 == 0 else list(reversed(args.strategies))
                for strategy in order:
                    t = time.monotonic()
                    phases.append(await run_phase(args, workdir, pki, workers, n, strategy))
                    print(f"N={n} {strategy} done in {time.monotonic() - t:.1f}s", file=sys.stderr)
        finally:
            await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)
    phases.sort(key=lambda p: (p.n, list(STRATEGIES).index(p.strategy)))
    print_report(args, phases, placement)
    if args.json:
        args.json.write_text(json.dumps({"placement": placement, "phases": [
            {**{k: v for k, v in asdict(p).items() if k != "joins"}, "summary": p.summary(),
             "joins": [{k: v for k, v in asdict(j).items() if k not in ("per_gateway_ms", "bytes_per_gateway",
                                                                         "msgs_per_gateway")} for j in p.joins]}
            for p in phases]}, indent=1, default=str))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="mesh convergence: join latency and bytes per join for N simulated "
                                            "gateways, geomesh's delta streams vs a full-map strategy")
    p.add_argument("--n", type=lambda s: sorted({int(x) for x in s.split(",")}), default=[100, 300, 1000],
                   help="comma-separated mesh sizes (default 100,300,1000)")
    p.add_argument("--strategies", type=lambda s: [x for x in s.split(",") if x], default=list(STRATEGIES),
                   help=f"comma-separated, of {', '.join(STRATEGIES)} (default both)")
    p.add_argument("--joins", type=int, default=20, help="joins measured per N and strategy (default %(default)s)")
    p.add_argument("--workers", type=int, default=4, help="client processes holding the simulated gateways "
                   "(default %(default)s)")
    p.add_argument("--regions", type=int, default=10, help="regions the gateways are spread over, each with an "
                   "instance subnet (default %(default)s)")
    p.add_argument("--lease-ttl", type=int, default=30, help="coordinator --lease-ttl; gateways heartbeat every "
                   "TTL/3 (default %(default)s)")
    p.add_argument("--join-timeout", type=float, default=60.0, help="seconds to wait for one join to reach every "
                   "gateway (default %(default)s)")
    p.add_argument("--phase-seconds", type=float, default=180.0, help="time bound of the set-up steps and of the "
                   "joins of one (N, strategy) (default %(default)s)")
    p.add_argument("--snapshots", action="store_true", help="open the N sessions from revision 0 (each gets a "
                   "full snapshot: O(N^2) set-up); default: resume from the revision of the last registration, as "
                   "a reconnecting agent does (the joiner's own snapshot is always measured)")
    p.add_argument("--open-rate", type=float, default=0.0, help="sessions opened per second during set-up, over "
                   "all client processes; 0 = as fast as the coordinator takes them (default %(default)s)")
    p.add_argument("--settle-seconds", type=float, default=60.0, help="before the joins, wait up to this long for "
                   "the coordinator to go idle (CPU < 30%% over 2 s) (default %(default)s)")
    p.add_argument("--pause", type=float, default=0.1, help="seconds between joins (default %(default)s)")
    p.add_argument("--server-cpu", type=_procs.parse_cpu, default=1, help="CPU for the coordinator, or 'none' "
                   "(default %(default)s)")
    p.add_argument("--etcd-cpu", type=_procs.parse_cpu, default=0, help="CPU for etcd, or 'none' (default "
                   "%(default)s, with the clients)")
    p.add_argument("--client-cpu", type=_procs.parse_cpu, default=0, help="CPU for the client processes, or "
                   "'none' (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="N = 20, 3 joins, 2 client processes, 3 regions: "
                   "proves it runs")
    p.add_argument("--keep", type=Path, metavar="DIR", help="work in DIR and keep it: PKI, etcd data, "
                   "coordinator and client logs (default: a temporary directory, removed)")
    p.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    p.add_argument("--profile", type=Path, help="directory: run each coordinator under cProfile, one file per phase")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.quick:
        args.n, args.joins, args.workers, args.regions = [20], 3, 2, 3
    unknown = [s for s in args.strategies if s not in STRATEGIES]
    if unknown:
        parser().error(f"unknown strategy {unknown[0]!r}: choose from {', '.join(STRATEGIES)}")
    if not args.n or min(args.n) < 1 or args.joins < 1 or args.workers < 1 or not 1 <= args.regions <= 200:
        parser().error("--n, --joins and --workers must be positive, --regions 1..200")
    if max(args.n) + args.joins > 9999:
        parser().error("at most 9999 gateways (names are g-0000 .. g-9999)")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
