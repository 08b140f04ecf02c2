#!/usr/bin/env python3
"""GeoDNS's Python cost per query, without sockets: a low-noise companion to bench/dns.py.

    .venv/bin/python bench/dns_path.py [--queries 100000] [--repeats 3] [--json out.json]

`bench/dns.py` measures the whole server (kernel, batching, dnsperf) and varies with whatever else
the machine runs. This drives the real answer path in-process: a `Responder` with the compiled
region map of the ten regions of `bench/dns.py` and 100 apps, behind the `UdpPipeline` both UDP
transports run (reply cache, answer, stats, fit), fed the bytes of `bench/dns.py`'s hostile load
(distinct ECS /24s, random IDs, 0x20 names; every query new) and a hot load (10,000 of those
queries looped, as bench/dns.py's hot file: reply-cache hits). Three rows: hostile with the reply cache (what a default server
does with resolver traffic), hostile without it (`--no-reply-cache`), and hot (the floor: a
reply-cache hit, the least a query costs in Python); and a fourth, the first hostile queries
after a routing update that moves one app of the hundred (what the feed hands over on a deploy:
the templates of the other names should still serve). Templates are warmed first (the first
queries of each name and ranking go through the full path), so the hostile rows measure the
template path. Prints microseconds per query, best and median of --repeats runs.

CPU-bound and single-threaded: pin it with taskset for steadier numbers. No network at all.
Building the map walks the GeoLite2 database once (about 8 s).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from types import MappingProxyType

if __package__ in (None, ""):  # run as a script: import from the repository, not from bench/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import maxminddb  # noqa: E402

from bench._dns_workload import ZONE, draw_uniform, mixed_case, query_wire, write_state  # noqa: E402
from geodns import static_state  # noqa: E402
from geodns.answer import Responder  # noqa: E402
from geodns.nearest import Locator, default_database  # noqa: E402
from geodns.pipeline import UdpPipeline  # noqa: E402
from geodns.region_map import compile_map, read_networks, sites_of  # noqa: E402
from geodns.view import View  # noqa: E402

APPS = 100
HOT = 10_000  # distinct queries of the hot row, looped (bench/dns.py's hot file has 10,000 /24s)
CLIENT = b"\x7f\0\0\1"


def queries(mmdb: Path, n: int, seed: int) -> list[bytes]:
    """n hostile queries as bench/dns.py writes them: one per distinct /24, random ID, 0x20 name."""
    import random

    rng = random.Random(seed)
    with maxminddb.open_database(str(mmdb)) as db:
        subnets = draw_uniform(db, n, seed, set())
    return [query_wire(rng.getrandbits(16), mixed_case(f"app{i % APPS}.{ZONE}", rng), net)
            for i, (net, _) in enumerate(subnets)]


def moved_view(view: View) -> View:
    """`view` with app0 (1% of the load's names) pinned to one region: a routing update."""
    first = sorted(view.regions)[0]
    apps = dict(view.apps)
    apps["app0"] = dataclasses.replace(apps["app0"], hosting=frozenset({first}), pinned=(first,))
    return dataclasses.replace(view, apps=MappingProxyType(apps))


def measure(reply, batch: list[bytes], repeats: int) -> list[float]:
    runs = []
    for _ in range(repeats):
        gc.collect()
        t = time.perf_counter()
        for q in batch:
            reply(q, 0)
        runs.append((time.perf_counter() - t) / len(batch) * 1e6)
    return runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=100_000, help="hostile queries per timed run (default %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per row; best and median are printed")
    ap.add_argument("--seed", type=int, default=20240601, help="seed of the queries")
    ap.add_argument("--geoip-db", type=Path, default=None, help="GeoLite2 City .mmdb (default: the packaged one)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    args = ap.parse_args()
    if args.queries < 1000 or args.repeats < 1:
        ap.error("--queries must be >= 1000 and --repeats >= 1")
    mmdb = args.geoip_db or default_database()
    if mmdb is None:
        print("bench/dns_path.py: no GeoLite2 City database", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="geodns-path-") as d:
        state = Path(d) / "state.toml"
        write_state(state, APPS)
        view = static_state.view_from(tomllib.loads(state.read_text()), revision=1)
    t0 = time.monotonic()
    rmap = compile_map(read_networks(mmdb), sites_of(view.regions.values()), view.zone.default_region)
    warm = queries(mmdb, 20_000, args.seed + 1)  # other /24s: templates for every name and most rankings
    hostile = queries(mmdb, args.queries * args.repeats, args.seed)
    print(f"# map and {len(hostile) + len(warm):,} queries ready in {time.monotonic() - t0:.1f} s; "
          f"{args.repeats} runs x {args.queries:,} queries per row, in-process, no sockets")
    results: dict[str, list[float]] = {}
    for row, reply_cache in (("hostile", True), ("hostile, no reply cache", False)):
        r = Responder(view, Locator(mmdb), region_map=rmap, reply_cache=reply_cache)
        reply = UdpPipeline(r, r.stats, None, lambda _: CLIENT, max_reply=4096).reply
        for q in warm:
            reply(q, 0)
        chunks = [hostile[i * args.queries:(i + 1) * args.queries] for i in range(args.repeats)]
        runs = []
        for chunk in chunks:  # every query new to the server in every run
            runs += measure(reply, chunk, 1)
        results[row] = runs
        if reply_cache:  # HOT of those queries again (as bench/dns.py's hot file): the second sight is kept
            hot = hostile[:HOT]
            measure(reply, hot, 2)  # first and second sight (the doorkeeper may have forgotten the first)
            before = sum(r.stats.fast)
            loops = max(1, args.queries // HOT)
            results["hot (reply-cache hits)"] = measure(reply, hot * loops, args.repeats)
            if sum(r.stats.fast) - before != args.repeats * len(hot) * loops:
                raise RuntimeError("the hot row was not all answered from the reply cache")
    # the first queries after a routing update that moves one app of the hundred (a new view, as
    # the feed hands over on every update): what is still served from templates, what is rebuilt
    r = Responder(view, Locator(mmdb), region_map=rmap, reply_cache=True)
    reply = UdpPipeline(r, r.stats, None, lambda _: CLIENT, max_reply=4096).reply
    for q in warm:
        reply(q, 0)
    views = [view, moved_view(view)]
    after = queries(mmdb, args.queries * args.repeats, args.seed + 2)
    runs = []
    for i in range(args.repeats):
        r.set_view(dataclasses.replace(views[(i + 1) % 2], revision=view.revision + 1 + i))
        runs += measure(reply, after[i * args.queries:(i + 1) * args.queries], 1)
    results["hostile, after an update"] = runs
    for row, runs in results.items():
        print(f"{row:<26} best {min(runs):6.2f} us/query   median {statistics.median(runs):6.2f}")
    print(f"{'template path over a hit':<26} {min(results['hostile']) - min(results['hot (reply-cache hits)']):6.2f} "
          "us/query (best runs)")
    if args.json:
        args.json.write_text(json.dumps({k: {"best": min(v), "median": statistics.median(v), "runs": v}
                                         for k, v in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
