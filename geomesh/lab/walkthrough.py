"""The lab's scripted walkthrough: each step prints the exact command a person can repeat, runs
it, and checks what it shows. `geomesh lab --check` fails (exit 1) if any step does not hold;
that is what the CI smoke test runs.

Steps: DNS from three continents (ECS) gets three regions; a request through the chosen gateway
reaches a local instance; an app living only in one region answers through another region's
gateway over the mesh; a gateway is killed and DNS stops returning it within a second; it comes
back and the mesh heals; gw-eu-central-1's public link is cut (its coordinator session stays up)
and DNS moves the EU client away once the other regions' probes find it unreachable, then the
link is restored and DNS sends the client back (both times printed; the step fails past
`LINK_OUT_LIMIT` / `LINK_BACK_LIMIT`, generous bounds for slow CI machines: `bench/failover.py`
measures the real figures); grpcurl shows the overview with every gateway's reachability.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from geomesh.lab import dns_answer
from geomesh.lab.faults import time_until
from geomesh.lab.runner import Lab
from geomesh.lab.vantage import Vantage, find

LINK_GATEWAY = "gw-eu-central-1"  # whose public link the walkthrough cuts
LINK_OUT_LIMIT = 10.0             # seconds: the link-cut step fails if DNS takes longer to move the EU client
LINK_BACK_LIMIT = 15.0            # seconds: ... or longer to send it back once the link is restored


@dataclass
class StepResult:
    title: str
    ok: bool
    detail: str
    commands: list[str] = field(default_factory=list)


def _run(argv: list[str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


class Walkthrough:
    def __init__(self, lab: Lab, say: Callable[[str], None] = print) -> None:
        self.lab = lab
        self.say = say
        self.results: list[StepResult] = []
        self.vantages: dict[str, Vantage] = find(("NA", "EU", "AS"))
        self.ip_to_region = {g.public_ip: g.region for g in lab.plan.gateways}

    # -- tools -----------------------------------------------------------------------------------

    def kdig_argv(self, name: str, subnet: str | None) -> list[str]:
        argv = ["kdig", "@127.0.0.1", "-p", str(self.lab.dns_port), name, "A", "+short", "+timeout=2", "+retry=1"]
        if subnet:
            argv.append(f"+subnet={subnet}")
        return argv

    def resolve(self, name: str, subnet: str | None) -> list[str]:
        out = _run(self.kdig_argv(name, subnet))
        return [line.strip() for line in out.stdout.splitlines() if line.strip() and line[0].isdigit()]

    def curl_argv(self, host: str, ip: str, port: int) -> list[str]:
        argv = ["curl", "-sS", "--max-time", "5", "-H", f"Host: {host}", f"http://{ip}:{port}/"]
        if self.lab.client is not None:
            return self.lab.client.argv(argv)
        return argv

    def record(self, title: str, ok: bool, detail: str, commands: list[list[str]]) -> StepResult:
        res = StepResult(title, ok, detail, [shlex.join(c) for c in commands])
        self.results.append(res)
        mark = "ok " if ok else "FAIL"
        self.say(f"\n[{mark}] {title}")
        for c in res.commands:
            self.say(f"    $ {c}")
        self.say(f"    -> {detail}")
        return res

    # -- steps -----------------------------------------------------------------------------------

    def step_dns_continents(self) -> None:
        name = f"hello.{self.lab.plan.zone}"
        answers = {}
        cmds = []
        for cont, v in self.vantages.items():
            cmds.append(self.kdig_argv(name, v.subnet))
            ips = self.resolve(name, v.subnet)
            answers[cont] = sorted({self.ip_to_region.get(ip, ip) for ip in ips})
        regions = [tuple(r) for r in answers.values()]
        ok = all(len(r) == 1 for r in regions) and len(set(regions)) == 3
        detail = ", ".join(f"client in {c} ({self.vantages[c].country}) -> {'/'.join(r) or 'no answer'}"
                           for c, r in answers.items())
        self.record("DNS from three continents (EDNS Client Subnet) picks three regions", ok, detail, cmds)

    def _expect_answer(self, title: str, app: str, via_region: str, want_region: str) -> None:
        gw = self.lab.plan.gateway_of(via_region)
        argv = self.curl_argv(f"{app}.{self.lab.plan.zone}", gw.public_ip, gw.proxy_port)
        out = _run(argv)
        body = out.stdout.strip() or out.stderr.strip()
        ok = out.returncode == 0 and f"in {want_region}" in body
        self.record(title, ok, body[:200], [argv])

    def step_local_request(self) -> None:
        region = self.lab.plan.gateways[1].region
        self._expect_answer(f"a request through the {region} gateway reaches a local instance", "hello", region, region)

    def step_cross_region(self) -> None:
        via = self.lab.plan.gateways[0].region
        self._expect_answer(f"'solo' lives only in {self.lab.plan.solo_region}: the {via} gateway forwards over "
                            "the mesh", "solo", via, self.lab.plan.solo_region)

    def step_failover(self) -> None:
        eu = self.vantages["EU"]
        name = f"hello.{self.lab.plan.zone}"
        before = self.resolve(name, eu.subnet)
        victim = next((g for g in self.lab.plan.gateways if g.public_ip in before), None)
        if victim is None:
            self.record("gateway failover", False, f"no gateway answered for the EU client ({before})",
                        [self.kdig_argv(name, eu.subnet)])
            return
        killed = time.monotonic()
        self.lab.kill_gateway(victim.name)
        after: list[str] = before
        while time.monotonic() - killed < 5:
            after = self.resolve(name, eu.subnet)
            if victim.public_ip not in after and after:
                break
            time.sleep(0.02)
        elapsed = time.monotonic() - killed
        moved = sorted({self.ip_to_region.get(ip, ip) for ip in after})
        ok = victim.public_ip not in after and bool(after) and elapsed < 1.0
        self.record(f"kill {victim.name}: DNS stops returning it", ok,
                    f"after {elapsed * 1000:.0f} ms the EU client is sent to {'/'.join(moved)}",
                    [["kill", "-9", "<pid of geomesh-gateway " + victim.name + ">"], self.kdig_argv(name, eu.subnet)])
        self.lab.start_gateway(victim.name)
        try:
            asyncio.run(self.lab._wait_alive([victim.name], timeout=30))
            back = self.resolve(name, eu.subnet)
            ok2 = victim.public_ip in back
            detail = f"{victim.name} is alive again and answers for the EU client: {back}"
        except TimeoutError as exc:
            ok2, detail = False, str(exc)
        self.record(f"restart {victim.name}: it comes back", ok2, detail, [self.kdig_argv(name, eu.subnet)])
        if self.lab.plan.netns:
            self.step_mesh_heals(victim.name)

    def step_mesh_heals(self, name: str) -> None:
        other = next(g for g in self.lab.plan.gateways if g.name != name)
        host = self.lab.gateways[other.name].host
        target_ip = asyncio.run(self._mesh_ip(name))
        deadline = time.monotonic() + 20
        ok = False
        while time.monotonic() < deadline and not ok:
            ok = host is not None and host.ping(target_ip, count=1, wait=1)
        argv = host.argv(["ping", "-c", "1", target_ip]) if host else ["ping", target_ip]
        self.record(f"the mesh heals: {other.name} reaches {name} over WireGuard", ok,
                    f"ping {target_ip} {'answered' if ok else 'not answered'}", [argv])

    async def _mesh_ip(self, name: str) -> str:
        from geomesh.api import geomesh_pb2 as pb
        from geomesh.api import geomesh_pb2_grpc as pbg
        from geomesh.channel import client_channel

        async with client_channel(self.lab.cp.address, self.lab.cp.pki.identity("admin", "lab-admin")) as ch:
            return (await pbg.AdminStub(ch).GetGateway(pb.GetRequest(name=name), timeout=5)).mesh_ip

    def step_link_cut(self) -> None:
        """Cut a gateway's public link (its session stays up): DNS moves the EU client away; restore it: back."""
        eu = self.vantages["EU"]
        name = f"hello.{self.lab.plan.zone}"
        victim = next((g for g in self.lab.plan.gateways if g.name == LINK_GATEWAY), self.lab.plan.gateways[0])
        kdig = self.kdig_argv(name, eu.subnet)
        title_out = f"cut {victim.name}'s public link: DNS moves the EU client off {victim.public_ip}"
        title_back = f"restore {victim.name}'s public link: DNS sends the EU client back"
        try:
            self.lab.wait_healthy(30)
        except TimeoutError as exc:
            self.record(title_out, False, str(exc), [kdig])
            return

        def answer() -> dns_answer.DnsAnswer:
            return dns_answer.query(self.lab.dns_port, name, eu.subnet, timeout=1)

        first = answer()
        if victim.public_ip not in first.addresses:
            self.record(title_out, False, f"the EU client is not sent to {victim.public_ip} to begin with: "
                        f"{first.status} {list(first.addresses)}", [kdig])
            return
        last = [first]

        def moved() -> bool:
            last[0] = answer()
            return last[0].answered and victim.public_ip not in last[0].addresses

        cut = self.lab.set_public_link(victim.name, up=False)
        out_s = time_until(moved, LINK_OUT_LIMIT + 5)
        to = sorted({self.ip_to_region.get(ip, ip) for ip in last[0].addresses})
        detail = (f"after {out_s:.1f} s the EU client is sent to {'/'.join(to)} (limit {LINK_OUT_LIMIT:.0f} s)"
                  if out_s is not None else f"still {list(last[0].addresses)} ({last[0].status}) after "
                  f"{LINK_OUT_LIMIT + 5:.0f} s")
        self.record(title_out, out_s is not None and out_s <= LINK_OUT_LIMIT, detail, [*cut, kdig])

        def back() -> bool:
            last[0] = answer()
            return victim.public_ip in last[0].addresses

        restore = self.lab.set_public_link(victim.name, up=True)
        back_s = time_until(back, LINK_BACK_LIMIT + 5)
        detail = (f"after {back_s:.1f} s {victim.public_ip} is answered again (limit {LINK_BACK_LIMIT:.0f} s)"
                  if back_s is not None else f"not back after {LINK_BACK_LIMIT + 5:.0f} s: {list(last[0].addresses)}")
        self.record(title_back, back_s is not None and back_s <= LINK_BACK_LIMIT, detail, [*restore, kdig])

    def step_grpcurl(self) -> None:
        grpcurl = str(Path(sys.executable).parent / "grpcurl")
        ident = self.lab.cp.pki.identity("admin", "lab-admin")
        argv = [grpcurl, "-cacert", str(ident.ca), "-cert", str(ident.cert), "-key", str(ident.key),
                "-servername", "geomesh-coordinator", self.lab.cp.address, "geomesh.v1.Admin/GetOverview"]
        out = _run(argv)
        try:
            overview = json.loads(out.stdout)
            regions = overview.get("regions", [])
            alive = sum(r.get("gatewaysAlive", r.get("gateways_alive", 0)) for r in regions)
            total = overview.get("linksTotal", overview.get("links_total", 0))
            up = overview.get("linksUp", overview.get("links_up", 0))
            gateways = overview.get("gateways", [])
            reachable = sum(1 for g in gateways if g.get("reachable"))
            cut_off = overview.get("cutOffRegions", overview.get("cut_off_regions", []))
            detail = (f"{len(regions)} regions, {alive} gateways alive, {up}/{total} mesh links up, "
                      f"{reachable}/{len(gateways)} gateways reachable, cut-off regions: {', '.join(cut_off) or 'none'}")
            ok = (out.returncode == 0 and len(regions) == len(self.lab.plan.regions)
                  and alive == len(self.lab.plan.gateways) and len(gateways) == alive)
        except ValueError:
            ok, detail = False, (out.stderr or out.stdout)[:200]
        self.record("grpcurl: the mesh/health overview", ok, detail, [argv])

    def run(self) -> bool:
        self.step_dns_continents()
        self.step_local_request()
        if self.lab.plan.netns:
            self.step_cross_region()
        self.step_failover()
        if self.lab.plan.netns:
            self.step_link_cut()
        self.step_grpcurl()
        return all(r.ok for r in self.results)
