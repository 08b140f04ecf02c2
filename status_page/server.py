"""The status page's HTTP(S) server: asyncio glue around `http`, `access` and the shared document.

One `asyncio.Protocol` per connection reads a request head (deadline `head_timeout`: 408), checks
who is asking (`access.decide`: 403 with the reason), and answers a static file, `/api/state`
(the current document) or `/events`, the Server-Sent Events stream. `publish(document)` writes one
`state` event, the same bytes, to every viewer.

Slow viewers: each viewer's transport has a write-buffer high-water mark (`viewer_buffer`). A
viewer over it is paused: it is sent nothing more but remembered as stale, and it gets the latest
document (only the latest: documents are whole states, so nothing is queued) when it drains. A
viewer paused for longer than `stall_timeout` is dropped (`geomesh_status_viewers_dropped_total
{reason="stalled"}`), so a client that never reads holds at most about `viewer_buffer` bytes for
`stall_timeout` seconds. At most `max_viewers` streams are open at once; the next gets 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from dataclasses import dataclass
from importlib import resources

from prometheus_client import Counter, Gauge

from geomesh.logs import event
from status_page import access, http

log = logging.getLogger("geomesh.status")

VIEWERS = Gauge("geomesh_status_viewers", "Open Server-Sent Events streams (page viewers)")
DROPPED = Counter("geomesh_status_viewers_dropped_total", "Event streams closed by the server, by reason "
                  "(stalled: the viewer read nothing for --stall-timeout)", ["reason"])
REFUSED = Counter("geomesh_status_requests_refused_total", "Requests answered with an error, by status",
                  ["status"])
REQUESTS = Counter("geomesh_status_requests_total", "Requests answered, by route", ["route"])
PUBLISHED = Counter("geomesh_status_documents_published_total", "State documents pushed to the viewers")


@dataclass(frozen=True, slots=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8480
    head_timeout: float = 10.0      # a request head must arrive within this (408)
    viewer_buffer: int = 256 * 1024  # bytes a viewer may have unsent before it is paused
    stall_timeout: float = 30.0     # a viewer paused this long is dropped
    max_viewers: int = 1000
    ping_interval: float = 15.0     # SSE comment lines keep proxies and browsers from timing out

    def __post_init__(self) -> None:
        for name in ("head_timeout", "stall_timeout", "ping_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.viewer_buffer < 1024:
            raise ValueError("viewer_buffer must be >= 1024 bytes")
        if self.max_viewers < 1:
            raise ValueError("max_viewers must be >= 1")


def _static_files() -> dict[str, bytes]:
    root = resources.files("status_page") / "static"
    return {name: (root / name).read_bytes() for name, _ in set(http.STATIC.values())}


class _Connection(asyncio.Protocol):
    def __init__(self, server: StatusServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.reader = http.RequestReader()
        self.viewer = False
        self.paused_since: float | None = None
        self.stale = False
        self.deadline: asyncio.TimerHandle | None = None

    # -- asyncio callbacks --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.connections.add(self)
        self.deadline = asyncio.get_running_loop().call_later(self.server.config.head_timeout, self._head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self.viewer:
            self.viewer = False
            self.server.viewers.discard(self)
            VIEWERS.set(len(self.server.viewers))
        if self.deadline is not None:
            self.deadline.cancel()

    def pause_writing(self) -> None:
        self.paused_since = time.monotonic()

    def resume_writing(self) -> None:
        self.paused_since = None
        if self.stale and self.viewer:
            self.stale = False
            self.send(self.server.state_event)

    def data_received(self, data: bytes) -> None:
        if self.viewer or self.deadline is None:
            return  # a viewer's further bytes are ignored; the request was answered
        try:
            request = self.reader.feed(data)
        except http.HttpError as exc:
            self.fail(exc.status, exc.reason)
            return
        if request is not None:
            self.deadline.cancel()
            self.deadline = None
            self.handle(request)

    # -- answers --
    def send(self, data: bytes) -> None:
        assert self.transport is not None
        if not self.transport.is_closing():
            self.transport.write(data)

    def fail(self, status: int, reason: str, *, head_only: bool = False) -> None:
        REFUSED.labels(str(status)).inc()
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        self.send(http.error_page(status, reason, head_only=head_only))
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _head_timeout(self) -> None:
        self.deadline = None
        self.fail(408, f"no complete request head within {self.server.config.head_timeout:g} s")

    def _peer_der(self) -> bytes | None:
        assert self.transport is not None
        obj = self.transport.get_extra_info("ssl_object")
        return obj.getpeercert(binary_form=True) if obj is not None else None

    def handle(self, request: http.Request) -> None:
        head_only = request.method == "HEAD"
        verdict = access.decide(self._peer_der(), tls=self.server.tls is not None)
        if not verdict.allowed:
            event(log, "viewer refused", level=logging.DEBUG, who=verdict.who, reason=verdict.reason)
            self.fail(403, verdict.reason, head_only=head_only)
            return
        try:
            kind = http.route(request)
        except http.HttpError as exc:
            self.fail(exc.status, exc.reason, head_only=head_only)
            return
        REQUESTS.labels(kind).inc()
        if kind == "static":
            name, content_type = http.STATIC[request.path]
            self.send(http.response(200, content_type, self.server.files[name], head_only=head_only))
        elif kind == "state":
            self.send(http.response(200, "application/json", self.server.document, head_only=head_only))
        elif kind == "healthz":
            self.send(http.response(200, "text/plain; charset=utf-8", b"ok\n", head_only=head_only))
        else:
            self.start_stream(head_only)
            return
        self.close()

    def start_stream(self, head_only: bool) -> None:
        server = self.server
        if len(server.viewers) >= server.config.max_viewers:
            DROPPED.labels("full").inc()
            self.fail(503, f"{server.config.max_viewers} viewers are connected (--max-viewers); retry later",
                      head_only=head_only)
            return
        if head_only:
            self.send(http.SSE_HEAD)
            self.close()
            return
        assert self.transport is not None
        self.transport.set_write_buffer_limits(high=server.config.viewer_buffer)
        self.viewer = True
        server.viewers.add(self)
        VIEWERS.set(len(server.viewers))
        self.send(http.SSE_HEAD + b"retry: 2000\n\n" + server.state_event)


class StatusServer:
    """Serves the page; `publish(document)` pushes a new state to every viewer."""

    def __init__(self, config: ServeConfig, tls: ssl.SSLContext | None, document: bytes = b"{}") -> None:
        self.config = config
        self.tls = tls
        self.files = _static_files()
        self.connections: set[_Connection] = set()
        self.viewers: set[_Connection] = set()
        self.document = document
        self.state_event = http.sse_message("state", document.decode())
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task] = []
        self.port = 0

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), self.config.host, self.config.port,
                                                ssl=self.tls, reuse_address=True, backlog=1024)
        sock = self._server.sockets[0]
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.port = sock.getsockname()[1]
        self._tasks = [asyncio.create_task(self._sweep()), asyncio.create_task(self._ping())]
        return self.port

    def publish(self, document: bytes) -> None:
        """A new state: one `state` event, the same bytes for every viewer not paused."""
        self.document = document
        self.state_event = http.sse_message("state", document.decode())
        PUBLISHED.inc()
        for viewer in list(self.viewers):
            if viewer.paused_since is not None:
                viewer.stale = True
            else:
                viewer.send(self.state_event)

    def buffered_bytes(self) -> int:
        """Bytes queued in user space for all viewers (what a never-reading client can cost)."""
        return sum(v.transport.get_write_buffer_size() for v in self.viewers if v.transport is not None)

    async def _sweep(self) -> None:
        period = min(1.0, self.config.stall_timeout / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for viewer in list(self.viewers):
                if viewer.paused_since is not None and now - viewer.paused_since > self.config.stall_timeout:
                    DROPPED.labels("stalled").inc()
                    event(log, "viewer dropped: it read nothing", level=logging.INFO,
                          stalled_s=round(now - viewer.paused_since, 1))
                    viewer.server.viewers.discard(viewer)
                    viewer.viewer = False
                    VIEWERS.set(len(self.viewers))
                    assert viewer.transport is not None
                    viewer.transport.abort()

    async def _ping(self) -> None:
        while True:
            await asyncio.sleep(self.config.ping_interval)
            for viewer in list(self.viewers):
                if viewer.paused_since is None:
                    viewer.send(b": ping\n\n")

    async def stop(self) -> None:
        """Stop accepting, close every connection, end the background tasks."""
        if self._server is not None:
            self._server.close()
        for c in list(self.connections):
            if c.transport is not None:
                c.transport.abort()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
