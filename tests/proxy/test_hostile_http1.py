"""Hostile HTTP/1.1 clients beyond smuggling (SECURITY-PROBE-2026-11 findings 20, 21, 24): half-closed
and slow bodies, Host values and client-IP look-alikes, methods and versions, SNI/Host agreement,
the refusal counters, and a backend that answers twice. Same rig as `test_smuggling.py`: a real
gateway in front of a byte-recording backend.
"""

from __future__ import annotations

import select
import socket
import threading
import time

import pytest

from tests.proxy.backends import RawListener
from tests.proxy.certs import TestCA
from tests.proxy.client import Conn, get
from tests.proxy.conftest import RunningGateway
from tests.proxy.recording import RecordingBackend
from tests.proxy.smuggling_rig import ADDR, HOST, ZONE, Rig, attack, exactly, nothing_arrived, routes


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    r = Rig(tmp_path_factory.mktemp("smuggling"))
    yield r
    r.close()


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
    rig.send(attack("content-length"))
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
