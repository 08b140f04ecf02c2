"""geomesh-dns as a process with its region map: built after start and exported in the metrics,
rebuilt when a region moves while answers keep coming (from the old map, then the new one)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import maxminddb
from dnslib import DNSRecord

from .clients import query, udp_exchange
from .conftest import REGIONS, ZONE, gateway_ip, state_toml
from .test_server import metric, scrape


def _answer(port: int, subnet: str, qid: int) -> set[str]:
    wire = udp_exchange(port, query(f"shop.{ZONE}", ecs=subnet, qid=qid))
    assert wire is not None, "no answer"
    return {str(rr.rdata) for rr in DNSRecord.parse(wire).rr}


def test_the_map_is_built_exported_and_rebuilt_without_a_gap(static_dns, clients, mmdb: Path) -> None:
    static_dns.wait_map()
    text = scrape(static_dns)
    with maxminddb.open_database(str(mmdb)) as db:
        epoch = db.metadata().build_epoch
    assert metric(text, "geodns_region_map_ready") == 1
    assert metric(text, "geodns_region_map_builds_total", stage="database") == 1
    assert metric(text, "geodns_region_map_blocks") > 100_000
    assert 0 < metric(text, "geodns_region_map_build_seconds", stage="regions") < 60
    assert 0 < metric(text, "geodns_region_map_rss_bytes") < 400e6
    assert metric(text, "geodns_geoip_build_timestamp_seconds") == epoch
    assert metric(text, "geodns_geoip_age_seconds") > 86400 * 365  # the packaged database is from 2018

    sydney = clients["au-east"][0].subnet
    assert _answer(static_dns.port, sydney, 1) == gateway_ip("au-east")
    # au-east moves to Paris: Sydney's nearest becomes ap-southeast once the new map is in
    moved = dict(REGIONS)
    moved["au-east"] = (48.86, 2.35, REGIONS["au-east"][2])
    static_dns.state.write_text(state_toml(moved))
    static_dns.signal(signal.SIGHUP)
    seen = []
    deadline = time.monotonic() + 120
    qid = 2
    while static_dns.log().count('"region map built"') < 2:
        assert time.monotonic() < deadline, "no second map"
        got = _answer(static_dns.port, sydney, qid)
        assert got in (gateway_ip("au-east"), gateway_ip("ap-southeast")), got  # the old map or the new one
        seen.append(got)
        qid += 1
    assert _answer(static_dns.port, sydney, qid) == gateway_ip("ap-southeast")
    assert metric(scrape(static_dns), "geodns_region_map_builds_total", stage="regions") == 2
    static_dns.state.write_text(state_toml())


def _builders(pid: int) -> list[int]:
    """The server's map builder processes (spawned children running multiprocessing's spawn_main)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in cmdline:
                found.append(int(child))
    return found


def test_a_builder_that_died_is_started_again_and_the_map_in_service_stays(static_dns, clients) -> None:
    """The map builder killed: the next build fails and says so, answers keep coming from the map
    in service, and a few seconds later a new builder walks the database and the new map serves."""
    static_dns.state.write_text(state_toml())  # a known map to start from (an earlier test moved a region)
    builds = static_dns.log().count('"region map built"')
    static_dns.signal(signal.SIGHUP)
    static_dns.wait_map(builds + 1)
    builders = _builders(static_dns.proc.pid)
    assert len(builders) == 1, builders
    os.kill(builders[0], signal.SIGKILL)
    sydney = clients["au-east"][0].subnet
    moved = dict(REGIONS)
    moved["au-east"] = (48.86, 2.35, REGIONS["au-east"][2])
    failures = static_dns.log().count('"region map build failed, keeping what serves"')
    static_dns.state.write_text(state_toml(moved))
    static_dns.signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while static_dns.log().count('"region map build failed, keeping what serves"') == failures:
        assert time.monotonic() < deadline, "the build with a dead builder did not fail"
        time.sleep(0.1)
    assert _answer(static_dns.port, sydney, 1) == gateway_ip("au-east")  # the map in service
    static_dns.wait_map(builds + 2)  # a new builder, the database walked again, the moved map
    assert _answer(static_dns.port, sydney, 2) == gateway_ip("ap-southeast")
    assert _builders(static_dns.proc.pid) not in ([], builders)
    assert metric(scrape(static_dns), "geodns_region_map_failures_total") >= 1
    static_dns.state.write_text(state_toml())
    static_dns.signal(signal.SIGHUP)
    static_dns.wait_map(builds + 3)
