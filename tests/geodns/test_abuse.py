"""Hostile clients (security probe 2026-11, findings 10, 11, 17): the rules as table tests, then a
real geomesh-dns under a cache flood, a TCP flood of heavy pipelined messages, and one client
holding more TCP connections than its share -- while others keep being served."""

from __future__ import annotations

import socket
import struct
import threading
import time
import tomllib
from pathlib import Path

import pytest
from dnslib import EDNS0, RCODE, DNSRecord, EDNSOption

from geodns import static_state
from geodns.answer import Responder
from geodns.cache import BoundedCache
from geodns.config import Config
from geodns.nearest import Locator
from geodns.tcp_admission import Refusal, TcpAdmission, client_key, default_per_client
from geodns.wire import (
    MAX_QUERY_OCTETS,
    BadOpt,
    QueryTooLarge,
    UnexpectedRecords,
    parse_query,
)
from geomesh.errors import ValidationError

from .clients import DnsProcess, query, read_frame, tcp_exchange, udp_exchange
from .conftest import ZONE, state_toml
from .test_server import metric, scrape

HOT_SUBNET = "193.0.6.0/24"  # placed in Europe: eu-central answers with 192.0.2.20
CACHE_BYTES = 2 << 20
TCP_MAX = 40
TCP_PER_CLIENT = 8

# -- the rules ------------------------------------------------------------------------------------


def sized(key: str, value: str) -> int:
    return len(key) + len(value)


def test_cache_stays_within_its_bytes_and_keeps_what_is_asked_for() -> None:
    c: BoundedCache[str, str] = BoundedCache(1000, 1_000_000, sized)
    c.put("hot", "x" * 10)
    for i in range(10_000):  # a flood of one-off keys
        c.put(f"k{i:06d}", "y" * 40)
        assert c.bytes <= 1000
        if i % 5 == 0:
            assert c.get("hot") == "x" * 10, f"the hot entry was flushed after {i} one-off keys"
    assert c.evictions > 9_000 and len(c) <= 1000 // 47 + 1


@pytest.mark.parametrize("ops, want_len, want_bytes, want_evictions", [
    ([("put", "a", 100)], 1, 101, 0),
    ([("put", "a", 100), ("put", "a", 200)], 1, 201, 0),  # replaced, not counted twice
    ([("put", "a", 600)], 0, 0, 0),  # larger than a generation (500): not kept
    ([("put", "a", 300), ("put", "b", 300)], 2, 602, 0),  # a moved to the previous generation
    ([("put", "a", 300), ("put", "b", 300), ("put", "c", 300)], 2, 602, 1),  # a evicted
    ([("put", "a", 300), ("put", "b", 300), ("get", "a", 0), ("put", "c", 300)], 2, 602, 1),  # a promoted, b gone
])
def test_cache_generations(ops: list[tuple[str, str, int]], want_len: int, want_bytes: int,
                           want_evictions: int) -> None:
    c: BoundedCache[str, str] = BoundedCache(1000, 100, sized)
    for op, key, n in ops:
        if op == "put":
            c.put(key, "v" * n)
        else:
            assert c.get(key) is not None
    assert (len(c), c.bytes, c.evictions) == (want_len, want_bytes, want_evictions)
    c.reset()
    assert (len(c), c.bytes) == (0, 0)


def test_cache_entry_limit_and_disabled() -> None:
    c: BoundedCache[str, str] = BoundedCache(1 << 20, 10, sized)
    for i in range(100):
        c.put(str(i), "v")
        assert len(c) <= 10
    assert "99" in c and "0" not in c
    off: BoundedCache[str, str] = BoundedCache(0, 10, sized)
    assert not off.put("a", "b") and len(off) == 0


V4, V4B = socket.inet_aton("192.0.2.1"), socket.inet_aton("192.0.2.2")
V6 = socket.inet_pton(socket.AF_INET6, "2001:db8:0:1::1")
V6_SAME_56 = socket.inet_pton(socket.AF_INET6, "2001:db8:0:ff::9")
V6_OTHER_56 = socket.inet_pton(socket.AF_INET6, "2001:db8:0:100::1")
MAPPED = socket.inet_pton(socket.AF_INET6, "::ffff:192.0.2.1")


@pytest.mark.parametrize("a, b, same", [
    (V4, V4B, False),  # IPv4: one address is one client
    (V6, V6_SAME_56, True),  # IPv6: one /56 is one client
    (V6, V6_OTHER_56, False),
    (MAPPED, V4, True),
])
def test_client_key(a: bytes, b: bytes, same: bool) -> None:
    assert (client_key(a) == client_key(b)) is same


def test_admission_share_and_cap() -> None:
    adm = TcpAdmission(5, 2)
    assert [adm.admit(V4) for _ in range(3)] == [None, None, Refusal.PER_CLIENT]
    assert [adm.admit(V6) for _ in range(2)] == [None, None]
    assert adm.admit(V6_SAME_56) is Refusal.PER_CLIENT
    assert adm.admit(V4B) is None  # 5 of 5
    assert adm.admit(V6_OTHER_56) is Refusal.MAX_CONNECTIONS
    adm.release(V4)
    assert adm.held(V4) == 1 and adm.total == 4
    assert adm.admit(V4) is None and adm.admit(V4) is Refusal.MAX_CONNECTIONS
    adm.release(socket.inet_aton("203.0.113.1"))  # never admitted: nothing changes
    assert adm.total == 5
    assert default_per_client(1000) == 100 and default_per_client(5) == 1
    with pytest.raises(ValueError):
        TcpAdmission(5, 6)


QUESTION = b"\x04shop\x03geo\x07example\x03com\x00" + struct.pack("!HH", 1, 1)
EMPTY_TXT = b"\0" + struct.pack("!HHIH", 16, 1, 0, 1) + b"\0"


def msg(an: int = 0, ns: int = 0, ar: int = 0, records: bytes = b"", pad: int = 0) -> bytes:
    return struct.pack("!HHHHHH", 0x1234, 0, 1, an, ns, ar) + QUESTION + records + b"\0" * pad


@pytest.mark.parametrize("data, error", [
    (msg(an=1, records=EMPTY_TXT), UnexpectedRecords),
    (msg(ns=1, records=EMPTY_TXT), UnexpectedRecords),
    (msg(an=5458, records=EMPTY_TXT * 5458), QueryTooLarge),  # the probe's 64 KB message
    (msg(an=60, records=EMPTY_TXT * 60), UnexpectedRecords),  # under the size limit
    (msg(ar=3, records=EMPTY_TXT * 3), UnexpectedRecords),
    (msg(ar=2, records=EMPTY_TXT * 2), None),  # two additional records: decoded
    (msg(ar=2, records=(b"\0" + struct.pack("!HHIH", 41, 1232, 0, 0)) * 2), BadOpt),  # still checked
    (msg(pad=MAX_QUERY_OCTETS - len(msg())), None),  # trailing junk, but not too large to look at
    (msg(pad=MAX_QUERY_OCTETS - len(msg()) + 1), QueryTooLarge),
])
def test_query_shape_is_checked_before_decoding(data: bytes, error: type[Exception] | None) -> None:
    if error is None:
        try:
            parse_query(data)
        except (UnexpectedRecords, QueryTooLarge) as exc:
            pytest.fail(f"refused by the shape check: {exc}")
        except Exception:
            pass  # other checks may refuse it
        return
    with pytest.raises(error):
        parse_query(data)


def with_options(*opts: tuple[int, bytes], qid: int = 7) -> bytes:
    q = DNSRecord.question(f"nosuch.{ZONE}", "A")
    q.header.id = qid
    q.add_ar(EDNS0(udp_len=1232, opts=[EDNSOption(code, data) for code, data in opts]))
    return bytes(q.pack())


@pytest.fixture(scope="module")
def responder(mmdb: Path) -> Responder:
    view = static_state.view_from(tomllib.loads(state_toml()), revision=7)
    return Responder(view, Locator(mmdb), cache_bytes=CACHE_BYTES)


@pytest.mark.parametrize("wire, kept", [
    (with_options(), True),
    (with_options((10, b"c" * 8)), True),  # client cookie
    (with_options((12, b"\0" * 40)), True),  # padding
    (with_options((65001, b"x" * 8)), False),  # an unknown option: answered, not kept
    (with_options((3, b"")), False),  # NSID: answered, not kept
    (with_options((12, b"\0" * 500)), False),  # over 512 octets
])
def test_exact_cache_keeps_only_plain_queries(responder: Responder, wire: bytes, kept: bool) -> None:
    responder.exact.reset()
    ans = responder.answer(wire, b"\x7f\0\0\1")
    assert ans.wire is not None and RCODE[DNSRecord.parse(ans.wire).header.rcode] == "NXDOMAIN"
    assert (wire[2:] in responder.exact) is kept


def test_oversize_and_records_get_formerr_with_the_id(responder: Responder) -> None:
    before = responder.stats.oversize
    big = with_options((65001, b"x" * 2000), qid=99)
    for wire in (big, msg(an=1, records=EMPTY_TXT)):
        ans = responder.answer(wire, b"\x7f\0\0\1", tcp=wire is big)
        reply = DNSRecord.parse(ans.wire)
        assert RCODE[reply.header.rcode] == "FORMERR" and reply.header.id == struct.unpack("!H", wire[:2])[0]
    assert responder.stats.oversize == before + 1
    cut = responder.oversize(big[:MAX_QUERY_OCTETS], b"\x7f\0\0\1")  # what the UDP transport passes
    assert cut.wire == bytes.fromhex("0063 8101 0000 0000 0000 0000")  # QR, RD echoed, FORMERR
    assert responder.oversize(b"\x12", b"\x7f\0\0\1").wire is None


# -- a real server --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory, mmdb: Path):
    work = tmp_path_factory.mktemp("abuse")
    state = work / "state.toml"
    state.write_text(state_toml())
    proc = DnsProcess(work, "--state", str(state), "--geoip-db", str(mmdb), "--metrics-port", "0",
                      "--cache-bytes", str(CACHE_BYTES), "--tcp-max-connections", str(TCP_MAX),
                      "--tcp-max-per-client", str(TCP_PER_CLIENT), "--tcp-idle-timeout", "5")
    proc.start()
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


def heavy_flood(port: int, seconds: float, stop: threading.Event) -> int:
    """One TCP client pipelining the probe's 64 KB messages and smaller ones with records, reading
    replies on the side; bounded in time."""
    big = msg(an=5458, records=EMPTY_TXT * 5458)
    small = msg(ar=2, records=(b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 4) + b"\1\2\3\4") * 2)
    batch = b"".join(struct.pack("!H", len(m)) + m for m in [big] * 4 + [small] * 400)
    replies = [0]

    def reader(s: socket.socket) -> None:
        try:
            while chunk := s.recv(1 << 16):
                replies[0] += len(chunk)
        except OSError:
            pass

    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        t = threading.Thread(target=reader, args=(s,), daemon=True)
        t.start()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not stop.is_set():
            try:
                s.sendall(batch)
            except TimeoutError:
                break  # the server stopped reading for 10 s: the assertions below will tell
        s.shutdown(socket.SHUT_WR)
        t.join(5)
    return replies[0]


def test_tcp_flood_does_not_stall_udp(dns) -> None:
    port = dns.port
    stop = threading.Event()
    result: list[int] = []
    flooder = threading.Thread(target=lambda: result.append(heavy_flood(port, 3.0, stop)), daemon=True)
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
    assert result and result[0] > 0, "the flood got no replies"
    assert max(latencies) < 0.5, f"UDP max latency {max(latencies) * 1000:.0f} ms during the TCP flood"
    for records in (dict(an=1), dict(ns=1)):
        reply = tcp_exchange(port, [msg(records=EMPTY_TXT, **records)])[0]
        assert RCODE[DNSRecord.parse(reply).header.rcode] == "FORMERR"


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
