"""Real backend servers for the proxy tests: HTTP/1.1 (optionally TLS) on loopback, each in its own thread.

`Backend(name)` listens on 127.0.0.1 (port 0 unless given), speaks keep-alive HTTP/1.1 with
Content-Length and chunked bodies in both directions, and answers by path:

    /                    200 "<name>" with X-Backend: <name>
    /slow?ms=N           the same after N ms
    /status/N            status N
    /headers             the request headers as JSON ({"lowercase-name": [values...]})
    /echo                the request body back (Content-Length)
    /chunked?n=K&size=S  K chunks of S bytes, chunked
    /big?bytes=N         N bytes with Content-Length, written in 64 KiB pieces
    /ws                  101 Switching Protocols, then echoes raw bytes
    /close               200 with Connection: close, then closes
    /health              200, or 503 after `.sick = True`
    (any other path)     `.fail_status` when set (a backend answering 5xx)

`stop()` closes the listener and every connection (a killed backend); `start()` listens again on
the same port. `hits` counts requests, `connections` counts accepted TCP connections.
`raw=True` turns it into a byte sink that records what arrives (for PROXY-protocol checks).
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
from collections import Counter
from urllib.parse import parse_qs, urlsplit


class Backend:
    def __init__(self, name: str, *, port: int = 0, ssl_context: ssl.SSLContext | None = None,
                 raw: bool = False, host: str = "127.0.0.1") -> None:
        self.name = name
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.raw = raw
        self.hits = 0
        self.paths: Counter[str] = Counter()
        self.connections = 0
        self.sick = False
        self.fail_status = 0  # when set, every request except /health gets this status
        self.inflight = 0
        self.max_inflight = 0
        self.received: list[bytes] = []
        self.last_headers: dict[str, list[str]] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"backend-{name}", daemon=True)
        self._thread.start()
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _call(self, coro):  # run a coroutine on the backend's loop and wait for it
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def start(self) -> None:
        async def go() -> None:
            self._server = await asyncio.start_server(self._handle, self.host, self.port, ssl=self.ssl_context,
                                                      reuse_address=True)
            self.port = self._server.sockets[0].getsockname()[1]
        self._call(go())

    def stop(self) -> None:
        async def go() -> None:
            if self._server is not None:
                self._server.close()
                self._server = None
            for w in list(self._writers):
                w.transport.abort()
            self._writers.clear()
        self._call(go())

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            if self.raw:
                while data := await reader.read(65536):
                    self.received.append(data)
                    writer.write(data)
                return
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _version = lines[0].split(" ", 2)
                headers: dict[str, list[str]] = {}
                for line in lines[1:]:
                    if line:
                        k, _, val = line.partition(":")
                        headers.setdefault(k.strip().lower(), []).append(val.strip())
                body = await _read_body(reader, headers)
                self.hits += 1
                self.last_headers = headers
                url = urlsplit(target)
                self.paths[url.path] += 1
                self.inflight += 1
                self.max_inflight = max(self.max_inflight, self.inflight)
                try:
                    keep = await self._respond(method, url, headers, body, reader, writer)
                finally:
                    self.inflight -= 1
                if not keep:
                    return
        except (ConnectionError, asyncio.CancelledError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _respond(self, method: str, url, headers: dict[str, list[str]], body: bytes,
                       reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        path = url.path
        status, out, extra = 200, self.name.encode(), ""
        if self.fail_status and path != "/health":
            status = self.fail_status
        elif path == "/slow":
            await asyncio.sleep(int(q.get("ms", "100")) / 1000)
        elif path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
        elif path == "/headers":
            out = json.dumps(headers).encode()
        elif path == "/echo":
            out = body
        elif path == "/health":
            status = 503 if self.sick else 200
        elif path == "/chunked":
            n, size = int(q.get("n", "3")), int(q.get("size", "10"))
            writer.write(f"HTTP/1.1 200 OK\r\nX-Backend: {self.name}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
            for i in range(n):
                writer.write(b"%x\r\n%s\r\n" % (size, bytes([97 + i % 26]) * size))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        elif path == "/big":
            n = int(q.get("bytes", "1000000"))
            writer.write(f"HTTP/1.1 200 OK\r\nX-Backend: {self.name}\r\nContent-Length: {n}\r\n\r\n".encode())
            piece = b"x" * 65536
            while n > 0:
                writer.write(piece[:n])
                n -= 65536
                await writer.drain()
            return True
        elif path == "/ws":
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         + f"X-Backend: {self.name}\r\n\r\n".encode())
            await writer.drain()
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            return False
        elif path == "/close":
            extra = "Connection: close\r\n"
        length = "" if status in (204, 304) else f"Content-Length: {len(out)}\r\n"
        head = (f"HTTP/1.1 {status} X\r\nX-Backend: {self.name}\r\n{length}{extra}\r\n").encode()
        writer.write(head if method == "HEAD" or status in (204, 304) else head + out)
        await writer.drain()
        return not extra


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, list[str]]) -> bytes:
    if "chunked" in ",".join(headers.get("transfer-encoding", [])).lower():
        out = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return bytes(out)
            out += await reader.readexactly(size)
            await reader.readexactly(2)
    n = int(headers.get("content-length", ["0"])[0])
    return await reader.readexactly(n) if n else b""


class RawListener:
    """A bare TCP listener on 127.0.0.1 for misbehaving or counting backends: each accepted
    connection is counted in `accepted` and handed to `handle` on the accept thread (which closes
    it; a subclass that needs to keep serving starts its own thread). `close()` stops accepting."""

    def __init__(self, backlog: int = 16) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.handle(c)

    def handle(self, c: socket.socket) -> None:
        c.close()

    def close(self) -> None:
        self.sock.close()
