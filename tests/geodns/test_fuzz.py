"""Fuzzing the running server: over 20,000 mutated and random packets over UDP (in batches) and
more over TCP. The server must stay up, answer every packet that can be answered, and every reply
must be a well-formed DNS message (checked by a strict parser written here, independent of the
server's code and of dnslib)."""

from __future__ import annotations

import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .clients import dig, query
from .conftest import ZONE

BATCH = 200
UDP_EXAMPLES = 110  # x BATCH = 22,000 packets
SENT = {"udp": 0, "tcp": 0}
SOURCES = [0]  # TCP source addresses used (127.1.x.y)

SEEDS = [
    query(f"shop.{ZONE}", edns=False),
    query(f"shop.{ZONE}", ecs="193.0.6.0/24"),
    query(f"ShOp-443s.{ZONE}", "AAAA", ecs="2001:db8:1::/48", do=True),
    query(f"big.{ZONE}", edns=False),
    query(ZONE, "NS"),
    query(ZONE, "ANY", payload=512),
    query(f"nosuch.{ZONE}", "MX"),
    query("www.example.org", "A", ecs="8.8.8.0/24"),
    query(f"gw.us-east.{ZONE}", "A", ecs="0.0.0.0/0"),
    bytes.fromhex("abcd0000000100000000000104736f6d650000010001" + "00002904d000000000000b0008000700031800c10006"),
]


def strict_parse(msg: bytes) -> tuple[int, int]:
    """(id, flags) of a well-formed DNS message; AssertionError naming the defect otherwise."""
    assert len(msg) >= 12, "shorter than a header"
    ident, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", msg)
    pos = 12

    def name(at: int) -> int:
        """Skip a name at `at`; returns the offset after it. Pointers must point backwards."""
        end_of_name = None
        hops = 0
        total = 0
        while True:
            assert at < len(msg), "name runs off the end"
            n = msg[at]
            if n & 0xC0 == 0xC0:
                assert at + 1 < len(msg), "pointer cut short"
                target = ((n & 0x3F) << 8) | msg[at + 1]
                assert target < at, "pointer does not point backwards"
                if end_of_name is None:
                    end_of_name = at + 2
                hops += 1
                assert hops < 64, "pointer chain too long"
                at = target
                continue
            assert n <= 63, f"label length {n}"
            total += n + 1
            assert total <= 255, "name longer than 255 octets"
            if n == 0:
                return end_of_name if end_of_name is not None else at + 1
            at += 1 + n

    for _ in range(qd):
        pos = name(pos) + 4
        assert pos <= len(msg), "question cut short"
    for _ in range(an + ns + ar):
        pos = name(pos)
        assert pos + 10 <= len(msg), "record header cut short"
        rdlen = struct.unpack_from("!H", msg, pos + 8)[0]
        pos += 10 + rdlen
        assert pos <= len(msg), "rdata cut short"
    assert pos == len(msg), f"{len(msg) - pos} octets of trailing junk"
    return ident, flags


def answerable(packet: bytes) -> bool:
    """What the server must reply to: a header's worth of bytes with QR clear (at most 4096)."""
    return 12 <= len(packet) <= 4096 and not packet[2] & 0x80


def closes(packet: bytes) -> bool:
    """What the server answers (FORMERR) and then closes a TCP connection after: a message no
    query can be -- over 1024 octets, or a query (QR clear, opcode 0) with answer or authority
    records or more than two additional records."""
    if len(packet) > 1024:
        return True
    if len(packet) < 12:
        return False
    flags, _, an, ns, ar = struct.unpack_from("!HHHHH", packet, 2)
    return not flags & 0xF800 and bool(an or ns or ar > 2)


def mutate(seed: bytes, edits: list[tuple[int, int]], cut: int, junk: bytes) -> bytes:
    data = bytearray(seed)
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut:
        data = data[:cut % (len(data) + 1)]
    return bytes(data) + junk


def valid(label: str, qtype: str, v4: int, prefix: int, case: int, do: bool, qid: int) -> bytes:
    name = "".join(ch.upper() if case >> (i % 31) & 1 else ch for i, ch in enumerate(f"{label}.{ZONE}"))
    net = socket.inet_ntoa(((v4 >> (32 - prefix) << (32 - prefix)) if prefix else 0).to_bytes(4, "big"))
    return query(name, qtype, ecs=f"{net}/{prefix}", do=do, qid=qid)


packets = st.one_of(
    st.builds(valid, st.sampled_from(["shop", "shop-443s", "blog", "big", "nosuch", "gw.eu-central", "orphan"]),
              st.sampled_from(["A", "AAAA", "ANY", "MX", "NS", "SOA"]), st.integers(0, 2**32 - 1),
              st.integers(0, 32), st.integers(0, 2**31 - 1), st.booleans(), st.integers(0, 65535)),
    st.binary(min_size=0, max_size=300),  # noise
    st.builds(lambda head, tail: head + tail,  # a plausible header, random rest
              st.sampled_from([s[:12] for s in SEEDS]), st.binary(max_size=300)),
    st.builds(mutate, st.sampled_from(SEEDS),
              st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6),
              st.integers(0, 400), st.binary(max_size=8)),
    st.builds(lambda s, qd, an, ns, ar: s[:4] + struct.pack("!HHHH", qd, an, ns, ar) + s[12:],  # lying counts
              st.sampled_from(SEEDS), st.integers(0, 3), st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)),
)


def exchange_udp(port: int, batch: list[bytes]) -> list[bytes]:
    want = sum(1 for p in batch if answerable(p))
    replies: list[bytes] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        s.connect(("127.0.0.1", port))
        for p in batch:
            s.send(p)
        s.settimeout(2.0)
        try:
            while len(replies) < want:
                replies.append(s.recv(65535))
        except TimeoutError:
            pass
    return replies


@settings(max_examples=UDP_EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(batch=st.lists(packets, min_size=BATCH, max_size=BATCH))
def test_udp_fuzz(static_dns, batch: list[bytes]) -> None:
    replies = exchange_udp(static_dns.port, batch)
    SENT["udp"] += len(batch)
    want = sum(1 for p in batch if answerable(p))
    assert len(replies) == want, f"{want - len(replies)} answerable packets got no reply"
    ids = {struct.unpack_from("!H", p)[0] for p in batch if answerable(p)}
    for r in replies:
        ident, flags = strict_parse(r)
        assert flags & 0x8000 and ident in ids


@settings(max_examples=15, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(batch=st.lists(packets.filter(lambda p: 0 < len(p)), min_size=100, max_size=100))
def test_tcp_fuzz(static_dns, batch: list[bytes]) -> None:
    SENT["tcp"] += len(batch)
    # the server closes a connection after a message no query can be (its FORMERR first) and
    # refuses that client's new connections for a while: the batch goes in pieces, each ending
    # with such a message, each on a connection from its own loopback address
    pieces: list[list[bytes]] = [[]]
    for p in batch:
        pieces[-1].append(p)
        if closes(p):
            pieces.append([])
    for piece in filter(None, pieces):
        SOURCES[0] += 1
        source = f"127.1.{SOURCES[0] // 250 % 250}.{SOURCES[0] % 250 + 1}"
        with socket.create_connection(("127.0.0.1", static_dns.port), timeout=5, source_address=(source, 0)) as s:
            s.sendall(b"".join(struct.pack("!H", len(p)) + p for p in piece))
            s.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        got = []
        pos = 0
        while pos < len(data):
            n = struct.unpack_from("!H", data, pos)[0]
            got.append(data[pos + 2:pos + 2 + n])
            pos += 2 + n
        assert pos == len(data)
        answerable_ids = [struct.unpack_from("!H", p)[0] for p in piece if answerable(p)]
        assert [strict_parse(r)[0] for r in got] == answerable_ids  # one reply each, in order


def test_fuzz_volume_and_server_still_serving(static_dns) -> None:
    if SENT["udp"] == 0:
        pytest.skip("run together with the fuzz tests above")
    assert SENT["udp"] >= 20_000, SENT
    assert static_dns.alive()
    deadline = time.monotonic() + 5
    while dig(static_dns.port, f"shop.{ZONE}", subnet="193.0.6.0/24").addresses() != {"192.0.2.20"}:
        assert time.monotonic() < deadline
    assert "Traceback" not in static_dns.log()
