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
import random
import resource
import select
import shutil
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository, not from bench/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.h2 import self_signed  # noqa: E402
from bench.http import CLK_TCK, Procs, cpu_ticks, free_port, nginx_conf, wait_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ZONE = "bench.test"  # the name bench.h2.self_signed certifies (*.bench.test)
ATTACKER = "127.0.0.2"
VICTIM = "127.0.0.1"
TIMEOUT = 2.0
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

@dataclass
class Target:
    """What a scenario runs against: the server's PID and the ports and names to use."""

    pid: int
    http_port: int = 0
    https_port: int = 0
    dns_port: int = 0
    web_host: str = ""
    g_host: str = ""
    ca: str = ""


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
            "--log-level", "warning", "--metrics-port", "0"]
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


# --------------------------------------------------------------------------- the well-behaved clients

class Victim:
    """Sends one request every 1/rate seconds for `duration` seconds; records latency or error."""

    def __init__(self, target: Target, rate: float) -> None:
        self.target = target
        self.rate = rate
        self.latencies: list[float] = []
        self.errors: list[str] = []

    def request(self) -> None:  # one request; raises on failure
        raise NotImplementedError

    def close(self) -> None:
        pass

    def run(self, duration: float) -> None:
        period = 1.0 / self.rate
        start = time.monotonic()
        n = int(duration * self.rate)
        for i in range(n):
            due = start + i * period
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            t0 = time.monotonic()
            try:
                self.request()
                dt = time.monotonic() - t0
                if dt > TIMEOUT:
                    self.errors.append(f"slow {dt:.2f}s")
                self.latencies.append(dt)
            except Exception as exc:  # noqa: BLE001 - every failure is a victim error, named
                self.errors.append(f"{type(exc).__name__}: {exc}"[:120])
                self.close()
        self.close()


class Http1Victim(Victim):
    """Keep-alive HTTP/1.1 GETs on the plain port; a new connection after an error."""

    sock: socket.socket | None = None

    def request(self) -> None:
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.target.http_port), timeout=TIMEOUT,
                                                 source_address=(VICTIM, 0))
        self.sock.sendall(f"GET / HTTP/1.1\r\nHost: {self.target.web_host}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed before the response head")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(body) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed inside the body")
            body += chunk

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class H2Victim(Victim):
    """A new TLS connection with ALPN h2 and one GET per request (handshake included, as a new user)."""

    def request(self) -> None:
        import h2.config
        import h2.connection
        import h2.events

        ctx = ssl.create_default_context(cafile=self.target.ca)
        ctx.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", self.target.https_port), timeout=TIMEOUT,
                                       source_address=(VICTIM, 0))
        with ctx.wrap_socket(raw, server_hostname=self.target.g_host) as s:
            c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            c.initiate_connection()
            c.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":path", "/"),
                               (":authority", self.target.g_host)], end_stream=True)
            s.sendall(c.data_to_send())
            status, done = "", False
            while not done:
                data = s.recv(65536)
                if not data:
                    raise ConnectionError("closed before the response")
                for ev in c.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived):
                        status = dict(ev.headers).get(b":status", b"").decode()
                    elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset):
                        done = True
                s.sendall(c.data_to_send())
            if status != "200":
                raise RuntimeError(f"status {status or 'none'}")


class DnsVictim(Victim):
    """UDP A queries for the app name in 0x20 mixed case with random IDs; NOERROR with an answer."""

    def __init__(self, target: Target, rate: float) -> None:
        super().__init__(target, rate)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((VICTIM, 0))
        self.sock.settimeout(TIMEOUT)

    def request(self) -> None:
        qid = random.getrandbits(16)
        name = "".join(c.upper() if random.random() < 0.5 else c for c in "shop.geo.test")
        wire = struct.pack("!HHHHHH", qid, 0x0000, 1, 0, 0, 0)
        wire += b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
        wire += struct.pack("!HH", 1, 1)
        self.sock.sendto(wire, ("127.0.0.1", self.target.dns_port))
        while True:
            data = self.sock.recv(4096)
            if len(data) >= 12 and struct.unpack("!H", data[:2])[0] == qid:
                break
        flags, _, ancount = struct.unpack("!HHH", data[2:8])
        if flags & 0xF or ancount == 0:
            raise RuntimeError(f"rcode {flags & 0xF}, {ancount} answers")

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- the attackers
# Each runs in its own process until `stop_at` (monotonic) and reports counts through `out`.

def _tls_h2(target: Target, rcvbuf: int | None = None) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=target.ca)
    ctx.set_alpn_protocols(["h2"])
    raw = socket.socket()
    if rcvbuf is not None:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    raw.bind((ATTACKER, 0))
    raw.settimeout(TIMEOUT)
    raw.connect(("127.0.0.1", target.https_port))
    return ctx.wrap_socket(raw, server_hostname=target.g_host)


def _server_closed(s: socket.socket) -> bool:
    """True when the server has sent EOF/RST (or GOAWAY bytes we do not parse; EOF follows)."""
    try:
        r, _, _ = select.select([s], [], [], 0)
        if r:
            return s.recv(65536) == b""
    except (OSError, ssl.SSLError):
        return True
    return False


def attack_rapid_reset(target: Target, stop_at: float, out: dict) -> None:
    import h2.config
    import h2.connection

    sent = closed = 0
    while time.monotonic() < stop_at and sent < 2_000_000:
        try:
            s = _tls_h2(target)
        except OSError:
            time.sleep(0.05)
            continue
        c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, validate_inbound_headers=False))
        c.initiate_connection()
        sid = 1
        try:
            while time.monotonic() < stop_at and sid < 2**31 - 400:
                for _ in range(100):
                    c.send_headers(sid, [(":method", "GET"), (":scheme", "https"), (":path", "/"),
                                         (":authority", target.g_host)])
                    c.reset_stream(sid, 8)
                    sid += 2
                    sent += 1
                s.sendall(c.data_to_send())
                if _server_closed(s):
                    closed += 1
                    break
        except (OSError, ssl.SSLError, Exception):  # noqa: BLE001 - the server ended it: reconnect
            closed += 1
        with contextlib.suppress(OSError):
            s.close()
    out.update(sent=sent, unit="HEADERS+RST pairs", server_closed=closed)


def attack_ping_flood(target: Target, stop_at: float, out: dict) -> None:
    from hyperframe.frame import PingFrame

    blob = PingFrame(0, b"12345678").serialize() * 2000
    sent = closed = 0
    while time.monotonic() < stop_at and sent < 50_000_000:
        try:
            s = _tls_h2(target, rcvbuf=4096)
        except OSError:
            time.sleep(0.05)
            continue
        try:
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\0\0\0\x04\0\0\0\0\0")
            while time.monotonic() < stop_at:
                s.sendall(blob)  # never reads: blocks (up to TIMEOUT) once the server stops reading
                sent += 2000
        except (OSError, ssl.SSLError):
            closed += 1
        with contextlib.suppress(OSError):
            s.close()
    out.update(sent=sent, unit="PING frames", server_closed=closed)


def attack_slowloris(target: Target, stop_at: float, out: dict) -> None:
    head = f"GET / HTTP/1.1\r\nHost: {target.web_host}\r\nX-Pad: {'a' * 200}\r\n\r\n".encode()
    conns: list[list] = []  # [socket, bytes sent]
    opened = closed = 0
    while time.monotonic() < stop_at:
        while len(conns) < 300 and opened < 5000:
            try:
                s = socket.create_connection(("127.0.0.1", target.http_port), timeout=TIMEOUT,
                                             source_address=(ATTACKER, 0))
            except OSError:
                break
            opened += 1
            conns.append([s, 0])
        for pair in list(conns):
            s, n = pair
            try:
                s.sendall(head[n:n + 1])
                pair[1] = (n + 1) % len(head)
                if _server_closed(s):
                    raise ConnectionError
            except OSError:
                closed += 1
                s.close()
                conns.remove(pair)
        time.sleep(1.0)
    for s, _ in conns:
        s.close()
    out.update(sent=opened, unit="connections opened", server_closed=closed)


def attack_fd_exhaustion(target: Target, stop_at: float, out: dict) -> None:
    conns: list[socket.socket] = []
    opened = closed = 0
    while time.monotonic() < stop_at:
        while len(conns) < 600 and opened < 20_000 and time.monotonic() < stop_at:
            try:
                s = socket.socket()
                s.bind((ATTACKER, 0))
                s.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    s.connect(("127.0.0.1", target.https_port))
                conns.append(s)
                opened += 1
            except OSError:
                break
        time.sleep(0.2)
        for s in list(conns):
            if _server_closed(s):
                closed += 1
                s.close()
                conns.remove(s)
    for s in conns:
        s.close()
    out.update(sent=opened, unit="idle connections opened", server_closed=closed)


def attack_dns_tcp(target: Target, stop_at: float, out: dict) -> None:
    hdr = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 5458, 0, 0)
    qn = b"\x04shop\x03geo\x04test\0" + struct.pack("!HH", 1, 1)
    msg = hdr + qn + (b"\0" + struct.pack("!HHIH", 16, 1, 0, 1) + b"\0") * 5458
    batch = (struct.pack("!H", len(msg)) + msg) * 8
    sent = closed = 0
    while time.monotonic() < stop_at and sent < 100_000:
        try:
            s = socket.create_connection(("127.0.0.1", target.dns_port), timeout=TIMEOUT,
                                         source_address=(ATTACKER, 0))
            s.setblocking(False)
        except OSError:
            time.sleep(0.05)
            continue
        try:
            while time.monotonic() < stop_at:
                _, w, _ = select.select([], [s], [], 0.2)
                if w:
                    s.sendall(batch)
                    sent += 8
                with contextlib.suppress(BlockingIOError):
                    if s.recv(1 << 20) == b"":
                        raise ConnectionError
        except (OSError, ConnectionError):
            closed += 1
        s.close()
    out.update(sent=sent, unit="64 KB TCP queries", server_closed=closed)


def attack_dns_cache(target: Target, stop_at: float, out: dict) -> None:
    hdr = struct.pack("!HHHHHH", 0x4242, 0x0000, 1, 0, 0, 1)
    qn = b"\x03geo\x04test\0" + struct.pack("!HH", 6, 1)
    option = struct.pack("!HH", 65001, 4000) + b"\0" * 3992
    opt = b"\0" + struct.pack("!HHIH", 41, 1232, 0, len(option) + 8)
    base = bytearray(hdr + qn + opt + option + b"\0" * 8)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((ATTACKER, 0))
    s.setblocking(False)
    sent = 0
    start, rate = time.monotonic(), out.get("rate", 10_000)
    while time.monotonic() < stop_at and sent < 2_000_000:
        ahead = sent / rate - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)
        for _ in range(100):
            base[-8:] = struct.pack("!Q", sent)
            with contextlib.suppress(BlockingIOError):
                s.sendto(base, ("127.0.0.1", target.dns_port))
                sent += 1
            with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
                while s.recv(65536):
                    pass
    out.update(sent=sent, unit="unique 4 KB queries", server_closed=0)


def _attacker_main(fn: Callable, target: Target, stop_at: float, q: mp.Queue, cpu: int | None,
                   rate: float) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    out: dict = {"rate": rate}
    try:
        fn(target, stop_at, out)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        out["error"] = f"{type(exc).__name__}: {exc}"
    q.put(out)


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
