"""Golden tests of the query parser: packets as hex, the parsed fields or the error class."""

from __future__ import annotations

import struct

import pytest
from dnslib import EDNS0, RR, A, DNSRecord

from geodns import wire
from geodns.wire import (
    BadClientSubnet,
    BadName,
    BadOpt,
    BadQuestionCount,
    NotAQuery,
    ShortMessage,
    TrailingJunk,
    parse_query,
)

# id 0x1234, no flags, App.Geo.Example.com A, no EDNS
PLAIN = "123400000001000000000000034170700347656f074578616d706c6503636f6d0000010001"
# id 0xabcd, shop.geo.example.com A, EDNS payload 1232, ECS 193.0.6.0/24
WITH_ECS = ("abcd000000010000000000010473686f700367656f076578616d706c6503636f6d000001000100002904d00000"
            "0000000b0008000700011800c10006")
# id 1, shop.geo.example.com AAAA, EDNS DO, ECS 2001:db8::/33
WITH_ECS6_DO = ("0001000000010000000000010473686f700367656f076578616d706c6503636f6d00001c000100002904d00000"
                "8000000d000800090002210020010db800")

HEADER_1Q_OPT = "abcd00000001000000000001"
QUESTION = "0473686f700367656f076578616d706c6503636f6d0000010001"


def opt(options_hex: str, payload: int = 1232, ttl: int = 0) -> str:
    body = bytes.fromhex(options_hex)
    return (b"\0" + struct.pack("!HHIH", 41, payload, ttl, len(body)) + body).hex()


def ecs(family: int, source: int, scope: int, addr_hex: str) -> str:
    body = struct.pack("!HBB", family, source, scope) + bytes.fromhex(addr_hex)
    return (struct.pack("!HH", 8, len(body)) + body).hex()


def test_plain_query_keeps_the_name_as_sent() -> None:
    q = parse_query(bytes.fromhex(PLAIN))
    assert (q.id, q.flags, q.qtype, q.qclass, q.edns) == (0x1234, 0, 1, 1, None)
    assert q.labels() == (b"App", b"Geo", b"Example", b"com")
    assert q.qname_lower == b"\x03app\x03geo\x07example\x03com\x00"
    assert q.question == bytes.fromhex(PLAIN)[12:]


def test_ecs_query() -> None:
    q = parse_query(bytes.fromhex(WITH_ECS))
    assert q.edns is not None and (q.edns.payload, q.edns.version, q.edns.do) == (1232, 0, False)
    assert q.edns.ecs == wire.ClientSubnet(1, 24, bytes([193, 0, 6]))
    assert q.edns.ecs.padded() == bytes([193, 0, 6, 0])
    assert q.edns.ecs.option(20).hex() == ecs(1, 24, 20, "c10006")


def test_ipv6_ecs_and_do_bit() -> None:
    q = parse_query(bytes.fromhex(WITH_ECS6_DO))
    assert q.qtype == 28 and q.edns is not None and q.edns.do
    assert q.edns.ecs == wire.ClientSubnet(2, 33, bytes.fromhex("20010db800"))


def test_small_payload_counts_as_512() -> None:
    q = parse_query(bytes.fromhex(HEADER_1Q_OPT + QUESTION + opt("", payload=100)))
    assert q.edns is not None and q.edns.payload == 512


def test_uncommon_shapes_go_through_dnslib_with_the_same_result() -> None:
    # an extra additional record next to the OPT: not the common shape
    m = DNSRecord.question("Shop.geo.example.com", "A")
    m.add_ar(RR("x.example.", rdata=A("192.0.2.1")))
    m.add_ar(EDNS0(udp_len=4096))
    q = parse_query(bytes(m.pack()))
    assert q.labels()[0] == b"Shop" and q.edns is not None and q.edns.payload == 4096
    # the question section is rebuilt uncompressed and parses back to the same name
    assert q.question.startswith(b"\x04Shop\x03geo")


@pytest.mark.parametrize("hexdata, error", [
    ("1234", NotAQuery),  # shorter than a header
    ("1234" + "8000" + "0001" + "0000" * 3 + QUESTION, NotAQuery),  # QR set: a response
    ("1234" + "0000" + "0000" + "0000" * 3, BadQuestionCount),
    ("1234" + "0000" + "0002" + "0000" * 3 + QUESTION * 2, BadQuestionCount),
    ("1234" + "0000" + "0001" + "0000" * 3 + "0473686f70", ShortMessage),  # name runs off the end
    ("1234" + "0000" + "0001" + "0000" * 3 + "0473686f7000" + "0001", ShortMessage),  # no qclass
    (PLAIN + "00", TrailingJunk),
    (HEADER_1Q_OPT + QUESTION + opt("") + "ff", TrailingJunk),
    ("1234" + "0000" + "0001" + "0000" * 3 + "40" + "61" * 64 + "00" + "00010001", BadName),  # 64-octet label
    ("1234" + "0000" + "0001" + "0000" * 3 + ("3f" + "61" * 63) * 4 + "00" + "00010001", BadName),  # > 255
    ("1234" + "0000" + "0001" + "0000" * 3 + "0161c00c" + "00010001", BadName),  # pointer loop
    (HEADER_1Q_OPT + QUESTION + "016100" + opt("")[2:], BadOpt),  # OPT owner not the root
    ("abcd00000001000000000002" + QUESTION + opt("") + opt(""), BadOpt),  # two OPT records
    (HEADER_1Q_OPT + QUESTION + opt("0008"), BadOpt),  # option header cut short
    (HEADER_1Q_OPT + QUESTION + opt("000a0010" + "00" * 4), BadOpt),  # option longer than rdata
    (HEADER_1Q_OPT + QUESTION + opt("")[:-4] + "0010", ShortMessage),  # rdlen past the end
    (HEADER_1Q_OPT + QUESTION + opt(ecs(3, 24, 0, "c10006")), BadClientSubnet),  # unknown family
    (HEADER_1Q_OPT + QUESTION + opt(ecs(1, 33, 0, "c1000601ff")), BadClientSubnet),  # prefix > 32
    (HEADER_1Q_OPT + QUESTION + opt(ecs(2, 129, 0, "20" * 17)), BadClientSubnet),  # prefix > 128
    (HEADER_1Q_OPT + QUESTION + opt(ecs(1, 24, 8, "c10006")), BadClientSubnet),  # scope in a query
    (HEADER_1Q_OPT + QUESTION + opt(ecs(1, 24, 0, "c1000600")), BadClientSubnet),  # too many octets
    (HEADER_1Q_OPT + QUESTION + opt(ecs(1, 24, 0, "c100")), BadClientSubnet),  # too few octets
    (HEADER_1Q_OPT + QUESTION + opt(ecs(1, 23, 0, "c10007")), BadClientSubnet),  # bits past /23
    (HEADER_1Q_OPT + QUESTION + opt(ecs(1, 24, 0, "c10006") + ecs(1, 24, 0, "c10006")), BadClientSubnet),
    (HEADER_1Q_OPT + QUESTION + opt("0008000101"), BadClientSubnet),  # shorter than family+prefixes
])
def test_refused_packets_raise_their_error(hexdata: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_query(bytes.fromhex(hexdata))


def test_every_form_error_is_a_form_error() -> None:
    for cls in (ShortMessage, TrailingJunk, BadName, BadQuestionCount, BadOpt, BadClientSubnet):
        assert issubclass(cls, wire.FormError)
    assert not issubclass(NotAQuery, wire.FormError)


def test_ecs_source_zero_has_no_address() -> None:
    q = parse_query(bytes.fromhex(HEADER_1Q_OPT + QUESTION + opt(ecs(1, 0, 0, ""))))
    assert q.edns is not None and q.edns.ecs == wire.ClientSubnet(1, 0, b"")


def test_unknown_options_are_ignored() -> None:
    cookie = struct.pack("!HH", 10, 8).hex() + "0102030405060708"
    q = parse_query(bytes.fromhex(HEADER_1Q_OPT + QUESTION + opt(cookie + ecs(1, 16, 0, "0808"))))
    assert q.edns is not None and q.edns.ecs == wire.ClientSubnet(1, 16, b"\x08\x08")


def test_opt_record_packing() -> None:
    assert wire.opt_record(1232).hex() == "0000290" + "4d0" + "00000000" + "0000"
    assert wire.opt_record(1232, 1, True).hex() == "00002904d0" + "01" + "00" + "8000" + "0000"
