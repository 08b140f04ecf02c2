"""HTTP proxying through a real gateway to real backends: name forms, keep-alive, pipelining,
streaming bodies, HEAD, upgrades, client-address headers."""

from __future__ import annotations

import json
import socket

from tests.proxy.client import Conn, get

ZONE = "apps.test"


def app_routes(*apps: tuple[str, list], **top) -> dict:
    data = {"zone": ZONE, "name": "gw-a", "region": "eu", "health": {"check": "none"}, **top}
    data["apps"] = [{"name": n, "backends": b} for n, b in apps]
    return data


def test_name_forms_route_to_the_right_backend(backends, gateway):
    b1, b2, b3 = backends(3)
    other = backends(1, prefix="other")[0]
    g = gateway(app_routes(("shop", [b1.address, b2.address, {"address": "127.0.0.1", "port": b3.port,
                                                                   "id": "shop-i3"}]),
                           ("blog", [other.address]),
                           domains=[{"fqdn": "www.shop.example", "app": "shop"}]))
    names = {get(g.http, f"shop.{ZONE}").header("x-backend") for _ in range(6)}
    assert names == {"b1", "b2", "b3"}
    assert get(g.http, f"blog.{ZONE}").body == b"other4"
    # <instance-id>: always that instance
    assert {get(g.http, f"shop-i3.{ZONE}").header("x-backend") for _ in range(4)} == {"b3"}
    # <app>-<port>: the app's instances on another port (here the port of b2)
    r = get(g.http, f"shop-{b2.port}.{ZONE}")
    assert r.status == 200 and r.header("x-backend") == "b2"
    # <instance-id>-<port>
    assert get(g.http, f"shop-i3-{b1.port}.{ZONE}").header("x-backend") == "b1"
    # custom domain, Host with port and trailing dot, case-insensitive
    assert get(g.http, "WWW.Shop.Example.:8080").status == 200


def test_keep_alive_reuses_upstream_connections(backends, gateway):
    (b,) = backends(1)
    g = gateway(app_routes(("shop", [b.address])))
    with Conn(g.http) as c:
        for _ in range(50):
            assert c.request(f"shop.{ZONE}").status == 200
    assert b.hits == 50
    assert b.connections <= 2  # one pooled connection carried (almost) everything


def test_pipelined_requests_answer_in_order(backends, gateway):
    (b,) = backends(1)
    g = gateway(app_routes(("shop", [b.address])))
    host = f"shop.{ZONE}"
    reqs = (f"GET /slow?ms=150 HTTP/1.1\r\nHost: {host}\r\n\r\n"
            f"GET /status/201 HTTP/1.1\r\nHost: {host}\r\n\r\n"
            f"GET /x HTTP/1.1\r\nHost: nowhere.{ZONE}\r\n\r\n"
            f"POST /echo HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\n\r\nhello"
            f"GET /status/202 HTTP/1.1\r\nHost: {host}\r\n\r\n")
    with Conn(g.http) as c:
        c.send_raw(reqs.encode())
        got = [c.read_response() for _ in range(5)]
    assert [r.status for r in got] == [200, 201, 404, 200, 202]
    assert got[3].body == b"hello"


def test_streaming_bodies_both_ways(backends, gateway):
    (b,) = backends(1)
    g = gateway(app_routes(("shop", [b.address])))
    host = f"shop.{ZONE}"
    payload = bytes(range(256)) * 8192  # 2 MiB
    with Conn(g.http) as c:
        r = c.request(host, "/echo", method="POST", body=payload)
        assert r.status == 200 and r.body == payload
        # chunked request body, sent in pieces
        c.send_raw(f"POST /echo HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        for i in range(20):
            piece = bytes([65 + i]) * 50000
            c.send_raw(b"%x\r\n%s\r\n" % (len(piece), piece))
        c.send_raw(b"0\r\n\r\n")
        r = c.read_response()
        assert r.status == 200 and len(r.body) == 20 * 50000 and r.body[-1:] == b"T"
        # chunked response
        r = c.request(host, "/chunked?n=50&size=1000")
        assert r.status == 200 and len(r.body) == 50000
        # big Content-Length response
        r = c.request(host, "/big?bytes=5000000")
        assert len(r.body) == 5_000_000
        # the connection is still good
        assert c.request(host).status == 200


def test_head_and_no_body_responses_keep_the_connection_usable(backends, gateway):
    (b,) = backends(1)
    g = gateway(app_routes(("shop", [b.address])))
    with Conn(g.http) as c:
        r = c.request(f"shop.{ZONE}", "/", method="HEAD")
        assert r.status == 200 and r.header("content-length") == "2"
        assert c.request(f"shop.{ZONE}", "/status/204").status == 204
        assert c.request(f"shop.{ZONE}", "/status/304").status == 304
        r = c.request(f"shop.{ZONE}", "/")
        assert r.body == b"b1"


def test_http10_and_connection_close(backends, gateway):
    (b,) = backends(1)
    g = gateway(app_routes(("shop", [b.address])))
    with Conn(g.http) as c:
        r = c.request(f"shop.{ZONE}", "/", version="HTTP/1.0")
        assert r.status == 200 and r.body == b"b1"
        assert c.closed_by_peer()
    with Conn(g.http) as c:
        r = c.request(f"shop.{ZONE}", "/", headers={"Connection": "close"})
        assert r.status == 200
        assert c.closed_by_peer()
    with Conn(g.http) as c:  # the backend closes: the client still gets the full answer
        r = c.request(f"shop.{ZONE}", "/close")
        assert r.status == 200 and r.body == b"b1"


def test_websocket_upgrade_is_tunnelled(backends, gateway):
    (b,) = backends(1)
    g = gateway(app_routes(("shop", [b.address])))
    with Conn(g.http) as c:
        c.send_raw(f"GET /ws HTTP/1.1\r\nHost: shop.{ZONE}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                   "Sec-WebSocket-Version: 13\r\n\r\nearly-bytes".encode())
        r = c.read_response(head_only=True)
        assert r.status == 101
        want = b"early-bytes"
        for i in range(5):
            msg = f"frame-{i}".encode() * 1000
            c.send_raw(msg)
            want += msg
        got = c.buf
        while len(got) < len(want):
            got += c.sock.recv(65536)
        assert got == want


def test_an_upgraded_tunnel_passes_the_clients_half_close_on(backends, gateway):
    """After a 101 the client's EOF reaches the backend (half-close), which still answers: the
    client reads every echoed byte, then the end of the connection."""
    (b,) = backends(1)
    g = gateway(app_routes(("shop", [b.address])))
    with Conn(g.http) as c:
        c.send_raw(f"GET /ws HTTP/1.1\r\nHost: shop.{ZONE}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                   "\r\n".encode())
        assert c.read_response(head_only=True).status == 101
        want = b"last-words" * 1000
        c.send_raw(want)
        c.sock.shutdown(socket.SHUT_WR)  # the backend echoes until it reads EOF, then closes
        c.sock.settimeout(5)
        got = c.buf
        while chunk := c.sock.recv(65536):
            got += chunk
        assert got == want


def test_client_address_headers_replace_untrusted_values(backends, gateway):
    (b,) = backends(1)
    g = gateway(app_routes(("shop", [b.address])))
    r = get(g.http, f"shop.{ZONE}", "/headers", headers={
        "X-Forwarded-For": "6.6.6.6", "Forwarded": "for=6.6.6.6", "X-Forwarded-Proto": "https",
        "X-Real-IP": "6.6.6.6", "X-Geomesh-Forwarded": "evil", "Connection": "keep-alive, X-Secret",
        "X-Secret": "hop", "Keep-Alive": "timeout=5", "X-App": "kept"})
    seen = json.loads(r.body)
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
    assert seen["forwarded"] == ["for=127.0.0.1;proto=http"]
    assert seen["x-forwarded-proto"] == ["http"]
    for dropped in ("x-real-ip", "x-geomesh-forwarded", "x-secret", "keep-alive", "connection"):
        assert dropped not in seen, dropped
    assert seen["x-app"] == ["kept"]
    assert seen["host"] == [f"shop.{ZONE}"]


def test_routes_update_keeps_connections(backends, gateway):
    b1, b2 = backends(2)
    data = app_routes(("shop", [b1.address]))
    g = gateway(data)
    with Conn(g.http) as c:
        assert c.request(f"shop.{ZONE}").body == b"b1"
        assert c.request(f"blog.{ZONE}").status == 404
        g.update(app_routes(("shop", [b1.address]), ("blog", [b2.address])))
        assert c.request(f"blog.{ZONE}").body == b"b2"
        assert c.request(f"shop.{ZONE}").body == b"b1"


def test_ipv6_listener_and_backend(backends, gateway):
    try:
        s = socket.socket(socket.AF_INET6)
        s.bind(("::1", 0))
        s.close()
    except OSError:
        import pytest
        pytest.skip("no IPv6 loopback on this host")
    (b,) = backends(1, host="::1")
    g = gateway(app_routes(("shop", [{"address": "::1", "port": b.port}])), http=("[::1]:0",))
    r = get(g.http, f"shop.{ZONE}", "/headers")
    assert json.loads(r.body)["forwarded"] == ['for="[::1]";proto=http']


def test_a_slow_reader_does_not_make_the_gateway_buffer_the_response(backends, gateway):
    (b,) = backends(1)
    g = gateway(app_routes(("shop", [b.address])))
    size = 64 * 1024 * 1024
    with Conn(g.http) as c:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        c.send_raw(f"GET /big?bytes={size} HTTP/1.1\r\nHost: shop.{ZONE}\r\n\r\n".encode())
        import time
        time.sleep(1.0)  # read nothing: the gateway must stop reading from the backend
        buffered = g.run(lambda: max(x.transport.get_write_buffer_size() for x in g.server.connections))
        assert buffered < 8 * 1024 * 1024, buffered
        got = 0
        head = b""
        while b"\r\n\r\n" not in head:
            head += c.sock.recv(65536)
        got = len(head.split(b"\r\n\r\n", 1)[1])
        while got < size:
            chunk = c.sock.recv(1 << 20)
            assert chunk
            got += len(chunk)
        assert got == size
