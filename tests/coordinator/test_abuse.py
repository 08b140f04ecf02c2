"""The coordinator under abusive clients: many Watch streams, heartbeat floods, stalled sessions.

Each test runs a real coordinator process on a real etcd and attacks it the way the November 2026
probe did (findings 5, 14 and 6): raw HTTP/2 streams over mTLS that never open their flow-control
window (the `h2` library, so the client answers pings but reads nothing), and a gateway session
that sends heartbeats as fast as it can. They assert what a user relies on: coordinator memory
stays under a bound and comes back when the streams leave, other clients keep being served,
etcd is not flooded with revisions and the last reported health wins, and a gateway that stops
reading and heartbeating has its session marked timed out within 1.5 × the lease TTL (it then
leaves DNS when the probes find it unreachable: see test_reach.py).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import threading
import time
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from coordinator.heartbeats import HealthCoalescer, HeartbeatReport, TokenBucket, fold_heartbeats
from coordinator.state import key
from coordinator.store import EtcdStore, Txn
from geomesh.api import geomesh_pb2 as pb
from geomesh.errors import ValidationError
from geomesh.model import Instance
from geomesh.pki import SERVER_NAME, Identity

from .test_admin import KEY, expect, seed

REG = dict(region="eu-central", public_ip="192.0.2.21", wg_port=51820, wg_public_key=KEY, proxy_port=8080)
ETCD_MAX_TXN_OPS = 128


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def fill_instances(etcd_endpoint: str, app: str, count: int, region: str = "eu-central") -> int:
    """Write `count` instances of `app` straight into etcd (the coordinator's watch picks them up);
    returns the etcd revision after the last write."""
    store = EtcdStore(etcd_endpoint, timeout=10)
    await store.connect()
    try:
        revision = 0
        for start in range(0, count, ETCD_MAX_TXN_OPS):
            txn = Txn()
            for i in range(start, min(start + ETCD_MAX_TXN_OPS, count)):
                inst = Instance(app, f"i{i:05d}", region, f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}", 8080)
                txn.put(key("instances", inst.key), inst.to_json())
            revision = (await store.txn(txn)).revision
        return revision
    finally:
        await store.close()


async def etcd_revision(etcd_endpoint: str) -> int:
    store = EtcdStore(etcd_endpoint)
    await store.connect()
    try:
        return (await store.get_prefix(b"/geomesh/v1/regions/"))[0]
    finally:
        await store.close()


async def wait_revision(admin, revision: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while (await admin.GetOverview(pb.Empty())).revision < revision:
        assert time.monotonic() < deadline, "the coordinator's cache never reached the filled table"
        await asyncio.sleep(0.1)


def grpc_frame(msg: bytes) -> bytes:
    return b"\0" + struct.pack("!I", len(msg)) + msg


class StalledH2:
    """HTTP/2 connections over mTLS that open gRPC streams and do not read their data.

    The stream window is 0 (SETTINGS_INITIAL_WINDOW_SIZE) and no WINDOW_UPDATE is sent, but a
    thread keeps answering the server's PINGs, like an HTTP/2 stack whose application stopped
    reading. `headers` counts streams that got response headers; `resume()` starts reading
    (opens the windows); `status` holds each ended stream's grpc-status, `data` its bytes."""

    def __init__(self, port: int, ident: Identity, connections: int) -> None:
        self.ctx = ssl.create_default_context(cafile=str(ident.ca))
        self.ctx.load_cert_chain(str(ident.cert), str(ident.key))
        self.ctx.set_alpn_protocols(["h2"])
        self.conns: list[tuple[ssl.SSLSocket, h2.connection.H2Connection]] = []
        for _ in range(connections):
            sock = self.ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5),
                                        server_hostname=SERVER_NAME)
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.local_settings = h2.settings.Settings(
                client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
            conn.initiate_connection()
            sock.sendall(conn.data_to_send())
            sock.settimeout(0.02)
            self.conns.append((sock, conn))
        self.headers = 0
        self.status: dict[tuple[int, int], str] = {}  # (connection, stream) -> grpc-status ("reset" for RST_STREAM)
        self.data: dict[tuple[int, int], int] = {}
        self.reading = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def open(self, path: str, body: bytes, per_connection: int, *, end_stream: bool = True) -> None:
        with self._lock:
            for sock, conn in self.conns:
                for _ in range(per_connection):
                    sid = conn.get_next_available_stream_id()
                    conn.send_headers(sid, [(":method", "POST"), (":scheme", "https"), (":path", path),
                                            (":authority", SERVER_NAME), ("content-type", "application/grpc"),
                                            ("te", "trailers")])
                    conn.send_data(sid, body, end_stream=end_stream)
                sock.sendall(conn.data_to_send())

    def resume(self) -> None:
        """Start reading: open every stream's window wide and acknowledge what arrives."""
        with self._lock:
            self.reading = True
            for sock, conn in self.conns:
                conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 24})
                sock.sendall(conn.data_to_send())

    def _pump(self) -> None:
        while not self._stop.is_set():
            for n, (sock, conn) in enumerate(self.conns):
                with self._lock:
                    try:
                        data = sock.recv(1 << 20)
                    except (TimeoutError, ssl.SSLWantReadError, OSError):
                        continue
                    if not data:
                        continue
                    for ev in conn.receive_data(data):
                        if isinstance(ev, h2.events.ResponseReceived):
                            self.headers += 1
                        elif isinstance(ev, h2.events.DataReceived):
                            self.data[n, ev.stream_id] = self.data.get((n, ev.stream_id), 0) + len(ev.data)
                            if self.reading:
                                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                        elif isinstance(ev, h2.events.TrailersReceived):
                            self.status[n, ev.stream_id] = dict(ev.headers).get(b"grpc-status", b"?").decode()
                        elif isinstance(ev, h2.events.StreamReset):
                            self.status.setdefault((n, ev.stream_id), f"reset {ev.error_code!r}")
                    out = conn.data_to_send()  # PING/SETTINGS ACKs; WINDOW_UPDATEs only once reading
                    if out:
                        sock.sendall(out)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock, _ in self.conns:
            sock.close()


async def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


# -- finding 5: one snapshot per Watch stream -------------------------------------------------

async def test_200_stalled_watch_streams_share_one_snapshot_are_dropped_and_memory_returns(coordinator_factory, etcd):
    coordinator = coordinator_factory("--watch-send-timeout", "2")
    admin = coordinator.admin()
    await seed(admin)
    await wait_revision(admin, await fill_instances(etcd.endpoint, "web", 4000))
    first = coordinator.routing_feed().Watch(pb.WatchRoutingRequest())
    snapshot = await asyncio.wait_for(first.read(), 20)
    assert snapshot.snapshot and snapshot.ByteSize() > 150_000
    first.cancel()
    base = rss_mb(coordinator.pid)

    attack = StalledH2(coordinator.port, coordinator.pki.identity("dns", "flood"), connections=4)
    try:
        attack.open("/geomesh.v1.RoutingFeed/Watch", grpc_frame(pb.WatchRoutingRequest().SerializeToString()), 50)
        await wait_until(lambda: attack.headers >= 200, 20, "the coordinator never answered all 200 streams")
        await asyncio.sleep(0.5)
        peak = rss_mb(coordinator.pid)
        # others are served meanwhile
        start = time.monotonic()
        await admin.GetOverview(pb.Empty(), timeout=2)
        other = coordinator.routing_feed("dns", "good").Watch(pb.WatchRoutingRequest())
        assert (await asyncio.wait_for(other.read(), 5)).snapshot
        assert time.monotonic() - start < 2
        # past --watch-send-timeout the stalled streams are ended: a client that reads again gets
        # its message, then RESOURCE_EXHAUSTED (reconnect with last_revision), never more messages
        await asyncio.sleep(2.5)
        await admin.AddInstance(pb.Instance(app="web", id="late", region="eu-central", address="10.9.9.9", port=80))
        attack.resume()
        await wait_until(lambda: len(attack.status) >= 200, 15, f"only {len(attack.status)}/200 streams ended")
        assert set(attack.status.values()) == {str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])}
        assert all(n == len(grpc_frame(snapshot.SerializeToString())) for n in attack.data.values())
        # the reading watcher was not dropped and still gets changes
        delta = await asyncio.wait_for(other.read(), 5)
        assert [r.instance.id for r in delta.upserts] == ["late"]
        other.cancel()
        await asyncio.sleep(0.5)
        delivered = rss_mb(coordinator.pid)
    finally:
        attack.close()
    await asyncio.sleep(0.5)
    after = rss_mb(coordinator.pid)
    print(f"RSS base {base:.1f} MB, 200 stalled watchers {peak:.1f} MB, dropped and delivered {delivered:.1f} MB, "
          f"clients gone {after:.1f} MB")
    # one shared snapshot: the old code (a snapshot built per stream) grew by ~205 MB here
    assert peak - base < 80, f"200 stalled watchers grew the coordinator by {peak - base:.0f} MB"
    assert delivered - base < 25, f"memory not released after the streams ended: {delivered - base:.0f} MB"
    assert after - base < 25, f"memory not released after the watchers left: {after - base:.0f} MB"


# -- finding 6: a stalled session keeps a silent gateway alive ---------------------------------

async def test_stalled_silent_session_times_out_within_one_and_a_half_ttl(coordinator, etcd):
    admin = coordinator.admin()
    await seed(admin)
    await wait_revision(admin, await fill_instances(etcd.endpoint, "web", 2000))
    await coordinator.enroll("gw-stall", "eu-central", "192.0.2.21")
    await coordinator.gateway_control("gw-stall").Register(pb.RegisterRequest(name="gw-stall", **REG))
    attack = StalledH2(coordinator.port, coordinator.pki.identity("gateway", "gw-stall"), connections=1)
    try:
        hello = pb.SessionUp(hello=pb.SessionHello(name="gw-stall")).SerializeToString()
        attack.open("/geomesh.v1.GatewayControl/Session", grpc_frame(hello), 1, end_stream=False)
        opened = time.monotonic()
        await wait_until(lambda: attack.headers >= 1, 5, "no session headers")
        deadline = opened + 10
        was_open = False
        while time.monotonic() < deadline:
            gw = await admin.GetGateway(pb.GetRequest(name="gw-stall"), timeout=2)
            was_open = was_open or gw.session == pb.SESSION_STATE_OPEN
            if was_open and gw.session != pb.SESSION_STATE_OPEN:
                break
            await asyncio.sleep(0.1)
        silent_for = time.monotonic() - opened
        assert was_open, "the session never marked the gateway alive"
        # --lease-ttl 2: 1.5 x TTL = 3 s, plus slack for a loaded machine
        assert silent_for < 6, f"a silent gateway that does not read kept an open session {silent_for:.1f} s"
        # timed out, not gone: alive (in DNS) until the probes say unreachable (test_reach.py)
        assert (gw.session, gw.alive, gw.unreachable) == (pb.SESSION_STATE_TIMED_OUT, True, False)
        # the connection still answers pings; when it reads again it gets its message and a status
        attack.resume()
        await wait_until(lambda: attack.status, 5, "the stalled session never ended")
        assert list(attack.status.values()) == [str(grpc.StatusCode.UNAVAILABLE.value[0])]
    finally:
        attack.close()
    gw = await admin.GetGateway(pb.GetRequest(name="gw-stall"), timeout=2)
    assert (gw.session, gw.alive) == (pb.SESSION_STATE_TIMED_OUT, True)


# -- finding 14: heartbeat-driven health writes ------------------------------------------------

async def test_heartbeat_flood_is_coalesced_and_the_last_health_wins(coordinator, etcd):
    admin = coordinator.admin()
    await seed(admin)
    await wait_revision(admin, await fill_instances(etcd.endpoint, "web", 50))
    await coordinator.enroll("gw-hb", "eu-central", "192.0.2.21")
    gc = coordinator.gateway_control("gw-hb")
    await gc.Register(pb.RegisterRequest(name="gw-hb", **REG))
    call = gc.Session()
    await call.write(pb.SessionUp(hello=pb.SessionHello(name="gw-hb")))
    assert (await call.read()).routing.snapshot

    async def drain() -> None:
        while await call.read() is not grpc.aio.EOF:
            pass

    reading = asyncio.create_task(drain())
    ids = [f"i{i:05d}" for i in range(50)]

    def beat(health: list[bool]) -> pb.SessionUp:
        return pb.SessionUp(heartbeat=pb.Heartbeat(load=0.5, active_connections=3, backends=[
            pb.BackendHealth(app="web", instance_id=i, healthy=h) for i, h in zip(ids, health, strict=True)]))

    before = await etcd_revision(etcd.endpoint)
    start = time.monotonic()
    sent, slowest = 0, 0.0
    while time.monotonic() - start < 3 and sent < 20_000:
        await call.write(beat([sent % 2 == 0] * 50))
        sent += 1
        if sent % 500 == 0:  # others are served during the flood
            t = time.monotonic()
            await admin.GetOverview(pb.Empty(), timeout=2)
            slowest = max(slowest, time.monotonic() - t)
    flood = time.monotonic() - start
    # no pause: over the rate the final word waits for a token and is looked at then
    final = [i % 3 == 0 for i in range(50)]
    await call.write(beat(final))
    want = {i: h for i, h in zip(ids, final, strict=True)}
    deadline = time.monotonic() + 5
    while True:
        got = {i.id: i.healthy for i in (await admin.ListInstances(pb.ListInstancesRequest(app="web"))).instances}
        if got == want:
            break
        assert time.monotonic() < deadline, "the last reported health was not written"
        await asyncio.sleep(0.1)
    revisions = await etcd_revision(etcd.endpoint) - before
    print(f"{sent} heartbeats in {flood:.1f} s -> {revisions} etcd revisions; GetOverview max {slowest * 1000:.0f} ms")
    assert sent > 100, "the flood did not flood"
    # one batch per --health-write-interval (1 s) at most: the old code wrote one txn per change (~900/s)
    assert revisions <= flood * 2 + 4, f"{revisions} etcd revisions for {sent} heartbeats in {flood:.1f} s"
    assert slowest < 2
    # the session survived the flood: bad input ends it with the field named
    await call.write(pb.SessionUp(heartbeat=pb.Heartbeat(load=float("nan"))))
    await expect(grpc.StatusCode.INVALID_ARGUMENT, reading, "heartbeat.load")


async def test_negative_heartbeat_counts_end_the_session_naming_the_field(coordinator):
    admin = coordinator.admin()
    await seed(admin)
    await coordinator.enroll("gw-neg", "eu-central", "192.0.2.21")
    gc = coordinator.gateway_control("gw-neg")
    await gc.Register(pb.RegisterRequest(name="gw-neg", **REG))
    call = gc.Session()
    await call.write(pb.SessionUp(hello=pb.SessionHello(name="gw-neg")))
    await call.read()
    await call.write(pb.SessionUp(heartbeat=pb.Heartbeat(active_connections=-5)))

    async def read_to_end() -> None:
        while await call.read() is not grpc.aio.EOF:
            pass

    await expect(grpc.StatusCode.INVALID_ARGUMENT, asyncio.wait_for(read_to_end(), 5), "heartbeat.active_connections")


# -- the pure rules, table-tested --------------------------------------------------------------

@pytest.mark.parametrize(("load", "conns", "field"), [
    (0.0, 0, None), (12.5, 7, None),
    (float("nan"), 0, "heartbeat.load"), (float("inf"), 0, "heartbeat.load"), (-0.1, 0, "heartbeat.load"),
    (1.0, -5, "heartbeat.active_connections"),
])
def test_heartbeat_report_validation(load: float, conns: int, field: str | None) -> None:
    hb = pb.Heartbeat(load=load, active_connections=conns, backends=[
        pb.BackendHealth(app="web", instance_id="a", healthy=True),
        pb.BackendHealth(app="web", instance_id="a", healthy=False)])
    if field is None:
        assert HeartbeatReport.from_proto(hb).backends == {"web/a": False}  # the last entry wins
    else:
        with pytest.raises(ValidationError) as info:
            HeartbeatReport.from_proto(hb)
        assert info.value.field == field


@pytest.mark.parametrize(("times", "allowed"), [
    ([0.0] * 5, [True, True, True, True, False]),             # burst 4, then empty
    ([0.0] * 4 + [0.49, 0.5], [True] * 4 + [False, True]),    # 2/s: one token after 0.5 s
    ([0.0, 10.0, 10.0, 10.0, 10.0, 10.0], [True] * 5 + [False]),  # refill caps at the burst
])
def test_token_bucket(times: list[float], allowed: list[bool]) -> None:
    bucket = TokenBucket(rate=2, burst=4)
    assert [bucket.take(t) for t in times] == allowed


def test_token_bucket_says_how_long_until_a_token() -> None:
    bucket = TokenBucket(rate=2, burst=4)
    assert bucket.wait(0.0) == 0  # full from the start
    for _ in range(4):
        assert bucket.take(0.0)
    assert bucket.wait(0.0) == pytest.approx(0.5, abs=1e-3)
    assert bucket.wait(0.3) == pytest.approx(0.2, abs=1e-3)
    assert not bucket.take(0.3) and bucket.take(0.3 + bucket.wait(0.3))  # the promise holds


def vote(target: str, up: bool, rtt: float = 1.0) -> pb.ReachVote:
    return pb.ReachVote(target=target, up=up, rtt_ms=rtt if up else 0.0)


def test_a_replaced_heartbeat_hands_its_votes_to_the_newer_one() -> None:
    older = pb.Heartbeat(load=0.1, reach=[vote("a", True), vote("b", True)],
                         backends=[pb.BackendHealth(app="w", instance_id="x", healthy=True)])
    newer = pb.Heartbeat(load=0.9, reach=[vote("b", False), vote("c", True)],
                         backends=[pb.BackendHealth(app="w", instance_id="x", healthy=False)])
    folded = fold_heartbeats(older, newer)
    # the newer report's load and health; votes: a from the older, b and c from the newer
    assert folded.load == pytest.approx(0.9) and [b.healthy for b in folded.backends] == [False]
    assert {v.target: v.up for v in folded.reach} == {"a": True, "b": False, "c": True}
    assert not folded.reach_complete
    # a complete older list stays complete with the newer deltas on top
    older.reach_complete = True
    assert fold_heartbeats(older, newer).reach_complete
    # a complete newer list replaces whatever came before
    newer.reach_complete = True
    assert {v.target for v in fold_heartbeats(older, newer).reach} == {"b", "c"}
    assert older.load == pytest.approx(0.1) and len(newer.reach) == 2  # inputs untouched


def test_folded_votes_stay_within_the_per_heartbeat_limit() -> None:
    older = pb.Heartbeat(reach=[vote(f"t{i}", True) for i in range(10)])
    newer = pb.Heartbeat(reach=[vote(f"n{i}", True) for i in range(3)])
    folded = fold_heartbeats(older, newer, limit=5)
    assert [v.target for v in folded.reach] == ["t8", "t9", "n0", "n1", "n2"]  # the newest kept
    assert [v.target for v in fold_heartbeats(older, newer, limit=3).reach] == ["n0", "n1", "n2"]


def test_health_coalescer_rules() -> None:
    c = HealthCoalescer(interval=1.0)
    cache = {"w/a": True, "w/b": True}
    # a report equal to the cache is no change; unknown (or other region's) instances are ignored
    assert not c.offer({"w/a": True, "w/x": False}, cache)
    assert c.due_at() is None
    # a change is pending, due at once (nothing written yet); flapping keeps the last value
    assert c.offer({"w/a": False}, cache) and c.offer({"w/a": True, "w/b": False}, cache)
    assert c.pending == {"w/a": True, "w/b": False} and c.due_at() == -float("inf")
    assert c.take(now=5.0) == {"w/a": True, "w/b": False}
    # while the write is in flight the cache is stale: a report is compared with what is written
    assert not c.offer({"w/b": False}, cache)
    assert c.offer({"w/b": True}, cache) and c.pending == {"w/b": True}
    assert c.due_at() == 6.0  # at most once per interval
    # a failed write is pending again, unless a newer value came meanwhile
    c.done(written=False)
    assert c.pending == {"w/a": True, "w/b": True}
    c.take(now=6.0)
    c.done(written=True)
    assert not c.pending and not c.inflight
