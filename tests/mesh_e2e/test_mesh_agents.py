"""The full mesh, for real: coordinators + etcd on the host, gateway agents in network namespaces.

Each gateway host is its own namespace joined to an "internet" namespace by a veth; its agent
runs wireguard-go there and reaches the coordinators through their unix sockets (no route into
the host's namespace is ever added). Everything the test makes is removed afterwards.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from geomesh.api import geomesh_pb2 as pb
from geomesh.lab import netns
from regional_gateway.wireguard.userspace import SOCKET_DIR, UapiClient

from ..coordinator.test_admin import seed

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.netns


class Gateways:
    """Agent processes in namespaces, by name."""

    def __init__(self, topology: netns.Topology, coordinators, pki, workdir: Path, *, dataplane: bool = False,
                 regions: dict[str, str] | None = None) -> None:
        self.dataplane = dataplane
        self.regions = regions or {}
        self.topology = topology
        self.coordinators = coordinators
        self.pki = pki
        self.workdir = workdir
        self.hosts: dict[str, netns.Host] = {}
        self.ifnames: dict[str, str] = {}
        self.procs: dict[str, subprocess.Popen] = {}

    def config(self, name: str) -> Path:
        host = self.hosts[name]
        ident = self.pki.identity("gateway", name)
        socks = ", ".join(f'"unix:{c.sock}"' for c in self.coordinators)
        path = self.workdir / f"{name}.toml"
        path.write_text(f"""
name = "{name}"
region = "{self.regions.get(name, 'eu-central')}"
coordinators = [{socks}]
public_ip = "{host.public_ip}"
zone = "apps.test"
proxy_port = 8080
dataplane = {'true' if self.dataplane else 'false'}
heartbeat_interval = 0.3
[tls]
ca = "{ident.ca}"
cert = "{ident.cert}"
key = "{ident.key}"
[wireguard]
interface = "{self.ifnames[name]}"
listen_port = 51820
key_file = "{self.workdir / (name + '.key')}"
backend = "userspace"
persistent_keepalive = 5
""")
        return path

    async def start(self, name: str) -> None:
        """Enroll the gateway (its region, its namespace's public address), then start it."""
        if name not in self.hosts:
            self.hosts[name] = self.topology.add_host(name)
            self.ifnames[name] = self.topology.ifname("g")
        await self.coordinators[0].enroll(name, self.regions.get(name, "eu-central"), self.hosts[name].public_ip)
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115, ASYNC230
        self.procs[name] = self.hosts[name].popen(
            [sys.executable, "-m", "regional_gateway.main", "--config", str(self.config(name))],
            stdout=log, stderr=log, cwd=ROOT)
        log.close()

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def peers_on(self, name: str) -> set[str]:
        state = UapiClient(SOCKET_DIR / f"{self.ifnames[name]}.sock").get()
        return {p.public_key for p in state.peers.values()}


async def gateways_by_name(admin) -> dict[str, pb.Gateway]:
    return {g.name: g for g in (await admin.ListGateways(pb.ListGatewaysRequest())).gateways}


async def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def full_mesh_pings(gws: Gateways, admin, names: list[str]) -> bool:
    by_name = await gateways_by_name(admin)
    if not set(names) <= set(by_name):
        return False
    for a in names:
        for b in names:
            if a != b and not await asyncio.to_thread(gws.hosts[a].ping, by_name[b].mesh_ip, count=1, wait=1):
                return False
    return True


async def test_full_mesh_join_kill_restart_remove_and_coordinator_failover(topology, coordinator_factory, pki, tmp_path):
    c1 = coordinator_factory("--listen-unix", str(tmp_path / "c1.sock"))
    c2 = coordinator_factory("--listen-unix", str(tmp_path / "c2.sock"))
    c1.sock, c2.sock = tmp_path / "c1.sock", tmp_path / "c2.sock"
    admin = c2.admin()
    await seed(admin)
    gws = Gateways(topology, [c1, c2], pki, tmp_path)

    # three gateways: everyone pings everyone over the mesh
    for n in ("gw-a", "gw-b", "gw-c"):
        await gws.start(n)
    await wait_until(lambda: full_mesh_pings(gws, admin, ["gw-a", "gw-b", "gw-c"]), 60, "a 3-gateway full mesh")

    # a fourth joins: all four reach each other, nobody restarted
    pids = {n: p.pid for n, p in gws.procs.items()}
    await gws.start("gw-d")
    await wait_until(lambda: full_mesh_pings(gws, admin, ["gw-a", "gw-b", "gw-c", "gw-d"]), 60, "gw-d joining")
    assert all(gws.procs[n].pid == pid and gws.procs[n].poll() is None for n, pid in pids.items())

    # kill gw-d's agent: it leaves the alive set in under a second
    feed = c2.routing_feed().Watch(pb.WatchRoutingRequest())
    before = await gateways_by_name(admin)
    assert before["gw-d"].alive
    killed = time.monotonic()
    gws.kill("gw-d")
    while True:
        update = await asyncio.wait_for(feed.read(), 10)
        if any(r.WhichOneof("kind") == "gateway" and r.gateway.name == "gw-d" and not r.gateway.alive
               for r in update.upserts):
            break
    assert time.monotonic() - killed < 1.0
    feed.cancel()

    # restart it: same key, same mesh IP, links back
    await gws.start("gw-d")
    await wait_until(lambda: _alive(admin, "gw-d"), 30, "gw-d alive again")
    after = await gateways_by_name(admin)
    assert (after["gw-d"].wg_public_key, after["gw-d"].mesh_ip) == (before["gw-d"].wg_public_key, before["gw-d"].mesh_ip)
    await wait_until(lambda: full_mesh_pings(gws, admin, ["gw-a", "gw-d"]), 30, "gw-d links back")

    # remove gw-c: its peer disappears from every other interface
    gone_key = after["gw-c"].wg_public_key
    gws.kill("gw-c")
    await admin.RemoveGateway(pb.DeleteRequest(name="gw-c"))

    async def c_gone() -> bool:
        return all(gone_key not in gws.peers_on(n) for n in ("gw-a", "gw-b", "gw-d"))
    await wait_until(c_gone, 30, "gw-c's peer to disappear")

    # kill the replica the gateways use first (c1): they move to c2 and the mesh stays up throughout
    ping = gws.hosts["gw-a"].popen(["ping", "-n", "-q", "-c", "30", "-i", "0.2", after["gw-b"].mesh_ip],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    await asyncio.sleep(1)
    c1.kill()
    out, _ = await asyncio.to_thread(ping.communicate, timeout=30)
    assert " 30 received" in out or ", 0% packet loss" in out, out
    await wait_until(lambda: _all_alive(admin, ["gw-a", "gw-b", "gw-d"]), 30, "gateways alive on the second replica")
    await wait_until(lambda: full_mesh_pings(gws, admin, ["gw-a", "gw-b", "gw-d"]), 30, "the mesh after failover")


async def _alive(admin, name: str) -> bool:
    return (await admin.GetGateway(pb.GetRequest(name=name))).alive


async def _all_alive(admin, names: list[str]) -> bool:
    by_name = await gateways_by_name(admin)
    return all(by_name[n].alive for n in names)


async def test_app_in_one_region_answers_through_another_regions_gateway(topology, coordinator_factory, pki, tmp_path):
    """Cross-region forwarding over the real WireGuard mesh: the client talks to region A's gateway,
    the only instance lives behind region B's gateway."""
    c = coordinator_factory("--listen-unix", str(tmp_path / "c.sock"))
    c.sock = tmp_path / "c.sock"
    admin = c.admin()
    await seed(admin)  # eu-central (instance subnet 10.90.2.0/24) and us-east
    gws = Gateways(topology, [c], pki, tmp_path, dataplane=True, regions={"gw-eu": "eu-central", "gw-us": "us-east"})
    for n in ("gw-eu", "gw-us"):
        gws.hosts[n] = topology.add_host(n)
        gws.ifnames[n] = topology.ifname("x")
    # the app instance lives in us-east only, on the us gateway host's loopback
    gws.hosts["gw-us"].run(["ip", "addr", "add", "10.90.9.5/32", "dev", "lo"])
    app_log = open(tmp_path / "app.log", "ab")  # noqa: SIM115, ASYNC230
    gws.hosts["gw-us"].popen([sys.executable, "-m", "geomesh.lab.sample_app", "--app", "web", "--instance", "web-us-1",
                              "--region", "us-east", "--listen", "10.90.9.5:8000"], stdout=app_log, stderr=app_log, cwd=ROOT)
    app_log.close()
    await admin.UpdateApp(pb.UpdateAppRequest(app=pb.App(name="web", lb_policy=pb.LB_POLICY_ROUND_ROBIN)))
    await admin.AddInstance(pb.Instance(app="web", id="web-us-1", region="us-east", address="10.90.9.5", port=8000,
                                        healthy=True))
    for n in ("gw-eu", "gw-us"):
        await gws.start(n)
    await wait_until(lambda: full_mesh_pings(gws, admin, ["gw-eu", "gw-us"]), 60, "the two-gateway mesh")
    client = topology.add_host("client", network="198.51.100.0/24")
    eu_ip = gws.hosts["gw-eu"].public_ip
    argv = ["curl", "-sS", "--max-time", "5", "-H", "Host: web.apps.test", f"http://{eu_ip}:8080/"]

    async def answered_from_us() -> bool:
        out = await asyncio.to_thread(client.run, argv, check=False, timeout=15)
        return "in us-east" in out.stdout
    await wait_until(answered_from_us, 30, "the eu gateway to forward to us-east")
    out = client.run(argv, timeout=15)
    assert out.stdout.startswith("hello from web instance web-us-1 in us-east"), out.stdout
    # the app saw the real client address, and the request crossed exactly one gateway hop
    assert f"client {client.public_ip}" in out.stdout, out.stdout
    # an unknown host is a clear 404 from the gateway, not a silent close
    missing = client.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
                          "-H", "Host: nope.apps.test", f"http://{eu_ip}:8080/"], timeout=15)
    assert missing.stdout == "404"
