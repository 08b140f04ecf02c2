"""The status page in a real browser: Debian's chromium, headless, driven by chromedriver (selenium).

Against a real coordinator on a real etcd with simulated gateway sessions (as in
tests/coordinator/test_reach.py) and a real `geomesh-status` process: the page names every region
and gateway, and changes within 2 s when a gateway's session dies. A screenshot is a real render
(PNG header: size and dimensions; colours counted by the browser from the image itself). Pages with
no data and for a 1000-gateway mesh (a synthetic overview through the page server's test hook)
render with no error in the browser console, and the matrix drills down on click. Over HTTPS without
a client certificate the browser reads a 403 page with the reason. (A gateway dying in a network
namespace is the lab's netns test's to add: see docs/status-page.md.)
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from pathlib import Path

from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from geomesh.api import geomesh_pb2 as pb
from geomesh.lab.processes import ServiceProcess
from tests.coordinator.test_reach import mesh

from .conftest import PageServer, console_errors, make_overview


def _renders(driver) -> int:
    return int(driver.execute_script("return Number(document.body.dataset.renders || 0)"))


def _wait(driver, predicate, timeout: float, what: str):
    # the page re-renders by replacing elements: an element found may be gone a moment later
    return WebDriverWait(driver, timeout, poll_frequency=0.05,
                         ignored_exceptions=(StaleElementReferenceException, NoSuchElementException)).until(
        lambda d: predicate(d), message=what)


def _texts(driver, selector: str) -> list[str]:
    """Texts of the elements matching `selector`, read in one step (no stale elements)."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]), e => e.textContent)", selector)


def _open(driver, url: str, min_renders: int = 1) -> None:
    driver.get(url)
    _wait(driver, lambda d: _renders(d) >= min_renders, 10, "the page rendered a state")


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR, checking the signature."""
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


COUNT_COLOURS = """
const [src, done] = arguments;
const img = new Image();
img.onload = () => {
  const c = document.createElement('canvas'); c.width = img.width; c.height = img.height;
  const g = c.getContext('2d'); g.drawImage(img, 0, 0);
  const px = g.getImageData(0, 0, c.width, c.height).data;
  const seen = new Set();
  for (let i = 0; i < px.length; i += 4 * 7) seen.add((px[i] << 16) | (px[i + 1] << 8) | px[i + 2]);
  done(seen.size);
};
img.onerror = () => done(-1);
img.src = src;
"""


async def test_page_names_every_region_and_gateway_and_changes_within_2s_when_a_session_dies(
        coordinator, pki, browser, tmp_path):
    gateways = {"gw-a": "eu", "gw-b": "us", "gw-c": "ap", "gw-d": "eu"}
    async with mesh(coordinator, gateways) as sims:
        page = ServiceProcess("status_page.main", ["--coordinator", coordinator.address, "--pki-dir", str(pki.dir),
                                                   "--listen", "127.0.0.1:0", "--insecure-http"],
                              tmp_path / "status", name="status")
        page.start()
        try:
            url = f"http://127.0.0.1:{page.port}/"
            await asyncio.to_thread(_open, browser, url)

            def all_named(d) -> bool:
                rows = set(_texts(d, "tr[data-gateway] td:first-child"))
                return rows == set(gateways) and set(_texts(d, "#regions tr[data-region] td:first-child")) == {
                    "eu", "us", "ap"}
            await asyncio.to_thread(_wait, browser, all_named, 10, "every region and gateway named")
            labels = set(await asyncio.to_thread(_texts, browser, "#markers text"))
            assert labels == {"eu", "us", "ap"}

            def session_of(name: str):
                return lambda d: d.find_element(By.CSS_SELECTOR, f"tr[data-gateway='{name}']").get_attribute(
                    "data-session")
            await asyncio.to_thread(_wait, browser, lambda d: session_of("gw-b")(d) == "open", 10, "gw-b open")

            shot = tmp_path / "status-page.png"
            await asyncio.to_thread(browser.save_screenshot, str(shot))
            viewport = await asyncio.to_thread(browser.execute_script, "return [Math.round(innerWidth * "
                                               "devicePixelRatio), Math.round(innerHeight * devicePixelRatio)]")
            width, height = png_size(shot)
            assert [width, height] == viewport and width >= 1000 and height >= 600
            assert shot.stat().st_size > 30_000
            colours = await asyncio.to_thread(browser.execute_async_script, COUNT_COLOURS,
                                              "data:image/png;base64," + base64.b64encode(shot.read_bytes()).decode())
            assert colours >= 20, f"screenshot has {colours} colours: not a real render"

            started = time.monotonic()
            sims["gw-b"].reset()  # its control stream dies
            await asyncio.to_thread(_wait, browser, lambda d: session_of("gw-b")(d) == "closed", 2.0,
                                    "the page showed gw-b's session closed within 2 s")
            took = time.monotonic() - started
            assert took < 2.0
            events = await asyncio.to_thread(_texts, browser, "#events li")
            assert any("gw-b" in e for e in events)
            assert await asyncio.to_thread(console_errors, browser) == []
        finally:
            page.stop()


def test_empty_and_thousand_gateway_pages_render_without_console_errors(browser, page_server: PageServer):
    _open(browser, page_server.url)
    assert console_errors(browser) == []
    assert "no gateways yet" in _texts(browser, "#gateways")[0]

    before = _renders(browser)
    page_server.publish(make_overview(10, 100, closed=frozenset({"gw-us-east-3"}),
                                      unreachable=frozenset({"gw-eu-central-7"})))
    _wait(browser, lambda d: _renders(d) > before, 5, "the huge mesh rendered")
    assert len(_texts(browser, "tr[data-gateway]")) == 1000
    assert len(_texts(browser, "#matrix td.cell")) == 100  # 10 x 10 region pairs, not 1000 x 1000 links
    browser.find_element(By.CSS_SELECTOR, "#matrix td.cell[data-a='eu-central'][data-b='us-east']").click()
    assert "eu-central × us-east: 100 × 100 gateways (first 40 of each shown)" in _texts(browser, "#drill h3")[0]
    assert len(_texts(browser, "#drill td")) == 40 * 40
    assert console_errors(browser) == []


def test_https_without_a_client_certificate_shows_a_403_page_with_the_reason(browser, pki, tmp_path):
    page = ServiceProcess("status_page.main", ["--coordinator", "127.0.0.1:1", "--pki-dir", str(pki.dir),
                                               "--listen", "127.0.0.1:0"], tmp_path / "status", name="status")
    page.start()
    try:
        browser.get(f"https://127.0.0.1:{page.port}/")
        assert "403" in browser.title
        assert "no client certificate" in browser.find_element(By.ID, "reason").text
    finally:
        page.stop()


def test_matrix_cells_and_drill_down_are_coloured_by_handshake_age(browser, page_server: PageServer):
    console_errors(browser)  # the browser is shared: what earlier tests logged (a 403 page) is not ours
    overview = make_overview(2, 2)
    reports = {"gw-eu-central-0": {"gw-us-east-0": 20.0, "gw-us-east-1": 0.0},  # 0: never
               "gw-us-east-0": {"gw-us-east-1": 150.0}}
    for g in overview.gateways:
        g.peers.extend(pb.PeerHandshake(name=p, age_seconds=a) for p, a in reports.get(g.name, {}).items())
        g.load, g.active_connections, g.version = 0.5, 3, "9.9.9"
    _open(browser, page_server.url)
    before = _renders(browser)
    page_server.publish(overview)
    _wait(browser, lambda d: _renders(d) > before, 5, "the mesh with handshakes rendered")

    def cell_class(a: str, b: str) -> str:
        return browser.find_element(By.CSS_SELECTOR, f"#matrix td.cell[data-a='{a}'][data-b='{b}']").get_attribute("class")
    assert "bg-bad" in cell_class("eu-central", "us-east")   # one pair never shook hands
    assert "bg-warn" in cell_class("us-east", "us-east")     # 150 s: stale
    assert "bg-ok" in cell_class("eu-central", "eu-central")  # none reported: both ends alive and reachable
    browser.find_element(By.CSS_SELECTOR, "#matrix td.cell[data-a='eu-central'][data-b='us-east']").click()
    classes = browser.execute_script(
        "return Object.fromEntries(Array.from(document.querySelectorAll('#drill td'), "
        "td => [td.title.split(':')[0], td.className]))")
    assert classes["gw-eu-central-0 – gw-us-east-0"] == "bg-ok"
    assert classes["gw-eu-central-0 – gw-us-east-1"] == "bg-bad"
    row = _texts(browser, "tr[data-gateway='gw-eu-central-0']")[0]
    assert "50%" in row and "9.9.9" in row
    assert console_errors(browser) == []


def test_certificates_table_and_a_failing_renewal_in_the_feed(browser, page_server: PageServer):
    console_errors(browser)  # the browser is shared: earlier tests' console lines are not ours
    _open(browser, page_server.url)
    assert "no certificates obtained" in _texts(browser, "#certificates")[0]
    overview = make_overview(1, 1)
    cert = overview.certificates.add(name="geo.example.com", serial="0a", not_after=1_900_000_000,
                                     renew_at=1_897_000_000)
    before = _renders(browser)
    page_server.publish(overview)
    _wait(browser, lambda d: _renders(d) > before, 5, "the certificate rendered")
    row = _texts(browser, "tr[data-certificate='geo.example.com']")[0]
    assert "0a" in row and "2030-03-17" in row and "ok" in row
    cert.failures, cert.last_error = 2, "ACME directory https://ca/dir: connection refused"
    before = _renders(browser)
    page_server.publish(overview)
    _wait(browser, lambda d: _renders(d) > before, 5, "the failing renewal rendered")
    row = browser.find_element(By.CSS_SELECTOR, "tr[data-certificate='geo.example.com']")
    assert row.get_attribute("data-failures") == "2" and "failing (2): ACME directory" in row.text
    assert any("obtaining certificate geo.example.com failed" in e for e in _texts(browser, "#events li"))
    assert console_errors(browser) == []
