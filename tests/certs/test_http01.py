"""ACME HTTP-01 challenges reach every gateway before the CA is told to validate.

A real coordinator (in this process, so the test holds its `GatewayStats`) on real etcd, real
gateway agents whose data planes listen on loopback. `Http01Challenges.publish` returns only once
each gateway with a session on the replica acked the set: right after it returns, every
gateway's plain listener answers the token (no waiting in the test). Publishing the same value
again returns too (an unchanged set is still acked at the new revision); withdrawn, the token
is gone everywhere. A gateway that never acks (an older gateway: a raw session client sending
heartbeats without `http_challenges_revision`) fails the publish, named, within the deadline.
Challenges the CA hands over that are not a token and its key authorization are refused before
anything is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

import pytest

from coordinator.acme_client import AcmeError
from coordinator.http01 import Http01Challenges
from coordinator.server import Coordinator, CoordinatorConfig
from geomesh.api import geomesh_pb2 as pb
from geomesh.api import geomesh_pb2_grpc as pbg
from geomesh.channel import client_channel
from regional_gateway.agent import Agent
from regional_gateway.wireguard import keys
from tests.proxy.client import get

from ..coordinator.test_admin import seed
from ..gateway.test_agent import config_for, enrolled, until

TOKEN = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"
KEY_AUTH = f"{TOKEN}.9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"
ACME = "/.well-known/acme-challenge/"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCoordinator:
    """A coordinator replica in this process, with the fixtures' PKI, on the test's etcd."""

    def __init__(self, etcd, pki) -> None:  # noqa: ANN001
        self.pki = pki
        self.replica = Coordinator(CoordinatorConfig(etcd=etcd.endpoint, listen="127.0.0.1:0", pki_dir=pki.dir,
                                                     lease_ttl=2, allow_loopback_instances=True))
        self.channels: list = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.replica.port}"

    def _channel(self, role: str, name: str):  # noqa: ANN202
        ch = client_channel(self.address, self.pki.identity(role, name))
        self.channels.append(ch)
        return ch

    def admin(self) -> pbg.AdminStub:
        return pbg.AdminStub(self._channel("admin", "root"))

    def gateway_control(self, name: str) -> pbg.GatewayControlStub:
        return pbg.GatewayControlStub(self._channel("gateway", name))

    async def enroll(self, name: str, region: str, *ips: str) -> None:
        await self.admin().EnrollGateway(pb.Enrollment(name=name, region=region, public_ips=list(ips)))

    def challenges(self, deadline: float = 10.0) -> Http01Challenges:
        r = self.replica
        assert r.gateway_control is not None
        return Http01Challenges(r.store, r.state, r.lease, r.gateway_control.stats, grace=0, deadline=deadline)

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()
        await self.replica.stop(0.5)


@pytest.fixture
async def local_coordinator(etcd, pki):  # noqa: ANN001, ANN201
    c = LocalCoordinator(etcd, pki)
    await c.replica.start()
    yield c
    await c.close()


def answer(port: int) -> tuple[int, bytes]:
    r = get(("127.0.0.1", port), "anything.example", ACME + TOKEN, timeout=5)
    return r.status, r.body


async def test_publish_returns_once_every_gateway_answers_the_token(local_coordinator, pki, tmp_path: Path) -> None:
    c = local_coordinator
    await seed(c.admin())
    ports = {"gw-a": free_port(), "gw-b": free_port()}
    agents = [Agent(await enrolled(c, config_for([c], pki, tmp_path, name, f"192.0.2.{91 + i}", dataplane=True,
                                                 proxy_listen="127.0.0.1", proxy_port=port)))
              for i, (name, port) in enumerate(ports.items())]
    tasks = [asyncio.create_task(a.run()) for a in agents]
    stats = c.replica.gateway_control.stats  # type: ignore[union-attr]
    try:
        await until(lambda: all(a.proxy is not None and a.connected.is_set() for a in agents)
                    and set(stats.reports) == set(ports), timeout=20)
        challenges = c.challenges()
        await challenges.publish({TOKEN: KEY_AUTH})
        # acked: every data plane holds it the moment publish returns (checked before any await)
        assert [a.proxy.acme_challenges for a in agents] == [{TOKEN.encode(): KEY_AUTH.encode()}] * 2
        for port in ports.values():
            assert await asyncio.to_thread(answer, port) == (200, KEY_AUTH.encode())
        await challenges.publish({TOKEN: KEY_AUTH})  # the same set again: acked at the new revision
        await challenges.withdraw({TOKEN: KEY_AUTH})
        for port in ports.values():
            await until_served(port, 404)
        assert not c.replica.state.snapshot().http01
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for a in agents:
            if a.proxy is not None:
                await a.proxy.shutdown(0.5)


async def until_served(port: int, status: int, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while (await asyncio.to_thread(answer, port))[0] != status:
        assert loop.time() < end, f"port {port} never answered {status}"
        await asyncio.sleep(0.05)


async def test_a_gateway_that_never_acks_fails_the_publish_naming_it(local_coordinator, pki, tmp_path: Path) -> None:
    c = local_coordinator
    await seed(c.admin())
    await c.enroll("gw-old", "eu-central", "192.0.2.99")
    stub = c.gateway_control("gw-old")
    await stub.Register(pb.RegisterRequest(name="gw-old", region="eu-central", public_ip="192.0.2.99", wg_port=51820,
                                           wg_public_key=keys.load_or_create(tmp_path / "old.key").public_key,
                                           proxy_port=80))
    call = stub.Session()
    await call.write(pb.SessionUp(hello=pb.SessionHello(name="gw-old")))

    async def older_gateway() -> None:  # reads what comes, heartbeats without the ack field
        reader = asyncio.create_task(_drain(call))
        try:
            while True:
                await call.write(pb.SessionUp(heartbeat=pb.Heartbeat(load=0.1)))
                await asyncio.sleep(0.3)
        finally:
            reader.cancel()

    task = asyncio.create_task(older_gateway())
    stats = c.replica.gateway_control.stats  # type: ignore[union-attr]
    try:
        await until(lambda: "gw-old" in stats.reports, timeout=10)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(AcmeError, match=r"not acked within 1\.5 s by gateway\(s\) gw-old"):
            await c.challenges(deadline=1.5).publish({TOKEN: KEY_AUTH})
        assert loop.time() - started < 10  # bounded by the deadline, never a hang
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        call.cancel()


async def _drain(call) -> None:  # noqa: ANN001
    with contextlib.suppress(Exception):
        while await call.read() is not None:
            pass


@pytest.mark.parametrize(("tokens", "field"), [
    ({"": "x.y"}, "token"),
    ({"a/b": "a/b.x"}, "token"),
    ({TOKEN: "other.x"}, "key_authorization"),
    ({TOKEN: f"{TOKEN}.x y"}, "key_authorization"),
])
async def test_challenges_that_are_not_a_token_and_its_key_authorization_are_refused(
        local_coordinator, tokens: dict[str, str], field: str) -> None:
    c = local_coordinator
    with pytest.raises(AcmeError, match=f"http-01 challenge from the CA: {field}: "):
        await c.challenges().publish(tokens)
    assert not c.replica.state.snapshot().http01  # nothing was written
