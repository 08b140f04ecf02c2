"""The lab's orchestration: start every piece in order, show it, walk through it, tear it down.

`Lab.up()` starts the control plane (embedded etcd, PKI, coordinator), creates regions, apps and
instances through the Admin API, starts geodns on loopback, then per region a gateway: in netns
mode a network namespace joined to an "internet" namespace, with the sample app instances on
addresses of its loopback and the gateway agent (wireguard-go mesh + proxy) inside; in loopback mode plain
processes on 127.0.0.0/8 with the mesh computed but not created. Every PID, namespace and
interface is recorded before it is made, so `geomesh lab down` cleans up after a crash too.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from geomesh import netns
from geomesh.api import geomesh_pb2 as pb
from geomesh.api import geomesh_pb2_grpc as pbg
from geomesh.channel import client_channel
from geomesh.etcd_process import free_port
from geomesh.lab.control_plane import ControlPlane, LabRecord, stop_pid
from geomesh.lab.plan import LabGateway, LabPlan
from geomesh.regions_file import RegionFile

NETNS_STATE_DIR = Path("/run/geomesh-lab-netns")


def netns_unavailable_reason() -> str | None:
    """Why the lab cannot build real namespaces and WireGuard here (None: it can)."""
    if os.geteuid() != 0:
        return "not running as root (network namespaces and WireGuard need CAP_NET_ADMIN)"
    if shutil.which("wireguard-go") is None and not Path("/sys/module/wireguard").exists():
        return "neither wireguard-go nor the WireGuard kernel module is available"
    return netns.unavailable_reason()


@dataclass
class RunningGateway:
    spec: LabGateway
    config: Path
    proc: subprocess.Popen | None = None
    host: netns.Host | None = None
    ifname: str = ""


class Lab:
    def __init__(self, state_dir: Path, regions: list[RegionFile], plan: LabPlan, *, say=print) -> None:
        self.dir = state_dir
        self.regions = regions
        self.plan = plan
        self.say = say
        self.record = LabRecord(state_dir / "lab-state.json")
        self.record.save()
        self.cp = ControlPlane(state_dir, self.record)
        self.topology: netns.Topology | None = None
        self.client: netns.Host | None = None
        self.gateways: dict[str, RunningGateway] = {}
        self.apps: list[subprocess.Popen] = []
        self.dns_port = 0
        self.dns_proc: subprocess.Popen | None = None
        self.unix_socket = state_dir / "coordinator.sock"

    # -- bring-up --------------------------------------------------------------------------------

    def up(self) -> None:
        steps = 5
        self.say(f"[1/{steps}] control plane: embedded etcd, PKI, coordinator ...")
        self.cp.start(extra=["--listen-unix", str(self.unix_socket)])
        self.say(f"        coordinator {self.cp.address} (and {self.unix_socket}), etcd {self.cp.etcd.endpoint}")
        self.say(f"[2/{steps}] regions, apps and instances through the Admin API ...")
        asyncio.run(self._apply_state())
        self.say(f"[3/{steps}] geodns on 127.0.0.1 ...")
        self._start_dns()
        if self.plan.netns:
            self.say(f"[4/{steps}] network namespaces: an internet, {len(self.plan.gateways)} gateway hosts, a client ...")
            self._start_topology()
            assert self.topology is not None
            self.say(f"        namespaces {self.topology.prefix}-* (see `ip netns list`)")
        else:
            self.say(f"[4/{steps}] loopback mode: no namespaces")
        self.say(f"[5/{steps}] app instances and gateways (agent + WireGuard + proxy) ...")
        for g in self.plan.gateways:
            self._start_apps(g)
            self.start_gateway(g.name)
        asyncio.run(self._wait_alive([g.name for g in self.plan.gateways], timeout=60))

    async def _apply_state(self) -> None:
        async with client_channel(self.cp.address, self.cp.pki.identity("admin", "lab-admin")) as ch:
            admin = pbg.AdminStub(ch)
            for rf in self.regions:
                await admin.CreateRegion(rf.region.to_proto(), timeout=10)
            await admin.CreateApp(pb.App(name="hello", lb_policy=pb.LB_POLICY_ROUND_ROBIN), timeout=10)
            await admin.CreateApp(pb.App(name="solo", lb_policy=pb.LB_POLICY_LEAST_CONNECTIONS), timeout=10)
            for inst in self.plan.instances:
                await admin.AddInstance(pb.Instance(app=inst.app, id=inst.id, region=inst.region, address=inst.address,
                                                    port=inst.port, healthy=True), timeout=10)

    def _popen(self, name: str, argv: list[str], host: netns.Host | None = None) -> subprocess.Popen:
        log = open(self.dir / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        if host is not None:
            proc = host.popen(argv, stdout=log, stderr=log)
        else:
            proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.record.pids[name] = proc.pid
        self.record.save()
        return proc

    def _start_dns(self) -> None:
        self.dns_port = free_port()
        ident = self.cp.pki.identity("dns", "lab-dns")
        self.dns_proc = self._popen("geodns", [
            sys.executable, "-m", "geodns.main", "--zone", self.plan.zone, "--listen", f"127.0.0.1:{self.dns_port}",
            "--coordinator", self.cp.address, "--tls-ca", str(ident.ca), "--tls-cert", str(ident.cert),
            "--tls-key", str(ident.key), "--default-region", self.plan.gateways[0].region,
            "--metrics-port", "0"])

    def _start_topology(self) -> None:
        self.topology = netns.Topology(state_dir=NETNS_STATE_DIR)
        self.record.namespaces.append(self.topology.prefix)
        self.record.save()
        self.topology.start()
        for g in self.plan.gateways:
            host = self.topology.add_host(g.name, address=g.public_ip)
            rg = self.gateways.setdefault(g.name, RunningGateway(g, self.dir / f"{g.name}.toml"))
            rg.host = host
            rg.ifname = self.topology.ifname(g.short)
            insts = [i for i in self.plan.instances if i.region == g.region]
            for inst in insts:  # instance addresses live on the namespace's loopback
                host.run(["ip", "addr", "add", f"{inst.address}/32", "dev", "lo"])
        self.client = self.topology.add_host("client", network="198.51.100.0/24")

    def _start_apps(self, g: LabGateway) -> None:
        host = self.gateways[g.name].host if g.name in self.gateways else None
        for inst in (i for i in self.plan.instances if i.region == g.region):
            self.apps.append(self._popen(f"app-{inst.id}", [
                sys.executable, "-m", "geomesh.lab.sample_app", "--app", inst.app, "--instance", inst.id,
                "--region", inst.region, "--listen", f"{inst.address}:{inst.port}"], host))

    def _gateway_config(self, rg: RunningGateway) -> Path:
        g = rg.spec
        ident = self.cp.pki.identity("gateway", g.name)
        target = f"unix:{self.unix_socket}" if self.plan.netns else self.cp.address
        backend = "userspace" if self.plan.netns else "none"
        rg.config.write_text(f"""# written by geomesh lab
name = "{g.name}"
region = "{g.region}"
coordinators = ["{target}"]
public_ip = "{g.public_ip}"
zone = "{self.plan.zone}"
proxy_port = {g.proxy_port}
proxy_listen = "{g.public_ip}"
heartbeat_interval = 0.5
metrics_port = -1
[tls]
ca = "{ident.ca}"
cert = "{ident.cert}"
key = "{ident.key}"
[wireguard]
interface = "{rg.ifname or 'gm' + g.short}"
listen_port = {g.wg_port}
key_file = "{self.dir / (g.name + '.wgkey')}"
backend = "{backend}"
persistent_keepalive = 5
""")
        return rg.config

    def start_gateway(self, name: str) -> None:
        spec = next(g for g in self.plan.gateways if g.name == name)
        rg = self.gateways.setdefault(name, RunningGateway(spec, self.dir / f"{name}.toml"))
        self._gateway_config(rg)
        rg.proc = self._popen(f"gateway-{name}", [sys.executable, "-m", "regional_gateway.main", "--config",
                                                  str(rg.config)], rg.host)

    def kill_gateway(self, name: str) -> None:
        rg = self.gateways[name]
        if rg.proc is not None and rg.proc.poll() is None:
            rg.proc.kill()
            rg.proc.wait(10)
        rg.proc = None

    async def _wait_alive(self, names: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        async with client_channel(self.cp.address, self.cp.pki.identity("admin", "lab-admin")) as ch:
            admin = pbg.AdminStub(ch)
            while time.monotonic() < deadline:
                gws = {g.name: g for g in (await admin.ListGateways(pb.ListGatewaysRequest(), timeout=5)).gateways}
                if all(n in gws and gws[n].alive for n in names):
                    return
                await asyncio.sleep(0.2)
        raise TimeoutError(f"gateways {', '.join(names)} not all alive after {timeout}s; see {self.dir}/gateway-*.log")

    # -- teardown ------------------------------------------------------------------------------

    def down(self) -> None:
        for rg in self.gateways.values():
            if rg.proc is not None and rg.proc.poll() is None:
                stop_pid(rg.proc.pid)
        for pid in reversed(list(self.record.pids.values())):
            stop_pid(pid)
        if self.topology is not None:
            self.topology.teardown()
