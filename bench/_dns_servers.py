"""The processes and measurements of the GeoDNS benchmark (bench/dns.py): free loopback ports, a
one-query client, waiting for a server's first answer and stopping it, CPU time and RSS of a
process tree, how this geomesh-dns switches its reply cache off, dnsperf runs and the parse of
their output (throughput, latency, whether it randomises query IDs), the pipelined client that
samples answers, and geomesh-dns's metrics (cache hits, region map readiness and build time).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

from bench._dns_workload import ZONE, parse_answer, query_wire

ROOT = Path(__file__).resolve().parent.parent


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


def rebuild_gap(port: int, proc: subprocess.Popen, log: Path, state: Path, moved: str, wires: list[bytes], *,
                rate: int = 5000, before: float = 1.0, after: float = 1.0, timeout: float = 60.0) -> dict[str, float]:
    """A region moves while queries keep coming: `wires` (distinct queries, one each) are sent at
    `rate` q/s from one socket; `before` s in, `state` gets the `moved` text and the server a
    SIGHUP; sending goes on until the log says a new region map is built, then `after` s more.
    Returns the rebuild time (signal -> "region map built" in the log, and the build's own
    seconds), the largest gap between consecutive answers, the worst answer latency, and the
    queries left unanswered. Bounded by `timeout` and by len(wires)."""
    builds_before = log.read_text(errors="replace").count('"region map built"')
    sent: dict[int, float] = {}
    got: list[tuple[float, float]] = []  # (answer time, latency)
    interval = 1.0 / rate
    signalled = built = 0.0

    def drain(s: socket.socket, n: int) -> None:
        """Take every answer waiting; each is matched to the newest query with its ID (IDs
        repeat every 65,536 queries)."""
        while True:
            try:
                reply = s.recv(4096)
            except BlockingIOError:
                return
            t = time.monotonic()
            k = n - 1 - ((n - 1 - struct.unpack_from("!H", reply)[0]) & 0xFFFF)
            if k in sent:
                got.append((t, t - sent.pop(k)))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("127.0.0.1", port))
        s.setblocking(False)
        start = time.monotonic()
        n = 0
        next_log_check = start
        while n < len(wires):
            now = time.monotonic()
            if now - start > timeout or (built and now - built > after):
                break
            if not signalled and now - start >= before:
                state.write_text(moved)
                proc.send_signal(signal.SIGHUP)
                signalled = time.monotonic()
            if signalled and not built and now >= next_log_check:
                next_log_check = now + 0.005
                if log.read_text(errors="replace").count('"region map built"') > builds_before:
                    built = time.monotonic()
            while n < len(wires) and start + n * interval <= now:
                qid = n & 0xFFFF
                s.send(struct.pack("!H", qid) + wires[n][2:])
                sent[n] = time.monotonic()
                n += 1
            drain(s, n)
            time.sleep(interval / 4)
        deadline = time.monotonic() + 1.0
        while sent and time.monotonic() < deadline:  # the last answers
            drain(s, n)
            time.sleep(0.001)
    times = sorted(t for t, _ in got)
    gap = max((b - a for a, b in zip(times, times[1:], strict=False)), default=float("nan"))
    build_s = float("nan")
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if '"region map built"' in line:
            with contextlib.suppress(ValueError, KeyError):
                build_s = float(json.loads(line)["seconds"])
            break
    return {"rebuild_s": (built - signalled) if built else float("nan"), "build_s": build_s,
            "largest_gap_ms": 1e3 * gap, "worst_latency_ms": 1e3 * max((lat for _, lat in got), default=float("nan")),
            "queries": n, "unanswered": len(sent), "rate": rate}
