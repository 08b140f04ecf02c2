#!/usr/bin/env python3
"""HTTP/2 benchmark: the gateway's `g` names (per-stream proxying) against HAProxy, one core each.

    .venv/bin/python bench/h2.py [--duration 10] [--rounds 3] [--clients 8] [--streams 16]

What a gRPC app behind the gateway sees: clients speak HTTP/2 over TLS (ALPN h2) to the proxy,
which terminates it and balances every stream round robin over three cleartext HTTP/2 (h2c)
backends. The backends are one nginx process with three `listen ... http2` server blocks on
127.0.0.11-13 (one port: `g` names carry the port), each returning a fixed 100-byte body.

    geomesh   `geomesh-gateway --routes` (--https), app `api`, lb round_robin, name api-<port>g.bench.test:
              the default `--g-mode streams` (HTTP/2 terminated, every stream balanced) and
              `--g-mode tunnel` (each client connection a byte tunnel to one backend)
    HAProxy   `bind ... ssl alpn h2`, `balance roundrobin`, servers `proto h2`, nbthread 1 (it
              balances streams, like the streams mode)

Load: `h2load -c CLIENTS -m STREAMS -D DURATION` (h2load from nghttp2-client; scripts/install.sh
installs it) with `--connect-to` so SNI and :authority carry the `g` name; the proxy pinned to
the server CPU, h2load and nginx to the client CPU; ROUNDS interleaved rounds. Printed per run:
requests/s, mean and max request time, proxy CPU; then the geomesh/HAProxy ratio per round and
its median. No aim is set for it (issue 6 sets one for HTTP/1.1 only); it is here so the cost
of per-stream HTTP/2 in Python is measured, not assumed. Loopback only, every run bounded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository, not from bench/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from bench.http import CLK_TCK, Procs, cpu_ticks, free_port, med, nginx_conf, wait_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ZONE = "bench.test"
HOSTS = ["127.0.0.11", "127.0.0.12", "127.0.0.13"]


def self_signed(directory: Path) -> tuple[Path, Path, Path]:
    """A certificate for *.bench.test: (cert, key, cert+key in one file for HAProxy)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"*.{ZONE}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"*.{ZONE}")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    paths = directory / "zone.pem", directory / "zone.key", directory / "zone-combined.pem"
    paths[0].write_bytes(cert_pem)
    paths[1].write_bytes(key_pem)
    paths[2].write_bytes(cert_pem + key_pem)
    return paths


def haproxy_cfg(port: int, backend_port: int, combined: Path) -> str:
    servers = "\n".join(f"  server s{i + 1} {h}:{backend_port} proto h2" for i, h in enumerate(HOSTS))
    return "\n".join(["global", "  nbthread 1", "  maxconn 8000", "defaults", "  mode http",
                      "  timeout connect 5s", "  timeout client 60s", "  timeout server 60s",
                      "  option http-keep-alive", "  http-reuse always",
                      "listen api", f"  bind 127.0.0.1:{port} ssl crt {combined} alpn h2", "  balance roundrobin",
                      servers]) + "\n"


def gateway_routes(backend_port: int, cert: Path, key: Path) -> str:
    backends = ", ".join(f'"{h}:{backend_port}"' for h in HOSTS)
    return (f'zone = "{ZONE}"\nname = "bench-gw"\n[health]\ncheck = "tcp"\ninterval = 2.0\n'
            f'[[apps]]\nname = "api"\nlb = "round_robin"\nbackends = [{backends}]\n'
            f'[[certificates]]\ncert = "{cert}"\nkey = "{key}"\n')


def run_h2load(pid: int, port: int, name: str, args: argparse.Namespace) -> dict:
    t0, c0 = time.monotonic(), cpu_ticks(pid)
    cmd = ["taskset", "-c", str(args.client_cpu), "h2load", "-t", "1", "-c", str(args.clients),
           "-m", str(args.streams), "-D", str(args.duration), "--warm-up-time", "1",
           f"--connect-to=127.0.0.1:{port}", f"https://{name}/"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 60).stdout
    c1 = cpu_ticks(pid)
    elapsed = time.monotonic() - t0
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    reqs = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                     r"(\d+) errored", out)
    status = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    lat = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", out)
    cpu = (c1[0] - c0[0] + c1[1] - c0[1]) / CLK_TCK
    failed = (int(reqs.group(5)) + int(reqs.group(6))) if reqs else -1
    return {"rps": float(rps.group(1)) if rps else float("nan"),
            "succeeded": int(reqs.group(4)) if reqs else 0, "failed": failed,
            "non_2xx": sum(int(x) for x in status.groups()[1:]) if status else -1,
            "mean": lat.group(3) if lat else "?", "max": lat.group(2) if lat else "?",
            "cpu_pct": 100.0 * cpu / elapsed if elapsed else float("nan"), "raw": out[-2000:]}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=10, help="seconds per h2load run, after 1 s of warm-up (1-15)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default %(default)s)")
    ap.add_argument("--clients", type=int, default=8, help="h2load connections (default %(default)s)")
    ap.add_argument("--streams", type=int, default=16, help="concurrent streams per connection (default %(default)s)")
    ap.add_argument("--server-cpu", type=int, default=1, help="CPU of the proxy under test")
    ap.add_argument("--client-cpu", type=int, default=0, help="CPU of h2load and the nginx backends")
    ap.add_argument("--json", type=Path, help="write the raw runs here")
    return ap


def main() -> int:
    ap = parser()
    args = ap.parse_args()
    if not 1 <= args.duration <= 15:
        ap.error("--duration must be 1..15 seconds")
    for tool in ("h2load", "haproxy", "nginx", "taskset"):
        if shutil.which(tool) is None:
            print(f"bench/h2.py: {tool} is not installed (scripts/install.sh installs it)", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="geomesh-h2-bench-"))
    procs = Procs()
    try:
        cert, key, combined = self_signed(work)
        backend_port = free_port()
        (work / "nginx").mkdir()
        (work / "nginx" / "nginx.conf").write_text(
            nginx_conf(work / "nginx", [f"{h}:{backend_port} http2" for h in HOSTS], "\n  http2_max_requests 1000000;"))
        procs.start(["nginx", "-p", str(work / "nginx"), "-c", str(work / "nginx" / "nginx.conf")], args.client_cpu,
                    work / "nginx.log")
        hp_port, gw_port, tn_port = free_port(), free_port(), free_port()
        (work / "haproxy.cfg").write_text(haproxy_cfg(hp_port, backend_port, combined))
        hp = procs.start(["haproxy", "-db", "-f", str(work / "haproxy.cfg")], args.server_cpu, work / "haproxy.log")
        (work / "routes.toml").write_text(gateway_routes(backend_port, cert, key))
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        gws = {}
        for mode, port in (("streams", gw_port), ("tunnel", tn_port)):
            gws[mode] = procs.start([sys.executable, "-m", "regional_gateway.main", "--routes", str(work / "routes.toml"),
                                     "--https", f"127.0.0.1:{port}", "--http", "127.0.0.1:0", "--g-mode", mode,
                                     "--log-level", "warning", "--metrics-port", "0"], args.server_cpu,
                                    work / f"gateway-{mode}.log", env)
        for p in (hp_port, gw_port, tn_port):
            wait_port(p)
        name = f"api-{backend_port}g.{ZONE}"
        systems = {"haproxy": (hp.pid, hp_port), "geomesh": (gws["streams"].pid, gw_port),
                   "geomesh-tunnel": (gws["tunnel"].pid, tn_port)}
        print(f"# geomesh g names vs HAProxy (HTTP/2 over TLS in, h2c to 3 nginx backends); h2load -c {args.clients} "
              f"-m {args.streams} -D {args.duration}; proxy on CPU {args.server_cpu}, load on CPU {args.client_cpu}")
        runs: dict[str, list[dict]] = {k: [] for k in systems}
        for r in range(1, args.rounds + 1):
            order = list(systems) if r % 2 else list(reversed(systems))
            for k in order:
                res = run_h2load(*systems[k], name, args)
                runs[k].append(res)
                print(f"round {r} {k:<14} {res['rps']:>9,.0f} req/s  succeeded {res['succeeded']:,}  failed "
                      f"{res['failed']}  non-2xx {res['non_2xx']}  mean {res['mean']}  max {res['max']}  "
                      f"proxy CPU {res['cpu_pct']:.0f}%", flush=True)
                if res["succeeded"] == 0 or res["failed"] or res["non_2xx"]:
                    print(f"bench/h2.py: {k} did not serve every request:\n{res['raw']}", file=sys.stderr)
                    return 1
        print()
        summary = {}
        for k in ("geomesh", "geomesh-tunnel"):
            ratios = [g["rps"] / h["rps"] for g, h in zip(runs[k], runs["haproxy"], strict=True)]
            summary[k] = {"rps": med([x["rps"] for x in runs[k]]), "ratios": ratios, "ratio": med(ratios)}
            print(f"{k:<14} {summary[k]['rps']:>9,.0f} req/s vs HAProxy {med([x['rps'] for x in runs['haproxy']]):,.0f}: "
                  f"ratio per round {' '.join(f'{x:.2f}' for x in ratios)} (median {med(ratios):.2f})")
        if args.json:
            args.json.write_text(json.dumps({"runs": {k: [{x: y for x, y in v.items() if x != "raw"} for v in vs]
                                                      for k, vs in runs.items()},
                                             "summary": summary}, indent=1))
        return 0
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
