"""End to end, every part real: etcd, a coordinator ordering by ACME, geomesh-dns serving the
challenge from its routing feed, Debian's pebble as the CA validating against that geomesh-dns,
and a gateway (agent + proxy) serving the certificate it was sent sealed.

From an empty state the zone's certificate is obtained (pebble validates `_acme-challenge.<zone>`
at geomesh-dns), rests in etcd with its key sealed (no PEM private key anywhere in etcd), shows
in GetOverview with its expiry, reaches the gateway, and a TLS client that trusts only pebble's
root gets `hello.<zone>` from it. With pebble's short validity the certificate is renewed before
it expires and the gateway swaps in the new serial. With the CA gone, attempts fail with backoff,
the metric shows the failures, and the certificate held keeps serving.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
import urllib.request
from pathlib import Path

from cryptography import x509

from coordinator.store import EtcdStore
from geodns.nearest import default_database
from geomesh.api import geomesh_pb2 as pb
from geomesh.lab.processes import free_port
from regional_gateway.agent import Agent
from tests.proxy.backends import Backend
from tests.proxy.client import Conn

from ..coordinator.test_admin import seed
from ..gateway.test_agent import config_for, enrolled, until
from ..geodns.clients import DnsProcess

ZONE = "geo.test"
HOST = f"hello.{ZONE}"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served(port: int, root_pem: str) -> tuple[int, int, str]:
    """A TLS client that trusts only pebble's root: the served certificate's serial, then a request."""
    ctx = ssl.create_default_context(cadata=root_pem)
    with Conn(("127.0.0.1", port), timeout=5.0, tls=ctx, server_name=HOST) as c:
        serial = x509.load_der_x509_certificate(c.sock.getpeercert(binary_form=True)).serial_number
        r = c.request(HOST)
        return serial, r.status, r.header("x-backend") or ""


def metrics(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


async def etcd_dump(endpoint: str) -> bytes:
    store = EtcdStore(endpoint)
    await store.connect()
    try:
        _, kvs = await store.get_prefix(b"/")
        return b"\n".join(kv.key + b"=" + kv.value for kv in kvs)
    finally:
        await store.close()


async def overview_cert(admin) -> pb.CertificateStatus | None:  # noqa: ANN001
    for c in (await admin.GetOverview(pb.Empty())).certificates:
        if c.name == ZONE:
            return c
    return None


async def test_zone_certificate_from_pebble_through_geomesh_dns_to_the_gateway(
        etcd, pki, coordinator_factory, pebble_factory, tmp_path: Path) -> None:
    mmdb = default_database()
    assert mmdb is not None, "the GeoLite2 database of maxminddb-geolite2 is missing"
    dns_port = free_udp_port()
    # certificates valid 40 s, renewed 25 s before they expire: a renewal within the test
    pebble = pebble_factory(f"127.0.0.1:{dns_port}", validity_seconds=40)
    root = pebble.root_pem()
    metrics_port = free_port()
    coordinator = coordinator_factory(
        "--allow-loopback-instances", "--metrics-port", str(metrics_port),
        "--acme-directory", pebble.directory, "--acme-zone", ZONE, "--acme-ca-bundle", str(pebble.listener_ca),
        "--acme-renew-before", str(25 / 86400), "--acme-retry", "1", "--acme-retry-max", "2",
        "--acme-check-interval", "0.5")
    ident = pki.identity("dns", "dns-acme")
    dns = DnsProcess(tmp_path / "dns", "--listen", f"127.0.0.1:{dns_port}", "--coordinator", coordinator.address,
                     "--zone", ZONE, "--ns", "ns1=192.0.2.53", "--tls-ca", str(ident.ca),
                     "--tls-cert", str(ident.cert), "--tls-key", str(ident.key), "--geoip-db", str(mmdb)).start()
    admin = coordinator.admin()
    await seed(admin)
    await admin.CreateApp(pb.App(name="hello", lb_policy=pb.LB_POLICY_ROUND_ROBIN))
    backend = Backend("hello-1")
    https_port = free_port()
    cfg = await enrolled(coordinator, config_for(
        [coordinator], pki, tmp_path, "gw-acme", "192.0.2.81", zone=ZONE, dataplane=True,
        proxy_listen="127.0.0.1", proxy_port=free_port(), https_port=https_port))
    await admin.AddInstance(pb.Instance(app="hello", id="h1", region="eu-central", address="127.0.0.1",
                                        port=backend.port))
    agent = Agent(cfg)
    task = asyncio.create_task(agent.run())
    start = time.monotonic()
    try:
        # obtained from an empty state, validated by pebble at geomesh-dns
        first = await until_value(lambda: overview_cert(admin), lambda c: c is not None and c.serial, timeout=60)
        took = time.monotonic() - start
        assert set(first.dns_names) == {ZONE, f"*.{ZONE}"} and first.not_after > time.time()
        assert first.failures == 0 and first.last_error == ""
        assert '"challenge served by every GeoDNS server"' in coordinator.log()
        # the key rests sealed: etcd holds the chain, never a private key
        dump = await etcd_dump(etcd.endpoint)
        assert b"/geomesh/v1/certs/geo.test" in dump and b"PRIVATE KEY" not in dump
        assert b"_acme-challenge" not in dump  # the challenge TXT was withdrawn
        # the gateway got it sealed and serves it to a client trusting only pebble's root
        await until(lambda: agent.proxy is not None and "hello/h1" in agent.table.instances, timeout=20)
        serial, status, who = await until_value(
            lambda: asyncio.to_thread(try_served, https_port, root), lambda v: v is not None, timeout=20)
        assert (format(serial, "x"), status, who) == (first.serial.lstrip("0"), 200, "hello-1")
        print(f"zone certificate from an empty lab in {took:.1f} s")
        text = await until_value(lambda: asyncio.to_thread(metrics, metrics_port),
                                 lambda t: f'geomesh_certificate_not_after_seconds{{name="{ZONE}"}}' in t, timeout=10)
        assert "geomesh_acme_leader 1.0" in text

        # renewed ahead of expiry: a new serial reaches the gateway
        renewed = await until_value(lambda: overview_cert(admin), lambda c: c is not None and c.serial != first.serial,
                                    timeout=60)
        await until_value(lambda: asyncio.to_thread(try_served, https_port, root),
                          lambda v: v is not None and format(v[0], "x") == renewed.serial.lstrip("0"), timeout=20)

        # the CA goes away: attempts fail with backoff, the failures show, the certificate held serves
        pebble.stop()
        failing = await until_value(lambda: overview_cert(admin), lambda c: c is not None and c.failures >= 2,
                                    timeout=90)
        assert "connection refused" in failing.last_error and failing.serial == renewed.serial
        def failures_in_a_row(text: str) -> float:
            lines = [line for line in text.splitlines()
                     if line.startswith(f'geomesh_certificate_renewal_failures{{name="{ZONE}"}}')]
            return float(lines[0].split()[-1]) if lines else 0.0
        await until_value(lambda: asyncio.to_thread(metrics, metrics_port), lambda t: failures_in_a_row(t) >= 2,
                          timeout=10)
        serial, status, _ = await asyncio.to_thread(served, https_port, root)
        assert format(serial, "x") == renewed.serial.lstrip("0") and status == 200
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if agent.proxy is not None:
            await agent.proxy.shutdown()
        dns.stop()
        backend.close()


def try_served(port: int, root: str) -> tuple[int, int, str] | None:
    try:
        return served(port, root)
    except (OSError, ssl.SSLError):
        return None


async def until_value(get, accept, timeout: float):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while True:
        value = await get()
        if accept(value):
            return value
        assert time.monotonic() < deadline, f"still {value!r}"
        await asyncio.sleep(0.2)
