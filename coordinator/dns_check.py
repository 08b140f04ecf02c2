"""Does every live GeoDNS server answer a TXT record yet? Asked before the CA validates a challenge.

`serves_txt(address, name, values, timeout)` sends one UDP query (dnslib, a random ID, EDNS with
a 1232-octet payload, no recursion) for `name` TXT to one server and says whether the answer is
exactly that set of values: the TXT RRs owned by the name, each RR's character-strings joined
(RFC 8555 section 8.4 reads a TXT record that way). Anything else is False: no reply within the
timeout, a reply that does not match the query (ID, question: ignored, the wait goes on), an
error rcode, a truncated reply, other values, a socket error; it never raises.
`wait_all_serve(addresses, name, values, deadline=..., interval=...)` asks every server until
each has served the set once or `deadline` seconds have passed, and returns the names of those
that had not (empty: all serve it). The servers are `Snapshot.dns_servers` (name -> "ip:port",
`coordinator.dns_servers`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import time
from collections.abc import Collection, Mapping

from dnslib import EDNS0, QTYPE, RCODE, DNSError, DNSHeader, DNSQuestion, DNSRecord

UDP_PAYLOAD = 1232


def _endpoint(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return str(ipaddress.ip_address(host)), int(port)


class _Reply(asyncio.DatagramProtocol):
    """Takes the first datagram that answers the query (same ID and question); drops the rest."""

    def __init__(self, query: DNSRecord) -> None:
        self.query = query
        self.done: asyncio.Future[DNSRecord | None] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if self.done.done():
            return
        try:
            reply = DNSRecord.parse(data)
        except (DNSError, ValueError, IndexError, KeyError, UnicodeError):
            return
        if (reply.header.id == self.query.header.id and reply.header.qr and len(reply.questions) == 1
                and str(reply.q.qname).lower() == str(self.query.q.qname).lower()
                and reply.q.qtype == QTYPE.TXT):
            self.done.set_result(reply)

    def error_received(self, exc: Exception) -> None:  # e.g. ICMP port unreachable
        if not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


def txt_values(reply: DNSRecord, name: str) -> set[str] | None:
    """The TXT values a reply gives `name` (None: not an answer one can use: an error rcode, or
    truncated)."""
    if reply.header.rcode != RCODE.NOERROR or reply.header.tc:
        return None
    owner = name.rstrip(".").lower()
    out = set()
    for rr in reply.rr:
        if rr.rtype == QTYPE.TXT and str(rr.rname).rstrip(".").lower() == owner:
            out.add(b"".join(rr.rdata.data).decode("ascii", "replace"))
    return out


async def serves_txt(address: str, name: str, values: Collection[str], timeout: float) -> bool:
    """Whether the server at `address` ("ip:port" or "[v6]:port") answers `name` TXT with exactly
    `values` within `timeout` seconds (see the module's docstring); never raises."""
    transport = None
    try:
        host, port = _endpoint(address)
        query = DNSRecord(DNSHeader(id=secrets.randbits(16), rd=0), q=DNSQuestion(name, QTYPE.TXT))
        query.add_ar(EDNS0(udp_len=UDP_PAYLOAD))
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_datagram_endpoint(lambda: _Reply(query), remote_addr=(host, port))
        transport.sendto(query.pack())
        reply = await asyncio.wait_for(protocol.done, timeout)
        if reply is None:
            return False
        return txt_values(reply, name) == set(values)
    except (OSError, ValueError, TimeoutError, DNSError):
        return False
    except Exception:  # noqa: BLE001 - a check says no rather than break the order that asked
        return False
    finally:
        if transport is not None:
            transport.close()


async def wait_all_serve(addresses: Mapping[str, str], name: str, values: Collection[str], *,
                         deadline: float, interval: float = 0.2) -> list[str]:
    """The servers (names of `addresses`: name -> address) that had not served `name` TXT with
    exactly `values` when `deadline` seconds had passed, sorted; empty when all serve it. Each
    server is asked every `interval` seconds until it has answered right once."""
    loop = asyncio.get_running_loop()
    end = time.monotonic() + max(0.0, deadline)
    pending = dict(addresses)
    want = frozenset(values)
    while pending:
        left = end - time.monotonic()
        if left <= 0:
            break
        timeout = max(0.05, min(1.0, left))
        started = loop.time()
        results = await asyncio.gather(*(serves_txt(addr, name, want, timeout) for addr in pending.values()))
        for server, ok in zip(list(pending), results, strict=True):
            if ok:
                del pending[server]
        if pending:
            pause = min(interval - (loop.time() - started), end - time.monotonic())
            if pause > 0:
                await asyncio.sleep(pause)
    return sorted(pending)
