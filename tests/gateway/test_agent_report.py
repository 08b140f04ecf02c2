"""What the agent reports about itself: its version (SessionHello), its load and its mesh peers'
handshake ages (Heartbeat), as GetOverview shows them; a real agent with WireGuard off (backend
none) reports no handshakes. The pure rules (ages by peer name, at most every few seconds) as tables."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from geomesh.api import geomesh_pb2 as pb
from regional_gateway.agent import PEER_REPORT_INTERVAL, VERSION, Agent, handshake_ages
from regional_gateway.mesh_view import MeshPeerInfo

from ..coordinator.test_admin import seed
from .test_agent import config_for, enrolled


def _peer(name: str, key: str) -> MeshPeerInfo:
    return MeshPeerInfo(name=name, region="eu", public_key=key, endpoint="192.0.2.1:51820",
                        allowed_ips=("10.0.0.1/32",), mesh_ip="10.0.0.1", proxy_port=8080)


def test_handshake_ages_by_peer_name():
    mesh = {"gw-b": _peer("gw-b", "kb"), "gw-c": _peer("gw-c", "kc")}
    actual = {"kb": SimpleNamespace(last_handshake=990.0), "kc": SimpleNamespace(last_handshake=None),
              "stranger": SimpleNamespace(last_handshake=999.0)}  # not a mesh peer: left out
    assert handshake_ages(actual, mesh, 1000.0) == {"gw-b": 10.0, "gw-c": 0.0}
    # a handshake this very moment is not "never"
    assert handshake_ages({"kb": SimpleNamespace(last_handshake=1000.0)}, mesh, 1000.0) == {"gw-b": 0.1}


def test_handshakes_leave_with_a_new_observation_at_most_every_interval(tmp_path, pki):
    agent = Agent(config_for([SimpleNamespace(address="127.0.0.1:1")], pki, tmp_path, "gw-a", "192.0.2.21"))
    hb = pb.Heartbeat()
    agent._add_handshakes(hb)
    assert not hb.peers  # nothing observed (backend none)
    agent.handshakes, agent._handshakes_at = {"gw-b": 3.0}, time.monotonic()
    agent._add_handshakes(hb)
    assert [(p.name, p.age_seconds) for p in hb.peers] == [("gw-b", 3.0)]
    again = pb.Heartbeat()
    agent.handshakes, agent._handshakes_at = {"gw-b": 4.0}, time.monotonic()
    agent._add_handshakes(again)
    assert not again.peers  # within PEER_REPORT_INTERVAL
    agent._handshakes_sent -= PEER_REPORT_INTERVAL
    agent._add_handshakes(again)
    assert [p.age_seconds for p in again.peers] == [4.0]


async def test_agent_reports_its_version_and_load_and_no_handshakes_without_wireguard(coordinator, pki, tmp_path):
    admin = coordinator.admin()
    await seed(admin)
    a = Agent(await enrolled(coordinator, config_for([coordinator], pki, tmp_path, "gw-a", "192.0.2.21")))
    task = asyncio.create_task(a.run())
    try:
        async def reported() -> pb.GatewayHealth:
            while True:
                overview = await admin.GetOverview(pb.Empty(), timeout=2)
                h = next((g for g in overview.gateways if g.name == "gw-a"), None)
                if h is not None and h.version:
                    return h
                await asyncio.sleep(0.05)
        h = await asyncio.wait_for(reported(), 10)
        assert h.version == VERSION and VERSION not in ("", "unknown")
        assert 0.0 <= h.load <= 1.0
        assert not h.peers  # backend none: no interface, no handshakes
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
