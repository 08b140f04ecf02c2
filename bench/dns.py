#!/usr/bin/env python3
"""GeoDNS benchmark: geomesh-dns against gdnsd (geoip plugin) with dnsperf, side by side.

Both servers get the same regions (coordinates and one gateway address each), the same apps and
the same GeoLite2 City database (the one of the `maxminddb-geolite2` package, or --geoip-db).
gdnsd uses its geoip plugin with `auto_dc_coords` (nearest datacenter by great-circle distance
from the City location of the ECS subnet); its datacenter list starts with our default region,
which is what both answer for clients the database cannot place.

Load: one dnsperf wire file (`-B`) of --subnets distinct ECS /24 subnets drawn at random from
the database with a quota per continent, each query for one of --apps app names. Method (as in
the anchors): servers pinned to --server-cpu, dnsperf to --client-cpu; --rounds interleaved
rounds, each running every server back to back: a saturating run (dnsperf -c 8 -q 200,
--duration s) for queries/s, then a fixed-rate run (-Q --lat-qps, --lat-duration s, -v) for
latency percentiles. Afterwards every query of the file is sent to both servers and the region
each chose is compared (the agreement rate; the differences are listed with their reason).

Loopback only, every run bounded. Results (raw dnsperf output, summary) go to --results.
Run:  .venv/bin/python bench/dns.py            (about 2 minutes)
      .venv/bin/python bench/dns.py --rounds 1 --duration 5 --lat-duration 3   (quick)
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import maxminddb

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from geodns.nearest import default_database  # noqa: E402
from geomesh.geo import great_circle_km  # noqa: E402

ZONE = "geo.example.com"
# name, latitude, longitude, gateway address (documentation range: answered, never contacted)
REGIONS = [
    ("eu-central", 50.11, 8.68, "192.0.2.13"),  # first: the default region (gdnsd's default order)
    ("us-east", 39.04, -77.49, "192.0.2.10"),
    ("us-west", 37.34, -121.89, "192.0.2.11"),
    ("sa-east", -23.55, -46.63, "192.0.2.12"),
    ("eu-west", 53.35, -6.26, "192.0.2.14"),
    ("af-south", -33.92, 18.42, "192.0.2.15"),
    ("ap-south", 19.08, 72.88, "192.0.2.16"),
    ("ap-southeast", 1.29, 103.85, "192.0.2.17"),
    ("ap-northeast", 35.68, 139.69, "192.0.2.18"),
    ("au-east", -33.87, 151.21, "192.0.2.19"),
]
REGION_OF_IP = {ip: name for name, _, _, ip in REGIONS}
CONTINENT_QUOTA = {"NA": 0.25, "EU": 0.25, "AS": 0.25, "SA": 0.09, "AF": 0.08, "OC": 0.08}


# -- data --------------------------------------------------------------------------------------


def draw_subnets(db: maxminddb.Reader, n: int, seed: int) -> list[tuple[bytes, str]]:
    """n distinct IPv4 /24s the database places, with a quota per continent."""
    rng = random.Random(seed)
    want = {c: max(1, round(n * share)) for c, share in CONTINENT_QUOTA.items()}
    want["NA"] += n - sum(want.values())
    got: dict[str, list[bytes]] = {c: [] for c in want}
    seen: set[bytes] = set()
    tries = 0
    while sum(len(v) for v in got.values()) < n:
        tries += 1
        if tries > 5_000_000:
            raise RuntimeError("could not draw enough subnets from the database")
        net = (rng.getrandbits(24) << 8).to_bytes(4, "big")
        if net in seen or not ipaddress.IPv4Address(net).is_global:
            continue
        rec = db.get(socket.inet_ntoa(net))
        if not isinstance(rec, dict):
            continue
        cont = rec.get("continent", {}).get("code")
        if cont not in got or len(got[cont]) >= want[cont]:
            continue
        seen.add(net)
        got[cont].append(net)
    out = [(net, c) for c, nets in got.items() for net in nets]
    rng.shuffle(out)
    return out


def query_wire(qid: int, qname: str, net: bytes, prefix: int = 24) -> bytes:
    header = struct.pack("!HHHHHH", qid, 0, 1, 0, 0, 1)
    q = b"".join(bytes([len(p)]) + p.encode() for p in qname.split(".")) + b"\0" + struct.pack("!HH", 1, 1)
    addr = net[:(prefix + 7) // 8]
    ecs = struct.pack("!HBB", 1, prefix, 0) + addr
    opt = b"\0" + struct.pack("!HHIH", 41, 1232, 0, 4 + len(ecs)) + struct.pack("!HH", 8, len(ecs)) + ecs
    return header + q + opt


def write_query_file(path: Path, subnets: list[tuple[bytes, str]], apps: int) -> list[bytes]:
    wires = []
    with open(path, "wb") as f:
        for i, (net, _) in enumerate(subnets):
            w = query_wire(i & 0xFFFF, f"app{i % apps}.{ZONE}", net)
            wires.append(w)
            f.write(struct.pack("!H", len(w)) + w)
    return wires


def write_state(path: Path, apps: int) -> None:
    lines = ["[zone]", f'name = "{ZONE}"', 'nameservers = ["ns1=192.0.2.53"]', f'default_region = "{REGIONS[0][0]}"', ""]
    for name, lat, lon, ip in REGIONS:
        lines += ["[[regions]]", f'name = "{name}"', f"latitude = {lat}", f"longitude = {lon}",
                  f'gateways = [{{ name = "gw-{name}", ipv4 = "{ip}" }}]', ""]
    everywhere = ", ".join(f'"{r[0]}"' for r in REGIONS)
    for i in range(apps):
        lines += ["[[apps]]", f'name = "app{i}"', f"regions = [{everywhere}]", ""]
    path.write_text("\n".join(lines))


def write_gdnsd(d: Path, port: int, mmdb: Path, apps: int) -> None:
    (d / "zones").mkdir(parents=True)
    (d / "geoip").mkdir()
    os.symlink(mmdb, d / "geoip" / "GeoLite2-City.mmdb")
    dcs = " ".join(r[0] for r in REGIONS)
    coords = ", ".join(f"{name} => [ {lat}, {lon} ]" for name, lat, lon, _ in REGIONS)
    dcmap = ", ".join(f"{name} => {ip}" for name, _, _, ip in REGIONS)
    (d / "config").write_text(
        f"options => {{ listen => [ 127.0.0.1 ], dns_port => {port}, run_dir => {d}/run,\n"
        f"  state_dir => {d}/state, udp_threads => 1, tcp_threads => 1 }}\n"
        "plugins => { geoip => {\n"
        f"  maps => {{ gwmap => {{ geoip2_db => GeoLite2-City.mmdb, datacenters => [ {dcs} ],\n"
        f"    auto_dc_coords => {{ {coords} }} }} }}\n"
        f"  resources => {{ gw => {{ map => gwmap, service_types => up, dcmap => {{ {dcmap} }} }} }}\n"
        "} }\n")
    zone = ["$TTL 300", "@ SOA ns1 hostmaster 1 7200 1800 259200 30", "@ NS ns1", "ns1 A 192.0.2.53"]
    zone += [f"app{i} 30 DYNA geoip!gw" for i in range(apps)]
    (d / "zones" / ZONE).write_text("\n".join(zone) + "\n")


# -- processes ---------------------------------------------------------------------------------


def free_port() -> int:
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, socket.socket() as t:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            try:
                t.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def ask(port: int, wire: bytes, timeout: float = 1.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(wire, ("127.0.0.1", port))
        try:
            return s.recv(4096)
        except TimeoutError:
            return None


def wait_ready(port: int, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    probe = query_wire(1, f"app0.{ZONE}", socket.inet_aton("193.0.6.0"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if ask(port, probe, 0.3):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not answer on port {port}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its children threads (not child processes)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    total = cpu_seconds(pid)
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return total + sum(tree_cpu(int(c)) for c in children)


# -- measuring ---------------------------------------------------------------------------------


def dnsperf(args: argparse.Namespace, port: int, qfile: Path, out: Path, rate: int | None, duration: float) -> str:
    cmd = ["taskset", "-c", str(args.client_cpu), "dnsperf", "-s", "127.0.0.1", "-p", str(port), "-B",
           "-d", str(qfile), "-c", str(args.clients), "-q", str(args.outstanding), "-t", "2", "-l", str(duration)]
    if rate:
        cmd += ["-Q", str(rate), "-v"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30)
    out.write_text(res.stdout + res.stderr)
    return res.stdout + res.stderr


def parse_tput(text: str) -> tuple[float, float]:
    qps = re.search(r"Queries per second:\s+([\d.]+)", text)
    lost = re.search(r"Queries lost:\s+\d+ \(([\d.]+)%\)", text)
    return (float(qps.group(1)) if qps else 0.0, float(lost.group(1)) if lost else 100.0)


def parse_latency(text: str) -> dict[str, float]:
    lat = []
    timeouts = 0
    for line in text.splitlines():
        if not line.startswith("> "):
            continue
        parts = line.split()
        if parts[1] == "T":
            timeouts += 1
            continue
        try:
            lat.append(float(parts[-1]) * 1000.0)
        except ValueError:
            pass
    lat.sort()
    n = len(lat)

    def p(q: float) -> float:
        return lat[min(n - 1, int(q * n))] if n else float("nan")

    return {"n": n, "timeouts": timeouts, "p50_ms": p(0.5), "p99_ms": p(0.99), "p999_ms": p(0.999)}


def regions_answered(port: int, wires: list[bytes], window: int = 100) -> list[str | None]:
    """The region each query's answer points at (pipelined over one socket, IDs = index)."""
    out: list[str | None] = [None] * len(wires)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2.0)
        s.connect(("127.0.0.1", port))
        for start in range(0, len(wires), window):
            batch = range(start, min(len(wires), start + window))
            pending = set()
            for i in batch:
                s.send(struct.pack("!H", i & 0xFFFF) + wires[i][2:])
                pending.add(i & 0xFFFF)
            by_id = {i & 0xFFFF: i for i in batch}
            for attempt in range(3):
                try:
                    while pending:
                        reply = s.recv(4096)
                        qid = struct.unpack_from("!H", reply)[0]
                        if qid in pending:
                            pending.discard(qid)
                            out[by_id[qid]] = first_a(reply)
                except TimeoutError:
                    for qid in pending:
                        s.send(struct.pack("!H", qid) + wires[by_id[qid]][2:])
                    if attempt == 2:
                        break
    return out


def first_a(reply: bytes) -> str | None:
    """The region of the first A record of a reply (a minimal parser for our known shape)."""
    an = struct.unpack_from("!H", reply, 6)[0]
    i = 12
    while reply[i]:
        i += 1 + reply[i]
    i += 5
    for _ in range(an):
        if reply[i] & 0xC0 == 0xC0:
            i += 2
        else:
            while reply[i]:
                i += 1 + reply[i]
            i += 1
        rtype, _, _, rdlen = struct.unpack_from("!HHIH", reply, i)
        i += 10
        if rtype == 1 and rdlen == 4:
            return REGION_OF_IP.get(socket.inet_ntoa(reply[i:i + 4]), "?")
        i += rdlen
    return None


def scrape_metrics(log: Path) -> dict[str, float]:
    """geomesh-dns's unlabelled metrics, from the metrics address it logged."""
    # bench/ holds other benchmarks (http.py) that must not shadow the standard library's http
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    import urllib.request

    for line in log.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("msg") == "metrics":
            with urllib.request.urlopen(f"http://{rec['address']}/metrics", timeout=5) as resp:
                text = resp.read().decode()
            out = {}
            for row in text.splitlines():
                parts = row.split()
                if len(parts) == 2 and not row.startswith("#") and "{" not in parts[0]:
                    out[parts[0]] = float(parts[1])
            return out
    return {}


def explain(db: maxminddb.Reader, net: bytes, ours: str | None, theirs: str | None) -> str:
    rec = db.get(socket.inet_ntoa(net))
    loc = rec.get("location") if isinstance(rec, dict) else None
    if not loc or "latitude" not in loc:
        return "no coordinates in the database"
    lat, lon = loc["latitude"], loc["longitude"]
    coords = {name: (la, lo) for name, la, lo, _ in REGIONS}
    if ours in coords and theirs in coords:
        d1 = great_circle_km(lat, lon, *coords[ours])
        d2 = great_circle_km(lat, lon, *coords[theirs])
        return f"location {lat},{lon}: {ours} {d1:.1f} km vs {theirs} {d2:.1f} km (near tie)" if abs(d1 - d2) < 50 \
            else f"location {lat},{lon}: {ours} {d1:.1f} km vs {theirs} {d2:.1f} km"
    return f"location {lat},{lon}"


# -- main --------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each server once per round)")
    ap.add_argument("--duration", type=float, default=10.0, help="saturating run length in s (<= 15)")
    ap.add_argument("--lat-duration", type=float, default=4.0, help="fixed-rate run length in s")
    ap.add_argument("--lat-qps", type=int, default=20000, help="rate of the latency run")
    ap.add_argument("--subnets", type=int, default=10000, help="distinct ECS /24s in the query file")
    ap.add_argument("--apps", type=int, default=100, help="app names the queries ask for")
    ap.add_argument("--clients", type=int, default=8, help="dnsperf -c")
    ap.add_argument("--outstanding", type=int, default=200, help="dnsperf -q")
    ap.add_argument("--server-cpu", type=int, default=1, help="CPU the DNS server under test is pinned to")
    ap.add_argument("--client-cpu", type=int, default=0, help="CPU dnsperf is pinned to")
    ap.add_argument("--seed", type=int, default=20240601,
                    help="seed of the query file (which subnets and names), so runs are comparable")
    ap.add_argument("--geoip-db", type=Path, default=None,
                    help="GeoLite2 City .mmdb for both servers (default: the one the maxminddb-geolite2 package ships)")
    ap.add_argument("--ours-args", default="", help="extra geomesh-dns flags, e.g. '--no-batch-io'")
    ap.add_argument("--skip-gdnsd", action="store_true", help="measure geomesh-dns alone (no ratio is printed)")
    ap.add_argument("--results", type=Path, default=None, help="directory for raw output (default: a temp dir)")
    return ap


def main() -> int:
    ap = parser()
    args = ap.parse_args()
    if args.duration > 15 or args.lat_duration > 15:
        ap.error("runs are bounded to 15 s")
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
          "(other processes on the server's CPU distort the numbers)")
    print(f"geoip: {mmdb.name} {db.metadata().database_type} build {db.metadata().build_epoch}")

    t0 = time.monotonic()
    subnets = draw_subnets(db, args.subnets, args.seed)
    qfile = work / "queries.bin"
    wires = write_query_file(qfile, subnets, args.apps)
    counts: dict[str, int] = {}
    for _, c in subnets:
        counts[c] = counts.get(c, 0) + 1
    print(f"query file: {len(wires)} queries, {len({n for n, _ in subnets})} distinct ECS /24s, "
          f"continents {dict(sorted(counts.items()))} ({time.monotonic() - t0:.1f}s)")

    procs: dict[str, subprocess.Popen] = {}
    ports: dict[str, int] = {}
    try:
        state = work / "state.toml"
        write_state(state, args.apps)
        ports["geomesh-dns"] = free_port()
        cmd = ["taskset", "-c", str(args.server_cpu), sys.executable, "-m", "geodns.main", "--state", str(state),
               "--listen", f"127.0.0.1:{ports['geomesh-dns']}", "--geoip-db", str(mmdb), "--metrics-port", "0",
               *args.ours_args.split()]
        procs["geomesh-dns"] = subprocess.Popen(cmd, cwd=ROOT, stdout=open(results / "geomesh-dns.log", "w"),
                                                stderr=subprocess.STDOUT)
        if not args.skip_gdnsd:
            ports["gdnsd"] = free_port()
            write_gdnsd(work / "gdnsd", ports["gdnsd"], mmdb, args.apps)
            procs["gdnsd"] = subprocess.Popen(["taskset", "-c", str(args.server_cpu), "gdnsd", "-c",
                                               str(work / "gdnsd"), "start"],
                                              stdout=open(results / "gdnsd.log", "w"), stderr=subprocess.STDOUT)
        for name, proc in procs.items():
            wait_ready(ports[name], proc, name)
        print("servers: " + ", ".join(f"{n} on 127.0.0.1:{p}" for n, p in ports.items()))

        # cold pass: every distinct query once (all cache misses for us)
        t = time.monotonic()
        regions_answered(ports["geomesh-dns"], wires)
        cold = len(wires) / (time.monotonic() - t)
        print(f"geomesh-dns cold pass (every query a cache miss, one pipelined client): {cold:,.0f} q/s")

        rows: list[dict] = []
        cmd_text = (f"taskset -c {args.client_cpu} dnsperf -s 127.0.0.1 -p PORT -B -d queries.bin -c {args.clients} "
                    f"-q {args.outstanding} -t 2 -l {args.duration:g}   |   latency: ... -Q {args.lat_qps} "
                    f"-l {args.lat_duration:g} -v")
        print(f"dnsperf: {cmd_text}")
        for r in range(1, args.rounds + 1):
            for name in procs:
                pid = procs[name].pid
                c0, w0 = tree_cpu(pid), time.monotonic()
                text = dnsperf(args, ports[name], qfile, results / f"{name}.r{r}.tput.txt", None, args.duration)
                c1, w1 = tree_cpu(pid), time.monotonic()
                qps, lost = parse_tput(text)
                lat_text = dnsperf(args, ports[name], qfile, results / f"{name}.r{r}.lat.txt", args.lat_qps,
                                   args.lat_duration)
                lat = parse_latency(lat_text)
                (results / f"{name}.r{r}.lat.txt").write_text(
                    "\n".join(line for line in lat_text.splitlines() if not line.startswith("> ")))
                load1 = float(Path("/proc/loadavg").read_text().split()[0])
                run_time = re.search(r"Run time \(s\):\s+([\d.]+)", text)
                answered = qps * float(run_time.group(1)) if run_time else 0.0
                row = {"server": name, "round": r, "qps": qps, "lost_pct": lost,
                       "server_cpu_pct": 100 * (c1 - c0) / (w1 - w0), "load1": load1,
                       "cpu_us_per_query": 1e6 * (c1 - c0) / answered if answered else float("nan"), **lat}
                rows.append(row)
                print(f"round {r} {name:12s} qps={qps:>10,.0f} lost={lost:.2f}% srvCPU={row['server_cpu_pct']:.0f}% "
                      f"({row['cpu_us_per_query']:.2f} us/query) "
                      f"| @{args.lat_qps}qps p50={lat['p50_ms']:.3f}ms p99={lat['p99_ms']:.3f}ms "
                      f"timeouts={lat['timeouts']} load={load1:.2f}")

        ours_metrics = scrape_metrics(results / "geomesh-dns.log")
        if ours_metrics:
            batches, grams = ours_metrics.get("geodns_udp_batches_total", 0), ours_metrics.get("geodns_udp_datagrams_total", 0)
            if batches:
                print(f"geomesh-dns: {grams / batches:.1f} datagrams per recvmmsg on average "
                      f"({2 * batches / grams:.3f} system calls per query), cache hit ratio "
                      f"{ours_metrics.get('geodns_cache_hit_ratio', 0):.4f}")

        # agreement of the chosen region
        agreement = None
        if "gdnsd" in procs:
            ours = regions_answered(ports["geomesh-dns"], wires)
            theirs = regions_answered(ports["gdnsd"], wires)
            same = sum(1 for a, b in zip(ours, theirs, strict=True) if a == b)
            agreement = same / len(wires)
            diffs = [(subnets[i][0], a, b) for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b]
            with open(results / "disagreements.txt", "w") as f:
                for net, a, b in diffs:
                    f.write(f"{socket.inet_ntoa(net)}/24 ours={a} gdnsd={b} {explain(db, net, a, b)}\n")

        print()
        print("| server | qps (median) | p99 ms (median) | qps per round | lost % | server CPU % | CPU us/query |")
        print("|---|---|---|---|---|---|---|")
        med: dict[str, dict[str, float]] = {}
        for name in procs:
            mine = [row for row in rows if row["server"] == name]
            med[name] = {"qps": statistics.median(x["qps"] for x in mine),
                         "p99": statistics.median(x["p99_ms"] for x in mine)}
            per_round_qps = ", ".join(format(x["qps"], ",.0f") for x in mine)
            print(f"| {name} | {med[name]['qps']:,.0f} | {med[name]['p99']:.3f} | {per_round_qps} | "
                  f"{max(x['lost_pct'] for x in mine):.2f} | "
                  f"{statistics.median(x['server_cpu_pct'] for x in mine):.0f} | "
                  f"{statistics.median(x['cpu_us_per_query'] for x in mine):.2f} |")
        if "gdnsd" in med:
            per_round = [a["qps"] / b["qps"] for a, b in zip(
                [x for x in rows if x["server"] == "geomesh-dns"], [x for x in rows if x["server"] == "gdnsd"],
                strict=True) if b["qps"]]
            ratio = med["geomesh-dns"]["qps"] / med["gdnsd"]["qps"] if med["gdnsd"]["qps"] else 0.0
            print(f"\nqps ratio geomesh-dns/gdnsd: {ratio:.2f} (median of medians; per round "
                  f"{', '.join(f'{x:.2f}' for x in per_round)})")
            print(f"p99 geomesh-dns {med['geomesh-dns']['p99']:.3f} ms vs gdnsd {med['gdnsd']['p99']:.3f} ms "
                  f"at {args.lat_qps} q/s")
        if agreement is not None:
            print(f"region agreement with gdnsd: {agreement * 100:.2f}% of {len(wires)} queries "
                  f"({len(wires) - round(agreement * len(wires))} differ; see {results / 'disagreements.txt'})")
            reasons: dict[str, int] = {}
            for line in (results / "disagreements.txt").read_text().splitlines():
                why = "near tie" if "near tie" in line else ("no coordinates" if "no coordinates" in line else "other")
                reasons[why] = reasons.get(why, 0) + 1
            if reasons:
                print(f"differences by reason: {reasons}")
        (results / "summary.json").write_text(json.dumps({"rows": rows, "median": med, "agreement": agreement,
                                                          "command": cmd_text}, indent=1))
    finally:
        for proc in procs.values():
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
