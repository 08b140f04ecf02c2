"""Hostile HTTP/2 clients on `g` names: rapid reset, no-op frame floods, clients that do not
read, and malformed requests that an HTTP/2 -> HTTP/1 downgrade behind the gateway would turn
into smuggling. The gateway runs in-process (real TLS listener on 127.0.0.1 port 0) in front of
`RecordingBackend`, a cleartext HTTP/2 server that records every stream it sees, so each test
can assert what reached the backend, not only what the attacker got back.

Attackers connect from 127.0.0.2 and everyone else from 127.0.0.1: an attacker whose
connection got GOAWAY (ENHANCE_YOUR_CALM) goes into the penalty box, and its reconnections are
refused at accept for a cool-down while other clients are served.

The rules themselves (`h2_guard`) have table tests in `test_h2_guard_rules.py`.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import pytest
from hyperframe.frame import DataFrame, PingFrame, PriorityFrame, SettingsFrame, WindowUpdateFrame

from tests.proxy.certs import TestCA

ZONE = "apps.test"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ATTACKER = "127.0.0.2"


@dataclass
class Recorded:
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    ended: bool = False
    reset: bool = False


@dataclass
class RecordingBackend:
    """A cleartext HTTP/2 server (the `h2` library, inbound validation off so it records what the
    gateway really sends) answering each complete request `200 ok`."""

    streams: list[Recorded] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.closed = False
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def snapshot(self) -> tuple[int, int, int]:
        """(streams opened, streams reset by the gateway, complete requests)."""
        with self.lock:
            return (len(self.streams), sum(s.reset for s in self.streams), sum(s.ended for s in self.streams))

    def _accept(self) -> None:
        while not self.closed:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_inbound_headers=False))
        conn.initiate_connection()
        mine: dict[int, Recorded] = {}
        try:
            c.sendall(conn.data_to_send())
            while data := c.recv(65536):
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        rec = mine[ev.stream_id] = Recorded(ev.headers)
                        with self.lock:
                            self.streams.append(rec)
                    elif isinstance(ev, h2.events.DataReceived):
                        mine[ev.stream_id].body += ev.data
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, h2.events.StreamReset) and ev.stream_id in mine:
                        mine[ev.stream_id].reset = True
                    if getattr(ev, "stream_ended", None) is not None or isinstance(ev, h2.events.StreamEnded):
                        rec = mine[ev.stream_id]
                        if not rec.ended:
                            rec.ended = True
                            conn.send_headers(ev.stream_id, [(b":status", b"200")])
                            conn.send_data(ev.stream_id, b"ok", end_stream=True)
                c.sendall(conn.data_to_send())
        except (OSError, h2.exceptions.ProtocolError):
            pass
        finally:
            c.close()

    def close(self) -> None:
        self.closed = True
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def ca(tmp_path):
    return TestCA(tmp_path)


@pytest.fixture
def backend():
    b = RecordingBackend()
    yield b
    b.close()


@pytest.fixture
def front(ca, backend, gateway):
    """A gateway whose app `api` is the recording backend: (gateway, the `g` name)."""
    def make(**settings):
        cert, key = ca.issue("zone", [f"*.{ZONE}", ZONE])
        routes = {"zone": ZONE, "health": {"check": "none"},
                  "apps": [{"name": "api", "backends": [backend.address]}],
                  "certificates": [{"cert": str(cert), "key": str(key)}]}
        g = gateway(routes, http=(), https=("127.0.0.1:0",), **settings)
        return g, f"api-{backend.port}g.{ZONE}"
    return make


def tls(g, ca: TestCA, name: str, rcvbuf: int = 0, source: str = "127.0.0.1") -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(ca.path))
    ctx.set_alpn_protocols(["h2"])
    raw = socket.socket()
    if rcvbuf:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    raw.bind((source, 0))
    raw.settimeout(5)
    raw.connect(g.https)
    s = ctx.wrap_socket(raw, server_hostname=name)
    assert s.selected_alpn_protocol() == "h2"
    return s


def client() -> h2.connection.H2Connection:
    """A client that sends what it is told (no outbound validation or normalisation)."""
    c = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_outbound_headers=False,
        normalize_outbound_headers=False, validate_inbound_headers=False))
    c.initiate_connection()
    return c


def request_headers(name: str, path: bytes = b"/", method: bytes = b"GET") -> list[tuple[bytes, bytes]]:
    return [(b":method", method), (b":scheme", b"https"), (b":path", path), (b":authority", name.encode())]


def fresh_get(g, ca: TestCA, name: str, source: str = "127.0.0.1") -> tuple[bytes, float]:
    """A new connection and one GET: (status, seconds it took)."""
    t0 = time.monotonic()
    c = client()
    with tls(g, ca, name, source=source) as s:
        c.send_headers(1, request_headers(name), end_stream=True)
        s.sendall(c.data_to_send())
        status = b""
        while True:
            data = s.recv(65536)
            assert data, "connection closed before the response"
            for ev in c.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = dict(ev.headers)[b":status"]
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                    return status, time.monotonic() - t0
            s.sendall(c.data_to_send())


def goaway_of(c: h2.connection.H2Connection, s: ssl.SSLSocket, timeout: float = 3.0) -> GoAway | None:
    """Read until a GOAWAY, the end of the connection (None) or `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = s.recv(65536)
        except (TimeoutError, OSError):
            return None
        if not data:
            return None
        try:
            events = c.receive_data(data)
        except h2.exceptions.ProtocolError:
            return None
        for ev in events:
            if isinstance(ev, h2.events.ConnectionTerminated):
                return GoAway(ev.error_code, ev.last_stream_id)
    return None


@dataclass
class GoAway:
    code: int
    last_stream_id: int


def wait_ping_ack(c: h2.connection.H2Connection, s: ssl.SSLSocket) -> GoAway | None:
    """Read until the ACK of our last PING (None) or a GOAWAY."""
    while True:
        data = s.recv(65536)
        if not data:
            return GoAway(-1, 0)
        acked = False
        for ev in c.receive_data(data):
            if isinstance(ev, h2.events.ConnectionTerminated):
                return GoAway(ev.error_code, ev.last_stream_id)
            acked = acked or isinstance(ev, h2.events.PingAckReceived)
        if acked:
            return None


def errors(g) -> dict[str, int]:
    return g.run(lambda: dict(g.server.metrics.errors))


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


# ------------------------------------------------------------------------------- rapid reset


@pytest.mark.parametrize("max_resets", [None, 10**6], ids=["default-budget", "budget-off"])
def test_rapid_reset_costs_the_backend_nothing_and_ends_in_goaway(front, backend, ca, max_resets):
    g, name = front(**({} if max_resets is None else {"h2_max_resets": max_resets}))
    c = client()
    goaway, batches, during = None, 0, None
    with tls(g, ca, name, source=ATTACKER) as s:
        sid = 1
        try:
            while goaway is None and batches < (200 if max_resets is None else 50):  # <= 20,000 pairs
                for _ in range(100):
                    c.send_headers(sid, request_headers(name))
                    c.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
                    sid += 2
                c.ping(batches.to_bytes(8, "big"))  # in step with the gateway: the batch, then its PING ACK
                s.sendall(c.data_to_send())
                batches += 1
                if batches == 3:  # another client, while the attack runs
                    during = fresh_get(g, ca, name)
                goaway = wait_ping_ack(c, s)
        except OSError:
            pass
        if goaway is None and max_resets is None:
            goaway = goaway_of(c, s)
    assert during is not None and during[0] == b"200" and during[1] < 2.0
    opened, _, _ = backend.snapshot()
    assert opened <= 1 + 20  # the fresh client's stream, and at most one per read boundary
    if max_resets is None:
        assert goaway is not None and goaway.code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        assert batches <= 11  # the default budget is 1,000 resets
        assert goaway.last_stream_id < 2 * 1100
        assert errors(g)["h2-rapid-reset"] == 1
    status, took = fresh_get(g, ca, name)
    assert status == b"200" and took < 2.0


def test_a_client_that_cancels_some_calls_is_not_cut(front, backend, ca):
    """Resets of calls between completed calls: each completed call earns a reset back."""
    g, name = front(h2_max_resets=20)
    c = client()
    with tls(g, ca, name) as s:
        sid, done = 1, 0
        for i in range(60):
            c.send_headers(sid, request_headers(name))
            c.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            c.send_headers(sid + 2, request_headers(name), end_stream=True)
            s.sendall(c.data_to_send())
            target = sid + 2
            sid += 4
            ended = False
            while not ended:
                data = s.recv(65536)
                assert data, f"connection closed after {i} rounds"
                for ev in c.receive_data(data):
                    assert not isinstance(ev, h2.events.ConnectionTerminated), f"GOAWAY after {i} rounds"
                    if isinstance(ev, h2.events.StreamEnded) and ev.stream_id == target:
                        ended = True
                s.sendall(c.data_to_send())
            done += 1
    assert done == 60 and "h2-rapid-reset" not in errors(g)
    assert g.run(lambda: len(g.server.admission.penalty)) == 0  # never penalised...
    assert fresh_get(g, ca, name)[0] == b"200"  # ...and welcome back at once


def test_a_grpc_like_client_cancelling_calls_on_many_connections_is_never_penalised(front, backend, ca):
    """Default budgets; a client that cancels a third of its calls (deadlines, hedging), on
    connection after connection, streams in flight together: no GOAWAY, never in the box."""
    g, name = front()
    for _ in range(5):
        c = client()
        with tls(g, ca, name) as s:
            sid = 1
            for _ in range(20):
                wanted = []
                for k in range(30):  # 30 calls at once, every third cancelled right away
                    c.send_headers(sid, request_headers(name), end_stream=k % 3 != 0)
                    if k % 3 == 0:
                        c.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
                    else:
                        wanted.append(sid)
                    sid += 2
                s.sendall(c.data_to_send())
                ended: set[int] = set()
                while len(ended) < len(wanted):
                    data = s.recv(65536)
                    assert data, "connection closed"
                    for ev in c.receive_data(data):
                        assert not isinstance(ev, h2.events.ConnectionTerminated), "GOAWAY"
                        if isinstance(ev, h2.events.StreamEnded):
                            ended.add(ev.stream_id)
                    s.sendall(c.data_to_send())
    got = errors(g)
    assert not {"h2-rapid-reset", "h2-control-flood", "client-penalised"} & got.keys(), got
    assert g.run(lambda: len(g.server.admission.penalty)) == 0


def test_rapid_reset_puts_its_client_in_the_penalty_box(front, backend, ca):
    """GOAWAY ENHANCE_YOUR_CALM, then the attacker's reconnections are refused at accept (before
    TLS) for the cool-down, while another client is served; then it is served again."""
    cooldown = 2.0
    g, name = front(h2_max_resets=50, penalty_cooldown=cooldown)
    c = client()
    with tls(g, ca, name, source=ATTACKER) as s:
        sid = 1
        for _ in range(100):
            c.send_headers(sid, request_headers(name))
            c.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            sid += 2
        s.sendall(c.data_to_send())
        goaway = goaway_of(c, s)
    t_goaway = time.monotonic()
    assert goaway is not None and goaway.code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    with pytest.raises(OSError):  # ssl.SSLError and resets are OSErrors
        tls(g, ca, name, source=ATTACKER).close()
    assert time.monotonic() - t_goaway < cooldown  # (it was refused within the cool-down)
    assert fresh_get(g, ca, name)[0] == b"200"  # another client is served meanwhile
    refused, served_after = 1, None
    while served_after is None and time.monotonic() - t_goaway < cooldown + 8:
        try:
            assert fresh_get(g, ca, name, source=ATTACKER)[0] == b"200"
            served_after = time.monotonic() - t_goaway
        except OSError:
            refused += 1
            time.sleep(0.1)
    # (the box runs on the gateway's coarse clock, ticked every 0.25 s)
    assert served_after is not None and served_after >= cooldown - 0.5, (served_after, refused)
    got = errors(g)
    assert got["client-penalised"] == refused and got["h2-rapid-reset"] == 1
    assert g.run(lambda: g.server.admission.penalty.offences) == {"h2-rapid-reset": 1}


def test_a_burst_of_tiny_frames_is_fed_in_slices_and_the_loop_stays_responsive(front, backend, ca):
    """10,000 HEADERS+RST_STREAM pairs in one write (budget out of the way): parsed in one
    callback that would hold the gateway's loop for the whole burst; fed at most FEED_FRAMES
    frames per turn, the loop keeps turning (its longest stall is a small part of the burst). The connection works afterwards (the slices cut the
    stream at frame boundaries) and no backend stream was opened for a reset request."""
    g, name = front(h2_max_resets=10**7)
    lags: list[float] = []

    async def probe() -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(0.005)
            lags.append(loop.time() - t - 0.005)

    watcher = asyncio.run_coroutine_threadsafe(probe(), g.loop)
    c = client()
    try:
        with tls(g, ca, name, source=ATTACKER) as s:
            c.ping(b"warm-up!")  # the connection is up on the gateway's side before the burst
            s.sendall(c.data_to_send())
            assert wait_ping_ack(c, s) is None
            sid = 1
            for _ in range(10_000):
                c.send_headers(sid, request_headers(name))
                c.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
                sid += 2
            c.ping(b"burst-ok")
            lags.clear()
            s.settimeout(30)
            sent = time.monotonic()
            s.sendall(c.data_to_send())
            assert wait_ping_ack(c, s) is None  # all of it processed, no GOAWAY
            took = time.monotonic() - sent
            worst = max(lags)
            c.send_headers(sid, request_headers(name), end_stream=True)  # the same connection still works
            s.sendall(c.data_to_send())
            assert _answer_on(c, s, sid) == "status 200"
    finally:
        watcher.cancel()
    # relative, not a timing threshold: fed in one callback, the longest stall is the whole burst;
    # fed in slices, the loop turns many times while the burst is processed
    assert took < 0.05 or worst < took / 2, (
        f"the gateway's loop stalled {worst * 1000:.0f} ms of the burst's {took * 1000:.0f} ms")
    assert backend.snapshot()[0] == 1  # only the last request reached the backend


def _answer_on(c: h2.connection.H2Connection, s: ssl.SSLSocket, sid: int) -> str:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        data = s.recv(65536)
        if not data:
            return "closed"
        for ev in c.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                return f"status {dict(ev.headers)[b':status'].decode()}"
            if isinstance(ev, h2.events.ConnectionTerminated):
                return f"goaway {ev.error_code}"
        s.sendall(c.data_to_send())
    return "nothing"


# ------------------------------------------------------------------ floods and unread replies


FLOODS = {
    "ping": PingFrame(0, b"12345678").serialize(),
    "settings": SettingsFrame(0).serialize(),
    "window-update": WindowUpdateFrame(0, window_increment=1).serialize(),
    "priority": PriorityFrame(1, depends_on=0, stream_weight=16).serialize(),
    "empty-data": DataFrame(1).serialize(),
}


@pytest.mark.parametrize("kind", list(FLOODS))
def test_noop_frame_flood_from_a_client_that_does_not_read_ends_in_goaway(front, ca, kind):
    g, name = front()
    c = client()
    if kind == "empty-data":  # an open stream to send empty DATA frames on
        c.send_headers(1, [*request_headers(name, method=b"POST"), (b"content-type", b"application/grpc")])
    before = rss_kb()
    sent, stopped = 0, False
    with tls(g, ca, name, rcvbuf=4096, source=ATTACKER) as s:
        s.settimeout(1.0)
        s.sendall(c.data_to_send())
        blob = FLOODS[kind] * 2000
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and sent < 3_000_000:
            try:
                s.sendall(blob)
            except OSError:  # reset, or blocked for a second: the gateway stopped reading
                stopped = True
                break
            sent += 2000
        status, took = fresh_get(g, ca, name)  # others are served meanwhile
    assert status == b"200" and took < 2.0
    assert stopped, f"{sent} {kind} frames accepted without end"
    assert rss_kb() - before < 50_000
    got = errors(g)
    assert got.get("h2-control-flood", 0) + got.get("h2-unread-replies", 0) == 1, got


def test_a_client_that_does_not_read_is_not_read(front, ca):
    """With the frame budget out of the way, the gateway still stops reading a client that does
    not read its PING ACKs, and cuts it when ACKs pile up: memory stays bounded."""
    g, name = front(h2_max_control_frames=10**7)
    before = rss_kb()
    with tls(g, ca, name, rcvbuf=4096, source=ATTACKER) as s:
        s.settimeout(1.0)
        s.sendall(client().data_to_send())
        blob = FLOODS["ping"] * 2000
        stopped = False
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                s.sendall(blob)
            except OSError:
                stopped = True
                break
        status, took = fresh_get(g, ca, name)
    assert stopped and status == b"200" and took < 2.0
    assert rss_kb() - before < 50_000
    assert "h2-control-flood" not in errors(g)


# ----------------------------------------------------------- downgrade smuggling (h2 -> h1)


def _answer(c: h2.connection.H2Connection, s: ssl.SSLSocket) -> str:
    """How the gateway answered stream 1: 'status <n>', 'reset <code>' or 'goaway <code>'."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        data = s.recv(65536)
        if not data:
            return "closed"
        for ev in c.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == 1:
                return f"status {dict(ev.headers)[b':status'].decode()}"
            if isinstance(ev, h2.events.StreamReset) and ev.stream_id == 1:
                return f"reset {ev.error_code}"
            if isinstance(ev, h2.events.ConnectionTerminated):
                return f"goaway {ev.error_code}"
        s.sendall(c.data_to_send())
    return "nothing"


PROTOCOL_ERROR = int(h2.errors.ErrorCodes.PROTOCOL_ERROR)
BAD_HEADERS = {
    "cr-in-path": [(b":path", b"/a\rb")],
    "lf-in-path": [(b":path", b"/a\nGET /admin HTTP/1.1")],
    "nul-in-path": [(b":path", b"/a\x00b")],
    "space-in-path": [(b":path", b"/a HTTP/1.1\r\nx: y")],
    "space-in-path-only": [(b":path", b"/a b")],
    "tab-in-method": [(b":method", b"GET\t/x")],
    "cr-in-value": [(b"x-app", b"a\rb")],
    "lf-in-value": [(b"x-app", b"a\r\nhost: evil")],
    "nul-in-value": [(b"x-app", b"a\x00b")],
    "upper-case-name": [(b"X-App", b"1")],
    "connection": [(b"connection", b"close")],
    "keep-alive": [(b"keep-alive", b"timeout=5")],
    "proxy-connection": [(b"proxy-connection", b"keep-alive")],
    "transfer-encoding": [(b"transfer-encoding", b"chunked")],
    "upgrade": [(b"upgrade", b"websocket")],
    "te-gzip": [(b"te", b"gzip")],
}


def _with(name: str, changes: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    headers = dict(request_headers(name, method=b"POST"))
    extra = []
    for k, v in changes:
        if k.startswith(b":"):
            headers[k] = v
        else:
            extra.append((k, v))
    return [*headers.items(), *extra]


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_malformed_request_heads_are_refused_and_never_forwarded(front, backend, ca, case):
    g, name = front()
    c = client()
    c.send_headers(1, _with(name, BAD_HEADERS[case]))
    c.send_data(1, b"body", end_stream=True)
    with tls(g, ca, name) as s:
        s.sendall(c.data_to_send())
        answer = _answer(c, s)
    assert answer in ("status 400", f"reset {PROTOCOL_ERROR}", f"goaway {PROTOCOL_ERROR}"), answer
    assert fresh_get(g, ca, name)[0] == b"200"  # a request sent after it gets through...
    assert backend.snapshot() == (1, 0, 1)  # ...and is the only one the backend saw


@pytest.mark.parametrize("case", ["short", "long", "long-split", "short-split"])
def test_content_length_that_data_does_not_match_never_completes_upstream(front, backend, ca, case):
    g, name = front()
    c = client()
    c.send_headers(1, [*request_headers(name, method=b"POST"), (b"content-length", b"10")])
    first, rest = {"short": (b"12345", b""), "long": (b"1234567890ab", b""),
                   "long-split": (b"1234567890", b"ab"), "short-split": (b"12345", b"67")}[case]
    with tls(g, ca, name) as s:
        if rest:  # the gateway forwards the head and the first part before the rest shows the lie
            c.send_data(1, first)
            s.sendall(c.data_to_send())
            deadline = time.monotonic() + 5
            while backend.snapshot()[0] == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            c.send_data(1, rest, end_stream=True)
        else:
            c.send_data(1, first, end_stream=True)
        s.sendall(c.data_to_send())
        answer = _answer(c, s)
    assert answer in (f"reset {PROTOCOL_ERROR}", f"goaway {PROTOCOL_ERROR}"), answer
    opened, _, complete = backend.snapshot()
    assert complete == 0 and opened == (1 if rest else 0)
    assert fresh_get(g, ca, name)[0] == b"200"


def test_te_trailers_and_a_clean_request_pass(front, backend, ca):
    g, name = front()
    c = client()
    c.send_headers(1, _with(name, [(b"te", b"trailers"), (b"content-length", b"4"), (b"x-app", b"a b")]))
    c.send_data(1, b"body", end_stream=True)
    with tls(g, ca, name) as s:
        s.sendall(c.data_to_send())
        assert _answer(c, s) == "status 200"
    (rec,) = backend.streams
    assert rec.body == b"body" and rec.ended and (b"te", b"trailers") in rec.headers
