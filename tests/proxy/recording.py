"""A recording HTTP/1.1 backend for the smuggling tests: every byte it receives, and the requests
its own strict parser finds in them.

`RecordingBackend(name)` listens on 127.0.0.1 port 0 in its own thread. Per TCP connection it
keeps the bytes received (`Recorded.data`) and whether the gateway closed it (`Recorded.eof`);
`requests` lists every complete request it parsed, over all connections, in arrival order.
The parser (`parse_requests`) is not llhttp: it is deliberately strict (CRLF only, no obs-fold,
Content-Length digits only, `chunked` last, never both), so that a request the gateway and the
backend would read differently shows up as an extra request or a parse error here.

Each request is answered `200` with the body `"<name> <method> <target>"` (so a client can tell
whose answer it got), after `ms` milliseconds for `/slow?ms=N`. A request carrying `Upgrade` is
answered `101` when `upgrade_status` is 101 (then every later byte is recorded in
`Recorded.tunnel` and echoed), else with `upgrade_status` as a normal response. Something it
cannot parse is recorded in `errors`, answered 400 and the connection closed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class Malformed(ValueError):
    pass


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


def _parse_one(buf: bytes) -> tuple[Request, int] | None:
    """One request at the start of `buf` -> (request, bytes used); None if incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if b"\n" in buf.replace(b"\r\n", b"") or b"\r" in buf.replace(b"\r\n", b"")[:-1]:
            raise Malformed("bare CR or LF")
        return None
    head = buf[:end].decode("latin-1")
    if "\n" in head.replace("\r\n", "") or "\r" in head.replace("\r\n", ""):
        raise Malformed("bare CR or LF in the head")
    lines = head.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise Malformed(f"bad request line {lines[0]!r}")
    method, target, version = parts
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or not set(name.encode("latin-1")) <= _TCHAR:
            raise Malformed(f"bad header line {line!r}")
        headers.append((name, value.strip(" \t")))
    req = Request(method, target, version, tuple(headers))
    pos = end + 4
    cl, te = req.values("content-length"), req.values("transfer-encoding")
    if cl and te:
        raise Malformed("both Content-Length and Transfer-Encoding")
    if te:
        if len(te) != 1 or te[0].lower().split(",")[-1].strip() != "chunked":
            raise Malformed(f"Transfer-Encoding {te!r}")
        body = bytearray()
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size_s = buf[pos:eol].split(b";")[0]
            if not size_s or any(c not in b"0123456789abcdefABCDEF" for c in size_s):
                raise Malformed(f"bad chunk size {size_s!r}")
            size = int(size_s, 16)
            pos = eol + 2
            if size == 0:
                while True:  # trailers, then the empty line
                    eol = buf.find(b"\r\n", pos)
                    if eol < 0:
                        return None
                    line, pos = buf[pos:eol], eol + 2
                    if not line:
                        return Request(method, target, version, tuple(headers), bytes(body)), pos
            if len(buf) < pos + size + 2:
                return None
            if buf[pos + size:pos + size + 2] != b"\r\n":
                raise Malformed("chunk not followed by CRLF")
            body += buf[pos:pos + size]
            pos += size + 2
    if cl:
        if len(cl) != 1 or not cl[0].isdigit():
            raise Malformed(f"Content-Length {cl!r}")
        n = int(cl[0])
        if len(buf) < pos + n:
            return None
        return Request(method, target, version, tuple(headers), buf[pos:pos + n]), pos + n
    return req, pos


def parse_requests(data: bytes) -> tuple[list[Request], bytes]:
    """Every complete request in `data`, and the bytes left over (an incomplete request)."""
    out = []
    while data:
        got = _parse_one(data)
        if got is None:
            break
        req, used = got
        out.append(req)
        data = data[used:]
    return out, data


@dataclass
class Recorded:
    """One TCP connection the backend accepted."""

    data: bytearray = field(default_factory=bytearray)
    tunnel: bytearray = field(default_factory=bytearray)
    eof: bool = False


class RecordingBackend:
    def __init__(self, name: str, *, upgrade_status: int = 200) -> None:
        self.name = name
        self.upgrade_status = upgrade_status
        self.connections: list[Recorded] = []
        self.requests: list[Request] = []
        self.errors: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"recording-{name}", daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def received(self) -> bytes:
        """Everything received since the last `reset`, connection after connection."""
        return b"".join(bytes(c.data) for c in self.connections)

    def reset(self) -> None:
        """Forget what was recorded; connections still open keep being recorded from now on."""
        for c in self.connections:
            c.data.clear()
            c.tunnel.clear()
        self.connections = [c for c in self.connections if not c.eof]
        self.requests.clear()
        self.errors.clear()

    def wait_for(self, n: int, timeout: float = 5.0) -> list[Request]:
        """Wait until at least `n` requests were recorded; returns them all."""
        deadline = time.monotonic() + timeout
        while len(self.requests) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return list(self.requests)

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        rec = Recorded()
        self.connections.append(rec)
        buf = b""
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    rec.eof = True
                    return
                rec.data += data
                buf += data
                while buf:
                    try:
                        got = _parse_one(buf)
                    except Malformed as exc:
                        self.errors.append(str(exc))
                        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        await writer.drain()
                        return
                    if got is None:
                        break
                    req, used = got
                    buf = buf[used:]
                    self.requests.append(req)
                    if req.values("upgrade") and self.upgrade_status == 101:
                        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                     b"Connection: Upgrade\r\n\r\n")
                        await self._tunnel(rec, buf, reader, writer)
                        return
                    await self._answer(req, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            rec.eof = True
        finally:
            writer.close()

    async def _answer(self, req: Request, writer: asyncio.StreamWriter) -> None:
        url = urlsplit(req.target)
        if url.path == "/slow":
            await asyncio.sleep(int(parse_qs(url.query).get("ms", ["100"])[0]) / 1000)
        status = self.upgrade_status if req.values("upgrade") else 200
        body = f"{self.name} {req.method} {req.target}".encode()
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\nX-Backend: {self.name}\r\n\r\n"
                     .encode() + (b"" if req.method == "HEAD" else body))
        await writer.drain()

    async def _tunnel(self, rec: Recorded, first: bytes, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        data = first
        while True:
            if data:
                rec.tunnel += data
                writer.write(data)
                await writer.drain()
            data = await reader.read(65536)
            if not data:
                rec.eof = True
                return
