"""Request smuggling and hostile HTTP/1.1 clients (SECURITY-PROBE-2026-11 findings 1, 13, 16, 18-21, 24).

Every case goes through a real gateway on loopback to a `RecordingBackend`, which keeps the
bytes it received and parses them with its own strict parser: a refused request must leave it
with nothing at all, an accepted one with exactly the one request expected, byte for byte.
Before each case the gateway holds a pooled connection to the backend, so whatever it decides to
send is written at once (a refusal cannot hide behind a connect still in progress).
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.proxy.backends import Backend
from tests.proxy.client import Conn, get
from tests.proxy.conftest import RunningGateway
from tests.proxy.recording import RecordingBackend, parse_requests
from tests.proxy.smuggling_rig import ADDR, HOST, Rig, attack, exactly, nothing_arrived, routes


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    r = Rig(tmp_path_factory.mktemp("smuggling"))
    yield r
    r.close()


# ---------------------------------------------------------------- Connection naming protected headers

PROTECTED = ["content-length", "transfer-encoding", "host", "x-forwarded-for", "forwarded", "x-forwarded-proto",
             "x-forwarded-host", "x-real-ip", "x-geomesh-forwarded", "x_forwarded_for", "true-client-ip",
             "x-client-ip", "cf-connecting-ip"]


@pytest.mark.parametrize("name", PROTECTED)
@pytest.mark.parametrize("shape", ["alone", "listed", "chunked"])
def test_connection_cannot_remove_a_protected_header(rig, name, shape):
    value = {"alone": name, "listed": f"keep-alive, X-Other, {name.upper()}", "chunked": name}[shape]
    resp, closed = rig.send(attack(value, chunked=shape == "chunked"))
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
            a.send_raw(attack(connection, chunked=chunked))
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
            a.send_raw(attack("content-length"))
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
