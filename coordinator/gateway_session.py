"""The GatewayControl servicer: Register, instances, and the gateway's Session stream.

The session streams the gateway's mesh peers and routing updates (shared per revision and viewer
region through `coordinator.fanout`) and reads its heartbeats beside.

The gateway session also owns the gateway's liveness: while the stream is open `alive/<g>` is
`{"session": "open"}`, bound to this replica's lease. When the stream is reset or closed the key
is deleted at once (only if it is still ours: a gateway that moved to another replica keeps the
key that replica wrote): a crashed gateway is out at once. When the session ends for heartbeat
silence or a send the gateway does not take (the watchdog), the key is rewritten `{"session":
"timed_out"}` instead: a gateway whose control session stalls while users still reach it stays
in DNS until the probes say it is unreachable (`coordinator.reach_decider`). If the replica dies
or loses etcd, its one lease expires and etcd deletes all its gateways' keys.

The session also carries the gateway's probe votes (`Heartbeat.reach`): checked
(`heartbeats.check_votes`; bad votes are ignored and counted, never an error), merged into the
prober's vote map and written to `votes/<prober>` when it changed, at once but at most
`vote_write_rate` writes per second (burst twice that). Instance health is taken only from each
instance's owner (`heartbeats.health_owner`).

A gateway identity is bound to its enrollment (`coordinator.enrollment`): `Register` only as
enrolled, instances and health only in the enrolled region. Callers are identified and judged by
`coordinator.access`, which also ends open streams whose caller was revoked or unenrolled.
Write calls are audit lines (`coordinator.audit`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import grpc
from prometheus_client import Counter

from coordinator.access import Access, end_stream
from coordinator.cert_records import bundles_for
from coordinator.cert_requests import CertificateRequests
from coordinator.enrollment import check_region, check_registration, fits
from coordinator.fanout import Fanout
from coordinator.heartbeats import (
    GatewayReport,
    GatewayStats,
    HealthCoalescer,
    HeartbeatReport,
    TokenBucket,
    VoteMap,
    check_handshakes,
    check_votes,
    fold_heartbeats,
    merge_votes,
)
from coordinator.operations import Operations
from coordinator.rpc_common import Caller, Malformed, stream, unary
from coordinator.servicer_common import (
    SENT,
    SENT_BYTES,
    SESSIONS,
    SLOW_READERS,
    ServicerBase,
    checked_name,
    current_task,
    send_deadline,
)
from coordinator.state import State
from coordinator.state import key as state_key
from coordinator.store import EtcdStore, ReplicaLease
from geomesh.api import geomesh_pb2 as pb
from geomesh.api import geomesh_pb2_grpc as pbg
from geomesh.errors import (
    NotFoundError,
    PermissionDeniedError,
    PreconditionError,
    StoreUnavailableError,
    UnauthenticatedError,
    ValidationError,
)
from geomesh.model import Gateway, Instance, sealing_key_text
from geomesh.sealing import SecretBox

log = logging.getLogger("geomesh.coordinator")


WATCHDOG = Counter("geomesh_coordinator_sessions_ended_by_watchdog_total",
                   "gateway sessions ended while a send was blocked", ["reason"])
HEARTBEATS_THROTTLED = Counter("geomesh_coordinator_heartbeats_throttled_total",
                               "heartbeats over the per-gateway rate replaced by a newer one before their content was looked at")
HEALTH_BATCHES = Counter("geomesh_coordinator_health_batches_total",
                         "coalesced health writes of one gateway (one batch per interval at most)", ["result"])
HEALTH_IGNORED = Counter("geomesh_coordinator_health_reports_ignored_total",
                         "instance health reports not taken (not_owner: another gateway of the region owns it)",
                         ["reason"])
VOTES_IGNORED = Counter("geomesh_coordinator_reach_votes_ignored_total",
                        "reachability votes in heartbeats that were ignored", ["reason"])
HANDSHAKES_IGNORED = Counter("geomesh_coordinator_handshake_reports_ignored_total",
                             "peer handshake ages in heartbeats that were ignored", ["reason"])
VOTE_WRITES = Counter("geomesh_coordinator_reach_vote_writes_total",
                      "writes of a prober's vote map to votes/<prober>", ["result"])
TIMED_OUT_REASONS = frozenset({"silent", "send_timeout"})  # the session stalled: alive turns timed_out


class GatewayControlService(ServicerBase, pbg.GatewayControlServicer):
    def __init__(self, feed: Fanout, state: State, ops: Operations, store: EtcdStore, lease: ReplicaLease,
                 access: Access, *, lease_ttl: int, mesh_cidr: str, health_interval: float = 1.0,
                 heartbeat_rate: float = 20.0, vote_write_rate: float = 5.0,
                 secrets: SecretBox | None = None) -> None:
        super().__init__(feed, ops, access)
        self.secrets = secrets  # opens the certificates' keys to seal them to each gateway (None: no ACME)
        self.state = state  # the mirror, for the heartbeat rules (health owners, stored votes)
        self.store = store
        self.lease = lease
        self.lease_ttl = lease_ttl
        self.silence = lease_ttl * 1.5  # no heartbeat for this long ends the session
        self.send_timeout = self.silence  # and so does one send blocked for as long
        self.health_interval = health_interval
        self.heartbeat_rate = heartbeat_rate
        self.vote_write_rate = vote_write_rate
        self._cleanups: set[asyncio.Task] = set()
        self.mesh_cidr = mesh_cidr
        self.planned_stop = False  # set by Coordinator.stop: sessions end, alive keys stay to their lease
        self.stats = GatewayStats()  # what this replica's sessions report (load, version, handshakes)
        self.cert_requests: CertificateRequests | None = None  # set by the server: certificates on demand

    @unary("gateway", write=True)
    async def Register(self, request: pb.RegisterRequest, context, caller: Caller) -> pb.RegisterResponse:
        checked_name("name", request.name)
        caller.require_gateway(request.name)
        gw = Gateway(name=request.name, region=request.region, public_ip=request.public_ip,
                     public_ipv6=request.public_ipv6, wg_port=request.wg_port,
                     wg_public_key=request.wg_public_key, mesh_ip="", proxy_port=request.proxy_port,
                     https_port=request.https_port,
                     sealing_public_key=sealing_key_text(request.sealing_public_key))
        enrollment = await self.enrollment_ops.fetch(gw.name)  # from etcd: its revision guards the write
        check_registration(enrollment, gw)
        assert enrollment is not None
        registered = await self.ops.register_gateway(
            gw, guard=(state_key("enrollments", gw.name), enrollment.mod_revision))
        log.info("gateway registered", extra={"fields": {"gateway": gw.name, "mesh_ip": registered.mesh_ip}})
        return pb.RegisterResponse(gateway=registered.to_proto(), mesh_cidr=self.mesh_cidr)

    @unary("gateway", write=True)
    async def RequestCertificate(self, request: pb.CertificateRequest, context,
                                 caller: Caller) -> pb.CertificateRequestResponse:
        """A custom domain's certificate, on demand (`coordinator.cert_requests` decides)."""
        if self.cert_requests is None:
            raise PreconditionError("no certificates on demand on this coordinator")
        return await self.cert_requests.request(caller.name, request.name)

    def _own_instance(self, caller: Caller, region: str, what: str) -> None:
        """A gateway identity changes instances only in its enrolled region (not the region its
        record claims: probe finding 2)."""
        check_region(self.access.enrollments.get(caller.name), caller.name, region, what)

    @unary("gateway", write=True)
    async def RegisterInstance(self, request: pb.Instance, context, caller: Caller) -> pb.Instance:
        inst = Instance.from_proto(request)
        self._own_instance(caller, inst.region, f"instance {inst.key!r}")
        return (await self.ops.add_instance(inst)).to_proto()

    @unary("gateway", write=True)
    async def DeregisterInstance(self, request: pb.InstanceRef, context, caller: Caller) -> pb.Empty:
        name = f"{checked_name('app', request.app)}/{checked_name('id', request.id)}"
        inst = self.feed.snapshot().instances.get(name)
        if inst is None:
            raise NotFoundError(f"instance {name!r} does not exist")
        self._own_instance(caller, inst.region, f"instance {name!r}")
        await self.ops.remove_instance(request.app, request.id)
        return pb.Empty()

    @stream("gateway")
    async def Session(self, request_iterator, context, caller: Caller):
        first = await _next_or_none(request_iterator, timeout=self.lease_ttl * 2)
        if isinstance(first, Malformed):
            raise first.problem("Session")
        if first is None or first.WhichOneof("msg") != "hello":
            raise ValidationError("hello", "the first message of a session must be a hello")
        hello = first.hello
        checked_name("hello.name", hello.name)
        caller.require_gateway(hello.name, "the session of gateway")
        if caller.role != "gateway":
            raise UnauthenticatedError("sessions are for gateway identities")
        if hello.name not in self.feed.snapshot().gateways:
            # registered a moment ago (maybe through another replica) but not yet in our cache?
            stored = await self.ops.store.get(state_key("gateways", hello.name))
            if stored is None:
                raise NotFoundError(f"gateway {hello.name!r} is not registered: call Register first")
            await self.state.wait_change(stored.mod_revision - 1, timeout=10)
        name = hello.name
        enrollment = self.access.enrollments.get(name)
        if enrollment is None:
            raise PermissionDeniedError(f"gateway {name!r} is not enrolled")
        record = self.feed.snapshot().gateways.get(name)
        if record is None or not fits(enrollment, record):
            raise NotFoundError(f"gateway {name!r}: its record does not fit its enrollment: register again")
        self.access.bind_session(name, enrollment.mod_revision)
        await context.send_initial_metadata(())  # headers now: a later status needs no second header op
        live = _Liveness(name, await self._mark_alive(name), current_task(), context)
        SESSIONS.labels("gateway").inc()
        log.info("gateway session open", extra={"fields": {"gateway": name}})
        coalescer = HealthCoalescer(self.health_interval)
        flush = asyncio.Event()
        live.report = self.stats.open(name, hello.version)
        stored_votes = self.state.votes.get(name, {})
        book = _VoteBook(votes=stored_votes, written=stored_votes)
        reader = asyncio.create_task(self._read_heartbeats(name, request_iterator, coalescer, flush, book))
        live.tasks = (reader, asyncio.create_task(self._flush_health(coalescer, flush)),
                      asyncio.create_task(self._write_votes(name, book)))
        # the watchdog: while a send is blocked (the gateway does not read), the reader's end
        # (heartbeat silence, close, bad input) ends the session from the loop, beside the handler
        reader.add_done_callback(lambda task: self._reader_done(live, task))
        try:
            have = hello.last_revision if hello.last_revision > 0 else -1
            certs_sent: object = None  # what the gateway has of the certificate set
            http01_sent = -1  # the revision of the http01/ directory the gateway has the set of
            while True:
                delta = self.feed.changes_since(have)
                # memoised per revision range (and region): N sessions share one computation
                mesh = self.feed.mesh_update(delta, name, since=have)
                routing = self.feed.routing_update(delta, since=have)
                msg = pb.SessionDown(revision=delta.revision)
                if mesh.snapshot or mesh.upserts or mesh.removals:
                    msg.mesh.CopyFrom(mesh)
                if routing.snapshot or routing.upserts or routing.removals:
                    msg.routing.CopyFrom(routing)
                certs_sent = self._add_certificates(name, msg, certs_sent)
                http01_sent = self._add_http_challenges(msg, http01_sent)
                if msg.HasField("mesh") or msg.HasField("routing") or msg.certificates_set or msg.http_challenges_set:
                    SENT.labels("gateway", "snapshot" if delta.routing is None else "delta").inc()
                    SENT_BYTES.labels("gateway").inc(msg.ByteSize())
                    live.sending = True
                    with send_deadline(self.send_timeout, lambda: self._end_now(live, "send_timeout")):
                        yield msg
                    live.sending = False
                    del msg
                    if reader.done():  # it ended while we were sending
                        live.reason = reader.result()  # raises if the gateway misbehaved
                        return  # the gateway closed its side or went silent
                have = delta.revision
                if self.feed.revision > have:
                    continue
                lost = self.lease.lost
                # shared futures: waiting costs no task per session
                done, _ = await asyncio.wait({self.feed.changed(), reader, lost}, return_when=asyncio.FIRST_COMPLETED)
                if reader in done:
                    live.reason = reader.result()  # raises if the gateway misbehaved
                    return  # the gateway closed its side, or went silent
                if lost.done():
                    # etcd expired this replica's lease (unreachable for longer than the TTL) while
                    # the gateway is still connected: mark it alive again under the new lease
                    log.warning("replica lease expired while connected: renewing", extra={"fields": {"gateway": name}})
                    live.alive_rev = await self._mark_alive(name)
        finally:
            # grpc cancels this handler when the gateway goes away, and may cancel it again while
            # it cleans up: the cleanup runs as its own task so a second cancel cannot abort it
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._end_session(live))

    def _add_certificates(self, name: str, msg: pb.SessionDown, sent: object) -> object:
        """Put the whole certificate set, keys sealed to this gateway, into `msg` when it differs
        from what was `sent` (a certificate renewed or added, the gateway's sealing key changed);
        returns what the gateway then has."""
        if self.secrets is None:
            return sent
        snap = self.feed.snapshot()
        gw = snap.gateways.get(name)
        sealing_key = gw.sealing_public_key if gw is not None else ""
        records = sorted(snap.certs.values(), key=lambda r: r.name)
        have = (sealing_key, tuple((r.name, r.serial) for r in records))
        if have == sent:
            return sent
        bundles, failed = bundles_for(records, sealing_key, self.secrets) if sealing_key else ([], [])
        if failed:
            log.error("certificate keys that this replica's secrets key does not open (is --secrets-key "
                      "the same on every replica?)", extra={"fields": {"gateway": name, "certificates": failed}})
        msg.certificates.extend(bundles)
        msg.certificates_set = True
        return have

    def _add_http_challenges(self, msg: pb.SessionDown, sent: int) -> int:
        """Put the whole ACME HTTP-01 challenge set into `msg` when the `http01/` directory changed
        since the set the gateway has (`sent`: the directory's revision then); every write counts,
        even one that leaves the set the same, so each publish gets an ack at its revision."""
        changed = self.state.dir_revision.get("http01", 0)
        if changed == sent:
            return sent
        records = sorted(self.feed.snapshot().http01.values(), key=lambda r: r.token)
        msg.http_challenges.extend(r.to_proto() for r in records)
        msg.http_challenges_set = True
        return changed

    def _reader_done(self, live: _Liveness, reader: asyncio.Task) -> None:
        if not live.sending or live.cleanup is not None:
            return  # the handler sees it itself (or the session is already over)
        if reader.cancelled():
            return
        self._end_now(live, "bad_input" if reader.exception() is not None else reader.result())

    def _end_now(self, live: _Liveness, reason: str) -> None:
        """End a session whose handler is stuck in a send (the gateway does not read): clear
        `alive` now, queue a status and cancel the handler. Runs on the loop, beside the handler."""
        if live.cleanup is not None:
            return
        log.warning("gateway session ended by the watchdog", extra={"fields": {"gateway": live.name, "reason": reason}})
        WATCHDOG.labels(reason).inc()
        live.reason = reason
        if reason == "send_timeout":
            SLOW_READERS.labels("gateway").inc()
        self._end_session(live)
        details = {
            "silent": f"no heartbeat for {self.silence:g} s (1.5 x lease TTL) while not reading",
            "send_timeout": f"a message was not taken within {self.send_timeout:g} s (1.5 x lease TTL)",
            "bad_input": "a bad heartbeat while not reading",
        }.get(reason, reason)
        end_stream(live.handler, live.context, grpc.StatusCode.UNAVAILABLE, f"session ended: {details}")

    def _end_session(self, live: _Liveness) -> asyncio.Task:
        """The session's one cleanup (idempotent): its task, started on the first call."""
        if live.cleanup is None:
            for task in live.tasks:
                task.cancel()
            if live.report is not None:
                self.stats.close(live.name, live.report)
            SESSIONS.labels("gateway").dec()
            live.cleanup = asyncio.create_task(self._clear_alive(live.name, live.alive_rev,
                                                                 timed_out=live.reason in TIMED_OUT_REASONS))
            self._cleanups.add(live.cleanup)
            live.cleanup.add_done_callback(self._cleanups.discard)
        return live.cleanup

    async def _clear_alive(self, name: str, alive_rev: int, *, timed_out: bool) -> None:
        """The session is over: alive/<g> deleted (reset, close, bad input), or rewritten
        timed_out (heartbeat silence, a send not taken) so the probes decide. In a planned stop
        of this replica neither: the key stays until the lease expires or the gateway, reconnected
        elsewhere, rewrites it (issue 14: a planned stop never empties DNS)."""
        if self.planned_stop:
            log.info("gateway session ended by a planned stop: alive left to the lease",
                     extra={"fields": {"gateway": name}})
            return
        try:
            if timed_out:
                await self.ops.mark_timed_out(name, alive_rev, await self.lease.ensure())
            else:
                await self.ops.clear_alive(name, alive_rev)
        except StoreUnavailableError:
            log.warning("could not update alive; the replica lease will expire", extra={"fields": {"gateway": name}})
        if timed_out:
            log.warning("gateway session timed out: alive until the probes find it unreachable",
                        extra={"fields": {"gateway": name}})
        else:
            log.info("gateway session closed", extra={"fields": {"gateway": name}})

    async def _mark_alive(self, name: str) -> int:
        lease_id = await self.lease.ensure()
        return await self.ops.mark_alive(name, lease_id)

    async def _read_heartbeats(self, name: str, request_iterator, coalescer: HealthCoalescer,
                               flush: asyncio.Event, book: _VoteBook) -> str:
        """Consume heartbeats; return "closed" when the gateway closes its side, "silent" when it
        sent nothing for 1.5 × the lease TTL.

        Any message proves the gateway is there. Over `heartbeat_rate` per second (burst twice
        that) a heartbeat's content waits: the latest such heartbeat is kept and looked at when
        the bucket has a token again, the ones it replaces are counted and folded into it (their
        votes are deltas: `fold_heartbeats` carries them over). So a flood costs the coordinator at most `heartbeat_rate` looks per
        second and the last word the gateway said is always the one that counts. Health of the
        instances this gateway owns goes to the coalescer, votes to the vote book."""
        loop = asyncio.get_running_loop()
        bucket = TokenBucket(self.heartbeat_rate, self.heartbeat_rate * 2)
        waiting: tuple[HeartbeatReport, pb.Heartbeat] | None = None  # over the rate, latest only
        last_seen = loop.time()
        reading: asyncio.Future | None = None
        try:
            while True:
                if reading is None:  # one read in flight: a timeout never cancels a read
                    reading = asyncio.ensure_future(request_iterator.__anext__())
                now = loop.time()
                timeout = self.silence - (now - last_seen)
                if waiting is not None:
                    timeout = min(timeout, bucket.wait(now))
                done, _ = await asyncio.wait((reading,), timeout=max(timeout, 0.0))
                now = loop.time()
                if not done:
                    if waiting is not None and bucket.take(now):
                        self._take_heartbeat(name, *waiting, coalescer, flush, book)
                        waiting = None
                    elif now - last_seen >= self.silence:
                        return "silent"
                    continue
                try:
                    msg = reading.result()
                except (StopAsyncIteration, grpc.aio.AioRpcError):
                    return "closed"
                finally:
                    reading = None
                last_seen = now
                if isinstance(msg, Malformed):
                    raise msg.problem("Session")  # ends the session: INVALID_ARGUMENT
                if msg.WhichOneof("msg") != "heartbeat":
                    continue
                report = HeartbeatReport.from_proto(msg.heartbeat)  # ValidationError ends the session
                if waiting is None and bucket.take(now):
                    self._take_heartbeat(name, report, msg.heartbeat, coalescer, flush, book)
                    continue
                heartbeat = msg.heartbeat
                if waiting is not None:  # replaced by a newer word; its votes (deltas) carried over
                    HEARTBEATS_THROTTLED.inc()
                    heartbeat = fold_heartbeats(waiting[1], heartbeat)
                waiting = (report, heartbeat)
        finally:
            if reading is not None:
                reading.cancel()

    def _take_heartbeat(self, name: str, report: HeartbeatReport, heartbeat: pb.Heartbeat,
                        coalescer: HealthCoalescer, flush: asyncio.Event, book: _VoteBook) -> None:
        """Look at one heartbeat's content (within the rate)."""
        gw = self.state.gateways.get(name)
        enrollment = self.access.enrollments.get(name)
        if gw is None or enrollment is None or gw.region != enrollment.region:
            return  # health and votes only while its record is in its enrolled region
        self._take_report(name, report, heartbeat, asyncio.get_running_loop().time())
        if heartbeat.reach or heartbeat.reach_complete:
            self._take_votes(name, heartbeat, book)
        cached: dict[str, bool] = {}
        not_owner = 0
        for instance in report.backends:
            inst = self.state.instances.get(instance)
            if inst is None or inst.region != gw.region:  # only its own region's
                continue
            if self.state.health_owner(instance, inst.region) != name:
                not_owner += 1  # one verdict per instance: its owner's
                continue
            cached[instance] = inst.healthy
        if not_owner:
            HEALTH_IGNORED.labels("not_owner").inc(not_owner)
        if coalescer.offer(report.backends, cached):
            flush.set()

    def _take_report(self, name: str, report: HeartbeatReport, heartbeat: pb.Heartbeat, now: float) -> None:
        """Keep the gateway's load, connections and (when the heartbeat carries them) its peers'
        handshake ages in `stats`; bad handshake entries are ignored and counted."""
        entry = self.stats.reports.get(name)
        if entry is None:
            return
        entry.load, entry.active_connections = report.load, report.active_connections
        entry.http01_revision = heartbeat.http_challenges_revision  # its ack (coordinator.http01)
        if heartbeat.peers:
            gateways = self.state.gateways
            accepted, ignored = check_handshakes(name, heartbeat.peers, gateways, limit=len(gateways))
            for reason, count in ignored.items():
                HANDSHAKES_IGNORED.labels(reason).inc(count)
            entry.handshakes, entry.handshakes_at = accepted, now

    def _take_votes(self, name: str, heartbeat: pb.Heartbeat, book: _VoteBook) -> None:
        gateways = self.state.gateways

        def region_of(gateway: str) -> str | None:
            g = gateways.get(gateway)
            return None if g is None else g.region

        accepted, ignored = check_votes(name, heartbeat.reach, region_of)
        for reason, count in ignored.items():
            VOTES_IGNORED.labels(reason).inc(count)
        merged = merge_votes(book.votes, accepted, heartbeat.reach_complete, gateways)
        if merged != book.votes:
            book.votes = merged
            book.changed.set()

    async def _write_votes(self, name: str, book: _VoteBook) -> None:
        """Write the vote map to votes/<name> when it differs from what etcd has: at once, but at
        most `vote_write_rate` times per second (burst twice that); the latest map wins."""
        loop = asyncio.get_running_loop()
        bucket = TokenBucket(self.vote_write_rate, self.vote_write_rate * 2)
        while True:
            await book.changed.wait()
            book.changed.clear()
            while book.votes != book.written:
                if not bucket.take(loop.time()):
                    VOTE_WRITES.labels("delayed").inc()
                    await asyncio.sleep(1 / self.vote_write_rate)
                    continue
                votes = book.votes
                try:
                    ok = await self.ops.write_votes(name, votes)
                except StoreUnavailableError:
                    VOTE_WRITES.labels("retry").inc()
                    await asyncio.sleep(0.5)
                    continue
                VOTE_WRITES.labels("written" if ok else "gone").inc()
                if not ok:
                    return  # the gateway was removed
                book.written = votes

    async def _flush_health(self, coalescer: HealthCoalescer, flush: asyncio.Event) -> None:
        """Write pending health at most once per interval, every pending instance in one batch."""
        loop = asyncio.get_running_loop()
        while True:
            await flush.wait()
            flush.clear()
            due = coalescer.due_at()
            if due is None:
                continue
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            batch = coalescer.take(loop.time())
            written = False
            try:
                written = await self.ops.set_instances_health(batch)
            except StoreUnavailableError:
                pass  # pending again (and re-reported by the next heartbeat anyway)
            finally:
                coalescer.done(written)
            HEALTH_BATCHES.labels("written" if written else "retry").inc()
            if coalescer.pending:
                flush.set()


@dataclass(slots=True)
class _VoteBook:
    """One session's vote map: the current one and the last one in etcd (maps are replaced,
    never changed in place); `changed` wakes the writer."""

    votes: VoteMap
    written: VoteMap
    changed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(slots=True)
class _Liveness:
    """One gateway session: its alive key's revision, handler, tasks, and its one cleanup."""

    name: str
    alive_rev: int
    handler: asyncio.Task
    context: grpc.aio.ServicerContext
    sending: bool = False
    tasks: tuple[asyncio.Task, ...] = ()  # the heartbeat reader, the health flusher, the vote writer
    cleanup: asyncio.Task | None = None
    reason: str = "closed"  # why it ended: "silent" and "send_timeout" leave the gateway timed out
    report: GatewayReport | None = None  # its entry in GatewayControlService.stats


async def _next_or_none(iterator, timeout: float):
    try:
        return await asyncio.wait_for(iterator.__anext__(), timeout)
    except (StopAsyncIteration, TimeoutError, grpc.aio.AioRpcError):
        return None
