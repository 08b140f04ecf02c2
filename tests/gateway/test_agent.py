"""The gateway agent against a real coordinator and etcd (WireGuard off: backend none).

The WireGuard side runs in tests/mesh with real wireguard-go in network namespaces.
"""

from __future__ import annotations

import asyncio
import os
import stat

import pytest

from geomesh.api import geomesh_pb2 as pb
from geomesh.errors import ValidationError
from regional_gateway.agent import Agent
from regional_gateway.agent_config import AgentConfig, load
from regional_gateway.mesh_view import apply_mesh_update, desired_peers

from ..coordinator.test_admin import seed


def config_for(coordinators, pki, tmp_path, name: str, ip: str, **kw) -> AgentConfig:
    ident = pki.identity("gateway", name)
    return AgentConfig(name=name, region=kw.pop("region", "eu-central"), coordinators=tuple(c.address for c in coordinators),
                       public_ip=ip, tls_ca=ident.ca, tls_cert=ident.cert, tls_key=ident.key,
                       wg_key_file=tmp_path / f"{name}.key", wg_backend="none", dataplane=False,
                       heartbeat_interval=0.3, **kw)


async def until(predicate, timeout: float = 10.0) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.02)
    await asyncio.wait_for(poll(), timeout)


async def test_agents_register_see_each_other_and_follow_changes(coordinator, pki, tmp_path):
    admin = coordinator.admin()
    await seed(admin)
    a = Agent(config_for([coordinator], pki, tmp_path, "gw-a", "192.0.2.21"))
    b = Agent(config_for([coordinator], pki, tmp_path, "gw-b", "192.0.2.22"))
    tasks = [asyncio.create_task(x.run()) for x in (a, b)]
    try:
        await until(lambda: "gw-b" in a.mesh and "gw-a" in b.mesh)
        assert a.mesh_ip != b.mesh_ip
        assert a.mesh["gw-b"].public_key == b.public_key and a.mesh["gw-b"].endpoint == "192.0.2.22:51820"
        # the private key file is private
        assert stat.S_IMODE(os.stat(tmp_path / "gw-a.key").st_mode) == 0o600
        # routing follows: an instance added by the admin reaches the agent's table
        await admin.AddInstance(pb.Instance(app="web", id="i1", region="eu-central", address="10.90.2.7", port=80))
        await until(lambda: "web/i1" in a.table.instances)
        # a drained gateway stays in the mesh but leaves the routable set
        await admin.DrainGateway(pb.GetRequest(name="gw-b"))
        await until(lambda: a.table.gateways.get("gw-b") is not None and not a.table.gateways["gw-b"].routable)
        assert "gw-b" in a.mesh
        # a removed gateway leaves everyone's mesh
        b_task = tasks.pop()
        b_task.cancel()
        await asyncio.gather(b_task, return_exceptions=True)
        await admin.RemoveGateway(pb.DeleteRequest(name="gw-b"))
        await until(lambda: "gw-b" not in a.mesh)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_restart_keeps_key_and_mesh_ip(coordinator, pki, tmp_path):
    await seed(coordinator.admin())
    cfg = config_for([coordinator], pki, tmp_path, "gw-a", "192.0.2.21")
    first = Agent(cfg)
    await first.register()
    second = Agent(cfg)
    await second.register()
    assert (second.public_key, second.mesh_ip) == (first.public_key, first.mesh_ip)


async def test_agent_moves_to_second_replica_and_resumes(coordinator_factory, pki, tmp_path):
    c1, c2 = coordinator_factory(), coordinator_factory()
    admin = c1.admin()
    await seed(admin)
    a = Agent(config_for([c1, c2], pki, tmp_path, "gw-a", "192.0.2.21"))
    b = Agent(config_for([c2, c1], pki, tmp_path, "gw-b", "192.0.2.22"))
    tasks = [asyncio.create_task(x.run()) for x in (a, b)]
    try:
        await until(lambda: "gw-b" in a.mesh and "gw-a" in b.mesh)
        c1.kill()  # the replica gw-a is on
        await until(lambda: a.connected.is_set() and a.targets.current == c2.address, timeout=15)
        # still alive as seen by the surviving replica, and changes still arrive
        admin2 = c2.admin()
        await until_async(lambda: _alive(admin2, "gw-a"), timeout=15)
        await admin2.AddInstance(pb.Instance(app="web", id="i2", region="eu-central", address="10.90.2.8", port=80))
        await until(lambda: "web/i2" in a.table.instances)
        assert "gw-b" in a.mesh
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _alive(admin, name: str) -> bool:
    return (await admin.GetGateway(pb.GetRequest(name=name))).alive


async def until_async(predicate, timeout: float = 10.0) -> None:
    async def poll() -> None:
        while not await predicate():
            await asyncio.sleep(0.05)
    await asyncio.wait_for(poll(), timeout)


def test_mesh_view_is_a_pure_fold():
    p = lambda n, k: pb.MeshPeer(name=n, public_key=k, endpoint=f"192.0.2.{len(n)}:51820",  # noqa: E731
                                 allowed_ips=[f"10.88.0.{len(n)}/32"], mesh_ip=f"10.88.0.{len(n)}")
    k1, k2, k3 = ("A" * 43 + "=", "B" * 43 + "=", "C" * 43 + "=")
    view = apply_mesh_update({}, pb.MeshUpdate(snapshot=True, upserts=[p("a", k1), p("bb", k2), p("me", k3)]), "me")
    assert sorted(view) == ["a", "bb"]  # never ourselves
    view = apply_mesh_update(view, pb.MeshUpdate(upserts=[p("ccc", k3)], removals=["a"]), "me")
    assert sorted(view) == ["bb", "ccc"]
    peers = desired_peers(view, keepalive=10)
    assert set(peers) == {k2, k3} and peers[k2].allowed_ips == ("10.88.0.2/32",)
    # a snapshot replaces everything
    assert sorted(apply_mesh_update(view, pb.MeshUpdate(snapshot=True, upserts=[p("a", k1)]), "me")) == ["a"]


BASE = {"name": '"gw-1"', "region": '"eu"', "coordinators": '["127.0.0.1:7443"]', "public_ip": '"192.0.2.1"'}
TLS = '[tls]\nca = "ca.pem"\ncert = "c.pem"\nkey = "c.key"\n'


def write_config(path, **changes) -> None:
    fields = BASE | changes
    path.write_text("".join(f"{k} = {v}\n" for k, v in fields.items() if v is not None) + TLS)


def test_config_file_paths_and_errors_name_the_field(tmp_path):
    f = tmp_path / "gw.toml"
    write_config(f)
    cfg = load(f)
    assert cfg.tls_ca == tmp_path / "ca.pem" and cfg.wg_interface == "gm0"
    for changes, field in [({"public_ip": '"nope"'}, "public_ip"), ({"coordinators": "[]"}, "coordinators"),
                           ({"coordinators": '["nohostport"]'}, "coordinators[0]"), ({"colour": '"red"'}, "colour"),
                           ({"name": '"GW 1"'}, "name"), ({"zone": '"x"'}, "zone")]:
        write_config(f, **changes)
        with pytest.raises(ValidationError) as info:
            load(f)
        assert info.value.field == field, str(info.value)


async def test_agent_reaches_coordinator_over_unix_socket_with_mtls(coordinator_factory, pki, tmp_path):
    sock = tmp_path / "coordinator.sock"
    c = coordinator_factory("--listen-unix", str(sock))
    await seed(c.admin())
    cfg = config_for([c], pki, tmp_path, "gw-u", "192.0.2.30")
    cfg = AgentConfig(**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__} | {"coordinators": (f"unix:{sock}",)})
    agent = Agent(cfg)
    task = asyncio.create_task(agent.run())
    try:
        await until(lambda: agent.connected.is_set() and agent.table.revision > 0)
        assert "eu-central" in agent.table.regions and agent.mesh_ip
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
