"""TLS on the gateway: termination with the certificate picked by SNI, reload on change, TLS passthrough
reaching a TLS backend untouched (with PROXY v2 when asked), the `g` form's ALPN rule (its HTTP/2
proxying: test_h2.py), clear refusals."""

from __future__ import annotations

import json
import os
import socket
import ssl
import time

import pytest

from regional_gateway.proxy import client_hello, proxy_protocol
from tests.proxy.backends import Backend
from tests.proxy.certs import TestCA, san_of, server_context
from tests.proxy.client import Conn

ZONE = "apps.test"


@pytest.fixture
def ca(tmp_path):
    return TestCA(tmp_path)


def tls_routes(ca: TestCA, apps: list[dict], **top) -> dict:
    zone_cert, zone_key = ca.issue("zone", [f"*.{ZONE}", ZONE])
    shop_cert, shop_key = ca.issue("shop", ["www.shop.example"])
    return {"zone": ZONE, "health": {"check": "none"}, "apps": apps, **top,
            "certificates": [{"cert": str(zone_cert), "key": str(zone_key)},
                             {"cert": str(shop_cert), "key": str(shop_key)}]}


def test_sni_picks_the_certificate(ca, backends, gateway):
    (b,) = backends(1)
    data = tls_routes(ca, [{"name": "shop", "backends": [b.address]}],
                      domains=[{"fqdn": "www.shop.example", "app": "shop"}])
    g = gateway(data, http=(), https=("127.0.0.1:0",))
    ctx = ca.client_context()
    with Conn(g.https, tls=ctx, server_name=f"shop.{ZONE}") as c:
        assert f"*.{ZONE}" in san_of(c.sock.getpeercert(binary_form=True))
        assert c.sock.selected_alpn_protocol() in (None, "http/1.1")
        r = c.request(f"shop.{ZONE}", "/headers")
        seen = json.loads(r.body)
        assert seen["x-forwarded-proto"] == ["https"] and seen["forwarded"] == ["for=127.0.0.1;proto=https"]
        assert c.request(f"shop.{ZONE}").body == b"b1"  # keep-alive over TLS
    with Conn(g.https, tls=ctx, server_name="www.shop.example") as c:
        assert san_of(c.sock.getpeercert(binary_form=True)) == ["www.shop.example"]
        assert c.request("www.shop.example").status == 200
    # an unknown name gets the default certificate and a 404 naming the host
    loose = ca.client_context(check_hostname=False)
    with Conn(g.https, tls=loose, server_name="nope.example.org") as c:
        assert f"*.{ZONE}" in san_of(c.sock.getpeercert(binary_form=True))
        r = c.request("nope.example.org")
        assert r.status == 404 and b"not under the zone" in r.body
    # no SNI at all: routed by the Host header
    with Conn(g.https, tls=loose) as c:
        assert c.request(f"shop.{ZONE}").status == 200


def test_certificate_files_are_reloaded_on_change(ca, backends, gateway, tmp_path):
    (b,) = backends(1)
    data = tls_routes(ca, [{"name": "shop", "backends": [b.address]}])
    g = gateway(data, http=(), https=("127.0.0.1:0",), cert_check_interval=0.1)
    ctx = ca.client_context()
    with Conn(g.https, tls=ctx, server_name=f"shop.{ZONE}") as c:
        assert "renewed.example" not in san_of(c.sock.getpeercert(binary_form=True))
    new_cert, new_key = ca.issue("renewed", [f"*.{ZONE}", "renewed.example"])
    zone_cert = tmp_path / "zone.pem"
    os.replace(new_key, tmp_path / "zone.key")
    os.replace(new_cert, zone_cert)
    deadline = time.monotonic() + 5
    while True:
        with Conn(g.https, tls=ctx, server_name=f"shop.{ZONE}") as c:
            if "renewed.example" in san_of(c.sock.getpeercert(binary_form=True)):
                break
        assert time.monotonic() < deadline, "certificate not reloaded"
        time.sleep(0.1)
    # a broken file is refused and the loaded certificate stays in service
    zone_cert.write_text("not a certificate")
    time.sleep(0.4)
    with Conn(g.https, tls=ctx, server_name=f"shop.{ZONE}") as c:
        assert "renewed.example" in san_of(c.sock.getpeercert(binary_form=True))
        assert c.request(f"shop.{ZONE}").status == 200


def test_passthrough_reaches_a_tls_backend_untouched(ca, gateway, tmp_path):
    backend_cert, backend_key = ca.issue("backend", ["backend.internal"])
    tb = Backend("tls-backend", ssl_context=server_context(backend_cert, backend_key))
    try:
        data = tls_routes(ca, [{"name": "vault", "backends": [tb.address]}])
        g = gateway(data, http=(), https=("127.0.0.1:0",))
        ctx = ca.client_context(check_hostname=False)
        name = f"vault-{tb.port}s.{ZONE}"
        with Conn(g.https, tls=ctx, server_name=name) as c:
            # the certificate is the backend's own: the gateway did not terminate
            assert san_of(c.sock.getpeercert(binary_form=True)) == ["backend.internal"]
            r = c.request(name, "/headers")
            assert r.status == 200 and r.header("x-backend") == "tls-backend"
            assert "x-forwarded-for" not in json.loads(r.body)  # bytes were passed, not rewritten
    finally:
        tb.close()


def _client_hello(server_name: str, alpn: list[str] | None = None) -> bytes:
    ctx = ssl.create_default_context()
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_passthrough_sends_proxy_v2_when_the_app_asks(ca, gateway):
    sink = Backend("sink", raw=True)
    try:
        data = tls_routes(ca, [{"name": "pp", "proxy_protocol": True, "backends": [sink.address]}])
        g = gateway(data, http=(), https=("127.0.0.1:0",))
        hello = _client_hello(f"pp-{sink.port}s.{ZONE}")
        s = socket.create_connection(g.https, timeout=5)
        s.sendall(hello)
        echoed = b""
        header = proxy_protocol.encode_v2("127.0.0.1", s.getsockname()[1], *g.https)
        while len(echoed) < len(header) + len(hello):
            chunk = s.recv(65536)
            assert chunk
            echoed += chunk
        s.close()
        got = proxy_protocol.parse_v2(echoed)
        assert got is not None and got.source == "127.0.0.1" and got.destination_port == g.https[1]
        assert echoed[got.length:] == hello  # the ClientHello arrives byte for byte
    finally:
        sink.close()


def test_g_form_tells_an_http1_client_to_use_h2(ca, gateway):
    """A client that does not offer h2 (curl --http1.1, a browser on an old stack) cannot talk to
    an h2c app through a byte tunnel: it gets the TLS it asked for and a 421 naming the fix,
    not a tunnel that answers its request with HTTP/2 frames."""
    sink = Backend("h2c", raw=True)
    try:
        g = gateway(tls_routes(ca, [{"name": "grpc", "backends": [sink.address]}]), http=(), https=("127.0.0.1:0",))
        name = f"grpc-{sink.port}g.{ZONE}"
        for alpn in (["http/1.1"], None):
            with Conn(g.https, tls=ca.client_context(alpn=alpn), server_name=name) as c:
                assert c.sock.selected_alpn_protocol() in ("http/1.1", None)
                r = c.request(name)
            assert r.status == 421 and b"ALPN h2" in r.body, r.body
        assert sink.received == [] and sink.connections == 0
    finally:
        sink.close()


def test_tls_refusals_are_explicit(ca, backends, gateway, tmp_path):
    (b,) = backends(1)
    g = gateway({"zone": ZONE, "health": {"check": "none"}, "apps": [{"name": "shop", "backends": [b.address]}]},
                http=(), https=("127.0.0.1:0",))
    # no certificate at all: a TLS alert, not a silent close
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME|unrecognized name"):
        Conn(g.https, tls=ca.client_context(), server_name=f"shop.{ZONE}")
    # plain HTTP on the TLS port: a 400 saying so
    with Conn(g.https) as c:
        c.send_raw(f"GET / HTTP/1.1\r\nHost: shop.{ZONE}\r\n\r\n".encode())
        r = c.read_response()
        assert r.status == 400 and b"plain HTTP sent to the TLS port" in r.body
    # passthrough to a backend that is down: a TLS alert (internal_error)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    dead = sock.getsockname()[1]
    sock.close()
    g.update({"zone": ZONE, "health": {"check": "none"}, "apps": [{"name": "gone", "backends": [f"127.0.0.1:{dead}"]}]})
    with pytest.raises(ssl.SSLError, match="INTERNAL_ERROR|internal error"):
        Conn(g.https, tls=ca.client_context(check_hostname=False), server_name=f"gone-{dead}s.{ZONE}")


def test_client_hello_parser():
    hello = _client_hello("Shop-443s.Apps.Test", ["h2", "http/1.1"])
    got = client_hello.parse(hello)
    assert got == client_hello.ClientHello("shop-443s.apps.test", ("h2", "http/1.1"))
    for cut in (1, 5, 40, len(hello) - 1):
        assert client_hello.parse(hello[:cut]) is client_hello.NEED_MORE
    # the same hello split over two TLS records
    body = hello[5:]
    split = b"\x16\x03\x01" + (100).to_bytes(2, "big") + body[:100] + b"\x16\x03\x01" + \
        (len(body) - 100).to_bytes(2, "big") + body[100:]
    assert client_hello.parse(split) == got
    assert isinstance(client_hello.parse(b"GET / HTTP/1.1\r\n"), client_hello.NotTls)
    assert isinstance(client_hello.parse(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00"), client_hello.NotTls)
    assert isinstance(client_hello.parse(b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\xff\xff\xff\xff"),
                      client_hello.NotTls)
    assert client_hello.parse(_client_hello("x.example")[:5] + b"\x01") is client_hello.NEED_MORE


def test_proxy_protocol_codec():
    h = proxy_protocol.encode_v2("192.0.2.1", 40000, "198.51.100.2", 443)
    got = proxy_protocol.parse_v2(h + b"rest")
    assert (got.source, got.source_port, got.destination, got.destination_port) == ("192.0.2.1", 40000,
                                                                                   "198.51.100.2", 443)
    assert got.length == len(h) == 28
    h6 = proxy_protocol.encode_v2("2001:db8::1", 1, "2001:db8::2", 2)
    assert proxy_protocol.parse_v2(h6).source == "2001:db8::1" and len(h6) == 52
    mixed = proxy_protocol.parse_v2(proxy_protocol.encode_v2("192.0.2.1", 1, "2001:db8::2", 2))
    assert mixed.source == "::ffff:c000:201"
    assert proxy_protocol.parse_v2(h[:15]) is None and proxy_protocol.parse_v2(h[:20]) is None
    for bad in (b"GET / HTTP/1.1\r\n\r\n", proxy_protocol.SIGNATURE + b"\x11\x11\x00\x00",
                proxy_protocol.SIGNATURE + b"\x21\x11\xff\xff"):
        with pytest.raises(proxy_protocol.ProxyProtocolError):
            proxy_protocol.parse_v2(bad)


def _with_tlvs(header: bytes, tlvs: bytes) -> bytes:
    """`header` with raw TLV bytes appended and its length field counting them."""
    length = int.from_bytes(header[14:16], "big") + len(tlvs)
    return header[:14] + length.to_bytes(2, "big") + header[16:] + tlvs


def test_proxy_protocol_authority_tlv_round_trip():
    for src, dst, block in (("192.0.2.1", "198.51.100.2", 12), ("2001:db8::1", "2001:db8::2", 36)):
        plain = proxy_protocol.parse_v2(proxy_protocol.encode_v2(src, 40000, dst, 443))
        assert plain.authority is None and plain.length == 16 + block
        h = proxy_protocol.encode_v2(src, 40000, dst, 443, authority="grpc-50051g.apps.test")
        assert h[16 + block:] == b"\x02\x00\x15grpc-50051g.apps.test"  # type 0x02, length 21, the name
        got = proxy_protocol.parse_v2(h + b"PRI * HTTP/2.0")
        assert got == proxy_protocol.ProxyHeader(src, 40000, dst, 443, len(h), "grpc-50051g.apps.test")
    # UTF-8 both ways (an internationalised name, as the spec says the value is UTF-8)
    h = proxy_protocol.encode_v2("192.0.2.1", 1, "192.0.2.2", 2, authority="bücher.example")
    assert proxy_protocol.parse_v2(h).authority == "bücher.example"


def test_proxy_protocol_unknown_tlvs_are_skipped():
    base = proxy_protocol.encode_v2("192.0.2.1", 1, "192.0.2.2", 2)
    noop, custom = b"\x04\x00\x02\x00\x00", b"\xe0\x00\x03abc"
    authority = b"\x02\x00\x0bapi.example"
    h = _with_tlvs(base, noop + authority + custom)
    got = proxy_protocol.parse_v2(h + b"rest")
    assert got.authority == "api.example" and got.length == len(h) and got.source == "192.0.2.1"
    assert proxy_protocol.parse_v2(_with_tlvs(base, noop + custom)).authority is None


def test_proxy_protocol_truncated_tlvs_are_refused():
    base = proxy_protocol.encode_v2("192.0.2.1", 1, "192.0.2.2", 2)
    # an authority declaring 200 bytes where the header has room for 11
    with pytest.raises(proxy_protocol.ProxyProtocolError, match="TLV type 0x02 declares 200 bytes but runs past"):
        proxy_protocol.parse_v2(_with_tlvs(base, b"\x02\x00\xc8api.example") + b"x" * 300)
    # two stray bytes after the address block: not even a TLV type and length
    with pytest.raises(proxy_protocol.ProxyProtocolError, match="TLV truncated: 2 byte"):
        proxy_protocol.parse_v2(_with_tlvs(base, b"\x02\x00"))
    with pytest.raises(proxy_protocol.ProxyProtocolError, match="authority TLV is not UTF-8"):
        proxy_protocol.parse_v2(_with_tlvs(base, b"\x02\x00\x02\xff\xfe"))
