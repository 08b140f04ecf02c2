"""Table tests of the pure request-head rules: `request_head` (Connection, Transfer-Encoding,
absolute-form targets, versions), `hostnames.parse_authority` and the client-IP look-alikes."""

from __future__ import annotations

import pytest

from regional_gateway.proxy import request_head
from regional_gateway.proxy.client_address import LOOKALIKE_HEADERS
from regional_gateway.proxy.hostnames import Authority, BadAuthority, parse_authority
from regional_gateway.proxy.request_head import Refusal


@pytest.mark.parametrize("value,drops", [
    (b"close", frozenset()),
    (b"keep-alive, Upgrade", frozenset()),
    (b"close, X-Foo,  x-bar ,", frozenset((b"x-foo", b"x-bar"))),
    (b"TE, Keep-Alive", frozenset((b"te",))),
])
def test_connection_drops(value, drops):
    assert request_head.connection_drops(value) == drops


@pytest.mark.parametrize("value,named", [
    (b"content-length", "content-length"), (b"close, Transfer-Encoding", "transfer-encoding"),
    (b"HOST", "host"), (b"close,X-Forwarded-For", "x-forwarded-for"), (b"Forwarded", "forwarded"),
    (b"x-real-ip", "x-real-ip"), (b"X-Geomesh-Forwarded", "x-geomesh-forwarded"),
    (b"x-forwarded-proto", "x-forwarded-proto"), (b"x_forwarded_for", "x_forwarded_for"),
    (b"True-Client-IP", "true-client-ip"),
])
def test_connection_may_not_name_protected_headers(value, named):
    got = request_head.connection_drops(value)
    assert isinstance(got, Refusal) and got.kind == "protected-header" and f"'{named}'" in got.message


@pytest.mark.parametrize("value,version,want", [
    (b"chunked", "1.1", b"chunked"),
    (b"Chunked", "1.1", b"chunked"),
    (b"gzip, chunked", "1.1", b"gzip, chunked"),
    (b"gzip,chunked", "1.1", b"gzip, chunked"),
    (b"chunked", "1.0", "HTTP/1.0"),
    (b"identity", "1.1", "does not end with chunked"),
    (b"xchunked", "1.1", "does not end with chunked"),
    (b"chunked, identity", "1.1", "does not end with chunked"),
    (b"chunked,chunked", "1.1", "more than once"),
    (b"gzip, , chunked", "1.1", "empty or invalid"),
    (b"g\x01zip, chunked", "1.1", "empty or invalid"),
    (b"", "1.1", "does not end with chunked"),
])
def test_transfer_coding(value, version, want):
    got = request_head.transfer_coding(value, version)
    if isinstance(want, bytes):
        assert got == want
    else:
        assert isinstance(got, Refusal) and got.kind == "framing" and want in got.message


@pytest.mark.parametrize("url,want", [
    (b"http://a.example/p?q", (b"a.example", b"/p?q")),
    (b"HTTPS://a.example:8443", (b"a.example:8443", b"/")),
    (b"http://a.example?q=1", (b"a.example", b"/?q=1")),
    (b"http://[::1]:80/x", (b"[::1]:80", b"/x")),
    (b"ftp://a.example/", "neither a path nor an http(s) URL"),
    (b"a.example/x", "neither a path nor an http(s) URL"),
    (b"http://u:p@a.example/", "user name"),
    (b"http:///x", "has no host"),
    (b"http://a.example#frag", "fragment"),
])
def test_split_target(url, want):
    got = request_head.split_target(url)
    if isinstance(want, tuple):
        assert got == want
    else:
        assert isinstance(got, Refusal) and want in got.message


@pytest.mark.parametrize("version,refused", [("1.1", False), ("1.0", False), ("2.0", True), ("0.9", True)])
def test_versions(version, refused):
    assert (request_head.version_refusal(version) is not None) == refused


@pytest.mark.parametrize("raw,want", [
    ("web.apps.test", Authority("web.apps.test")),
    ("WEB.Apps.Test.", Authority("web.apps.test")),
    ("web.apps.test:8080", Authority("web.apps.test", 8080)),
    ("web.apps.test:", Authority("web.apps.test")),
    ("a_b.example", Authority("a_b.example")),
    ("192.0.2.1:80", Authority("192.0.2.1", 80)),
    ("[2001:DB8::1]:443", Authority("[2001:db8::1]", 443)),
    (" web.apps.test\t", Authority("web.apps.test")),
    ("", "empty host"),
    ("web.apps.test..", "empty label"),
    (".web.apps.test", "empty label"),
    ("web..apps.test", "empty label"),
    ("web.apps.test:99999", "port '99999'"),
    ("web.apps.test:0", "port '0'"),
    ("web.apps.test:abc", "port 'abc'"),
    ("web.apps.test:+80", "port '+80'"),
    ("2001:db8::1", "more than one ':'"),
    ("[2001:db8::1%eth0]", "zone id"),
    ("[2001:db8::1", "closing"),
    ("[nope]", "not an IPv6 address"),
    ("[::1]x", "after the IPv6 literal"),
    ("web apps", "label"),
    ("w\u00e9b.example", "label"),
    ("a" * 64 + ".example", "label"),
    (("a" * 63 + ".") * 4 + "example", "over 253"),
])
def test_parse_authority(raw, want):
    got = parse_authority(raw)
    if isinstance(want, Authority):
        assert got == want
    else:
        assert isinstance(got, BadAuthority) and want in got.reason, got


def test_authority_render():
    assert Authority("web.apps.test", 80).render() == "web.apps.test:80"
    assert Authority("[::1]").render() == "[::1]"


def test_lookalikes_cover_underscore_spellings_and_cdn_headers():
    for name in (b"x_forwarded_for", b"x-forwarded_for", b"x_real_ip", b"x_geomesh_forwarded", b"true-client-ip",
                 b"true_client_ip", b"x-client-ip", b"cf-connecting-ip", b"x-cluster-client-ip"):
        assert name in LOOKALIKE_HEADERS
    assert b"x-forwarded-for" not in LOOKALIKE_HEADERS and b"forwarded" not in LOOKALIKE_HEADERS
