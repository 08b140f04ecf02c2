"""End to end, every part real: a certificate for a name outside the zone (a custom domain) by ACME
HTTP-01, the challenge answered by the gateway's plain HTTP listener.

Real etcd; a coordinator process (ACME flags to pebble, so it seals certificates to its gateways'
sessions) holds the gateway's session; Debian's pebble validates `shop.example.test`, which the
in-test DNS resolves to 127.0.0.1, on its `httpPort`, where only the gateway's data plane listens.
The orderer is `ZoneCertificates.order_http01` in this process, on its own EtcdStore and State
mirror (as a second replica would be): the gateway's session is on the other replica, so the
publish waits the grace after the challenge is in etcd. The certificate is issued, rests in etcd
with its key sealed (no private key, no challenge left), shows in the coordinator's GetOverview,
reaches the gateway sealed, is served on its TLS port for SNI shop.example.test to a client that
trusts only pebble's root, and plain HTTP for that host is redirected there.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from pathlib import Path

from cryptography import x509

from coordinator.acme_orders import AcmeSettings, ZoneCertificates
from coordinator.heartbeats import GatewayStats
from coordinator.http01 import Http01Challenges
from coordinator.state import PREFIX, State
from coordinator.store import Compacted, EtcdStore, LeaseSet, ReplicaLease
from geomesh.api import geomesh_pb2 as pb
from geomesh.model import SessionState
from geomesh.sealing import SecretBox
from regional_gateway.agent import Agent
from tests.certs.challenge_responders import ChallengeDns
from tests.proxy.client import get

from ..coordinator.test_admin import seed
from ..gateway.test_agent import config_for, enrolled, until
from .test_zone_certificate import etcd_dump, until_value

ZONE = "geo.test"
CUSTOM = "shop.example.test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def follow(store: EtcdStore, state: State) -> None:
    """This test's replica mirror: load, then every revision (as `Coordinator._watch_loop`)."""
    revision, kvs = await store.get_prefix(PREFIX)
    state.load(revision, kvs)
    async for item in store.watch_prefix(PREFIX, state.revision + 1):
        assert not isinstance(item, Compacted), "nothing compacts etcd in this test"
        state.apply_batch(item)


def served_serial(port: int, root: str) -> int | None:
    """The serial a client trusting only pebble's root gets for SNI shop.example.test (None: no TLS yet)."""
    ctx = ssl.create_default_context(cadata=root)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname=CUSTOM) as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number
    except (OSError, ssl.SSLError):
        return None


async def test_custom_domain_certificate_by_http01_answered_by_the_gateway(
        etcd, pki, coordinator_factory, pebble_factory, tmp_path: Path) -> None:
    dns = ChallengeDns()
    dns_address = await dns.start()
    dns.a[CUSTOM] = "127.0.0.1"
    http_port, https_port = free_port(), free_port()
    pebble = pebble_factory(dns_address, http_port=http_port)
    root = pebble.root_pem()
    coordinator = coordinator_factory(
        "--allow-loopback-instances", "--acme-directory", pebble.directory, "--acme-zone", ZONE,
        "--acme-ca-bundle", str(pebble.listener_ca), "--acme-retry", "60", "--acme-retry-max", "60")
    admin = coordinator.admin()
    await seed(admin)
    cfg = await enrolled(coordinator, config_for(
        [coordinator], pki, tmp_path, "gw-http01", "192.0.2.85", zone=ZONE, dataplane=True,
        proxy_listen="127.0.0.1", proxy_port=http_port, https_port=https_port))
    agent = Agent(cfg)
    store = EtcdStore(etcd.endpoint)
    await store.connect()
    state, leases = State(), LeaseSet()
    lease = ReplicaLease(store, leases, 2)
    tasks = [asyncio.create_task(agent.run()), asyncio.create_task(follow(store, state)),
             asyncio.create_task(store.keepalive_forever(leases, 0.6))]
    settings = AcmeSettings(pebble.directory, ZONE, ca_bundle=pebble.listener_ca, http01_grace=2.0)
    orders = ZoneCertificates(settings, store, state, lease, SecretBox.load_or_create(pki.dir / "secrets.key"))
    orders.http01 = Http01Challenges(store, state, lease, GatewayStats(), grace=settings.http01_grace)
    try:
        await until(lambda: agent.proxy is not None and agent.connected.is_set()
                    and state.snapshot().session("gw-http01") is SessionState.OPEN, timeout=30)
        record = await asyncio.wait_for(orders.order_http01([CUSTOM]), 120)
        assert record.name == CUSTOM and record.dns_names == (CUSTOM,)
        assert (CUSTOM, "A") in dns.queries  # pebble looked the name up, then fetched the token from the gateway
        dump = await etcd_dump(etcd.endpoint)
        assert f"/geomesh/v1/certs/{CUSTOM}".encode() in dump and b"PRIVATE KEY" not in dump
        assert b"/geomesh/v1/http01/" not in dump  # withdrawn
        shown = await until_value(lambda: overview_cert(admin), lambda c: c is not None and c.serial, timeout=20)
        assert (shown.serial, shown.failures, shown.last_error) == (record.serial, 0, "")
        # the coordinator's session sealed it to the gateway, which serves it by SNI
        serial = await until_value(lambda: asyncio.to_thread(served_serial, https_port, root),
                                   lambda v: v is not None, timeout=30)
        assert format(serial, "x") == record.serial.lstrip("0")
        # and the gateway's plain listener sends the host to HTTPS now that it has a certificate
        r = await asyncio.to_thread(get, ("127.0.0.1", http_port), CUSTOM, "/cart?x=1")
        assert r.status == 301 and r.header("location") == f"https://{CUSTOM}:{https_port}/cart?x=1"
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if agent.proxy is not None:
            await agent.proxy.shutdown(0.5)
        with contextlib.suppress(Exception):
            await store.close()
        dns.close()


async def overview_cert(admin) -> pb.CertificateStatus | None:  # noqa: ANN001
    for c in (await admin.GetOverview(pb.Empty())).certificates:
        if c.name == CUSTOM:
            return c
    return None
