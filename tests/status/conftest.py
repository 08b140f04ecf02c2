"""Fixtures of the status page tests: synthetic overviews, an in-process page server, a real browser.

`make_overview(...)` builds a coordinator `Overview` without a coordinator (the test hook: the page
server takes it through `publish`, as the follower gives it real ones). `PageServer` runs a
`StatusServer` on its own event loop in a thread, so synchronous selenium calls can drive a
browser against it. `browser` is Debian's chromium through Debian's chromedriver, headless, with a
fresh profile, no network beyond loopback, and its console log readable.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from geomesh.api import geomesh_pb2 as pb
from status_page.board import Board
from status_page.server import ServeConfig, StatusServer

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
REGION_COORDS = [("eu-central", 50.1, 8.7), ("us-east", 39.0, -77.5), ("ap-northeast", 35.7, 139.7),
                 ("sa-east", -23.5, -46.6), ("af-south", -33.9, 18.4), ("ap-south", 19.1, 72.9),
                 ("us-west", 45.6, -121.2), ("eu-north", 59.3, 18.1), ("au-east", -33.9, 151.2),
                 ("ca-central", 45.5, -73.6)]


def make_overview(regions: int, per_region: int, *, closed: frozenset[str] = frozenset(),
                  unreachable: frozenset[str] = frozenset(), apps: int = 3, revision: int = 7) -> pb.Overview:
    """A synthetic overview: `regions` regions with `per_region` gateways each (named gw-<r>-<i>)."""
    out = pb.Overview(revision=revision, apps=apps)
    names = [r[0] for r in REGION_COORDS[:regions]]
    for name, lat, lon in REGION_COORDS[:regions]:
        out.regions.append(pb.RegionOverview(
            region=pb.Region(name=name, latitude=lat, longitude=lon, display_name=name.replace("-", " ")),
            gateways=per_region, gateways_alive=per_region, instances=2, instances_healthy=2,
            apps=[f"app{i}" for i in range(apps) if (i + len(name)) % 2 == 0 or i == 0]))
        for i in range(per_region):
            gw = f"gw-{name}-{i}"
            others = [n for n in names if n != name]
            down = others[:2] if gw in unreachable else []
            out.gateways.append(pb.GatewayHealth(
                name=gw, region=name,
                session=pb.SESSION_STATE_CLOSED if gw in closed else pb.SESSION_STATE_OPEN,
                reachable=gw not in unreachable, seen_by=[n for n in others if n not in down], down_by=down,
                probe_rtt_ms=12.5, in_dns=gw not in closed and gw not in unreachable))
    n = regions * per_region
    out.links_total = n * (n - 1) // 2
    alive = n - len(closed)
    out.links_up = alive * (alive - 1) // 2
    return out


class PageServer:
    """A StatusServer on its own loop in a thread; `publish(overview)` is the test hook."""

    def __init__(self, config: ServeConfig | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.board = Board(source="test hook")
        self.server = StatusServer(config or ServeConfig(port=0), None, self.board.document)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        self.url = f"http://127.0.0.1:{self.port}/"

    def publish(self, overview: pb.Overview) -> None:
        def apply() -> None:
            self.server.publish(self.board.apply(overview))
        self.loop.call_soon_threadsafe(apply)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def page_server() -> Iterator[PageServer]:
    server = PageServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("chromium and chromium-driver are not installed: run scripts/install.sh")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tmp_path_factory.mktemp("chromium-profile")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1000", "--ignore-certificate-errors",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver") or CHROMEDRIVER),
                              options=options)
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


def console_errors(driver) -> list[dict]:
    """Browser console entries at SEVERE level since the last read (reading clears the log)."""
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
