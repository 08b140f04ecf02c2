"""What answers a CA's challenge checks in the ACME tests: a tiny authoritative DNS and HTTP server.

`ChallengeDns` is an asyncio UDP server on 127.0.0.1:0 (dnslib for the wire format) that answers
TXT from `txt` and A from `a`, authoritatively; a name in neither is NXDOMAIN, a known name
without the asked type is an empty NOERROR. It is the DNS pebble validates against (`-dnsserver`),
standing in for geomesh-dns, so a DNS-01 `publish` callback fills `txt`. `ChallengeHttp` serves
`GET /.well-known/acme-challenge/<token>` from `tokens` on a given loopback port (pebble's
`httpPort`) with asyncio streams: 200 and the key authorization, else 404. Both record what they
were asked, and both bound what they read (a datagram is parsed once; a request head is at most
8 KiB and 5 s).
"""

from __future__ import annotations

import asyncio

from dnslib import QTYPE, RCODE, RR, DNSRecord
from dnslib import TXT as TxtRecord
from dnslib import A as ARecord

ACME_PATH = "/.well-known/acme-challenge/"


class ChallengeDns(asyncio.DatagramProtocol):
    """An authoritative UDP DNS for the tests' names (see the module's docstring)."""

    def __init__(self) -> None:
        self.txt: dict[str, tuple[str, ...]] = {}
        self.a: dict[str, str] = {}
        self.queries: list[tuple[str, str]] = []
        self.transport: asyncio.DatagramTransport | None = None

    async def start(self) -> str:
        """Listen on 127.0.0.1:0; returns "127.0.0.1:<port>"."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=("127.0.0.1", 0))
        self.transport = transport  # type: ignore[assignment]
        return f"127.0.0.1:{transport.get_extra_info('sockname')[1]}"

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            query = DNSRecord.parse(data)
        except Exception:  # garbage: no answer, as a real server would drop it
            return
        if self.transport is not None:
            self.transport.sendto(self.answer(query).pack(), addr)

    def answer(self, query: DNSRecord) -> DNSRecord:
        reply = query.reply(aa=1)
        name = str(query.q.qname).rstrip(".").lower()
        qtype = QTYPE[query.q.qtype]
        self.queries.append((name, qtype))
        if name not in self.txt and name not in self.a:
            reply.header.rcode = RCODE.NXDOMAIN
        elif qtype == "TXT":
            for value in self.txt.get(name, ()):
                reply.add_answer(RR(query.q.qname, QTYPE.TXT, rdata=TxtRecord(value), ttl=0))
        elif qtype == "A" and name in self.a:
            reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=ARecord(self.a[name]), ttl=0))
        return reply


class ChallengeHttp:
    """An HTTP/1.1 server for ACME HTTP-01 tokens on 127.0.0.1:`port` (see the module's docstring)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.tokens: dict[str, str] = {}
        self.requests: list[tuple[str, str]] = []  # (Host, path)
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, limit=8192)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            host = next((v.strip() for k, _, v in (h.partition(":") for h in lines[1:])
                         if k.lower() == "host"), "")
            self.requests.append((host, path))
            body = self.tokens.get(path[len(ACME_PATH):]) if method == "GET" and path.startswith(ACME_PATH) else None
            status = "200 OK" if body is not None else "404 Not Found"
            data = (body if body is not None else "no such token\n").encode()
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(data)}\r\n"
                         "Connection: close\r\n\r\n".encode() + data)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError,
                ConnectionError):
            pass
        finally:
            writer.close()
