"""The lab's orchestration: start every piece in order, show it, walk through it, tear it down.

`Lab.up()` builds, in netns mode, the namespaces (an "internet", one host per gateway, the
customer's DNS host, a client); starts the customer's DNS (`customer_zone.py`: gdnsd and the
unbound resolver the gateways ask about custom domains, and the coordinator's own resolver) and
pebble, the lab's ACME CA (its root in `<state>/pebble-root.pem`): in netns mode inside the DNS
host's namespace, validating through that unbound (DNS-01 of the zone certificate at
geomesh-dns, HTTP-01 of custom domains at the gateways' public addresses and shared plain port)
with its ACME and management listeners relayed to the host's 127.0.0.1; on loopback beside the
rest. Then the control plane (embedded etcd, PKI, a coordinator ordering the zone certificate
from pebble and custom domains' certificates on demand, checking their TXT records through
`--resolver`), regions, apps and instances with `geomesh apply` (`declared_state`), geodns on
loopback, then per region a gateway: in netns mode in its namespace, with the sample app
instances on addresses of its loopback and the gateway agent (wireguard-go mesh + proxy)
inside; in loopback mode plain processes on 127.0.0.0/8 with the mesh computed but not created.
No process in the host's own namespace sends to the documentation ranges of the gateways. Every
PID, namespace and interface is recorded before it is made, so `geomesh lab down` cleans up
after a crash too.

Timers: `timers="lab"` (the default) runs the coordinator with `--lease-ttl 2` and gateways
with `heartbeat_interval = 0.5`, so the walkthrough is quick; `timers="default"` keeps every
flag at its shipped default (what `bench/failover.py` measures). Either way each gateway's
`[reach]` table spells out the reachability defaults (probe every 0.5 s, timeout 0.5 s, down
after 3 failures, up after 2 successes, 3 prober regions). The faults (`faults.py`) and the
health checks the walkthrough, the tests and the bench share live here too: cut or restore a
gateway's public link, cut a region's probers off from the others, stop/continue a gateway,
and `problems()`: why the lab is not healthy yet (empty when it is).
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
from typing import Any

from geomesh import apply
from geomesh.api import geomesh_pb2 as pb
from geomesh.api import geomesh_pb2_grpc as pbg
from geomesh.channel import client_channel
from geomesh.lab import faults, netns, toml_writer
from geomesh.lab.control_plane import ControlPlane, LabRecord, stop_pid
from geomesh.lab.customer_zone import CustomerDns
from geomesh.lab.pebble import PebbleProcess
from geomesh.lab.plan import LabGateway, LabPlan
from geomesh.lab.processes import free_port
from geomesh.lab.zone_certificate import CertificateWatch
from geomesh.model import App, Instance, LbPolicy
from geomesh.regions_file import RegionFile

NETNS_STATE_DIR = Path("/run/geomesh-lab-netns")
TIMERS = ("lab", "default")
LAB_LEASE_TTL = 2           # --lease-ttl of the lab's coordinator (timers="lab"); the shipped default is 3
LAB_HEARTBEAT = 0.5         # heartbeat_interval of the lab's gateways (timers="lab"); the shipped default is 1.0
# the gateways' [reach] table: the shipped defaults (they meet the issue's targets)
REACH = {"interval": 0.5, "timeout": 0.5, "fall": 3, "rise": 2, "prober_regions": 3}
# the coordinator's ACME flags beside --acme-directory/--acme-zone/--acme-ca-bundle: look at the
# schedule twice a second, and retry a failed order (geomesh-dns not following the feed yet) after
# 0.5 s, then every 2 s at most (the lab's CA is local)
ACME_FLAGS = ["--acme-check-interval", "0.5", "--acme-retry", "0.5", "--acme-retry-max", "2"]
CERT_WAIT = 30.0  # seconds up() waits for the zone certificate after the gateways are alive
ON_DEMAND_WAIT = 10.0  # [custom_domains] on_demand_wait: a custom domain's first handshake waits this long at most


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
    def __init__(self, state_dir: Path, regions: list[RegionFile], plan: LabPlan, *, say=print,
                 timers: str = "lab") -> None:
        if timers not in TIMERS:
            raise ValueError(f"timers: {timers!r} is not one of {', '.join(TIMERS)}")
        self.timers = timers
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
        self.status_url = ""
        self.unix_socket = state_dir / "coordinator.sock"
        self.pebble: PebbleProcess | None = None
        self.pebble_root = state_dir / "pebble-root.pem"
        self.cert_watch: CertificateWatch | None = None
        self.customer: CustomerDns | None = None
        self.started = 0.0  # time.monotonic() when up() began (the empty lab)

    # -- bring-up --------------------------------------------------------------------------------

    def up(self) -> None:
        steps = 6
        self.started = time.monotonic()
        self.dns_port = free_port()  # chosen first: the customer's unbound (and so pebble) asks geomesh-dns there
        if self.plan.netns:
            self.say(f"[1/{steps}] network namespaces: an internet, {len(self.plan.gateways)} gateway hosts, "
                     "the customer's DNS, a client ...")
            self._start_topology()
            assert self.topology is not None
            self.say(f"        namespaces {self.topology.prefix}-* (see `ip netns list`)")
        else:
            self.say(f"[1/{steps}] loopback mode: no namespaces")
        self.say(f"[2/{steps}] the customer's DNS and the ACME CA (pebble, validating through the customer's unbound) ...")
        self._start_customer_dns()
        self._start_pebble()
        self.say(f"[3/{steps}] control plane: embedded etcd, PKI, coordinator (ordering the zone certificate) ...")
        assert self.pebble is not None and self.customer is not None
        self.cp.start(lease_ttl=LAB_LEASE_TTL if self.timers == "lab" else 3,
                      extra=["--listen-unix", str(self.unix_socket), "--allow-loopback-instances",
                             "--acme-directory", self.pebble.directory, "--acme-zone", self.plan.zone,
                             "--acme-ca-bundle", str(self.pebble.listener_ca), *ACME_FLAGS,
                             "--resolver", self.customer.coordinator_resolver])
        self.cert_watch = CertificateWatch(self.cp.address, self.cp.pki.identity("admin", "lab-admin"),
                                           self.plan.zone, since=self.started).start()
        self.say(f"        coordinator {self.cp.address} (and {self.unix_socket}), etcd {self.cp.etcd.endpoint}; "
                 f"it checks custom domains' TXT records through unbound {self.customer.coordinator_resolver}")
        self.say(f"[4/{steps}] geodns and the status page on 127.0.0.1 ...")
        self._start_dns()  # first: the zone certificate's order waits for a GeoDNS server to follow the feed
        self._start_status_page()
        self.say(f"[5/{steps}] regions, enrollments, apps and instances: geomesh apply ...")
        asyncio.run(self._apply_state())
        self.say(f"[6/{steps}] app instances and gateways (agent + WireGuard + proxy) ...")
        for g in self.plan.gateways:
            self._start_apps(g)
            self.start_gateway(g.name)
        asyncio.run(self._wait_alive([g.name for g in self.plan.gateways], timeout=60))
        self._say_certificate()

    def declared_state(self) -> apply.Declared:
        """What the lab declares, as `geomesh apply` files would: the regions, each gateway enrolled
        at its public address, the apps `hello` and `solo`, and the plan's instances."""
        want = apply.Declared()
        for rf in self.regions:
            want.declare("regions", rf.region.name, rf.region, f"lab: {rf.region.name}")
        for g in self.plan.gateways:  # a gateway registers only as enrolled: its region and address
            want.declare("enrollments", g.name, apply.Enrollment(g.name, g.region, (g.public_ip,)), f"lab: {g.name}")
        for app in (App("hello", LbPolicy.ROUND_ROBIN), App("solo", LbPolicy.LEAST_CONNECTIONS)):
            want.declare("apps", app.name, app, f"lab: {app.name}")
        for i in self.plan.instances:
            inst = Instance(i.app, i.id, i.region, i.address, i.port)
            want.declare("instances", inst.key, inst, f"lab: {inst.key}")
        return want

    async def _apply_state(self) -> None:
        """`geomesh apply` of `declared_state()` (the instances may be on loopback addresses: the
        lab's coordinator runs with --allow-loopback-instances)."""
        async with client_channel(self.cp.address, self.cp.pki.identity("admin", "lab-admin")) as ch:
            admin = pbg.AdminStub(ch)
            have = await apply.fetch(admin)
            plan = apply.diff(self.declared_state(), have)
            if plan.conflicts:
                raise apply.ApplyError("; ".join(plan.conflicts))
            await apply.execute(admin, plan, have, say=lambda _line: None)

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

    def _start_pebble(self) -> None:
        """pebble validating through the customer's unbound (which knows the lab's zone and the
        customer's), HTTP-01 at the gateways' plain port; in netns mode inside the customer's DNS
        namespace, its listeners relayed to the same ports on the host's 127.0.0.1. Its root (new
        on every start) in `pebble_root`."""
        assert self.customer is not None
        host = self.customer.unbound.netns
        self.pebble = PebbleProcess(self.dir / "pebble", dns_server=self.customer.resolver,
                                    http_port=self.plan.http01_port, netns=host)
        self.pebble.start()
        assert self.pebble.proc is not None
        self.record.pids["pebble"] = self.pebble.proc.pid
        self.record.save()
        self.pebble_root.write_text(self.pebble.root_pem())
        where = f"in {host.name}, relayed to the host's 127.0.0.1" if host is not None else "on 127.0.0.1"
        self.say(f"        pebble {self.pebble.directory} ({where}; validating through {self.customer.resolver}, "
                 f"HTTP-01 at port {self.plan.http01_port}), its root CA in {self.pebble_root}")

    def _say_certificate(self) -> None:
        assert self.cert_watch is not None
        got = self.cert_watch.wait(CERT_WAIT)
        if got is None:
            self.say(f"        the zone certificate is not obtained yet: {self.cert_watch.why_not()} "
                     f"(see {self.dir}/coordinator.log)")
            return
        self.say(f"        zone certificate ({', '.join(got.dns_names)}) obtained from pebble {got.seconds:.1f} s "
                 f"after the lab started, serial {got.serial}")

    def _start_customer_dns(self) -> None:
        """The customer's gdnsd and the resolver the gateways ask (in a namespace of its own on
        the lab's internet in netns mode, where the gateway namespaces reach it)."""
        host = None
        if self.topology is not None:
            host = self.topology.add_host("dns", network="203.0.113.0/24")
        self.customer = CustomerDns.start(self.dir / "customer-dns", self.plan.customer_zone, self.plan.zone,
                                          self.dns_port, host)
        self.record.pids.update({f"customer-{k}": v for k, v in self.customer.pids.items()})
        self.record.save()
        self.say(f"        customer zone {self.plan.customer_zone} on gdnsd {':'.join(map(str, self.customer.gdnsd.address))}"
                 f"{' (in ' + host.name + ')' if host else ''}; the gateways' and pebble's resolver: unbound "
                 f"{self.customer.resolver}")

    def _start_dns(self) -> None:
        ident = self.cp.pki.identity("dns", "lab-dns")
        self.dns_proc = self._popen("geodns", [
            sys.executable, "-m", "geodns.main", "--zone", self.plan.zone, "--listen", f"127.0.0.1:{self.dns_port}",
            "--coordinator", self.cp.address, "--tls-ca", str(ident.ca), "--tls-cert", str(ident.cert),
            "--tls-key", str(ident.key), "--default-region", self.plan.gateways[0].region,
            "--metrics-port", "0"])

    def _start_status_page(self) -> None:
        """geomesh-status on 127.0.0.1 over plain HTTP (loopback only), following as an admin."""
        port = free_port()
        self._popen("status-page", [
            sys.executable, "-m", "status_page.main", "--coordinator", self.cp.address, "--pki-dir",
            str(self.cp.pki.dir), "--name", "lab-status", "--listen", f"127.0.0.1:{port}", "--insecure-http"])
        self.status_url = f"http://127.0.0.1:{port}/"
        self.say(f"        status page {self.status_url}")

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
            insts = [i for i in self.plan.instances if i.region == g.region and self.plan.instance_host(g.name)]
            for inst in insts:  # instance addresses live on the namespace's loopback
                host.run(["ip", "addr", "add", f"{inst.address}/32", "dev", "lo"])
        self.client = self.topology.add_host("client", network="198.51.100.0/24")

    def _start_apps(self, g: LabGateway) -> None:
        if not self.plan.instance_host(g.name):
            return  # a region's instances live beside its first gateway only
        host = self.gateways[g.name].host if g.name in self.gateways else None
        for inst in (i for i in self.plan.instances if i.region == g.region):
            self.apps.append(self._popen(f"app-{inst.id}", [
                sys.executable, "-m", "geomesh.lab.sample_app", "--app", inst.app, "--instance", inst.id,
                "--region", inst.region, "--listen", f"{inst.address}:{inst.port}"], host))

    def _gateway_config(self, rg: RunningGateway) -> Path:
        """Write the gateway's config (the agent's TOML, `regional_gateway/agent_config.py`) to `rg.config`."""
        g = rg.spec
        ident = self.cp.pki.identity("gateway", g.name)
        config: dict[str, Any] = {
            "name": g.name, "region": g.region,
            "coordinators": [f"unix:{self.unix_socket}" if self.plan.netns else self.cp.address],
            "public_ip": g.public_ip, "zone": self.plan.zone, "proxy_port": g.proxy_port,
            "https_port": g.https_port, "proxy_listen": g.public_ip,
        }
        if self.timers == "lab":
            config["heartbeat_interval"] = LAB_HEARTBEAT
        config["metrics_port"] = -1
        config["tls"] = {"ca": ident.ca, "cert": ident.cert, "key": ident.key}
        config["wireguard"] = {
            "interface": rg.ifname or f"gm{g.short}", "listen_port": g.wg_port,
            "key_file": self.dir / f"{g.name}.wgkey", "backend": "userspace" if self.plan.netns else "none",
            "persistent_keepalive": 5,
        }
        config["reach"] = dict(REACH)
        if self.customer:
            config["custom_domains"] = {"resolver": self.customer.resolver, "on_demand_wait": ON_DEMAND_WAIT}
        rg.config.write_text(toml_writer.dumps(config, comment="written by geomesh lab"))
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

    # -- faults (the commands are returned, so callers can print them) ------------------------

    def namespace(self, name: str) -> str:
        rg = self.gateways[name]
        if rg.host is None:
            raise RuntimeError("faults need the lab's network namespaces (netns mode)")
        return rg.host.name

    def _run_all(self, commands: list[list[str]], *, check: bool = True) -> list[list[str]]:
        for argv in commands:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
            if check and out.returncode != 0:
                raise RuntimeError(f"`{' '.join(argv)}` failed: {out.stderr.strip()}")
        return commands

    def link_commands(self, name: str, *, up: bool) -> list[list[str]]:
        rg = self.gateways[name]
        assert rg.host is not None
        return faults.link_commands(self.namespace(name), "eth0", up=up, router=rg.host.router)

    def set_public_link(self, name: str, *, up: bool) -> list[list[str]]:
        """Cut (`up=False`) or restore gateway `name`'s public link; its session stays up (unix socket)."""
        return self._run_all(self.link_commands(name, up=up))

    def isolation_commands(self, region: str, *, add: bool) -> list[list[str]]:
        """Blackhole, inside `region`'s gateway namespaces, every other region's gateway address."""
        others = [g.public_ip for g in self.plan.gateways if g.region != region]
        return [c for g in self.plan.gateways_of(region)
                for c in faults.blackhole_commands(self.namespace(g.name), others, add=add)]

    def isolate_region(self, region: str, *, on: bool) -> list[list[str]]:
        """Cut `region`'s probers off from every other region (on) or undo it."""
        return self._run_all(self.isolation_commands(region, add=on), check=on)

    def gateway_pid(self, name: str) -> int:
        rg = self.gateways[name]
        if rg.proc is None or rg.proc.poll() is not None:
            raise RuntimeError(f"gateway {name} is not running")
        return rg.proc.pid

    def signal_gateway(self, name: str, signal_name: str) -> list[str]:
        """kill -STOP / -CONT / -KILL gateway `name`'s process (the agent and its data plane)."""
        argv = faults.signal_command(self.gateway_pid(name), signal_name)
        self._run_all([argv])
        if signal_name == "KILL":
            rg = self.gateways[name]
            assert rg.proc is not None
            rg.proc.wait(10)
            rg.proc = None
        return argv

    # -- health --------------------------------------------------------------------------------

    async def overview(self) -> pb.Overview:
        async with client_channel(self.cp.address, self.cp.pki.identity("admin", "lab-admin")) as ch:
            return await pbg.AdminStub(ch).GetOverview(pb.Empty(), timeout=5)

    async def problems(self) -> list[str]:
        """Why the lab is not healthy (empty: every gateway alive with an open session, reachable
        and in DNS, no region votes any gateway down, no region cut off, none held by the panic
        threshold)."""
        try:
            ov = await self.overview()
        except Exception as exc:  # noqa: BLE001 - an unanswered overview is a problem to report
            return [f"GetOverview failed: {exc}"]
        out = []
        seen = {g.name: g for g in ov.gateways}
        for g in self.plan.gateways:
            h = seen.get(g.name)
            if h is None:
                out.append(f"{g.name}: not registered")
            elif h.session != pb.SESSION_STATE_OPEN:
                out.append(f"{g.name}: session {pb.SessionState.Name(h.session)}")
            elif not h.reachable or not h.in_dns:
                out.append(f"{g.name}: reachable={h.reachable} in_dns={h.in_dns}")
            elif h.down_by:
                out.append(f"{g.name}: down for {', '.join(h.down_by)}")
        if ov.cut_off_regions:
            out.append(f"cut-off regions: {', '.join(ov.cut_off_regions)}")
        if ov.panic_held:
            out.append(f"held by the panic threshold: {', '.join(ov.panic_held)}")
        return out

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Wait until `problems()` is empty; TimeoutError naming what is still wrong."""
        deadline = time.monotonic() + timeout
        left: list[str] = []
        while time.monotonic() < deadline:
            left = asyncio.run(self.problems())
            if not left:
                return
            time.sleep(0.2)
        raise TimeoutError(f"the lab is not healthy after {timeout:.0f}s: {'; '.join(left)}")

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
        if self.cert_watch is not None:
            self.cert_watch.stop()
        for rg in self.gateways.values():
            if rg.proc is not None and rg.proc.poll() is None:
                stop_pid(rg.proc.pid)
        for pid in reversed(list(self.record.pids.values())):
            stop_pid(pid)
        if self.topology is not None:
            self.topology.teardown()
