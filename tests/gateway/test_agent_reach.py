"""The agent's side of reachability: its `[reach]` settings, the probe targets it derives from the
mesh view and the probe plan, the heartbeats that carry its verdicts (the whole set first, then
changes at once), and three real agents with real data planes on loopback probing each other's
public addresses through a real coordinator: a cut public link takes a gateway out, restoring it
brings it back, with heartbeats far apart so only the wake-up on a verdict change can be on time."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from geomesh.api import geomesh_pb2 as pb
from geomesh.errors import ValidationError
from geomesh.probe_plan import plan
from regional_gateway.agent import Agent
from regional_gateway.agent_config import load
from regional_gateway.mesh_view import MeshPeerInfo, probe_regions, probe_targets
from regional_gateway.reach_prober import ProbeTarget

from ..coordinator.test_admin import seed
from .test_agent import TLS, config_for, enrolled, free_port, until, until_async, write_config

# -- the [reach] settings ----------------------------------------------------------------------------


def test_reach_settings_defaults_and_errors_name_the_field(tmp_path):
    f = tmp_path / "gw.toml"
    write_config(f)
    cfg = load(f)
    assert (cfg.reach_interval, cfg.reach_timeout, cfg.reach_fall, cfg.reach_rise, cfg.reach_prober_regions) == \
        (0.5, 0.5, 3, 2, 3)
    body = f.read_text().replace(TLS, "")
    f.write_text(body + "[reach]\ninterval = 1\ntimeout = 0.25\nfall = 5\nrise = 1\nprober_regions = 2\n" + TLS)
    cfg = load(f)
    assert (cfg.reach_interval, cfg.reach_timeout, cfg.reach_fall, cfg.reach_rise, cfg.reach_prober_regions) == \
        (1, 0.25, 5, 1, 2)
    for section, field in [("interval = 0", "reach.interval"), ("interval = 'fast'", "reach.interval"),
                           ("timeout = 2", "reach.timeout"),  # longer than the interval
                           ("timeout = 0", "reach.timeout"), ("fall = 0", "reach.fall"), ("rise = 1.5", "reach.rise"),
                           ("rise = true", "reach.rise"), ("prober_regions = 0", "reach.prober_regions"),
                           ("prober_regions = '3'", "reach.prober_regions"), ("colour = 'red'", "reach.colour")]:
        f.write_text(body + f"[reach]\n{section}\n" + TLS)
        with pytest.raises(ValidationError) as info:
            load(f)
        assert info.value.field == field, (section, str(info.value))
    f.write_text(body + "reach = 3\n" + TLS)
    with pytest.raises(ValidationError) as info:
        load(f)
    assert info.value.field == "reach"


# -- targets from the mesh view and the plan -------------------------------------------------------


def peer(name: str, region: str, ip: str, proxy_port: int = 80, https_port: int = 0) -> MeshPeerInfo:
    return MeshPeerInfo(name, region, "K" * 43 + "=", f"{ip}:51820", (f"10.88.0.{len(name)}/32",),
                        f"10.88.0.{len(name)}", proxy_port, https_port)


def test_probe_targets_are_public_addresses_from_the_plan():
    view = {"gw-b": peer("gw-b", "us", "198.51.100.2", 8080, 8443), "gw-c": peer("gw-c", "ap", "198.51.100.3"),
            "gw-d": peer("gw-d", "ap", "198.51.100.4")}
    regions = probe_regions(view, "gw-a", "eu")
    assert regions == {"gw-a": "eu", "gw-b": "us", "gw-c": "ap", "gw-d": "ap"}
    p = plan(regions, 3)
    targets = probe_targets(view, p, "gw-a")
    assert set(targets) == set(p.targets_of("gw-a")) and targets  # eu probes something in each other region
    assert {view[t].region for t in targets} == {"us", "ap"}
    # the public IP of the WireGuard endpoint, the proxy and TLS ports; never the mesh address
    assert targets["gw-b"] == ProbeTarget("gw-b", "us", "198.51.100.2", 8080, 8443)
    # every gateway computes the same plan: gw-a is a prober of exactly the targets the plan says
    for t in targets:
        assert "gw-a" in p.probers_of(t)


# -- heartbeats: the whole set first, then the changes, at once ------------------------------------


class FakeProber:
    def __init__(self, results: dict[str, tuple[bool, float]]) -> None:
        self.targets: dict[str, ProbeTarget] = {}
        self._results = results

    def results(self) -> dict[str, tuple[bool, float]]:
        return dict(self._results)

    def set_targets(self, targets) -> None:
        self.targets = dict(targets)


class FakeCall:
    def __init__(self) -> None:
        self.sent: asyncio.Queue[pb.Heartbeat] = asyncio.Queue()

    async def write(self, msg: pb.SessionUp) -> None:
        await self.sent.put(msg.heartbeat)


class Nowhere:
    address = "127.0.0.1:1"  # a coordinator address that is never dialled here


def votes(hb: pb.Heartbeat) -> dict[str, tuple[bool, float]]:
    return {v.target: (v.up, v.rtt_ms) for v in hb.reach}


async def test_heartbeats_carry_the_whole_set_first_then_each_change_at_once(pki, tmp_path):
    agent = Agent(config_for([Nowhere()], pki, tmp_path, "gw-a", "127.0.0.2", heartbeat_interval=30.0))
    agent.prober = FakeProber({"gw-b": (True, 1.5), "gw-c": (False, 3.0)})  # type: ignore[assignment]
    for _session in range(2):  # every session starts with the whole set
        call = FakeCall()
        beats = asyncio.create_task(agent._heartbeats(call))
        try:
            first = await asyncio.wait_for(call.sent.get(), 2)
            assert first.reach_complete and votes(first) == {"gw-b": (True, 1.5), "gw-c": (False, 0.0)}
            # a verdict change goes out at once, not after the 30 s interval, and alone
            agent._on_reach_change("gw-b", False, 0.0)
            change = await asyncio.wait_for(call.sent.get(), 2)
            assert not change.reach_complete and votes(change) == {"gw-b": (False, 0.0)}
            # a burst of changes goes out in at most two heartbeats (they are spaced 0.1 s apart)
            for i in range(50):
                agent._on_reach_change("gw-c", i % 2 == 0, 2.0)
            got: dict[str, tuple[bool, float]] = {}
            burst = [await asyncio.wait_for(call.sent.get(), 2)]
            with contextlib.suppress(TimeoutError):
                burst.append(await asyncio.wait_for(call.sent.get(), 0.5))
            for hb in burst:
                got.update(votes(hb))
            assert got == {"gw-c": (False, 2.0)} and len(burst) <= 2  # the last word wins
            # the target set changes: the next heartbeat, at once, is the whole set again
            agent._reach_resend = True
            agent._wake.set()
            again = await asyncio.wait_for(call.sent.get(), 2)
            assert again.reach_complete and set(votes(again)) == {"gw-b", "gw-c"}
            assert call.sent.empty()
        finally:
            beats.cancel()
            await asyncio.gather(beats, return_exceptions=True)


def test_the_plan_leaves_out_what_the_coordinator_does_not_judge(pki, tmp_path):
    """Dead and draining gateways are out of the plan (as probers and targets); a timed-out one is
    in (the probes decide whether it leaves DNS); a draining gateway probes nobody."""
    import base64

    from geomesh.model import Gateway, GatewayState, SessionState
    from geomesh.routing_table import RoutingTable

    agent = Agent(config_for([Nowhere()], pki, tmp_path, "gw-a", "127.0.0.2", region="eu"))
    agent.prober = FakeProber({})  # type: ignore[assignment]
    regions = {"gw-b": "us", "gw-c": "ap", "gw-d": "sa", "gw-e": "af"}
    agent.mesh = {n: peer(n, r, f"198.51.100.{i}") for i, (n, r) in enumerate(regions.items(), 1)}

    def gw(name: str, region: str, **kw) -> Gateway:
        k = base64.b64encode(name.encode().ljust(32, b"\0")).decode()
        return Gateway(name, region, "198.51.100.1", 51820, k, "10.88.0.1", 80, **kw)

    def table(**me) -> RoutingTable:
        return RoutingTable.from_resources(1, [
            gw("gw-a", "eu", alive=True, **me), gw("gw-b", "us", alive=True),
            gw("gw-c", "ap", alive=False),                                       # dead
            gw("gw-d", "sa", alive=True, state=GatewayState.DRAINING),           # draining
            gw("gw-e", "af", alive=True, session=SessionState.TIMED_OUT)])       # timed out
    agent.table = table()
    agent.update_probe_targets()
    assert set(agent.prober.targets) == {"gw-b", "gw-e"}  # type: ignore[union-attr]
    assert agent._reach_resend  # a new target set: the whole set goes out next
    agent.table = table(state=GatewayState.DRAINING)
    agent.update_probe_targets()
    assert agent.prober.targets == {}  # type: ignore[union-attr]


# -- three real agents probing each other on loopback ----------------------------------------------


class Relay:
    """The "public link" of a gateway: 127.0.0.x:port relayed to where its data plane listens.
    `cut()` closes it (connections refused, open ones reset), `restore()` opens it again."""

    def __init__(self, public: tuple[str, int], inner: tuple[str, int]) -> None:
        self.public, self.inner = public, inner
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def restore(self) -> None:
        self.server = await asyncio.start_server(self._handle, *self.public)

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in list(self.writers):
            w.transport.abort()
        await self.server.wait_closed()
        self.server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.inner)
        except OSError:
            writer.transport.abort()
            return
        self.writers |= {writer, up_w}

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                w.close()

        try:
            await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
        finally:
            self.writers -= {writer, up_w}


async def test_agents_probe_each_others_public_address_and_votes_decide(coordinator_factory, pki, tmp_path):
    # heartbeats every 20 s (lease TTL 20 s: sessions stay open): a vote on time came by the wake-up
    coordinator = coordinator_factory("--lease-ttl", "20")
    admin = coordinator.admin()
    await seed(admin)
    await admin.CreateRegion(pb.Region(name="ap-southeast", latitude=1.29, longitude=103.85))
    fast = {"reach_interval": 0.3, "reach_timeout": 0.3, "reach_fall": 2, "reach_rise": 1, "heartbeat_interval": 20.0}
    ports = {name: free_port() for name in ("gw-a", "gw-b", "gw-c")}
    specs = {"gw-a": ("eu-central", "127.0.0.2", ""), "gw-b": ("us-east", "127.0.0.3", "127.0.0.1"),
             "gw-c": ("ap-southeast", "127.0.0.4", "")}
    agents = {}
    for name, (region, ip, listen) in specs.items():
        cfg = config_for([coordinator], pki, tmp_path, name, ip, region=region, dataplane=True,
                         proxy_port=ports[name], proxy_listen=listen, **fast)
        agents[name] = Agent(await enrolled(coordinator, cfg))
    # gw-b's data plane listens on 127.0.0.1; its public address 127.0.0.3 is a relay the test cuts
    relay = Relay(("127.0.0.3", ports["gw-b"]), ("127.0.0.1", ports["gw-b"]))
    await relay.restore()
    tasks = [asyncio.create_task(a.run()) for a in agents.values()]

    async def health(name: str) -> pb.GatewayHealth:
        overview = await admin.GetOverview(pb.Empty(), timeout=2)
        return next(g for g in overview.gateways if g.name == name)

    async def seen(name: str, seen_by: list[str], down_by: list[str], reachable: bool) -> bool:
        h = await health(name)
        return (sorted(h.seen_by), sorted(h.down_by), h.reachable) == (seen_by, down_by, reachable)

    try:
        await until(lambda: all(len(a.mesh) == 2 and a.prober is not None and len(a.prober.targets) == 2
                                for a in agents.values()), timeout=15)
        # each probes the two others at their public addresses and proxy ports
        a_targets = agents["gw-a"].prober.targets  # type: ignore[union-attr]
        assert (a_targets["gw-b"].host, a_targets["gw-b"].http_port) == ("127.0.0.3", ports["gw-b"])
        assert (a_targets["gw-c"].host, a_targets["gw-c"].http_port) == ("127.0.0.4", ports["gw-c"])
        # the probes succeed (the data planes answer the health path, naming themselves)
        await until(lambda: all(up for a in agents.values() for up, _ in a.prober.results().values())  # type: ignore
                    and all(rtt > 0 for a in agents.values() for _, rtt in a.prober.results().values()),  # type: ignore
                    timeout=10)
        await until_async(lambda: seen("gw-b", ["ap-southeast", "eu-central"], [], True), timeout=10)
        # gw-b's public link is cut (its process and its session stay): the two other regions' probers
        # vote it down at once, and the coordinator decides it unreachable; consumers see it
        loop = asyncio.get_running_loop()
        cut_at = loop.time()
        await relay.cut()
        await until_async(lambda: seen("gw-b", [], ["ap-southeast", "eu-central"], False), timeout=6)
        assert loop.time() - cut_at < 6  # far less than the 20 s heartbeat interval
        await until(lambda: agents["gw-a"].table.gateways["gw-b"].unreachable, timeout=5)
        assert (await health("gw-b")).session == pb.SESSION_STATE_OPEN and not (await health("gw-b")).in_dns
        assert (await health("gw-a")).reachable and (await health("gw-c")).reachable
        # the link is restored: reachable again, with a measured round trip
        restored_at = loop.time()
        await relay.restore()
        await until_async(lambda: seen("gw-b", ["ap-southeast", "eu-central"], [], True), timeout=6)
        assert loop.time() - restored_at < 6
        assert (await health("gw-b")).probe_rtt_ms > 0
        await until(lambda: not agents["gw-a"].table.gateways["gw-b"].unreachable, timeout=5)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for a in agents.values():
            if a.proxy is not None:
                await a.proxy.shutdown(0.5)
        if relay.server is not None:
            await relay.cut()
