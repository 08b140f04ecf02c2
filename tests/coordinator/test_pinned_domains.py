"""Pinned domains are pending until the coordinator sees their TXT record, against real DNS: a real
coordinator on real etcd whose `--resolver` is a real unbound stub-zoning the customers' zone to a
real gdnsd. AddDomain stores the domain pending whatever the caller says; the record appearing
verifies it (gateways route only verified domains: tests/proxy/test_routes.py); the record going
or naming another app makes it pending again; a coordinator without a resolver leaves it pending and says so."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import pytest

from geomesh.api import geomesh_pb2 as pb
from geomesh.lab.customer_dns import Gdnsd, Unbound
from geomesh.lab.processes import free_port

from .test_admin import seed

CUSTOMER = "customer.example"
SOA = "$TTL 30\n@ SOA ns1 hostmaster 1 7200 1800 259200 1\n@ NS ns1\nns1 A 127.0.0.1\n"


def zone(*records: str) -> str:
    return SOA + "".join(r + "\n" for r in records)


@pytest.fixture
def customer_dns(tmp_path):
    gdnsd = Gdnsd(tmp_path / "gdnsd", {CUSTOMER: zone()})
    try:
        unbound = Unbound(tmp_path / "unbound", {CUSTOMER: gdnsd.address}, cache_max_ttl=1)
    except Exception:
        gdnsd.stop()
        raise
    yield gdnsd, unbound
    unbound.stop()
    gdnsd.stop()


async def verified(admin, fqdn: str) -> bool | None:
    for d in (await admin.ListDomains(pb.Empty())).domains:
        if d.fqdn == fqdn:
            return d.verified
    return None


async def until_verified(admin, fqdn: str, want: bool, timeout: float = 20.0) -> float:
    start = time.monotonic()
    while (got := await verified(admin, fqdn)) is not want:
        assert time.monotonic() - start < timeout, f"{fqdn} still verified={got}"
        await asyncio.sleep(0.1)
    return time.monotonic() - start


def metric(port: int, line_start: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start))


async def test_a_pinned_domain_is_pending_until_its_txt_names_its_app(coordinator_factory, customer_dns):
    gdnsd, unbound = customer_dns
    metrics_port = free_port()
    c = coordinator_factory("--resolver", "{}:{}".format(*unbound.address), "--domain-verify-interval", "1",
                            "--domain-pending-interval", "0.3", "--metrics-port", str(metrics_port))
    admin = c.admin()
    await seed(admin)
    await admin.CreateApp(pb.App(name="shop"))
    fqdn = f"www.{CUSTOMER}"
    # the caller's word is not taken: pending, and no record yet keeps it so
    added = await admin.AddDomain(pb.Domain(fqdn=fqdn, app="web", verified=True))
    assert added.verified is False
    await asyncio.sleep(1.5)
    assert await verified(admin, fqdn) is False
    assert unbound.queries(f"_geomesh-app-address.{fqdn}") >= 1  # it was looked up (and found missing)
    assert '"pinned domain pending"' in c.log()

    # the owner publishes the record: verified within the pending interval's backoff
    gdnsd.set_zone(CUSTOMER, zone('_geomesh-app-address.www 1 TXT "app=web"'))
    took = await until_verified(admin, fqdn, True)
    print(f"pinned domain verified {took:.1f} s after its TXT record appeared")
    assert metric(metrics_port, 'geomesh_coordinator_pinned_domain_changes_total{to="verified"}') >= 1

    # the record now names another app: pending again, logged with both names
    gdnsd.set_zone(CUSTOMER, zone('_geomesh-app-address.www 1 TXT "app=shop"'))
    await until_verified(admin, fqdn, False)
    assert "names app 'shop', not the pinned app 'web'" in c.log()
    # the seed's record naming the app verifies it too
    gdnsd.set_zone(CUSTOMER, zone('_dstack-app-address.www 1 TXT "app-id=web"'))
    await until_verified(admin, fqdn, True)
    # the record is gone: pending again, counted
    gdnsd.set_zone(CUSTOMER, zone())
    await until_verified(admin, fqdn, False)
    assert metric(metrics_port, 'geomesh_coordinator_pinned_domain_changes_total{to="pending"}') >= 2
    # garbage is counted on the coordinator's side as on the gateway's
    gdnsd.set_zone(CUSTOMER, zone(*[f'_geomesh-app-address.www 1 TXT "app=web{i}"' for i in range(9)]))
    deadline = time.monotonic() + 20
    while metric(metrics_port, 'geomesh_coordinator_domain_txt_rejected_total{reason="too_many_records"}') < 1:
        assert time.monotonic() < deadline, "nine records at one name were not counted"
        await asyncio.sleep(0.2)
    assert await verified(admin, fqdn) is False


async def test_without_a_resolver_pinned_domains_stay_pending(coordinator_factory):
    c = coordinator_factory()
    admin = c.admin()
    await seed(admin)
    await admin.AddDomain(pb.Domain(fqdn=f"www.{CUSTOMER}", app="web"))
    await asyncio.sleep(0.5)
    assert await verified(admin, f"www.{CUSTOMER}") is False
    assert "no --resolver: pinned domains (AddDomain) stay pending" in c.log()


@pytest.mark.parametrize(("flag", "value", "field"), [
    ("--resolver", "resolver.example:53", "resolver"),
    ("--domain-pending-interval", "0", "domain_pending_interval"),
    ("--domain-verify-interval", "100000", "domain_verify_interval"),
])
def test_bad_flags_are_refused_naming_them(flag: str, value: str, field: str, capsys) -> None:
    from coordinator.main import main

    assert main(["--insecure", flag, value]) == 2
    assert f"invalid configuration: {field}:" in capsys.readouterr().err
