"""Reachability through a real coordinator and a real etcd, driven by simulated gateway sessions.

Each `SimGateway` registers over gRPC with its own gateway identity, opens a session, heartbeats
every 0.3 s (so its session stays open unless the test silences it) and reads everything the
coordinator sends (mesh peers are kept). Its probe verdicts go in heartbeats, as a real gateway's
prober sends them. The tests assert what users rely on, as consumers see it: the routing feed's
Gateway (`unreachable`, `session`, `alive`), the mesh peers gateways get, `GetOverview` (who sees
whom, `in_dns`, cut-off regions, panic-held gateways), etcd's own keys and revision count, and the
coordinator's metrics and logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import time
import urllib.request
from collections.abc import Callable

import grpc

from coordinator.heartbeats import health_owner
from coordinator.state import key
from coordinator.store import EtcdStore
from geomesh.api import geomesh_pb2 as pb
from geomesh.lab.processes import free_port

from .test_liveness import gw_key

REGIONS = {"eu": (50.1, 8.7), "us": (39.0, -77.5), "ap": (35.7, 139.7), "sa": (-23.5, -46.6), "af": (-33.9, 18.4)}
TIMEOUT = 8.0  # generous: a decision takes a vote write, a 50 ms debounce and a txn


class SimGateway:
    def __init__(self, coordinator, name: str, region: str, index: int, version: str = "") -> None:
        self.name, self.region, self.index, self.version = name, region, index, version
        self.coordinator = coordinator
        self.gc = coordinator.gateway_control(name)
        self.peers: dict[str, pb.MeshPeer] = {}
        self.call = None
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self.reader: asyncio.Task | None = None
        self.beater: asyncio.Task | None = None

    async def start(self) -> SimGateway:
        await self.coordinator.enroll(self.name, self.region, f"192.0.2.{self.index}")
        await self.gc.Register(pb.RegisterRequest(
            name=self.name, region=self.region, public_ip=f"192.0.2.{self.index}", wg_port=51820,
            wg_public_key=gw_key(self.index), proxy_port=8080, https_port=8443))
        self.call = self.gc.Session()
        await self.call.write(pb.SessionUp(hello=pb.SessionHello(name=self.name, version=self.version)))
        self._take(await asyncio.wait_for(self.call.read(), 10))
        self.reader = asyncio.create_task(self._read())
        self.beater = asyncio.create_task(self._beat())
        return self

    def _take(self, msg: pb.SessionDown) -> None:
        if msg.mesh.snapshot:
            self.peers.clear()
        for p in msg.mesh.upserts:
            self.peers[p.name] = p
        for n in msg.mesh.removals:
            self.peers.pop(n, None)

    async def _read(self) -> None:
        while (msg := await self.call.read()) is not grpc.aio.EOF:
            self._take(msg)

    async def _beat(self) -> None:
        while True:
            await self.send(pb.Heartbeat(load=0.1))
            await asyncio.sleep(0.3)

    async def send(self, heartbeat: pb.Heartbeat) -> None:
        async with self._lock:
            await self.call.write(pb.SessionUp(heartbeat=heartbeat))

    async def vote(self, verdicts: dict[str, bool], *, complete: bool = False) -> None:
        await self.send(pb.Heartbeat(load=0.1, reach_complete=complete, reach=[
            pb.ReachVote(target=t, up=up, rtt_ms=12.5 if up else 0.0) for t, up in verdicts.items()]))

    def silence(self) -> None:
        """Stop heartbeating (the stream stays open and read): a stalled control session."""
        assert self.beater is not None
        self.beater.cancel()

    def reset(self) -> None:
        """The stream dies (crash, connection reset)."""
        for task in (self.beater, self.reader):
            if task is not None:
                task.cancel()
        self.call.cancel()


@contextlib.asynccontextmanager
async def mesh(coordinator, gateways: dict[str, str]):
    """Regions for `gateways` (name -> region) and a started SimGateway for each, all voting up
    about every gateway of another region (their whole set, as a session's first heartbeat)."""
    admin = coordinator.admin()
    for region in sorted(set(gateways.values())):
        lat, lon = REGIONS[region]
        await admin.CreateRegion(pb.Region(name=region, latitude=lat, longitude=lon))
    sims = {n: await SimGateway(coordinator, n, r, i + 1).start() for i, (n, r) in enumerate(gateways.items())}
    try:
        for sim in sims.values():
            await sim.vote({t: True for t, r in gateways.items() if r != sim.region}, complete=True)
        yield sims
    finally:
        for sim in sims.values():
            sim.reset()


async def health(admin, name: str) -> pb.GatewayHealth:
    overview = await admin.GetOverview(pb.Empty(), timeout=2)
    return next(g for g in overview.gateways if g.name == name)


async def until(probe: Callable, what: str, timeout: float = TIMEOUT):
    """Poll `probe()` (sync or async) until it returns something truthy; return it."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


class Feed:
    """A RoutingFeed watcher keeping the latest Gateway of each name."""

    def __init__(self, coordinator) -> None:
        self.call = coordinator.routing_feed().Watch(pb.WatchRoutingRequest())
        self.gateways: dict[str, pb.Gateway] = {}
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while (update := await self.call.read()) is not grpc.aio.EOF:
            if update.snapshot:
                self.gateways.clear()
            for r in update.upserts:
                if r.WhichOneof("kind") == "gateway":
                    self.gateways[r.gateway.name] = r.gateway
            for k in update.removals:
                if k.kind == pb.ResourceKey.KIND_GATEWAY:
                    self.gateways.pop(k.name, None)

    async def until(self, name: str, check: Callable[[pb.Gateway], bool], what: str) -> pb.Gateway:
        async def probe():
            g = self.gateways.get(name)
            return g if g is not None and check(g) else None
        return await until(probe, f"routing feed: {name} {what}")

    def close(self) -> None:
        self.task.cancel()
        self.call.cancel()


def metrics(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


async def etcd_revision(store: EtcdStore) -> int:
    return (await store.get_prefix(b"/geomesh/v1/regions/"))[0]


async def connect(etcd) -> EtcdStore:
    store = EtcdStore(etcd.endpoint, timeout=5)
    await store.connect()
    return store


# -- the quorum of regions -----------------------------------------------------------------------

async def test_two_regions_make_a_gateway_unreachable_one_does_not_and_it_recovers(coordinator_factory):
    port = free_port()
    coordinator = coordinator_factory("--metrics-port", str(port))
    admin = coordinator.admin()
    feed = Feed(coordinator)
    async with mesh(coordinator, {"gw-a": "eu", "gw-b": "us", "gw-c": "ap", "gw-d": "sa"}) as gw:
        await feed.until("gw-a", lambda g: g.alive and g.session == pb.SESSION_STATE_OPEN, "open")
        await feed.until("gw-a", lambda g: list(g.seen_by) == ["ap", "sa", "us"], "seen by the three other regions")
        assert gw["gw-a"].peers["gw-b"].https_port == 8443

        # one region's word is not enough
        await gw["gw-b"].vote({"gw-a": False})
        one = await until(lambda: _with(admin, "gw-a", lambda h: list(h.down_by) == ["us"]), "us's down vote")
        assert one.reachable and one.in_dns and list(one.seen_by) == ["ap", "sa"]
        assert not feed.gateways["gw-a"].unreachable

        # two of the three regions that vote: unreachable, everywhere consumers look
        await gw["gw-c"].vote({"gw-a": False})
        g = await feed.until("gw-a", lambda g: g.unreachable, "unreachable")
        assert (list(g.down_by), list(g.seen_by), g.alive) == (["ap", "us"], ["sa"], True)
        h = await health(admin, "gw-a")
        assert (h.reachable, h.in_dns, h.session, list(h.down_by)) == (False, False, pb.SESSION_STATE_OPEN, ["ap", "us"])
        assert h.probe_rtt_ms == 12.5
        assert (await admin.GetGateway(pb.GetRequest(name="gw-a"))).unreachable
        await until(lambda: gw["gw-d"].peers["gw-a"].unreachable, "gw-d's mesh peer gw-a unreachable")
        overview = await admin.GetOverview(pb.Empty())  # by region, then name
        assert [(h.name, h.in_dns) for h in overview.gateways] == [
            ("gw-c", True), ("gw-a", False), ("gw-d", True), ("gw-b", True)]

        # recovery: a quorum says up again
        await gw["gw-b"].vote({"gw-a": True})
        await gw["gw-c"].vote({"gw-a": True})
        # the two votes travel on two sessions: either may land first, and one up vote already
        # makes a quorum of up (ap or us, with sa); once both have landed nobody says down
        g = await feed.until("gw-a", lambda g: not g.unreachable, "reachable again")
        assert len(g.seen_by) >= 2
        g = await feed.until("gw-a", lambda g: not g.down_by, "both up votes applied")
        assert (list(g.seen_by), g.unreachable) == (["ap", "sa", "us"], False)
        assert (await health(admin, "gw-a")).in_dns
        await until(lambda: not gw["gw-d"].peers["gw-a"].unreachable, "gw-d's mesh peer gw-a reachable")
        # read while the probers' sessions are open: once they end, their per-region gauges go
        text = await asyncio.to_thread(metrics, port)
    feed.close()
    assert 'geomesh_coordinator_reach_decisions_total{verdict="unreachable"} 1.0' in text
    assert 'geomesh_coordinator_reach_decisions_total{verdict="reachable"} 1.0' in text
    assert 'geomesh_coordinator_reach_probe_up{from_region="sa",target="gw-a"} 1.0' in text
    changes = [json.loads(line) for line in coordinator.log().splitlines()
               if '"gateway reachability changed"' in line]
    assert [(c["gateway"], c["verdict"]) for c in changes] == [("gw-a", "unreachable"), ("gw-a", "reachable")]
    assert changes[0]["down_by"] == ["ap", "us"]
    assert changes[1]["down_by"] in ([], ["ap"], ["us"])  # the first up vote may already make the quorum


async def _with(admin, name: str, check: Callable[[pb.GatewayHealth], bool]) -> pb.GatewayHealth | None:
    h = await health(admin, name)
    return h if check(h) else None


async def test_a_cut_off_regions_votes_do_not_count(coordinator):
    admin = coordinator.admin()
    async with mesh(coordinator, {"gw-a": "eu", "gw-b": "us", "gw-c": "ap", "gw-d": "sa"}) as gw:
        # sa reaches nobody: it is the one cut off, not everyone else
        await gw["gw-d"].vote({"gw-a": False, "gw-b": False, "gw-c": False})
        await gw["gw-b"].vote({"gw-a": False})
        await until(lambda: _with(admin, "gw-a", lambda h: list(h.down_by) == ["us"]), "us's vote, sa's ignored")
        overview = await admin.GetOverview(pb.Empty())
        assert list(overview.cut_off_regions) == ["sa"]
        # with sa's votes, gw-a would be down in 2 of 3 regions
        assert all(h.reachable and h.in_dns for h in overview.gateways), overview.gateways
        assert [list(h.down_by) for h in overview.gateways if h.name in ("gw-b", "gw-c")] == [[], []]
        # sa reaches the others again: its votes count, and gw-a is down in us and sa
        await gw["gw-d"].vote({"gw-b": True, "gw-c": True})
        h = await until(lambda: _with(admin, "gw-a", lambda h: not h.reachable), "gw-a unreachable")
        assert list(h.down_by) == ["sa", "us"]
        assert list((await admin.GetOverview(pb.Empty())).cut_off_regions) == []


async def test_panic_threshold_holds_gateways_past_the_share(coordinator_factory):
    port = free_port()
    coordinator = coordinator_factory("--metrics-port", str(port), "--reach-max-unreachable-share", "0.25")
    admin = coordinator.admin()
    names = {"gw-a": "eu", "gw-b": "us", "gw-c": "ap", "gw-d": "sa", "gw-e": "af"}
    async with mesh(coordinator, names) as gw:
        for prober in ("gw-b", "gw-c", "gw-d"):
            await gw[prober].vote({"gw-a": False})
        await until(lambda: _with(admin, "gw-a", lambda h: not h.reachable), "gw-a unreachable")
        # 5 gateways x 0.25: one may be unreachable; gw-b's quorum is held, gw-a stays out
        for prober in ("gw-c", "gw-d", "gw-e"):
            await gw[prober].vote({"gw-b": False})
        # the held list is the decider's last round; down_by comes from its reach/ record in etcd a moment later
        overview = await until(lambda: _overview_if(admin, lambda o: list(o.panic_held) == ["gw-b"] and any(
            h.name == "gw-b" and list(h.down_by) == ["af", "ap", "sa"] for h in o.gateways)), "gw-b held")
        by_name = {h.name: h for h in overview.gateways}
        assert (by_name["gw-a"].reachable, by_name["gw-b"].reachable) == (False, True)
        assert list(by_name["gw-b"].down_by) == ["af", "ap", "sa"] and by_name["gw-b"].in_dns
        text = await asyncio.to_thread(metrics, port)
        assert "geomesh_coordinator_reach_panic_held 1.0" in text
        assert "geomesh_coordinator_reach_unreachable 1.0" in text
        assert "panic threshold: gateways held reachable" in coordinator.log()
        # below the threshold again: gw-a recovers, the held gateway's quorum now counts
        for prober in ("gw-b", "gw-c", "gw-d"):
            await gw[prober].vote({"gw-a": True})
        await until(lambda: _with(admin, "gw-b", lambda h: not h.reachable), "gw-b unreachable once gw-a is back")
        assert (await health(admin, "gw-a")).reachable
        assert list((await admin.GetOverview(pb.Empty())).panic_held) == []


async def _overview_if(admin, check: Callable[[pb.Overview], bool]) -> pb.Overview | None:
    o = await admin.GetOverview(pb.Empty(), timeout=2)
    return o if check(o) else None


# -- bad votes -------------------------------------------------------------------------------------

async def test_bad_votes_are_ignored_and_counted_and_the_session_lives(coordinator_factory, etcd):
    port = free_port()
    coordinator = coordinator_factory("--metrics-port", str(port))
    admin = coordinator.admin()
    store = await connect(etcd)
    try:
        async with mesh(coordinator, {"gw-a": "eu", "gw-b": "us", "gw-c": "ap"}) as gw:
            await until(lambda: _votes(store, "gw-a", lambda v: v is not None and len(v) == 2), "gw-a's first votes")
            flood = [pb.ReachVote(target="gw-a", up=False),               # about itself
                     pb.ReachVote(target="nowhere", up=False),            # unknown
                     pb.ReachVote(target="gw-b", up=False),               # counts
                     pb.ReachVote(target="gw-b", up=True),                # a second vote about gw-b
                     pb.ReachVote(target="gw-c", up=True, rtt_ms=float("nan"))]
            flood += [pb.ReachVote(target=f"ghost-{i}", up=False) for i in range(5000 - len(flood))]
            await gw["gw-a"].send(pb.Heartbeat(load=0.1, reach=flood))
            votes = await until(lambda: _votes(store, "gw-a", lambda v: v is not None and not v["gw-b"]["up"]),
                                "gw-a's vote about gw-b")
            assert set(votes) == {"gw-b", "gw-c"} and votes["gw-c"] == {"up": True, "rtt_ms": 12.5}
            # the session lives: still open, still heard
            h = await health(admin, "gw-a")
            assert h.session == pb.SESSION_STATE_OPEN and not gw["gw-a"].reader.done()
            b = await until(lambda: _with(admin, "gw-b", lambda h: list(h.down_by) == ["eu"]), "eu's vote on gw-b")
            assert b.reachable  # one region's word
            # the same verdicts again are no change: nothing is written
            before = await etcd_revision(store)
            for _ in range(5):
                await gw["gw-a"].vote({"gw-b": False})
                await gw["gw-c"].vote({"gw-a": True, "gw-b": True}, complete=True)
            await asyncio.sleep(0.5)
            assert await etcd_revision(store) == before
            text = await asyncio.to_thread(metrics, port)
            for reason, count in (("self", 1), ("unknown-target", 1 + 4096 - 5), ("duplicate", 1),
                                  ("bad-rtt", 1), ("too-many", 5000 - 4096)):
                assert f'geomesh_coordinator_reach_votes_ignored_total{{reason="{reason}"}} {count}.0' in text, reason
    finally:
        await store.close()


async def _votes(store: EtcdStore, prober: str, check: Callable[[dict | None], bool]) -> dict | None:
    kv = await store.get(key("votes", prober))
    value = None if kv is None else json.loads(kv.value)
    return value if check(value) else None


# -- liveness and reachability together ------------------------------------------------------------

async def test_timed_out_session_stays_in_dns_until_the_probes_say_unreachable(coordinator):
    admin = coordinator.admin()
    feed = Feed(coordinator)
    async with mesh(coordinator, {"gw-a": "eu", "gw-b": "us", "gw-c": "ap"}) as gw:
        await feed.until("gw-a", lambda g: g.session == pb.SESSION_STATE_OPEN, "open")
        silenced = time.monotonic()
        gw["gw-a"].silence()
        # --lease-ttl 2: silent for 1.5 x TTL = 3 s -> timed out, not gone
        g = await feed.until("gw-a", lambda g: g.session != pb.SESSION_STATE_OPEN, "no longer open")
        assert time.monotonic() - silenced < 6
        assert (g.session, g.alive, g.unreachable) == (pb.SESSION_STATE_TIMED_OUT, True, False)
        h = await health(admin, "gw-a")
        assert h.in_dns and h.reachable and h.session == pb.SESSION_STATE_TIMED_OUT
        # a timed-out prober's votes do not count: gw-a alone cannot vote gw-b out (and would not anyway)
        # users cannot reach it either: out of DNS
        await gw["gw-b"].vote({"gw-a": False})
        await gw["gw-c"].vote({"gw-a": False})
        g = await feed.until("gw-a", lambda g: g.unreachable, "unreachable")
        assert (g.session, g.alive) == (pb.SESSION_STATE_TIMED_OUT, True)
        h = await health(admin, "gw-a")
        assert not h.in_dns and not h.reachable
    feed.close()


async def test_timed_out_prober_votes_do_not_count(coordinator):
    admin = coordinator.admin()
    async with mesh(coordinator, {"gw-a": "eu", "gw-b": "us", "gw-c": "ap"}) as gw:
        await gw["gw-b"].vote({"gw-a": False})
        await gw["gw-c"].vote({"gw-a": False})
        await until(lambda: _with(admin, "gw-a", lambda h: not h.reachable), "gw-a unreachable")
        gw["gw-b"].silence()
        # only sessions that are open vote: us's vote goes with its session, one voice is left,
        # and one region's word excludes nothing
        h = await until(lambda: _with(admin, "gw-a", lambda h: h.reachable), "gw-a reachable without us's vote")
        assert list(h.down_by) == ["ap"]
        assert (await health(admin, "gw-b")).session == pb.SESSION_STATE_TIMED_OUT


async def test_reset_session_is_out_at_once(coordinator):
    admin = coordinator.admin()
    feed = Feed(coordinator)
    async with mesh(coordinator, {"gw-a": "eu", "gw-b": "us"}) as gw:
        await feed.until("gw-a", lambda g: g.session == pb.SESSION_STATE_OPEN, "open")
        cut = time.monotonic()
        gw["gw-a"].reset()
        g = await feed.until("gw-a", lambda g: not g.alive, "not alive")
        assert time.monotonic() - cut < 2, "a reset gateway stayed alive"
        assert g.session == pb.SESSION_STATE_CLOSED
        h = await health(admin, "gw-a")
        assert h.session == pb.SESSION_STATE_CLOSED and not h.in_dns
    feed.close()


async def test_removing_a_gateway_deletes_its_votes_and_verdict(coordinator, etcd):
    admin = coordinator.admin()
    store = await connect(etcd)
    try:
        async with mesh(coordinator, {"gw-a": "eu", "gw-b": "us", "gw-c": "ap"}) as gw:
            await gw["gw-b"].vote({"gw-a": False})
            await until(lambda: _with(admin, "gw-a", lambda h: list(h.down_by) == ["us"]), "us's vote")
            assert await store.get(key("votes", "gw-a")) is not None
            assert await store.get(key("reach", "gw-a")) is not None
            gw["gw-a"].reset()
            await admin.RemoveGateway(pb.DeleteRequest(name="gw-a"))
            assert await store.get(key("votes", "gw-a")) is None
            assert await store.get(key("reach", "gw-a")) is None
            await asyncio.sleep(0.3)  # the decider does not write it back
            assert await store.get(key("reach", "gw-a")) is None
    finally:
        await store.close()


# -- instance health: one verdict per instance -----------------------------------------------------

async def test_instance_health_follows_its_owner_only_without_flapping(coordinator, etcd):
    admin = coordinator.admin()
    store = await connect(etcd)
    await admin.CreateRegion(pb.Region(name="eu", latitude=50.1, longitude=8.7))
    await admin.CreateApp(pb.App(name="web"))
    ids = [f"i{n}" for n in range(8)]
    for n, i in enumerate(ids):
        await admin.AddInstance(pb.Instance(app="web", id=i, region="eu", address=f"10.90.2.{n + 1}", port=80,
                                            healthy=True))
    owners = {i: health_owner(f"web/{i}", ["gw-e1", "gw-e2"]) for i in ids}
    assert set(owners.values()) == {"gw-e1", "gw-e2"}, "pick ids both gateways own some of"
    says = {"gw-e1": False, "gw-e2": True}  # they disagree about every instance
    e1 = await SimGateway(coordinator, "gw-e1", "eu", 1).start()
    e2 = await SimGateway(coordinator, "gw-e2", "eu", 2).start()
    reporting_gateways = [e1, e2]

    async def report(stop: asyncio.Event) -> None:
        while not stop.is_set():
            for sim in list(reporting_gateways):
                await sim.send(pb.Heartbeat(load=0.1, backends=[
                    pb.BackendHealth(app="web", instance_id=i, healthy=says[sim.name]) for i in ids]))
            await asyncio.sleep(0.1)

    async def records() -> dict[str, bool]:
        return {i.id: i.healthy for i in (await admin.ListInstances(pb.ListInstancesRequest(app="web"))).instances}

    stop = asyncio.Event()
    reporting = asyncio.create_task(report(stop))
    try:
        want = {i: says[owners[i]] for i in ids}
        await until(lambda: _if_equal(records(), want), "each instance to take its owner's word")
        before = await etcd_revision(store)
        await asyncio.sleep(2.5)  # they keep disagreeing: the old rule wrote every interval
        assert await etcd_revision(store) == before, "instance health flapped between the two gateways"
        assert await records() == want
        # the owner of half the instances goes: the other gateway owns them all now
        reporting_gateways.remove(e1)
        e1.reset()
        await until(lambda: _if_equal(records(), {i: says["gw-e2"] for i in ids}), "gw-e2 to own every instance")
    finally:
        stop.set()
        await asyncio.gather(reporting, return_exceptions=True)
        e2.reset()
        await store.close()


async def _if_equal(coro, want) -> bool:
    return await coro == want
