#!/usr/bin/env python3
"""Failover benchmark: how fast DNS stops and resumes sending users to a gateway, on the lab topology.

    .venv/bin/python bench/failover.py [--trials 10] [--max-seconds 30] [--json FILE]
    .venv/bin/python bench/failover.py --quick          # 2 trials per case
    .venv/bin/python bench/failover.py --cases link,crash --lab-timers

Brings up the lab (`geomesh.lab.runner.Lab` on `deploy/regions/`: embedded etcd, a coordinator,
geodns, one gateway per region in its own network namespace joined by wireguard-go; needs root
and wireguard-go, exits 2 otherwise), every flag at its shipped default (coordinator
`--lease-ttl 3`, gateway heartbeat 1 s, probes every 0.5 s with a 0.5 s timeout, down after 3
failures, up after 2; `--lab-timers` uses the lab's faster lease and heartbeat instead). Then, per
case, `--trials` trials; each starts from a healthy lab (every gateway open, reachable, in DNS, no
region voting any down), injects the fault with the lab's own commands, and measures from the
moment of the fault by asking geodns with kdig every 50 ms as a resolver in the victim's region
would (EDNS Client Subnet of a client that region serves):

    link      gw-eu-central-1's public link cut (`ip link set eth0 down` in its namespace; its
              coordinator session stays up): out of DNS; then restored: back in DNS
    crash     kill -9 of the gateway: out of DNS (then restarted)
    stop      kill -STOP of the gateway (a silent gateway): out of DNS (then -CONT)
    isolate   ap-northeast's probers cut off from every other region (blackhole routes to the
              other gateways' public addresses inside its namespace): over a --window, every
              GetOverview and DNS answer for the other regions is checked; counted: gateways of
              other regions excluded (target 0), and whether GetOverview named the region cut off
    all-cut   every gateway's public link cut: over a --window, every DNS answer for every
              region is checked; counted: NODATA answers (target 0: fail-open) and non-answers

"Out" is the first answer without the victim's address that still has records; "back" the first
with it. A trial that does not get there within --max-seconds counts as a miss. After each trial
everything is restored and the bench waits until the lab is healthy again. Printed: p50, p99
(nearest rank) and max per case against the issue's targets; --json writes every sample.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository, not from bench/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench._stats import fmt, pct  # noqa: E402
from geomesh.lab import dns_answer  # noqa: E402
from geomesh.lab.faults import time_until  # noqa: E402
from geomesh.lab.plan import make_plan  # noqa: E402
from geomesh.lab.runner import Lab, netns_unavailable_reason  # noqa: E402
from geomesh.lab.vantage import find  # noqa: E402
from geomesh.regions_file import load_dir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CASES = ("link", "crash", "stop", "isolate", "all-cut")
VICTIM = "gw-eu-central-1"
ISOLATED = "ap-northeast"
POLL = 0.05  # seconds between two DNS questions while measuring
# row -> (what the issue asks, the statistic judged, the bound in seconds)
TARGETS: dict[str, tuple[str, str, float]] = {
    "link-out": ("public link cut, session intact: out of DNS", "p99", 3.0),
    "link-back": ("public link restored: back in DNS", "p99", 5.0),
    "crash-out": ("crash (kill -9): out of DNS", "max", 1.0),
    "stop-out": ("silent gateway (kill -STOP), default flags: out of DNS", "max", 3.0),
}


@dataclass
class Timings:
    samples: list[float] = field(default_factory=list)
    misses: int = 0

    def add(self, value: float | None) -> None:
        if value is None:
            self.misses += 1
        else:
            self.samples.append(value)

    def summary(self, stat: str, bound: float) -> dict:
        p50, p99 = pct(self.samples, 0.5), pct(self.samples, 0.99)
        worst = max(self.samples) if self.samples else math.nan
        judged = {"p99": p99, "max": worst}[stat]
        return {"samples": self.samples, "misses": self.misses, "p50": p50, "p99": p99, "max": worst,
                "target": f"{stat} <= {bound} s", "ok": self.misses == 0 and bool(self.samples) and judged <= bound}


class Bench:
    def __init__(self, lab: Lab, max_seconds: float, window: float, say: Callable[[str], None]) -> None:
        self.lab = lab
        self.max_seconds = max_seconds
        self.window = window
        self.say = say
        self.name = f"hello.{lab.plan.zone}"
        self.ip_of = {g.name: g.public_ip for g in lab.plan.gateways}
        self.subnets: dict[str, str] = {}    # region -> ECS subnet GeoDNS sends there
        self.healthy: dict[str, frozenset[str]] = {}
        self.timings = {row: Timings() for row in TARGETS}
        self.isolate: list[dict] = []
        self.all_cut: list[dict] = []

    def ask(self, region: str) -> dns_answer.DnsAnswer:
        return dns_answer.query(self.lab.dns_port, self.name, self.subnets[region], timeout=1)

    def learn_regions(self) -> None:
        by_ip = {g.public_ip: g.region for g in self.lab.plan.gateways}
        for v in find(("NA", "EU", "AS")).values():
            ans = dns_answer.query(self.lab.dns_port, self.name, v.subnet)
            regions = {by_ip.get(ip) for ip in ans.addresses}
            if len(regions) == 1 and None not in regions:
                region = regions.pop()
                self.subnets[region] = v.subnet
                self.healthy[region] = frozenset(ans.addresses)
        if VICTIM not in self.ip_of or self.lab.plan.gateways_of("eu-central")[0].name != VICTIM:
            raise SystemExit(f"the bench wants {VICTIM} in the lab's regions")
        if "eu-central" not in self.subnets or ISOLATED not in self.subnets:
            raise SystemExit(f"no client subnet is sent to eu-central and {ISOLATED}: {self.subnets}")

    # -- trials --------------------------------------------------------------------------------

    def ready(self) -> None:
        self.lab.wait_healthy(90)
        victim = self.ip_of[VICTIM]
        if time_until(lambda: victim in self.ask("eu-central").addresses, 30, every=0.2) is None:
            raise RuntimeError(f"{VICTIM} is healthy but not answered for its region")

    def _out(self) -> Callable[[], bool]:
        victim = self.ip_of[VICTIM]
        return lambda: (a := self.ask("eu-central")).answered and victim not in a.addresses

    def _back(self) -> Callable[[], bool]:
        victim = self.ip_of[VICTIM]
        return lambda: victim in self.ask("eu-central").addresses

    def trial_link(self) -> None:
        t0 = time.monotonic()
        self.lab.set_public_link(VICTIM, up=False)
        out = time_until(self._out(), self.max_seconds, every=POLL, start=t0)
        t1 = time.monotonic()
        self.lab.set_public_link(VICTIM, up=True)
        back = time_until(self._back(), self.max_seconds, every=POLL, start=t1)
        self.timings["link-out"].add(out)
        self.timings["link-back"].add(back)
        self.say(f"    link cut: out {fmt(out if out is not None else math.nan)} s, "
                 f"restored: back {fmt(back if back is not None else math.nan)} s")

    def trial_crash(self) -> None:
        t0 = time.monotonic()
        self.lab.signal_gateway(VICTIM, "KILL")
        out = time_until(self._out(), self.max_seconds, every=POLL, start=t0)
        self.lab.start_gateway(VICTIM)
        self.timings["crash-out"].add(out)
        self.say(f"    kill -9: out {fmt(out if out is not None else math.nan, 3)} s")

    def trial_stop(self) -> None:
        t0 = time.monotonic()
        self.lab.signal_gateway(VICTIM, "STOP")
        try:
            out = time_until(self._out(), self.max_seconds, every=POLL, start=t0)
        finally:
            self.lab.signal_gateway(VICTIM, "CONT")
        self.timings["stop-out"].add(out)
        self.say(f"    kill -STOP: out {fmt(out if out is not None else math.nan)} s")

    def trial_isolate(self) -> None:
        others = {g.name for g in self.lab.plan.gateways if g.region != ISOLATED}
        regions = [r for r in self.subnets if r != ISOLATED]
        excluded: set[str] = set()
        moved = looks = answers = 0
        named_after: float | None = None
        t0 = time.monotonic()
        self.lab.isolate_region(ISOLATED, on=True)
        try:
            while time.monotonic() - t0 < self.window:
                ov = asyncio.run(self.lab.overview())
                looks += 1
                excluded |= {g.name for g in ov.gateways if g.name in others and not (g.reachable and g.in_dns)}
                if named_after is None and ISOLATED in ov.cut_off_regions:
                    named_after = time.monotonic() - t0
                for r in regions:
                    answers += 1
                    if frozenset(self.ask(r).addresses) != self.healthy[r]:
                        moved += 1
                time.sleep(POLL)
        finally:
            self.lab.isolate_region(ISOLATED, on=False)
        self.isolate.append({"excluded": sorted(excluded), "overviews": looks, "dns_answers": answers,
                             "dns_moved": moved, "cut_off_named_after": named_after})
        self.say(f"    {ISOLATED} cut off: other regions' gateways excluded {len(excluded)}, DNS answers moved "
                 f"{moved}/{answers}, named cut off after {fmt(named_after) if named_after is not None else 'never'} s")

    def trial_all_cut(self) -> None:
        nodata = other = answers = 0
        fail_open_seen = 0
        t0 = time.monotonic()
        for g in self.lab.plan.gateways:
            self.lab.set_public_link(g.name, up=False)
        try:
            while time.monotonic() - t0 < self.window:
                for r in self.subnets:
                    a = self.ask(r)
                    answers += 1
                    nodata += a.nodata
                    other += not a.answered and not a.nodata
                    fail_open_seen += a.answered and frozenset(a.addresses) != self.healthy[r]
                time.sleep(POLL)
        finally:
            for g in self.lab.plan.gateways:
                self.lab.set_public_link(g.name, up=True)
        self.all_cut.append({"dns_answers": answers, "nodata": nodata, "no_answer": other,
                             "answered_elsewhere": fail_open_seen})
        self.say(f"    every link cut: {answers} answers, NODATA {nodata}, no answer {other}")

    def run(self, cases: list[str], trials: int) -> None:
        for case in cases:
            self.say(f"\n== {case}: {trials} trials ==")
            trial = getattr(self, "trial_" + case.replace("-", "_"))
            for n in range(trials):
                self.ready()
                self.say(f"  trial {n + 1}/{trials}")
                trial()
            self.ready()

    # -- report --------------------------------------------------------------------------------

    def report(self) -> dict:
        rows = {row: t.summary(TARGETS[row][1], TARGETS[row][2]) for row, t in self.timings.items()
                if t.samples or t.misses}
        out: dict = {"rows": rows}
        if self.isolate:
            excluded = sorted({n for t in self.isolate for n in t["excluded"]})
            named = sum(1 for t in self.isolate if t["cut_off_named_after"] is not None)
            out["isolate"] = {"trials": self.isolate, "excluded": excluded, "cut_off_named": named,
                              "ok": not excluded and named == len(self.isolate)}
        if self.all_cut:
            nodata = sum(t["nodata"] for t in self.all_cut)
            none = sum(t["no_answer"] for t in self.all_cut)
            out["all_cut"] = {"trials": self.all_cut, "nodata": nodata, "no_answer": none,
                              "answers": sum(t["dns_answers"] for t in self.all_cut), "ok": nodata == 0 and none == 0}
        return out


def print_table(result: dict, trials: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"failover on the lab topology ({trials} trials per case)", title_justify="left")
    for col in ("case", "target", "p50", "p99", "max", "misses", "verdict"):
        table.add_column(col)
    for row, s in result["rows"].items():
        table.add_row(TARGETS[row][0], s["target"], f"{fmt(s['p50'], 3)} s", f"{fmt(s['p99'], 3)} s",
                      f"{fmt(s['max'], 3)} s", str(s["misses"]), "[green]meets[/green]" if s["ok"] else "[red]misses[/red]")
    if "isolate" in result:
        iso = result["isolate"]
        n = len(iso["trials"])
        table.add_row(f"{ISOLATED}'s probers cut off from every other region", "0 other-region gateways excluded",
                      "", "", "", f"named cut off {iso['cut_off_named']}/{n}",
                      ("[green]meets[/green]" if iso["ok"] else "[red]misses[/red]") + f" ({len(iso['excluded'])} excluded)")
    if "all_cut" in result:
        ac = result["all_cut"]
        table.add_row("everything unreachable (all public links cut)", "fail-open answer, never NODATA", "", "", "",
                      f"NODATA {ac['nodata']}, none {ac['no_answer']} of {ac['answers']}",
                      "[green]meets[/green]" if ac["ok"] else "[red]misses[/red]")
    console = Console()
    if not console.is_terminal:  # a log or a pipe: wide enough for one line per case
        console = Console(width=150)
    console.print(table)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=10, help="trials per case (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="2 trials per case")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)} (default all)")
    p.add_argument("--max-seconds", type=float, default=30.0,
                   help="bound of one measurement (out or back) in a trial; past it the trial is a miss (default %(default)s)")
    p.add_argument("--window", type=float, default=8.0,
                   help="seconds the isolate and all-cut faults last while every answer is checked (default %(default)s)")
    p.add_argument("--lab-timers", action="store_true",
                   help="the lab's timers (coordinator --lease-ttl 2, heartbeat 0.5 s) instead of the shipped defaults")
    p.add_argument("--regions", type=Path, default=ROOT / "deploy" / "regions", help="region files (default deploy/regions)")
    p.add_argument("--json", type=Path, help="write every sample and the summary here")
    args = p.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad or args.trials < 1 or args.max_seconds <= 0 or args.window <= 0:
        p.error(f"--cases: unknown {', '.join(bad)}" if bad else "--trials, --max-seconds and --window must be positive")
    trials = 2 if args.quick else args.trials
    reason = netns_unavailable_reason()
    if reason:
        print(f"bench/failover.py needs the lab's network namespaces and WireGuard: {reason}", file=sys.stderr)
        return 2
    regions = load_dir(args.regions)
    with tempfile.TemporaryDirectory(prefix="geomesh-failover-") as tmp:
        lab = Lab(Path(tmp), regions, make_plan(regions, netns=True), say=lambda s: print(s, flush=True),
                  timers="lab" if args.lab_timers else "default")
        started = time.monotonic()
        try:
            lab.up()
            bench = Bench(lab, args.max_seconds, args.window, lambda s: print(s, flush=True))
            bench.learn_regions()
            bench.run(cases, trials)
            result = bench.report()
        finally:
            lab.down()
    result["config"] = {"trials": trials, "cases": cases, "timers": "lab" if args.lab_timers else "default",
                        "max_seconds": args.max_seconds, "window": args.window, "poll": POLL,
                        "seconds": round(time.monotonic() - started, 1)}
    print()
    print_table(result, trials)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=lambda v: None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
