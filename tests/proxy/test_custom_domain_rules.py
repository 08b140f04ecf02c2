"""The pure parts of custom domains by TXT record, as tables: the record values, the resolver's
messages (the query as hex, replies built from records as zone text), what a look-up caches and
for how long, the cache's bound, the look-up budget, which hosts are looked up, and the settings
(flags, the routes file's [server] table, the agent's [custom_domains] table) naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from dnslib import RCODE, RR, DNSHeader, DNSQuestion, DNSRecord

from geomesh.app_address import (
    DSTACK_OWNER,
    GEOMESH_OWNER,
    AppAddress,
    Garbage,
    parse_value,
    read_records,
)
from geomesh.errors import ValidationError
from geomesh.txt_resolver import (
    TRUNCATED,
    NoTxt,
    ResolverError,
    TxtRecords,
    make_query,
    read_reply,
)
from regional_gateway import agent_config
from regional_gateway.proxy.custom_domains import DomainCache, Lookup, TtlLimits, decide
from regional_gateway.proxy.hostnames import NameMatch, UnknownName, custom_candidate, resolve_custom
from regional_gateway.proxy.lookup_budget import LookupBudget, Refusal
from regional_gateway.proxy.routes import AppRoute, Backend, DomainRoute, Routes
from regional_gateway.proxy.settings import ProxySettings

G, D = GEOMESH_OWNER, DSTACK_OWNER
NAME = "_geomesh-app-address.shop.example"


@pytest.mark.parametrize(("owner", "value", "want"), [
    (G, b"app=web", AppAddress("web", 0, G)),
    (G, b"app=web:8080", AppAddress("web", 8080, G)),
    (G, b"  app=Web : 443 ", AppAddress("web", 443, G)),  # spaces around, a name in capitals
    (G, b"app=web:0", Garbage.BAD_PORT),
    (G, b"app=web:65536", Garbage.BAD_PORT),
    (G, b"app=web:80x", Garbage.BAD_PORT),
    (G, b"app=web:", Garbage.BAD_PORT),
    (G, b"app=", Garbage.BAD_APP_NAME),
    (G, b"app=-web", Garbage.BAD_APP_NAME),
    (G, b"app=we_b", Garbage.BAD_APP_NAME),
    (G, b"app=" + b"a" * 64, Garbage.BAD_APP_NAME),
    (G, b"app-id=web", Garbage.NOT_APP_ADDRESS),  # the seed's form belongs to the seed's name
    (G, b"v=spf1 -all", Garbage.NOT_APP_ADDRESS),
    (G, b"", Garbage.NOT_APP_ADDRESS),
    (G, b"app=web\x00", Garbage.NOT_TEXT),
    (G, "app=wéb".encode(), Garbage.NOT_TEXT),
    (G, b"app=web" + b" " * 249, Garbage.TOO_LONG),  # 256 bytes
    (D, b"app-id=abc123def456", AppAddress("abc123def456", 0, D)),
    (D, b"app-id=web:8080", Garbage.NOT_APP_ADDRESS),  # the seed shows no port
    (D, b"app=web", Garbage.NOT_APP_ADDRESS),
])
def test_txt_values(owner, value, want):
    assert parse_value(owner, value) == want


@pytest.mark.parametrize(("values", "address", "garbage"), [
    ([], None, ()),
    ([b"app=web"], AppAddress("web"), ()),
    ([b"app=web", b"app=web"], AppAddress("web"), ()),  # the same record twice
    ([b"hello", b"app=web"], AppAddress("web"), (Garbage.NOT_APP_ADDRESS,)),
    ([b"app=web", b"app=api"], None, (Garbage.CONFLICT,)),
    ([b"app=web", b"app=web:81"], None, (Garbage.CONFLICT,)),
    ([b"app=web"] * 9, None, (Garbage.TOO_MANY_RECORDS,)),
])
def test_record_sets(values, address, garbage):
    found = read_records(G, values)
    assert (found.address, found.garbage) == (address, garbage)


def test_the_query_on_the_wire():
    # ID 0x1234, RD, one question TXT/IN, an OPT record with a 1232-byte payload
    assert make_query(NAME, 0x1234).hex() == (
        "123401000001000000000001" "145f67656f6d6573682d6170702d61646472657373" "0473686f70076578616d706c6500"
        "00100001" "00002904d0000000000000")


def reply(*answer: str, auth: tuple[str, ...] = (), rcode: int = RCODE.NOERROR, qid: int = 7, name: str = NAME,
          tc: bool = False, qr: bool = True) -> bytes:
    msg = DNSRecord(DNSHeader(id=qid, qr=int(qr), rd=1, ra=1, rcode=rcode, tc=int(tc)), q=DNSQuestion(name, 16))
    for text in answer:
        msg.add_answer(*RR.fromZone(text))
    for text in auth:
        msg.add_auth(*RR.fromZone(text))
    return msg.pack()


SOA = "example. 300 IN SOA ns1.example. host.example. 1 7200 1800 259200 60"


@pytest.mark.parametrize(("wire", "want"), [
    (reply(f'{NAME}. 30 IN TXT "app=web"'), TxtRecords((b"app=web",), 30)),
    (reply(f'{NAME}. 30 IN TXT "app=" "web"', f'{NAME}. 20 IN TXT "x"'), TxtRecords((b"app=web", b"x"), 20)),
    # the question echoed in other case (0x20) is the same name
    (reply(f'{NAME.upper()}. 30 IN TXT "app=web"', name=NAME.upper()), TxtRecords((b"app=web",), 30)),
    # a CNAME chain in the answer: followed, the least TTL counts
    (reply(f"{NAME}. 10 IN CNAME a.example.", "a.example. 300 IN CNAME b.example.", 'b.example. 60 IN TXT "app=web"'),
     TxtRecords((b"app=web",), 10)),
    # records at other names are not the answer
    (reply('other.example. 30 IN TXT "app=web"', auth=(SOA,)), NoTxt(False, 60)),
    (reply(auth=(SOA,), rcode=RCODE.NXDOMAIN), NoTxt(True, 60)),
    (reply(auth=("example. 5 IN SOA ns1.example. host.example. 1 7200 1800 259200 60",)), NoTxt(False, 5)),
    (reply(rcode=RCODE.NXDOMAIN), NoTxt(True, None)),
    (reply(tc=True), TRUNCATED),
])
def test_replies(wire, want):
    assert read_reply(NAME, 7, wire) == want


@pytest.mark.parametrize(("wire", "reason"), [
    (reply(qid=8), "bad_reply"),
    (reply(qr=False), "bad_reply"),
    (reply(name="_geomesh-app-address.other.example"), "bad_reply"),
    (b"\x00\x07\x81", "bad_reply"),
    (reply(rcode=RCODE.SERVFAIL), "servfail"),
    (reply(rcode=RCODE.REFUSED), "refused"),
])
def test_replies_refused(wire, reason):
    with pytest.raises(ResolverError) as err:
        read_reply(NAME, 7, wire)
    assert err.value.reason == reason


LIMITS = TtlLimits(min_ttl=5, max_ttl=3600, negative_ttl=30)
FAIL = ResolverError("timeout", "no answer")


@pytest.mark.parametrize(("answers", "address", "ttl", "failed"), [
    ({G: TxtRecords((b"app=web",), 300)}, AppAddress("web"), 300, False),
    ({G: TxtRecords((b"app=web",), 1)}, AppAddress("web"), 5, False),  # clamped up to min_ttl
    ({G: TxtRecords((b"app=web",), 86400)}, AppAddress("web"), 3600, False),  # and down to max_ttl
    ({G: TxtRecords((b"app=api",), 300), D: TxtRecords((b"app-id=web",), 60)}, AppAddress("api"), 300, False),
    ({G: NoTxt(True, 60), D: TxtRecords((b"app-id=web",), 60)}, AppAddress("web", 0, D), 60, False),
    ({G: NoTxt(True, 10), D: NoTxt(True, 20)}, None, 10, False),  # the SOA's negative TTL...
    ({G: NoTxt(True, 600), D: NoTxt(True, 600)}, None, 30, False),  # ...at most negative_ttl
    ({G: NoTxt(True, None), D: NoTxt(False, None)}, None, 30, False),  # no SOA: negative_ttl
    ({G: NoTxt(True, 1), D: NoTxt(True, 1)}, None, 5, False),  # at least min_ttl
    ({G: TxtRecords((b"junk",), 100), D: NoTxt(True, 50)}, None, 30, False),
    ({G: FAIL, D: TxtRecords((b"app-id=web",), 60)}, None, 5, True),  # geomesh's record could not be read
    ({G: NoTxt(True, 60), D: FAIL}, None, 5, True),
    ({G: TxtRecords((b"app=web",), 60), D: FAIL}, AppAddress("web"), 60, False),
])
def test_what_a_lookup_caches(answers, address, ttl, failed):
    found = decide(answers, 1000.0, LIMITS)
    assert (found.address, found.expires - 1000.0, bool(found.failure)) == (address, ttl, failed)


def test_negative_ttl_below_min_ttl_wins():
    found = decide({G: NoTxt(True, 60)}, 0.0, TtlLimits(min_ttl=5, max_ttl=60, negative_ttl=2))
    assert found.expires == 2


def test_the_cache_expires_and_is_bounded():
    cache = DomainCache(max_entries=3)
    for i in range(5):
        cache.put(f"h{i}", Lookup(None, 100.0 + i), 0.0)
    assert list(cache.entries) == ["h2", "h3", "h4"]  # the oldest dropped first
    assert cache.get("h3", 102.9) is not None and cache.get("h3", 103.0) is None
    cache.put("h9", Lookup(None, 200.0), 104.5)  # the expired entries at the front go first
    assert list(cache.entries) == ["h9"]


def test_the_lookup_budget():
    budget = LookupBudget(client_rate=1, client_burst=2, rate=10, burst=3)
    assert [budget.take("a", 0.0) for _ in range(3)] == [None, None, Refusal.CLIENT]
    assert budget.take("b", 0.0) is None  # another client: its own bucket; the shared one now empty
    assert budget.take("c", 0.0) is Refusal.GLOBAL
    assert budget.take(None, 0.0) is Refusal.GLOBAL  # exempt from the client rate, not from the shared one
    assert budget.take("a", 1.0) is None  # a second later: one token back for "a", ten for all
    refused = LookupBudget(client_rate=1, client_burst=1, rate=1, burst=1)
    assert refused.take("a", 0.0) is None and refused.take("a", 0.0) is Refusal.CLIENT
    assert refused.take("b", 0.5) is Refusal.GLOBAL
    assert refused.take("b", 1.0) is None  # a client refused by the shared bucket kept its token
    few = LookupBudget(client_rate=1, client_burst=1, rate=100, burst=100, max_clients=2)
    for c in ("a", "b", "c"):
        few.take(c, 0.0)
    assert list(few.clients) == ["b", "c"]


ROUTES = Routes(zone="apps.test", apps={"web": AppRoute("web", backends=(Backend("127.0.0.1", 8000),), ports=(81,))},
                domains={"pinned.example": DomainRoute("pinned.example", "web")})


@pytest.mark.parametrize(("host", "looked_up"), [
    ("shop.example", True), ("a.b.shop.example", True), ("xn--bcher-kva.example", True),
    ("apps.test", False), ("web.apps.test", False), ("x.y.apps.test", False), ("pinned.example", False),
    ("localhost", False), ("192.0.2.1", False), ("[2001:db8::1]", False), ("", False),
    ("a" * 60 + "." + "b" * 60 + "." + "c" * 60 + "." + "d" * 50 + ".example", False),  # the TXT name: > 253
])
def test_which_hosts_are_looked_up(host, looked_up):
    assert custom_candidate(ROUTES, host) is looked_up


@pytest.mark.parametrize(("address", "want"), [
    (AppAddress("web"), NameMatch("web", 0)),
    (AppAddress("web", 81), NameMatch("web", 81)),
    (AppAddress("web", 8000), NameMatch("web", 8000)),  # its instances' own port
    (AppAddress("web", 22), "does not expose port 22"),
    (AppAddress("nope"), "custom domain shop.example names app 'nope', which does not exist"),
])
def test_resolving_a_record(address, want):
    got = resolve_custom(ROUTES, "shop.example", address)
    if isinstance(want, NameMatch):
        assert got == want
    else:
        assert isinstance(got, UnknownName) and want in got.reason


@pytest.mark.parametrize(("kw", "field"), [
    ({"resolver": "resolver.example:53"}, "resolver"),
    ({"resolver": "127.0.0.1"}, "resolver"),
    ({"resolver": "127.0.0.1:0"}, "resolver"),
    ({"resolver_timeout": 0}, "resolver_timeout"),
    ({"resolver_timeout": 31}, "resolver_timeout"),
    ({"custom_domain_min_ttl": 60.0, "custom_domain_max_ttl": 30.0}, "custom_domain_min_ttl"),
    ({"custom_domain_client_rate": 0}, "custom_domain_client_rate"),
    ({"custom_domain_cache_entries": "many"}, "custom_domain_cache_entries"),
])
def test_settings_name_the_field(kw, field):
    with pytest.raises(ValidationError) as err:
        ProxySettings(http=("127.0.0.1:0",), **kw)
    assert err.value.field == field


GATEWAY = """name = "gw-a"
region = "eu"
coordinators = ["127.0.0.1:7443"]
public_ip = "192.0.2.1"
insecure = true
"""


@pytest.mark.parametrize(("table", "field"), [
    ('resolver = "127.0.0.1:5353"\nmin_ttl = 2\nclient_rate = 5', None),
    ('resolver = "nameserver"', "custom_domains.resolver"),
    ("min_ttl = -1", "custom_domains.min_ttl"),
    ("rate = 1.5", "custom_domains.rate"),
    ("ttl = 5", "custom_domains.ttl"),
])
def test_the_agent_config_table(tmp_path: Path, table, field):
    path = tmp_path / "gateway.toml"
    path.write_text(GATEWAY + "[custom_domains]\n" + table + "\n")
    if field is None:
        config = agent_config.load(path)
        assert config.custom_domains == {"resolver": "127.0.0.1:5353", "custom_domain_min_ttl": 2,
                                         "custom_domain_client_rate": 5}
        return
    with pytest.raises(ValidationError) as err:
        agent_config.load(path)
    assert err.value.field == field
