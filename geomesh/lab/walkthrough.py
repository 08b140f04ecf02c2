"""The lab's scripted walkthrough: each step prints the exact command a person can repeat, runs
it, and checks what it shows. `geomesh lab --check` fails (exit 1) if any step does not hold;
that is what the CI smoke test runs.

Steps: DNS from three continents (ECS) gets three regions; the zone certificate the coordinator
obtained from the lab's pebble (ACME DNS-01 through geomesh-dns) is served by every gateway and
`curl --cacert <pebble root>` trusts it (the time from an empty lab printed; the step fails only
past `CERT_STEP_WAIT`); a request through the chosen gateway
reaches a local instance (over HTTPS, as the lab's requests to `<app>.<zone>` are: a plain HTTP
request for a name with a certificate is redirected); an app living only in one region answers through another region's
gateway over the mesh; the customer publishes a TXT and a CNAME for their
domain in their own zone (gdnsd) and `curl --cacert <pebble root> https://<domain>/` gets the app
through a gateway (looked up through the lab's unbound; the certificate obtained on demand by
HTTP-01 during that first request, the time from the TXT record printed); a gateway is killed and DNS stops returning it within a second; it comes
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
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from geomesh.lab import dns_answer
from geomesh.lab.customer_zone import records_for
from geomesh.lab.faults import time_until
from geomesh.lab.plan import LabGateway
from geomesh.lab.runner import ON_DEMAND_WAIT, Lab
from geomesh.lab.vantage import Vantage, find
from geomesh.lab.zone_certificate import curl_argv, served_serial

LINK_GATEWAY = "gw-eu-central-1"  # whose public link the walkthrough cuts
LINK_OUT_LIMIT = 10.0             # seconds: the link-cut step fails if DNS takes longer to move the EU client
LINK_BACK_LIMIT = 15.0            # seconds: ... or longer to send it back once the link is restored
CERT_STEP_WAIT = 30.0             # seconds the TLS step waits for the certificate, listed and served
CUSTOM_DOMAIN_WAIT = 30.0         # seconds the custom-domain step waits for the domain to answer over HTTPS
ON_DEMAND_CURL = ON_DEMAND_WAIT + 5  # curl's --max-time there: the first handshake may wait on_demand_wait


@dataclass
class StepResult:
    title: str
    ok: bool
    detail: str
    commands: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # shown before the commands (e.g. zone file lines)


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

    def in_client(self, argv: list[str]) -> list[str]:
        """`argv` as run from the client namespace (as is on loopback)."""
        return self.lab.client.argv(argv) if self.lab.client is not None else argv

    def curl_argv(self, host: str, gw: LabGateway, *, https: bool = True, max_time: float = 5) -> list[str]:
        """curl `host` at gateway `gw` from the client: over HTTPS trusting only pebble's root."""
        port = gw.https_port if https else gw.proxy_port
        return self.in_client(curl_argv(host, gw.public_ip, port, str(self.lab.pebble_root), https=https,
                                        max_time=max_time))

    def connect(self, ip: str, port: int) -> Callable[[], socket.socket]:
        """Opens a TCP connection from the client (its namespace in netns mode)."""
        client = self.lab.client
        if client is not None:
            return lambda: client.call(socket.create_connection, (ip, port), 3)
        return lambda: socket.create_connection((ip, port), 3)

    def record(self, title: str, ok: bool, detail: str, commands: list[list[str]],
               lines: list[str] | None = None) -> StepResult:
        res = StepResult(title, ok, detail, [shlex.join(c) for c in commands], list(lines or ()))
        self.results.append(res)
        mark = "ok " if ok else "FAIL"
        self.say(f"\n[{mark}] {title}")
        for line in res.lines:
            self.say(f"    {line}")
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
        argv = self.curl_argv(f"{app}.{self.lab.plan.zone}", gw)
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

    def step_zone_certificate(self) -> None:
        """The zone certificate is listed in GetOverview, every gateway serves it (the same serial,
        verified against pebble's root), and curl trusting only that root gets the app."""
        title = "TLS: the zone certificate from the ACME CA"
        lab = self.lab
        host = f"hello.{lab.plan.zone}"
        gw = lab.plan.gateways[1] if len(lab.plan.gateways) > 1 else lab.plan.gateways[0]
        argv = self.curl_argv(host, gw)
        deadline = time.monotonic() + CERT_STEP_WAIT
        got = lab.cert_watch.wait(CERT_STEP_WAIT) if lab.cert_watch is not None else None
        if got is None:
            why = lab.cert_watch.why_not() if lab.cert_watch is not None else "the lab watches no certificate"
            self.record(title, False, f"no zone certificate after {CERT_STEP_WAIT:.0f} s: {why}", [argv])
            return
        root = lab.pebble_root.read_text()
        serving: dict[str, str] = {}
        while True:
            for g in lab.plan.gateways:
                if serving.get(g.name) != got.serial:
                    try:
                        serving[g.name] = served_serial(self.connect(g.public_ip, g.https_port), host, root)
                    except OSError as exc:  # ssl.SSLError included: not served (yet), or not trusted
                        serving[g.name] = f"{type(exc).__name__}: {exc}"
            if all(v == got.serial for v in serving.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        wrong = {n: v for n, v in serving.items() if v != got.serial}
        out = _run(argv)
        body = (out.stdout.strip() or out.stderr.strip())[:160]
        ok = not wrong and out.returncode == 0 and "hello from hello instance" in body
        served = (f"served by all {len(serving)} gateways" if not wrong else
                  "not served by " + "; ".join(f"{n} ({v[:120]})" for n, v in wrong.items()))
        self.record(title, ok, f"{', '.join(got.dns_names)} obtained from pebble {got.seconds:.1f} s after the lab "
                    f"started (target <= 10 s), serial {got.serial}, {served}; curl: {body}", [argv])

    def step_custom_domain(self) -> None:
        """The customer publishes TXT + CNAME for their domain; it resolves to the gateways, and the
        first HTTPS request, trusting only pebble's root, gets the app: the gateway's handshake
        waits while the coordinator checks the TXT record and obtains the certificate on demand
        (HTTP-01, validated by pebble at a gateway's plain port). Timed from the record's publication."""
        lab = self.lab
        domain = lab.plan.custom_domain
        title = f"custom domain by TXT: {domain} over HTTPS reaches the app hello (certificate on demand)"
        if lab.customer is None:
            self.record(title, False, "the lab started no customer DNS", [])
            return
        records = records_for(domain, "hello", lab.plan.zone)
        lines = [f"zone {lab.customer.zone} ({lab.customer.gdnsd.zone_path(lab.customer.zone)}) gets:",
                 *(f"  {r}" for r in records)]
        kdig_txt = self.in_client(lab.customer.kdig_argv(f"_geomesh-app-address.{domain}", "TXT"))
        kdig = self.in_client(lab.customer.kdig_argv(domain))
        published = time.monotonic()
        try:
            lab.customer.publish(records)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            self.record(title, False, f"publishing failed: {exc}", [lab.customer.gdnsd.reload_argv()], lines)
            return
        answer = dns_answer.DnsAnswer(dns_answer.TIMEOUT)
        by_ip = {g.public_ip: g for g in lab.plan.gateways}
        body, curl, gw = "", None, None
        while time.monotonic() - published < CUSTOM_DOMAIN_WAIT:
            answer = dns_answer.parse(_run(kdig).stdout)
            gw = next((by_ip[ip] for ip in answer.addresses if ip in by_ip), None)
            if gw is not None:
                curl = self.curl_argv(domain, gw, max_time=ON_DEMAND_CURL)
                out = _run(curl, timeout=ON_DEMAND_CURL + 10)
                body = (out.stdout.strip() or out.stderr.strip())[:160]
                if out.returncode == 0 and "hello from hello instance" in body:
                    break
            time.sleep(0.2)
        took = time.monotonic() - published
        ok = "hello from hello instance" in body
        txt = [line.split("TXT", 1)[1].strip() for line in _run(kdig_txt).stdout.splitlines()
               if not line.startswith(";") and "TXT" in line.split()]
        ok = ok and '"app=hello"' in txt  # what the client's resolver answers for the record
        serial = ""
        if ok and gw is not None:
            try:
                serial = served_serial(self.connect(gw.public_ip, gw.https_port), domain, lab.pebble_root.read_text())
            except OSError as exc:  # ssl.SSLError included
                ok, serial = False, f"not served afterwards: {exc}"
        where = "/".join(f"{ip} ({self.ip_to_region.get(ip, '?')})" for ip in answer.addresses) or answer.status
        detail = (f"TXT {', '.join(txt) or 'not answered'}; {domain} -> CNAME hello.{lab.plan.zone} -> {where}; "
                  f"the first HTTPS answer {took:.2f} s after the TXT appeared (target <= 5 s), certificate "
                  f"obtained on demand from pebble{', serial ' + serial if serial else ''}: {body or 'no answer'}")
        commands = [lab.customer.gdnsd.reload_argv(), kdig_txt, kdig, *([curl] if curl else [])]
        self.record(title, ok, detail, commands, lines)

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
        self.step_zone_certificate()
        self.step_local_request()
        if self.lab.plan.netns:
            self.step_cross_region()
        self.step_custom_domain()
        self.step_failover()
        if self.lab.plan.netns:
            self.step_link_cut()
        self.step_grpcurl()
        return all(r.ok for r in self.results)
