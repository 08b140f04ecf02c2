#!/usr/bin/env python3
"""The floor of any Python HTTP proxy on this stack: what `bench/http.py --floor` measures.

    python bench/_relay_floor.py PORT BACKEND_PORT[,BACKEND_PORT...]

Not a proxy anyone should run: a uvloop relay that pairs each client connection with one
backend connection (round robin when the client connects) and copies bytes both ways, running
the same C parser the gateway uses (httptools: request parser on the client side with the
callbacks the gateway needs to route, response parser on the backend side to find where each
response ends) and doing nothing else: no routing by Host, no header rewriting, no connection
pool, no health, no metrics, no timeouts. It makes the same four socket calls per request as the
gateway and HAProxy (read and write on each side).

Its rate over HAProxy's, in the same run, is the ceiling for a gateway built from asyncio
Protocols + uvloop + httptools on CPython: whatever the gateway does per request on top has to
fit in the difference. Loopback only.
"""

from __future__ import annotations

import asyncio
import itertools
import sys

import uvloop
from httptools import HttpRequestParser, HttpResponseParser


class ResponseCallbacks:
    """What a proxy must learn from a response: its status and where it ends (httptools callbacks)."""

    parser: HttpResponseParser
    status = 0
    complete = 0

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_message_complete(self) -> None:
        self.complete += 1


class RequestCallbacks:
    """What a router must learn from a request: URL, Host, method, where it ends (httptools callbacks)."""

    parser: HttpRequestParser
    url = b""
    host = b""
    method = b""
    complete = 0

    def on_message_begin(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"host":
            self.host = value

    def on_headers_complete(self) -> None:
        self.method = self.parser.get_method()

    def on_message_complete(self) -> None:
        self.complete += 1


class Backend(ResponseCallbacks, asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client
        self.parser = HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        self.client.transport.write(data)  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()  # type: ignore[union-attr]


class Client(RequestCallbacks, asyncio.Protocol):
    def __init__(self, backends: itertools.cycle) -> None:
        self.backends = backends
        self.parser = HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.backend: Backend | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        asyncio.ensure_future(self._open())

    async def _open(self) -> None:
        try:
            _, backend = await asyncio.get_running_loop().create_connection(
                lambda: Backend(self), "127.0.0.1", next(self.backends))
        except OSError:
            self.transport.close()  # type: ignore[union-attr]
            return
        for chunk in self.pending:
            backend.transport.write(chunk)  # type: ignore[union-attr]
        self.pending = []
        self.backend = backend  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        if self.backend is None:
            self.pending.append(data)
        else:
            self.backend.transport.write(data)  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.backend is not None:
            self.backend.transport.close()  # type: ignore[union-attr]


async def serve(port: int, backends: list[int]) -> None:
    cycle = itertools.cycle(backends)
    server = await asyncio.get_running_loop().create_server(lambda: Client(cycle), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    uvloop.run(serve(int(sys.argv[1]), [int(p) for p in sys.argv[2].split(",")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
