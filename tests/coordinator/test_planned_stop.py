"""A planned stop of a coordinator replica empties nothing (issue 14).

Two replicas; a gateway agent's session is on the first. The first is stopped with SIGTERM (a
planned stop): its sessions end without deleting `alive/<g>` and its lease is left to expire, so
the gateway reconnects to the second replica and rewrites its key before the TTL ends. A
watcher of the second replica's RoutingFeed must never see the gateway not alive. Then the same
for a single replica restarted in place (stop, start on the same port): after the restart its
snapshot has the gateway alive again, and no delta in between said otherwise.
"""

from __future__ import annotations

import asyncio
import time

from geomesh.api import geomesh_pb2 as pb
from regional_gateway.agent import Agent
from regional_gateway.agent_config import AgentConfig

from .test_admin import seed


class AliveWatcher:
    """Follows one replica's RoutingFeed; records each (time, alive) of one gateway."""

    def __init__(self, coordinator, gateway: str, name: str) -> None:
        self.gateway = gateway
        self.seen: list[tuple[float, bool]] = []
        self.call = coordinator.routing_feed(name=name).Watch(pb.WatchRoutingRequest())
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for update in self.call:
            for r in update.upserts:
                if r.WhichOneof("kind") == "gateway" and r.gateway.name == self.gateway:
                    self.seen.append((time.monotonic(), r.gateway.alive))

    def close(self) -> None:
        self.call.cancel()
        self.task.cancel()


def _config(coordinators, pki, tmp_path) -> AgentConfig:
    ident = pki.identity("gateway", "gw-a")
    return AgentConfig(name="gw-a", region="eu-central", coordinators=tuple(c.address for c in coordinators),
                       public_ip="192.0.2.21", tls_ca=ident.ca, tls_cert=ident.cert, tls_key=ident.key,
                       wg_key_file=tmp_path / "gw-a.key", wg_backend="none", dataplane=False,
                       heartbeat_interval=0.3)


async def _until(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_planned_stop_hands_over_without_clearing_alive(coordinator_factory, pki, tmp_path) -> None:
    c1, c2 = coordinator_factory(), coordinator_factory()
    await seed(c1.admin())
    await c1.enroll("gw-a", "eu-central", "192.0.2.21")
    agent = Agent(_config([c1, c2], pki, tmp_path))
    task = asyncio.create_task(agent.run())
    watcher = AliveWatcher(c2, "gw-a", "w1")
    try:
        await _until(lambda: agent.connected.is_set() and agent.targets.current == c1.address)
        await _until(lambda: watcher.seen and watcher.seen[-1][1])
        stopped = time.monotonic()
        c1.stop()  # SIGTERM: a planned stop
        await _until(lambda: agent.connected.is_set() and agent.targets.current == c2.address)
        await asyncio.sleep(3.0)  # past the lease TTL (2 s in tests): the old lease expired by now
        flips = [(round(t - stopped, 2), alive) for t, alive in watcher.seen if t >= stopped and not alive]
        assert not flips, f"the second replica saw gw-a not alive after the planned stop: {flips}"
        assert "alive left to the lease" in c1.log()
    finally:
        watcher.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_single_replica_restart_keeps_alive(coordinator, pki, tmp_path) -> None:
    await seed(coordinator.admin())
    await coordinator.enroll("gw-a", "eu-central", "192.0.2.21")
    agent = Agent(_config([coordinator], pki, tmp_path))
    task = asyncio.create_task(agent.run())
    try:
        await _until(agent.connected.is_set)
        watcher = AliveWatcher(coordinator, "gw-a", "w2")
        await _until(lambda: watcher.seen and watcher.seen[-1][1])
        coordinator.stop()
        watcher.close()
        coordinator.start()
        watcher = AliveWatcher(coordinator, "gw-a", "w3")
        # the restarted replica's snapshot: still alive (the key outlived the stop), and it stays so
        await _until(lambda: bool(watcher.seen))
        assert watcher.seen[0][1], "the restarted replica's snapshot has gw-a not alive"
        await _until(agent.connected.is_set)
        await asyncio.sleep(2.5)
        assert all(alive for _, alive in watcher.seen), watcher.seen
        watcher.close()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
