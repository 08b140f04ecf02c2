"""The status page in a real browser while a real gateway dies: gateway agents (wireguard-go) in
network namespaces, a coordinator and etcd on the host, the status page following the
coordinator, Debian's chromium showing it. SIGKILL one gateway process: the page shows its
session closed within 2 s, and the event feed names it."""

from __future__ import annotations

import asyncio
import time

import pytest
from selenium.webdriver.common.by import By

from geomesh.api import geomesh_pb2 as pb
from geomesh.lab.processes import ServiceProcess

from ..coordinator.test_admin import seed
from ..mesh_e2e.test_mesh_agents import Gateways, wait_until
from .conftest import console_errors
from .test_browser import _open, _texts, _wait

pytestmark = pytest.mark.netns


async def test_the_page_shows_a_killed_gateway_within_2s(topology, coordinator_factory, pki, browser, tmp_path):
    c = coordinator_factory("--listen-unix", str(tmp_path / "c.sock"))
    c.sock = tmp_path / "c.sock"
    admin = c.admin()
    await seed(admin)
    gws = Gateways(topology, [c], pki, tmp_path, regions={"gw-eu": "eu-central", "gw-us": "us-east"})
    for name in ("gw-eu", "gw-us"):
        await gws.start(name)

    async def both_alive() -> bool:
        alive = {g.name for g in (await admin.ListGateways(pb.ListGatewaysRequest())).gateways if g.alive}
        return alive == {"gw-eu", "gw-us"}
    await wait_until(both_alive, 60, "both gateways alive")
    page = ServiceProcess("status_page.main", ["--coordinator", c.address, "--pki-dir", str(pki.dir),
                                               "--listen", "127.0.0.1:0", "--insecure-http"],
                          tmp_path / "status", name="status")
    page.start()
    try:
        console_errors(browser)  # the browser is shared: earlier tests' console lines are not ours
        await asyncio.to_thread(_open, browser, f"http://127.0.0.1:{page.port}/")

        def session_of(name: str):
            return lambda d: d.find_element(By.CSS_SELECTOR, f"tr[data-gateway='{name}']").get_attribute("data-session")
        for name in ("gw-eu", "gw-us"):
            await asyncio.to_thread(_wait, browser, lambda d, n=name: session_of(n)(d) == "open", 20, f"{name} open")

        started = time.monotonic()
        gws.kill("gw-us")  # SIGKILL: the process and its session to the coordinator die at once
        await asyncio.to_thread(_wait, browser, lambda d: session_of("gw-us")(d) == "closed", 2.0,
                                "the page showed gw-us's session closed within 2 s of the kill")
        took = time.monotonic() - started
        print(f"the page showed the killed gateway {took * 1000:.0f} ms after SIGKILL")
        assert took < 2.0
        assert session_of("gw-eu")(browser) == "open"
        events = await asyncio.to_thread(_texts, browser, "#events li")
        assert any("gw-us" in e and "closed" in e for e in events), events
        assert await asyncio.to_thread(console_errors, browser) == []
    finally:
        page.stop()
        for name in list(gws.procs):
            gws.kill(name)
