"""Hostile clients (security probe 2026-11, findings 10, 11, 17): the rules as table tests (cache,
TCP admission, penalty box, framing, query shape), then a real geomesh-dns under a cache flood, a
TCP client sending messages no query can be (FORMERR, closed, its reconnections refused for a
cool-down while others are served), a TCP flood of heavy pipelined messages, and one client
holding more TCP connections than its share -- while others keep being served."""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from dnslib import RCODE, DNSRecord

from geodns.config import Config
from geodns.tcp import ABUSE_LINGER
from geodns.tcp_admission import (
    Abuse,
    PenaltyBox,
    TcpAdmission,
)
from geodns.wire import (
    MAX_QUERY_OCTETS,
)
from geomesh.errors import ValidationError

from .clients import DnsProcess, query, read_frame, udp_exchange
from .conftest import ZONE, state_toml
from .test_abuse_rules import EMPTY_TXT, OPT, QUESTION, frames, msg, with_options
from .test_server import metric, scrape

HOT_SUBNET = "193.0.6.0/24"  # placed in Europe: eu-central answers with 192.0.2.20
VICTIM, ATTACKER, FLOODER = "127.0.0.1", "127.0.0.2", "127.0.0.11"  # TCP sources
CACHE_BYTES = 2 << 20
TCP_MAX = 40
TCP_PER_CLIENT = 8


# -- a real server --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory, mmdb: Path):
    work = tmp_path_factory.mktemp("abuse")
    state = work / "state.toml"
    state.write_text(state_toml())
    proc = DnsProcess(work, "--state", str(state), "--geoip-db", str(mmdb), "--metrics-port", "0",
                      "--cache-bytes", str(CACHE_BYTES), "--tcp-max-connections", str(TCP_MAX),
                      "--tcp-max-per-client", str(TCP_PER_CLIENT), "--tcp-idle-timeout", "5",
                      "--tcp-abuse-cooldown", "1")
    proc.start()
    proc.wait_map()  # memory is measured against the server with its region map built
    yield proc
    proc.stop()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def hot_answer(port: int) -> set[str]:
    raw = udp_exchange(port, query(f"shop.{ZONE}", ecs=HOT_SUBNET, qid=0x4242))
    assert raw is not None, "the hot query got no answer"
    return {str(rr.rdata) for rr in DNSRecord.parse(raw).rr}


def flood_udp(port: int, packets: list[bytes], window: int = 200) -> int:
    """Send in windows, reading what comes back (bounded: each window waits at most 1 s)."""
    got = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        s.connect(("127.0.0.1", port))
        s.settimeout(1.0)
        for start in range(0, len(packets), window):
            chunk = packets[start:start + window]
            for p in chunk:
                s.send(p)
            try:
                for _ in chunk:
                    s.recv(65535)
                    got += 1
            except TimeoutError:
                pass
    return got


def test_cache_flood_stays_bounded_and_keeps_the_hot_entry(dns) -> None:
    port = dns.port
    assert hot_answer(port) == {"192.0.2.20"}
    rss0 = rss_mb(dns.pid)
    text = scrape(dns)
    misses0, nx0, formerr0 = (metric(text, "geodns_cache_misses_total"),
                              metric(text, "geodns_queries_total", rcode="NXDOMAIN"),
                              metric(text, "geodns_queries_total", rcode="FORMERR"))
    hot = query(f"shop.{ZONE}", ecs=HOT_SUBNET, qid=1)
    # the probe's packets: 4 KB of an unknown option, a counter in the last octets
    base = bytearray(with_options((65001, b"\0" * 4000)))
    packets = []
    for i in range(20_000):
        base[-8:] = struct.pack("!Q", i)
        packets.append(bytes(base))
    # a random-subdomain flood under the zone: small, cacheable, every one different
    for i in range(20_000):
        packets.append(query(f"f{i:05d}-{'z' * 40}.{ZONE}", qid=i & 0xFFFF))
        if i % 50 == 0:
            packets.append(hot)
    answered = flood_udp(port, packets)
    assert answered > 30_000, f"only {answered} of {len(packets)} answered"
    text = scrape(dns)
    held = metric(text, "geodns_cache_bytes")
    assert 0 < held <= CACHE_BYTES, f"caches hold {held} accounted bytes, the bound is {CACHE_BYTES}"
    assert metric(text, "geodns_cache_evictions_total") > 0
    assert metric(text, "geodns_oversize_queries_total") >= 10_000
    misses = metric(text, "geodns_cache_misses_total") - misses0
    flood = (metric(text, "geodns_queries_total", rcode="NXDOMAIN") - nx0
             + metric(text, "geodns_queries_total", rcode="FORMERR") - formerr0)
    assert misses == flood, f"the hot entry missed the caches {misses - flood} times during the flood"
    growth = rss_mb(dns.pid) - rss0
    assert growth < 50, f"RSS grew by {growth:.0f} MB"
    assert hot_answer(port) == {"192.0.2.20"}


def connect_from(source: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(3)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def ask_tcp(s: socket.socket, qid: int) -> int:
    """The rcode of a query on an open connection."""
    wire = query(f"shop.{ZONE}", ecs=HOT_SUBNET, qid=qid)
    s.sendall(struct.pack("!H", len(wire)) + wire)
    reply = DNSRecord.parse(read_frame(s))
    assert reply.header.id == qid
    return reply.header.rcode


def refused(s: socket.socket) -> bool:
    """The server reset or closed this connection without answering."""
    try:
        wire = query(f"shop.{ZONE}")
        s.sendall(struct.pack("!H", len(wire)) + wire)
        return s.recv(10) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True



def abusive(kind: Abuse, qid: int = 0x4321) -> bytes:
    """A message of each kind no query can be; the probe's 64 KB one for OVERSIZE."""
    if kind is Abuse.OVERSIZE:
        return struct.pack("!HHHHHH", qid, 0x0100, 1, 5458, 0, 0) + QUESTION + EMPTY_TXT * 5458
    counts = {Abuse.RECORDS: (1, 0, 0), Abuse.ADDITIONAL: (0, 0, 3)}[kind]
    return struct.pack("!HHHHHH", qid, 0x0100, 1, *counts) + QUESTION + EMPTY_TXT * sum(counts)


def closed_by_server(s: socket.socket, within: float) -> float:
    """Seconds until the server closed `s` (EOF or reset); fails after `within` seconds."""
    start = time.monotonic()
    s.settimeout(within)
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the connection was still open after {within} s")
    return time.monotonic() - start


@pytest.mark.parametrize("kind, source", [(Abuse.OVERSIZE, "127.0.0.21"), (Abuse.RECORDS, "127.0.0.22"),
                                          (Abuse.ADDITIONAL, "127.0.0.23")])
def test_abusive_message_gets_formerr_then_close(dns, kind: Abuse, source: str) -> None:
    before = scrape(dns)
    good = query(f"shop.{ZONE}", ecs=HOT_SUBNET, qid=1)
    after = query(f"shop.{ZONE}", ecs=HOT_SUBNET, qid=3)
    with connect_from(source, dns.port) as s:
        s.sendall(frames(good, abusive(kind, qid=2), after))  # pipelined: one before, one after
        first, second = DNSRecord.parse(read_frame(s)), DNSRecord.parse(read_frame(s))
        assert (first.header.id, RCODE[first.header.rcode]) == (1, "NOERROR")
        assert (second.header.id, RCODE[second.header.rcode]) == (2, "FORMERR")
        # closed at once (the idle timeout is 5 s), the query after it unanswered
        assert closed_by_server(s, 3.0) < 3.0
    text = scrape(dns)
    assert (metric(text, "geodns_tcp_abuse_closed_total", reason=kind.value)
            - metric(before, "geodns_tcp_abuse_closed_total", reason=kind.value)) == 1
    assert metric(text, "geodns_tcp_penalty_clients") >= 1


def test_penalised_client_is_refused_then_served_again(dns) -> None:
    port = dns.port
    before = scrape(dns)
    with connect_from(ATTACKER, port) as s:
        s.sendall(frames(abusive(Abuse.RECORDS)))
        offended = time.monotonic()
        assert RCODE[DNSRecord.parse(read_frame(s)).header.rcode] == "FORMERR"
        closed_by_server(s, 3.0)
    again = connect_from(ATTACKER, port)
    with again:
        assert refused(again), "a reconnection during the cool-down was served"
    with connect_from(VICTIM, port) as other:  # another client is served meanwhile
        assert ask_tcp(other, 9) == 0
    assert (metric(scrape(dns), "geodns_tcp_refused_total", reason="penalised")
            - metric(before, "geodns_tcp_refused_total", reason="penalised")) >= 1
    # after the reset (ABUSE_LINGER) and the cool-down (--tcp-abuse-cooldown 1) it is served again
    deadline = offended + 5
    while True:
        with connect_from(ATTACKER, port) as late:
            try:
                if ask_tcp(late, 10) == 0:
                    break
            except (ConnectionError, OSError):
                pass
        assert time.monotonic() < deadline, "still refused 5 s after a 1 s cool-down"
        time.sleep(0.1)
    assert time.monotonic() - offended >= ABUSE_LINGER + 0.9, "served again before the cool-down was over"


def test_well_formed_pipelining_client_is_never_closed(dns) -> None:
    port = dns.port
    before = scrape(dns)
    padded = with_options((12, b"\0" * 1000), qid=0)
    padded = with_options((12, b"\0" * (1000 - (len(padded) - MAX_QUERY_OCTETS))), qid=0)
    assert len(padded) == MAX_QUERY_OCTETS  # the largest query answered
    shapes = [query(f"shop.{ZONE}", ecs=HOT_SUBNET), query(f"nosuch.{ZONE}", edns=False), padded,
              msg(ar=2, records=OPT + EMPTY_TXT),  # OPT and one more additional record
              msg(ar=2, records=OPT * 2)]  # two OPTs: FORMERR, but a query's shape: not abuse
    wires = []
    for i in range(3000):
        w = bytearray(shapes[i % len(shapes)])
        w[:2] = struct.pack("!H", i)
        wires.append(bytes(w))
    replies: list[bytes] = []
    with connect_from(VICTIM, port) as s:
        s.settimeout(10)
        reader = threading.Thread(target=lambda: replies.extend(read_frame(s) for _ in wires), daemon=True)
        reader.start()
        s.sendall(frames(*wires))
        reader.join(20)
        assert len(replies) == len(wires), f"{len(replies)} of {len(wires)} replies before the connection ended"
        assert [struct.unpack_from("!H", r)[0] for r in replies] == list(range(len(wires)))
        assert ask_tcp(s, 7777) == 0  # still open
    with connect_from(VICTIM, port) as s:
        assert ask_tcp(s, 7778) == 0  # and not penalised
    text = scrape(dns)
    for name in ("geodns_tcp_abuse_closed_total", "geodns_tcp_refused_total"):
        assert metric(text, name) == metric(before, name), name


def abusive_flood(port: int, seconds: float, stop: threading.Event) -> tuple[int, int]:
    """The bench's attacker: pipelines batches of the probe's 64 KB messages, reconnecting when
    the server ends the connection; bounded in time and connections. (batches sent, connections
    the server ended)."""
    batch = frames(*[abusive(Abuse.OVERSIZE)] * 8)
    sent = ended = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not stop.is_set() and ended < 50_000:
        try:
            s = connect_from(FLOODER, port)
        except OSError:
            ended += 1
            time.sleep(0.01)
            continue
        with s:
            s.settimeout(2)
            try:
                while time.monotonic() < deadline and not stop.is_set():
                    s.sendall(batch)
                    sent += 1
            except OSError:
                ended += 1
    return sent, ended


def test_tcp_flood_does_not_stall_udp(dns) -> None:
    port = dns.port
    before = scrape(dns)
    stop = threading.Event()
    result: list[tuple[int, int]] = []
    flooder = threading.Thread(target=lambda: result.append(abusive_flood(port, 3.0, stop)), daemon=True)
    flooder.start()
    time.sleep(0.3)
    latencies = []
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("127.0.0.1", port))
            s.settimeout(2.0)
            for i in range(80):  # cache misses: every name is new
                start = time.monotonic()
                s.send(query(f"u{i}.lat.{ZONE}", qid=i))
                reply = s.recv(65535)
                latencies.append(time.monotonic() - start)
                assert struct.unpack("!H", reply[:2])[0] == i
                time.sleep(0.02)
    finally:
        stop.set()
        flooder.join(10)
    assert result, "the flooder did not finish"
    sent, ended = result[0]
    assert sent > 0 and ended >= 2, f"{sent} batches sent, {ended} connections ended by the server"
    assert max(latencies) < 0.5, f"UDP max latency {max(latencies) * 1000:.0f} ms during the TCP flood"
    text = scrape(dns)
    closed = (metric(text, "geodns_tcp_abuse_closed_total", reason="oversize")
              - metric(before, "geodns_tcp_abuse_closed_total", reason="oversize"))
    penalised = (metric(text, "geodns_tcp_refused_total", reason="penalised")
                 - metric(before, "geodns_tcp_refused_total", reason="penalised"))
    # the flooder got its FORMERR and a close, then resets while it cooled down (1, 2, 4 s...)
    assert closed in (1, 2, 3) and penalised >= 1, (closed, penalised)
    with connect_from(VICTIM, port) as s:  # other clients are still served over TCP
        assert ask_tcp(s, 8) == 0


def test_tcp_share_per_client(dns) -> None:
    port = dns.port
    deadline = time.monotonic() + 10
    while metric(before := scrape(dns), "geodns_tcp_connections") > 0:  # earlier tests' connections
        assert time.monotonic() < deadline, "TCP connections of earlier tests are still open"
        time.sleep(0.1)
    mine = [connect_from("127.0.0.1", port) for _ in range(TCP_PER_CLIENT)]
    extra = [connect_from("127.0.0.1", port) for _ in range(3)]
    others: list[socket.socket] = []
    try:
        assert all(ask_tcp(s, i) == 0 for i, s in enumerate(mine)), "a client is served up to its share"
        assert all(refused(s) for s in extra), "connections past the share are reset"
        # another client (another loopback address) is still served
        other = connect_from("127.0.0.2", port)
        others.append(other)
        assert ask_tcp(other, 77) == 0
        # fill the process: 4 more clients take their whole share, then even a new client is refused
        for host in range(3, 3 + (TCP_MAX - 2 * TCP_PER_CLIENT) // TCP_PER_CLIENT):
            others += [connect_from(f"127.0.0.{host}", port) for _ in range(TCP_PER_CLIENT)]
        others += [connect_from("127.0.0.9", port) for _ in range(TCP_PER_CLIENT - 1)]
        assert all(ask_tcp(s, 1000 + i) == 0 for i, s in enumerate(others))
        late = connect_from("127.0.0.10", port)
        assert refused(late)
        late.close()
        text = scrape(dns)
        per_client = (metric(text, "geodns_tcp_refused_total", reason="per_client")
                      - metric(before, "geodns_tcp_refused_total", reason="per_client"))
        full = (metric(text, "geodns_tcp_refused_total", reason="max_connections")
                - metric(before, "geodns_tcp_refused_total", reason="max_connections"))
        assert (per_client, full) == (3, 1)
        assert metric(text, "geodns_tcp_connections") == TCP_MAX
        # the first client's slots come back when it closes a connection
        mine.pop().close()
        deadline = time.monotonic() + 5
        while True:
            again = connect_from("127.0.0.1", port)
            try:
                if ask_tcp(again, 5) == 0:
                    break
            except (ConnectionError, OSError):
                assert time.monotonic() < deadline, "a closed connection's slot never came back"
                time.sleep(0.05)
            finally:
                again.close()
    finally:
        for s in mine + extra + others:
            s.close()


@pytest.mark.parametrize("args, message", [
    (["--cache-bytes", "100"], "--cache-bytes"),
    (["--cache-bytes", "-1"], "--cache-bytes"),
    (["--tcp-max-connections", "10", "--tcp-max-per-client", "11"], "--tcp-max-per-client"),
    (["--tcp-max-per-client", "0"], "--tcp-max-per-client"),
    (["--tcp-abuse-cooldown", "-1"], "--tcp-abuse-cooldown"),
    (["--tcp-abuse-cooldown", "0.001"], "--tcp-abuse-cooldown"),
    (["--tcp-abuse-cooldown", "10", "--tcp-abuse-cooldown-max", "5"], "--tcp-abuse-cooldown-max"),
    (["--tcp-abuse-clients", "0"], "--tcp-abuse-clients"),
])
def test_bad_protection_flags_name_the_flag(tmp_path: Path, mmdb: Path, args: list[str], message: str) -> None:
    state = tmp_path / "state.toml"
    state.write_text(state_toml())
    with pytest.raises(ValidationError, match=message):
        Config.from_args(["--state", str(state), "--geoip-db", str(mmdb), *args])


def test_protection_defaults(tmp_path: Path, mmdb: Path) -> None:
    state = tmp_path / "state.toml"
    state.write_text(state_toml())
    cfg = Config.from_args(["--state", str(state), "--geoip-db", str(mmdb)])
    assert (cfg.cache_bytes, cfg.tcp_max_connections, cfg.tcp_max_per_client) == (32 << 20, 1000, None)
    assert TcpAdmission(cfg.tcp_max_connections, cfg.tcp_max_per_client).max_per_client == 100
    assert (cfg.tcp_abuse_cooldown, cfg.tcp_abuse_cooldown_max, cfg.tcp_abuse_clients) == (1.0, 60.0, 10_000)
    off = Config.from_args(["--state", str(state), "--geoip-db", str(mmdb), "--tcp-abuse-cooldown", "0"])
    assert not PenaltyBox(off.tcp_abuse_cooldown, off.tcp_abuse_cooldown_max).enabled
