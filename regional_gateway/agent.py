"""The gateway agent: registration, the session stream, and making the host match the mesh.

Flow: load (or create, mode 0600) the WireGuard key; register with a coordinator (public key in,
mesh IP out); bring the WireGuard interface up with the mesh address; open the session stream
and keep it: heartbeats up (load, backend health, and every `PEER_REPORT_INTERVAL` the mesh peers'
handshake ages as the WireGuard interface shows them; none with backend=none; the software
version goes in the hello), mesh + routing deltas down. Each mesh delta
is folded into the local view and the applier changes only the peers that differ; each routing
delta gives a new immutable RoutingTable handed to the data plane. On any stream failure the
agent moves to the next coordinator address (`geomesh.follow`) and resumes from the last revision it
applied (a replica without that history answers with snapshots). The data path never waits on any of
this: it reads whatever table it was last given.

Reachability (docs/reachability.md): from the mesh view plus itself the agent computes the probe
plan (`geomesh.probe_plan.plan`, the same in every process) and gives its `ReachProber` the
targets the plan assigns it, as clients reach them (public IP of the WireGuard endpoint, proxy and
TLS ports). Each debounced verdict change wakes the heartbeat loop, so the vote leaves at once
(heartbeats are spaced at least `MIN_HEARTBEAT_GAP` apart, so a burst of changes goes out as one
or two messages); the first heartbeat of every session, and the first after the target set
changed, carries every current verdict with `reach_complete`.

Certificates (docs/certificates.md, "On the gateway"): the agent keeps an X25519 sealing key
(`AgentConfig.sealing_key_file`, 0600) and sends its public half at Register. A session message
with `certificates_set` hands the whole set to the `CertificateIntake` (off the event loop), which
opens and checks each bundle and keeps it on disk; the resulting set goes to the data plane. The
certificates saved by an earlier run are in service before any coordinator is reached. The ACME
HTTP-01 challenges in flight (`http_challenges_set`) go to the data plane's plain listener and
the revision of the set is acked in every heartbeat (`http_challenges_revision`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import grpc
from prometheus_client import Counter, Gauge

from geomesh import state_file
from geomesh.api import geomesh_pb2 as pb
from geomesh.api import geomesh_pb2_grpc as pbg
from geomesh.channel import Targets, client_channel, insecure_metadata
from geomesh.errors import GeomeshError, ValidationError
from geomesh.follow import Backoff, follow
from geomesh.logs import event
from geomesh.model import GatewayState
from geomesh.pki import Identity
from geomesh.probe_plan import plan
from geomesh.routing_table import RoutingTable
from geomesh.sealing import load_or_create_sealing_key, public_bytes
from regional_gateway import saved_state
from regional_gateway.agent_config import AgentConfig
from regional_gateway.certificate_intake import CertificateIntake
from regional_gateway.certificate_requests import request_certificate
from regional_gateway.mesh_view import (
    MeshPeerInfo,
    apply_mesh_update,
    desired_peers,
    handshake_ages,
    probe_regions,
    probe_targets,
)
from regional_gateway.proxy.certificates import ManagedCertificate
from regional_gateway.proxy.on_demand import Answer
from regional_gateway.reach_prober import ProbeSettings, ReachProber
from regional_gateway.wireguard import keys

log = logging.getLogger("geomesh.gateway.agent")

DELTAS = Counter("geomesh_gateway_deltas_applied_total", "session messages applied", ["kind"])
RECONNECTS = Counter("geomesh_gateway_reconnects_total", "session streams (re)opened after a failure")
REVISION = Gauge("geomesh_gateway_revision", "etcd revision of the gateway's applied view")
CONNECTED = Gauge("geomesh_gateway_coordinator_connected", "1 while the session stream is open")
REACH_TARGETS = Gauge("geomesh_gateway_reach_targets", "gateways the probe plan assigns this gateway to probe")
REACH_VOTES = Counter("geomesh_gateway_reach_votes_sent_total", "reachability verdicts sent in heartbeats",
                      ["kind"])  # kind: change | complete

STATE_AGE = Gauge("geomesh_gateway_state_age_seconds", "seconds since the state in service was last known "
                  "current (0 while the session is open; -1 before any state)")
SERVING_SAVED = Gauge("geomesh_gateway_serving_saved_state", "1 while serving saved state with no coordinator yet")

PEER_REPORT_INTERVAL = 5.0  # seconds between two heartbeats carrying the peers' handshake ages
MIN_HEARTBEAT_GAP = 0.1  # seconds between two heartbeats when verdict changes wake the loop
NOT_SERVING_LOG_INTERVAL = 10.0  # seconds between "no saved state and no coordinator" lines
SAVE_DELAY = 0.5  # seconds: changes within this are saved as one write
SESSION_BACKOFF = Backoff(0.1, 2.0, jitter=(0.5, 1.5))  # between sessions (geomesh.follow)
REGISTER_BACKOFF = Backoff(0.2, 5.0, jitter=(0.5, 1.5))  # between Register attempts


class DataPlane(Protocol):
    """What the agent needs from the proxy (regional_gateway.proxy)."""

    def update_table(self, table: RoutingTable, mesh: dict[str, MeshPeerInfo]) -> None: ...
    def backend_health(self) -> list[tuple[str, str, bool]]: ...
    def active_connections(self) -> int: ...
    def update_certificates(self, certificates: list[ManagedCertificate]) -> None: ...
    def update_http_challenges(self, challenges: dict[str, str]) -> None: ...


class Agent:
    def __init__(self, config: AgentConfig, *, dataplane: DataPlane | None = None,
                 on_change: Callable[[Agent], None] | None = None) -> None:
        self.config = config
        self.dataplane = dataplane
        self.on_change = on_change
        self.targets = Targets(list(config.coordinators))
        self.identity = None if config.insecure else Identity("gateway", config.name, config.tls_ca,  # type: ignore[arg-type]
                                                               config.tls_cert, config.tls_key)  # type: ignore[arg-type]
        self.private_key = keys.load_or_create(config.wg_key_file)
        self.public_key = self.private_key.public_key
        try:
            sealing_key = load_or_create_sealing_key(config.sealing_key_file)
        except (OSError, ValueError) as exc:  # SealError is a ValueError
            raise ValidationError("state.dir", f"{config.sealing_key_file} is not a usable sealing key: {exc}") from None
        self.sealing_public_key = public_bytes(sealing_key)
        self.certificates = CertificateIntake(sealing_key, config.certs_dir)
        self._certificates_lock = asyncio.Lock()
        self.http_challenges: dict[str, str] = {}  # ACME HTTP-01 token -> key authorization
        self.http01_revision = 0  # the revision of the challenge set applied (acked in every heartbeat)
        self.mesh_ip = ""
        self.mesh_cidr = ""
        self.revision = 0
        self.table = RoutingTable()
        self.mesh: dict[str, MeshPeerInfo] = {}
        self.applier = None
        self.proxy = None  # the ProxyServer when this process runs the data plane
        self._retry: asyncio.Task | None = None
        self.connected = asyncio.Event()
        # reachability: the prober (while running), verdict changes not sent yet, and whether the
        # next heartbeat must carry the whole set (the target set changed)
        self.prober: ReachProber | None = None
        self._reach_pending: dict[str, tuple[bool, float]] = {}
        self._reach_resend = False
        self._plan_key: frozenset[tuple[str, str]] | None = None
        self._plan = plan({config.name: config.region}, config.reach_prober_regions)
        self._wake = asyncio.Event()
        # the mesh peers' handshake ages (peer name -> seconds, 0 = never) as last observed on the
        # WireGuard interface (none with backend=none), and when they were last sent
        self.handshakes: dict[str, float] = {}
        self._handshakes_at = 0.0
        self._handshakes_sent = -1.0
        # static stability: the saved state, whether registration succeeded in this process
        self.registered = False
        self.saved: saved_state.GatewaySaved | None = None
        self.current_at = 0.0  # wall-clock time the state in service was last known current
        self.writer = state_file.DebouncedWriter(config.state_file, SAVE_DELAY)
        self._not_serving_logged = 0.0
        STATE_AGE.set_function(self.state_age)

    # -- plumbing ------------------------------------------------------------------------------

    def _metadata(self) -> tuple:
        return insecure_metadata(None, "gateway", self.config.name) if self.config.insecure else ()

    def _channel(self) -> grpc.aio.Channel:
        return client_channel(self.targets.current, self.identity, insecure=self.config.insecure)

    def state_age(self) -> float:
        if self.connected.is_set():
            self.current_at = time.time()
            return 0.0
        return time.time() - self.current_at if self.current_at else -1.0

    def load_saved(self) -> saved_state.GatewaySaved | None:
        """The saved state, if there is one this gateway may serve (else None, logged)."""
        path = self.config.state_file
        raw = state_file.load(path, kind=saved_state.KIND, owner=self.config.name,
                              max_age=self.config.state_max_age)
        if raw is None:
            return None
        try:
            saved = saved_state.decode(raw.payload, name=self.config.name, public_key=self.public_key)
        except state_file.StateFileError as exc:
            state_file.REFUSED.labels(saved_state.KIND, exc.reason).inc()
            event(log, "saved state refused, starting without it", logging.ERROR, path=str(path),
                  reason=exc.reason, error=str(exc))
            return None
        self.current_at = raw.written_at
        in_use = {str(spec.cert): saved_state.fingerprint(spec.cert) for spec in self.config.certificates}
        if dict(saved.certificates) != in_use:
            event(log, "certificate files changed since the state was saved: serving the files as they are now",
                  logging.WARNING)
        return saved

    def _saved_now(self) -> state_file.Saved:
        payload = saved_state.encode(saved_state.GatewaySaved(
            self.mesh_ip, self.mesh_cidr, self.public_key, self.revision, self.table, dict(self.mesh),
            tuple((str(spec.cert), saved_state.fingerprint(spec.cert)) for spec in self.config.certificates)))
        return state_file.Saved(saved_state.KIND, self.config.name, self.revision, time.time(), payload)

    def save_soon(self) -> None:
        """Save the state in service (debounced; only once a coordinator gave us a mesh address)."""
        if self.mesh_ip:
            self.writer.changed(self._saved_now)

    async def register(self, *, serving: bool = True) -> None:
        """Register (idempotent: a known gateway keeps its mesh IP), trying each coordinator.
        `serving` False: nothing is served meanwhile (no saved state), said plainly and often."""
        backoff = REGISTER_BACKOFF
        attempts = 0
        while True:
            target = self.targets.current
            attempts += 1
            try:
                async with self._channel() as ch:
                    resp = await pbg.GatewayControlStub(ch).Register(pb.RegisterRequest(
                        name=self.config.name, region=self.config.region, public_ip=self.config.public_ip,
                        public_ipv6=self.config.public_ipv6, wg_port=self.config.wg_listen_port,
                        wg_public_key=self.public_key, proxy_port=self.config.proxy_port,
                        https_port=self.config.https_port, sealing_public_key=self.sealing_public_key),
                        timeout=10, metadata=self._metadata())
                if self.mesh_ip and resp.gateway.mesh_ip != self.mesh_ip:
                    event(log, "the coordinator gave another mesh address than the one in service: restart the "
                          "gateway to move to it", logging.ERROR, in_service=self.mesh_ip, given=resp.gateway.mesh_ip)
                else:
                    self.mesh_ip, self.mesh_cidr = resp.gateway.mesh_ip, resp.mesh_cidr
                self.registered = True
                SERVING_SAVED.set(0)
                event(log, "registered", gateway=self.config.name, coordinator=target, mesh_ip=self.mesh_ip,
                      public_key=self.public_key)
                self.save_soon()
                return
            except grpc.aio.AioRpcError as exc:
                level = logging.ERROR if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                                        grpc.StatusCode.PERMISSION_DENIED) else logging.WARNING
                event(log, "register failed", level, coordinator=target, code=exc.code().name, error=exc.details())
                self.targets.advance()
            now = time.monotonic()
            if not serving and now - self._not_serving_logged >= NOT_SERVING_LOG_INTERVAL:
                self._not_serving_logged = now
                event(log, "not serving: no saved state and no coordinator answers; retrying", logging.ERROR,
                      state_file=str(self.config.state_file), coordinators=list(self.config.coordinators),
                      attempts=attempts)
            pause, backoff = backoff.next(random.random)
            await asyncio.sleep(pause)

    async def setup_mesh(self) -> None:
        if self.config.wg_backend == "none":
            event(log, "WireGuard disabled (backend=none): mesh peers are computed, not configured")
            return
        from regional_gateway.wireguard.applier import MeshApplier
        from regional_gateway.wireguard.selection import select_backend

        backend = select_backend(self.config.wg_backend)  # type: ignore[arg-type]
        prefix = self.mesh_cidr.rsplit("/", 1)[1] if "/" in self.mesh_cidr else "16"
        await asyncio.to_thread(backend.ensure_interface, self.config.wg_interface, self.private_key,
                                self.config.wg_listen_port, f"{self.mesh_ip}/{prefix}")
        self.applier = MeshApplier(backend)
        event(log, "WireGuard interface up", interface=self.config.wg_interface, address=f"{self.mesh_ip}/{prefix}",
              port=self.config.wg_listen_port)

    # -- the session ---------------------------------------------------------------------------

    async def _heartbeats(self, call) -> None:
        complete = True  # the first heartbeat of every session carries every verdict
        self._handshakes_sent = -1.0  # and, once observed, the handshake ages
        while True:
            hb = pb.Heartbeat(load=host_load(), http_challenges_revision=self.http01_revision)
            self._add_handshakes(hb)
            if self.dataplane is not None:
                hb.active_connections = self.dataplane.active_connections()
                for app, instance_id, healthy in self.dataplane.backend_health():
                    hb.backends.append(pb.BackendHealth(app=app, instance_id=instance_id, healthy=healthy))
            self._wake.clear()
            self._add_reach(hb, complete or self._reach_resend)
            complete = False
            await call.write(pb.SessionUp(heartbeat=hb))
            sent = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.heartbeat_interval)
            gap = MIN_HEARTBEAT_GAP - (time.monotonic() - sent)
            if gap > 0:
                await asyncio.sleep(gap)

    def _add_handshakes(self, hb: pb.Heartbeat) -> None:
        """Put the peers' handshake ages into `hb` when a new observation is there and the last
        ones left at least PEER_REPORT_INTERVAL ago (at most one entry per mesh peer)."""
        now = time.monotonic()
        if (not self.handshakes or self._handshakes_at <= self._handshakes_sent
                or now - self._handshakes_sent < PEER_REPORT_INTERVAL):
            return
        for name, age in sorted(self.handshakes.items()):
            hb.peers.append(pb.PeerHandshake(name=name, age_seconds=age))
        self._handshakes_sent = now

    async def _observe_mesh(self, interval: float = PEER_REPORT_INTERVAL) -> None:
        """Every `interval`: read the interface's peers (which refreshes the applier's handshake
        gauges) and keep their handshake ages by mesh peer name for the heartbeats."""
        assert self.applier is not None
        while True:
            try:
                actual = await self.applier.observe()
            except Exception as e:  # noqa: BLE001 - keep observing: the next round may work
                event(log, "mesh observe failed", logging.WARNING, error=str(e))
            else:
                self.handshakes = handshake_ages(actual, self.mesh, time.time())
                self._handshakes_at = time.monotonic()
            await asyncio.sleep(interval)

    def _add_reach(self, hb: pb.Heartbeat, complete: bool) -> None:
        """Put the verdicts to send into `hb`: the changes since the last heartbeat, or all of them."""
        if complete:
            self._reach_pending.clear()
            self._reach_resend = False
            hb.reach_complete = True
            results = self.prober.results() if self.prober is not None else {}
            for target, (up, rtt_ms) in sorted(results.items()):
                hb.reach.append(pb.ReachVote(target=target, up=up, rtt_ms=rtt_ms if up else 0.0))
            REACH_VOTES.labels("complete").inc(len(results))
            return
        if self._reach_pending:
            for target, (up, rtt_ms) in sorted(self._reach_pending.items()):
                hb.reach.append(pb.ReachVote(target=target, up=up, rtt_ms=rtt_ms))
            REACH_VOTES.labels("change").inc(len(self._reach_pending))
            self._reach_pending.clear()

    def _on_reach_change(self, target: str, up: bool, rtt_ms: float) -> None:
        """A debounced verdict changed: send it with the next heartbeat, now."""
        self._reach_pending[target] = (up, rtt_ms)
        self._wake.set()

    def update_probe_targets(self) -> None:
        """Give the prober the targets the plan assigns to this gateway (recomputed only when the
        set of gateways or their regions changed; the targets when their addresses changed).

        The plan covers the gateways the coordinator judges: every gateway of the mesh view plus
        this one, except those the routing table knows are not routable (a crashed gateway is out
        of DNS already, a draining one is not judged and its votes do not count). A timed-out
        gateway stays: the probes decide whether it leaves DNS. Every gateway holds the same
        view, so every gateway computes the same plan.
        """
        if self.prober is None:
            return
        out = {name for name, g in self.table.gateways.items() if not g.routable}
        me = self.table.gateways.get(self.config.name)
        if me is not None and me.state is GatewayState.DRAINING:
            view: dict[str, MeshPeerInfo] = {}  # not judged, its votes do not count: no probes
        else:
            view = {name: info for name, info in self.mesh.items() if name not in out}
        regions_of = probe_regions(view, self.config.name, self.config.region)
        key = frozenset(regions_of.items())
        if key != self._plan_key:
            self._plan_key = key
            self._plan = plan(regions_of, self.config.reach_prober_regions)
        targets = probe_targets(view, self._plan, self.config.name)
        if targets != self.prober.targets:
            # a target left, came or moved (probed afresh): the coordinator replaces this prober's
            # votes with the new whole set in the next heartbeat, so no vote outlives its probes
            self._reach_resend = True
            self._wake.set()
            self.prober.set_targets(targets)
            REACH_TARGETS.set(len(targets))
            event(log, "probe targets", count=len(targets), targets=sorted(targets)[:16])

    async def apply(self, msg: pb.SessionDown) -> None:
        if msg.HasField("mesh"):
            self.mesh = apply_mesh_update(self.mesh, msg.mesh, self.config.name)
            DELTAS.labels("mesh_snapshot" if msg.mesh.snapshot else "mesh_delta").inc()
            await self.apply_mesh()
        if msg.HasField("routing"):
            self.table = self.table.apply(msg.routing)
            DELTAS.labels("routing_snapshot" if msg.routing.snapshot else "routing_delta").inc()
        if self.dataplane is not None and (msg.HasField("routing") or msg.HasField("mesh")):
            self.dataplane.update_table(self.table, self.mesh)
        if msg.HasField("routing") or msg.HasField("mesh"):
            self.update_probe_targets()
        if msg.certificates_set:
            await self.apply_certificates(list(msg.certificates))
        if msg.http_challenges_set:  # answered on the plain listener, acked with the next heartbeat (now)
            self.http_challenges = {c.token: c.key_authorization for c in msg.http_challenges}
            if self.dataplane is not None:
                self.dataplane.update_http_challenges(self.http_challenges)
            self.http01_revision = msg.revision
            self._wake.set()
        self.revision = max(self.revision, msg.revision)
        REVISION.set(self.revision)
        self.current_at = time.time()
        if msg.HasField("routing") or msg.HasField("mesh"):
            self.save_soon()
        if self.on_change is not None:
            self.on_change(self)

    async def apply_certificates(self, bundles: list[pb.CertificateBundle]) -> None:
        """Take a whole certificate set (opened and written off the event loop) and serve it."""
        async with self._certificates_lock:
            served = await asyncio.to_thread(self.certificates.apply, bundles)
        DELTAS.labels("certificates").inc()
        if self.dataplane is not None:
            self.dataplane.update_certificates(served)

    async def apply_mesh(self) -> None:
        """Make the interface match the current view; on failure, log and retry shortly."""
        if self.applier is None:
            return
        desired = desired_peers(self.mesh, keepalive=self.config.wg_keepalive, own_public_key=self.public_key)
        try:
            await self.applier.apply_peers(desired)
        except GeomeshError as exc:  # WireGuardError, UapiError, ValidationError: keep the session
            event(log, "mesh apply failed; retrying", logging.ERROR, error=str(exc))
            if self._retry is None or self._retry.done():
                self._retry = asyncio.create_task(self._retry_apply())

    async def _retry_apply(self) -> None:
        await asyncio.sleep(2.0)
        await self.apply_mesh()

    async def session_once(self) -> None:
        """One session stream, until it fails."""
        async with self._channel() as ch:
            call = pbg.GatewayControlStub(ch).Session(metadata=self._metadata())
            await call.write(pb.SessionUp(hello=pb.SessionHello(name=self.config.name, last_revision=self.revision,
                                                                version=VERSION)))
            beats = asyncio.create_task(self._heartbeats(call))
            try:
                first = True
                while True:
                    msg = await call.read()
                    if msg is grpc.aio.EOF:
                        raise ConnectionError("coordinator closed the session")
                    if first:
                        CONNECTED.set(1)
                        self.connected.set()
                        event(log, "session open", coordinator=self.targets.current, revision=msg.revision,
                              snapshot=msg.routing.snapshot)
                        first = False
                    await self.apply(msg)
            finally:
                CONNECTED.set(0)
                self.connected.clear()
                beats.cancel()
                call.cancel()

    async def _session(self, _target: str) -> bool:
        """Register if needed, then one session; False: it counts as working by how long it lived."""
        try:
            if not self.registered:
                await self.register()
            await self.session_once()
        except grpc.aio.AioRpcError as exc:
            event(log, "session failed", logging.WARNING, coordinator=self.targets.current,
                  code=exc.code().name, error=exc.details())
            if exc.code() == grpc.StatusCode.NOT_FOUND:  # removed by an admin: register again
                self.revision = 0
                await self.register()
        except (ConnectionError, OSError) as exc:
            event(log, "session ended", logging.WARNING, coordinator=self.targets.current, error=str(exc))
        return False

    async def start_dataplane(self) -> None:
        """The proxy, started once the mesh address exists (its mesh listener binds to it)."""
        if self.dataplane is not None or not self.config.dataplane:
            return
        from regional_gateway.dataplane_bridge import start_dataplane

        self.proxy, self.dataplane = await start_dataplane(self.config, self.mesh_ip, ask=self.request_certificate)
        self.dataplane.update_certificates(self.certificates.in_service())
        self.dataplane.update_http_challenges(self.http_challenges)

    async def request_certificate(self, name: str) -> Answer:
        """A custom domain's certificate on demand, asked of the current coordinator."""
        wait = float(self.config.custom_domains.get("on_demand_wait", 10.0))
        return await request_certificate(self._channel, self._metadata(), name, wait)

    def start_prober(self) -> None:
        c = self.config
        self.prober = ReachProber(ProbeSettings(interval=c.reach_interval, timeout=c.reach_timeout,
                                                fall=c.reach_fall, rise=c.reach_rise), self._on_reach_change)
        self._plan_key = None
        self.update_probe_targets()

    async def stop_prober(self) -> None:
        if self.prober is not None:
            prober, self.prober = self.prober, None
            await prober.close()
            REACH_TARGETS.set(0)

    async def come_up(self) -> None:
        """Registration, or the saved state when no coordinator answers in time (see the module)."""
        self.saved = self.load_saved()
        if self.saved is None:
            await self.register(serving=False)
        else:
            try:
                await asyncio.wait_for(self.register(), self.config.coordinator_deadline)
            except TimeoutError:
                self.mesh_ip, self.mesh_cidr = self.saved.mesh_ip, self.saved.mesh_cidr
                SERVING_SAVED.set(1)
                event(log, "no coordinator answered: serving the saved state, registering in the background",
                      logging.WARNING, deadline_s=self.config.coordinator_deadline, revision=self.saved.revision,
                      age_s=round(time.time() - self.current_at, 1), mesh_ip=self.mesh_ip,
                      gateways=len(self.saved.table.gateways), peers=len(self.saved.mesh))
            if self.saved.mesh_ip == self.mesh_ip:  # the same registration: resume from its revision
                self.table, self.mesh, self.revision = self.saved.table, dict(self.saved.mesh), self.saved.revision
                REVISION.set(self.revision)

    async def run(self) -> None:
        async with self._certificates_lock:  # the saved certificates: in service before any coordinator answers
            await asyncio.to_thread(self.certificates.load_saved)
        await self.come_up()
        await self.setup_mesh()
        await self.start_dataplane()
        if self.saved is not None and self.revision:
            if self.dataplane is not None:
                self.dataplane.update_table(self.table, self.mesh)
            await self.apply_mesh()
        self.start_prober()
        observer = asyncio.create_task(self._observe_mesh()) if self.applier is not None else None
        try:
            await follow(self._session, targets=self.targets, backoff=SESSION_BACKOFF,
                         on_retry=lambda _retry: RECONNECTS.inc())
        finally:
            if observer is not None:
                observer.cancel()
            with contextlib.suppress(Exception):
                await asyncio.shield(self.writer.flush())
            await self.stop_prober()
            if self.applier is not None:
                await self.applier.close(remove_interface=False)


def _version() -> str:
    try:
        return importlib.metadata.version("geomesh")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


VERSION = _version()  # sent in SessionHello.version


def host_load() -> float:
    """The 1-minute load average per CPU, capped to 0..1 (Heartbeat.load)."""
    try:
        return min(1.0, max(0.0, os.getloadavg()[0] / (os.cpu_count() or 1)))
    except OSError:
        return 0.0


async def _main(config: AgentConfig, stop: asyncio.Event) -> None:
    import signal

    from geomesh import metrics

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    metrics.serve(config.metrics_host, config.metrics_port)
    agent = Agent(config)
    task = asyncio.create_task(agent.run())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    if agent.proxy is not None:
        await agent.proxy.shutdown()
    if task.done() and not task.cancelled() and task.exception() is not None and not stop.is_set():
        raise task.exception()  # type: ignore[misc]


def run(config_path: Path | str, args: object = None) -> int:
    """Entry point used by `geomesh-gateway --config FILE` (regional_gateway.main)."""
    from regional_gateway.agent_config import load

    try:
        config = load(Path(config_path))
    except ValidationError as exc:
        print(f"geomesh-gateway: invalid configuration: {exc}")
        return 2
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency
        runner = asyncio.run
    try:
        runner(_main(config, asyncio.Event()))
    except ValidationError as exc:  # found at start, e.g. a sealing key file that is not one
        print(f"geomesh-gateway: cannot start: {exc}")
        return 2
    return 0


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m regional_gateway.agent CONFIG.toml (or: geomesh-gateway --config CONFIG.toml)")
    sys.exit(run(sys.argv[1]))
