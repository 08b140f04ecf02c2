"""A real gateway (agent + proxy, registered with a real coordinator) takes the certificates of a
session message and serves them on its TLS listener: the handshake for `hello.<zone>` gets the
sent certificate, a renewed one (new serial) is swapped in for new handshakes while a connection
opened before keeps working, a bundle sealed to another key leaves the one in service and is
counted, the key file is 0600, the expiry metric follows, and a restart with the coordinator gone
serves the saved certificate."""

from __future__ import annotations

import asyncio
import os
import ssl
import stat
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from prometheus_client import REGISTRY

from geomesh.api import geomesh_pb2 as pb
from geomesh.errors import ValidationError
from geomesh.sealing import public_bytes
from regional_gateway.agent import Agent
from tests.proxy.backends import Backend
from tests.proxy.client import Conn

from ..coordinator.test_admin import seed
from ..gateway.test_agent import config_for, enrolled, free_port, until
from .bundles import ThrowawayCA, bundle

ZONE = "gwcerts.test"
HOST = f"hello.{ZONE}"


def _client(ca: ThrowawayCA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca.root_pem.decode())
    ctx.check_hostname = True
    return ctx


def _open(port: int, ctx: ssl.SSLContext) -> Conn:
    return Conn(("127.0.0.1", port), timeout=5.0, tls=ctx, server_name=HOST)


def _serial(conn: Conn) -> int:
    return x509.load_der_x509_certificate(conn.sock.getpeercert(binary_form=True)).serial_number


def _fetch(conn: Conn) -> tuple[int, str]:
    r = conn.request(HOST)
    return r.status, r.header("x-backend") or ""


def _handshake(port: int, ctx: ssl.SSLContext) -> tuple[int, int, str]:
    """A new connection: the served certificate's serial, and one request over it."""
    with _open(port, ctx) as c:
        return (_serial(c), *_fetch(c))


def _failures(reason: str) -> float:
    return REGISTRY.get_sample_value("geomesh_gateway_certificate_intake_failures_total", {"reason": reason}) or 0.0


def _not_after() -> float | None:
    return REGISTRY.get_sample_value("geomesh_gateway_certificate_not_after_seconds",
                                     {"name": ZONE, "source": "managed"})


async def _stop(agent: Agent, task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    if agent.proxy is not None:
        await agent.proxy.shutdown()


async def test_gateway_serves_swaps_and_keeps_certificates(coordinator_factory, pki, tmp_path) -> None:
    coordinator = coordinator_factory("--allow-loopback-instances")
    admin = coordinator.admin()
    await seed(admin)
    await admin.CreateApp(pb.App(name="hello", lb_policy=pb.LB_POLICY_ROUND_ROBIN))
    backend = Backend("hello-1")
    https_port = free_port()
    cfg = await enrolled(coordinator, config_for(
        [coordinator], pki, tmp_path, "gw-certs", "192.0.2.71", zone=ZONE, dataplane=True,
        proxy_listen="127.0.0.1", proxy_port=free_port(), https_port=https_port))
    await admin.AddInstance(pb.Instance(app="hello", id="h1", region="eu-central", address="127.0.0.1",
                                        port=backend.port))
    ca = ThrowawayCA()
    ctx = _client(ca)
    agent = Agent(cfg)
    task = asyncio.create_task(agent.run())
    held: Conn | None = None
    try:
        await until(lambda: agent.connected.is_set() and agent.proxy is not None
                    and "hello/h1" in agent.table.instances, timeout=20)
        # the coordinator has the gateway's sealing key, as Register sent it
        got = await admin.GetGateway(pb.GetRequest(name="gw-certs"))
        assert got.sealing_public_key and agent.sealing_public_key
        assert stat.S_IMODE(os.stat(cfg.sealing_key_file).st_mode) == 0o600

        first = ca.leaf([f"*.{ZONE}", ZONE], 0xA1)
        await agent.apply(pb.SessionDown(certificates=[bundle(ZONE, first, agent.sealing_public_key)],
                                         certificates_set=True))
        assert await asyncio.to_thread(_handshake, https_port, ctx) == (0xA1, 200, "hello-1")
        assert stat.S_IMODE(os.stat(cfg.certs_dir / f"{ZONE}.key").st_mode) == 0o600
        assert _not_after() == first.not_after

        # a connection opened now outlives the swap
        held = await asyncio.to_thread(_open, https_port, ctx)
        assert await asyncio.to_thread(_fetch, held) == (200, "hello-1")
        renewed = ca.leaf([f"*.{ZONE}", ZONE], 0xA2, days=60)
        await agent.apply(pb.SessionDown(certificates=[bundle(ZONE, renewed, agent.sealing_public_key)],
                                         certificates_set=True))
        assert await asyncio.to_thread(_handshake, https_port, ctx) == (0xA2, 200, "hello-1")
        assert await asyncio.to_thread(_fetch, held) == (200, "hello-1")  # the old connection still serves
        assert _serial(held) == 0xA1
        assert _not_after() == renewed.not_after

        # sealed to another gateway's key: refused and counted, the certificate in service stays
        before = _failures("unseal")
        stray = ca.leaf([f"*.{ZONE}", ZONE], 0xA3)
        other = public_bytes(X25519PrivateKey.generate())
        await agent.apply(pb.SessionDown(certificates=[bundle(ZONE, stray, other)], certificates_set=True))
        assert _failures("unseal") == before + 1
        assert (await asyncio.to_thread(_handshake, https_port, ctx))[0] == 0xA2

        # a message without certificates_set leaves the set alone
        await agent.apply(pb.SessionDown())
        assert (await asyncio.to_thread(_handshake, https_port, ctx))[0] == 0xA2

        await until(lambda: agent.writer.last_written is not None, timeout=10)
        await asyncio.sleep(1.0)  # the last change's debounced write of the gateway's saved state
        held.close()
        held = None
        await _stop(agent, task)

        # restart with the coordinator gone: the saved certificate is served
        coordinator.kill()
        agent = Agent(cfg)
        task = asyncio.create_task(agent.run())

        async def serves() -> tuple[int, int, str]:
            while True:
                try:
                    return await asyncio.to_thread(_handshake, https_port, ctx)
                except OSError:
                    await asyncio.sleep(0.1)

        assert await asyncio.wait_for(serves(), 15) == (0xA2, 200, "hello-1")
        assert not agent.registered and not agent.connected.is_set()
    finally:
        if held is not None:
            held.close()
        await _stop(agent, task)
        backend.close()


def test_a_sealing_key_file_that_is_not_one_is_named_at_start(pki, tmp_path) -> None:
    nowhere = SimpleNamespace(address="127.0.0.1:9")
    cfg = config_for([nowhere], pki, tmp_path, "gw-badkey", "192.0.2.72")
    cfg.sealing_key_file.parent.mkdir(parents=True)
    cfg.sealing_key_file.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ValidationError) as refused:
        Agent(cfg)
    assert refused.value.field == "state.dir" and "gw-badkey.sealing.key" in refused.value.message
