"""Every error the gateway answers itself, over real sockets: a status, a short body naming the
cause, never a silent close; plus a corpus of malformed requests after which it keeps serving."""

from __future__ import annotations

import logging
import socket
import time

import pytest

from tests.proxy.backends import RawListener
from tests.proxy.client import Conn, get

ZONE = "apps.test"


def routes(apps: list[tuple[str, list]], **top) -> dict:
    return {"zone": ZONE, "name": "gw-a", "region": "eu", "health": {"check": "none"}, **top,
            "apps": [{"name": n, "backends": b} for n, b in apps]}


@pytest.fixture
def errors_logged():
    """Collects ERROR records (and any record carrying an exception) from the proxy and asyncio."""
    records: list[logging.LogRecord] = []

    class H(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR or record.exc_info:
                records.append(record)

    h = H()
    loggers = [logging.getLogger("geomesh"), logging.getLogger("asyncio")]
    for lg in loggers:
        lg.addHandler(h)
    yield records
    for lg in loggers:
        lg.removeHandler(h)


class ClosingServer(RawListener):
    """Accepts connections and misbehaves: closes at once, or answers garbage."""

    def __init__(self, reply: bytes = b"") -> None:
        self.reply = reply
        super().__init__(backlog=64)

    def handle(self, c: socket.socket) -> None:
        try:
            c.recv(65536)
            if self.reply:
                c.sendall(self.reply)
        except OSError:
            pass
        c.close()


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def check(resp, status: int, words: str) -> None:
    assert resp.status == status, resp
    assert resp.header("content-type").startswith("text/plain")
    text = resp.body.decode()
    assert text.startswith(str(status)), text
    assert words in text, text


def test_unknown_host_is_404_with_the_reason(backends, gateway):
    (b,) = backends(1)
    g = gateway(routes([("shop", [b.address])]))
    check(get(g.http, f"nope.{ZONE}"), 404, "no app or instance named 'nope'")
    check(get(g.http, "example.org"), 404, "not under the zone")
    check(get(g.http, f"a.b.{ZONE}"), 404, "more than one label")
    check(get(g.http, f"shop-99999.{ZONE}"), 404, "outside 1-65535")
    check(get(g.http, None, version="HTTP/1.0"), 400, "no Host header")
    r = get(g.http, f"nope.{ZONE}", method="HEAD")
    assert r.status == 404 and r.body == b""


def test_no_healthy_backend_is_503(backends, gateway):
    g = gateway(routes([("empty", [])]))
    check(get(g.http, f"empty.{ZONE}"), 503, "no healthy backend for app 'empty' in region 'eu'")


def test_refused_reset_and_garbage_are_502(gateway):
    closer, garbage = ClosingServer(), ClosingServer(b"SSH-2.0-OpenSSH\r\n")
    dead = free_port()
    try:
        g = gateway(routes([("dead", [f"127.0.0.1:{dead}"]), ("reset", [f"127.0.0.1:{closer.port}"]),
                            ("junk", [f"127.0.0.1:{garbage.port}"])]))
        check(get(g.http, f"dead.{ZONE}"), 502, "Connection refused")
        check(get(g.http, f"reset.{ZONE}"), 502, "closed the connection before answering")
        check(get(g.http, f"junk.{ZONE}", method="POST", body=b"x"), 502, "malformed response from the backend")
        assert closer.accepted >= 1
    finally:
        closer.close()
        garbage.close()


def test_slow_backend_is_504(backends, gateway):
    (b,) = backends(1)
    g = gateway(routes([("shop", [b.address])]), upstream_timeout=0.5)
    t0 = time.monotonic()
    check(get(g.http, f"shop.{ZONE}", "/slow?ms=3000"), 504, "did not answer within 0.5s")
    assert time.monotonic() - t0 < 2.5
    assert get(g.http, f"shop.{ZONE}").status == 200


def test_malformed_oversized_and_refused_requests(backends, gateway):
    (b,) = backends(1)
    g = gateway(routes([("shop", [b.address])]), max_body_bytes=1000, max_header_bytes=4096, max_headers=20)
    host = f"shop.{ZONE}"
    with Conn(g.http) as c:
        c.send_raw(b"GARBAGE\r\n\r\n")
        check(c.read_response(), 400, "malformed request")
        assert c.closed_by_peer()
    check(get(g.http, host, headers={"X-Big": "a" * 8000}), 431, "request head over 4096 bytes")
    check(get(g.http, host, headers=[(f"X-{i}", "v") for i in range(30)]), 431, "31 header fields, at most 20")
    with Conn(g.http) as c:  # a head that never ends
        c.send_raw(f"GET / HTTP/1.1\r\nHost: {host}\r\nX-Long: ".encode() + b"a" * 20000)
        check(c.read_response(), 431, "request head over")
    check(get(g.http, host, "/echo", method="POST", body=b"x" * 2000), 413, "Content-Length 2000 is over")
    with Conn(g.http) as c:
        c.send_raw(f"POST /echo HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        c.send_raw(b"400\r\n" + b"y" * 1024 + b"\r\n")
        check(c.read_response(), 413, "request body over the limit of 1000 bytes")
    check(get(g.http, host, method="CONNECT"), 405, "CONNECT is not supported")
    check(get(g.http, f"shop-{b.port}s.{ZONE}"), 421, "TLS passthrough")
    with Conn(g.http) as c:
        c.send_raw(f"GET / HTTP/1.1\r\nHost: {host}\r\nHost: other\r\n\r\n".encode())
        check(c.read_response(), 400, "more than one Host header")
    with Conn(g.http) as c:  # request smuggling shape: both Content-Length and chunked
        c.send_raw(f"POST / HTTP/1.1\r\nHost: {host}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
                   "0\r\n\r\n".encode())
        assert c.read_response().status == 400
    assert get(g.http, host).status == 200


def test_slowloris_gets_408_and_idle_connections_close(backends, gateway):
    (b,) = backends(1)
    g = gateway(routes([("shop", [b.address])]), header_timeout=1.0, idle_timeout=1.0)
    with Conn(g.http) as c:
        c.send_raw(f"GET / HTTP/1.1\r\nHost: shop.{ZONE}\r\n".encode())
        t0 = time.monotonic()
        got = None
        for i in range(20):  # one header line every 0.2 s: never a complete head
            try:
                c.send_raw(f"X-Drip-{i}: x\r\n".encode())
            except OSError:
                break
            c.sock.settimeout(0.2)
            try:
                if c._fill():
                    break
            except TimeoutError:
                continue
        c.sock.settimeout(5)
        got = c.read_response()
        check(got, 408, "request head not received within 1s")
        assert time.monotonic() - t0 < 3.5
    with Conn(g.http) as c:  # an idle keep-alive connection is closed after idle_timeout
        assert c.request(f"shop.{ZONE}").status == 200
        t0 = time.monotonic()
        assert c.closed_by_peer()
        assert 0.5 < time.monotonic() - t0 < 4


def test_connection_limit_answers_503(backends, gateway):
    (b,) = backends(1)
    g = gateway(routes([("shop", [b.address])]), max_connections=3)
    held = [Conn(g.http) for _ in range(3)]
    try:
        for c in held:
            assert c.request(f"shop.{ZONE}").status == 200
        with Conn(g.http) as extra:
            extra.send_raw(f"GET / HTTP/1.1\r\nHost: shop.{ZONE}\r\n\r\n".encode())
            check(extra.read_response(), 503, "connection limit (3)")
    finally:
        for c in held:
            c.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # slots free up once the held connections are gone
        if get(g.http, f"shop.{ZONE}").status == 200:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("connection slots were not released")


MALFORMED = [
    b"\x00\x01\x02\x03\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET / HTTP/9.9\r\nHost: shop.apps.test\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost shop.apps.test\r\n\r\n",
    b"GET / HTTP/1.1\r\nHo st: shop.apps.test\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: shop.apps.test\r\nContent-Length: -1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: shop.apps.test\r\nContent-Length: abc\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: shop.apps.test\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"POST / HTTP/1.1\r\nHost: shop.apps.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST / HTTP/1.1\r\nHost: shop.apps.test\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"GET /\x7f HTTP/1.1\r\nHost: shop.apps.test\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: shop.apps.test\r\nX: a\x00b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: \xff\xfe.apps.test\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: shop.apps.test\r\n folded: header\r\n\r\n",
    b"GET / HTTP/1.1\nHost: shop.apps.test\n\n",
    b"\r\n\r\n\r\n",
    b" GET / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: shop.apps.test\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"\x16\x03\x01\x00\x05hello",
    b"GET / HTTP/1.1\r\nHost: shop.apps.test\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    b"GET http://evil.example/ HTTP/1.1\r\nHost: shop.apps.test\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: " + b"a" * 300 + b".apps.test\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: shop.apps.test:99999999\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: shop-0.apps.test\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: -.apps.test\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: .apps.test\r\n\r\n",
]


def test_malformed_corpus_never_breaks_the_gateway(backends, gateway, errors_logged):
    (b,) = backends(1)
    g = gateway(routes([("shop", [b.address])]), header_timeout=0.5)
    for payload in MALFORMED:
        with Conn(g.http, timeout=5) as c:
            c.send_raw(payload)
            try:
                c.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            data = c.read_until_close()
        # either a well-formed HTTP answer, or (for bytes that are not a request at all) nothing
        if data:
            assert data.startswith(b"HTTP/1.1 "), (payload, data[:200])
            status = int(data[9:12])
            assert status < 500 or status == 502, (payload, data[:300])
        assert get(g.http, f"shop.{ZONE}").status == 200, payload
    assert not errors_logged, [r.getMessage() for r in errors_logged]


def test_header_limit_counts_the_head_not_the_read(backends, gateway):
    """max_header_bytes bounds the request head however the bytes arrive: a small head sent with a
    large body or behind another request in the same read is fine; a head over the limit is a 431
    whether it comes in one read or in many small ones."""
    (b,) = backends(1)
    g = gateway(routes([("shop", [b.address])]), max_header_bytes=1024, max_body_bytes=100_000)
    host = f"shop.{ZONE}"
    body = b"z" * 5000
    with Conn(g.http) as c:  # head + a body five times the head limit, one write
        c.send_raw(f"POST /echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        r = c.read_response()
        assert r.status == 200 and r.body == body
    one = f"GET / HTTP/1.1\r\nHost: {host}\r\nX-Pad: {'p' * 600}\r\n\r\n".encode()
    with Conn(g.http) as c:  # two 650-byte heads pipelined in one write: 1,300 bytes, each under 1,024
        c.send_raw(one + one)
        assert [c.read_response().status, c.read_response().status] == [200, 200]
    big = f"GET / HTTP/1.1\r\nHost: {host}\r\nX-Pad: {'p' * 1200}\r\n\r\n".encode()
    with Conn(g.http) as c:  # the same head over the limit in one write
        c.send_raw(big)
        check(c.read_response(), 431, "request head over 1024 bytes")
    with Conn(g.http) as c:  # and in 100-byte pieces
        for i in range(0, len(big), 100):
            c.send_raw(big[i:i + 100])
            time.sleep(0.005)
        check(c.read_response(), 431, "request head over 1024 bytes")


def test_a_head_over_the_limit_is_431_when_its_last_read_is_small(backends, gateway):
    """A head that ends in a small read after a large one is measured over all its reads: the
    first read alone is under the limit, the whole head is not (the last read alone never is)."""
    (b,) = backends(1)
    g = gateway(routes([("shop", [b.address])]), max_header_bytes=1024)
    big = f"GET / HTTP/1.1\r\nHost: shop.{ZONE}\r\nX-Pad: {'p' * 1200}\r\n\r\n".encode()
    with Conn(g.http) as c:
        c.send_raw(big[:1000])
        time.sleep(0.1)  # two reads on the gateway's side
        c.send_raw(big[1000:])
        check(c.read_response(), 431, "request head over 1024 bytes")
