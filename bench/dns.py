#!/usr/bin/env python3
"""GeoDNS benchmark: geomesh-dns against gdnsd (geoip plugin) with dnsperf, on real resolver traffic.

Both servers get the same regions (coordinates and one gateway address each), the same apps and
the same GeoLite2 City database (the one of the `maxminddb-geolite2` package, or --geoip-db).
gdnsd uses its geoip plugin with `auto_dc_coords` (it compiles the database against the
datacenter coordinates at load time); its datacenter list starts with our default region, which
is what both answer for clients the database cannot place. A third server is geomesh-dns with its
reply cache switched off (`--no-reply-cache`, or `--cache-size 0` on a geomesh-dns without it).

Two loads, each one dnsperf wire file (`-B`):

- **hostile** (the headline): what an authoritative server sees from resolvers. --subnets
  distinct ECS /24s drawn uniformly at random from the IPv4 space the database knows (so the
  continent mix is the address space's), one query each, for one of --apps names, every letter
  of the name in random case (0x20), a random query ID in the file. The saturating run reads the
  file once (`dnsperf -n 1`), so no query repeats within a run; each round's fixed-rate run has
  its own file of further distinct /24s. dnsperf itself replaces the IDs with its own sequential
  slot numbers (the bench checks this each run and says so); the Python client that samples
  answers sends random IDs.
- **hot**: the previous headline, --hot-subnets /24s drawn with a quota per continent, names in
  lower case, the file looped: mostly what a reply cache holds.

Method (as in the anchors): servers pinned to --server-cpu, dnsperf to --client-cpu; --rounds
interleaved rounds, each running every server back to back on each load: a saturating run
(dnsperf -c 8 -q 200, --duration s) for queries/s and CPU per query, then a fixed-rate run
(-Q --lat-qps, --lat-duration s, -v) for p50/p99. Before that, --sample further hostile queries
(distinct /24s in no dnsperf file) are sent once to each server by a pipelined Python client with
random IDs: its rate is each server's cold rate from one client; the answers give the region each
server chose (agreement with gdnsd, differences listed with their reason) and the ECS scope of
each answer (its distribution). Also reported: each server's RSS (now and peak), its start-up time (to the first
answer; geomesh-dns: also until its region map is ready and the map's build time from its
metrics, when it has one), and geomesh-dns's cache hit ratio in each run (from its metrics).
Last, a region moves under load: while the Python client sends further hostile queries at
--rebuild-qps, the state file moves the last region to Paris and geomesh-dns gets a SIGHUP; the
bench prints how long until the new map served (and the build's own time), the largest gap
between consecutive answers and the worst latency meanwhile.

Loopback only, every run bounded. Results (raw dnsperf output, summary.json) go to --results.
Run:  .venv/bin/python bench/dns.py            (about 10 minutes)
      .venv/bin/python bench/dns.py --quick --json out.json   (under a minute; tests/bench runs it)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import maxminddb

ROOT = Path(__file__).resolve().parent.parent
# bench/ (first on the path when this runs as a script) holds other benchmarks, e.g. http.py, which
# must not shadow the standard library's modules that prometheus_client and urllib import
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from bench._dns_servers import (  # noqa: E402
    children,
    dnsperf,
    dnsperf_ids,
    free_port,
    map_build,
    ours_flags,
    parse_latency,
    parse_tput,
    rebuild_gap,
    sample_answers,
    scrape_metrics,
    stop,
    tree_cpu,
    tree_rss,
    wait_map,
    wait_ready,
)
from bench._dns_workload import (  # noqa: E402
    GDNSD,
    LOADS,
    NOCACHE,
    OURS,
    draw_subnets,
    draw_uniform,
    explain,
    moved_state,
    scope_summary,
    write_gdnsd,
    write_query_file,
    write_state,
)
from bench._stats import cpu_budget  # noqa: E402
from geodns.nearest import default_database  # noqa: E402

AIM = 0.9  # issue 18: q/s on the hostile load >= 0.9x gdnsd; the floor: a reply-cache hit (no answer built)


# -- main --------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each server once per round and load)")
    ap.add_argument("--duration", type=float, default=10.0, help="saturating run length in s (<= 15)")
    ap.add_argument("--lat-duration", type=float, default=4.0, help="fixed-rate run length in s")
    ap.add_argument("--lat-qps", type=int, default=20000, help="rate of the latency run")
    ap.add_argument("--subnets", type=int, default=1_000_000,
                    help="distinct ECS /24s of the hostile load's saturating file (one query each)")
    ap.add_argument("--hot-subnets", type=int, default=10000, help="distinct ECS /24s of the hot (looped) load")
    ap.add_argument("--sample", type=int, default=200_000,
                    help="further distinct hostile /24s (in no dnsperf file) each server answers once to the "
                         "Python client: its cold rate, the regions chosen, the ECS scopes")
    ap.add_argument("--apps", type=int, default=100, help="app names the queries ask for")
    ap.add_argument("--rebuild-qps", type=int, default=5000,
                    help="rate of the hostile queries sent while a region moves (rebuild time and largest gap)")
    ap.add_argument("--clients", type=int, default=8, help="dnsperf -c")
    ap.add_argument("--outstanding", type=int, default=200, help="dnsperf -q")
    ap.add_argument("--server-cpu", type=int, default=1, help="CPU the DNS servers under test are pinned to")
    ap.add_argument("--client-cpu", type=int, default=0, help="CPU dnsperf is pinned to")
    ap.add_argument("--seed", type=int, default=20240601,
                    help="seed of the query files (which subnets, names and cases), so runs are comparable")
    ap.add_argument("--geoip-db", type=Path, default=None,
                    help="GeoLite2 City .mmdb for both servers (default: the one the maxminddb-geolite2 package ships)")
    ap.add_argument("--ours-args", default="", help="extra geomesh-dns flags, e.g. '--no-batch-io'")
    ap.add_argument("--skip-gdnsd", action="store_true", help="measure geomesh-dns alone (no ratio is printed)")
    ap.add_argument("--skip-nocache", action="store_true", help="leave out geomesh-dns without its reply cache")
    ap.add_argument("--map-timeout", type=float, default=300, help="seconds to wait for geomesh-dns's region map")
    ap.add_argument("--start-together", action="store_true",
                    help="start the servers at once on any CPU and pin them once they serve (start-up times "
                         "are then not comparable)")
    ap.add_argument("--quick", action="store_true",
                    help="a short run: 20,000 hostile /24s, 2,000 hot, one round of 2 s runs at 5,000 q/s, "
                         "servers started together")
    ap.add_argument("--json", type=Path, default=None, help="write the summary there too")
    ap.add_argument("--results", type=Path, default=None, help="directory for raw output (default: a temp dir)")
    return ap


def main() -> int:
    ap = parser()
    args = ap.parse_args()
    if args.quick:
        args.subnets, args.hot_subnets, args.rounds = min(args.subnets, 20000), min(args.hot_subnets, 2000), 1
        args.sample = min(args.sample, 10000)
        args.duration, args.lat_duration, args.lat_qps = 2.0, 2.0, min(args.lat_qps, 5000)
        args.rebuild_qps = min(args.rebuild_qps, 2000)
        args.start_together = True
    if args.duration > 15 or args.lat_duration > 15:
        ap.error("runs are bounded to 15 s")
    if args.subnets < 1 or args.hot_subnets < 1 or args.rounds < 1 or args.sample < 1:
        ap.error("--subnets, --hot-subnets, --sample and --rounds must be at least 1")
    for tool in ("dnsperf", "taskset") + (() if args.skip_gdnsd else ("gdnsd",)):
        if shutil.which(tool) is None:
            print(f"bench/dns.py: {tool} is not installed (scripts/install.sh installs it)", file=sys.stderr)
            return 2
    mmdb = args.geoip_db or default_database()
    if mmdb is None:
        print("bench/dns.py: no GeoLite2 City database", file=sys.stderr)
        return 2
    results = args.results or Path(tempfile.mkdtemp(prefix="geodns-bench-"))
    results.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="geodns-bench-work-"))
    db = maxminddb.open_database(str(mmdb))
    print(f"results -> {results}")
    print(f"load average at start: {Path('/proc/loadavg').read_text().split()[0]} on {os.cpu_count()} CPUs "
          "(other processes on the servers' CPU distort the numbers)")
    meta = db.metadata()
    print(f"geoip: {mmdb.name} {meta.database_type} build {time.strftime('%Y-%m-%d', time.gmtime(meta.build_epoch))}")

    # -- the query files
    t0 = time.monotonic()
    hot = draw_subnets(db, args.hot_subnets, args.seed)
    lat_n = max(1, math.ceil(args.lat_qps * args.lat_duration * 1.1))
    drawn = draw_uniform(db, args.subnets + args.rounds * lat_n + args.sample, args.seed + 1, {n for n, _ in hot})
    hostile, lat_sets = drawn[:args.subnets], [drawn[args.subnets + r * lat_n:args.subnets + (r + 1) * lat_n]
                                               for r in range(args.rounds)]
    sampled = drawn[args.subnets + args.rounds * lat_n:]
    files = {("hostile", "tput"): work / "hostile.bin", ("hot", "tput"): work / "hot.bin"}
    write_query_file(files[("hostile", "tput")], hostile, args.apps, hostile=True, seed=args.seed + 2)
    sample = write_query_file(work / "sample.bin", sampled, args.apps, hostile=True, seed=args.seed + 3)
    for r, subnets in enumerate(lat_sets, 1):
        files[("hostile", f"lat{r}")] = work / f"hostile-lat{r}.bin"
        write_query_file(files[("hostile", f"lat{r}")], subnets, args.apps, hostile=True, seed=args.seed + 10 + r)
    write_query_file(files[("hot", "tput")], hot, args.apps)
    mix: dict[str, int] = {}
    for _, c in hostile:
        mix[c or "?"] = mix.get(c or "?", 0) + 1
    distinct = len({n for n, _ in drawn})
    print(f"hostile load: {len(hostile):,} queries, one per distinct ECS /24, random IDs, 0x20 names, "
          f"continents {dict(sorted(mix.items(), key=lambda kv: -kv[1]))}; {args.rounds} x {lat_n:,} more for the "
          f"fixed-rate runs, {len(sample):,} more for the Python client ({distinct:,} distinct /24s in all)")
    print(f"hot load: {len(hot):,} queries ({len({n for n, _ in hot}):,} distinct /24s, per-continent quota), "
          f"lower case, looped ({time.monotonic() - t0:.1f}s to draw and write)")
    ids = dnsperf_ids(work)
    print("dnsperf query IDs: " + ("sent as in the file (random)" if ids["randomised"] else
          f"replaced by dnsperf's own sequential slot numbers (first seen {ids['first_ids_seen']}); only the "
          "Python client below sends random IDs"))

    nocache_text, nocache_flags = ours_flags(sys.executable)
    servers = [OURS] + ([] if args.skip_nocache else [NOCACHE]) + ([] if args.skip_gdnsd else [GDNSD])
    procs: dict[str, subprocess.Popen] = {}
    ports: dict[str, int] = {}
    info: dict[str, dict[str, object]] = {s: {} for s in servers}
    logs = {OURS: results / "geomesh-dns.log", NOCACHE: results / "geomesh-dns-nocache.log", GDNSD: results / "gdnsd.log"}
    summary: dict[str, object] = {"quick": args.quick, "geoip": {"file": mmdb.name, "type": meta.database_type,
                                                                 "build_epoch": meta.build_epoch}}

    def ready(name: str) -> None:
        """Wait for a server's first answer (and geomesh-dns's region map); note the times."""
        wait_ready(ports[name], procs[name], name)
        info[name]["first_answer_s"] = time.monotonic() - started[name]
        if name != GDNSD:
            metrics = wait_map(logs[name], procs[name], args.map_timeout)
            info[name]["map_ready_s"] = time.monotonic() - started[name]
            info[name].update(map_build(metrics))
        rss, _ = tree_rss(procs[name].pid)
        info[name]["rss_start_mb"] = rss / 1e6
        print(f"{name}: serving on 127.0.0.1:{ports[name]}, first answer after {info[name]['first_answer_s']:.2f} s"
              + (f", region map ready after {info[name]['map_ready_s']:.2f} s" if "map_ready_s" in info[name]
                 else "") + (" " + json.dumps({k: round(v, 3) for k, v in info[name].items()
                                                if k.startswith("build_")}) if name != GDNSD else "")
              + f", RSS {rss / 1e6:.0f} MB" + (" (started together)" if args.start_together else ""))

    try:
        state = work / "state.toml"
        write_state(state, args.apps)
        # started one after the other on the servers' CPU, so that start-up times do not share it;
        # --start-together: all at once on any CPU, each pinned once it serves (quicker, start-up
        # times not comparable)
        pin = [] if args.start_together else ["taskset", "-c", str(args.server_cpu)]
        started: dict[str, float] = {}
        for name in servers:
            ports[name] = free_port()
            if name == GDNSD:
                write_gdnsd(work / "gdnsd", ports[name], mmdb, args.apps)
                cmd = [*pin, "gdnsd", "-c", str(work / "gdnsd"), "start"]
                cwd = None
            else:
                cmd = [*pin, sys.executable, "-m", "geodns.main", "--state",
                       str(state), "--listen", f"127.0.0.1:{ports[name]}", "--geoip-db", str(mmdb),
                       "--metrics-port", "0", *(nocache_flags if name == NOCACHE else []), *args.ours_args.split()]
                cwd = ROOT
            started[name] = time.monotonic()
            procs[name] = subprocess.Popen(cmd, cwd=cwd, stdout=open(logs[name], "w"), stderr=subprocess.STDOUT)
            if not args.start_together:
                ready(name)
        if args.start_together:
            for name in servers:
                ready(name)
                subprocess.run(["taskset", "-a", "-p", "-c", str(args.server_cpu), str(procs[name].pid)],
                               capture_output=True, check=True, timeout=30)
                for child in children(procs[name].pid):
                    subprocess.run(["taskset", "-a", "-p", "-c", str(args.server_cpu), str(child)],
                                   capture_output=True, check=True, timeout=30)
        print(f"{NOCACHE}: {nocache_text}" if NOCACHE in servers else "")

        # the sample of hostile queries (/24s in no dnsperf file) once through the Python client:
        # cold rate, regions, scopes
        answers: dict[str, list[tuple[str | None, int]]] = {}
        for name in servers:
            t = time.monotonic()
            answers[name] = sample_answers(ports[name], sample, args.seed + 3)
            rate = len(sample) / (time.monotonic() - t)
            info[name]["python_pass_qps"] = rate
            print(f"{name}: {len(sample):,} hostile queries once from one pipelined Python client: {rate:,.0f} q/s"
                  " (every query new to it)")
        scopes = {name: scope_summary(a) for name, a in answers.items()}
        unanswered = {name: sum(1 for r, s in a if r is None and s < 0) for name, a in answers.items()}

        rows: list[dict] = []
        cmd_text = (f"taskset -c {args.client_cpu} dnsperf -s 127.0.0.1 -p PORT -B -d FILE -c {args.clients} "
                    f"-q {args.outstanding} -t 2 -l {args.duration:g} [-n 1 on the hostile file]   |   latency: ... "
                    f"-Q {args.lat_qps} -l {args.lat_duration:g} -v")
        print(f"dnsperf: {cmd_text}")
        for r in range(1, args.rounds + 1):
            for load in LOADS:
                for name in servers:
                    pid = procs[name].pid
                    before = scrape_metrics(logs[name]) if name != GDNSD else {}
                    c0, w0 = tree_cpu(pid), time.monotonic()
                    text = dnsperf(args, ports[name], files[(load, "tput")], results / f"{name.replace('/', '-')}."
                                   f"{load}.r{r}.tput.txt", None, args.duration, once=load == "hostile")
                    c1, w1 = tree_cpu(pid), time.monotonic()
                    tput = parse_tput(text)
                    lat_file = files[(load, f"lat{r}")] if load == "hostile" else files[(load, "tput")]
                    lat_out = results / f"{name.replace('/', '-')}.{load}.r{r}.lat.txt"
                    lat_text = dnsperf(args, ports[name], lat_file, lat_out, args.lat_qps, args.lat_duration,
                                       once=load == "hostile")
                    after = scrape_metrics(logs[name]) if name != GDNSD else {}
                    lat = parse_latency(lat_text)
                    lat_out.write_text("\n".join(line for line in lat_text.splitlines() if not line.startswith("> ")))
                    answered = tput["qps"] * tput["run_s"]
                    hits = after.get("geodns_cache_hits_total", 0) - before.get("geodns_cache_hits_total", 0)
                    misses = after.get("geodns_cache_misses_total", 0) - before.get("geodns_cache_misses_total", 0)
                    row = {"load": load, "server": name, "round": r, **tput,
                           "server_cpu_pct": 100 * (c1 - c0) / (w1 - w0),
                           "cpu_us_per_query": 1e6 * (c1 - c0) / answered if answered else float("nan"),
                           "cache_hit_ratio": hits / (hits + misses) if hits + misses else float("nan"),
                           "load1": float(Path("/proc/loadavg").read_text().split()[0]), **lat}
                    rows.append(row)
                    print(f"round {r} {load:7s} {name:20s} qps={tput['qps']:>9,.0f} sent={tput['sent']:>9,} "
                          f"lost={tput['lost_pct']:.2f}% {row['cpu_us_per_query']:.2f} us/query "
                          f"| @{args.lat_qps} p50={lat['p50_ms']:.3f}ms p99={lat['p99_ms']:.3f}ms "
                          f"timeouts={lat['timeouts']}" + (f" | cache hits {100 * row['cache_hit_ratio']:.1f}%"
                                                          if name != GDNSD else "") + f" load={row['load1']:.2f}")
        for name in servers:
            rss, hwm = tree_rss(procs[name].pid)
            info[name]["rss_mb"], info[name]["rss_peak_mb"] = rss / 1e6, hwm / 1e6
        ours_metrics = scrape_metrics(logs[OURS])
        batches, grams = ours_metrics.get("geodns_udp_batches_total", 0), ours_metrics.get("geodns_udp_datagrams_total", 0)

        # agreement of the chosen region, on the hostile sample
        agreement = None
        if GDNSD in answers:
            ours, theirs = answers[OURS], answers[GDNSD]
            same = sum(1 for a, b in zip(ours, theirs, strict=True) if a[0] == b[0])
            agreement = same / len(sample)
            with open(results / "disagreements.txt", "w") as f:
                for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
                    if a[0] != b[0]:
                        net = sampled[i][0]
                        f.write(f"{socket.inet_ntoa(net)}/24 ours={a[0]} gdnsd={b[0]} {explain(db, net, a[0], b[0])}\n")
        # a region moves under load (the state file changes, SIGHUP): how long until the new map
        # serves, and the largest gap between answers meanwhile (gdnsd compiles its map at start:
        # its start-up time is in the table below)
        original = state.read_text()
        moved, moved_region = moved_state(original)
        rebuild = rebuild_gap(ports[OURS], procs[OURS], logs[OURS], state, moved, sample, rate=args.rebuild_qps)
        state.write_text(original)
        rebuild["moved_region"] = moved_region
        nocache_agrees = None
        if NOCACHE in answers:
            nocache_agrees = sum(1 for a, b in zip(answers[OURS], answers[NOCACHE], strict=True) if a == b) / len(sample)

        # -- the summary
        med: dict[str, dict[str, dict[str, float]]] = {}
        for load in LOADS:
            med[load] = {}
            for name in servers:
                mine = [x for x in rows if x["server"] == name and x["load"] == load]
                med[load][name] = {k: statistics.median(x[k] for x in mine) for k in
                                   ("qps", "p50_ms", "p99_ms", "cpu_us_per_query", "lost_pct", "cache_hit_ratio",
                                    "sent")}
                med[load][name]["qps_rounds"] = [x["qps"] for x in mine]
        print()
        print("| load | server | q/s (median) | q/s per round | p50 / p99 ms at "
              f"{args.lat_qps:,} q/s | CPU us/query | cache hits* | sent per run (max) |")
        print("|---|---|---:|---|---|---:|---:|---:|")
        for load in LOADS:
            for name in servers:
                m = med[load][name]
                mine = [x for x in rows if x["server"] == name and x["load"] == load]
                print(f"| {load} | {name} | {m['qps']:,.0f} | {', '.join(format(q, ',.0f') for q in m['qps_rounds'])} | "
                      f"{m['p50_ms']:.3f} / {m['p99_ms']:.3f} | {m['cpu_us_per_query']:.2f} | "
                      + ("-" if math.isnan(m["cache_hit_ratio"]) else f"{100 * m['cache_hit_ratio']:.1f}%")
                      + f" | {max(x['sent'] for x in mine):,} |")
        print("* geomesh-dns's geodns_cache_hits_total / (hits + misses) over the saturating and the fixed-rate "
              "run: answers it did not compute from the view (reply-cache hits and answers assembled from a "
              "template)")
        ratios: dict[str, dict[str, float]] = {}
        if GDNSD in servers:
            for load in LOADS:
                ratios[load] = {}
                for name in servers[:-1]:
                    ratios[load][name] = (med[load][name]["qps"] / med[load][GDNSD]["qps"]
                                          if med[load][GDNSD]["qps"] else 0.0)
                print(f"{load}: q/s ratio to gdnsd " + ", ".join(f"{n} {x:.2f}" for n, x in ratios[load].items()))
            # the aim sits below a floor: a reply-cache hit (the hot row) is the least a query costs this stack
            print(f"floor: {OURS} hostile {med['hostile'][OURS]['cpu_us_per_query']:.2f} us/query, ratio "
                  f"{ratios['hostile'][OURS]:.2f}; its reply-cache hit row (hot), the floor for a Python server on "
                  f"this stack: {med['hot'][OURS]['cpu_us_per_query']:.2f} us/query, ratio {ratios['hot'][OURS]:.2f}")
            budget = cpu_budget(med["hostile"][GDNSD]["cpu_us_per_query"], med["hot"][OURS]["cpu_us_per_query"], AIM)
            summary["budget"] = budget
            print(f"the aim in CPU: {AIM}x gdnsd on the hostile load leaves {budget['allowed_us']:.2f} us of server "
                  f"CPU per query (gdnsd {budget['peer_us']:.2f} / {AIM}); a reply-cache hit alone (no answer "
                  f"built) costs {budget['floor_us']:.2f}, which leaves {budget['headroom_us']:.2f} us to parse, "
                  "place and assemble a cold answer" + (" -- the aim sits below the floor" if budget["headroom_us"] <= 0
                                                        else ""))
        print()
        print("| server | RSS after (peak) | first answer | region map ready | map build | Python pass | "
              "ECS scope: mean, share broader than /24, commonest |")
        print("|---|---|---|---|---|---|---|")
        for name in servers:
            i = info[name]
            build = ", ".join(f"{k[6:-2]} {v:.2f} s" for k, v in i.items() if k.startswith("build_")) or "-"
            sc = scopes[name]
            common = ", ".join(f"/{k} {100 * v:.0f}%" for k, v in sc["top"][:4])
            print(f"| {name} | {i['rss_mb']:.0f} MB ({i['rss_peak_mb']:.0f} MB) | {i['first_answer_s']:.2f} s | "
                  f"{i.get('map_ready_s', float('nan')):.2f} s | {build} | {i['python_pass_qps']:,.0f} q/s | "
                  f"{sc['mean']:.1f}, {100 * sc['broader_than_24']:.1f}%, {common} |")
        if batches:
            print(f"\ngeomesh-dns: {grams / batches:.1f} datagrams per recvmmsg on average "
                  f"({2 * batches / grams:.3f} system calls per query)")
        if agreement is not None:
            print(f"region agreement with gdnsd: {agreement * 100:.3f}% of {len(sample):,} hostile queries "
                  f"({len(sample) - round(agreement * len(sample))} differ; see {results / 'disagreements.txt'})")
            reasons: dict[str, int] = {}
            for line in (results / "disagreements.txt").read_text().splitlines():
                why = "near tie" if "near tie" in line else ("no coordinates" if "no coordinates" in line else "other")
                reasons[why] = reasons.get(why, 0) + 1
            if reasons:
                print(f"differences by reason: {reasons}")
        print(f"rebuild after a region change ({moved_region} moved to Paris, SIGHUP) under {args.rebuild_qps:,} q/s of "
              f"hostile queries: the new map served {rebuild['rebuild_s']:.2f} s after the signal (build "
              f"{rebuild['build_s']:.2f} s in the map builder); largest gap between answers "
              f"{rebuild['largest_gap_ms']:.1f} ms, worst latency {rebuild['worst_latency_ms']:.1f} ms, "
              f"{rebuild['unanswered']} unanswered of {rebuild['queries']:,}")
        if nocache_agrees is not None:
            print(f"{NOCACHE} gives the same region and scope as {OURS} for {100 * nocache_agrees:.3f}% of them")
        if any(unanswered.values()):
            print(f"unanswered in the Python pass: {unanswered}")
        summary.update({"rows": rows, "median": med, "ratios": ratios, "servers": info, "scopes": scopes,
                        "agreement": agreement, "nocache_agreement": nocache_agrees, "unanswered": unanswered,
                        "nocache_flag": nocache_text, "rebuild": rebuild, "dnsperf_ids": ids, "command": cmd_text,
                        "loads": {"hostile": {"queries": len(hostile), "distinct_24s": len({n for n, _ in hostile}),
                                              "latency_queries_per_round": lat_n, "continents": mix,
                                              "sample": len(sample), "distinct_24s_all_files": distinct},
                                  "hot": {"queries": len(hot), "distinct_24s": len({n for n, _ in hot})}},
                        "sample": len(sample)})
        (results / "summary.json").write_text(json.dumps(summary, indent=1))
        if args.json:
            args.json.write_text(json.dumps(summary, indent=1))
    finally:
        for proc in procs.values():
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
