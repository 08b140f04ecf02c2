#!/usr/bin/env python3
"""Abuse benchmark: one hostile client per scenario against a real gateway or GeoDNS server, while a
well-behaved client measures what it still gets.

    .venv/bin/python bench/abuse.py [--scenarios all] [--duration 6] [--rate 50] [--json FILE]
    .venv/bin/python bench/abuse.py --quick          # 2 s per phase; what tests/bench runs

Scenarios (each on freshly started servers; attacker from 127.0.0.2, well-behaved client from
127.0.0.1, so per-client limits can tell them apart):

    rapid-reset   HTTP/2 over TLS to a `g` name: batches of HEADERS + RST_STREAM (CVE-2023-44487
                  class); reconnects when the gateway closes.       victim: new TLS+h2 call each time
    ping-flood    HTTP/2: PING frames from a client that never reads (SO_RCVBUF 4 KiB); reconnects.
                                                                     victim: new TLS+h2 call each time
    slowloris     300 plain connections sending a request head one byte a second.
                                                                     victim: HTTP/1.1 keep-alive GETs
    fd-exhaustion gateway under RLIMIT_NOFILE 512 (soft and hard); 600 idle connections to the
                  TLS port, reopened as they close.                 victim: HTTP/1.1 keep-alive GETs
    dns-tcp       one TCP client pipelining 64 KB queries carrying 5,458 answer records.
                                                                     victim: UDP queries
    dns-cache     unique 4 KB UDP queries (an EDNS option with a counter) at --flood-rate a second
                  (what a server can answer: the scenario is about memory and the cache, not capacity).
                                                                     victim: UDP queries

Servers: `geomesh-gateway --routes` (one HTTP/1.1 app on two nginx backends, one `g` app on an h2c
nginx backend, a self-signed certificate) or `geomesh-dns --state`, pinned to --server-cpu; nginx,
the attacker and the victim on --client-cpu. Each scenario runs the victim alone (quiet), then
with the attacker (attacked), at a fixed --rate of requests per second; a request that fails,
answers wrongly or takes over 2 s is an error. Printed per scenario: the victim's p50/p99/max and
errors, quiet and attacked, the p99 ratio, the server's CPU and RSS (start, peak) during the attack
and what the attacker saw (frames or queries sent, connections the server ended). The aim (issue
"hostile clients"): errors 0 and attacked p99 <= 5x quiet, with the attacker bounded (the server
ends its connections or its work stays capped). Loopback only; every loop is bounded in count and
time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository, not from bench/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench._abuse_clients import (  # noqa: E402
    DnsVictim,
    H2Victim,
    Http1Victim,
    Target,
    Victim,
    _attacker_main,
    attack_dns_cache,
    attack_dns_tcp,
    attack_fd_exhaustion,
    attack_ping_flood,
    attack_rapid_reset,
    attack_slowloris,
)
from bench.h2 import self_signed  # noqa: E402
from bench.http import CLK_TCK, Procs, cpu_ticks, free_port, nginx_conf, wait_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ZONE = "bench.test"  # the name bench.h2.self_signed certifies (*.bench.test)
SCENARIOS = ("rapid-reset", "ping-flood", "slowloris", "fd-exhaustion", "dns-tcp", "dns-cache")
DNS_STATE = """\
[zone]
name = "geo.test"
nameservers = ["ns1=192.0.2.53"]
default_region = "eu"
serial = 7

[[regions]]
name = "eu"
latitude = 50.11
longitude = 8.68
gateways = [ { name = "eu-1", ipv4 = "192.0.2.10" }, { name = "eu-2", ipv4 = "192.0.2.11" } ]
[[regions]]
name = "us"
latitude = 40.71
longitude = -74.0
gateways = [ { name = "us-1", ipv4 = "198.51.100.10" } ]

[[apps]]
name = "shop"
regions = ["eu", "us"]
"""


# --------------------------------------------------------------------------- the servers

def start_gateway(work: Path, procs: Procs, cpu: int | None, nofile: int | None) -> Target:
    cert, key, _ = self_signed(work)
    h1a, h1b, h2c = free_port(), free_port(), free_port()
    (work / "nginx").mkdir(exist_ok=True)
    (work / "nginx" / "nginx.conf").write_text(nginx_conf(
        work / "nginx", [f"127.0.0.1:{h1a}", f"127.0.0.1:{h1b}", f"127.0.0.1:{h2c} http2"],
        "\n  http2_max_requests 1000000;"))
    procs.start(["nginx", "-p", str(work / "nginx"), "-c", str(work / "nginx" / "nginx.conf")], None,
                work / "nginx.log")
    routes = (f'zone = "{ZONE}"\nname = "abuse-gw"\n[health]\ncheck = "tcp"\ninterval = 2.0\n'
              f'[[apps]]\nname = "web"\nlb = "round_robin"\nbackends = ["127.0.0.1:{h1a}", "127.0.0.1:{h1b}"]\n'
              f'[[apps]]\nname = "api"\nlb = "round_robin"\nbackends = ["127.0.0.1:{h2c}"]\n'
              f'[[certificates]]\ncert = "{cert}"\nkey = "{key}"\n')
    (work / "routes.toml").write_text(routes)
    http_port, https_port = free_port(), free_port()
    argv = [sys.executable, "-m", "regional_gateway.main", "--routes", str(work / "routes.toml"),
            "--http", f"127.0.0.1:{http_port}", "--https", f"127.0.0.1:{https_port}",
            "--log-level", "warning", "--metrics-port", "0",
            "--no-https-redirect"]  # the HTTP/1.1 scenarios speak plain HTTP to a host the zone certificate covers
    if nofile is not None:
        argv = ["prlimit", f"--nofile={nofile}:{nofile}", *argv]
    proc = procs.start(argv, cpu, work / "gateway.log", dict(os.environ, PYTHONPATH=str(ROOT)))
    for p in (http_port, https_port, h1a, h1b, h2c):
        wait_port(p)
    return Target(pid=proc.pid, http_port=http_port, https_port=https_port, web_host=f"web.{ZONE}",
                  g_host=f"api-{h2c}g.{ZONE}", ca=str(cert))


def start_dns(work: Path, procs: Procs, cpu: int | None) -> Target:
    (work / "state.toml").write_text(DNS_STATE)
    port = free_port()
    proc = procs.start([sys.executable, "-m", "geodns.main", "--state", str(work / "state.toml"),
                        "--listen", f"127.0.0.1:{port}", "--log-level", "warning"], cpu, work / "dns.log",
                       dict(os.environ, PYTHONPATH=str(ROOT)))
    wait_port(port)
    return Target(pid=proc.pid, dns_port=port)


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# --------------------------------------------------------------------------- one scenario

@dataclass
class Scenario:
    name: str
    server: str  # "gateway" or "dns"
    victim: type[Victim]
    attack: Callable
    nofile: int | None = None


PLAN = {
    "rapid-reset": Scenario("rapid-reset", "gateway", H2Victim, attack_rapid_reset),
    "ping-flood": Scenario("ping-flood", "gateway", H2Victim, attack_ping_flood),
    "slowloris": Scenario("slowloris", "gateway", Http1Victim, attack_slowloris),
    "fd-exhaustion": Scenario("fd-exhaustion", "gateway", Http1Victim, attack_fd_exhaustion, nofile=512),
    "dns-tcp": Scenario("dns-tcp", "dns", DnsVictim, attack_dns_tcp),
    "dns-cache": Scenario("dns-cache", "dns", DnsVictim, attack_dns_cache),
}


@dataclass
class Result:
    name: str
    quiet: dict = field(default_factory=dict)
    attacked: dict = field(default_factory=dict)
    server: dict = field(default_factory=dict)
    attacker: dict = field(default_factory=dict)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def summary(v: Victim) -> dict:
    lat = [x * 1000 for x in v.latencies]
    return {"requests": len(v.latencies) + len(v.errors) - sum(e.startswith("slow") for e in v.errors),
            "errors": len(v.errors), "p50_ms": pct(lat, 0.50), "p99_ms": pct(lat, 0.99),
            "max_ms": max(lat) if lat else float("nan"), "first_errors": sorted(set(v.errors))[:3]}


def run_scenario(sc: Scenario, args: argparse.Namespace) -> Result:
    work = Path(tempfile.mkdtemp(prefix=f"geomesh-abuse-{sc.name}-"))
    procs = Procs()
    res = Result(sc.name)
    try:
        if sc.server == "gateway":
            target = start_gateway(work, procs, args.server_cpu, sc.nofile)
        else:
            target = start_dns(work, procs, args.server_cpu)
        time.sleep(0.5)
        warm = sc.victim(target, args.rate)
        warm.run(min(1.0, args.duration))  # connections, caches and health checks settled
        quiet = sc.victim(target, args.rate)
        quiet.run(args.duration)
        res.quiet = summary(quiet)

        q: mp.Queue = mp.get_context("fork").Queue()
        rss0, ticks0, t0 = rss_kb(target.pid), cpu_ticks(target.pid), time.monotonic()
        stop_at = time.monotonic() + args.duration + 1.0
        attacker = mp.get_context("fork").Process(target=_attacker_main,
                                                  args=(sc.attack, target, stop_at, q, args.client_cpu, args.flood_rate),
                                                  daemon=True)
        attacker.start()
        peak = [rss0]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.2):
                peak[0] = max(peak[0], rss_kb(target.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        time.sleep(1.0)  # the attack is under way before the victim starts measuring
        attacked = sc.victim(target, args.rate)
        attacked.run(args.duration)
        res.attacked = summary(attacked)
        ticks1, t1 = cpu_ticks(target.pid), time.monotonic()
        attacker.join(args.duration + 15)
        if attacker.is_alive():
            attacker.kill()
            attacker.join(5)
        with contextlib.suppress(Exception):
            res.attacker = q.get(timeout=1)
        sampling.set()
        sampler.join()
        res.server = {"cpu_pct": 100.0 * (sum(ticks1) - sum(ticks0)) / CLK_TCK / (t1 - t0),
                      "rss_start_mb": rss0 / 1024, "rss_peak_mb": peak[0] / 1024,
                      "alive": procs.procs[-1].poll() is None}
        after = sc.victim(target, args.rate)
        after.run(min(1.0, args.duration))
        res.server["served_after"] = summary(after)["errors"] == 0
        log = work / ("gateway.log" if sc.server == "gateway" else "dns.log")
        res.server["log_lines"] = sum(1 for _ in log.open("rb")) if log.exists() else 0
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    return res


def verdict(r: Result) -> str:
    ratio = r.attacked.get("p99_ms", float("nan")) / r.quiet.get("p99_ms", float("nan"))
    ok = r.attacked.get("errors", 1) == 0 and ratio <= 5.0 and r.server.get("alive") and r.server.get("served_after")
    return "meets aim" if ok else "MISSES aim"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenarios", default="all",
                    help=f"comma-separated scenarios, or 'all' ({', '.join(SCENARIOS)})")
    ap.add_argument("--duration", type=float, default=6.0,
                    help="seconds the victim measures, quiet and attacked (1-20; default %(default)s)")
    ap.add_argument("--rate", type=float, default=50.0,
                    help="victim requests per second (1-500; default %(default)s)")
    ap.add_argument("--flood-rate", type=float, default=10_000.0,
                    help="queries per second of the dns-cache attacker (default %(default)s)")
    ap.add_argument("--server-cpu", type=int, default=1, help="CPU of the server under test (default %(default)s)")
    ap.add_argument("--client-cpu", type=int, default=0,
                    help="CPU of the attacker and the nginx backends (default %(default)s)")
    ap.add_argument("--quick", action="store_true", help="2 s phases at 25 requests/s (what tests/bench runs)")
    ap.add_argument("--json", type=Path, help="write the results here")
    return ap


def main() -> int:
    ap = parser()
    args = ap.parse_args()
    if args.quick:
        args.duration, args.rate = 2.0, 25.0
    if not 1 <= args.duration <= 20:
        ap.error("--duration must be 1..20 seconds")
    if not 1 <= args.rate <= 500:
        ap.error("--rate must be 1..500 requests per second")
    names = list(SCENARIOS) if args.scenarios == "all" else [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [n for n in names if n not in PLAN]
    if unknown:
        ap.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    for tool in ("nginx", "prlimit"):
        if shutil.which(tool) is None:
            print(f"bench/abuse.py: {tool} is not installed (scripts/install.sh installs it)", file=sys.stderr)
            return 2
    cpus = os.sched_getaffinity(0)
    args.server_cpu = args.server_cpu if args.server_cpu in cpus else None
    args.client_cpu = args.client_cpu if args.client_cpu in cpus else None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    print(f"# abuse: victim {args.rate:g} req/s for {args.duration:g} s quiet, then {args.duration:g} s under attack; "
          f"server on CPU {args.server_cpu}, attacker on CPU {args.client_cpu}", flush=True)
    results = []
    for n in names:
        r = run_scenario(PLAN[n], args)
        results.append(r)
        a = r.attacker
        print(f"{n:<14} quiet p99 {r.quiet['p99_ms']:7.2f} ms  attacked p99 {r.attacked['p99_ms']:7.2f} ms "
              f"max {r.attacked['max_ms']:7.1f} ms  errors {r.attacked['errors']}/{r.attacked['requests']}  "
              f"server CPU {r.server['cpu_pct']:3.0f}% RSS {r.server['rss_start_mb']:.0f}->{r.server['rss_peak_mb']:.0f} MB  "
              f"attacker {a.get('sent', '?')} {a.get('unit', '')}, ended by server {a.get('server_closed', '?')}"
              f"{'  ' + a['error'] if 'error' in a else ''}", flush=True)
        if r.attacked["first_errors"]:
            print(f"{'':<14} victim errors: {'; '.join(r.attacked['first_errors'])}", flush=True)
    print()
    print(f"{'scenario':<14} {'quiet p99':>10} {'attacked p99':>13} {'ratio':>6} {'errors':>7} "
          f"{'peak RSS':>9} {'log lines':>9}  verdict (aim: errors 0, p99 <= 5x quiet)")
    for r in results:
        ratio = r.attacked["p99_ms"] / r.quiet["p99_ms"] if r.quiet["p99_ms"] else float("nan")
        print(f"{r.name:<14} {r.quiet['p99_ms']:>8.2f}ms {r.attacked['p99_ms']:>11.2f}ms {ratio:>6.1f} "
              f"{r.attacked['errors']:>7} {r.server['rss_peak_mb']:>7.0f}MB {r.server['log_lines']:>9}  {verdict(r)}")
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
