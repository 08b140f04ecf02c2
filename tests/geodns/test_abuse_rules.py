"""Table tests of GeoDNS's protections against hostile clients, pure (no server): the byte-bounded
caches, the TCP admission share, the penalty box, the early header checks, the TCP framer, and
which queries the exact reply cache keeps. The same protections against a real server are in
`test_abuse.py`."""

from __future__ import annotations

import socket
import struct
import tomllib
from pathlib import Path

import pytest
from dnslib import EDNS0, RCODE, DNSRecord, EDNSOption

from geodns import static_state
from geodns.answer import Responder
from geodns.cache import BoundedCache
from geodns.nearest import Locator
from geodns.tcp import COMPACT_AT, Abusive, Framer, Message, ZeroLength, abuse_of
from geodns.tcp_admission import (
    Abuse,
    PenaltyBox,
    Refusal,
    TcpAdmission,
    client_key,
    default_per_client,
    merge_snapshots,
)
from geodns.wire import (
    MAX_QUERY_OCTETS,
    BadOpt,
    QueryTooLarge,
    UnexpectedRecords,
    parse_query,
)

from .conftest import ZONE, state_toml

HOT_SUBNET = "193.0.6.0/24"  # placed in Europe: eu-central answers with 192.0.2.20
VICTIM, ATTACKER, FLOODER = "127.0.0.1", "127.0.0.2", "127.0.0.11"  # TCP sources
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


# offences of one client at the given times -> the cool-down each one imposes (1 s doubling to 8 s)
@pytest.mark.parametrize("times, cooldowns", [
    ([0.0], [1.0]),
    ([0.0, 1.5, 4.0, 9.0, 20.0], [1.0, 2.0, 4.0, 8.0, 8.0]),  # doubles on each repeat, stops at the max
    ([0.0, 0.1, 0.2], [1.0, 2.0, 4.0]),  # connections of the same client closed one after another
    ([0.0, 1.0 + 8.0 - 0.01], [1.0, 2.0]),  # just inside the clean period (the max) after the cool-down
    ([0.0, 1.0 + 8.0], [1.0, 1.0]),  # clean for the max after the cool-down: starts over
    ([0.0, 1.5, 4.0, 4.0 + 4.0 + 8.0], [1.0, 2.0, 4.0, 1.0]),
])
def test_penalty_cooldown_doubles(times: list[float], cooldowns: list[float]) -> None:
    box = PenaltyBox(1.0, 8.0, 100)
    assert [box.offend(V4, t, Abuse.RECORDS) for t in times] == cooldowns
    assert box.closed[Abuse.RECORDS] == len(times)


@pytest.mark.parametrize("offender, asking, at, penalised", [
    (V4, V4, 0.5, True),
    (V4, V4, 1.0, False),  # the cool-down is over
    (V4, V4B, 0.5, False),  # another address is another client
    (V6, V6_SAME_56, 0.5, True),  # the same /56
    (V6, V6_OTHER_56, 0.5, False),
    (MAPPED, V4, 0.5, True),
])
def test_penalty_is_per_client(offender: bytes, asking: bytes, at: float, penalised: bool) -> None:
    box = PenaltyBox(1.0, 60.0, 100)
    box.offend(offender, 0.0, Abuse.OVERSIZE)
    assert box.penalised(asking, at) is penalised
    adm = TcpAdmission(5, 2, box)
    assert adm.admit(asking, at) is (Refusal.PENALISED if penalised else None)
    assert adm.total == (0 if penalised else 1)


def test_penalty_box_is_bounded_and_can_be_disabled() -> None:
    box = PenaltyBox(1.0, 60.0, 3)
    clients = [socket.inet_aton(f"192.0.2.{i}") for i in range(1, 6)]
    for i, c in enumerate(clients):
        box.offend(c, i / 100, Abuse.ADDITIONAL)
        assert len(box) <= 3
    assert box.evictions == 2
    assert not box.penalised(clients[0], 0.5) and box.penalised(clients[4], 0.5)  # the oldest forgotten
    off = PenaltyBox(0.0)
    assert off.offend(V4, 0.0, Abuse.OVERSIZE) == 0.0 and not off.penalised(V4, 0.0) and len(off) == 0
    assert off.closed[Abuse.OVERSIZE] == 1  # still counted: the connection was closed
    for args in ((-1.0,), (2.0, 1.0), (1.0, 60.0, 0)):
        with pytest.raises(ValueError):
            PenaltyBox(*args)
    merged = merge_snapshots([box.snapshot(), off.snapshot()], [off.snapshot()])
    assert merged == {"closed": {"oversize": 1, "records": 0, "additional": 5}, "clients": 0, "evictions": 2}


QUESTION = b"\x04shop\x03geo\x07example\x03com\x00" + struct.pack("!HH", 1, 1)
EMPTY_TXT = b"\0" + struct.pack("!HHIH", 16, 1, 0, 1) + b"\0"
OPT = b"\0" + struct.pack("!HHIH", 41, 1232, 0, 0)


def header(flags: int = 0, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0) -> bytes:
    return struct.pack("!HHHHHH", 0x1234, flags, qd, an, ns, ar)


@pytest.mark.parametrize("size, head, want", [
    (40, header(), None),
    (40, header(ar=2), None),  # an OPT and a TSIG
    (40, header(an=1), Abuse.RECORDS),
    (40, header(ns=1), Abuse.RECORDS),
    (40, header(ar=3), Abuse.ADDITIONAL),
    (40, header(qd=0, an=1), Abuse.RECORDS),  # FORMERR either way
    (1024, header(), None),
    (1025, header(), Abuse.OVERSIZE),
    (65535, header(0x8000, an=5458), Abuse.OVERSIZE),  # whatever the header says
    (40, header(0x8000, an=1), None),  # a response: dropped, not answered
    (40, header(5 << 11, an=1, ns=1), None),  # UPDATE carries records: NOTIMP, not abuse
    (11, header()[:11], None),  # no header: dropped
])
def test_abuse_of(size: int, head: bytes, want: Abuse | None) -> None:
    assert abuse_of(size, head) is want


def frames(*messages: bytes) -> bytes:
    return b"".join(struct.pack("!H", len(m)) + m for m in messages)


def events(framer: Framer) -> list[object]:
    out = []
    while (ev := framer.next_event()) is not None:
        out.append(ev)
    return out


@pytest.mark.parametrize("chunks, want", [
    ([frames(b"A" * 20, b"B" * 30)], [Message(b"A" * 20), Message(b"B" * 30)]),
    ([b"\0", b"\x14" + b"A" * 19, b"A"], [Message(b"A" * 20)]),  # split anywhere
    ([frames(b"A" * 20) + b"\0\0" + frames(b"B" * 20)], [Message(b"A" * 20), ZeroLength()]),
    # refused from the header: the 64 KB body is not waited for
    ([struct.pack("!H", 65535) + header(an=5458)], [Abusive(Abuse.OVERSIZE, header(an=5458))]),
    ([struct.pack("!H", 65535) + header()[:11]], []),  # the header is not complete yet
    ([frames(b"A" * 20) + struct.pack("!H", 200) + header(an=1)], [Message(b"A" * 20), Abusive(Abuse.RECORDS,
                                                                                             header(an=1))]),
    ([frames(header(ar=3) + b"x" * 10, b"B" * 20)], [Abusive(Abuse.ADDITIONAL, header(ar=3))]),  # then done
    ([frames(b"short")], [Message(b"short")]),  # under a header: the answer path drops it
])
def test_framer(chunks: list[bytes], want: list[object]) -> None:
    framer = Framer()
    got = []
    for chunk in chunks:
        framer.feed(chunk)
        got += events(framer)
    assert got == want
    if want and not isinstance(want[-1], Message):
        framer.feed(frames(b"C" * 20))
        assert framer.done and framer.next_event() is None and framer.buffered == 0


def test_framer_drops_what_it_consumed_without_copying_per_message() -> None:
    framer = Framer()
    one = frames(header() + b"q" * 28)
    stream = one * 20_000  # 800 KB of pipelined queries, fed in 4 KB reads
    got = 0
    for i in range(0, len(stream), 4096):
        framer.feed(stream[i:i + 4096])
        got += len(events(framer))
        assert len(framer._buf) <= COMPACT_AT + 4096 + len(one)
    assert got == 20_000 and framer.buffered == 0


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
    responder.answer(wire, b"\x7f\0\0\1")  # kept on the second sight
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
