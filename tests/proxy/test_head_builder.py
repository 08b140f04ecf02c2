"""Table tests of `request_head.HeadBuilder`: request bytes in (through the real C parser, no
sockets), the head the backend gets or the `ProxyError` naming the rule out."""

from __future__ import annotations

import pytest
from httptools import HttpParserUpgrade, HttpRequestParser

from regional_gateway.proxy import http_errors as e
from regional_gateway.proxy.client_address import public_headers
from regional_gateway.proxy.exchange import Exchange
from regional_gateway.proxy.request_head import HeadBuilder

CLIENT = "192.0.2.7"
ADDR = public_headers(CLIENT, "http")  # what an untrusted client's request gets
MESH = b"X-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: http\r\nForwarded: for=192.0.2.7;proto=http\r\n"


def build(raw: bytes, *, trusted: bool = False, sni: bytes | None = None, max_headers: int = 100,
          max_header_bytes: int = 32768, max_body_bytes: int = 1000) -> tuple[Exchange, bool]:
    """The exchange `raw`'s head completes into, and whether the connection may read on."""
    head = HeadBuilder(trusted=trusted, sni=sni, client_ip=CLIENT, scheme="http",
                       addr_headers=b"" if trusted else ADDR, max_headers=max_headers,
                       max_header_bytes=max_header_bytes, max_body_bytes=max_body_bytes)
    got: list[tuple[Exchange, bool]] = []

    class Callbacks:
        on_url = head.on_url
        on_header = head.on_header

        def on_headers_complete(self) -> None:
            ex = Exchange()
            ex.method = parser.get_method()
            keep = ex.keep_alive = parser.should_keep_alive()
            got.append((ex, head.complete(ex, keep, len(raw), parser)))

    parser = HttpRequestParser(Callbacks())
    try:
        parser.feed_data(raw)
    except HttpParserUpgrade:
        pass
    assert len(got) == 1
    return got[0]


def req(*lines: str, target: str = "/a", method: str = "GET", version: str = "1.1") -> bytes:
    return (f"{method} {target} HTTP/{version}\r\n" + "".join(f"{line}\r\n" for line in lines) + "\r\n").encode()


FORWARDED = [
    # (request, builder options, the head the backend gets)
    (req("Host: x.test", "Accept: */*"), {},
     b"GET /a HTTP/1.1\r\nHost: x.test\r\nAccept: */*\r\n" + ADDR + b"\r\n"),
    # hop-by-hop headers are the gateway's own business: never forwarded
    (req("Host: x.test", "Keep-Alive: 5", "TE: trailers", "Proxy-Connection: x", "Trailer: y"), {},
     b"GET /a HTTP/1.1\r\nHost: x.test\r\n" + ADDR + b"\r\n"),
    # what Connection names is hop-by-hop too
    (req("Host: x.test", "Connection: close, X-Foo", "X-Foo: 1", "X-Bar: 2"), {},
     b"GET /a HTTP/1.1\r\nHost: x.test\r\nX-Bar: 2\r\n" + ADDR + b"\r\n"),
    # a client's own address headers (and look-alikes) are dropped; the gateway writes them
    (req("Host: x.test", "X-Forwarded-For: 6.6.6.6", "Forwarded: for=6.6.6.6", "X_Forwarded_For: 6.6.6.6",
         "True-Client-IP: 6.6.6.6"), {},
     b"GET /a HTTP/1.1\r\nHost: x.test\r\n" + ADDR + b"\r\n"),
    # from a trusted peer gateway they are kept and extended
    (req("Host: x.test", "X-Forwarded-For: 198.51.100.1"), {"trusted": True},
     b"GET /a HTTP/1.1\r\nHost: x.test\r\nX-Forwarded-For: 198.51.100.1, 192.0.2.7\r\n"
     b"X-Forwarded-Proto: http\r\nForwarded: for=192.0.2.7;proto=http\r\n\r\n"),
    (req("Host: x.test"), {"trusted": True}, b"GET /a HTTP/1.1\r\nHost: x.test\r\n" + MESH + b"\r\n"),
    # the body's framing is the gateway's own: its Content-Length, or chunked
    (req("Host: x.test", "content-length:  5", method="POST"), {},
     b"POST /a HTTP/1.1\r\nHost: x.test\r\nContent-Length: 5\r\n" + ADDR + b"\r\n"),
    (req("Host: x.test", "Transfer-Encoding: gzip,chunked", method="POST"), {},
     b"POST /a HTTP/1.1\r\nHost: x.test\r\nTransfer-Encoding: gzip, chunked\r\n" + ADDR + b"\r\n"),
    # absolute-form: routed by its authority, forwarded in origin-form
    (req("Host: x.test", target="http://X.test/p?q=1"), {},
     b"GET /p?q=1 HTTP/1.1\r\nHost: x.test\r\n" + ADDR + b"\r\n"),
    (req("Host: x.test:8080", target="http://x.test:8080/p"), {},
     b"GET /p HTTP/1.1\r\nHost: x.test:8080\r\n" + ADDR + b"\r\n"),
    # HTTP/1.0 keeps its version; the backend connection is kept alive by the gateway
    (req("Host: x.test", version="1.0"), {},
     b"GET /a HTTP/1.0\r\nHost: x.test\r\n" + ADDR + b"Connection: keep-alive\r\n\r\n"),
    # an upgrade request carries the gateway's own Connection/Upgrade pair
    (req("Host: x.test", "Connection: Upgrade", "Upgrade: websocket"), {},
     b"GET /a HTTP/1.1\r\nHost: x.test\r\n" + ADDR + b"Connection: upgrade\r\nUpgrade: websocket\r\n\r\n"),
    # over TLS, Host must name the SNI server (case and port aside)
    (req("Host: X.test:443"), {"sni": b"x.test"}, b"GET /a HTTP/1.1\r\nHost: X.test:443\r\n" + ADDR + b"\r\n"),
    (req("Accept: */*"), {"sni": b"x.test"}, b"GET /a HTTP/1.1\r\nAccept: */*\r\n" + ADDR + b"\r\n"),
    (req("Host: x.test", target="*", method="OPTIONS"), {},
     b"OPTIONS * HTTP/1.1\r\nHost: x.test\r\n" + ADDR + b"\r\n"),
]


@pytest.mark.parametrize("raw,options,head", FORWARDED)
def test_forwarded_head(raw: bytes, options: dict, head: bytes) -> None:
    ex, _ = build(raw, **options)
    assert ex.error is None
    assert ex.head == head


REFUSED = [
    # (request, builder options, error class, status, words of the message, connection may read on)
    (req("Host: x.test", "Host: y.test"), {}, e.BadHost, 400, "more than one Host header", False),
    (req("Accept: */*"), {}, e.BadRequest, 400, "no Host header", False),
    (req(target="http://x.test/p"), {}, e.BadRequest, 400, "no Host header", False),  # HTTP/1.1 needs Host
    (req("Host: x.test", "Connection: close, Host"), {}, e.ProtectedHeader, 400, "'host'", False),
    (req("Host: x.test", "Connection: X-Forwarded-For"), {}, e.ProtectedHeader, 400, "'x-forwarded-for'", False),
    (req("Host: x.test", "Transfer-Encoding: gzip, , chunked", method="POST"), {}, e.BadFraming, 400,
     "empty or invalid", False),
    (req("Host: x.test", "Transfer-Encoding: chunked", method="POST", version="1.0"), {}, e.BadFraming, 400,
     "HTTP/1.0", False),
    (req("Host: x.test", method="CONNECT", target="x.test:443"), {}, e.MethodNotAllowed, 405, "CONNECT", False),
    (req("Host: x.test", method="TRACE"), {}, e.MethodNotAllowed, 405, "TRACE", False),
    (req("Host: x.test", *(f"X-{i}: v" for i in range(5))), {"max_headers": 4}, e.HeadersTooLarge, 431,
     "6 header fields, at most 4", False),
    (req("Host: x.test", "X-Pad: " + "p" * 1100), {"max_header_bytes": 1024}, e.HeadersTooLarge, 431,
     "request head over 1024 bytes", False),
    (req("Host: x.test", "Content-Length: 1001", method="POST"), {}, e.BodyTooLarge, 413,
     "Content-Length 1001 is over the limit of 1000 bytes", False),
    (req("Host: x.test", target="http://y.test/"), {}, e.BadHost, 400, "names 'y.test' but Host is 'x.test'", False),
    (req("Host: x.test", target="*"), {}, e.BadRequest, 400, "only for OPTIONS", False),
    (req("Host: y.test"), {"sni": b"x.test"}, e.SniMismatch, 421, "not the name this TLS connection", True),
    (req("Host: a b"), {"sni": b"x.test"}, e.BadHost, 400, "bad Host", False),
]


@pytest.mark.parametrize("raw,options,error,status,words,keep", REFUSED)
def test_refused_head(raw: bytes, options: dict, error: type, status: int, words: str, keep: bool) -> None:
    ex, may_read_on = build(raw, **options)
    assert type(ex.error) is error and ex.error.status == status
    assert words in ex.error.message
    assert may_read_on is keep


def test_the_builder_forgets_a_special_head() -> None:
    """What a head with special headers left behind never reaches the next head."""
    head = HeadBuilder(trusted=False, sni=None, client_ip=CLIENT, scheme="http", addr_headers=ADDR,
                       max_headers=100, max_header_bytes=32768, max_body_bytes=0)
    heads: list[Exchange] = []

    class Callbacks:
        on_url = head.on_url
        on_header = head.on_header

        def on_headers_complete(self) -> None:
            ex = Exchange()
            ex.method = parser.get_method()
            head.complete(ex, parser.should_keep_alive(), 0, parser)
            heads.append(ex)

    parser = HttpRequestParser(Callbacks())
    parser.feed_data(req("Host: x.test", "Host: y.test") + req("Host: x.test", "Content-Length: 0", method="POST")
                     + req("Host: x.test"))
    assert [type(ex.error) for ex in heads] == [e.BadHost, type(None), type(None)]
    assert heads[2].head == b"GET /a HTTP/1.1\r\nHost: x.test\r\n" + ADDR + b"\r\n"
    assert not heads[2].has_body and not heads[2].chunked
