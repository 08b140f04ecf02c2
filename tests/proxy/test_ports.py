"""The port allow-list over real sockets (probe finding 15): `<app>-<port>` reaches the app's
instance ports and declared ports only; any other port is refused the way an unknown name is (404
naming the rule, or the TLS `unrecognized_name` alert) and no connection to it is ever tried, so the
name form is neither a way into other services on an instance's host nor a port-scan oracle. A
listener on the refused port proves the "never tried": it must see no connection at all."""

from __future__ import annotations

import socket
import ssl

import pytest
from prometheus_client import REGISTRY

from tests.proxy.backends import Backend, RawListener
from tests.proxy.certs import TestCA
from tests.proxy.client import Conn, get

ZONE = "apps.test"


class Listener(RawListener):
    """A TCP port that counts the connections it accepts (the "other service" on the host)."""


@pytest.fixture
def secret():
    s = Listener()
    yield s
    s.close()


def refused(resp, port: int) -> None:
    assert resp.status == 404, resp
    assert resp.header("x-geomesh-error") == "unknown-host"
    assert f"does not expose port {port}".encode() in resp.body, resp.body


def refusals(app: str) -> float:
    return REGISTRY.get_sample_value("geomesh_gateway_ports_refused_total", {"app": app}) or 0.0


def test_http_names_reach_only_the_exposed_ports(backends, gateway, secret):
    web, extra = backends(2, prefix="web")
    doc = {"zone": ZONE, "health": {"check": "none"},
           "apps": [{"name": "web", "ports": [extra.port],
                     "backends": [{"address": "127.0.0.1", "port": web.port, "id": "web-i1"}]}]}
    g = gateway(doc)
    before = refusals("web")
    assert get(g.http, f"web.{ZONE}").header("x-backend") == "web1"
    assert get(g.http, f"web-{web.port}.{ZONE}").header("x-backend") == "web1"  # the instance's port
    assert get(g.http, f"web-{extra.port}.{ZONE}").header("x-backend") == "web2"  # declared
    assert get(g.http, f"web-i1-{extra.port}.{ZONE}").header("x-backend") == "web2"
    refused(get(g.http, f"web-{secret.port}.{ZONE}"), secret.port)
    refused(get(g.http, f"web-i1-{secret.port}.{ZONE}"), secret.port)
    refused(get(g.http, f"web-{secret.port}.{ZONE}"), secret.port)  # (cached: the same answer)
    assert refusals("web") == before + 3
    # the default, no ports declared: the instance's own port only
    g.update({**doc, "apps": [{**doc["apps"][0], "ports": []}]})
    refused(get(g.http, f"web-{extra.port}.{ZONE}"), extra.port)
    assert get(g.http, f"web-{web.port}.{ZONE}").status == 200
    assert secret.accepted == 0
    assert extra.port != secret.port


def _alert(addr: tuple[str, int], name: str) -> str:
    """Open TLS to the gateway with SNI `name`: the alert it answers with, or "" if the handshake passes."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection(addr, timeout=5) as raw, ctx.wrap_socket(raw, server_hostname=name):
            return ""
    except ssl.SSLError as exc:
        return exc.reason or str(exc)


def _client_hello(server_name: str) -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_passthrough_and_h2_forms_are_refused_like_unknown_names(tmp_path, gateway, secret):
    """`s` and `g` names on an unexposed port: the same answer as a name that does not exist, both
    without a certificate for them (the alert) and with the zone's wildcard (TLS ends at the gateway,
    whose HTTP/1.1 answer is the 404); neither ever connects to the port."""
    sink = Backend("sink", raw=True)
    try:
        doc = {"zone": ZONE, "health": {"check": "none"}, "apps": [{"name": "vault", "backends": [sink.address]}]}
        g = gateway(doc, http=(), https=("127.0.0.1:0",))
        # allowed: the ClientHello goes to the backend byte for byte (the sink echoes it)
        hello = _client_hello(f"vault-{sink.port}s.{ZONE}")
        with socket.create_connection(g.https, timeout=5) as s:
            s.sendall(hello)
            echoed = b""
            while len(echoed) < len(hello):
                chunk = s.recv(65536)
                assert chunk, echoed
                echoed += chunk
        assert echoed == hello
        for form in ("s", "g"):
            unknown = _alert(g.https, f"nope-{secret.port}{form}.{ZONE}")
            assert unknown == "TLSV1_UNRECOGNIZED_NAME", unknown
            assert _alert(g.https, f"vault-{secret.port}{form}.{ZONE}") == unknown
        # with a certificate for the whole zone: terminated, and the 404 names the rule
        ca = TestCA(tmp_path)
        cert, key = ca.issue("zone", [f"*.{ZONE}"])
        g.update({**doc, "certificates": [{"cert": str(cert), "key": str(key)}]})
        ctx = ca.client_context(check_hostname=False)
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        for form in ("s", "g"):
            name = f"vault-{secret.port}{form}.{ZONE}"
            with Conn(g.https, tls=ctx, server_name=name) as c:
                assert c.sock.selected_alpn_protocol() != "h2"
                refused(c.request(name), secret.port)
            with Conn(g.https, tls=ctx, server_name=f"nope-{secret.port}{form}.{ZONE}") as c:
                assert c.request(f"nope-{secret.port}{form}.{ZONE}").status == 404
        assert secret.accepted == 0
    finally:
        sink.close()


def test_a_forwarded_name_meets_the_far_regions_list(backends, gateway, secret):
    """A routes file names another region's apps without their ports: gateway A forwards, the far
    gateway B applies its own list; an unexposed port is B's 404, never a connection on B's side."""
    (solo,) = backends(1, prefix="solo-us")

    def doc(name: str, region: str, apps: list, regions: list) -> dict:
        return {"zone": ZONE, "name": name, "region": region, "health": {"check": "none"},
                "apps": apps, "regions": regions}

    def region(name: str, gw: str, port: int) -> dict:
        return {"name": name, "latitude": 0 if name == "eu" else 40, "longitude": 0, "apps": ["solo"],
                "gateways": [{"name": gw, "mesh_ip": "127.0.0.1", "proxy_port": port}]}

    solo_app = [{"name": "solo", "backends": [solo.address]}]
    b = gateway(doc("gw-b", "us", solo_app, []), http=(), mesh=("127.0.0.1:0",))
    a = gateway(doc("gw-a", "eu", [], [region("us", "gw-b", b.mesh[1])]), mesh=("127.0.0.1:0",))
    assert get(a.http, f"solo-{solo.port}.{ZONE}").header("x-backend") == "solo-us1"
    refused(get(a.http, f"solo-{secret.port}.{ZONE}"), secret.port)
    assert secret.accepted == 0
    assert a.run(lambda: dict(a.server.metrics.forwarded)) == {("solo", "us"): 2}  # B refused, not A
