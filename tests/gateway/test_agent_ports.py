"""Coordinator mode, the port allow-list end to end (probe finding 15): an app's `ports` set through
the Admin API reach a real agent's data plane through the routing feed; `<app>-<port>` reaches the
instance's port and the declared ones, any other port is refused (404 naming the rule) without a
connection, and an update of the list takes effect."""

from __future__ import annotations

import asyncio

from geomesh.api import geomesh_pb2 as pb
from regional_gateway.agent import Agent
from tests.proxy.backends import Backend
from tests.proxy.client import get
from tests.proxy.test_ports import Listener

from ..coordinator.test_admin import seed
from .test_agent import config_for, enrolled, free_port

ZONE = "apps.test"


async def test_coordinator_mode_exposes_only_the_declared_and_instance_ports(coordinator, pki, tmp_path):
    admin = coordinator.admin()
    await seed(admin)
    shop, extra, secret = Backend("shop-1"), Backend("shop-extra"), Listener()
    app = await admin.CreateApp(pb.App(name="shop", ports=[extra.port]))
    await admin.AddInstance(pb.Instance(app="shop", id="s1", region="us-east", address="127.0.0.1", port=shop.port))
    http_port = free_port()
    cfg = config_for([coordinator], pki, tmp_path, "gw-ports", "192.0.2.41", region="us-east", zone=ZONE,
                     dataplane=True, proxy_listen="127.0.0.1", proxy_port=http_port)
    agent = Agent(await enrolled(coordinator, cfg))
    task = asyncio.create_task(agent.run())
    addr = ("127.0.0.1", http_port)

    async def status(host: str, want: int, timeout: float = 15.0):
        """GET until the answer has status `want` (the routing table arrives asynchronously)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                r = await asyncio.to_thread(get, addr, f"{host}.{ZONE}")
                if r.status == want or asyncio.get_running_loop().time() > deadline:
                    return r
            except OSError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
            await asyncio.sleep(0.1)

    try:
        assert (await status("shop", 200)).header("x-backend") == "shop-1"
        assert (await status(f"shop-{shop.port}", 200)).header("x-backend") == "shop-1"
        assert (await status(f"shop-{extra.port}", 200)).header("x-backend") == "shop-extra"
        for host in (f"shop-{secret.port}", f"s1-{secret.port}", "shop-22"):
            r = await status(host, 404, timeout=0)
            assert r.status == 404 and r.header("x-geomesh-error") == "unknown-host", r
            assert b"does not expose port" in r.body, r.body
        # the list shrinks to the default (the instance's port only): the extra port closes
        await admin.UpdateApp(pb.UpdateAppRequest(app=pb.App(name="shop"), expected_revision=app.mod_revision))
        r = await status(f"shop-{extra.port}", 404)
        assert r.status == 404 and f"does not expose port {extra.port}".encode() in r.body, r.body
        assert (await status(f"shop-{shop.port}", 200)).header("x-backend") == "shop-1"
        assert secret.accepted == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        shop.close()
        extra.close()
        secret.close()
