"""DNS wire format for queries: the typed parse errors, the parsed `Query`, and the OPT record.

`parse_query(data)` turns the bytes of one DNS message into a `Query` or raises a subclass of
`FormError` (each maps to FORMERR) or `NotAQuery` (the message is dropped: too short to answer,
or itself a response). Before anything is decoded, the header alone refuses what no query needs
and what would make decoding expensive: a message over `MAX_QUERY_OCTETS` (`QueryTooLarge`),
answer or authority records, or more than `MAX_ADDITIONAL` additional records
(`UnexpectedRecords`). The common shape -- one uncompressed question, no answer or authority
records, at most one additional record that is an OPT -- is decoded straight from the bytes;
every other shape goes through dnslib's parser, so both give the same `Query`. EDNS (RFC 6891)
and Client Subnet (RFC 7871) are validated here, once, with the RFC's reasons in the messages.
`opt_record` packs the OPT pseudo-record of a reply. No I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dnslib import QTYPE, RR, DNSBuffer, DNSHeader, DNSQuestion

# -- constants --------------------------------------------------------------------------------

HEADER_LEN = 12
QR = 0x8000
AA = 0x0400
TC = 0x0200
RD = 0x0100
CD = 0x0010
OPCODE_MASK = 0x7800
OPCODE_QUERY = 0

RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4
RCODE_REFUSED = 5
RCODE_BADVERS = 16  # extended: upper 8 bits live in the OPT record

RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED",
               16: "BADVERS"}

TYPE_A = 1
TYPE_NS = 2
TYPE_SOA = 6
TYPE_TXT = 16
TYPE_AAAA = 28
TYPE_OPT = 41
TYPE_IXFR = 251
TYPE_AXFR = 252
TYPE_ANY = 255
CLASS_IN = 1
CLASS_ANY = 255

OPTION_ECS = 8
ECS_FAMILY_IPV4 = 1
ECS_FAMILY_IPV6 = 2
ECS_MAX_PREFIX = {ECS_FAMILY_IPV4: 32, ECS_FAMILY_IPV6: 128}
ECS_ADDR_LEN = {ECS_FAMILY_IPV4: 4, ECS_FAMILY_IPV6: 16}

OPTION_COOKIE = 10
OPTION_PADDING = 12
KNOWN_OPTIONS = frozenset((OPTION_ECS, OPTION_COOKIE, OPTION_PADDING))  # see Edns.other_options

DO_BIT = 0x8000
MIN_UDP_PAYLOAD = 512
MAX_NAME_WIRE = 255
# the largest query answered: 512 octets (a 255-octet name fits with room to spare) plus 512 for
# EDNS (OPT 11, Client Subnet 24, cookie 44, padding to a 128-octet block, a TSIG)
MAX_QUERY_OCTETS = 1024
MAX_ADDITIONAL = 2  # an OPT and a TSIG or SIG(0)

_H = struct.Struct("!H")
_HEADER = struct.Struct("!HHHHHH")
_QTAIL = struct.Struct("!HH")
_OPT_FIXED = struct.Struct("!HHBBHH")  # type, class(payload), ext-rcode, version, flags, rdlen
_OPTION = struct.Struct("!HH")


# -- errors -----------------------------------------------------------------------------------


class WireError(Exception):
    """Base class of everything `parse_query` refuses."""


class NotAQuery(WireError):
    """Nothing can be answered: shorter than a header, or a response (QR set). Dropped."""


class FormError(WireError):
    """The message is malformed (-> FORMERR)."""


class ShortMessage(FormError):
    """The message ends inside a name, a question or a record."""


class TrailingJunk(FormError):
    """Bytes follow the last record announced by the header."""


class BadName(FormError):
    """A name is longer than 255 octets, has a label longer than 63, or a bad pointer."""


class BadQuestionCount(FormError):
    """A query must carry exactly one question (RFC 9619)."""


class BadOpt(FormError):
    """The OPT record breaks RFC 6891 (not at the root, more than one, truncated options)."""


class BadClientSubnet(FormError):
    """The Client Subnet option breaks RFC 7871 section 6."""


class QueryTooLarge(FormError):
    """The message is longer than any query needs (MAX_QUERY_OCTETS); it is not decoded."""


class UnexpectedRecords(FormError):
    """A query carries answer or authority records, or more than MAX_ADDITIONAL additional ones."""


# -- values -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientSubnet:
    """An ECS option as received: family 1 (IPv4) or 2 (IPv6), the source prefix, and the
    address bytes exactly as sent (ceil(source/8) octets)."""

    family: int
    source: int
    address: bytes

    def padded(self) -> bytes:
        """The address widened to 4 or 16 octets."""
        return self.address.ljust(ECS_ADDR_LEN[self.family], b"\0")

    def option(self, scope: int) -> bytes:
        """The option for a reply: family, source prefix and address echoed, `scope` set."""
        body = struct.pack("!HBB", self.family, self.source, scope) + self.address
        return _OPTION.pack(OPTION_ECS, len(body)) + body


@dataclass(frozen=True, slots=True)
class Edns:
    payload: int  # requestor's UDP payload size, at least 512
    version: int
    do: bool
    ecs: ClientSubnet | None = None
    other_options: bool = False  # an option other than Client Subnet, cookie or padding


@dataclass(frozen=True, slots=True)
class Query:
    id: int
    flags: int
    qname: bytes  # wire form as received (case kept), uncompressed
    qtype: int
    qclass: int
    question: bytes  # the question section to copy into the reply
    edns: Edns | None

    @property
    def opcode(self) -> int:
        return (self.flags & OPCODE_MASK) >> 11

    @property
    def qname_lower(self) -> bytes:
        # length octets are <= 63 and therefore never inside A-Z: lowering is safe on the wire
        return self.qname.lower()

    def labels(self) -> tuple[bytes, ...]:
        """The labels of the name as received (case kept), root excluded."""
        return name_labels(self.qname)


def name_labels(name: bytes) -> tuple[bytes, ...]:
    """The labels of an uncompressed wire-format name that ends with the root (as `Query.qname`
    holds it), root excluded."""
    out = []
    i = 0
    while name[i]:
        n = name[i]
        out.append(name[i + 1:i + 1 + n])
        i += 1 + n
    return tuple(out)


# -- parsing ----------------------------------------------------------------------------------


def header_of(data: bytes) -> tuple[int, int]:
    """(id, flags) of a message that is long enough to have a header; else NotAQuery."""
    if len(data) < HEADER_LEN:
        raise NotAQuery(f"{len(data)} octets is shorter than a DNS header")
    ident, flags = struct.unpack_from("!HH", data)
    if flags & QR:
        raise NotAQuery("QR is set: the message is a response")
    return ident, flags


def parse_query(data: bytes) -> Query:
    """Parse one DNS query. Raises NotAQuery (drop) or a FormError subclass (FORMERR)."""
    ident, flags = header_of(data)
    if len(data) > MAX_QUERY_OCTETS:
        raise QueryTooLarge(f"{len(data)} octets, a query is at most {MAX_QUERY_OCTETS}")
    _, _, qd, an, ns, ar = _HEADER.unpack_from(data)
    if qd != 1:
        raise BadQuestionCount(f"QDCOUNT is {qd}, a query carries exactly one question")
    if an or ns:
        raise UnexpectedRecords(f"ANCOUNT {an}, NSCOUNT {ns}: a query carries no answer or authority records")
    if ar > MAX_ADDITIONAL:
        raise UnexpectedRecords(f"ARCOUNT {ar}: a query carries at most {MAX_ADDITIONAL} additional records")
    if ar <= 1:
        query = _parse_common(data, ident, flags, ar)
        if query is not None:
            return query
    return _parse_general(data, ident, flags)


def _parse_common(data: bytes, ident: int, flags: int, ar: int) -> Query | None:
    """The common shape, straight from the bytes; None when the shape is not the common one
    (a compressed question name, or an additional record that is not an OPT)."""
    end = len(data)
    i = HEADER_LEN
    while True:
        if i >= end:
            raise ShortMessage("the message ends inside the question name")
        n = data[i]
        if n == 0:
            i += 1
            break
        if n > 63:
            return None  # a pointer (or an extended label type): let dnslib decide
        i += 1 + n
        if i - HEADER_LEN > MAX_NAME_WIRE:
            raise BadName("the question name is longer than 255 octets")
    if i - HEADER_LEN > MAX_NAME_WIRE:
        raise BadName("the question name is longer than 255 octets")
    qend = i + 4
    if qend > end:
        raise ShortMessage("the message ends inside the question")
    qtype, qclass = _QTAIL.unpack_from(data, i)
    qname = data[HEADER_LEN:i]
    edns = None
    if ar:
        # an OPT at the root: 0x00, type 41, class, ttl, rdlen, options
        if qend + 11 > end:
            raise ShortMessage("the message ends inside the additional record")
        if data[qend] != 0 or _H.unpack_from(data, qend + 1)[0] != TYPE_OPT:
            return None
        rtype, payload, ext_rcode, version, eflags, rdlen = _OPT_FIXED.unpack_from(data, qend + 1)
        if qend + 11 + rdlen != end:
            if qend + 11 + rdlen > end:
                raise ShortMessage("the message ends inside the OPT record's data")
            raise TrailingJunk(f"{end - qend - 11 - rdlen} octets follow the last record")
        edns = _edns(payload, version, eflags, data[qend + 11:end])
    elif qend != end:
        raise TrailingJunk(f"{end - qend} octets follow the question")
    return Query(ident, flags, qname, qtype, qclass, data[HEADER_LEN:qend], edns)


def _parse_general(data: bytes, ident: int, flags: int) -> Query:
    """Any other shape, through dnslib's parser (names with pointers, several records)."""
    buf = DNSBuffer(data)
    try:
        header = DNSHeader.parse(buf)
        question = DNSQuestion.parse(buf)
        records = [RR.parse(buf) for _ in range(header.a + header.auth + header.ar)]
    except RecursionError:
        raise BadName("a name's compression pointers nest too deep") from None
    except Exception as exc:  # dnslib raises DNSError, BufferError, ValueError, ...
        if "pointer" in str(exc).lower() or "label" in str(exc).lower():
            raise BadName(f"bad name: {exc}") from None
        raise ShortMessage(f"cannot decode the message: {exc}") from None
    if buf.offset != len(data):
        raise TrailingJunk(f"{len(data) - buf.offset} octets follow the last record")
    labels = question.qname.label
    qname = b"".join(bytes([len(label)]) + label for label in labels) + b"\0"
    if any(len(label) > 63 for label in labels):
        raise BadName("a label of the question name is longer than 63 octets")
    if len(qname) > MAX_NAME_WIRE:
        raise BadName("the question name is longer than 255 octets")
    opts = [(pos, rr) for pos, rr in enumerate(records) if rr.rtype == QTYPE.OPT]
    edns = None
    if opts:
        if len(opts) > 1:
            raise BadOpt("more than one OPT record (RFC 6891 section 6.1.1)")
        pos, rr = opts[0]
        if pos < header.a + header.auth:
            raise BadOpt("an OPT record outside the additional section")
        if rr.rname.label:
            raise BadOpt("the OPT record's owner is not the root")
        raw = b"".join(_OPTION.pack(o.code, len(o.data)) + o.data for o in rr.rdata)
        edns = _edns(rr.rclass, (rr.ttl >> 16) & 0xFF, rr.ttl & 0xFFFF, raw)
    qtail = _QTAIL.pack(question.qtype, question.qclass)
    return Query(ident, flags, qname, question.qtype, question.qclass, qname + qtail, edns)


def _edns(payload: int, version: int, eflags: int, options: bytes) -> Edns:
    ecs = None
    other = False
    i = 0
    end = len(options)
    while i < end:
        if i + 4 > end:
            raise BadOpt("the OPT record's data ends inside an option header")
        code, length = _OPTION.unpack_from(options, i)
        i += 4
        if i + length > end:
            raise BadOpt(f"option {code} is longer than the OPT record's data")
        if code == OPTION_ECS:
            if ecs is not None:
                raise BadClientSubnet("more than one Client Subnet option")
            ecs = _client_subnet(options[i:i + length])
        elif code not in KNOWN_OPTIONS:
            other = True
        i += length
    return Edns(max(payload, MIN_UDP_PAYLOAD), version, bool(eflags & DO_BIT), ecs, other)


def _client_subnet(body: bytes) -> ClientSubnet:
    if len(body) < 4:
        raise BadClientSubnet("the option is shorter than family and prefix lengths")
    family, source, scope = struct.unpack_from("!HBB", body)
    if family not in ECS_MAX_PREFIX:
        raise BadClientSubnet(f"family {family} is neither 1 (IPv4) nor 2 (IPv6)")
    if source > ECS_MAX_PREFIX[family]:
        raise BadClientSubnet(f"source prefix {source} is longer than the address")
    if scope != 0:
        raise BadClientSubnet(f"scope prefix is {scope}, queries must send 0")
    address = body[4:]
    if len(address) != (source + 7) // 8:
        raise BadClientSubnet(f"{len(address)} address octets for a /{source} source prefix, "
                              f"RFC 7871 wants exactly {(source + 7) // 8}")
    if source % 8 and address[-1] & (0xFF >> (source % 8)):
        raise BadClientSubnet(f"address bits beyond the /{source} source prefix are set")
    return ClientSubnet(family, source, address)


# -- building ---------------------------------------------------------------------------------


def opt_record(payload: int, ext_rcode: int = 0, do: bool = False, options: bytes = b"") -> bytes:
    """The OPT pseudo-record of a reply (version 0)."""
    return b"\0" + _OPT_FIXED.pack(TYPE_OPT, payload, ext_rcode, 0, DO_BIT if do else 0, len(options)) + options


def pack_header(ident: int, flags: int, qd: int, an: int, ns: int, ar: int) -> bytes:
    return _HEADER.pack(ident, flags, qd, an, ns, ar)
