"""TXT look-ups through a recursive resolver: the DNS messages (pure) and their transport (asyncio).

`make_query(name, qid)` builds a TXT query (recursion desired, EDNS0 with a 1232-byte payload);
`read_reply(name, qid, wire)` checks a reply against it (ID, QR, the question echoed, case
ignored) and returns the TXT values at the name (`TxtRecords`: each record's strings joined,
following a CNAME chain in the answer, at most `MAX_CHAIN` links; its TTL the least of the
records'), a negative answer (`NoTxt`: NXDOMAIN or NODATA, with the negative TTL of the SOA in the
authority section, RFC 2308: the least of its TTL and its MINIMUM), or `TRUNCATED`. Anything else
raises `ResolverError` naming the fault (`reason` is a short label: `servfail`, `refused`, any
other rcode's name in lower case, `bad_reply`, `timeout`, `network`); dnslib does the wire format.

`TxtResolver.query(name)` is the glue: UDP from a fresh socket (a random source port) with a
random 16-bit ID, replies that do not match ignored (a spoofed or stale datagram cannot end the
wait), `attempts` tries of `timeout` seconds each; a truncated reply is asked again over TCP
(one try, `timeout` for the whole exchange). No call waits longer than `attempts * timeout` plus
one TCP `timeout`, and no lock or shared state is held while it waits.
"""

from __future__ import annotations

import asyncio
import secrets
import struct
from dataclasses import dataclass
from typing import Any

from dnslib import EDNS0, QTYPE, RCODE, DNSHeader, DNSQuestion, DNSRecord

from geomesh.app_address import OWNERS, owner_name

EDNS_PAYLOAD = 1232  # the DNS flag day 2020 size: no IP fragmentation
UDP_RECEIVE = 4096
MAX_CHAIN = 8  # CNAME links followed inside one answer
MAX_VALUES = 64  # TXT values kept from one answer (the caller refuses more than a handful anyway)


class ResolverError(Exception):
    """The resolver gave no usable answer; `reason` is a short label, the message says more."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class TxtRecords:
    values: tuple[bytes, ...]  # one per TXT record, its character-strings joined
    ttl: int  # seconds: the least TTL of the records and the CNAMEs leading to them


@dataclass(frozen=True, slots=True)
class NoTxt:
    nxdomain: bool  # True: the name does not exist; False: it exists without TXT (NODATA)
    ttl: int | None  # the negative TTL from the SOA in the authority section; None: no SOA given


class _Truncated:
    __slots__ = ()


TRUNCATED = _Truncated()


def make_query(name: str, qid: int) -> bytes:
    """The wire form of a TXT/IN query for `name`, recursion desired, with an EDNS0 OPT record."""
    q = DNSRecord(DNSHeader(id=qid, rd=1), q=DNSQuestion(name, QTYPE.TXT))
    q.add_ar(EDNS0(udp_len=EDNS_PAYLOAD))
    return q.pack()


def read_reply(name: str, qid: int, wire: bytes) -> TxtRecords | NoTxt | _Truncated:
    """A reply to `make_query(name, qid)` -> the TXT values, a negative answer, or TRUNCATED.

    Raises `ResolverError` for a reply that is not one to that query (the transport ignores those
    and waits on) or one with an error rcode."""
    try:
        msg = DNSRecord.parse(wire)
    except Exception as exc:  # dnslib raises several types for hostile bytes; all mean the same here
        raise ResolverError("bad_reply", f"unparsable reply: {exc}") from None
    h = msg.header
    if h.id != qid or not h.qr:
        raise ResolverError("bad_reply", "a reply with another ID, or not a reply")
    if len(msg.questions) != 1 or msg.q.qtype != QTYPE.TXT or msg.q.qname != name:
        raise ResolverError("bad_reply", "a reply to another question")
    if h.tc:
        return TRUNCATED
    if h.rcode not in (RCODE.NOERROR, RCODE.NXDOMAIN):
        rcode = RCODE.get(h.rcode, str(h.rcode))
        raise ResolverError(str(rcode).lower(), f"the resolver answered {rcode} for {name}")
    chain = {str(msg.q.qname).lower()}
    ttl: int | None = None
    for _ in range(MAX_CHAIN):  # the CNAMEs from the name, in any order in the section
        grew = False
        for rr in msg.rr:
            if rr.rtype == QTYPE.CNAME and str(rr.rname).lower() in chain:
                target = str(rr.rdata.label).lower()
                if target not in chain:
                    chain.add(target)
                    ttl = rr.ttl if ttl is None else min(ttl, rr.ttl)
                    grew = True
        if not grew:
            break
    values: list[bytes] = []
    for rr in msg.rr:
        if rr.rtype == QTYPE.TXT and str(rr.rname).lower() in chain and len(values) < MAX_VALUES:
            values.append(b"".join(rr.rdata.data))
            ttl = rr.ttl if ttl is None else min(ttl, rr.ttl)
    if values:
        return TxtRecords(tuple(values), ttl or 0)
    negative = None
    for rr in msg.auth:
        if rr.rtype == QTYPE.SOA:
            negative = min(rr.ttl, rr.rdata.times[4])
            break
    return NoTxt(h.rcode == RCODE.NXDOMAIN, negative)


Answer = TxtRecords | NoTxt | ResolverError  # one record name's outcome


async def ask_owners(resolver: TxtResolver, host: str) -> dict[str, Answer]:
    """The app-address records of `host` (`geomesh.app_address.OWNERS`: geomesh's and the seed's
    names), asked at once; a failed query is its `ResolverError`, never raised. An owner whose name
    would be too long for DNS is not asked (absent from the result)."""
    names = [(owner, name) for owner in OWNERS if (name := owner_name(owner, host)) is not None]

    async def ask(name: str) -> Answer:
        try:
            return await resolver.query(name)
        except ResolverError as exc:
            return exc

    got = await asyncio.gather(*(ask(name) for _, name in names))
    return dict(zip((owner for owner, _ in names), got, strict=True))


class TxtResolver:
    """Asks one recursive resolver for TXT records (see the module doc for the bounds)."""

    def __init__(self, server: tuple[str, int], timeout: float = 1.0, attempts: int = 2) -> None:
        self.server = server
        self.timeout = timeout
        self.attempts = attempts

    async def query(self, name: str) -> TxtRecords | NoTxt:
        """The TXT records at `name`, or a negative answer; raises `ResolverError`."""
        last = ResolverError("timeout", f"no answer from the resolver {self._where} for {name} "
                                        f"after {self.attempts} tries of {self.timeout:g}s")
        for _ in range(self.attempts):
            qid = secrets.randbits(16)
            try:
                found = await self._udp(name, qid)
            except ResolverError as exc:
                if exc.reason != "timeout":
                    raise
                continue
            if found is TRUNCATED:
                return await self._tcp(name, secrets.randbits(16))
            return found  # type: ignore[return-value]
        raise last

    @property
    def max_wait(self) -> float:
        """The longest `query` can take: every UDP try, then the TCP one."""
        return self.timeout * (self.attempts + 1)

    @property
    def _where(self) -> str:
        host, port = self.server
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def _udp(self, name: str, qid: int) -> TxtRecords | NoTxt | _Truncated:
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Datagrams(name, qid, done), remote_addr=self.server)
        except OSError as exc:
            raise ResolverError("network", f"cannot reach the resolver {self._where}: {exc}") from None
        try:
            transport.sendto(make_query(name, qid))
            return await asyncio.wait_for(done, self.timeout)
        except TimeoutError:
            raise ResolverError("timeout", f"no answer from the resolver {self._where} for {name} "
                                           f"within {self.timeout:g}s") from None
        finally:
            transport.close()

    async def _tcp(self, name: str, qid: int) -> TxtRecords | NoTxt:
        try:
            return await asyncio.wait_for(self._tcp_exchange(name, qid), self.timeout)
        except TimeoutError:
            raise ResolverError("timeout", f"no TCP answer from the resolver {self._where} for {name} "
                                           f"within {self.timeout:g}s") from None
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise ResolverError("network", f"TCP to the resolver {self._where} failed: {exc}") from None

    async def _tcp_exchange(self, name: str, qid: int) -> TxtRecords | NoTxt:
        reader, writer = await asyncio.open_connection(*self.server)
        try:
            query = make_query(name, qid)
            writer.write(struct.pack("!H", len(query)) + query)
            (size,) = struct.unpack("!H", await reader.readexactly(2))
            found = read_reply(name, qid, await reader.readexactly(size))
        finally:
            writer.close()
        if found is TRUNCATED:
            raise ResolverError("bad_reply", f"a truncated reply over TCP for {name}")
        return found  # type: ignore[return-value]


class _Datagrams(asyncio.DatagramProtocol):
    """Waits for the first datagram that answers the query; others are dropped."""

    def __init__(self, name: str, qid: int, done: asyncio.Future) -> None:
        self.name = name
        self.qid = qid
        self.done = done

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.done.done():
            return
        try:
            found = read_reply(self.name, self.qid, data)
        except ResolverError as exc:
            if exc.reason == "bad_reply":  # not ours (spoofed, stale): keep waiting for the real one
                return
            self.done.set_exception(exc)
            return
        self.done.set_result(found)

    def error_received(self, exc: Exception) -> None:  # ICMP port unreachable and the like
        if not self.done.done():
            self.done.set_exception(ResolverError("network", f"the resolver is unreachable: {exc}"))
