"""geomesh-dns as a process, asked by real dig and kdig over UDP and TCP."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from dnslib import RCODE, DNSRecord

from geodns.config import parser

from .clients import (
    ROOT,
    DnsProcess,
    dig,
    kdig,
    parse_dig,
    query,
    read_frame,
    tcp_exchange,
    udp_exchange,
)
from .conftest import APPS, REGIONS, ZONE, gateway_ip, state_toml


def metrics_url(proc: DnsProcess) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for line in proc.log().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("msg") == "metrics":
                return f"http://{rec['address']}/metrics"
        time.sleep(0.05)
    raise AssertionError(f"no metrics address logged: {proc.log()[-2000:]}")


def scrape(proc: DnsProcess) -> str:
    with urllib.request.urlopen(metrics_url(proc), timeout=5) as resp:
        return resp.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when there is none)."""
    pattern = re.compile(rf"^{re.escape(name)}(?:{{(.*)}})? (\S+)$")
    total = 0.0
    for line in text.splitlines():
        m = pattern.match(line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


# -- nearest region, from several continents, dig and kdig, UDP and TCP -------------------------


@pytest.mark.parametrize("tool", [dig, kdig], ids=["dig", "kdig"])
@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_clients_from_several_continents_get_their_nearest_region(static_dns, clients, tool, tcp) -> None:
    continents = set()
    for region, picks in clients.items():
        for c in picks:
            res = tool(static_dns.port, f"shop.{ZONE}", "A", tcp=tcp, subnet=c.subnet)
            assert res.status == "NOERROR" and "aa" in res.flags, res.text
            assert res.addresses() == gateway_ip(region), f"{c}: {res.text}"
            assert res.ecs is not None and res.ecs.startswith(c.subnet + "/"), res.text
            assert 0 < int(res.ecs.rsplit("/", 1)[1]) <= 24
            continents.add(c.continent)
    assert len(continents) >= 5, continents


def test_ipv6_subnet(static_dns, ipv6_client) -> None:
    subnet, region = ipv6_client
    res = dig(static_dns.port, f"shop.{ZONE}", "A", subnet=subnet)
    assert res.addresses() == gateway_ip(region), res.text


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_source_address_and_default_region(static_dns, tcp) -> None:
    # 127.0.0.1 cannot be placed: the default region (eu-central) answers, without ECS in the reply
    res = dig(static_dns.port, f"shop.{ZONE}", "A", tcp=tcp)
    assert res.addresses() == {"192.0.2.20"} and res.ecs is None and res.has_opt


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_case_preserved(static_dns, clients, tcp) -> None:
    # (dig sends the name as typed; kdig lowercases it before sending)
    res = dig(static_dns.port, "sHoP-443S.Geo.EXAMPLE.com", "A", tcp=tcp, subnet=clients["us-east"][0].subnet)
    assert res.question.startswith("sHoP-443S.Geo.EXAMPLE.com"), res.text
    assert {a[0] for a in res.answer} == {"sHoP-443S.Geo.EXAMPLE.com."}, res.text
    assert res.addresses() == gateway_ip("us-east")


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_negative_answers_refused_and_zone_apex(static_dns, tcp) -> None:
    res = dig(static_dns.port, f"nosuch.{ZONE}", "A", tcp=tcp)
    assert res.status == "NXDOMAIN" and "aa" in res.flags and not res.answer
    assert [(r[0], r[1], r[2]) for r in res.authority] == [(f"{ZONE}.", 60, "SOA")]
    res = dig(static_dns.port, "www.example.org", "A", tcp=tcp)
    assert res.status == "REFUSED" and "aa" not in res.flags
    res = dig(static_dns.port, ZONE, "NS", tcp=tcp)
    assert sorted(r[3] for r in res.answer) == [f"ns1.{ZONE}.", f"ns2.{ZONE}."]
    res = kdig(static_dns.port, ZONE, "SOA", tcp=tcp)
    assert res.status == "NOERROR" and res.answer[0][2] == "SOA"
    res = dig(static_dns.port, f"gw.us-east.{ZONE}", "A", tcp=tcp)
    assert res.addresses() == {"192.0.2.10", "192.0.2.11"}
    res = dig(static_dns.port, f"shop.{ZONE}", "AAAA", tcp=tcp, subnet="193.0.6.0/24")
    assert res.addresses() == {"2001:db8::20"}


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_edns_rules(static_dns, tcp) -> None:
    assert not dig(static_dns.port, f"shop.{ZONE}", "A", "+noedns", tcp=tcp).has_opt
    assert dig(static_dns.port, f"shop.{ZONE}", "A", tcp=tcp).has_opt
    res = dig(static_dns.port, f"shop.{ZONE}", "A", "+edns=1", "+noednsneg", tcp=tcp)
    assert res.status == "BADVERS" and res.edns_version == 0, res.text


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_any_is_minimal(static_dns, tcp) -> None:
    res = dig(static_dns.port, f"shop.{ZONE}", "ANY", tcp=tcp, subnet="193.0.6.0/24")
    assert {r[2] for r in res.answer} == {"A"} and res.addresses() == {"192.0.2.20"}


def test_truncation_and_tcp_fallback(static_dns) -> None:
    res = dig(static_dns.port, f"big.{ZONE}", "A", "+noedns", "+ignore")
    assert "tc" in res.flags and not res.answer, res.text
    res = dig(static_dns.port, f"big.{ZONE}", "A", "+noedns")  # dig retries over TCP by itself
    assert len(res.answer) == 40 and "tc" not in res.flags, res.text
    res = kdig(static_dns.port, f"big.{ZONE}", "A", tcp=True)
    assert len(res.answer) == 40


def test_tcp_several_queries_per_connection_in_order(static_dns) -> None:
    wires = [query(f"shop.{ZONE}", qid=1, ecs="193.0.6.0/24"), query(f"nosuch.{ZONE}", qid=2),
             query(f"big.{ZONE}", qid=3, edns=False), query("www.example.org", qid=4)]
    replies = [DNSRecord.parse(r) for r in tcp_exchange(static_dns.port, wires)]
    assert [r.header.id for r in replies] == [1, 2, 3, 4]
    assert [RCODE[r.header.rcode] for r in replies] == ["NOERROR", "NXDOMAIN", "NOERROR", "REFUSED"]
    assert len(replies[2].rr) == 40 and not replies[2].header.tc


def test_tcp_idle_connections_are_closed(static_dns) -> None:
    with socket.create_connection(("127.0.0.1", static_dns.port), timeout=10) as s:
        s.sendall(struct.pack("!H", 30) + query(f"shop.{ZONE}")[:28])  # an incomplete message
        start = time.monotonic()
        assert s.recv(10) == b""  # closed by the server (--tcp-idle-timeout 1.5)
        assert time.monotonic() - start < 9


def test_tcp_zero_length_message_closes(static_dns) -> None:
    with socket.create_connection(("127.0.0.1", static_dns.port), timeout=5) as s:
        s.sendall(b"\0\0")
        assert s.recv(10) == b""


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_formerr_and_notimp(static_dns, tcp) -> None:
    bad_ecs = bytes.fromhex("abcd0000000100000000000104736f6d650000010001"
                            "00002904d000000000000b0008000700031800c10006")
    notify = bytearray(query(f"shop.{ZONE}", qid=0x55, edns=False))
    notify[2] |= 4 << 3
    for wire, rcode in ((bad_ecs, "FORMERR"), (bytes(notify), "NOTIMP")):
        raw = tcp_exchange(static_dns.port, [wire])[0] if tcp else udp_exchange(static_dns.port, wire)
        assert raw is not None
        assert RCODE[DNSRecord.parse(raw).header.rcode] == rcode


def test_responses_and_runts_get_no_reply(static_dns) -> None:
    assert udp_exchange(static_dns.port, b"\x12", timeout=0.5) is None
    response = bytearray(query(f"shop.{ZONE}"))
    response[2] |= 0x80
    assert udp_exchange(static_dns.port, bytes(response), timeout=0.5) is None
    assert dig(static_dns.port, f"shop.{ZONE}").status == "NOERROR"  # still serving


def test_metrics_count_rcodes_regions_and_cache(static_dns, clients) -> None:
    subnet = clients["af-south"][0].subnet
    for _ in range(5):
        dig(static_dns.port, f"shop.{ZONE}", subnet=subnet)
    dig(static_dns.port, f"nosuch.{ZONE}", tcp=True)
    text = scrape(static_dns)
    assert metric(text, "geodns_queries_total", transport="udp", rcode="NOERROR", region="af-south") >= 5
    assert metric(text, "geodns_queries_total", transport="tcp", rcode="NXDOMAIN", region="") >= 1
    hits, misses = metric(text, "geodns_cache_hits_total"), metric(text, "geodns_cache_misses_total")
    assert hits >= 4 and misses >= 1
    assert 0 < metric(text, "geodns_cache_hit_ratio") < 1
    assert metric(text, "geodns_table_revision") > 0


# -- processes of their own ----------------------------------------------------------------------


def test_sighup_reloads_and_a_bad_file_keeps_the_last_view(tmp_path: Path, mmdb: Path) -> None:
    state = tmp_path / "state.toml"
    state.write_text(state_toml())
    proc = DnsProcess(tmp_path, "--state", str(state), "--geoip-db", str(mmdb)).start()
    try:
        assert dig(proc.port, f"blog.{ZONE}", subnet="193.0.6.0/24").addresses() == gateway_ip("us-east")
        state.write_text(state_toml(apps={**APPS, "blog": ["af-south"]}))
        proc.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while dig(proc.port, f"blog.{ZONE}", subnet="193.0.6.0/24").addresses() != gateway_ip("af-south"):
            assert time.monotonic() < deadline, proc.log()[-2000:]
            time.sleep(0.05)
        state.write_text("[zone]\nname = 'geo.example.com'\nbogus = 1\n")
        proc.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "state file rejected" not in proc.log():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert "zone: unknown key(s) bogus" in proc.log()
        assert dig(proc.port, f"blog.{ZONE}", subnet="193.0.6.0/24").addresses() == gateway_ip("af-south")
    finally:
        assert proc.stop() == 0


def test_rate_limiting_slips_and_drops_udp_but_not_tcp(tmp_path: Path, mmdb: Path) -> None:
    state = tmp_path / "state.toml"
    state.write_text(state_toml())
    proc = DnsProcess(tmp_path, "--state", str(state), "--geoip-db", str(mmdb), "--rrl-rate", "5",
                      "--rrl-slip", "2", "--rrl-window", "5").start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.5)
            for i in range(40):
                s.sendto(query(f"shop.{ZONE}", qid=i), ("127.0.0.1", proc.port))
            replies = []
            try:
                while True:
                    replies.append(DNSRecord.parse(s.recv(4096)))
            except TimeoutError:
                pass
        full = [r for r in replies if not r.header.tc]
        slipped = [r for r in replies if r.header.tc]
        assert 5 <= len(full) <= 7, len(full)  # the budget (and what a few ms earn)
        assert 10 <= len(slipped) <= 20 and not any(r.rr for r in slipped)
        assert len(replies) < 40  # the rest was dropped
        assert RCODE[DNSRecord.parse(tcp_exchange(proc.port, [query(f"shop.{ZONE}")])[0]).header.rcode] == "NOERROR"
    finally:
        proc.stop()


def worker_pids(proc: DnsProcess) -> set[int]:
    """PIDs of the workers that logged "listening" and are still running."""
    pids = set()
    for line in proc.log().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("msg") == "listening" and "pid" in rec and Path(f"/proc/{rec['pid']}").exists():
            pids.add(rec["pid"])
    return pids


def test_workers_share_the_port(tmp_path: Path, mmdb: Path) -> None:
    state = tmp_path / "state.toml"
    state.write_text(state_toml())
    proc = DnsProcess(tmp_path, "--state", str(state), "--geoip-db", str(mmdb), "--workers", "2",
                      "--metrics-port", "0").start()
    try:
        for i in range(100):  # a new source port each time: the kernel spreads them over the workers
            raw = udp_exchange(proc.port, query(f"shop.{ZONE}", qid=i, ecs="193.0.6.0/24"))
            assert raw is not None and DNSRecord.parse(raw).header.id == i
        assert RCODE[DNSRecord.parse(tcp_exchange(proc.port, [query(f"shop.{ZONE}")])[0]).header.rcode] == "NOERROR"
        pids = worker_pids(proc)
        assert len(pids) == 2 and proc.proc.pid not in pids
        deadline = time.monotonic() + 10
        while True:
            text = scrape(proc)
            if metric(text, "geodns_workers") == 2 and metric(text, "geodns_queries_total") >= 101:
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
        counted = metric(text, "geodns_queries_total")
        # a worker dies: the parent starts another, the port keeps answering, counters never go back
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while len(worker_pids(proc) - {victim}) < 2:
            assert time.monotonic() < deadline, proc.log()[-2000:]
            time.sleep(0.1)
        for i in range(50):
            raw = udp_exchange(proc.port, query(f"shop.{ZONE}", qid=i), timeout=3)
            assert raw is not None, f"query {i} lost after the restart"
        assert "worker exited, restarting" in proc.log()
        while metric(scrape(proc), "geodns_workers") != 2:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert metric(scrape(proc), "geodns_queries_total") >= counted
    finally:
        assert proc.stop() == 0


def test_sigterm_stops_cleanly(tmp_path: Path, mmdb: Path) -> None:
    state = tmp_path / "state.toml"
    state.write_text(state_toml())
    proc = DnsProcess(tmp_path, "--state", str(state), "--geoip-db", str(mmdb)).start()
    with socket.create_connection(("127.0.0.1", proc.port), timeout=5) as s:
        s.sendall(struct.pack("!H", len(w := query(f"shop.{ZONE}"))) + w)
        read_frame(s)
        start = time.monotonic()
        assert proc.stop() == 0
        assert time.monotonic() - start < 5
    assert "shutting down" in proc.log()


# -- the command line ----------------------------------------------------------------------------


def test_help_explains_every_flag() -> None:
    out = subprocess.run([sys.executable, "-m", "geodns.main", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=30)
    assert out.returncode == 0
    for action in parser()._actions:
        for flag in action.option_strings:
            assert flag in out.stdout, flag
        assert action.help, f"{action.option_strings} has no help"


@pytest.mark.parametrize("args, message", [
    ([], "--state/--coordinator"),
    (["--state", "/nonexistent/state.toml"], "--state"),
    (["--coordinator", "127.0.0.1:1"], "--zone"),
    (["--coordinator", "127.0.0.1:1", "--zone", "geo.example.com"], "--tls-ca"),
    (["--state", "{state}", "--edns-payload", "100"], "--edns-payload"),
    (["--state", "{state}", "--listen", "nowhere"], "--listen"),
    (["--state", "{state}", "--workers", "0"], "--workers"),
    (["--state", "{state}", "--rrl-slip", "99"], "rrl_slip"),
    (["--state", "{state}", "--geoip-db", "/nonexistent.mmdb"], "--geoip-db"),
    (["--state", "{bad}"], "zone.name"),
])
def test_bad_flags_exit_2_naming_the_flag(tmp_path: Path, args: list[str], message: str) -> None:
    good = tmp_path / "state.toml"
    good.write_text(state_toml())
    bad = tmp_path / "bad.toml"
    bad.write_text("[zone]\n")
    argv = [a.format(state=good, bad=bad) for a in args]
    out = subprocess.run([sys.executable, "-m", "geodns.main", "--listen", "127.0.0.1:0", *argv],
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_every_region_of_the_test_zone_is_reachable_by_name(static_dns) -> None:
    for region in REGIONS:
        res = dig(static_dns.port, f"gw.{region}.{ZONE}")
        assert res.status == "NOERROR"
        assert res.addresses() == gateway_ip(region)


@pytest.mark.parametrize("io", ["batch", "--no-batch-io"])
def test_ipv6_listener_with_both_udp_transports(tmp_path: Path, mmdb: Path, io: str) -> None:
    """recvmmsg batches and the asyncio DatagramProtocol path, on an IPv6 loopback listener."""
    state = tmp_path / "state.toml"
    state.write_text(state_toml())
    flags = [io] if io.startswith("--") else []
    proc = DnsProcess(tmp_path, "--state", str(state), "--geoip-db", str(mmdb), *flags,
                      "--listen", "[::1]:0").start()
    try:
        for tcp in (False, True):
            out = subprocess.run(["dig", "@::1", "-p", str(proc.port), f"shop.{ZONE}", "+subnet=193.0.6.0/24",
                                  "+norec", "+time=2", "+tries=1", *(["+tcp"] if tcp else [])],
                                 capture_output=True, text=True, timeout=20)
            res = parse_dig(out.stdout)
            assert res.addresses() == {"192.0.2.20"} and res.ecs == "193.0.6.0/24/20", out.stdout
        # the source address (::1) cannot be placed: default region; a big answer is truncated
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            s.sendto(query(f"big.{ZONE}", edns=False), ("::1", proc.port))
            reply = DNSRecord.parse(s.recv(4096))
        assert reply.header.tc and not reply.rr
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            s.sendto(query(f"shop.{ZONE}"), ("::1", proc.port))
            assert {str(rr.rdata) for rr in DNSRecord.parse(s.recv(4096)).rr} == {"192.0.2.20"}
    finally:
        assert proc.stop() == 0


def test_query_log_is_structured_and_off_by_default(tmp_path: Path, mmdb: Path, static_dns) -> None:
    dig(static_dns.port, f"shop.{ZONE}", subnet="193.0.6.0/24")
    assert '"msg": "query"' not in static_dns.log()
    state = tmp_path / "state.toml"
    state.write_text(state_toml())
    proc = DnsProcess(tmp_path, "--state", str(state), "--geoip-db", str(mmdb), "--query-log").start()
    try:
        dig(proc.port, f"Shop.{ZONE}", subnet="193.0.6.0/24")
        dig(proc.port, f"nosuch.{ZONE}", tcp=True)
        deadline = time.monotonic() + 5
        while True:
            lines = [json.loads(x) for x in proc.log().splitlines() if '"msg": "query"' in x]
            if len(lines) >= 2:
                break
            assert time.monotonic() < deadline, proc.log()
            time.sleep(0.05)
        first, second = lines[0], lines[1]
        assert first["qname"] == f"Shop.{ZONE}." and first["rcode"] == "NOERROR" and first["region"] == "eu-central"
        assert first["ecs"] == "193.0.6.0/24" and first["transport"] == "udp" and first["client"] == "127.0.0.1"
        assert second["rcode"] == "NXDOMAIN" and second["transport"] == "tcp"
    finally:
        proc.stop()


@pytest.mark.parametrize("tool", [dig, kdig], ids=["dig", "kdig"])
@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_ecs_source_prefix_zero_gets_scope_zero(static_dns, tool, tcp) -> None:
    res = tool(static_dns.port, f"shop.{ZONE}", "A", tcp=tcp, subnet="0.0.0.0/0")
    assert res.ecs == "0.0.0.0/0/0", res.text
    assert res.addresses() == {"192.0.2.20"}  # placed by the source address 127.0.0.1: the default region


def test_everything_unreachable_fails_open_and_is_counted(tmp_path: Path, mmdb: Path) -> None:
    """A state file whose gateways are all `reachable = false`: the process still answers every
    app name with the nearest region's routable gateways (never NODATA) and counts each answer in
    `geomesh_dns_fail_open_total`; a reachable gateway is answered alone and not counted."""
    text = state_toml().replace('state = "active"', 'state = "active", reachable = false')
    state = tmp_path / "state.toml"
    state.write_text(text)
    proc = DnsProcess(tmp_path, "--state", str(state), "--geoip-db", str(mmdb), "--metrics-port", "0").start()
    try:
        for tcp in (False, True):
            for _ in range(3):
                res = dig(proc.port, f"shop.{ZONE}", tcp=tcp, subnet="193.0.6.0/24")  # Amsterdam
                assert res.status == "NOERROR" and res.addresses() == gateway_ip("eu-central"), res
        deadline = time.monotonic() + 10
        while metric(scrape(proc), "geomesh_dns_fail_open_total") < 6:
            assert time.monotonic() < deadline, scrape(proc)
            time.sleep(0.1)
        # us-2 reachable again: blog (us-east only) gets it alone, and the counter stays
        state.write_text(text.replace('"us-2", ipv4 = "192.0.2.11", ipv6 = "2001:db8::11", state = "active", '
                                      'reachable = false', '"us-2", ipv4 = "192.0.2.11", ipv6 = "2001:db8::11"'))
        proc.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while dig(proc.port, f"blog.{ZONE}", subnet="193.0.6.0/24").addresses() != {"192.0.2.11"}:
            assert time.monotonic() < deadline, proc.log()[-2000:]
            time.sleep(0.1)
        before = metric(scrape(proc), "geomesh_dns_fail_open_total")
        dig(proc.port, f"blog.{ZONE}", subnet="193.0.6.0/24")
        assert metric(scrape(proc), "geomesh_dns_fail_open_total") == before
    finally:
        proc.stop()
