"""Custom domains by TXT record through a real gateway, a real recursive resolver (unbound) and a
real authoritative server for the customers' zone (gdnsd) on loopback: the record routes, its
removal stops routing once the TTL runs out, a missing app is a 404 naming it, negative answers
are cached (the resolver sees one query), look-ups are rate-limited per client and in all,
garbage values are counted, the seed's `_dstack-app-address` record works, and a look-up never
holds up other connections."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from dnslib import DNSRecord
from prometheus_client import REGISTRY

from geomesh.lab.customer_dns import Gdnsd, Unbound
from geomesh.txt_resolver import TRUNCATED, make_query, read_reply
from regional_gateway.proxy.hostnames import NameMatch, UnknownName
from tests.proxy.certs import TestCA
from tests.proxy.client import Conn, get

ZONE = "apps.test"
CUSTOMER = "customer.example"
SOA = "$TTL 30\n@ SOA ns1 hostmaster 1 7200 1800 259200 30\n@ NS ns1\nns1 A 127.0.0.1\n"


def zone(*records: str) -> str:
    return SOA + "".join(r + "\n" for r in records)


def routes(*apps: tuple[str, list], **top) -> dict:
    data = {"zone": ZONE, "name": "gw-a", "region": "eu", "health": {"check": "none"}, **top}
    data["apps"] = [{"name": n, "backends": b} for n, b in apps]
    return data


def lookups(result: str) -> float:
    return REGISTRY.get_sample_value("geomesh_gateway_custom_domain_lookups_total", {"result": result}) or 0.0


def rejected(reason: str) -> float:
    return REGISTRY.get_sample_value("geomesh_gateway_custom_domain_txt_rejected_total", {"reason": reason}) or 0.0


class CustomerDns:
    def __init__(self, tmp_path, *records: str) -> None:
        self.gdnsd = Gdnsd(tmp_path / "gdnsd", {CUSTOMER: zone(*records)})
        try:
            self.unbound = Unbound(tmp_path / "unbound", {CUSTOMER: self.gdnsd.address})
        except Exception:
            self.gdnsd.stop()
            raise

    @property
    def resolver(self) -> str:
        host, port = self.unbound.address
        return f"{host}:{port}"

    def publish(self, *records: str) -> None:
        self.gdnsd.set_zone(CUSTOMER, zone(*records))

    def stop(self) -> None:
        self.unbound.stop()
        self.gdnsd.stop()


@pytest.fixture
def customer_dns(tmp_path):
    made: list[CustomerDns] = []

    def make(*records: str) -> CustomerDns:
        dns = CustomerDns(tmp_path, *records)
        made.append(dns)
        return dns

    yield make
    for dns in made:
        dns.stop()


def eventually(fn, timeout: float = 20.0, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(step)


def test_txt_record_routes_to_the_app_and_its_port(backends, gateway, customer_dns):
    web, api, api_admin = backends(3)
    dns = customer_dns('_geomesh-app-address.shop 30 TXT "app=web"',
                       f'_geomesh-app-address.admin 30 TXT "app=api:{api_admin.port}"',
                       '_geomesh-app-address.closed 30 TXT "app=api:22"')
    g = gateway(routes(("web", [web.address]), ("api", [api.address, api_admin.address])), resolver=dns.resolver)
    r = get(g.http, f"shop.{CUSTOMER}")
    assert (r.status, r.header("x-backend")) == (200, "b1")
    # the Host header as clients send it: a port, upper case, a trailing dot; the backend gets it canonical
    r = get(g.http, f"Shop.{CUSTOMER.upper()}.:8080", "/headers")
    assert r.status == 200 and r.header("x-backend") == "b1"
    # a port in the record: that port of the app's instances, always
    assert {get(g.http, f"admin.{CUSTOMER}").header("x-backend") for _ in range(4)} == {"b3"}
    # a port the app does not expose is refused like the `<app>-<port>` name form (no port scanner by TXT)
    r = get(g.http, f"closed.{CUSTOMER}")
    assert r.status == 404 and b"does not expose port 22" in r.body
    # names of the zone never cause a look-up
    before = dns.unbound.queries(f"_geomesh-app-address.web.{ZONE}")
    assert get(g.http, f"web.{ZONE}").status == 200
    assert dns.unbound.queries(f"_geomesh-app-address.web.{ZONE}") == before == 0


def test_removed_txt_stops_routing_once_its_ttl_ran_out(backends, gateway, customer_dns):
    (web,) = backends(1)
    dns = customer_dns('_geomesh-app-address.shop 1 TXT "app=web"')
    g = gateway(routes(("web", [web.address])), resolver=dns.resolver, custom_domain_min_ttl=1.0,
                custom_domain_negative_ttl=1.0)
    assert get(g.http, f"shop.{CUSTOMER}").status == 200
    dns.publish()  # the TXT record is gone
    t0 = time.monotonic()
    assert eventually(lambda: get(g.http, f"shop.{CUSTOMER}").status == 404)
    assert time.monotonic() - t0 < 15  # TTL 1 s here, 1 s in unbound: seconds, not the old 5 min
    r = get(g.http, f"shop.{CUSTOMER}")
    assert r.status == 404 and b"is not a custom domain" in r.body
    dns.publish('_geomesh-app-address.shop 1 TXT "app=web"')  # and back
    assert eventually(lambda: get(g.http, f"shop.{CUSTOMER}").status == 200)


def test_txt_naming_a_missing_app_is_a_404_naming_it(backends, gateway, customer_dns):
    (web,) = backends(1)
    dns = customer_dns('_geomesh-app-address.shop 30 TXT "app=nope"')
    g = gateway(routes(("web", [web.address])), resolver=dns.resolver)
    r = get(g.http, f"shop.{CUSTOMER}")
    assert r.status == 404 and r.header("x-geomesh-error") == "unknown-host"
    assert f"custom domain shop.{CUSTOMER} names app 'nope', which does not exist".encode() in r.body
    assert web.hits == 0
    # the seam the TLS listener will ask before ordering a certificate: only a record naming an app here
    domains, state = g.server.custom_domains, g.server.state
    assert isinstance(g.call(domains.verify(state.routes, f"shop.{CUSTOMER}")), UnknownName)
    dns.publish('_geomesh-app-address.shop 30 TXT "app=nope"', '_geomesh-app-address.good 30 TXT "app=web"')
    assert g.call(domains.verify(state.routes, f"good.{CUSTOMER}")) == NameMatch("web", 0)
    assert isinstance(g.call(domains.verify(state.routes, f"web.{ZONE}")), UnknownName)  # a zone name: never


def test_negative_answers_are_cached(backends, gateway, customer_dns):
    (web,) = backends(1)
    dns = customer_dns('_geomesh-app-address.shop 30 TXT "app=web"')
    g = gateway(routes(("web", [web.address])), resolver=dns.resolver, custom_domain_negative_ttl=60.0)
    hits, negative = lookups("hit"), lookups("negative")
    with Conn(g.http) as c:
        for _ in range(6):
            r = c.request(f"nx.{CUSTOMER}")
            assert r.status == 404 and b"is not a custom domain" in r.body  # the unknown host's answer
    for _ in range(3):
        assert get(g.http, f"nx.{CUSTOMER}").status == 404
    # one look-up (the resolver saw each record name once), every later request from the cache
    assert dns.unbound.queries(f"_geomesh-app-address.nx.{CUSTOMER}") == 1
    assert dns.unbound.queries(f"_dstack-app-address.nx.{CUSTOMER}") == 1
    assert lookups("negative") - negative == 1 and lookups("hit") - hits == 8


def test_concurrent_requests_share_one_lookup(backends, gateway, customer_dns):
    (web,) = backends(1)
    dns = customer_dns('_geomesh-app-address.shop 30 TXT "app=web"')
    g = gateway(routes(("web", [web.address])), resolver=dns.resolver)
    statuses: list[int] = []
    start = threading.Barrier(8)

    def one() -> None:
        start.wait(10)
        statuses.append(get(g.http, f"shop.{CUSTOMER}").status)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert statuses == [200] * 8
    assert dns.unbound.queries(f"_geomesh-app-address.shop.{CUSTOMER}") == 1


def test_lookups_are_rate_limited_per_client_and_others_still_served(backends, gateway, customer_dns):
    (web,) = backends(1)
    dns = customer_dns('_geomesh-app-address.shop 30 TXT "app=web"', '_geomesh-app-address.blog 30 TXT "app=web"')
    g = gateway(routes(("web", [web.address])), resolver=dns.resolver, custom_domain_client_rate=1,
                custom_domain_client_burst=2)
    limited = lookups("rate_limited")
    assert get(g.http, f"shop.{CUSTOMER}", source="127.0.0.2").status == 200  # one token spent
    # a client asking for many names (each a look-up) is refused once its burst is spent
    got = [get(g.http, f"n{i}.{CUSTOMER}", source="127.0.0.2") for i in range(8)]
    refused = [r for r in got if r.status == 429]
    assert refused, [r.status for r in got]
    assert refused[0].header("x-geomesh-error") == "custom-domain-rate-limited"
    assert b"too many custom domain look-ups from your address" in refused[0].body
    assert lookups("rate_limited") - limited == len(refused)
    # cached answers cost nothing: the same client still reaches the domain it looked up
    assert get(g.http, f"shop.{CUSTOMER}", source="127.0.0.2").status == 200
    # and another client's look-ups go on
    r = get(g.http, f"blog.{CUSTOMER}", source="127.0.0.3")
    assert (r.status, r.header("x-backend")) == (200, "b1")


def test_the_global_lookup_budget_gives_503(backends, gateway, customer_dns):
    (web,) = backends(1)
    dns = customer_dns('_geomesh-app-address.shop 30 TXT "app=web"')
    g = gateway(routes(("web", [web.address])), resolver=dns.resolver, custom_domain_rate=1, custom_domain_burst=1)
    assert get(g.http, f"shop.{CUSTOMER}", source="127.0.0.4").status == 200
    got = [get(g.http, f"x{i}.{CUSTOMER}", source=f"127.0.0.{5 + i}") for i in range(4)]
    busy = [r for r in got if r.status == 503]
    assert busy and busy[0].header("x-geomesh-error") == "custom-domain-lookups-busy"
    assert get(g.http, f"shop.{CUSTOMER}", source="127.0.0.9").status == 200  # cached: still served


def test_garbage_txt_values_are_counted_and_give_no_mapping(backends, gateway, customer_dns):
    (web,) = backends(1)
    long_value = '"app=web' + "x" * 200 + '" "' + "y" * 100 + '"'  # two strings, 309 bytes joined
    dns = customer_dns('_geomesh-app-address.spf 30 TXT "v=spf1 -all"',
                       f"_geomesh-app-address.long 30 TXT {long_value}",
                       *(f'_geomesh-app-address.many 30 TXT "app=web{i}"' for i in range(9)),
                       '_geomesh-app-address.port 30 TXT "app=web:99999"',
                       '_geomesh-app-address.two 30 TXT "app=web"', '_geomesh-app-address.two 30 TXT "app=api"',
                       '_geomesh-app-address.mixed 30 TXT "hello"', '_geomesh-app-address.mixed 30 TXT "app=web"')
    g = gateway(routes(("web", [web.address]), ("api", [web.address])), resolver=dns.resolver)
    reasons = ("not_app_address", "too_long", "too_many_records", "bad_port", "conflict")
    before = {reason: rejected(reason) for reason in reasons}
    for name in ("spf", "long", "many", "port", "two"):
        r = get(g.http, f"{name}.{CUSTOMER}")
        assert r.status == 404 and b"is not a custom domain" in r.body, name
    assert {reason: rejected(reason) - before[reason] for reason in reasons} == \
        {"not_app_address": 1, "too_long": 1, "too_many_records": 1, "bad_port": 1, "conflict": 1}
    # a stray value beside a valid record does not spoil it (and is counted)
    assert get(g.http, f"mixed.{CUSTOMER}").status == 200
    assert rejected("not_app_address") - before["not_app_address"] == 2
    assert web.hits == 1


def test_the_seeds_dstack_record_works_and_geomesh_wins(backends, gateway, customer_dns):
    web, api = backends(2)
    dns = customer_dns('_dstack-app-address.seed 30 TXT "app-id=web"',
                       '_dstack-app-address.both 30 TXT "app-id=web"', '_geomesh-app-address.both 30 TXT "app=api"',
                       '_dstack-app-address.ported 30 TXT "app-id=web:8080"')
    g = gateway(routes(("web", [web.address]), ("api", [api.address])), resolver=dns.resolver)
    assert get(g.http, f"seed.{CUSTOMER}").header("x-backend") == "b1"
    assert get(g.http, f"both.{CUSTOMER}").header("x-backend") == "b2"
    assert get(g.http, f"ported.{CUSTOMER}").status == 404  # the seed's form has no port


def test_a_truncated_answer_is_asked_again_over_tcp(backends, gateway, customer_dns):
    (web,) = backends(1)
    filler = [f'_geomesh-app-address.big 30 TXT "note {i} ' + "z" * 230 + '"' for i in range(7)]
    dns = customer_dns(*filler, '_geomesh-app-address.big 30 TXT "app=web"')
    name = f"_geomesh-app-address.big.{CUSTOMER}"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # over UDP the answer does not fit
        s.settimeout(5)
        s.sendto(make_query(name, 99), dns.unbound.address)
        assert read_reply(name, 99, s.recv(65535)) is TRUNCATED
    g = gateway(routes(("web", [web.address])), resolver=dns.resolver)
    before = rejected("not_app_address")
    r = get(g.http, f"big.{CUSTOMER}")
    assert (r.status, r.header("x-backend")) == (200, "b1")
    assert rejected("not_app_address") - before == 7


def test_tls_termination_of_a_custom_domain_with_a_certificate(backends, gateway, customer_dns, tmp_path):
    (web,) = backends(1)
    dns = customer_dns('_geomesh-app-address.shop 30 TXT "app=web"')
    ca = TestCA(tmp_path)
    cert, key = ca.issue("customer", [f"*.{CUSTOMER}"])
    g = gateway(routes(("web", [web.address]), certificates=[{"cert": str(cert), "key": str(key)}]),
                https=("127.0.0.1:0",), resolver=dns.resolver)
    with Conn(g.https, tls=ca.client_context(), server_name=f"shop.{CUSTOMER}") as c:
        r = c.request(f"shop.{CUSTOMER}")
    assert (r.status, r.header("x-backend")) == (200, "b1")


def test_a_silent_resolver_holds_up_no_other_connection(backends, gateway):
    (web,) = backends(1)
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # records the queries, answers nothing
    silent.bind(("127.0.0.1", 0))
    silent.settimeout(0.2)
    asked: list[str] = []
    stop = threading.Event()

    def record() -> None:
        while not stop.is_set():
            try:
                data = silent.recv(4096)
            except (TimeoutError, OSError):
                continue
            asked.append(str(DNSRecord.parse(data).q.qname).lower())

    recorder = threading.Thread(target=record)
    recorder.start()
    try:
        g = gateway(routes(("web", [web.address])), resolver=f"127.0.0.1:{silent.getsockname()[1]}",
                    resolver_timeout=1.0)
        errors = lookups("error")
        answers: list = []
        waiting = [threading.Thread(target=lambda: answers.append(get(g.http, f"shop.{CUSTOMER}")))
                   for _ in range(4)]
        t0 = time.monotonic()
        for t in waiting:
            t.start()
        time.sleep(0.3)
        assert get(g.http, f"web.{ZONE}").status == 200  # served while the look-up waits
        assert all(t.is_alive() for t in waiting)
        for t in waiting:
            t.join(20)
        assert len(answers) == 4
        for r in answers:
            assert r.status == 503 and r.header("x-geomesh-error") == "custom-domain-lookup-failed"
            assert f"custom domain shop.{CUSTOMER} could not be looked up".encode() in r.body
        assert time.monotonic() - t0 < 15  # bounded: two tries of 1 s
        # the four requests shared one look-up: each record name was asked twice (two tries), no more
        assert sorted(asked) == sorted([f"_geomesh-app-address.shop.{CUSTOMER}."] * 2
                                       + [f"_dstack-app-address.shop.{CUSTOMER}."] * 2)
        assert lookups("error") - errors == 4
        # a failed look-up is kept a moment: asked again right away, the resolver is not
        assert get(g.http, f"shop.{CUSTOMER}").status == 503 and len(asked) == 4
    finally:
        stop.set()
        recorder.join(5)
        silent.close()
