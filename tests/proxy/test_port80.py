"""Port 80: the plain listener answers ACME HTTP-01 challenges itself and sends hosts it serves
over TLS to HTTPS. Pure rules (`proxy.port80`) as tables, then real sockets against a real proxy
with real backends: a token of the set answered for any Host without touching a backend, an
unknown one 404, a redirect that keeps path and query, none for a host without a certificate, with
the setting off, on the mesh listener or for an ACME path; a certificate added later redirects."""

from __future__ import annotations

import pytest

from regional_gateway.proxy.certificates import CertificateStore, ManagedCertificate, load
from regional_gateway.proxy.port80 import HttpsRedirect, challenge_answer, challenge_table, redirect_answer
from regional_gateway.proxy.routes import CertificateSpec
from tests.proxy.certs import TestCA
from tests.proxy.client import Conn, get

ZONE = "apps.test"
TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
KEY_AUTH = f"{TOKEN}.9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"
ACME = "/.well-known/acme-challenge/"


# -- the rules ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("pair", "field"), [
    (("", "x.y"), "http_challenges[0].token"),
    (("a b", "a b.x"), "http_challenges[0].token"),
    (("t" * 257, "x"), "http_challenges[0].token"),
    ((TOKEN, "other.thumb"), "http_challenges[0].key_authorization"),
    ((TOKEN, TOKEN), "http_challenges[0].key_authorization"),
    ((TOKEN, f"{TOKEN}.bad\r\nx: y"), "http_challenges[0].key_authorization"),
])
def test_a_bad_challenge_is_refused_naming_the_field(pair: tuple[str, str], field: str) -> None:
    table, refused = challenge_table([pair, ("ok", "ok.thumb")])
    assert table == {b"ok": b"ok.thumb"} and len(refused) == 1 and refused[0].startswith(field)


def test_the_answer_to_a_challenge_request() -> None:
    table, _ = challenge_table([(TOKEN, KEY_AUTH)])
    head = f"GET {ACME}{TOKEN} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    status, answer = challenge_answer(head, table, close=False)
    assert status == 200 and answer.endswith(b"\r\n\r\n" + KEY_AUTH.encode())
    assert b"content-type: text/plain\r\n" in answer and b"connection: close" not in answer
    status, answer = challenge_answer(f"GET {ACME}{TOKEN}?x=1 HTTP/1.1\r\n\r\n".encode(), table, close=True)
    assert status == 200 and b"connection: close\r\n" in answer  # the query is not part of the token
    assert challenge_answer(f"GET {ACME}nope HTTP/1.1\r\n\r\n".encode(), table, close=False)[0] == 404
    assert challenge_answer(f"GET {ACME} HTTP/1.1\r\n\r\n".encode(), table, close=False)[0] == 404


def test_redirect_status_by_method() -> None:
    status, answer = redirect_answer(b"https://a.test/x", b"GET", close=False)
    assert status == 301 and answer.startswith(b"HTTP/1.1 301 Moved Permanently\r\n")
    assert b"location: https://a.test/x\r\n" in answer
    assert redirect_answer(b"https://a.test/", b"HEAD", close=False)[0] == 301
    assert redirect_answer(b"https://a.test/", b"POST", close=False)[1].startswith(b"HTTP/1.1 308 Permanent Redirect")


def test_which_hosts_go_to_https_and_where(tmp_path) -> None:
    ca = TestCA(tmp_path)
    cert, key = ca.issue("zone", [f"*.{ZONE}"])
    store = CertificateStore([load(CertificateSpec(cert, key))])
    head = b"GET /a/b?c=d&e HTTP/1.1\r\nHost: x\r\n\r\n"
    standard, other = HttpsRedirect(store, 443), HttpsRedirect(store, 8443)
    assert standard.location(f"shop.{ZONE}".encode(), head, b"GET") == b"https://shop.apps.test/a/b?c=d&e"
    assert other.location(f"Shop.{ZONE.upper()}.:80".encode(), head, b"GET") == b"https://shop.apps.test:8443/a/b?c=d&e"
    for host in (ZONE, f"a.b.{ZONE}", "elsewhere.test", "127.0.0.1", "[::1]", "bad host", ""):
        assert standard.location(host.encode(), head, b"GET") is None, host  # no certificate names it
    assert standard.location(None, head, b"GET") is None
    # a managed certificate for another name: redirected from the next request on (the memo is dropped)
    assert standard.location(b"shop.example.net", head, b"GET") is None
    cert2, key2 = ca.issue("custom", ["shop.example.net"])
    store.set_managed([ManagedCertificate("shop.example.net", load(CertificateSpec(cert2, key2)))])
    assert standard.location(b"shop.example.net", head, b"GET") == b"https://shop.example.net/a/b?c=d&e"


# -- over sockets ---------------------------------------------------------------------------------

def routes(ca: TestCA, backend: str, *, extra_cert: tuple | None = None) -> dict:
    cert, key = ca.issue("zone", [f"*.{ZONE}", ZONE])
    certs = [{"cert": str(cert), "key": str(key)}]
    if extra_cert is not None:
        certs.append({"cert": str(extra_cert[0]), "key": str(extra_cert[1])})
    return {"zone": ZONE, "name": "gw-x", "region": "eu", "health": {"check": "none"},
            "apps": [{"name": "shop", "backends": [backend]}],
            "domains": [{"fqdn": "shop.example.net", "app": "shop"}], "certificates": certs}


def test_the_plain_listener_answers_challenges_of_the_set_for_any_host(backends, gateway, tmp_path) -> None:
    (shop,) = backends(1, prefix="shop")
    g = gateway(routes(TestCA(tmp_path), shop.address), https=("127.0.0.1:0",), mesh=("127.0.0.1:0",),
                https_redirect=True)
    assert g.run(g.server.set_http_challenges, [(TOKEN, KEY_AUTH), ("x y", "bad")]) == [
        "http_challenges[1].token: 'x y' is not base64url (A-Z, a-z, 0-9, '-', '_')"]
    for host in (f"shop.{ZONE}", "shop.example.net", "unknown.example", "127.0.0.1", "[::1]:80"):
        r = get(g.http, host, ACME + TOKEN)
        assert (r.status, r.body, r.header("content-type")) == (200, KEY_AUTH.encode(), "text/plain"), host
        r = get(g.http, host, ACME + "unknown-token")
        assert r.status == 404 and r.header("location") is None, host
    assert shop.hits == 0  # answered by the gateway, never the app
    # in turn on a kept-alive connection, a body read and dropped; the set replaced as a whole
    with Conn(g.http) as c:
        c.send_raw(f"GET {ACME}{TOKEN} HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
                   f"GET {ACME}{TOKEN} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        assert [c.read_response().status, c.read_response().status] == [200, 200]
    g.run(g.server.set_http_challenges, [])
    assert get(g.http, "a", ACME + TOKEN).status == 404
    # another path of the prefix's directory, or another method, goes to the app as before
    g.run(g.server.set_http_challenges, [(TOKEN, KEY_AUTH)])
    assert get(g.http, "shop.example.net", "/.well-known/acme-challengeX").header("x-backend") == "shop1"


def test_hosts_with_a_certificate_are_redirected_to_https(backends, gateway, tmp_path) -> None:
    (shop,) = backends(1, prefix="shop")
    ca = TestCA(tmp_path)
    g = gateway(routes(ca, shop.address), https=("127.0.0.1:0",), mesh=("127.0.0.1:0",), https_redirect=True)
    port = g.https[1]
    r = get(g.http, f"Shop.{ZONE}:80", "/cart/1?item=a%20b&n=2")
    assert r.status == 301 and r.header("location") == f"https://shop.{ZONE}:{port}/cart/1?item=a%20b&n=2"
    r = get(g.http, f"shop.{ZONE}", "/form", method="POST", body=b"x=1")
    assert r.status == 308 and r.header("location") == f"https://shop.{ZONE}:{port}/form"
    assert shop.hits == 0
    # the redirect's target serves the host over TLS
    with Conn(g.https, tls=ca.client_context(), server_name=f"shop.{ZONE}") as c:
        assert c.request(f"shop.{ZONE}", "/cart/1").header("x-backend") == "shop1"
    # no certificate for the custom domain: routed over plain HTTP as before
    assert get(g.http, "shop.example.net", "/").header("x-backend") == "shop1"
    # ACME paths are answered, never redirected
    g.run(g.server.set_http_challenges, [(TOKEN, KEY_AUTH)])
    assert get(g.http, f"shop.{ZONE}", ACME + TOKEN).status == 200
    # the mesh listener carries forwarded requests: never redirected
    assert get(g.mesh, f"shop.{ZONE}", "/", headers={"X-Geomesh-Forwarded": "gw-y"}).header("x-backend") == "shop1"
    # a certificate for the custom domain added to the routes: redirected from then on
    hits = shop.hits
    g.update(routes(ca, shop.address, extra_cert=ca.issue("custom", ["shop.example.net"])))
    r = get(g.http, "shop.example.net", "/p?q")
    assert r.status == 301 and r.header("location") == f"https://shop.example.net:{port}/p?q"
    assert shop.hits == hits


def test_no_redirect_when_turned_off_or_without_a_tls_listener(backends, gateway, tmp_path) -> None:
    (shop,) = backends(1, prefix="shop")
    ca = TestCA(tmp_path)
    off = gateway(routes(ca, shop.address), https=("127.0.0.1:0",), https_redirect=False)
    no_tls = gateway(routes(ca, shop.address), https_redirect=True)
    for g in (off, no_tls):
        assert get(g.http, f"shop.{ZONE}", "/").header("x-backend") == "shop1"
        g.run(g.server.set_http_challenges, [(TOKEN, KEY_AUTH)])
        assert get(g.http, f"shop.{ZONE}", ACME + TOKEN).body == KEY_AUTH.encode()
