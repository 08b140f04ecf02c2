"""Table tests of the UDP stage list (`geodns.pipeline`): which stages run for which settings, what
each packet gets through them (reply cache, answer, stats, RRL drop and slip, fit), and that both
UDP transports (recvmmsg batches and the asyncio protocol) give the same bytes for the same table
of packets on loopback."""

from __future__ import annotations

import asyncio
import socket
import struct
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dnslib import RCODE, DNSRecord

from geodns import static_state
from geodns.answer import Responder
from geodns.nearest import Locator
from geodns.pipeline import STAGES, UdpPipeline
from geodns.rrl import RateLimiter, RrlConfig
from geodns.stats import Stats
from geodns.udp import BatchUdp, ProtocolUdp, batch_supported
from geodns.wire import HEADER_LEN, MAX_QUERY_OCTETS

from .clients import query
from .conftest import ZONE, state_toml

CLIENT = b"\x7f\0\0\1"


@pytest.fixture(scope="module")
def locator(mmdb: Path) -> Locator:
    return Locator(mmdb)


def responder(locator: Locator, **kw: object) -> Responder:
    view = static_state.view_from(tomllib.loads(state_toml()), revision=7)
    return Responder(view, locator, Stats(), **kw)  # type: ignore[arg-type]


def pipeline(r: Responder, rrl: RrlConfig | None = None, **kw: object) -> UdpPipeline:
    return UdpPipeline(r, r.stats, RateLimiter(rrl) if rrl else None, lambda src: src, **kw)  # type: ignore[arg-type]


def rcode(wire: bytes | None) -> str:
    assert wire is not None, "no reply"
    return RCODE[DNSRecord.parse(wire).header.rcode]


def test_the_stage_order_is_one_list() -> None:
    assert [s.name for s in STAGES] == ["reply_cache", "answer", "stats", "rrl", "truncate", "fit"]


@pytest.mark.parametrize("kw, rrl, stages", [
    ({}, False, ("reply_cache", "answer", "stats", "fit")),
    ({}, True, ("reply_cache", "answer", "stats", "rrl", "truncate", "fit")),
    ({"reply_cache": False}, False, ("answer", "stats", "fit")),
    ({"log_queries": True}, True, ("answer", "stats", "rrl", "truncate", "fit")),  # every query is logged
    ({"cache_size": 0}, False, ("answer", "stats", "fit")),
])
def test_stages_on_for_the_settings(locator: Locator, kw: dict, rrl: bool, stages: tuple[str, ...]) -> None:
    p = pipeline(responder(locator, **kw), RrlConfig(rate=5) if rrl else None)
    assert p.stages == stages
    assert "def reply(data, src):" in p.source and "def reply_cut(data, src):" in p.source
    assert ("# -- reply_cache" in p.source) is ("reply_cache" in stages)


def test_reply_cache_hit_patches_the_id_and_counts_fast(locator: Locator) -> None:
    r = responder(locator)
    p = pipeline(r)
    wire = query(f"blog.{ZONE}", ecs="198.51.100.0/24", qid=1)
    first, second = p.reply(wire, CLIENT), p.reply(wire, CLIENT)  # kept on the second sight
    assert sum(r.stats.slow) == 2 and sum(r.stats.fast) == 0
    again = query(f"blog.{ZONE}", ecs="198.51.100.0/24", qid=0xBEEF)
    hit = p.reply(again, CLIENT)
    assert sum(r.stats.fast) == 1, "answered by the reply-cache stage"
    assert hit is not None and hit[:2] == b"\xbe\xef" and rcode(hit) == "NOERROR"
    assert first is not None and second is not None and hit[2:] in (first[2:], second[2:])


@pytest.mark.parametrize("wire, cut, want", [
    (query(f"shop.{ZONE}", ecs="203.0.113.0/24"), False, "NOERROR"),
    (query(f"nosuch.{ZONE}"), False, "NXDOMAIN"),
    (query("example.org"), False, "REFUSED"),
    (query(f"shop.{ZONE}")[:-3], False, "FORMERR"),  # cut short inside the OPT
    (struct.pack("!HHHHHH", 9, 0x2800, 1, 0, 0, 0) + query(f"shop.{ZONE}")[12:], False, "NOTIMP"),  # opcode 5
    (query(f"shop.{ZONE}")[:HEADER_LEN], True, "FORMERR"),  # the header of a datagram the kernel cut
    (struct.pack("!HHHHHH", 9, 0x8000, 1, 0, 0, 0), False, None),  # a response: not answered
    (b"\x01", False, None),  # shorter than a header
    (struct.pack("!HHHHHH", 9, 0x8000, 1, 0, 0, 0), True, None),
])
def test_each_packet_gets_its_answer_and_is_counted(locator: Locator, wire: bytes, cut: bool,
                                                    want: str | None) -> None:
    r = responder(locator)
    p = pipeline(r)
    out = (p.reply_cut if cut else p.reply)(wire, CLIENT)
    if want is None:
        assert out is None and sum(r.stats.slow) == 0 and r.stats.dropped == 1
        return
    assert rcode(out) == want and out is not None and out[:2] == wire[:2]
    assert sum(r.stats.slow) == 1 and sum(r.stats.fast) == 0
    assert r.stats.oversize == int(cut)


@pytest.mark.parametrize("slip, want", [
    # rate 1/s with a burst of one: the first reply is sent, every further one is limited
    (2, ["answer", None, "TC", None, "TC", None]),
    (1, ["answer", "TC", "TC", "TC", "TC", "TC"]),
    (0, ["answer", None, None, None, None, None]),
])
def test_rrl_drops_and_slips_after_the_answer_is_counted(locator: Locator, slip: int, want: list) -> None:
    r = responder(locator)
    p = pipeline(r, RrlConfig(rate=1, window=60, slip=slip))
    wire = query(f"shop.{ZONE}", ecs="203.0.113.0/24", qid=77)
    got = []
    for _ in want:
        out = p.reply(wire, CLIENT)
        if out is None:
            got.append(None)
            continue
        reply = DNSRecord.parse(out)
        assert reply.header.id == 77
        got.append("TC" if reply.header.tc and not reply.rr else "answer")
    assert got == want
    assert sum(r.stats.slow) + sum(r.stats.fast) == len(want), "a limited answer is still counted"
    assert r.stats.rrl == {"slip": want.count("TC"), "drop": want.count(None)}
    # another network keeps its own budget
    assert p.reply(wire, b"\x7f\0\1\1") is not None


def test_a_limited_cut_datagram_gets_nothing(locator: Locator) -> None:
    r = responder(locator)
    p = pipeline(r, RrlConfig(rate=1, window=60, slip=1))
    header = query(f"shop.{ZONE}")[:HEADER_LEN]
    assert rcode(p.reply_cut(header, CLIENT)) == "FORMERR"
    assert p.reply_cut(header, CLIENT) is None, "a slip needs the question, which was cut off"
    assert r.stats.rrl == {"slip": 1, "drop": 0}


def test_a_reply_longer_than_the_send_slot_is_dropped(locator: Locator) -> None:
    r = responder(locator)
    p = pipeline(r, max_reply=200)
    big = query(f"big.{ZONE}", payload=4096)  # forty gateways: over 200 octets
    assert p.reply(big, CLIENT) is None and r.stats.dropped == 1
    small = query(f"blog.{ZONE}", edns=False)
    assert rcode(p.reply(small, CLIENT)) == "NOERROR"


# -- both transports, one table -------------------------------------------------------------------

TABLE = [
    query(f"shop.{ZONE}", ecs="203.0.113.0/24", qid=1),
    query(f"shop.{ZONE}", ecs="203.0.113.0/24", qid=2),
    query(f"shop.{ZONE}", ecs="203.0.113.0/24", qid=3),  # a reply-cache hit by now
    query(f"BlOg.{ZONE}", qid=4),  # answered by the client's address (127.0.0.1)
    query(f"nosuch.{ZONE}", qid=5),
    query("example.org", qid=6),
    query(f"shop.{ZONE}", qid=7)[:-3],  # FORMERR
    struct.pack("!HHHHHH", 8, 0x8000, 1, 0, 0, 0),  # a response: nothing
    query(f"shop.{ZONE}", qid=9) + b"\0" * (MAX_QUERY_OCTETS + 100),  # over the limit: FORMERR from the header
    query(f"big.{ZONE}", qid=10, edns=False),  # over 512 octets: TC
    query(f"big.{ZONE}", qid=11, payload=4096),
]


def exchange(port: int, table: list[bytes], limited_src: str) -> list[bytes | None]:
    """Each packet from `limited_src`, then a marker query from an address of its own (127.0.1.i,
    a network RRL has not seen): once the marker's reply is back, the packet's reply (or nothing)
    is there too."""
    out: list[bytes | None] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((limited_src, 0))
        for i, wire in enumerate(table):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as marker:
                marker.bind((f"127.0.1.{i + 1}", 0))
                marker.settimeout(2.0)
                s.sendto(wire, ("127.0.0.1", port))
                marker.sendto(query(f"nosuch.{ZONE}", qid=60000 + i), ("127.0.0.1", port))
                assert marker.recv(4096)[:2] == struct.pack("!H", 60000 + i)
            s.setblocking(False)
            try:
                got: bytes | None = s.recv(65535)
            except BlockingIOError:
                got = None
            out.append(got)
    return out


async def serve_and_ask(kind: str, locator: Locator, table: list[bytes], rrl: RrlConfig | None) -> list[bytes | None]:
    r = responder(locator)
    limiter = RateLimiter(rrl) if rrl else None
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    port = sock.getsockname()[1]
    def frozen(transport: BatchUdp | ProtocolUdp, client_of: Callable[[Any], bytes]) -> None:
        """RRL's clock stands still: the budget does not refill while the table runs, however slowly."""
        transport.pipeline = UdpPipeline(r, r.stats, limiter, client_of, max_reply=transport.pipeline.max_reply,
                                         clock=lambda: 1000.0)

    if kind == "batch":
        reader = BatchUdp(sock, r, r.stats, limiter)
        frozen(reader, reader._client)
        reader.start(loop)
        try:
            return await asyncio.wait_for(asyncio.to_thread(exchange, port, table, "127.0.0.1"), 30)
        finally:
            reader.stop()
            sock.close()
    protocol = ProtocolUdp(r, r.stats, limiter)
    frozen(protocol, lambda addr: socket.inet_aton(addr[0]))
    transport, _ = await loop.create_datagram_endpoint(lambda: protocol, sock=sock)
    try:
        return await asyncio.wait_for(asyncio.to_thread(exchange, port, table, "127.0.0.1"), 30)
    finally:
        transport.close()


@pytest.mark.skipif(not batch_supported(), reason="recvmmsg batches need 64-bit Linux")
@pytest.mark.parametrize("rrl", [None, RrlConfig(rate=3, window=60, slip=2, ipv4_prefix=32)],
                         ids=["plain", "rrl"])
async def test_both_transports_give_the_same_bytes(locator: Locator, rrl: RrlConfig | None) -> None:
    batch = await serve_and_ask("batch", locator, TABLE, rrl)
    protocol = await serve_and_ask("protocol", locator, TABLE, rrl)
    assert batch == protocol
    # what the table expects, whichever transport
    codes = [None if w is None else (rcode(w), bool(DNSRecord.parse(w).header.tc)) for w in batch]
    if rrl is None:
        assert codes == [("NOERROR", False)] * 4 + [("NXDOMAIN", False), ("REFUSED", False), ("FORMERR", False),
                                                     None, ("FORMERR", False), ("NOERROR", True), ("NOERROR", False)]
    else:  # a burst of 3 replies, then every second limited one slips (TC, no records), the others are dropped
        # 4 dropped, 5 slips, 6 dropped, 7 (malformed) would slip but has no question to send back,
        # 8 (a response) is never answered, 9 (cut) dropped, 10 slips, 11 dropped
        assert codes == [("NOERROR", False)] * 3 + [None, ("NOERROR", True), None, None, None, None,
                                                    ("NOERROR", True), None]
        assert [w is None or DNSRecord.parse(w).rr == [] for w in batch[3:]] == [True] * 8
