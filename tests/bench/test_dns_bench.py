"""bench/dns.py still runs, and its pure parts do what its figures rely on.

The smoke test runs `--quick` (20,000 hostile /24s, one short round) against the real servers
(geomesh-dns and gdnsd under dnsperf) and checks what does not depend on speed: the hostile file
holds one query per distinct /24 and no run sent more than the file (no query repeated), every
run and server has its row, both servers' answers were sampled on /24s of their own (scopes,
regions) and agree on the region. The table tests check the answer parser, the 0x20 names and the draws on their own.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import maxminddb
import pytest
from dnslib import EDNS0, QTYPE, RR, A, DNSRecord, EDNSOption

from bench import _dns_servers as servers
from bench import _dns_workload as workload

ROOT = Path(__file__).resolve().parent.parent.parent


def test_dns_bench_quick(tmp_path: Path) -> None:
    for tool in ("dnsperf", "gdnsd", "taskset"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: run scripts/install.sh (./run test does)")
    out = tmp_path / "dns.json"
    proc = subprocess.run([sys.executable, "bench/dns.py", "--quick", "--skip-nocache", "--json", str(out),
                           "--results", str(tmp_path / "raw")], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"dns.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(out.read_text())
    hostile = result["loads"]["hostile"]
    assert hostile["queries"] == hostile["distinct_24s"] == 20000
    assert hostile["distinct_24s_all_files"] == 20000 + hostile["latency_queries_per_round"] + 10000
    rows = {(r["load"], r["server"]): r for r in result["rows"]}
    assert set(rows) == {(load, s) for load in ("hostile", "hot") for s in ("geomesh-dns", "gdnsd")}
    for (load, server), r in rows.items():
        assert r["qps"] > 0 and r["n"] > 0 and not math.isnan(r["p99_ms"]), (load, server, r)
        if load == "hostile":
            assert 0 < r["sent"] <= hostile["queries"], (server, r)  # the file once: nothing repeated
    assert result["sample"] == hostile["sample"] == 10000
    for server in ("geomesh-dns", "gdnsd"):
        scopes = result["scopes"][server]
        assert scopes["answers"] == 10000 - result["unanswered"][server] > 9500, (server, scopes)
        assert 0 <= scopes["mean"] <= 24, (server, scopes)
        info = result["servers"][server]
        assert info["rss_peak_mb"] >= info["rss_mb"] > 0 and info["first_answer_s"] > 0, (server, info)
    assert result["agreement"] >= 0.99
    assert isinstance(result["dnsperf_ids"]["randomised"], bool)
    rebuild = result["rebuild"]  # a region moved under load: the new map served, every query answered
    assert 0 < rebuild["build_s"] <= rebuild["rebuild_s"] < 60, rebuild
    assert rebuild["unanswered"] == 0 and rebuild["queries"] > 1000 and rebuild["largest_gap_ms"] > 0, rebuild
    # the aim in CPU per query, from the same run: gdnsd's hostile CPU / 0.9, less our reply-cache hit's
    med, budget = result["median"], result["budget"]
    assert budget["allowed_us"] == pytest.approx(med["hostile"]["gdnsd"]["cpu_us_per_query"] / 0.9)
    assert budget["headroom_us"] == pytest.approx(budget["allowed_us"] - med["hot"]["geomesh-dns"]["cpu_us_per_query"])


def test_parse_answer_reads_the_region_and_the_ecs_scope() -> None:
    q = DNSRecord.question("App1.Geo.Example.COM")
    reply = q.reply()
    reply.add_answer(RR("App1.Geo.Example.COM", QTYPE.A, rdata=A("192.0.2.17"), ttl=30))
    reply.add_answer(RR("App1.Geo.Example.COM", QTYPE.A, rdata=A("192.0.2.10"), ttl=30))
    reply.add_ar(EDNS0(udp_len=1232, opts=[EDNSOption(8, struct.pack("!HBB", 1, 24, 13) + bytes([193, 0, 6]))]))
    assert workload.parse_answer(bytes(reply.pack())) == ("ap-southeast", 13)
    nodata = q.reply()
    assert workload.parse_answer(bytes(nodata.pack())) == (None, -1)


def test_mixed_case_keeps_the_name_and_varies_the_case() -> None:
    rng = random.Random(1)
    names = {workload.mixed_case("app7.geo.example.com", rng) for _ in range(50)}
    assert {n.lower() for n in names} == {"app7.geo.example.com"} and len(names) > 40


def test_hostile_queries_are_distinct_with_random_ids(tmp_path: Path) -> None:
    from geodns.nearest import default_database

    with maxminddb.open_database(str(default_database())) as db:
        drawn = workload.draw_uniform(db, 3000, 5, exclude=set())
        assert len({n for n, _ in drawn}) == 3000
        assert not any(workload.special(int.from_bytes(n, "big")) for n, _ in drawn)
    wires = workload.write_query_file(tmp_path / "q.bin", drawn, 10, hostile=True, seed=3)
    assert len({w[2:] for w in wires}) == 3000  # no query repeated, whatever the ID
    assert len({w[:2] for w in wires}) > 2900  # random IDs (a few collide by chance)
    parsed = DNSRecord.parse(wires[0])
    assert str(parsed.q.qname).lower().endswith(f"{workload.ZONE}.")
    data = (tmp_path / "q.bin").read_bytes()
    assert len(data) == sum(2 + len(w) for w in wires)
    assert socket.inet_ntoa(drawn[0][0]).endswith(".0")


def test_the_reply_cache_switch_is_found() -> None:
    text, flags = servers.ours_flags(sys.executable)
    assert flags in (["--no-reply-cache"], ["--cache-size", "0"]) and text == " ".join(flags)


def test_dns_path_bench_runs_every_row(tmp_path: Path) -> None:
    """bench/dns_path.py (the answer path in-process) measures its four rows; its own check that
    the hot row is all reply-cache hits holds."""
    out = tmp_path / "path.json"
    proc = subprocess.run([sys.executable, "bench/dns_path.py", "--queries", "2000", "--repeats", "1", "--json",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"dns_path.py failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    result = json.loads(out.read_text())
    assert set(result) == {"hostile", "hostile, no reply cache", "hot (reply-cache hits)", "hostile, after an update"}
    assert all(row["best"] > 0 and len(row["runs"]) == 1 for row in result.values())
