"""`g` names through the gateway with real gRPC (grpcio servers and clients): each call — one
HTTP/2 stream — is balanced on its own, large messages and streams pass HTTP/2 flow control,
the client's address reaches the app, and failures are gRPC statuses, not dropped connections."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections import Counter

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from tests.proxy.certs import TestCA
from tests.proxy.grpc_backends import GrpcBackend, gateway_channel, method, start_on_one_port, who

ZONE = "apps.test"


@pytest.fixture
def ca(tmp_path):
    return TestCA(tmp_path)


@pytest.fixture
def grpc_backends():
    made: list[GrpcBackend] = []

    def make(n: int, prefix: str = "g", first_host: int = 11) -> list[GrpcBackend]:
        out = start_on_one_port([f"{prefix}{i + 1}" for i in range(n)], first_host)
        made.extend(out)
        return out

    yield make
    for b in made:
        b.stop()


def g_routes(ca: TestCA, apps: list[dict], **top) -> dict:
    cert, key = ca.issue("zone", [f"*.{ZONE}", ZONE])
    return {"zone": ZONE, "health": {"check": "none"}, "apps": apps, **top,
            "certificates": [{"cert": str(cert), "key": str(key)}]}


def app(name: str, bs: list[GrpcBackend], lb: str = "round_robin", **kw) -> dict:
    return {"name": name, "lb": lb, "backends": [b.address for b in bs], **kw}


def g_name(name: str, bs: list[GrpcBackend]) -> str:
    return f"{name}-{bs[0].port}g.{ZONE}"


def test_round_robin_spreads_the_calls_of_one_channel(ca, grpc_backends, gateway):
    bs = grpc_backends(3)
    g = gateway(g_routes(ca, [app("api", bs)]), http=(), https=("127.0.0.1:0",))
    with gateway_channel(g.https, ca.path, g_name("api", bs)) as ch:
        seen = Counter(who(ch)["backend"] for _ in range(30))
        counts = g.run(lambda: g.server.connection_counts())
    assert seen == {"g1": 10, "g2": 10, "g3": 10}  # one connection, calls spread one by one
    assert counts["h2"] == 1 and counts["tunnel"] == 0


def test_ip_hash_keeps_a_client_on_one_backend(ca, grpc_backends, gateway):
    bs = grpc_backends(3)
    g = gateway(g_routes(ca, [app("api", bs, lb="ip_hash")]), http=(), https=("127.0.0.1:0",))
    with gateway_channel(g.https, ca.path, g_name("api", bs)) as ch:
        seen = Counter(who(ch)["backend"] for _ in range(12))
    assert len(seen) == 1 and sum(seen.values()) == 12


def test_least_connections_counts_calls_in_flight(ca, grpc_backends, gateway):
    bs = grpc_backends(2)
    g = gateway(g_routes(ca, [app("api", bs, lb="least_connections")]), http=(), https=("127.0.0.1:0",))
    with gateway_channel(g.https, ca.path, g_name("api", bs)) as ch:
        held = method(ch, "Hold").future(b"", timeout=20)  # one call parked on a backend
        deadline = time.monotonic() + 10
        while sum(b.held for b in bs) == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        busy = next(b for b in bs if b.held)
        free = next(b for b in bs if b is not busy)
        seen = Counter(who(ch)["backend"] for _ in range(8))
        assert seen == {free.name: 8}  # new calls avoid the backend with a call in flight
        busy.release()
        assert json.loads(held.result(timeout=10))["backend"] == busy.name


def test_client_address_headers_replace_what_the_client_sent(ca, grpc_backends, gateway):
    bs = grpc_backends(1)
    g = gateway(g_routes(ca, [app("api", bs)]), http=(), https=("127.0.0.1:0",))
    with gateway_channel(g.https, ca.path, g_name("api", bs)) as ch:
        meta = who(ch, metadata=(("x-forwarded-for", "6.6.6.6"), ("x-app", "kept")))["metadata"]
    assert meta["x-forwarded-for"] == "127.0.0.1"
    assert meta["x-forwarded-proto"] == "https"
    assert meta["forwarded"] == "for=127.0.0.1;proto=https"
    assert meta["x-app"] == "kept"


def test_large_messages_and_streams_pass_flow_control(ca, grpc_backends, gateway):
    bs = grpc_backends(1)
    g = gateway(g_routes(ca, [app("api", bs)]), http=(), https=("127.0.0.1:0",))
    big = bytes(range(256)) * 12_000  # ~3 MB: many times any HTTP/2 window on both sides
    with gateway_channel(g.https, ca.path, g_name("api", bs)) as ch:
        assert method(ch, "Echo")(big, timeout=30) == big
        msgs = [f"message {i}".encode() * 100 for i in range(200)]
        got = list(method(ch, "Stream", stream=True)(iter(msgs), timeout=30))
        assert got == msgs
        # several large calls at once on the one connection
        calls = [method(ch, "Echo").future(big[: 400_000 + i], timeout=30) for i in range(4)]
        assert [c.result() for c in calls] == [big[: 400_000 + i] for i in range(4)]


def test_no_backend_is_a_grpc_unavailable_naming_the_cause(ca, grpc_backends, gateway):
    (b,) = grpc_backends(1)
    port = b.port
    b.stop()
    g = gateway(g_routes(ca, [{"name": "api", "backends": [f"127.0.0.11:{port}"]}]), http=(), https=("127.0.0.1:0",))
    with gateway_channel(g.https, ca.path, f"api-{port}g.{ZONE}") as ch:
        with pytest.raises(grpc.RpcError) as err:
            who(ch)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert err.value.details() == f"cannot connect to 127.0.0.11:{port}: Connection refused"
        with pytest.raises(grpc.RpcError) as err:  # the same connection keeps answering (an ejected backend
            who(ch)                                  # is still the last resort, so it is tried again)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert err.value.details() == f"cannot connect to 127.0.0.11:{port}: Connection refused"
    # an app with no backend at all: the policy's own answer
    g.update(g_routes(ca, [{"name": "api", "backends": [], "ports": [port]}]))
    with gateway_channel(g.https, ca.path, f"api-{port}g.{ZONE}") as ch:
        with pytest.raises(grpc.RpcError) as err:
            who(ch)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert err.value.details().startswith("no healthy backend for app 'api'")


def test_a_dead_backend_is_skipped_and_the_channel_survives(ca, grpc_backends, gateway):
    bs = grpc_backends(3)
    g = gateway(g_routes(ca, [app("api", bs)]), http=(), https=("127.0.0.1:0",))
    with gateway_channel(g.https, ca.path, g_name("api", bs)) as ch:
        assert Counter(who(ch)["backend"] for _ in range(3)) == {"g1": 1, "g2": 1, "g3": 1}
        bs[1].stop()
        seen = Counter()
        for _ in range(20):
            try:
                seen[who(ch)["backend"]] += 1
            except grpc.RpcError as exc:  # a call already on g2's connection when it died
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
                seen["failed"] += 1
        assert seen["g2"] == 0 and seen["failed"] <= 1 and seen["g1"] + seen["g3"] >= 19


def _h2_socket(g, ca: TestCA, name: str) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(ca.path))
    ctx.set_alpn_protocols(["h2"])
    s = ctx.wrap_socket(socket.create_connection(g.https, timeout=10), server_hostname=name)
    assert s.selected_alpn_protocol() == "h2"
    return s


def _read_all(s: ssl.SSLSocket) -> bytes:
    got = b""
    while chunk := s.recv(65536):
        got += chunk
    return got


def _frame_types(data: bytes) -> list[int]:
    out, pos = [], 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos:pos + 3], "big")
        out.append(data[pos + 3])
        pos += 9 + length
    return out


def test_malformed_http2_gets_a_goaway_and_the_gateway_keeps_serving(ca, grpc_backends, gateway):
    bs = grpc_backends(1)
    g = gateway(g_routes(ca, [app("api", bs)]), http=(), https=("127.0.0.1:0",))
    name = g_name("api", bs)
    with _h2_socket(g, ca, name) as s:
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")  # DATA on stream 0
        frames = _frame_types(_read_all(s))  # the gateway's SETTINGS, then GOAWAY, then the close
    assert frames[0] == 0x4 and 0x7 in frames
    assert counters(g)["h2-protocol-error"] == 1
    with gateway_channel(g.https, ca.path, name) as ch:
        assert who(ch)["backend"] == "g1"


def test_plain_http2_requests_get_http_errors(ca, gateway):
    """Not every h2c app is gRPC: a plain HTTP/2 request with nowhere to go gets an HTTP status."""
    g = gateway(g_routes(ca, [{"name": "web", "backends": [], "ports": [8080]}]), http=(), https=("127.0.0.1:0",))
    name = f"web-8080g.{ZONE}"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(":method", "GET"), (":scheme", "https"), (":authority", name), (":path", "/")],
                      end_stream=True)
    with _h2_socket(g, ca, name) as s:
        s.sendall(conn.data_to_send())
        status, body, ended = None, b"", False
        while not ended:
            data = s.recv(65536)
            assert data, "connection closed before the response ended"
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = dict(ev.headers)[b":status"]
                    error = dict(ev.headers)[b"x-geomesh-error"]
                elif isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                elif isinstance(ev, h2.events.StreamEnded):
                    ended = True
            s.sendall(conn.data_to_send())
    assert status == b"503" and error == b"no-healthy-backend"
    assert body.startswith(b"503 no healthy backend for app 'web'")


def counters(g) -> dict:
    return g.run(lambda: dict(g.server.metrics.errors))


def test_the_gateway_offers_large_receive_windows(ca, gateway):
    """256 KiB per stream and 1 MiB per connection, so a call forwarded between regions is not
    capped at HTTP/2's default 64 KiB per round trip."""
    g = gateway(g_routes(ca, [{"name": "api", "backends": [], "ports": [8080]}]), http=(), https=("127.0.0.1:0",))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    settings, window = None, 0
    with _h2_socket(g, ca, f"api-8080g.{ZONE}") as s:
        s.sendall(conn.data_to_send())
        deadline = time.monotonic() + 10
        while (settings is None or not window) and time.monotonic() < deadline:
            for ev in conn.receive_data(s.recv(65536)):
                if isinstance(ev, h2.events.RemoteSettingsChanged):
                    settings = {k: v.new_value for k, v in ev.changed_settings.items()}
                elif isinstance(ev, h2.events.WindowUpdated) and ev.stream_id == 0:
                    window += ev.delta
    assert settings[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE] == 256 * 1024
    assert settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] == 256
    assert window == 1024 * 1024 - 65535


def test_shutdown_lets_a_call_in_progress_finish(ca, grpc_backends, gateway):
    (b,) = grpc_backends(1)
    g = gateway(g_routes(ca, [app("api", [b])]), http=(), https=("127.0.0.1:0",))
    with gateway_channel(g.https, ca.path, g_name("api", [b])) as ch:
        held = method(ch, "Hold").future(b"", timeout=20)
        deadline = time.monotonic() + 10
        while not b.held and time.monotonic() < deadline:
            time.sleep(0.02)
        stopping = threading.Thread(target=lambda: g.call(g.server.shutdown(10)))
        stopping.start()
        time.sleep(0.3)
        assert stopping.is_alive()  # draining: waits for the call
        b.release()
        assert json.loads(held.result(timeout=10))["backend"] == "g1"
        stopping.join(10)
        assert not stopping.is_alive()


def test_tunnel_mode_keeps_a_connection_on_one_backend(ca, grpc_backends, gateway):
    """`g_mode = "tunnel"`: the clear HTTP/2 connection is a byte tunnel, so every call of one
    channel reaches the backend chosen when it connected; a second channel may go elsewhere."""
    bs = grpc_backends(3)
    g = gateway(g_routes(ca, [app("api", bs)]), http=(), https=("127.0.0.1:0",), g_mode="tunnel")
    channels = []
    for _ in range(2):
        with gateway_channel(g.https, ca.path, g_name("api", bs)) as ch:
            seen = Counter(who(ch)["backend"] for _ in range(9))
            counts = g.run(lambda: g.server.connection_counts())
        assert counts["tunnel"] == 1 and counts["h2"] == 0  # a byte tunnel, no HTTP/2 termination
        assert len(seen) == 1 and sum(seen.values()) == 9
        channels.append(next(iter(seen)))
    assert channels[0] != channels[1]  # round robin per connection
