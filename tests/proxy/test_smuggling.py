"""Request smuggling and hostile HTTP/1.1 clients (SECURITY-PROBE-2026-11 findings 1, 13, 16, 18-21, 24).

Every case goes through a real gateway on loopback to a `RecordingBackend`, which keeps the
bytes it received and parses them with its own strict parser: a refused request must leave it
with nothing at all, an accepted one with exactly the one request expected, byte for byte.
Before each case the gateway holds a pooled connection to the backend, so whatever it decides to
send is written at once (a refusal cannot hide behind a connect still in progress).
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.proxy.backends import Backend, RawListener
from tests.proxy.certs import TestCA
from tests.proxy.client import Conn, Response, get
from tests.proxy.conftest import RunningGateway
from tests.proxy.recording import RecordingBackend, parse_requests

ZONE = "apps.test"
HOST = f"web.{ZONE}"
ADDR = b"X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\nForwarded: for=127.0.0.1;proto=http\r\n"
SMUGGLED = (b"GET /slow?ms=1500 HTTP/1.1\r\nHost: admin.internal\r\nX-Forwarded-For: 6.6.6.6\r\n"
            b"X-Geomesh-Forwarded: gw-forged\r\n\r\n")


def routes(*backends: str, **top) -> dict:
    return {"zone": ZONE, "name": "gw-a", "region": "eu", "health": {"check": "none"}, **top,
            "apps": [{"name": "web", "lb": "round_robin", "backends": list(backends)}],
            "domains": [{"fqdn": "www.shop.example", "app": "web"}]}


class Rig:
    def __init__(self, tmp: Path, *, upgrade_status: int = 200, **settings) -> None:
        self.rec = RecordingBackend("r1", upgrade_status=upgrade_status)
        self.g = RunningGateway(routes(self.rec.address), tmp, settings)

    def warm(self) -> None:
        """A pooled upstream connection, then a clean record."""
        assert get(self.g.http, HOST, "/warm").status == 200
        self.rec.wait_for(1)
        self.rec.reset()

    def send(self, raw: bytes, *, timeout: float = 5.0) -> tuple[Response, bool]:
        """`raw` on a fresh client connection: the response, and whether the gateway closed after it."""
        self.warm()
        with Conn(self.g.http, timeout=timeout) as c:
            c.send_raw(raw)
            resp = c.read_response()
            c.sock.settimeout(0.5)
            try:
                closed = c.closed_by_peer()
            except TimeoutError:
                closed = False
        return resp, closed

    def close(self) -> None:
        self.g.stop()
        self.rec.close()


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    r = Rig(tmp_path_factory.mktemp("smuggling"))
    yield r
    r.close()


def nothing_arrived(rec: RecordingBackend) -> None:
    time.sleep(0.1)  # anything the gateway wrote is on loopback well before this
    assert rec.received() == b"" and rec.requests == [] and rec.errors == []


def exactly(rec: RecordingBackend, raw: bytes, *, raw_too: bool = True) -> None:
    """The backend received exactly the request `raw` and nothing else."""
    want, rest = parse_requests(raw)
    assert len(want) == 1 and rest == b""
    rec.wait_for(1)
    time.sleep(0.05)
    assert rec.errors == []
    assert rec.requests == want
    got, rest = parse_requests(rec.received())
    assert got == want and rest == b""
    if raw_too:
        assert rec.received() == raw


# ---------------------------------------------------------------- Connection naming protected headers

PROTECTED = ["content-length", "transfer-encoding", "host", "x-forwarded-for", "forwarded", "x-forwarded-proto",
             "x-forwarded-host", "x-real-ip", "x-geomesh-forwarded", "x_forwarded_for", "true-client-ip",
             "x-client-ip", "cf-connecting-ip"]


def _attack(connection: str, *, chunked: bool = False) -> bytes:
    head = f"POST /a HTTP/1.1\r\nHost: {HOST}\r\nConnection: {connection}\r\n".encode()
    if chunked:
        return head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
    return head + b"Content-Length: %d\r\n\r\n%s" % (len(SMUGGLED), SMUGGLED)


@pytest.mark.parametrize("name", PROTECTED)
@pytest.mark.parametrize("shape", ["alone", "listed", "chunked"])
def test_connection_cannot_remove_a_protected_header(rig, name, shape):
    value = {"alone": name, "listed": f"keep-alive, X-Other, {name.upper()}", "chunked": name}[shape]
    resp, closed = rig.send(_attack(value, chunked=shape == "chunked"))
    assert resp.status == 400 and closed
    assert resp.header("x-geomesh-error") == "connection-protected-header"
    assert f"Connection names '{name}'" in resp.body.decode()
    nothing_arrived(rig.rec)


def test_connection_in_two_fields_is_one_list(rig):
    raw = (f"GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\nConnection: Host\r\n\r\n").encode()
    resp, _ = rig.send(raw)
    assert resp.status == 400 and b"'host'" in resp.body
    nothing_arrived(rig.rec)


def test_connection_may_still_drop_other_headers(rig):
    raw = f"GET /x HTTP/1.1\r\nHost: {HOST}\r\nConnection: close, X-Drop\r\nX-Drop: 1\r\nX-Keep: 2\r\n\r\n".encode()
    resp, closed = rig.send(raw)
    assert resp.status == 200 and closed
    exactly(rig.rec, f"GET /x HTTP/1.1\r\nHost: {HOST}\r\nX-Keep: 2\r\n".encode() + ADDR + b"\r\n")


# ---------------------------------------------------------------- framing the gateway refuses

BAD_FRAMING = {
    "CL+TE": b"POST / HTTP/1.1\r\nHost: H\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "TE+CL": b"POST / HTTP/1.1\r\nHost: H\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
    "chunked, identity": b"POST / HTTP/1.1\r\nHost: H\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "two TE": b"POST / HTTP/1.1\r\nHost: H\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"0\r\n\r\n",
    "TE gzip then TE chunked twice": b"POST / HTTP/1.1\r\nHost: H\r\nTransfer-Encoding: chunked, gzip, chunked\r\n"
                                     b"\r\n0\r\n\r\n",
    "space before colon": b"POST / HTTP/1.1\r\nHost: H\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "xchunked": b"POST / HTTP/1.1\r\nHost: H\r\nTransfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "identity": b"POST / HTTP/1.1\r\nHost: H\r\nTransfer-Encoding: identity\r\n\r\nhello",
    "TE in HTTP/1.0": b"POST / HTTP/1.0\r\nHost: H\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "CL twice": b"POST / HTTP/1.1\r\nHost: H\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    "CL 5, 5": b"POST / HTTP/1.1\r\nHost: H\r\nContent-Length: 5, 5\r\n\r\nhello",
    "CL -5": b"POST / HTTP/1.1\r\nHost: H\r\nContent-Length: -5\r\n\r\nhello",
    "CL +5": b"POST / HTTP/1.1\r\nHost: H\r\nContent-Length: +5\r\n\r\nhello",
    "CL 0x5": b"POST / HTTP/1.1\r\nHost: H\r\nContent-Length: 0x5\r\n\r\nhello",
    "CL 2^64": b"POST / HTTP/1.1\r\nHost: H\r\nContent-Length: 18446744073709551616\r\n\r\nhello",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: H\r\nX-A: a\r\n b\r\n\r\n",
    "bare LF": b"GET / HTTP/1.1\nHost: H\n\n",
    "bare CR": b"GET / HTTP/1.1\r\nHost: H\r\nX-A: a\rb\r\n\r\n",
    "NUL": b"GET / HTTP/1.1\r\nHost: H\r\nX-A: a\x00b\r\n\r\n",
    "two Host": b"GET / HTTP/1.1\r\nHost: H\r\nHost: admin.internal\r\n\r\n",
}


@pytest.mark.parametrize("raw", list(BAD_FRAMING.values()), ids=list(BAD_FRAMING))
def test_ambiguous_framing_is_refused_before_anything_is_sent(rig, raw):
    resp, closed = rig.send(raw.replace(b"Host: H", f"Host: {HOST}".encode()))
    assert resp.status == 400 and closed, resp
    assert b"Pause" not in resp.body
    nothing_arrived(rig.rec)


@pytest.mark.parametrize("chunks", [b"zz\r\nhello\r\n0\r\n\r\n", b"5\nhello\r\n0\r\n\r\n",
                                    b"ffffffffffffffffff\r\nhello\r\n0\r\n\r\n", b"5\r\nhelloXX0\r\n\r\n"],
                         ids=["not hex", "LF only", "size overflow", "no CRLF after data"])
def test_a_chunk_error_after_the_head_aborts_the_upstream_exchange(rig, chunks):
    """The documented limit: the head is already on its way when llhttp finds a bad chunk, but the
    backend never sees a complete request, and that connection is closed, not pooled."""
    raw = f"POST /c HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + chunks
    resp, closed = rig.send(raw)
    assert resp.status == 400 and closed
    deadline = time.monotonic() + 3
    while not all(c.eof for c in rig.rec.connections if c.data) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rig.rec.requests == [] and rig.rec.errors == []
    assert all(c.eof for c in rig.rec.connections if c.data)


# ---------------------------------------------------------------- framing the gateway writes itself

def test_content_length_is_the_gateways_own(rig):
    raw = f"POST /p HTTP/1.1\r\nHost: {HOST}\r\nContent-Length:  5 \r\nX-A: 1\r\n\r\nhello".encode()
    resp, _ = rig.send(raw)
    assert resp.status == 200 and resp.body == b"r1 POST /p"
    exactly(rig.rec, f"POST /p HTTP/1.1\r\nHost: {HOST}\r\nX-A: 1\r\nContent-Length: 5\r\n".encode() + ADDR
            + b"\r\nhello")


def test_empty_body_keeps_a_zero_length(rig):
    resp, _ = rig.send(f"POST /z HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 0\r\n\r\n".encode())
    assert resp.status == 200
    exactly(rig.rec, f"POST /z HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 0\r\n".encode() + ADDR + b"\r\n")


@pytest.mark.parametrize("coding,forwarded", [(b"chunked", b"chunked"), (b"Chunked", b"chunked"),
                                              (b"gzip,  CHUNKED", b"gzip, chunked")])
def test_chunked_bodies_are_rechunked(rig, coding, forwarded):
    raw = (f"POST /t HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: ".encode() + coding
           + b"\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
    resp, _ = rig.send(raw)
    assert resp.status == 200
    expect = (f"POST /t HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: ".encode() + forwarded + b"\r\n" + ADDR
              + b"\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    exactly(rig.rec, expect, raw_too=False)  # chunk sizes follow the reads; the parsed request must match
    assert rig.rec.requests[0].body == b"hello world"


# ---------------------------------------------------------------- finding 1: attacker and victims

def _victims(g: RunningGateway, n: int) -> list[bytes]:
    out: list[bytes] = [b""] * n

    def one(i: int) -> None:
        out[i] = get(g.http, HOST, f"/victim/{i}", timeout=8).body

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return out


@pytest.mark.parametrize("connection,chunked", [("content-length", False), ("transfer-encoding", True),
                                                ("close, X-Forwarded-For, Host", False)])
def test_probe_finding_1_victims_get_their_own_responses(tmp_path, connection, chunked):
    recs = [RecordingBackend("A"), RecordingBackend("B")]
    g = RunningGateway(routes(*(r.address for r in recs)), tmp_path, {})
    try:
        for _ in range(4):  # a pooled connection to each backend
            assert get(g.http, HOST, "/warm").status == 200
        with Conn(g.http) as a:
            a.send_raw(_attack(connection, chunked=chunked))
            assert a.read_response().status == 400
        time.sleep(0.3)
        for rnd in range(2):
            got = _victims(g, 6)
            for i, body in enumerate(got):
                assert body.endswith(f" GET /victim/{i}".encode()), (rnd, i, body)
        seen = [r for rec in recs for r in rec.requests]
        assert not [r for r in seen if r.target.startswith("/slow") or r.values("host") == ["admin.internal"]]
        assert all(r.values("x-forwarded-for") == ["127.0.0.1"] for r in seen)
        assert not any(rec.errors for rec in recs)
    finally:
        g.stop()
        for r in recs:
            r.close()


def test_probe_finding_1_reproduction_with_the_test_backends(tmp_path):
    """The probe's own reproduction (two `tests/proxy/backends.py` backends): each victim's /headers
    answer carries its own cookie, and the gateway answers the attack 400."""
    bs = [Backend("b1"), Backend("b2")]
    g = RunningGateway(routes(*(b.address for b in bs)), tmp_path, {})
    try:
        for _ in range(4):
            assert get(g.http, HOST, "/").status == 200
        with Conn(g.http) as a:
            a.send_raw(_attack("content-length"))
            assert a.read_response().status == 400
        time.sleep(0.5)
        cookies: list[list[str]] = [[] for _ in range(5)]

        def victim(i: int) -> None:
            r = get(g.http, HOST, "/headers", headers={"Cookie": f"s={i}"}, timeout=8)
            cookies[i] = json.loads(r.body).get("cookie", []) if r.status == 200 else [f"status {r.status}"]

        threads = [threading.Thread(target=victim, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert cookies == [[f"s={i}"] for i in range(5)]
        assert all(b.paths["/slow"] == 0 for b in bs)
    finally:
        g.stop()
        for b in bs:
            b.close()


# ---------------------------------------------------------------- finding 13: Upgrade

UPGRADE = f"GET /ws HTTP/1.1\r\nHost: {HOST}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n".encode()
TRAILING = b"GET /ws-smuggled HTTP/1.1\r\nHost: other-vhost.internal\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"
UPGRADE_FORWARDED = (f"GET /ws HTTP/1.1\r\nHost: {HOST}\r\n".encode() + ADDR
                     + b"Connection: upgrade\r\nUpgrade: websocket\r\n\r\n")


@pytest.mark.parametrize("split", [False, True], ids=["same write", "next write"])
def test_bytes_after_an_upgrade_never_reach_a_backend_that_refuses_it(rig, split):
    rig.warm()
    upgrade = UPGRADE.replace(b"GET /ws ", b"GET /slow?ms=300 ")  # the backend thinks a while, then says 200
    with Conn(rig.g.http) as c:
        if split:
            c.send_raw(upgrade)
            time.sleep(0.05)  # the head is out; the trailing bytes come while the backend thinks
            c.send_raw(TRAILING)
        else:
            c.send_raw(upgrade + TRAILING)
        r = c.read_response()
        assert r.status == 200 and r.body == b"r1 GET /slow?ms=300"
        c.sock.settimeout(2)
        assert c.closed_by_peer()
    exactly(rig.rec, UPGRADE_FORWARDED.replace(b"GET /ws ", b"GET /slow?ms=300 "))
    assert rig.g.server.metrics.errors.get("upgrade-data-dropped", 0) >= 1


def test_bytes_after_an_upgrade_reach_the_backend_after_its_101(tmp_path):
    r = Rig(tmp_path, upgrade_status=101)
    try:
        r.warm()
        with Conn(r.g.http) as c:
            c.send_raw(UPGRADE + b"early bytes")
            resp = c.read_response(head_only=True)
            assert resp.status == 101
            c.send_raw(b" and later")
            want = b"early bytes and later"
            deadline = time.monotonic() + 3
            while c.buf != want and time.monotonic() < deadline:
                c.sock.settimeout(0.5)
                try:
                    c._fill()
                except TimeoutError:
                    pass
            assert c.buf == want  # echoed back through the tunnel
        assert r.rec.requests[0] == parse_requests(UPGRADE_FORWARDED)[0][0]
        assert len(r.rec.requests) == 1
        assert bytes(next(x for x in r.rec.connections if x.tunnel).tunnel) == want
    finally:
        r.close()


def test_upgrade_behind_a_pipelined_request_holds_its_bytes(rig):
    rig.warm()
    with Conn(rig.g.http) as c:
        c.send_raw(f"GET /first HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode() + UPGRADE + TRAILING)
        assert c.read_response().body == b"r1 GET /first"
        assert c.read_response().body == b"r1 GET /ws"
    assert [q.target for q in rig.rec.wait_for(2)] == ["/first", "/ws"]
    time.sleep(0.1)
    assert [q.target for q in rig.rec.requests] == ["/first", "/ws"]
    assert b"smuggled" not in rig.rec.received()


# ---------------------------------------------------------------- finding 16: absolute-form targets

def test_absolute_form_with_another_host_is_refused(rig):
    resp, closed = rig.send(f"GET http://evil.example/path HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    assert resp.status == 400 and closed
    assert "names 'evil.example' but Host is" in resp.body.decode()
    nothing_arrived(rig.rec)


@pytest.mark.parametrize("target,origin,host", [
    (f"http://{HOST}/path?q=1", "/path?q=1", HOST),
    ("HTTP://WEB.apps.test:8080?q=1", "/?q=1", f"{HOST}:8080"),
    (f"https://{HOST}", "/", HOST),
])
def test_absolute_form_is_forwarded_in_origin_form(rig, target, origin, host):
    resp, _ = rig.send(f"GET {target} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    assert resp.status == 200 and resp.body == f"r1 GET {origin}".encode()
    exactly(rig.rec, f"GET {origin} HTTP/1.1\r\nHost: {host}\r\n".encode() + ADDR + b"\r\n")


@pytest.mark.parametrize("target", ["http://user@web.apps.test/", "ftp://web.apps.test/", "http:///x",
                                    f"http://{HOST}:99999/", "web.apps.test/x"])
def test_bad_absolute_targets_are_400(rig, target):
    resp, _ = rig.send(f"GET {target} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    assert resp.status == 400 and resp.header("x-geomesh-error") in ("bad-host", "bad-request")  # llhttp or us
    nothing_arrived(rig.rec)


# ---------------------------------------------------------------- finding 18: head size per head

def test_900_pipelined_requests_and_half_a_head_in_one_write(tmp_path):
    (b,) = [Backend("b1")]
    g = RunningGateway(routes(b.address), tmp_path, {})
    try:
        reqs = b"".join(f"GET /pipelined/{i:04d} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode() for i in range(900))
        assert len(reqs) > 32768  # the default head limit: the read is larger, each head is not
        with Conn(g.http, timeout=10) as c:
            c.send_raw(reqs + b"GET /last HTTP/1.1\r\nHo")
            assert [c.read_response().status for _ in range(900)] == [200] * 900
            c.send_raw(f"st: {HOST}\r\n\r\n".encode())
            assert c.read_response().status == 200
            assert c.request(HOST, "/after").status == 200  # the connection stays usable
        body = b"x" * 40000
        with Conn(g.http, timeout=10) as c:  # a large body, then half a head in the same read
            c.send_raw(f"POST /echo HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                       + body + b"GET / HTTP/1.1\r\nHo")
            assert c.read_response().body == body
            c.send_raw(f"st: {HOST}\r\n\r\n".encode())
            assert c.read_response().status == 200
    finally:
        g.stop()
        b.close()


def test_a_head_over_the_limit_is_still_431_without_its_end(rig):
    with Conn(rig.g.http) as c:
        c.send_raw(f"GET / HTTP/1.1\r\nHost: {HOST}\r\nX-Long: ".encode() + b"a" * 40000)
        r = c.read_response()
        assert r.status == 431 and b"request head over 32768 bytes" in r.body


# ---------------------------------------------------------------- finding 20: half-closed and slow bodies

def test_half_close_mid_body_is_400_at_once_and_frees_the_upstream(rig):
    rig.warm()
    conns = [Conn(rig.g.http) for _ in range(20)]
    try:
        t0 = time.monotonic()
        for c in conns:
            c.send_raw(f"POST /half HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 1000\r\n\r\nabc".encode())
            c.sock.shutdown(socket.SHUT_WR)
        for c in conns:
            r = c.read_response()
            assert r.status == 400 and r.header("x-geomesh-error") == "incomplete-request"
            assert b"after 3 bytes of the request body" in r.body
        assert time.monotonic() - t0 < 2.0
    finally:
        for c in conns:
            c.close()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # the backend may record a little after the client got its 400
        used = [x for x in rig.rec.connections if x.data]
        if used and all(x.eof for x in used):
            break
        time.sleep(0.01)
    # every upstream connection that got a head was closed by the gateway (none kept for 60 s)
    assert used and all(x.eof for x in used), [(bytes(x.data[:30]), x.eof) for x in rig.rec.connections]
    assert rig.rec.requests == []


def test_half_close_mid_body_behind_a_pipelined_request(rig):
    rig.warm()
    with Conn(rig.g.http) as c:
        c.send_raw(f"GET /slow?ms=200 HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
                   + f"POST /half HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 100\r\n\r\nabc".encode())
        c.sock.shutdown(socket.SHUT_WR)
        assert c.read_response().body == b"r1 GET /slow?ms=200"  # the request before it is answered first
        r = c.read_response()
        assert r.status == 400 and r.header("x-geomesh-error") == "incomplete-request"
    assert [q.target for q in rig.rec.requests] == ["/slow?ms=200"]


def test_half_close_inside_a_head_is_400(rig):
    with Conn(rig.g.http) as c:
        c.send_raw(f"GET / HTTP/1.1\r\nHost: {HOST}\r\nX-A".encode())
        c.sock.shutdown(socket.SHUT_WR)
        r = c.read_response()
        assert r.status == 400 and b"inside a request head" in r.body


@pytest.fixture(scope="module")
def slow_rig(tmp_path_factory):
    r = Rig(tmp_path_factory.mktemp("slow"), body_timeout=1.0, body_min_rate=1000)
    yield r
    r.close()


def test_a_silent_body_is_408_after_body_timeout(slow_rig):
    slow_rig.warm()
    with Conn(slow_rig.g.http) as c:
        c.send_raw(f"POST /s HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 1000\r\n\r\nabc".encode())
        t0 = time.monotonic()
        r = c.read_response()
        took = time.monotonic() - t0
    assert r.status == 408 and r.header("x-geomesh-error") == "body-timeout"
    assert "no request body bytes for 1s" in r.body.decode()
    assert 0.7 < took < 3.0  # body_timeout 1 s (the upstream timeout is 3 s, the old limit 60 s)
    assert slow_rig.rec.requests == []


def test_a_dribbling_body_is_408_under_the_minimum_rate(slow_rig):
    slow_rig.warm()
    with Conn(slow_rig.g.http) as c:
        c.send_raw(f"POST /d HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 1000\r\n\r\n".encode())
        t0 = time.monotonic()
        for _ in range(60):  # a byte every 0.1 s (10 bytes/s, the minimum is 1000): at most 6 s
            try:
                c.send_raw(b"x")
            except OSError:
                break
            if select.select([c.sock], [], [], 0.1)[0]:
                break
        r = c.read_response()
        took = time.monotonic() - t0
    assert r.status == 408 and "under the minimum of 1000 bytes/s" in r.body.decode()
    assert took < 4.0
    assert slow_rig.rec.requests == []


def test_a_steady_body_above_the_rate_goes_through(slow_rig):
    slow_rig.warm()
    piece = b"y" * 500
    with Conn(slow_rig.g.http) as c:
        c.send_raw(f"POST /steady HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {len(piece) * 15}\r\n\r\n".encode())
        for _ in range(15):  # 5,000 bytes/s for 1.5 s: over the minimum of 1,000, never silent for 1 s
            c.send_raw(piece)
            time.sleep(0.1)
        r = c.read_response()
    assert r.status == 200
    assert slow_rig.rec.wait_for(1)[0].body == piece * 15


# ---------------------------------------------------------------- finding 21: hosts, look-alikes, TRACE

@pytest.mark.parametrize("host,words", [(f"{HOST}..", "empty label"), (f"{HOST}:99999", "port '99999'"),
                                        (f"{HOST}:abc", "port 'abc'"), ("web apps", "label"),
                                        ("[::1%eth0]", "zone id")])
def test_bad_host_values_are_400(rig, host, words):
    resp, _ = rig.send(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    assert resp.status == 400 and resp.header("x-geomesh-error") == "bad-host"
    assert words in resp.body.decode()
    nothing_arrived(rig.rec)


def test_host_is_forwarded_in_canonical_form(rig):
    resp, _ = rig.send(b"GET /n HTTP/1.1\r\nHost: WEB.Apps.Test.:80\r\n\r\n")
    assert resp.status == 200
    exactly(rig.rec, f"GET /n HTTP/1.1\r\nHost: {HOST}:80\r\n".encode() + ADDR + b"\r\n")


def test_client_ip_look_alikes_are_dropped(rig):
    raw = (f"GET /ip HTTP/1.1\r\nHost: {HOST}\r\nX_Forwarded_For: 6.6.6.6\r\nTrue-Client-IP: 6.6.6.6\r\n"
           "X-Client-IP: 6.6.6.6\r\nCF-Connecting-IP: 6.6.6.6\r\nX_Real_IP: 6.6.6.6\r\nx-geomesh_forwarded: gw\r\n"
           "X-Forwarded-For: 6.6.6.6\r\nX-Kept: 1\r\n\r\n").encode()
    resp, _ = rig.send(raw)
    assert resp.status == 200
    exactly(rig.rec, f"GET /ip HTTP/1.1\r\nHost: {HOST}\r\nX-Kept: 1\r\n".encode() + ADDR + b"\r\n")


@pytest.mark.parametrize("raw,status,words", [
    (f"TRACE / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode(), 405, "TRACE is not supported"),
    (f"GET / HTTP/2.0\r\nHost: {HOST}\r\n\r\n".encode(), 505, "HTTP/2.0 requests are not served here"),
    (f"GET / HTTP/0.9\r\nHost: {HOST}\r\n\r\n".encode(), 505, "HTTP/0.9"),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, "HTTP/2 with prior knowledge (h2c) is not served on this port"),
    (f"OPTIONS * HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode(), 200, "r1 OPTIONS *"),
])
def test_methods_and_versions(rig, raw, status, words):
    resp, _ = rig.send(raw)
    assert resp.status == status and words in resp.body.decode(), resp
    assert b"Pause" not in resp.body and b"llhttp" not in resp.body
    if status != 200:
        nothing_arrived(rig.rec)


def test_tls_host_must_match_the_sni(tmp_path):
    ca = TestCA(tmp_path)
    cert, key = ca.issue("zone", [f"*.{ZONE}", "www.shop.example"])
    rec = RecordingBackend("r1")
    g = RunningGateway({**routes(rec.address), "certificates": [{"cert": str(cert), "key": str(key)}]}, tmp_path,
                       {"http": (), "https": ("127.0.0.1:0",)})
    try:
        ctx = ca.client_context()
        with Conn(g.https, tls=ctx, server_name=HOST) as c:
            assert c.request(f"{HOST}:443").status == 200  # the same name, with a port: fine
            r = c.request("www.shop.example")  # another app's name over this connection
            assert r.status == 421 and r.header("x-geomesh-error") == "sni-host-mismatch"
            assert "not the name this TLS connection was opened for ('web.apps.test')" in r.body.decode()
            assert c.request(HOST).status == 200  # not a closing error
        with Conn(g.https, tls=ctx, server_name="www.shop.example") as c:
            assert c.request("www.shop.example").status == 200
        assert [q.values("host") for q in rec.requests] == [[f"{HOST}:443"], [HOST], ["www.shop.example"]]
        assert g.server.metrics.errors.get("sni-host-mismatch") == 1
    finally:
        g.stop()
        rec.close()


def test_refusals_are_counted_by_cause(rig):
    before = dict(rig.g.server.metrics.errors)
    rig.send(_attack("content-length"))
    rig.send(f"GET / HTTP/1.1\r\nHost: {HOST}..\r\n\r\n".encode())
    after = rig.g.server.metrics.errors
    assert after.get("connection-protected-header", 0) == before.get("connection-protected-header", 0) + 1
    assert after.get("bad-host", 0) == before.get("bad-host", 0) + 1


class DoubleAnswer(RawListener):
    """A backend that answers `/double` with two responses in one write (it lost track of the
    exchange); every other path once, with the path as the body. Counts its connections."""

    def handle(self, c: socket.socket) -> None:
        threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        buf = b""
        with c:
            while True:
                try:
                    data = c.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while b"\r\n\r\n" in buf:
                    head, buf = buf.split(b"\r\n\r\n", 1)
                    path = head.split(b" ")[1]
                    one = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path)
                    c.sendall(one + (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra" if path == b"/double"
                                     else b""))


def test_a_backend_that_answers_twice_loses_its_pooled_connection(tmp_path):
    back = DoubleAnswer()
    g = RunningGateway(routes(f"127.0.0.1:{back.port}"), tmp_path, {})
    try:
        assert get(g.http, HOST, "/warm").body == b"/warm"
        assert back.accepted == 1
        with Conn(g.http) as c:
            assert c.request(HOST, "/double").body == b"/double"
            c.sock.settimeout(2)
            c.read_until_close()  # the extra bytes, then the gateway closes this client too
        assert get(g.http, HOST, "/next").body == b"/next"
        assert back.accepted == 2  # the connection that answered twice was not reused
        assert g.server.metrics.errors.get("upstream-extra-response") == 1
    finally:
        g.stop()
        back.sock.close()
