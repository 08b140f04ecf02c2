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

Loopback only, every run bounded. Results (raw dnsperf output, summary.json) go to --results.
Run:  .venv/bin/python bench/dns.py            (about 10 minutes)
      .venv/bin/python bench/dns.py --quick --json out.json   (under a minute; tests/bench runs it)
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
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
import threading
import time
from pathlib import Path

import maxminddb

ROOT = Path(__file__).resolve().parent.parent
# bench/ (first on the path when this runs as a script) holds other benchmarks, e.g. http.py, which
# must not shadow the standard library's modules that prometheus_client and urllib import
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
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
OURS, NOCACHE, GDNSD = "geomesh-dns", "geomesh-dns/no-cache", "gdnsd"
LOADS = ("hostile", "hot")
# special-purpose IPv4 blocks: never a client's ECS subnet
_SPECIAL = [(int(n.network_address), int(n.broadcast_address)) for n in map(ipaddress.IPv4Network, (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24",
    "224.0.0.0/3"))]


# -- data --------------------------------------------------------------------------------------


def special(net: int) -> bool:
    return any(lo <= net <= hi for lo, hi in _SPECIAL)


def draw_subnets(db: maxminddb.Reader, n: int, seed: int) -> list[tuple[bytes, str]]:
    """n distinct IPv4 /24s the database places, with a quota per continent (the hot load)."""
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


def draw_uniform(db: maxminddb.Reader, n: int, seed: int, exclude: set[bytes]) -> list[tuple[bytes, str]]:
    """n distinct IPv4 /24s drawn uniformly from the space the database has a record for (not in
    `exclude`), each with its continent code ("" when the record has none)."""
    rng = random.Random(seed)
    seen = set(exclude)
    out: list[tuple[bytes, str]] = []
    budget = 4 * n + 100_000
    while len(out) < n:
        budget -= 1
        if budget < 0:
            raise RuntimeError(f"could not draw {n} distinct /24s from the database")
        value = rng.getrandbits(24) << 8
        net = value.to_bytes(4, "big")
        if net in seen or special(value):
            continue
        rec = db.get(socket.inet_ntoa(net))
        if not isinstance(rec, dict):
            continue
        seen.add(net)
        out.append((net, rec.get("continent", {}).get("code", "")))
    return out


def mixed_case(name: str, rng: random.Random) -> str:
    """0x20: each letter upper or lower case at random."""
    bits = rng.getrandbits(len(name))
    return "".join(c.upper() if bits >> i & 1 else c for i, c in enumerate(name))


def query_wire(qid: int, qname: str, net: bytes, prefix: int = 24) -> bytes:
    header = struct.pack("!HHHHHH", qid, 0, 1, 0, 0, 1)
    q = b"".join(bytes([len(p)]) + p.encode() for p in qname.split(".")) + b"\0" + struct.pack("!HH", 1, 1)
    addr = net[:(prefix + 7) // 8]
    ecs = struct.pack("!HBB", 1, prefix, 0) + addr
    opt = b"\0" + struct.pack("!HHIH", 41, 1232, 0, 4 + len(ecs)) + struct.pack("!HH", 8, len(ecs)) + ecs
    return header + q + opt


def write_query_file(path: Path, subnets: list[tuple[bytes, str]], apps: int, *, hostile: bool = False,
                     seed: int = 0) -> list[bytes]:
    """The dnsperf -B file of one query per subnet; hostile: random IDs and 0x20 names."""
    rng = random.Random(seed)
    wires = []
    with open(path, "wb") as f:
        for i, (net, _) in enumerate(subnets):
            name = f"app{i % apps}.{ZONE}"
            if hostile:
                w = query_wire(rng.getrandbits(16), mixed_case(name, rng), net)
            else:
                w = query_wire(i & 0xFFFF, name, net)
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


def wait_ready(port: int, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    probe = query_wire(1, f"app0.{ZONE}", socket.inet_aton("193.0.6.0"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if ask(port, probe, 0.3):
            return
        time.sleep(0.05)
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


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def tree_cpu(pid: int) -> float:
    return cpu_seconds(pid) + sum(tree_cpu(c) for c in children(pid))


def tree_rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes, summed over a process and its child processes (the server, not
    the `taskset` wrapper: taskset execs, so the pid is the server's)."""
    rss = hwm = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    except OSError:
        pass
    for c in children(pid):
        r, h = tree_rss(c)
        rss, hwm = rss + r, hwm + h
    return rss, hwm


def ours_flags(python: str) -> tuple[str, list[str]]:
    """How this geomesh-dns switches its reply cache off: `--no-reply-cache` when it has the flag,
    else `--cache-size 0` (both caches off)."""
    text = subprocess.run([python, "-m", "geodns.main", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60).stdout
    if "--no-reply-cache" in text:
        return "--no-reply-cache", ["--no-reply-cache"]
    return "--cache-size 0", ["--cache-size", "0"]


# -- measuring ---------------------------------------------------------------------------------


def dnsperf(args: argparse.Namespace, port: int, qfile: Path, out: Path, rate: int | None, duration: float,
            once: bool) -> str:
    cmd = ["taskset", "-c", str(args.client_cpu), "dnsperf", "-s", "127.0.0.1", "-p", str(port), "-B",
           "-d", str(qfile), "-c", str(args.clients), "-q", str(args.outstanding), "-t", "2", "-l", str(duration)]
    if once:
        cmd += ["-n", "1"]  # the file once: no query repeats within the run
    if rate:
        cmd += ["-Q", str(rate), "-v"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30)
    out.write_text(res.stdout + res.stderr)
    return res.stdout + res.stderr


def dnsperf_ids(workdir: Path) -> dict[str, object]:
    """Does dnsperf send the IDs of a -B file? Sends 64 queries with random IDs to a local echo
    socket and compares."""
    rng = random.Random(7)
    sent = [rng.getrandbits(16) for _ in range(64)]
    qfile = workdir / "ids.bin"
    with open(qfile, "wb") as f:
        for i, qid in enumerate(sent):
            w = query_wire(qid, f"app{i}.{ZONE}", socket.inet_aton("193.0.6.0"))
            f.write(struct.pack("!H", len(w)) + w)
    got: list[int] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(0.5)

        def echo() -> None:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and len(got) < len(sent):
                try:
                    data, addr = s.recvfrom(4096)
                except TimeoutError:
                    continue
                got.append(struct.unpack_from("!H", data)[0])
                s.sendto(data[:2] + b"\x80\x00" + data[4:], addr)

        t = threading.Thread(target=echo)
        t.start()
        subprocess.run(["dnsperf", "-s", "127.0.0.1", "-p", str(s.getsockname()[1]), "-B", "-d", str(qfile),
                        "-n", "1", "-c", "1", "-q", "8", "-t", "2"], capture_output=True, timeout=30)
        t.join()
    kept = sum(1 for a, b in zip(sent, got, strict=False) if a == b)
    return {"sent_ids_kept": kept, "of": len(got), "first_ids_seen": got[:8],
            "randomised": len(set(got)) == len(got) and kept == len(got) and len(got) > 0}


def parse_tput(text: str) -> dict[str, float]:
    qps = re.search(r"Queries per second:\s+([\d.]+)", text)
    lost = re.search(r"Queries lost:\s+\d+ \(([\d.]+)%\)", text)
    sent = re.search(r"Queries sent:\s+(\d+)", text)
    run_time = re.search(r"Run time \(s\):\s+([\d.]+)", text)
    return {"qps": float(qps.group(1)) if qps else 0.0, "lost_pct": float(lost.group(1)) if lost else 100.0,
            "sent": int(sent.group(1)) if sent else 0, "run_s": float(run_time.group(1)) if run_time else 0.0}


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


def sample_answers(port: int, wires: list[bytes], seed: int, window: int = 100) -> list[tuple[str | None, int]]:
    """(region of the first A record, ECS scope) of each query's answer, pipelined over one socket
    with random query IDs; (None, -1) for a query that got no answer in three tries."""
    rng = random.Random(seed)
    out: list[tuple[str | None, int]] = [(None, -1)] * len(wires)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2.0)
        s.connect(("127.0.0.1", port))
        for start in range(0, len(wires), window):
            batch = range(start, min(len(wires), start + window))
            by_id = dict(zip(rng.sample(range(65536), len(batch)), batch, strict=True))
            for qid, i in by_id.items():
                s.send(struct.pack("!H", qid) + wires[i][2:])
            pending = set(by_id)
            for attempt in range(3):
                try:
                    while pending:
                        reply = s.recv(4096)
                        qid = struct.unpack_from("!H", reply)[0]
                        if qid in pending:
                            pending.discard(qid)
                            out[by_id[qid]] = parse_answer(reply)
                except TimeoutError:
                    for qid in pending:
                        s.send(struct.pack("!H", qid) + wires[by_id[qid]][2:])
                    if attempt == 2:
                        break
    return out


def _skip_name(msg: bytes, i: int) -> int:
    while True:
        n = msg[i]
        if n & 0xC0 == 0xC0:
            return i + 2
        if n == 0:
            return i + 1
        i += 1 + n


def parse_answer(reply: bytes) -> tuple[str | None, int]:
    """The region of the first A record of a reply and the ECS scope of its OPT (-1: none)."""
    qd, an, ns, ar = struct.unpack_from("!HHHH", reply, 4)
    i = 12
    for _ in range(qd):
        i = _skip_name(reply, i) + 4
    region: str | None = None
    scope = -1
    for k in range(an + ns + ar):
        i = _skip_name(reply, i)
        rtype, _, _, rdlen = struct.unpack_from("!HHIH", reply, i)
        i += 10
        if k < an and region is None and rtype == 1 and rdlen == 4:
            region = REGION_OF_IP.get(socket.inet_ntoa(reply[i:i + 4]), "?")
        if k >= an + ns and rtype == 41:
            j = i
            while j + 4 <= i + rdlen:
                code, olen = struct.unpack_from("!HH", reply, j)
                if code == 8 and olen >= 4:
                    scope = reply[j + 7]
                j += 4 + olen
        i += rdlen
    return region, scope


def scrape_metrics(log: Path) -> dict[str, float]:
    """geomesh-dns's metrics ("name" or "name{labels}" -> value), from the metrics address it logged."""
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
                if row.startswith("#") or not row.strip():
                    continue
                name, _, value = row.rpartition(" ")
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
            return out
    return {}


def wait_map(log: Path, proc: subprocess.Popen, timeout: float) -> dict[str, float]:
    """Metrics once geomesh-dns answers from its region map (`geodns_region_map_ready` >= 1), or at
    once when it has no such metric (a geomesh-dns without the map)."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = scrape_metrics(log)
        if "geodns_region_map_ready" not in metrics or metrics["geodns_region_map_ready"] >= 1:
            return metrics
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"geomesh-dns's region map not ready after {timeout:.0f} s")
        time.sleep(0.2)


def map_build(metrics: dict[str, float]) -> dict[str, float]:
    """The region map's build seconds by stage and size, from geomesh-dns's metrics (empty without)."""
    out = {}
    for key, value in metrics.items():
        m = re.fullmatch(r'geodns_region_map_build_seconds\{stage="(\w+)"\}', key)
        if m:
            out[f"build_{m.group(1)}_s"] = value
    for name in ("bytes", "blocks", "rankings", "rss_bytes"):
        if f"geodns_region_map_{name}" in metrics:
            out[name] = metrics[f"geodns_region_map_{name}"]
    return out


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


def scope_summary(answers: list[tuple[str | None, int]]) -> dict[str, object]:
    """The distribution of ECS scopes: share per scope (descending share), the mean and the share
    of answers broader than /24 (a resolver may reuse them for other clients)."""
    scopes = [s for _, s in answers if s >= 0]
    counts: dict[int, int] = {}
    for s in scopes:
        counts[s] = counts.get(s, 0) + 1
    n = len(scopes)
    return {"answers": n, "counts": {str(k): v for k, v in sorted(counts.items())},
            "mean": statistics.fmean(scopes) if scopes else math.nan,
            "broader_than_24": sum(v for k, v in counts.items() if k < 24) / n if n else math.nan,
            "top": [(k, v / n) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:6]] if n else []}


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
        if nocache_agrees is not None:
            print(f"{NOCACHE} gives the same region and scope as {OURS} for {100 * nocache_agrees:.3f}% of them")
        if any(unanswered.values()):
            print(f"unanswered in the Python pass: {unanswered}")
        summary.update({"rows": rows, "median": med, "ratios": ratios, "servers": info, "scopes": scopes,
                        "agreement": agreement, "nocache_agreement": nocache_agrees, "unanswered": unanswered,
                        "nocache_flag": nocache_text, "dnsperf_ids": ids, "command": cmd_text,
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
