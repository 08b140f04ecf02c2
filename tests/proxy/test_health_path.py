"""The reserved health path over real sockets: a gateway answers `GET /.well-known/geomesh/health`
itself, for any Host, on its plain and TLS listeners, naming itself; the outside-in prober of
another gateway (`reach_prober.probe_once`) accepts that answer, and refuses it under another name."""

from __future__ import annotations

import asyncio

from regional_gateway.reach_prober import (
    HEALTH_HEADER,
    HEALTH_PATH,
    ProbeTarget,
    probe_once,
    probe_tls_context,
)
from tests.proxy.certs import TestCA
from tests.proxy.client import Conn, get

ZONE = "apps.test"


def routes(ca: TestCA, backend: str) -> dict:
    cert, key = ca.issue("zone", [f"*.{ZONE}", ZONE])
    return {"zone": ZONE, "name": "gw-x", "region": "eu", "health": {"check": "none"},
            "apps": [{"name": "shop", "backends": [backend]}], "certificates": [{"cert": str(cert), "key": str(key)}]}


def test_health_path_is_answered_by_the_gateway_for_any_host(backends, gateway, tmp_path):
    (shop,) = backends(1, prefix="shop")
    ca = TestCA(tmp_path)
    g = gateway(routes(ca, shop.address), https=("127.0.0.1:0",), mesh=("127.0.0.1:0",))
    # any Host: the gateway's own name, an unknown name, a local app on the fast path, an IP
    for host in ("gw-x", "nowhere.example", f"shop.{ZONE}", "127.0.0.1"):
        r = get(g.http, host, HEALTH_PATH)
        assert r.status == 200 and r.header(HEALTH_HEADER) == "gw-x" and r.body == b"gw-x\n", (host, r)
    assert shop.hits == 0  # none of them reached the app
    # other paths of the app still go to the app; the reserved path's prefix alone is not reserved
    assert get(g.http, f"shop.{ZONE}", "/").header("x-backend") == "shop1"
    assert get(g.http, f"shop.{ZONE}", HEALTH_PATH + "x").header("x-backend") == "shop1"
    # keep-alive and pipelining: answered in its turn, the connection stays usable
    with Conn(g.http) as c:
        c.send_raw(f"GET / HTTP/1.1\r\nHost: shop.{ZONE}\r\n\r\n"
                   f"GET {HEALTH_PATH} HTTP/1.1\r\nHost: x\r\n\r\n"
                   f"GET / HTTP/1.1\r\nHost: shop.{ZONE}\r\n\r\n".encode())
        first, second, third = c.read_response(), c.read_response(), c.read_response()
        assert first.header("x-backend") == "shop1" and third.header("x-backend") == "shop1"
        assert second.status == 200 and second.header(HEALTH_HEADER) == "gw-x"
        # a body sent with it is read and dropped; Connection: close closes after the answer
        c.send_raw(f"GET {HEALTH_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
                   .encode())
        r = c.read_response()
        assert r.status == 200 and r.header("connection") == "close" and c.closed_by_peer()
    # on the mesh listener too (a forwarded request's headers change nothing)
    r = get(g.mesh, "gw-x", HEALTH_PATH, headers={"X-Geomesh-Forwarded": "gw-y"})
    assert r.status == 200 and r.header(HEALTH_HEADER) == "gw-x"
    # over TLS (Host = the SNI name)
    with Conn(g.https, tls=ca.client_context(), server_name=f"shop.{ZONE}") as c:
        r = c.request(f"shop.{ZONE}", HEALTH_PATH)
        assert r.status == 200 and r.header(HEALTH_HEADER) == "gw-x"
    # the prober's view: the plain request plus the TLS handshake succeed; another name fails
    target = ProbeTarget("gw-x", "eu", "127.0.0.1", g.http[1], g.https[1])
    ok, _, why = asyncio.run(probe_once(target, 2.0, probe_tls_context()))
    assert ok, why
    ok, _, why = asyncio.run(probe_once(ProbeTarget("gw-y", "eu", "127.0.0.1", g.http[1]), 2.0, None))
    assert not ok and why == "answered by 'gw-x'"
