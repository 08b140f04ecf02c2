"""Cross-region forwarding between two real gateway processes on loopback (standalone routes listing
the other gateway's mesh listener): nearest region first, failover to the next, one hop at most,
the forwarded mark trusted only on the mesh listener, TLS passthrough forwarded with PROXY v2, `g`
(terminated h2) calls forwarded as clear h2 after PROXY v2 with the name in an authority TLV.
(The same over WireGuard in network namespaces is the mesh end-to-end suite's job.)"""

from __future__ import annotations

import errno
import json
import socket
import time
import tomllib
from pathlib import Path

import grpc
import pytest

from regional_gateway.proxy import proxy_protocol
from tests.proxy.backends import Backend
from tests.proxy.certs import TestCA, san_of, server_context
from tests.proxy.client import Conn, get
from tests.proxy.grpc_backends import gateway_channel, h2_call, start_on_one_port, who

ZONE = "apps.test"
EU = (48.86, 2.35)
US = (40.71, -74.0)
ASIA = (35.68, 139.69)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def routes_toml(name: str, region: str, loc: tuple[float, float], apps: dict[str, list[str]],
                regions: list[tuple[str, tuple[float, float], list[str], str, int]]) -> str:
    out = [f'zone = "{ZONE}"', f'name = "{name}"', f'region = "{region}"',
           f"latitude = {loc[0]}", f"longitude = {loc[1]}",
           "[health]", 'check = "tcp"', "interval = 0.2", "fall = 1", "rise = 1"]
    for app, backends in apps.items():
        out += ["[[apps]]", f'name = "{app}"', "backends = [" + ", ".join(f'"{b}"' for b in backends) + "]"]
    for rname, rloc, rapps, gw, port in regions:
        out += ["[[regions]]", f'name = "{rname}"', f"latitude = {rloc[0]}", f"longitude = {rloc[1]}",
                "apps = [" + ", ".join(f'"{a}"' for a in rapps) + "]",
                f'gateways = [{{ name = "{gw}", mesh_ip = "127.0.0.1", proxy_port = {port} }}]']
    return "\n".join(out) + "\n"


def until_status(call, status: int, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        r = call()
        if r.status == status or time.monotonic() > deadline:
            return r
        time.sleep(0.05)


def start(gateway_process, tmp_path: Path, name: str, text: str, mesh_port: int, *extra: str):
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return gateway_process(path, "--http", "127.0.0.1:0", "--mesh", f"127.0.0.1:{mesh_port}", *extra)


def test_forwarding_to_the_nearest_region_then_the_next(backends, gateway_process, tmp_path):
    (solo_b,) = backends(1, prefix="solo-us")
    (solo_c,) = backends(1, prefix="solo-asia")
    mesh_a, mesh_b, mesh_c = free_port(), free_port(), free_port()
    b = start(gateway_process, tmp_path, "gw-b", routes_toml("gw-b", "us", US, {"solo": [solo_b.address]}, []),
              mesh_b)
    c = start(gateway_process, tmp_path, "gw-c", routes_toml("gw-c", "asia", ASIA, {"solo": [solo_c.address]}, []),
              mesh_c)
    a = start(gateway_process, tmp_path, "gw-a", routes_toml("gw-a", "eu", EU, {}, [
        ("asia", ASIA, ["solo"], "gw-c", mesh_c), ("us", US, ["solo"], "gw-b", mesh_b)]), mesh_a)
    r = get(a.http, f"solo.{ZONE}", "/headers")
    assert r.status == 200 and r.header("x-backend") == "solo-us1"  # us is nearer to eu than asia
    seen = json.loads(r.body)
    assert seen["x-geomesh-forwarded"] == ["gw-a"]
    assert seen["x-forwarded-for"] == ["127.0.0.1, 127.0.0.1"]  # the client, then gateway A
    assert seen["forwarded"] == ["for=127.0.0.1;proto=http, for=127.0.0.1"]
    # the us gateway goes away: the next nearest region answers
    b.stop()
    for _ in range(5):
        r = get(a.http, f"solo.{ZONE}")
        assert r.status == 200 and r.header("x-backend") == "solo-asia2"
    assert c.proc.poll() is None


def test_local_first_then_forward_and_never_twice(backends, gateway_process, tmp_path):
    (shop_a,) = backends(1, prefix="shop-eu")
    (shop_b,) = backends(1, prefix="shop-us")
    (ghost_a, ghost_b) = backends(2, prefix="ghost")
    mesh_a, mesh_b = free_port(), free_port()
    a = start(gateway_process, tmp_path, "gw-a", routes_toml(
        "gw-a", "eu", EU, {"shop": [shop_a.address], "ghost": [ghost_a.address]},
        [("us", US, ["shop", "ghost"], "gw-b", mesh_b)]), mesh_a)
    b = start(gateway_process, tmp_path, "gw-b", routes_toml(
        "gw-b", "us", US, {"shop": [shop_b.address], "ghost": [ghost_b.address]},
        [("eu", EU, ["shop", "ghost"], "gw-a", mesh_a)]), mesh_b)
    assert {get(a.http, f"shop.{ZONE}").header("x-backend") for _ in range(4)} == {"shop-eu1"}
    shop_a.stop()  # no healthy local instance: the request crosses to us
    assert {get(a.http, f"shop.{ZONE}").header("x-backend") for _ in range(4)} == {"shop-us2"}
    # both regions claim 'ghost' but neither can serve it: one hop, then a 503 from the far side
    ghost_a.stop()
    ghost_b.stop()
    # (until both probes have seen their backend die; before that the last-resort retry answers 502)
    r = until_status(lambda: get(a.http, f"ghost.{ZONE}"), 503)
    assert b"region 'us'" in r.body and b"already forwarded once" in r.body
    # a client cannot forge the mark on a public listener: B drops it and forwards to A (which stops)
    r = until_status(lambda: get(b.http, f"ghost.{ZONE}", headers={"X-Geomesh-Forwarded": "forged"}), 503)
    assert r.status == 503 and b"region 'eu'" in r.body and b"already forwarded once" in r.body, r.body
    # ... but on the mesh listener the mark is believed: B answers itself
    r = get(b.mesh, f"ghost.{ZONE}", headers={"X-Geomesh-Forwarded": "gw-a"})
    assert r.status == 503 and b"region 'us'" in r.body


def test_tls_passthrough_is_forwarded_with_the_client_address(gateway_process, tmp_path):
    ca = TestCA(tmp_path)
    cert, key = ca.issue("vault", ["vault.internal"])
    vault = Backend("vault-us", ssl_context=server_context(cert, key))
    try:
        mesh_a, mesh_b = free_port(), free_port()
        b = start(gateway_process, tmp_path, "gw-b", routes_toml("gw-b", "us", US, {"vault": [vault.address]}, []),
                  mesh_b)
        a = start(gateway_process, tmp_path, "gw-a", routes_toml(
            "gw-a", "eu", EU, {}, [("us", US, ["vault"], "gw-b", mesh_b)]), mesh_a, "--https", "127.0.0.1:0")
        name = f"vault-{vault.port}s.{ZONE}"
        with Conn(a.addresses["https"][0], tls=ca.client_context(check_hostname=False), server_name=name) as c:
            assert san_of(c.sock.getpeercert(binary_form=True)) == ["vault.internal"]
            r = c.request(name)
            assert r.status == 200 and r.header("x-backend") == "vault-us"
        assert b.proc.poll() is None
    finally:
        vault.close()


def test_trusted_peers_without_a_mesh(backends, gateway):
    """Gateways that reach each other on public addresses (no WireGuard, e.g. a loopback lab): the
    forwarded mark is believed only from the listed peer addresses."""
    (ghost_b,) = backends(1, prefix="ghost")
    ghost_b.stop()
    b = gateway({"zone": ZONE, "name": "gw-b", "region": "us", "health": {"check": "tcp", "interval": 0.1, "fall": 1},
                 "apps": [{"name": "ghost", "backends": [ghost_b.address]}]}, trusted_peers=("127.0.0.1",))
    a = gateway({"zone": ZONE, "name": "gw-a", "region": "eu", "health": {"check": "none"},
                 "regions": [{"name": "us", "latitude": US[0], "longitude": US[1], "apps": ["ghost"],
                              "gateways": [{"name": "gw-b", "mesh_ip": "127.0.0.1", "proxy_port": b.http[1]}]}]})
    # from A (connecting from 127.0.0.1, a trusted peer): B believes the mark and does not forward again
    r = until_status(lambda: get(a.http, f"ghost.{ZONE}", source="127.0.0.3"), 503)  # once B's probe saw it die
    assert b"region 'us'" in r.body and b"already forwarded once" in r.body
    r = get(b.http, f"ghost.{ZONE}", source="127.0.0.1", headers={"X-Geomesh-Forwarded": "gw-a"})
    assert r.status == 503 and b"already forwarded once" in r.body
    # from anybody else the mark is dropped (B has nowhere to forward, so it says so)
    r = get(b.http, f"ghost.{ZONE}", source="127.0.0.4", headers={"X-Geomesh-Forwarded": "gw-a"})
    assert r.status == 503 and b"no other region hosts it" in r.body


def test_mesh_address_behind_a_wildcard_listener(backends, gateway):
    """proxy_listen 0.0.0.0 and the mesh address on the same port: Linux allows one bind, so the mesh
    listener is recognised by the local address of connections the wildcard listener accepts."""
    (ghost,) = backends(1, prefix="ghost")
    ghost.stop()
    doc = {"zone": ZONE, "name": "gw-b", "region": "us", "health": {"check": "tcp", "interval": 0.1, "fall": 1},
           "apps": [{"name": "ghost", "backends": [ghost.address]}],
           "regions": [{"name": "eu", "latitude": EU[0], "longitude": EU[1], "apps": ["ghost"],
                        "gateways": [{"name": "gw-a", "mesh_ip": "127.0.0.1", "proxy_port": free_port()}]}]}
    for attempt in range(5):  # a wildcard bind collides with any socket on the port: pick another
        port = free_port()
        try:
            g = gateway(doc, http=(f"0.0.0.0:{port}",), mesh=(f"127.0.0.2:{port}",))
            break
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or attempt == 4:
                raise
    assert g.server.addresses["mesh"] == [("127.0.0.2", port)]
    # on the mesh address the mark is believed: no second hop, B answers itself
    r = until_status(lambda: get(("127.0.0.2", port), f"ghost.{ZONE}", headers={"X-Geomesh-Forwarded": "gw-a"}), 503)
    assert b"already forwarded once" in r.body
    # on another local address it is a public connection: the mark is dropped and B tries to forward
    r = get(("127.0.0.1", port), f"ghost.{ZONE}", headers={"X-Geomesh-Forwarded": "gw-a"})
    assert r.status == 502 and b"cannot connect to gateway:gw-a" in r.body


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # an empty SETTINGS frame, as a client sends next


def region_doc(ca: TestCA | None, name: str, region: str, loc: tuple[float, float], apps: dict[str, list[str]],
               regions: list[tuple[str, tuple[float, float], list[str], str, int]]) -> dict:
    """`routes_toml` as a routes document for the in-process `gateway` fixture, with the zone's
    wildcard certificate when `ca` is given (the gateway that terminates `g` names needs it)."""
    doc = tomllib.loads(routes_toml(name, region, loc, apps, regions))
    if ca is not None:
        cert, key = ca.issue(f"zone-{name}", [f"*.{ZONE}"])
        doc["certificates"] = [{"cert": str(cert), "key": str(key)}]
    return doc


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        assert chunk, f"connection ended after {got!r}"
        got += chunk
    return got


def counters(g, name: str) -> dict:
    """A copy of one of the gateway's metric dicts (forwarded, errors), read on its loop."""
    return g.run(lambda: dict(getattr(g.server.metrics, name)))


def test_g_calls_are_forwarded_and_balanced_in_the_far_region(gateway, tmp_path):
    """A has no backend for the app: its gRPC calls go to B over the mesh (PROXY v2 with the client
    address and the name), and B spreads them over its backends call by call."""
    ca = TestCA(tmp_path)
    bs = start_on_one_port(["us-1", "us-2"], first_host=21)
    try:
        b = gateway(region_doc(None, "gw-b", "us", US, {"grpc": [x.address for x in bs]}, []), http=(),
                    mesh=("127.0.0.1:0",))
        a = gateway(region_doc(ca, "gw-a", "eu", EU, {}, [("us", US, ["grpc"], "gw-b", b.mesh[1])]),
                    http=(), https=("127.0.0.1:0",), mesh=("127.0.0.1:0",))
        with gateway_channel(a.https, ca.path, f"grpc-{bs[0].port}g.{ZONE}") as ch:
            answers = [who(ch) for _ in range(6)]
        assert [x["backend"] for x in answers] == ["us-1", "us-2"] * 3
        assert {x["metadata"]["x-forwarded-for"] for x in answers} == {"127.0.0.1"}  # the client, not A
        assert counters(a, "forwarded") == {("grpc", "us"): 6}
        assert counters(b, "forwarded") == {}
    finally:
        for x in bs:
            x.stop()


def test_a_forwarded_g_call_is_not_forwarded_again(gateway, tmp_path):
    """Both regions claim the app, neither has a backend: A forwards once, B answers UNAVAILABLE
    rather than sending it back."""
    ca = TestCA(tmp_path)
    def declared(doc: dict) -> dict:  # no backend: the port is exposed by declaring it
        doc["apps"][0]["ports"] = [50051]
        return doc

    b = gateway(declared(region_doc(None, "gw-b", "us", US, {"grpc": []}, [])), http=(), mesh=("127.0.0.1:0",))
    a = gateway(declared(region_doc(ca, "gw-a", "eu", EU, {"grpc": []}, [("us", US, ["grpc"], "gw-b", b.mesh[1])])),
                http=(), https=("127.0.0.1:0",), mesh=("127.0.0.1:0",))
    b.update(declared(region_doc(None, "gw-b", "us", US, {"grpc": []}, [("eu", EU, ["grpc"], "gw-a", a.mesh[1])])))
    with gateway_channel(a.https, ca.path, f"grpc-50051g.{ZONE}") as ch, pytest.raises(grpc.RpcError) as err:
        who(ch)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "already forwarded once" in err.value.details()
    assert counters(a, "forwarded") == {("grpc", "us"): 1}
    assert counters(b, "forwarded") == {}  # no second hop back to eu
    assert counters(b, "errors") == {"no-healthy-backend": 1}


def test_forwarded_g_with_a_name_that_is_not_a_g_name_is_refused(gateway):
    sink = Backend("h2c-us", raw=True)
    try:
        b = gateway(region_doc(None, "gw-b", "us", US, {"grpc": [sink.address]}, []), http=(),
                    mesh=("127.0.0.1:0",))
        for authority in (f"grpc-{sink.port}s.{ZONE}", f"grpc.{ZONE}", "nope.example", ""):
            with Conn(b.mesh) as c:
                c.send_raw(proxy_protocol.encode_v2("127.0.0.1", 40000, "127.0.0.1", 443, authority=authority)
                           + H2_PREFACE)
                assert c.closed_by_peer(), authority
        assert counters(b, "errors") == {"bad-forwarded-h2": 4}
        # a header whose authority TLV runs past its end: refused as a bad PROXY header, with a 400
        header = proxy_protocol.encode_v2("127.0.0.1", 40000, "127.0.0.1", 443, authority=f"grpc-{sink.port}g.{ZONE}")
        with Conn(b.mesh) as c:
            c.send_raw(header[:29] + b"\xff" + header[30:] + H2_PREFACE)  # the TLV's length 0x0015 -> 0xff15
            r = c.read_response()
        assert r.status == 400 and b"runs past the header end" in r.body
        assert sink.received == []
    finally:
        sink.close()


def test_proxy_v2_with_an_authority_on_a_public_listener_is_not_a_forward(gateway):
    sink = Backend("h2c", raw=True)
    try:
        g = gateway(region_doc(None, "gw-b", "us", US, {"grpc": [sink.address]}, []), mesh=("127.0.0.1:0",))
        header = proxy_protocol.encode_v2("203.0.113.9", 40000, "127.0.0.1", 443, authority=f"grpc-{sink.port}g.{ZONE}")
        with Conn(g.http) as c:
            c.send_raw(header + H2_PREFACE + H2_SETTINGS)
            r = c.read_response()
        assert r.status == 400 and r.header("x-geomesh-error") == "bad-request"
        assert sink.received == []
        assert counters(g, "errors").get("bad-forwarded-h2") is None
    finally:
        sink.close()


def test_a_trusted_peer_may_forward_tunnels_to_the_public_listener(gateway):
    """Gateways without a mesh (`--trusted-peers`): a forwarded g connection from a listed peer
    address is believed on the plain listener; the same bytes from any other address are a 400."""
    (app_backend,) = start_on_one_port(["us-1"], first_host=31)
    try:
        g = gateway(region_doc(None, "gw-b", "us", US, {"grpc": [app_backend.address]}, []),
                    trusted_peers=("127.0.0.5",))
        name = f"grpc-{app_backend.port}g.{ZONE}"
        header = proxy_protocol.encode_v2("203.0.113.9", 40000, "127.0.0.1", 443, authority=name)
        with socket.create_connection(g.http, timeout=10, source_address=("127.0.0.5", 0)) as s:
            headers, message, trailers = h2_call(s, name, "/geomesh.test.Echo/Who", b"hi", preamble=header)
        assert headers[b":status"] == b"200" and trailers[b"grpc-status"] == b"0"
        answer = json.loads(message)
        assert answer["backend"] == "us-1" and answer["metadata"]["x-forwarded-for"] == "203.0.113.9"
        with Conn(g.http, source="127.0.0.6") as c:
            c.send_raw(header + H2_PREFACE + H2_SETTINGS)
            r = c.read_response()
        assert r.status == 400 and r.header("x-geomesh-error") == "bad-request"
        assert app_backend.calls == 1  # nothing more reached the app
    finally:
        app_backend.stop()


def test_tunnel_mode_forwards_the_g_connection_with_its_name(gateway, tmp_path):
    """`g_mode = "tunnel"` on A: the whole clear HTTP/2 connection goes to B after a PROXY v2 header
    naming the `g` host; B (streams mode) serves its calls from its own backends."""
    ca = TestCA(tmp_path)
    bs = start_on_one_port(["us-1", "us-2"], first_host=41)
    try:
        b = gateway(region_doc(None, "gw-b", "us", US, {"grpc": [x.address for x in bs]}, []), http=(),
                    mesh=("127.0.0.1:0",))
        a = gateway(region_doc(ca, "gw-a", "eu", EU, {}, [("us", US, ["grpc"], "gw-b", b.mesh[1])]),
                    http=(), https=("127.0.0.1:0",), mesh=("127.0.0.1:0",), g_mode="tunnel")
        with gateway_channel(a.https, ca.path, f"grpc-{bs[0].port}g.{ZONE}") as ch:
            answers = [who(ch) for _ in range(4)]
        assert [x["backend"] for x in answers] == ["us-1", "us-2"] * 2  # B balances the tunnelled calls
        assert {x["metadata"]["x-forwarded-for"] for x in answers} == {"127.0.0.1"}
        assert counters(a, "forwarded") == {("grpc", "us"): 1}  # one connection forwarded
    finally:
        for x in bs:
            x.stop()
