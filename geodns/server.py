"""geomesh-dns as a process: sockets, the view source, signals and an ordered shutdown.

`Server(config)` has no side effects; `load()` opens the GeoIP database and reads the initial
view (the static state file, or an empty "not ready" view until the coordinator's snapshot
arrives); `serve()` binds UDP and TCP on every listen address (the same port for both; port 0
picks one), starts the feed or the SIGHUP reload, and runs until SIGTERM/SIGINT or `stop()`.
Shutdown order: stop reading UDP and accepting TCP -> close open TCP connections (a grace
period for replies in flight) -> cancel the feed -> close sockets.

The region map (`geodns.region_map`) is built off the data path by `_maintain_map`, in the map
builder process (`geodns.map_builder`: the serving process's interpreter never runs a build,
so answers do not pause for one): the database is walked there at start and whenever its file
changes (`--geoip-poll`), and the map is compiled there whenever the regions, their
coordinates or the default region change. Until the first map is ready, and while a new one is built, answers keep coming
from what is in service (at start: a City look-up per client); the finished map is swapped in
with one assignment. Each build is logged with its time and the process's memory, and counted
in the metrics.

With `--workers N` each worker process runs one `Server` (`reuse_port`, a stats pipe to its
parent); the parent is `geodns.supervisor.Supervisor`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY

from geodns import static_state
from geodns.answer import Responder
from geodns.config import Config
from geodns.map_builder import DatabaseInfo, MapBuilder
from geodns.metrics import GeoDnsCollector
from geodns.nearest import Locator
from geodns.region_map import RegionMap, sites_of
from geodns.rrl import RateLimiter
from geodns.stats import Stats
from geodns.tcp import DnsTcpProtocol, TcpConnections
from geodns.tcp_admission import PenaltyBox, TcpAbuseCollector
from geodns.udp import BatchUdp, ProtocolUdp, batch_supported
from geodns.view import View
from geomesh import metrics
from geomesh.errors import GeomeshError, ValidationError
from geomesh.logs import event
from geomesh.pki import Identity, identity_of_pem
from geomesh.routing_table import RoutingTable

log = logging.getLogger("geodns.server")

SHUTDOWN_GRACE = 2.0
STATS_INTERVAL = 1.0
MAP_RETRY = 5.0  # seconds before a failed database load or map build is tried again


def bind_pair(host: str, port: int, reuse_port: bool, attempts: int = 50) -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket bound to the same (host, port); port 0 picks one free for both."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    last: OSError | None = None
    for _ in range(attempts if port == 0 else 1):
        udp = socket.socket(family, socket.SOCK_DGRAM)
        tcp = socket.socket(family, socket.SOCK_STREAM)
        try:
            for s in (udp, tcp):
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if reuse_port:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            udp.bind((host, port))
            tcp.bind((host, udp.getsockname()[1]))
            for size in (4 << 20, 1 << 20):
                try:
                    udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
                    udp.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
                    break
                except OSError:
                    continue
            udp.setblocking(False)
            tcp.setblocking(False)
            return udp, tcp
        except OSError as exc:
            udp.close()
            tcp.close()
            last = exc
            if exc.errno != errno.EADDRINUSE or port != 0:
                break
    assert last is not None
    raise last


@dataclasses.dataclass
class _Listeners:
    """What `Server._bind` opened, for `Server._shutdown` to close."""

    udp_readers: list[BatchUdp] = dataclasses.field(default_factory=list)
    udp_transports: list[asyncio.BaseTransport] = dataclasses.field(default_factory=list)
    tcp_servers: list[asyncio.AbstractServer] = dataclasses.field(default_factory=list)
    sockets: list[socket.socket] = dataclasses.field(default_factory=list)


class Server:
    def __init__(self, config: Config, *, reuse_port: bool = False,
                 stats_pipe: multiprocessing.connection.Connection | None = None, worker: int = 0) -> None:
        self.config = config
        self.reuse_port = reuse_port or config.workers > 1
        self.stats_pipe = stats_pipe
        self.worker = worker
        self.stats = Stats()
        self.responder: Responder | None = None
        self.locator: Locator | None = None
        self.rrl = RateLimiter(config.rrl) if config.rrl.enabled else None
        self.feed: Any = None
        self.ports: list[int] = []
        self.connections = TcpConnections(config.tcp_max_connections, config.tcp_max_per_client, PenaltyBox(
            config.tcp_abuse_cooldown, config.tcp_abuse_cooldown_max, config.tcp_abuse_clients))
        self._stop: asyncio.Event | None = None
        self._map_wake: asyncio.Event | None = None
        self.map_stats: dict[str, Any] = {"builds": {"database": 0, "regions": 0}, "failures": 0,
                                          "seconds": {"database": 0.0, "regions": 0.0}, "bytes": 0, "blocks": 0,
                                          "rankings": 0, "rss": 0, "geoip_build_epoch": 0, "ready": 0}
        self._zone_overrides = {k: val for k, val in config.zone_overrides.items() if val is not None}

    # -- set-up ------------------------------------------------------------------------------

    def load(self) -> None:
        cfg = self.config
        assert cfg.geoip_db is not None
        self.locator = Locator(cfg.geoip_db)
        self.saved_table: RoutingTable | None = None
        self.saved_at = 0.0
        if cfg.state is not None:
            view = static_state.load(cfg.state, self._zone_overrides)
        else:
            zone, _ = static_state.zone_from({}, self._zone_overrides)
            view = View.empty(zone)
            if cfg.state_dir is not None:  # static stability: answer from the last view at once
                from geodns.feed import load_saved

                saved = load_saved(cfg.state_dir / "geodns.state", zone.name, cfg.state_max_age)
                if saved is not None:
                    self.saved_table, self.saved_at = saved
                    view = View.from_table(self.saved_table, zone)
        self.responder = Responder(view, self.locator, self.stats, udp_payload=cfg.udp_payload,
                                   cache_size=cfg.cache_size, cache_bytes=cfg.cache_bytes,
                                   log_queries=cfg.query_log, reply_cache=cfg.reply_cache)
        self.map_stats["geoip_build_epoch"] = self.locator.build_epoch
        source = str(cfg.state) if cfg.state else "saved state" if self.saved_table is not None else "coordinator"
        event(log, "view loaded", source=source, zone=view.zone.name,
              revision=view.revision, regions=len(view.regions), apps=len(view.apps), ready=view.ready,
              geoip=self.locator.database_type, geoip_build=self.locator.build_epoch)

    def set_table(self, table: RoutingTable) -> None:
        """A new routing table from the feed: rebuild the view (`Responder.set_view` keeps the
        templates it leaves right)."""
        assert self.responder is not None
        old = self.responder.view
        view = View.from_table(table, old.zone)
        self.responder.set_view(view)
        self._wake_map()
        healthy = sorted(r.name for r in view.regions.values() if r.healthy)
        event(log, "view updated", logging.DEBUG, revision=view.revision, regions=len(view.regions),
              healthy=healthy, apps=len(view.apps))

    def reload_state(self) -> None:
        """SIGHUP with --state: re-read the file; keep the current view when it is bad."""
        assert self.responder is not None and self.config.state is not None
        try:
            view = static_state.load(self.config.state, self._zone_overrides)
        except ValidationError as exc:
            event(log, "state file rejected, keeping the current view", logging.ERROR, error=str(exc))
            return
        self.responder.set_view(view)
        self._wake_map()
        event(log, "state file reloaded", revision=view.revision, regions=len(view.regions), apps=len(view.apps))

    def snapshot(self) -> dict[str, Any]:
        snap = self.stats.snapshot()
        status = self.feed.status if self.feed is not None else None
        view = self.responder.view if self.responder is not None else None
        snap["feed"] = {"revision": view.revision if view is not None else 0,
                        "connected": int(status.connected) if status else 0,
                        "updates": status.updates if status else 0,
                        "reconnects": status.reconnects if status else 0}
        snap["workers"] = 1
        if self.responder is not None:
            snap["cache"] = self.responder.cache_stats()
        snap["geoip_build_epoch"] = self.map_stats["geoip_build_epoch"]
        if self.config.region_map:  # without a map (--no-region-map) its metrics are left out
            snap["region_map"] = {**self.map_stats, "builds": dict(self.map_stats["builds"]),
                                  "seconds": dict(self.map_stats["seconds"])}
        snap["tcp_connections"] = self.connections.admission.total
        snap["tcp_abuse"] = self.connections.penalty.snapshot()
        return snap

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    # -- running -----------------------------------------------------------------------------

    async def serve(self) -> None:
        if self.responder is None:
            self.load()
        assert self.responder is not None
        gc.collect()
        gc.freeze()  # what start-up built is permanent: keep it out of the collector's scans
        cfg = self.config
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        listeners = _Listeners()
        tasks: list[asyncio.Task] = []
        try:
            await self._bind(loop, listeners)
            event(log, "listening", addresses=[f"{h}:{p}" for (h, _), p in zip(cfg.listen, self.ports, strict=True)],
                  port=self.ports[0], batch_io=bool(listeners.udp_readers), worker=self.worker, pid=os.getpid())
            if cfg.port_file is not None and self.stats_pipe is None:
                write_port_file(cfg.port_file, self.ports[0])
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
            if cfg.state is not None:
                loop.add_signal_handler(signal.SIGHUP, self.reload_state)
            if cfg.coordinators:
                tasks.append(asyncio.create_task(self._run_feed(), name="routing-feed"))
            if cfg.region_map:
                self._map_wake = asyncio.Event()
                tasks.append(asyncio.create_task(self._maintain_map(), name="region-map"))
            if self.stats_pipe is not None:
                self.stats_pipe.send(("ready", self.worker, self.ports))
                tasks.append(asyncio.create_task(self._publish_stats(), name="stats"))
            await self._stop.wait()
            event(log, "shutting down", worker=self.worker)
        finally:
            await self._shutdown(loop, listeners, tasks)

    async def _bind(self, loop: asyncio.AbstractEventLoop, listeners: _Listeners) -> None:
        """UDP and TCP on every listen address (the same port for both), each socket recorded in
        `listeners` as soon as it exists (a failure part-way leaves nothing for `_shutdown` to miss)."""
        cfg = self.config
        responder = self.responder
        assert responder is not None
        for host, port in cfg.listen:
            udp, tcp = bind_pair(host, port, self.reuse_port)
            listeners.sockets += [udp, tcp]
            self.ports.append(udp.getsockname()[1])
            if cfg.batch_io and batch_supported():
                reader = BatchUdp(udp, responder, self.stats, self.rrl)
                reader.start(loop)
                listeners.udp_readers.append(reader)
            else:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: ProtocolUdp(responder, self.stats, self.rrl), sock=udp)
                listeners.udp_transports.append(transport)
            tcp.listen(1024)
            server = await loop.create_server(
                lambda: DnsTcpProtocol(responder, self.stats, self.connections, cfg.tcp_idle_timeout), sock=tcp)
            listeners.tcp_servers.append(server)

    async def _shutdown(self, loop: asyncio.AbstractEventLoop, listeners: _Listeners,
                        tasks: list[asyncio.Task]) -> None:
        """Stop reading UDP and accepting TCP -> close open TCP connections (replies in flight get
        `SHUTDOWN_GRACE`) -> cancel the tasks (feed, map, stats) -> close the sockets."""
        for reader in listeners.udp_readers:
            reader.stop()
        for t in listeners.udp_transports:
            t.close()
        for server in listeners.tcp_servers:
            server.close()
        self.connections.close_all()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(s.wait_closed() for s in listeners.tcp_servers)),
                                   SHUTDOWN_GRACE)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for s in listeners.sockets:
            s.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)

    def _wake_map(self) -> None:
        if self._map_wake is not None:
            self._map_wake.set()

    async def _maintain_map(self) -> None:
        """Keep the region map in step with the database file and the view's regions (see the
        module's docstring). The database is walked and each map compiled in the builder process
        (`geodns.map_builder`, awaited from a worker thread); a failed build keeps what serves and
        is tried again after `MAP_RETRY` seconds (a builder that died is started again)."""
        assert self.responder is not None and self.config.geoip_db is not None and self._map_wake is not None
        loop = asyncio.get_running_loop()
        path = self.config.geoip_db
        builder = MapBuilder()
        file_id: tuple[int, int, int] | None = None
        built_for: tuple | None = None
        poll = self.config.geoip_poll
        try:
            while True:
                self._map_wake.clear()
                wait: float | None = poll if poll > 0 else None
                try:
                    st = os.stat(path)
                    now_id = (st.st_ino, st.st_size, st.st_mtime_ns)
                    if builder.loaded is None or (now_id != file_id and poll > 0):
                        started = time.monotonic()
                        db: DatabaseInfo = await _in_thread(loop, builder.load, path)
                        seconds = time.monotonic() - started
                        if file_id is not None and now_id != file_id:
                            self.locator = Locator(path)
                            self.responder.locator = self.locator
                        file_id, built_for = now_id, None
                        self._map_built("database", seconds)
                        self.map_stats["geoip_build_epoch"] = db.build_epoch
                        event(log, "geoip database loaded", path=str(path), type=db.database_type,
                              build_epoch=db.build_epoch, age_days=round(_age(db.build_epoch) / 86400, 1),
                              networks=db.leaves, places=db.places, arrays_mb=round(db.nbytes / 1e6, 1),
                              seconds=round(seconds, 3), rss_mb=round(_rss() / 1e6, 1), builder_pid=builder.pid)
                    view = self.responder.view
                    want = (sites_of(view.regions.values()), view.zone.default_region)
                    if want != built_for:
                        started = time.monotonic()
                        rmap: RegionMap = await _in_thread(loop, builder.compile, *want)
                        seconds = time.monotonic() - started
                        self.responder.set_map(rmap)  # one assignment: the old map served until now
                        built_for = want
                        self._map_built("regions", seconds)
                        self.map_stats.update(bytes=rmap.nbytes(), blocks=rmap.blocks, rankings=len(rmap.rankings),
                                              ready=1)
                        event(log, "region map built", regions=len(want[0]), default_region=want[1] or None,
                              blocks=rmap.blocks, rankings=len(rmap.rankings), map_mb=round(rmap.nbytes() / 1e6, 1),
                              seconds=round(seconds, 3), rss_mb=round(self.map_stats["rss"] / 1e6, 1))
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.map_stats["failures"] += 1
                    wait = MAP_RETRY if wait is None else min(wait, MAP_RETRY)
                    event(log, "region map build failed, keeping what serves", logging.ERROR,
                          error=f"{type(exc).__name__}: {exc}", retry_in_s=wait)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._map_wake.wait(), wait)
        finally:
            builder.close()

    def _map_built(self, stage: str, seconds: float) -> None:
        self.map_stats["builds"][stage] += 1
        self.map_stats["seconds"][stage] = seconds
        self.map_stats["rss"] = _rss()

    async def _run_feed(self) -> None:
        from geodns.feed import RoutingFeedClient

        cfg = self.config
        identity = None
        if cfg.tls_ca and cfg.tls_cert and cfg.tls_key:
            identity = Identity("dns", cfg.name, cfg.tls_ca, cfg.tls_cert, cfg.tls_key)
        writer = None
        if cfg.state_dir is not None and self.worker == 0:  # one writer when workers share the directory
            from geomesh.state_file import DebouncedWriter

            writer = DebouncedWriter(cfg.state_dir / "geodns.state")
        assert self.responder is not None
        self.feed = RoutingFeedClient(list(cfg.coordinators), identity, self.set_table,
                                      insecure=cfg.insecure, name=cfg.name, saved=self.saved_table,
                                      writer=writer, zone=self.responder.view.zone.name, hold=cfg.resync_hold,
                                      saved_at=self.saved_at, announce=self._announcement())
        try:
            await self.feed.run()
        finally:
            if writer is not None:
                await writer.flush()

    def _announcement(self) -> tuple[str, str] | None:
        """What this server announces on its feed (`feed.announcement`): worker 0 only, as its
        identity's name (the certificate's CN; --name without one)."""
        from geodns.feed import announcement

        cfg = self.config
        if self.worker != 0:
            return None
        name = cfg.name
        if cfg.tls_cert is not None and not cfg.insecure:
            try:
                name = identity_of_pem(cfg.tls_cert.read_bytes())[1]
            except (OSError, GeomeshError) as exc:  # the channel will say what is wrong with it
                event(log, "could not read the identity name from --tls-cert; announcing --name", logging.WARNING,
                      error=str(exc)[:200])
        found = announcement(name, cfg.listen[0], self.ports[0], cfg.announce_address)
        if found is None:
            event(log, "not announced on the routing feed: the first --listen address is a wildcard; give "
                  "--announce-address so ACME challenges wait for this server", logging.WARNING)
        return found

    async def _publish_stats(self) -> None:
        assert self.stats_pipe is not None
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            try:
                self.stats_pipe.send(("stats", self.worker, self.snapshot()))
            except (BrokenPipeError, OSError):
                self.stop()  # the parent is gone
                return


def _in_thread(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> asyncio.Future:
    """`fn(*args)` in a daemon thread (a build in progress never holds up shutdown)."""
    fut = loop.create_future()

    def settle(result: Any, exc: BaseException | None) -> None:
        if not fut.done():
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting task
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(settle, None, exc)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name=f"geodns-{fn.__name__}", daemon=True).start()
    return fut


def _rss() -> int:
    """This process's resident set in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _age(build_epoch: int) -> float:
    return max(0.0, time.time() - build_epoch)


def write_port_file(path: Path, port: int) -> None:
    """Write the bound port to `path` atomically (a test or script waits for it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, path)


def run(config: Config) -> None:
    """Serve in this process (one worker) until SIGTERM/SIGINT."""
    server = Server(config)
    server.load()
    if config.metrics_port >= 0:
        REGISTRY.register(GeoDnsCollector(server.snapshot))
        REGISTRY.register(TcpAbuseCollector(lambda: server.snapshot()["tcp_abuse"]))
        bound = metrics.serve(config.metrics_host, config.metrics_port)
        event(log, "metrics", address=f"{config.metrics_host}:{bound}")
    run_loop(server.serve())


def run_loop(coro: Any) -> None:
    """Run `coro` to completion on uvloop (asyncio's own loop where uvloop is missing)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(coro)
        return
    uvloop.run(coro)
