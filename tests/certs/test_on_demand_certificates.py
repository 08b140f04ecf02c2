"""Certificates on demand for custom domains, end to end and every part real: etcd, a coordinator
ordering from Debian's pebble by HTTP-01 with `--resolver` = a real unbound that stub-zones the
customers' zone to a real gdnsd, and a gateway (agent + proxy) whose TXT look-ups go through the
same unbound. pebble resolves the custom domain's A record (127.0.0.1) through that unbound and
validates at the gateway's plain port.

A TLS client naming a custom domain, trusting only pebble's root, completes its first handshake
while the certificate is obtained (the time from the TXT record appearing is printed); the next
handshake uses the certificate held (no second order); handshakes at once share one request; a
pinned domain, once its record verified it, gets its certificate the same way; a
random subdomain with no TXT record and a record naming a missing app get a TLS alert at once and
order nothing; the coordinator refuses what the gateway would not ask (no TXT, missing app, over
the rate); a record that goes drops the certificate; with the CA gone, orders fail with backoff
while the certificates held keep serving.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from prometheus_client import REGISTRY

from geomesh.api import geomesh_pb2 as pb
from geomesh.lab.customer_dns import Gdnsd, Unbound
from geomesh.lab.processes import free_port
from regional_gateway.agent import Agent
from tests.proxy.backends import Backend
from tests.proxy.client import Conn

from ..coordinator.test_admin import seed
from ..gateway.test_agent import config_for, enrolled, until
from .test_zone_certificate import until_value

ZONE = "geo.test"
CUSTOMER = "customer.example"
SOA = "$TTL 30\n@ SOA ns1 hostmaster 1 7200 1800 259200 1\n@ NS ns1\nns1 A 127.0.0.1\n"
HOSTS = ("shop", "shop2", "shop3", "missing", "www") + tuple(f"rnd{i}" for i in range(3))


MISSING = '_geomesh-app-address.missing 1 TXT "app=nope"'  # an app that does not exist, all along


def zone(*txt: str) -> str:
    """The customers' zone: every test host has an A record to this machine; `txt` are TXT lines."""
    return SOA + "".join(f"{h} 1 A 127.0.0.1\n" for h in HOSTS) + "".join(t + "\n" for t in (MISSING, *txt))


def handshake(port: int, root: str, name: str, timeout: float = 30.0) -> tuple[str, int, str]:
    """A TLS client trusting only pebble's root: the certificate's serial (hex), then a request's status
    and backend."""
    ctx = ssl.create_default_context(cadata=root)
    with Conn(("127.0.0.1", port), timeout=timeout, tls=ctx, server_name=name) as c:
        serial = format(x509.load_der_x509_certificate(c.sock.getpeercert(binary_form=True)).serial_number, "x")
        r = c.request(name)
        return serial, r.status, r.header("x-backend") or ""


def alert(port: int, root: str, name: str) -> tuple[str, float]:
    """A handshake that must fail: the error and how long it took."""
    start = time.monotonic()
    with pytest.raises(ssl.SSLError) as err:
        handshake(port, root, name)
    return str(err.value), time.monotonic() - start


def metric(port: int, line_start: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start))


def gateway_metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def certificate(admin, name: str) -> pb.CertificateStatus | None:  # noqa: ANN001
    for c in (await admin.GetOverview(pb.Empty())).certificates:
        if c.name == name:
            return c
    return None


@pytest.fixture
def customer_dns(tmp_path: Path):
    gdnsd = Gdnsd(tmp_path / "gdnsd", {CUSTOMER: zone()})
    try:
        unbound = Unbound(tmp_path / "unbound", {CUSTOMER: gdnsd.address}, cache_max_ttl=1)
    except Exception:
        gdnsd.stop()
        raise
    yield gdnsd, unbound
    unbound.stop()
    gdnsd.stop()


async def test_a_custom_domain_gets_its_certificate_during_its_first_handshake(
        etcd, pki, coordinator_factory, pebble_factory, customer_dns, tmp_path: Path) -> None:
    gdnsd, unbound = customer_dns
    resolver = "{}:{}".format(*unbound.address)
    proxy_port, https_port, metrics_port = free_port(), free_port(), free_port()
    pebble = pebble_factory(resolver, http_port=proxy_port)  # validates at the gateway's plain port
    root = pebble.root_pem()
    coordinator = coordinator_factory(
        "--allow-loopback-instances", "--metrics-port", str(metrics_port),
        "--acme-directory", pebble.directory, "--acme-zone", ZONE, "--acme-ca-bundle", str(pebble.listener_ca),
        "--acme-retry", "1", "--acme-retry-max", "2", "--acme-check-interval", "0.5", "--acme-http01-grace", "0",
        "--resolver", resolver, "--domain-verify-interval", "2", "--cert-request-rate", "0.05")
    admin = coordinator.admin()
    await seed(admin)
    await admin.CreateApp(pb.App(name="hello", lb_policy=pb.LB_POLICY_ROUND_ROBIN))
    backend = Backend("hello-1")
    cfg = await enrolled(coordinator, config_for(
        [coordinator], pki, tmp_path, "gw-od", "192.0.2.83", zone=ZONE, dataplane=True, proxy_listen="127.0.0.1",
        proxy_port=proxy_port, https_port=https_port,
        custom_domains={"resolver": resolver, "custom_domain_min_ttl": 1.0, "custom_domain_negative_ttl": 1.0,
                        "on_demand_wait": 8.0}))
    await admin.AddInstance(pb.Instance(app="hello", id="h1", region="eu-central", address="127.0.0.1",
                                        port=backend.port))
    agent = Agent(cfg)
    task = asyncio.create_task(agent.run())
    shop, shop2 = f"shop.{CUSTOMER}", f"shop2.{CUSTOMER}"
    try:
        await until(lambda: agent.proxy is not None and "hello/h1" in agent.table.instances, timeout=20)
        assert agent.proxy.on_demand is not None

        # no TXT record (a random subdomain): an alert at once, nothing asked, nothing ordered
        error, took = await asyncio.to_thread(alert, https_port, root, f"rnd0.{CUSTOMER}")
        assert "UNRECOGNIZED_NAME" in error and took < 10, (error, took)
        # a record naming an app that does not exist: the same (and the plain port's 404 names it)
        error, _ = await asyncio.to_thread(alert, https_port, root, f"missing.{CUSTOMER}")
        assert "UNRECOGNIZED_NAME" in error
        assert metric(metrics_port, "geomesh_certificate_requests_total") == 0  # the gateway asked nothing

        # the owner publishes the record: the first handshake waits for the certificate and gets the app
        gdnsd.set_zone(CUSTOMER, zone('_geomesh-app-address.shop 1 TXT "app=hello"'))
        published = time.monotonic()
        serial, status, who = await asyncio.to_thread(handshake, https_port, root, shop)
        live = time.monotonic() - published
        assert (status, who) == (200, "hello-1")
        print(f"custom domain live (certificate and route) {live:.1f} s after its TXT record appeared")
        issued = 'geomesh_certificate_orders_total{name="shop.customer.example",result="issued"}'
        assert metric(metrics_port, issued) == 1
        # the next handshake uses the certificate held: the same one, no second order, no request
        asked = metric(metrics_port, "geomesh_certificate_requests_total")
        assert await asyncio.to_thread(handshake, https_port, root, shop) == (serial, 200, "hello-1")
        assert metric(metrics_port, issued) == 1
        assert metric(metrics_port, "geomesh_certificate_requests_total") == asked
        held = await certificate(admin, shop)
        assert held is not None and list(held.dns_names) == [shop] and held.serial.lstrip("0") == serial

        # three handshakes at once for a new domain share one request
        gdnsd.set_zone(CUSTOMER, zone('_geomesh-app-address.shop 1 TXT "app=hello"',
                                      '_geomesh-app-address.shop2 1 TXT "app=hello"'))
        before = gateway_metric("geomesh_gateway_on_demand_certificates_total", result="obtained")
        results: list[object] = []

        def one() -> None:
            try:
                results.append(handshake(https_port, root, shop2))
            except Exception as exc:  # noqa: BLE001 - reported by the assert below
                results.append(exc)

        threads = [threading.Thread(target=one) for _ in range(3)]
        for t in threads:
            t.start()
        await asyncio.to_thread(lambda: [t.join(60) for t in threads])
        assert len(results) == 3 and all(isinstance(r, tuple) and r[1:] == (200, "hello-1") for r in results), results
        assert gateway_metric("geomesh_gateway_on_demand_certificates_total", result="obtained") - before == 3
        ordered = metric(metrics_port, 'geomesh_certificate_requests_total{result="ordered"}')
        assert ordered == 2 and metric(metrics_port, 'geomesh_certificate_requests_total{result="pending"}') == 0

        # the coordinator checks the record itself: a gateway asking for what it would not is refused
        other = coordinator.gateway_control("gw-other")
        for name, want in ((f"rnd1.{CUSTOMER}", "no order without a matching TXT record: no valid TXT record"),
                           (f"missing.{CUSTOMER}", "names app 'nope', which does not exist"),
                           (f"www.{ZONE}", "is in the zone")):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await other.RequestCertificate(pb.CertificateRequest(name=name))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and want in err.value.details(), name
        ok = await other.RequestCertificate(pb.CertificateRequest(name=shop))
        assert (ok.accepted, ok.reason) == (True, "held")  # held: free, at once
        codes = []
        for i in range(4):  # the burst is 5 per gateway: two spent above, then refused
            try:
                await other.RequestCertificate(pb.CertificateRequest(name=f"rnd{i % 3}.{CUSTOMER}"))
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
        assert codes[:3] == [grpc.StatusCode.FAILED_PRECONDITION] * 3
        assert codes[3] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert metric(metrics_port, 'geomesh_certificate_orders_total{name="rnd1.customer.example"') == 0

        # a pinned domain (AddDomain) is routed once verified by its record, and gets its certificate the same way
        await admin.AddDomain(pb.Domain(fqdn=f"www.{CUSTOMER}", app="hello"))
        gdnsd.set_zone(CUSTOMER, zone('_geomesh-app-address.shop 1 TXT "app=hello"',
                                      '_geomesh-app-address.shop2 1 TXT "app=hello"',
                                      '_geomesh-app-address.www 1 TXT "app=hello"'))
        await until(lambda: f"www.{CUSTOMER}" in agent.proxy.state.routes.domains, timeout=30)
        assert (await asyncio.to_thread(handshake, https_port, root, f"www.{CUSTOMER}"))[1:] == (200, "hello-1")

        # the record goes: the certificate is dropped at the next check, and the name gets its alert again
        gdnsd.set_zone(CUSTOMER, zone('_geomesh-app-address.shop2 1 TXT "app=hello"'))
        await until_value(lambda: certificate(admin, shop), lambda c: c is None, timeout=30)
        await until(lambda: shop not in agent.proxy.certs.names(), timeout=20)
        error, _ = await asyncio.to_thread(alert, https_port, root, shop)  # as any unknown name: the default
        assert "Hostname mismatch" in error                                  # certificate (shop2's now)
        assert "custom domain certificate dropped" in coordinator.log()

        # the CA goes away: a new order fails with backoff, the certificate held keeps serving
        pebble.stop()
        gdnsd.set_zone(CUSTOMER, zone('_geomesh-app-address.shop2 1 TXT "app=hello"',
                                      '_geomesh-app-address.shop3 1 TXT "app=hello"'))
        third = coordinator.gateway_control("gw-third")
        got = await third.RequestCertificate(pb.CertificateRequest(name=f"shop3.{CUSTOMER}"))
        assert (got.accepted, got.reason) == (True, "ordered")
        failing = await until_value(lambda: certificate(admin, f"shop3.{CUSTOMER}"),
                                    lambda c: c is not None and c.failures >= 2, timeout=60)
        assert "connection refused" in failing.last_error
        serial2, status, _ = await asyncio.to_thread(handshake, https_port, root, shop2)
        assert status == 200 and serial2 == results[0][0]  # type: ignore[index]
        # a handshake for the name waits its bounded time, then gets the alert: never a hang
        timeouts = gateway_metric("geomesh_gateway_on_demand_certificates_total", result="timeout")
        error, took = await asyncio.to_thread(alert, https_port, root, f"shop3.{CUSTOMER}")
        assert "UNRECOGNIZED_NAME" in error and took < 30, (error, took)
        assert gateway_metric("geomesh_gateway_on_demand_certificates_total", result="timeout") == timeouts + 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if agent.proxy is not None:
            await agent.proxy.shutdown()
        backend.close()
