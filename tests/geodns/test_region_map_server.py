"""geomesh-dns as a process with its region map: built after start and exported in the metrics,
rebuilt when a region moves while answers keep coming (from the old map, then the new one)."""

from __future__ import annotations

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
