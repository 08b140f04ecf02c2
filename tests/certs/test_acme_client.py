"""coordinator.acme_client against a real pebble: orders by DNS-01 and HTTP-01, and how it fails.

Pebble validates through `ChallengeDns` (the publish callback fills its TXT records; geomesh-dns
itself is exercised end to end elsewhere) and, for HTTP-01, fetches tokens from `ChallengeHttp`
on pebble's httpPort. Issued chains are verified against the root pebble's management endpoint
hands out for this run.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store

from coordinator.acme_client import AcmeClient, AcmeError, Issued, new_key_pem
from geomesh.lab.pebble import PebbleProcess, free_port
from tests.certs.challenge_responders import ChallengeDns, ChallengeHttp


@dataclass
class Lab:
    dns: ChallengeDns
    http: ChallengeHttp
    pebble: PebbleProcess

    def client(self, key: bytes | None = None) -> AcmeClient:
        return AcmeClient(self.pebble.directory, account_key_pem=key or new_key_pem(),
                          ca_bundle=self.pebble.listener_ca, timeout=10.0)


@pytest.fixture
async def lab(pebble_factory) -> AsyncIterator[Lab]:
    dns = ChallengeDns()
    address = await dns.start()
    http = ChallengeHttp(free_port())
    await http.start()
    try:
        yield Lab(dns, http, pebble_factory(address, http_port=http.port))
    finally:
        await http.close()
        dns.close()


@dataclass
class Calls:
    """The publish/withdraw pair a caller passes, recording what each got."""

    published: list[dict] = field(default_factory=list)
    withdrawn: list[dict] = field(default_factory=list)


def dns_callbacks(dns: ChallengeDns, calls: Calls | None = None, *, wrong: bool = False):
    """publish serves the TXT records from `dns` (wrong values if `wrong`), withdraw removes them."""
    calls = calls if calls is not None else Calls()

    async def publish(records: Mapping[str, tuple[str, ...]]) -> None:
        calls.published.append(dict(records))
        for name, values in records.items():
            dns.txt[name] = tuple("not-the-key-authorization" for _ in values) if wrong else values

    async def withdraw(records: Mapping[str, tuple[str, ...]]) -> None:
        calls.withdrawn.append(dict(records))
        for name in records:
            dns.txt.pop(name, None)

    return publish, withdraw


def verify(issued: Issued, root_pem: str, hostname: str) -> None:
    """x509 path validation of the chain for `hostname` against pebble's root (raises if not)."""
    certs = x509.load_pem_x509_certificates(issued.chain_pem.encode())
    store = Store([x509.load_pem_x509_certificate(root_pem.encode())])
    verifier = PolicyBuilder().store(store).time(datetime.datetime.now(datetime.UTC)) \
        .build_server_verifier(x509.DNSName(hostname))
    verifier.verify(certs[0], certs[1:])


def public_der(pem: bytes) -> bytes:
    key = serialization.load_pem_private_key(pem, None)
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


async def test_dns01_zone_and_wildcard_chain_verifies_against_pebble_root(lab: Lab) -> None:
    calls = Calls()
    publish, withdraw = dns_callbacks(lab.dns, calls)
    key_pem = new_key_pem()
    issued = await lab.client().order_dns01(("geo.test", "*.geo.test"), key_pem, publish, withdraw, deadline=60)

    # one TXT name with both values, published once, withdrawn with exactly what was published
    assert len(calls.published) == 1
    assert list(calls.published[0]) == ["_acme-challenge.geo.test"]
    assert len(calls.published[0]["_acme-challenge.geo.test"]) == 2
    assert calls.withdrawn == calls.published
    assert lab.dns.txt == {}
    assert ("_acme-challenge.geo.test", "TXT") in lab.dns.queries

    root = lab.pebble.root_pem()
    for host in ("geo.test", "www.geo.test"):
        verify(issued, root, host)
    with pytest.raises(x509.verification.VerificationError):
        verify(issued, root, "a.b.geo.test")  # a wildcard covers one label only

    leaf = x509.load_pem_x509_certificate(issued.chain_pem.encode())
    assert sorted(issued.names) == ["*.geo.test", "geo.test"]
    assert issued.names == tuple(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                                 .value.get_values_for_type(x509.DNSName))
    assert leaf.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo) == public_der(key_pem)
    assert issued.serial == format(leaf.serial_number, "x")
    assert issued.not_before == leaf.not_valid_before_utc.timestamp()
    assert issued.not_after == leaf.not_valid_after_utc.timestamp()
    assert issued.not_before <= datetime.datetime.now(datetime.UTC).timestamp() < issued.not_after
    assert issued.chain_pem.count("BEGIN CERTIFICATE") >= 2  # leaf and intermediate


async def test_wrong_txt_value_names_the_name_and_the_ca_detail_and_still_withdraws(lab: Lab) -> None:
    calls = Calls()
    publish, withdraw = dns_callbacks(lab.dns, calls, wrong=True)
    with pytest.raises(AcmeError) as err:
        await lab.client().order_dns01(("geo.test",), new_key_pem(), publish, withdraw, deadline=60)
    message = str(err.value)
    assert "dns-01 for geo.test is invalid" in message
    assert "unauthorized" in message                       # the CA's problem type
    assert "Correct value not found for DNS challenge" in message  # pebble's detail
    assert calls.withdrawn == calls.published and len(calls.published) == 1
    assert lab.dns.txt == {}


async def test_publish_failure_is_an_acme_error_and_withdraws_what_it_was_given(lab: Lab) -> None:
    withdrawn: list[dict] = []

    async def publish(records: Mapping[str, tuple[str, ...]]) -> None:
        raise RuntimeError("GeoDNS server dns2 did not answer")

    async def withdraw(records: Mapping[str, tuple[str, ...]]) -> None:
        withdrawn.append(dict(records))

    with pytest.raises(AcmeError, match="publishing the challenges: RuntimeError: GeoDNS server dns2"):
        await lab.client().order_dns01(("geo.test",), new_key_pem(), publish, withdraw, deadline=60)
    assert list(withdrawn[0]) == ["_acme-challenge.geo.test"]


async def test_deadline_names_what_was_pending_and_withdraws(lab: Lab) -> None:
    withdrawn: list[dict] = []
    never = asyncio.Event()

    async def publish(records: Mapping[str, tuple[str, ...]]) -> None:
        await never.wait()  # the caller's DNS never converges

    async def withdraw(records: Mapping[str, tuple[str, ...]]) -> None:
        withdrawn.append(dict(records))

    with pytest.raises(AcmeError) as err:
        await lab.client().order_dns01(("geo.test",), new_key_pem(), publish, withdraw, deadline=3)
    assert "deadline of 3 s" in str(err.value)
    assert "publishing the dns-01 challenges" in str(err.value)
    assert len(withdrawn) == 1


async def test_ca_down_names_the_directory_url(tmp_path) -> None:
    url = f"https://127.0.0.1:{free_port()}/dir"  # nothing listens there
    published: list[object] = []

    async def publish(records: object) -> None:
        published.append(records)

    client = AcmeClient(url, account_key_pem=new_key_pem())
    with pytest.raises(AcmeError) as err:
        await asyncio.wait_for(client.order_dns01(("geo.test",), new_key_pem(), publish, publish), 60)
    assert str(err.value) == f"ACME directory {url}: connection refused"
    assert published == []
    with pytest.raises(AcmeError, match=f"ACME directory {url}: connection refused"):
        await asyncio.wait_for(client.register(), 60)


async def test_untrusted_listener_is_a_tls_error(lab: Lab) -> None:
    client = AcmeClient(lab.pebble.directory, account_key_pem=new_key_pem())  # system CAs only
    with pytest.raises(AcmeError, match=r"ACME directory https://127\.0\.0\.1:\d+/dir: TLS certificate verify "
                                        "failed"):
        await client.register()


async def test_register_twice_with_one_key_is_the_same_account(lab: Lab) -> None:
    key = new_key_pem()
    first = await lab.client(key).register()
    assert first.startswith("https://127.0.0.1:")
    again = lab.client(key)
    assert await again.register() == first      # a second client with the same key finds it
    assert await again.register() == first      # and asking twice changes nothing
    assert await lab.client().register() != first  # another key is another account


async def test_http01_custom_domain(lab: Lab) -> None:
    lab.dns.a["shop.example.test"] = "127.0.0.1"
    published: list[dict] = []
    withdrawn: list[dict] = []

    async def publish(tokens: Mapping[str, str]) -> None:
        published.append(dict(tokens))
        lab.http.tokens.update(tokens)

    async def withdraw(tokens: Mapping[str, str]) -> None:
        withdrawn.append(dict(tokens))
        for token in tokens:
            lab.http.tokens.pop(token, None)

    issued = await lab.client().order_http01(("shop.example.test",), new_key_pem(), publish, withdraw,
                                             deadline=60)
    assert issued.names == ("shop.example.test",)
    verify(issued, lab.pebble.root_pem(), "shop.example.test")
    (token, key_authorization), = published[0].items()
    assert key_authorization.startswith(token + ".")
    assert withdrawn == published and lab.http.tokens == {}
    assert ("shop.example.test", f"/.well-known/acme-challenge/{token}") in \
        [(host.split(":")[0], path) for host, path in lab.http.requests]


async def test_http01_refuses_a_wildcard_before_asking_the_ca(lab: Lab) -> None:
    async def nothing(records: object) -> None:
        raise AssertionError("never called")

    with pytest.raises(AcmeError, match=r"names\[1\]: '\*.example.test': a wildcard needs dns-01"):
        await lab.client().order_http01(("example.test", "*.example.test"), new_key_pem(), nothing, nothing)


async def test_concurrent_orders_on_one_client(lab: Lab) -> None:
    client = lab.client()
    names = [("a.geo.test",), ("b.geo.test", "*.b.geo.test"), ("c.geo.test",)]
    results = await asyncio.gather(*(client.order_dns01(n, new_key_pem(), *dns_callbacks(lab.dns), deadline=60)
                                     for n in names))
    assert [sorted(r.names) for r in results] == [sorted(n) for n in names]
    assert len({r.serial for r in results}) == 3


async def test_short_validity_from_pebble_config(pebble_factory) -> None:
    """pebble 2.4's certificateValidityPeriod: what a renewal test needs."""
    dns = ChallengeDns()
    pebble = pebble_factory(await dns.start(), validity_seconds=120)
    try:
        client = AcmeClient(pebble.directory, account_key_pem=new_key_pem(), ca_bundle=pebble.listener_ca)
        issued = await client.order_dns01(("geo.test",), new_key_pem(), *dns_callbacks(dns), deadline=60)
    finally:
        dns.close()
    assert 60 < issued.not_after - issued.not_before <= 120


async def test_a_ca_that_forgot_the_account_fails_once_then_registers_again(lab: Lab) -> None:
    client = lab.client()
    await client.register()
    lab.pebble.stop()
    lab.pebble.start()  # same port and listener CA; pebble forgot every account
    with pytest.raises(AcmeError, match="accountDoesNotExist"):
        await client.order_dns01(("geo.test",), new_key_pem(), *dns_callbacks(lab.dns), deadline=60)
    issued = await client.order_dns01(("geo.test",), new_key_pem(), *dns_callbacks(lab.dns), deadline=60)
    assert issued.names == ("geo.test",)
    assert client.account_url is not None  # registered anew (pebble may reuse the URL numbering)
