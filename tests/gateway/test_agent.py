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
from regional_gateway.proxy.routes import CertificateSpec

from ..coordinator.test_admin import seed


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_for(coordinators, pki, tmp_path, name: str, ip: str, **kw) -> AgentConfig:
    ident = pki.identity("gateway", name)
    return AgentConfig(name=name, region=kw.pop("region", "eu-central"), coordinators=tuple(c.address for c in coordinators),
                       public_ip=ip, tls_ca=ident.ca, tls_cert=ident.cert, tls_key=ident.key,
                       wg_key_file=tmp_path / f"{name}.key", wg_backend="none", dataplane=kw.pop("dataplane", False),
                       heartbeat_interval=kw.pop("heartbeat_interval", 0.3), **kw)


async def enrolled(coordinator, cfg: AgentConfig) -> AgentConfig:
    """Enroll the agent's gateway (its region and public addresses), as an admin does before
    the gateway starts: it registers only as enrolled."""
    await coordinator.enroll(cfg.name, cfg.region, *(ip for ip in (cfg.public_ip, cfg.public_ipv6) if ip))
    return cfg


async def until(predicate, timeout: float = 10.0) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.02)
    await asyncio.wait_for(poll(), timeout)


async def test_agents_register_see_each_other_and_follow_changes(coordinator, pki, tmp_path):
    admin = coordinator.admin()
    await seed(admin)
    a = Agent(await enrolled(coordinator, config_for([coordinator], pki, tmp_path, "gw-a", "192.0.2.21")))
    b = Agent(await enrolled(coordinator, config_for([coordinator], pki, tmp_path, "gw-b", "192.0.2.22")))
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
    cfg = await enrolled(coordinator, config_for([coordinator], pki, tmp_path, "gw-a", "192.0.2.21"))
    first = Agent(cfg)
    await first.register()
    second = Agent(cfg)
    await second.register()
    assert (second.public_key, second.mesh_ip) == (first.public_key, first.mesh_ip)


async def test_agent_moves_to_second_replica_and_resumes(coordinator_factory, pki, tmp_path):
    c1, c2 = coordinator_factory(), coordinator_factory()
    admin = c1.admin()
    await seed(admin)
    a = Agent(await enrolled(c1, config_for([c1, c2], pki, tmp_path, "gw-a", "192.0.2.21")))
    b = Agent(await enrolled(c1, config_for([c2, c1], pki, tmp_path, "gw-b", "192.0.2.22")))
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
    cfg = await enrolled(c, config_for([c], pki, tmp_path, "gw-u", "192.0.2.30"))
    cfg = AgentConfig(**{f: getattr(cfg, f) for f in cfg.__dataclass_fields__} | {"coordinators": (f"unix:{sock}",)})
    agent = Agent(cfg)
    task = asyncio.create_task(agent.run())
    try:
        await until(lambda: agent.connected.is_set() and agent.table.revision > 0)
        assert "eu-central" in agent.table.regions and agent.mesh_ip
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_agent_terminates_tls_with_its_certificates(coordinator, pki, tmp_path):
    """Coordinator mode with `https_port` and `[[certificates]]`: the agent's data plane serves
    the apps of the routing table over TLS, picking the certificate by SNI."""
    from tests.proxy.backends import Backend
    from tests.proxy.certs import TestCA, san_of
    from tests.proxy.client import Conn

    admin = coordinator.admin()
    await seed(admin)
    await admin.CreateApp(pb.App(name="shop", lb_policy=pb.LB_POLICY_ROUND_ROBIN))
    backend = Backend("shop-1")
    ca = TestCA(tmp_path)
    cert, key = ca.issue("zone", ["*.apps.test"])
    http_port, https_port = free_port(), free_port()
    cfg = config_for([coordinator], pki, tmp_path, "gw-tls", "192.0.2.31", region="us-east", zone="apps.test",
                     dataplane=True, proxy_listen="127.0.0.1", proxy_port=http_port, https_port=https_port,
                     certificates=(CertificateSpec(cert=cert, key=key),))
    await enrolled(coordinator, cfg)
    await admin.AddInstance(pb.Instance(app="shop", id="s1", region="us-east", address="127.0.0.1", port=backend.port))
    agent = Agent(cfg)
    task = asyncio.create_task(agent.run())

    def https_get():
        with Conn(("127.0.0.1", https_port), tls=ca.client_context(), server_name="shop.apps.test") as c:
            return san_of(c.sock.getpeercert(binary_form=True)), c.request("shop.apps.test")

    try:
        deadline = asyncio.get_running_loop().time() + 15
        while True:
            try:
                sans, r = await asyncio.to_thread(https_get)
                if r.status == 200 or asyncio.get_running_loop().time() > deadline:
                    break
            except OSError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
            await asyncio.sleep(0.1)
        assert sans == ["*.apps.test"]
        assert r.status == 200 and r.header("x-backend") == "shop-1"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        backend.close()


def test_agent_config_tls_listener_fields(tmp_path):
    from tests.proxy.certs import TestCA

    ca = TestCA(tmp_path)
    cert, _ = ca.issue("zone", ["*.apps.test"])
    base = ('name = "gw-a"\nregion = "eu"\ncoordinators = ["127.0.0.1:7443"]\npublic_ip = "192.0.2.1"\n'
            'insecure = true\nproxy_port = 8080\n')
    path = tmp_path / "gw.toml"
    path.write_text(base + 'https_port = 8443\ng_mode = "tunnel"\n[[certificates]]\ncert = "zone.pem"\nkey = "zone.key"\n')
    cfg = load(path)
    assert cfg.https_port == 8443 and cfg.g_mode == "tunnel"
    assert cfg.certificates == (CertificateSpec(cert=tmp_path / "zone.pem", key=tmp_path / "zone.key"),)
    for extra, field in (('https_port = 8080\n', "https_port"), ('g_mode = "fast"\n', "g_mode"),
                         ('[[certificates]]\ncert = "nope.pem"\nkey = "zone.key"\n', "certificates[0]"),
                         ('[[certificates]]\ncert = "zone.pem"\n', "certificates[0]")):
        path.write_text(base + extra)
        with pytest.raises(ValidationError) as err:
            load(path)
        assert err.value.field == field, (extra, err.value)
    assert cert.exists()
