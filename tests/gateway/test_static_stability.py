"""Gateway static stability (issue 14): the saved state, and coming up without a coordinator.

- `saved_state` round trip, and its refusals (another WireGuard key, a payload that is not ours).
- A gateway restarted while the coordinator is down serves HTTP from its saved state (proxy up
  before registering), then registers and resumes in the background when the coordinator is back.
- With neither saved state nor a coordinator it says so plainly and keeps retrying; a corrupt
  saved file is refused with a log line and the agent starts as if it had none.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from geomesh import state_file
from geomesh.api import geomesh_pb2 as pb
from geomesh.model import Region
from geomesh.routing_table import RoutingTable
from regional_gateway import saved_state
from regional_gateway.agent import Agent
from regional_gateway.mesh_view import MeshPeerInfo

from ..coordinator.test_admin import seed
from .test_agent import config_for, enrolled, free_port, until

PEER = MeshPeerInfo("gw-b", "us-east", "a" * 43 + "=", "192.0.2.22:51820", ("10.99.0.2/32",), "10.99.0.2", 8080,
                    8443, True)
SAVED = saved_state.GatewaySaved(
    "10.99.0.1", "10.99.0.0/16", "k" * 43 + "=", 42,
    RoutingTable.from_resources(42, [Region(name="eu-central", latitude=50.0, longitude=8.0)]),
    {"gw-b": PEER}, (("/etc/geomesh/zone.pem", "ab" * 32),))


def test_saved_state_round_trip() -> None:
    back = saved_state.decode(saved_state.encode(SAVED), name="gw-a", public_key=SAVED.public_key)
    assert back.mesh == {"gw-b": PEER} and back.table.regions == SAVED.table.regions
    assert (back.mesh_ip, back.mesh_cidr, back.revision, back.certificates) == \
        (SAVED.mesh_ip, SAVED.mesh_cidr, 42, SAVED.certificates)


@pytest.mark.parametrize(("payload", "key", "error"), [
    (saved_state.encode(SAVED), "other" + "k" * 38 + "=", state_file.Foreign),
    (b"not json", SAVED.public_key, state_file.Corrupt),
    (b'{"mesh_ip": "10.99.0.1"}', SAVED.public_key, state_file.Corrupt),
    (saved_state.encode(SAVED).replace(b'"routing": "', b'"routing": "!!'), SAVED.public_key, state_file.Corrupt),
], ids=["another key", "not json", "fields missing", "bad base64"])
def test_saved_state_refused(payload: bytes, key: str, error: type) -> None:
    with pytest.raises(error):
        saved_state.decode(payload, name="gw-a", public_key=key)


def _get(port: int) -> tuple[int, str]:
    from tests.proxy.client import Conn

    with Conn(("127.0.0.1", port), timeout=2.0) as c:
        r = c.request("shop.apps.test")
        return r.status, r.header("x-backend") or ""


async def _stop(agent: Agent, task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    if agent.proxy is not None:
        await agent.proxy.shutdown()


async def test_restart_without_coordinator_serves_saved_state(coordinator, pki, tmp_path, caplog) -> None:
    from tests.proxy.backends import Backend

    caplog.set_level(logging.INFO)
    admin = coordinator.admin()
    await seed(admin)
    await admin.CreateApp(pb.App(name="shop", lb_policy=pb.LB_POLICY_ROUND_ROBIN))
    backend = Backend("shop-1")
    http_port = free_port()
    cfg = await enrolled(coordinator, config_for([coordinator], pki, tmp_path, "gw-ss", "192.0.2.41", zone="apps.test",
                                                 dataplane=True, proxy_listen="127.0.0.1", proxy_port=http_port))
    await admin.AddInstance(pb.Instance(app="shop", id="s1", region="eu-central", address="127.0.0.1",
                                        port=backend.port))
    agent = Agent(cfg)
    task = asyncio.create_task(agent.run())
    try:
        async def serves() -> None:
            while True:
                try:
                    if await asyncio.to_thread(_get, http_port) == (200, "shop-1"):
                        return
                except OSError:
                    pass
                await asyncio.sleep(0.1)

        await asyncio.wait_for(serves(), 15)
        await until(lambda: agent.writer.last_written is not None and "shop/s1" in agent.table.instances)
        await asyncio.sleep(1.0)  # the last change's debounced write
        revision = agent.revision
        await _stop(agent, task)

        coordinator.kill()  # the control plane is gone (etcd's state does not matter to the gateway now)
        agent = Agent(cfg)
        started = time.monotonic()
        task = asyncio.create_task(agent.run())
        await asyncio.wait_for(serves(), 10)  # served from the saved state
        assert time.monotonic() - started < 8
        assert not agent.registered and not agent.connected.is_set()
        assert agent.revision == revision
        assert "no coordinator answered: serving the saved state" in caplog.text
        assert agent.state_age() > 0

        # the coordinator comes back: registration and the session resume in the background
        coordinator.start()
        await until(lambda: agent.registered and agent.connected.is_set(), timeout=20)
        assert agent.state_age() == 0
        assert await asyncio.to_thread(_get, http_port) == (200, "shop-1")
    finally:
        await _stop(agent, task)
        backend.close()


async def test_no_state_and_no_coordinator_says_so(coordinator, pki, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO)
    cfg = config_for([coordinator], pki, tmp_path, "gw-none", "192.0.2.42", coordinator_deadline=0.5)
    coordinator.kill()
    agent = Agent(cfg)
    task = asyncio.create_task(agent.run())
    try:
        await until(lambda: "not serving: no saved state and no coordinator answers" in caplog.text, timeout=10)
        assert not task.done()  # still retrying

        # a corrupt saved file: refused with a clear line, then the same path as no state
        await _stop(agent, task)
        caplog.clear()
        cfg.state_file.parent.mkdir(parents=True, exist_ok=True)
        cfg.state_file.write_bytes(b'{"format": 1, "kind": "gateway"}\ngarbage')
        agent = Agent(cfg)
        task = asyncio.create_task(agent.run())
        await until(lambda: "not serving: no saved state and no coordinator answers" in caplog.text, timeout=10)
        assert "saved state refused, starting without it" in caplog.text
        assert not task.done()
    finally:
        await _stop(agent, task)
