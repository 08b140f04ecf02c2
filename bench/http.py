#!/usr/bin/env python3
"""HTTP benchmark: the geomesh gateway's data plane against HAProxy, on loopback, one core each.

    .venv/bin/python bench/http.py [--duration 10] [--rounds 3] [--conns 64] [--policies rr,lc,hash]

Three nginx backends (one nginx process, three server blocks, each `return 200` with a fixed
100-byte body and an X-Backend header) run pinned to the client CPU with wrk; the proxy under
test runs pinned to the server CPU. Systems, per policy:

    rr    HAProxy `mode http`, `balance roundrobin`          vs  geomesh `round_robin`
    lc    HAProxy `balance leastconn`                        vs  geomesh `least_connections`
    hash  HAProxy `balance source` + `hash-type consistent`  vs  geomesh `ip_hash`

HAProxy 2.6 runs as one process with `nbthread 1`, keep-alive on both sides (`http-reuse
always`); the gateway is `geomesh-gateway --routes` with one app per policy (health checks on,
metrics on, as in production). Load: `wrk -t1 -cCONNS -dDURATIONs --latency`, keep-alive, the
same Host header for both. Before measuring, each system answers 9 one-shot requests (body
checked, backend spread printed). Then ROUNDS interleaved rounds (every system once per round,
back to back, every other round in reverse order), so each ratio compares adjacent runs on a
machine that other work shares and no system always runs first or last.

`--floor` (on by default; `--no-floor` skips it) adds a third system in the round-robin rounds:
`bench/_relay_floor.py`, a uvloop relay that runs httptools over both directions and does
nothing else (no routing, rewriting, pool, health or metrics). Its ratio to HAProxy is the
ceiling for any gateway on this stack (CPython + asyncio Protocols + uvloop + httptools); the
gateway's ratio to the floor is what its own per-request work costs.

Printed: per system and round req/s, p50/p99 latency, proxy CPU %; per policy the median req/s
and p99, the geomesh/HAProxy ratio per round and its median, and requests per proxy-CPU-second
(rate / CPU share) with their ratio, a figure less sensitive to other work on a shared machine. `--json FILE` keeps the raw
numbers. Only loopback is used; every run is bounded by --duration (<= 15 s).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository, not from bench/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench import _perf_split as perf_split  # noqa: E402
from bench._stats import cpu_budget  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BODY = "anchor-benchmark-body-" + "0" * 78  # 100 bytes, as in the anchor scripts
ZONE = "bench.test"
CLK_TCK = os.sysconf("SC_CLK_TCK")
AIM = 0.9  # issue 15: geomesh >= 0.9x HAProxy's req/s
POLICIES = {"rr": ("roundrobin", "round_robin"), "lc": ("leastconn", "least_connections"),
            "hash": ("source\n  hash-type consistent", "ip_hash")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def cpu_ticks(pid: int) -> tuple[int, int]:
    """(user, system) CPU ticks of a process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]), int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0, 0


class Procs:
    """The processes this benchmark started; stopped by PID only."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], cpu: int | None, log: Path, env: dict | None = None) -> subprocess.Popen:
        if cpu is not None:
            argv = ["taskset", "-c", str(cpu), *argv]
        p = subprocess.Popen(argv, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env)  # noqa: SIM115
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def nginx_conf(d: Path, listens: list[str], extra: str = "") -> str:
    """One nginx process, a server block per `listen` value (`b1`, `b2`, ... in X-Backend), each
    answering every request with the fixed 100-byte BODY; `extra`: more `http {}` directives."""
    servers = "\n".join(
        f'  server {{ listen {listen}; default_type text/plain; add_header X-Backend b{i + 1};\n'
        f'    location / {{ return 200 "{BODY}"; }} }}' for i, listen in enumerate(listens))
    return f"""master_process off;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 65;{extra}
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
{servers}
}}
"""


def haproxy_cfg(ports: dict[str, int], backends: list[int]) -> str:
    servers = "\n".join(f"  server s{i + 1} 127.0.0.1:{p}" for i, p in enumerate(backends))
    out = ["global", "  nbthread 1", "  maxconn 8000", "defaults", "  mode http", "  timeout connect 5s",
           "  timeout client 60s", "  timeout server 60s", "  option http-keep-alive", "  http-reuse always"]
    for key, port in ports.items():
        out += [f"listen {key}", f"  bind 127.0.0.1:{port}", f"  balance {POLICIES[key][0]}", servers]
    return "\n".join(out) + "\n"


def gateway_routes(backends: list[int]) -> str:
    out = [f'zone = "{ZONE}"', 'name = "bench-gw"', "[health]", 'check = "tcp"', "interval = 2.0"]
    for key in POLICIES:
        out += ["[[apps]]", f'name = "app-{key}"', f'lb = "{POLICIES[key][1]}"',
                "backends = [" + ", ".join(f'"127.0.0.1:{p}"' for p in backends) + "]"]
    return "\n".join(out) + "\n"


def http_get(port: int, host: str) -> tuple[str, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    backend = re.search(rb"(?im)^x-backend:\s*(\S+)", head)
    return (backend.group(1).decode() if backend else "-"), body.decode(errors="replace")


@dataclass
class System:
    name: str
    policy: str
    port: int
    pid: int
    host: str
    runs: list[dict] = field(default_factory=list)
    perf: dict | None = None  # round 1's profile (--perf): bench/_perf_split.split


def to_ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        return float("nan")
    v, unit = float(m.group(1)), m.group(2)
    return {"us": v / 1000, "ms": v, "s": v * 1000, "m": v * 60000}[unit]


def run_wrk(system: System, args: argparse.Namespace) -> dict:
    t0, c0 = time.monotonic(), cpu_ticks(system.pid)
    cmd = ["taskset", "-c", str(args.client_cpu), "wrk", "-t1", f"-c{args.conns}", f"-d{args.duration}s",
           "--latency", "-H", f"Host: {system.host}", f"http://127.0.0.1:{system.port}/"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 30).stdout
    c1 = cpu_ticks(system.pid)
    elapsed, user, sys_ = time.monotonic() - t0, c1[0] - c0[0], c1[1] - c0[1]
    cpu = user + sys_
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    lat = {q: to_ms(m.group(1)) for q in ("50%", "99%") if (m := re.search(rf"^\s+{q}\s+(\S+)", out, re.M))}
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, sock.groups())) if sock else 0)
    rate = float(rps.group(1)) if rps else float("nan")
    cpu_pct = 100.0 * cpu / CLK_TCK / elapsed if elapsed else float("nan")
    done = rate * elapsed if rate == rate else 0.0
    return {"rps": rate, "p50_ms": lat.get("50%", float("nan")), "p99_ms": lat.get("99%", float("nan")),
            "errors": errors, "cpu_pct": cpu_pct,
            "user_us": 1e6 * user / CLK_TCK / done if done else float("nan"),
            "sys_us": 1e6 * sys_ / CLK_TCK / done if done else float("nan"),
            "rps_per_cpu": rate / (cpu_pct / 100.0) if cpu_pct and cpu_pct == cpu_pct else float("nan")}


def med(values: list[float]) -> float:
    clean = [v for v in values if v == v]
    return statistics.median(clean) if clean else float("nan")


def proxy_budget(haproxy: list[dict], floor: list[dict], geomesh: list[dict], aim: float) -> dict[str, float]:
    """`_stats.cpu_budget` from the runs' CPU per request (user + sys, medians): HAProxy the
    peer, the floor relay (parsing both ways, copying, nothing else) the floor; with the
    gateway's own cost and how far it is over the floor."""
    def us(runs: list[dict]) -> float:
        return med([r["user_us"] + r["sys_us"] for r in runs])
    g = us(geomesh)
    budget = cpu_budget(us(haproxy), us(floor), aim)
    return budget | {"haproxy_us": budget["peer_us"], "geomesh_us": g, "over_floor_us": g - budget["floor_us"]}


# perf's shared-object names, as the table's columns
PERF_COLUMNS = (("libpython", "CPython"), ("parser", "httptools"), ("loop", "uvloop"), ("libc", "libc"),
                ("haproxy", "haproxy"))


def print_perf(systems: list[System]) -> dict[str, dict]:
    """Round 1's CPU per request of each profiled system, split by where perf found it."""
    print("\nwhere the proxy's CPU per request goes (round 1, perf record -g; µs per request = share of the "
          "samples x the run's user + sys CPU per request):")
    print("| system | CPU | kernel | of it: waking the reader (sock_def_readable) | "
          + " | ".join(label for _, label in PERF_COLUMNS) + " | other |")
    print("|---|---:|---:|---:|" + "---:|" * (len(PERF_COLUMNS) + 1))
    out: dict[str, dict] = {}
    for s in systems:
        if s.perf is None or not s.runs:
            continue
        run = s.runs[0]
        cpu = run["user_us"] + run["sys_us"]
        dso: dict[str, float] = s.perf["dso"]  # type: ignore[assignment]
        row = {"cpu_us": cpu, "kernel_us": cpu * dso.get("kernel", 0.0),
               "wakeups_us": cpu * s.perf["wakeups"]}  # type: ignore[operator]
        named = {label: cpu * sum(v for k, v in dso.items() if k.startswith(key)) for key, label in PERF_COLUMNS}
        row |= named
        row["other_us"] = cpu - row["kernel_us"] - sum(named.values())
        out[s.name] = row
        print(f"| {s.name} | {cpu:.1f} | {row['kernel_us']:.1f} | {row['wakeups_us']:.1f} | "
              + " | ".join(f"{named[label]:.1f}" for _, label in PERF_COLUMNS) + f" | {row['other_us']:.1f} |")
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run (1-15)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--conns", type=int, default=64, help="wrk connections")
    ap.add_argument("--policies", default="rr,lc,hash", help="comma list of rr, lc, hash")
    ap.add_argument("--server-cpu", type=int, default=1, help="CPU of the proxy under test")
    ap.add_argument("--client-cpu", type=int, default=0, help="CPU of wrk and the nginx backends")
    ap.add_argument("--json", type=Path, help="write the raw runs here")
    ap.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure bench/_relay_floor.py (the Python+uvloop+httptools ceiling) with rr")
    ap.add_argument("--perf", action="store_true",
                    help="in round 1, record each proxy with `perf record -g` during its run and print where its "
                         "CPU per request goes: each library, the kernel, and the kernel's wake-ups of the peer "
                         "reading the other end (bench/_perf_split.py; needs perf and the right to profile)")
    return ap


def main() -> int:
    ap = parser()
    args = ap.parse_args()
    if not 1 <= args.duration <= 15:
        ap.error("--duration must be 1..15 seconds")
    policies = [p for p in args.policies.split(",") if p]
    for p in policies:
        if p not in POLICIES:
            ap.error(f"unknown policy {p!r} (rr, lc, hash)")
    for tool in ("wrk", "haproxy", "nginx", "taskset"):
        if shutil.which(tool) is None:
            print(f"bench/http.py: {tool} is not installed (scripts/install.sh installs wrk and haproxy; "
                  "nginx: apt-get install nginx-light)", file=sys.stderr)
            return 2
    if args.perf and (why := perf_split.available()) is not None:
        print(f"bench/http.py: --perf: {why}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="geomesh-http-bench-"))
    procs = Procs()
    try:
        backends = [free_port() for _ in range(3)]
        (work / "nginx").mkdir()
        (work / "nginx" / "nginx.conf").write_text(nginx_conf(work / "nginx", [f"127.0.0.1:{p}" for p in backends]))
        procs.start(["nginx", "-p", str(work / "nginx"), "-c", str(work / "nginx" / "nginx.conf")], args.client_cpu,
                    work / "nginx.log")
        for p in backends:
            wait_port(p)
        hp_ports = {k: free_port() for k in policies}
        (work / "haproxy.cfg").write_text(haproxy_cfg(hp_ports, backends))
        hp = procs.start(["haproxy", "-db", "-f", str(work / "haproxy.cfg")], args.server_cpu, work / "haproxy.log")
        gw_port = free_port()
        (work / "routes.toml").write_text(gateway_routes(backends))
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        gw = procs.start([sys.executable, "-m", "regional_gateway.main", "--routes", str(work / "routes.toml"),
                          "--http", f"127.0.0.1:{gw_port}", "--log-level", "warning", "--metrics-port", "0"],
                         args.server_cpu, work / "gateway.log", env)
        floor_port = free_port() if args.floor and "rr" in policies else 0
        if floor_port:
            procs.start([sys.executable, str(ROOT / "bench" / "_relay_floor.py"), str(floor_port),
                         ",".join(map(str, backends))], args.server_cpu, work / "floor.log", env)
        for p in (*hp_ports.values(), gw_port, *([floor_port] if floor_port else [])):
            wait_port(p)
        systems: list[System] = []
        for k in policies:
            systems.append(System(f"haproxy-{k}", k, hp_ports[k], hp.pid, f"app-{k}.{ZONE}"))
            systems.append(System(f"geomesh-{k}", k, gw_port, gw.pid, f"app-{k}.{ZONE}"))
            if k == "rr" and floor_port:
                systems.append(System("floor-rr", k, floor_port, procs.procs[-1].pid, f"app-{k}.{ZONE}"))
        print(f"# geomesh gateway vs HAProxy ({subprocess.run(['haproxy', '-v'], capture_output=True, text=True).stdout.split(chr(10))[0]})")
        print(f"# {os.cpu_count()} CPUs; proxy on CPU {args.server_cpu}; wrk + 3 nginx backends on CPU {args.client_cpu}; "
              f"wrk -t1 -c{args.conns} -d{args.duration}s --latency; 100-byte bodies; keep-alive")
        for s in systems:
            seen = [http_get(s.port, s.host) for _ in range(9)]
            ok = all(body == BODY for _, body in seen)
            spread = " ".join(f"{b}={n}" for b, n in sorted({b: [x for x, _ in seen].count(b) for b, _ in seen}.items()))
            print(f"check {s.name:<14} body={'ok' if ok else 'BAD'}  9 new connections -> {spread}")
            if not ok:
                print(f"bench/http.py: {s.name} answered {seen[0][1][:200]!r}", file=sys.stderr)
                return 1
        for r in range(1, args.rounds + 1):
            # every other round runs in reverse, so no policy (or system) always runs first or last
            for s in (systems if r % 2 else list(reversed(systems))):
                rec = (perf_split.Recording(s.pid, args.duration - 0.5, work / f"perf-{s.name}.data")
                       if args.perf and r == 1 else None)
                res = run_wrk(s, args)
                if rec is not None:
                    s.perf = perf_split.split(rec.path) if rec.wait() else None
                res["round"] = r
                s.runs.append(res)
                print(f"round {r} {s.name:<14} {res['rps']:>10,.0f} req/s  p50 {res['p50_ms']:.2f} ms  "
                      f"p99 {res['p99_ms']:.2f} ms  errors {res['errors']}  proxy CPU {res['cpu_pct']:.0f}% "
                      f"(user {res['user_us']:.1f} + sys {res['sys_us']:.1f} µs/req)", flush=True)
        print()
        print("| policy | HAProxy req/s | HAProxy p99 ms | geomesh req/s | geomesh p99 ms | ratio per round "
              "| ratio (median) | req per proxy-CPU-s HAProxy / geomesh | CPU-normalised ratio |")
        print("|---|---:|---:|---:|---:|---|---:|---:|---:|")
        summary = {}
        for k in policies:
            h, g = (next(s for s in systems if s.name == f"{n}-{k}") for n in ("haproxy", "geomesh"))
            ratios = [gr["rps"] / hr["rps"] for gr, hr in zip(g.runs, h.runs, strict=True) if hr["rps"]]
            row = {"haproxy_rps": med([x["rps"] for x in h.runs]), "haproxy_p99_ms": med([x["p99_ms"] for x in h.runs]),
                   "geomesh_rps": med([x["rps"] for x in g.runs]), "geomesh_p99_ms": med([x["p99_ms"] for x in g.runs]),
                   "ratios": ratios, "ratio": med(ratios),
                   "haproxy_rps_per_cpu": med([x["rps_per_cpu"] for x in h.runs]),
                   "geomesh_rps_per_cpu": med([x["rps_per_cpu"] for x in g.runs])}
            row["cpu_ratio"] = row["geomesh_rps_per_cpu"] / row["haproxy_rps_per_cpu"]
            summary[k] = row
            label = {"rr": "round robin", "lc": "least connections", "hash": "IP hash (consistent)"}[k]
            print(f"| {label} | {row['haproxy_rps']:,.0f} | {row['haproxy_p99_ms']:.2f} | {row['geomesh_rps']:,.0f} | "
                  f"{row['geomesh_p99_ms']:.2f} | {' '.join(f'{x:.2f}' for x in ratios)} | {row['ratio']:.2f} | "
                  f"{row['haproxy_rps_per_cpu']:,.0f} / {row['geomesh_rps_per_cpu']:,.0f} | {row['cpu_ratio']:.2f} |")
        floor = next((s for s in systems if s.name == "floor-rr"), None)
        if floor is not None:
            h, g = (next(s for s in systems if s.name == f"{n}-rr") for n in ("haproxy", "geomesh"))
            f_h = [fr["rps"] / hr["rps"] for fr, hr in zip(floor.runs, h.runs, strict=True) if hr["rps"]]
            g_f = [gr["rps"] / fr["rps"] for gr, fr in zip(g.runs, floor.runs, strict=True) if fr["rps"]]
            summary["floor"] = {"rps": med([x["rps"] for x in floor.runs]), "floor_over_haproxy": med(f_h),
                                "geomesh_over_floor": med(g_f), "ratios": f_h}
            print(f"\nfloor (bench/_relay_floor.py: uvloop + httptools both ways, no gateway work): "
                  f"{summary['floor']['rps']:,.0f} req/s; floor/HAProxy {' '.join(f'{x:.2f}' for x in f_h)} "
                  f"(median {med(f_h):.2f}); geomesh/floor median {med(g_f):.2f}")
            budget = proxy_budget(h.runs, floor.runs, g.runs, AIM)
            summary["budget"] = budget
            print(f"the aim in CPU: {AIM}x HAProxy's rate on one core leaves {budget['allowed_us']:.1f} µs of proxy "
                  f"CPU per request (HAProxy {budget['haproxy_us']:.1f} / {AIM}); the floor spends "
                  f"{budget['floor_us']:.1f}, which leaves {budget['headroom_us']:.1f} µs for everything the gateway "
                  f"does per request; geomesh spends {budget['geomesh_us']:.1f} ({budget['over_floor_us']:.1f} over "
                  "the floor)")
        if args.perf:
            summary["perf"] = print_perf(systems)
        print("\nratio = geomesh/HAProxy req/s in the same round (adjacent runs); the CPU-normalised ratio divides each")
        print("rate by the proxy's CPU share during its run, which discounts time stolen by other work on the machine.")
        if args.json:
            args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                             "systems": {s.name: s.runs for s in systems}, "summary": summary},
                                            indent=2))
        return 0
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
