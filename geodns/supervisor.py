"""The parent of `--workers N` geomesh-dns processes: ports, workers, summed metrics, restarts.

`Supervisor.run` reserves each listen port (a bound, non-listening TCP socket with SO_REUSEPORT),
starts N worker processes (spawned; each runs one `geodns.server.Server` that binds the same
ports with SO_REUSEPORT, so the kernel spreads queries across them), writes the port file once
every worker is ready, forwards SIGHUP, and restarts a worker that dies after
`RESTART_DELAY`. Each worker sends its counters every second over a pipe; `Supervisor.snapshot`
sums them for the metrics: counters keep the last values of dead workers (so they stay
monotonic across restarts), gauges (connections, cache sizes, the feed) only what live workers
hold. SIGTERM/SIGINT stops the workers (SIGTERM, then a kill after the grace period).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import time
from typing import Any

from prometheus_client import REGISTRY

from geodns.config import Config
from geodns.metrics import GeoDnsCollector
from geodns.server import SHUTDOWN_GRACE, Server, bind_pair, run_loop, write_port_file
from geodns.stats import merge
from geodns.tcp_admission import TcpAbuseCollector, merge_snapshots
from geomesh import logs, metrics
from geomesh.logs import event

log = logging.getLogger("geodns.supervisor")



def _worker_main(config: Config, conn: multiprocessing.connection.Connection, index: int) -> None:
    logs.setup(config.log_level, config.log_format)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    server = Server(config, reuse_port=True, stats_pipe=conn, worker=index)
    try:
        server.load()
        run_loop(server.serve())
    except Exception:
        log.exception("worker failed")
        raise SystemExit(1) from None


class Supervisor:
    """The parent of `--workers N` processes."""

    RESTART_DELAY = 1.0

    def __init__(self, config: Config) -> None:
        self.config = config
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: dict[int, Any] = {}
        self.conns: dict[int, multiprocessing.connection.Connection] = {}
        self.snapshots: dict[int, dict[str, Any]] = {}
        self.retired: list[dict[str, Any]] = []  # last counters of workers that died (kept monotonic)
        self.ready: set[int] = set()
        self.stopping = False

    def snapshot(self) -> dict[str, Any]:
        live = list(self.snapshots.values())
        out = merge(live + self.retired)
        alive = merge(live)
        out["workers"] = sum(1 for p in self.procs.values() if p.exitcode is None)
        if "feed" in alive:
            out["feed"] = alive["feed"]
        # gauges: only what live workers hold (evictions stay counted from all)
        out["tcp_connections"] = alive["tcp_connections"]
        epochs = [s["geoip_build_epoch"] for s in live if s.get("geoip_build_epoch")]
        out["geoip_build_epoch"] = min(epochs) if epochs else 0
        maps = [s["region_map"] for s in live if "region_map" in s]
        if maps:  # every worker builds its own map: report the slowest build and the sum of memory
            out["region_map"] = {
                "builds": {k: sum(m["builds"][k] for m in maps) for k in maps[0]["builds"]},
                "seconds": {k: max(m["seconds"][k] for m in maps) for k in maps[0]["seconds"]},
                "failures": sum(m["failures"] for m in maps), "bytes": sum(m["bytes"] for m in maps),
                "blocks": maps[0]["blocks"], "rankings": maps[0]["rankings"], "rss": sum(m["rss"] for m in maps),
                "geoip_build_epoch": min(m["geoip_build_epoch"] for m in maps),
                "ready": sum(m["ready"] for m in maps)}
        out["tcp_abuse"] = merge_snapshots([s.get("tcp_abuse", {}) for s in live + self.retired],
                                           [s.get("tcp_abuse", {}) for s in live])
        for name, values in out["cache"].items():
            held = alive["cache"].get(name, {})
            values["bytes"], values["entries"] = held.get("bytes", 0), held.get("entries", 0)
        return out

    def _start(self, index: int, config: Config) -> None:
        recv, send = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_worker_main, args=(config, send, index), name=f"geodns-worker-{index}")
        proc.start()
        send.close()
        self.procs[index] = proc
        old = self.conns.pop(index, None)
        if old is not None:
            old.close()
        self.conns[index] = recv

    def run(self) -> None:
        cfg = self.config
        # reserve the ports: a TCP socket bound (not listening) with SO_REUSEPORT keeps the port ours
        # without receiving anything; the workers bind UDP and TCP on it
        reserved: list[socket.socket] = []
        listen = []
        for host, port in cfg.listen:
            udp, tcp = bind_pair(host, port, reuse_port=True)
            listen.append((host, udp.getsockname()[1]))
            udp.close()
            reserved.append(tcp)
        wcfg = dataclasses.replace(cfg, listen=tuple(listen), metrics_port=-1)
        if cfg.metrics_port >= 0:
            REGISTRY.register(GeoDnsCollector(self.snapshot))
            REGISTRY.register(TcpAbuseCollector(lambda: self.snapshot()["tcp_abuse"]))
            bound = metrics.serve(cfg.metrics_host, cfg.metrics_port)
            event(log, "metrics", address=f"{cfg.metrics_host}:{bound}")
        for i in range(cfg.workers):
            self._start(i, wcfg)
        stop = {"now": False}

        def on_term(signum: int, frame: Any) -> None:
            stop["now"] = True

        def on_hup(signum: int, frame: Any) -> None:
            for proc in self.procs.values():
                if proc.pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGHUP)

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        signal.signal(signal.SIGHUP, on_hup)
        restart_at: dict[int, float] = {}
        port_written = False
        try:
            while not stop["now"]:
                for conn in multiprocessing.connection.wait(list(self.conns.values()), timeout=0.2):
                    index = next(i for i, c in self.conns.items() if c is conn)
                    try:
                        kind, _, payload = conn.recv()  # type: ignore[misc]
                    except (EOFError, OSError):
                        conn.close()
                        self.conns.pop(index, None)
                        continue
                    if kind == "ready":
                        self.ready.add(index)
                    elif kind == "stats":
                        self.snapshots[index] = payload
                if not port_written and len(self.ready) == cfg.workers:
                    port_written = True
                    for s in reserved:
                        s.close()
                    reserved.clear()
                    event(log, "workers ready", workers=cfg.workers, port=listen[0][1])
                    if cfg.port_file is not None:
                        write_port_file(cfg.port_file, listen[0][1])
                now = time.monotonic()
                for index, proc in list(self.procs.items()):
                    if proc.exitcode is not None and index not in restart_at:
                        event(log, "worker exited, restarting", logging.ERROR, worker=index, exitcode=proc.exitcode)
                        restart_at[index] = now + self.RESTART_DELAY
                        self.ready.discard(index)
                        if index in self.snapshots:
                            self.retired.append(self.snapshots.pop(index))
                for index, when in list(restart_at.items()):
                    if now >= when:
                        del restart_at[index]
                        self._start(index, wcfg)
        finally:
            for proc in self.procs.values():
                if proc.exitcode is None and proc.pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + SHUTDOWN_GRACE + 3
            for proc in self.procs.values():
                proc.join(max(0.0, deadline - time.monotonic()))
                if proc.exitcode is None:
                    proc.kill()
                    proc.join()
            for s in reserved:
                s.close()
