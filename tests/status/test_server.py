"""The page server over real sockets: who may look (TLS with the geomesh PKI: 403 with the reason),
the event stream (a change pushed within 2 s), bad requests answered, a viewer that never reads
dropped after its bound while others keep being served, and memory flat with 500 idle viewers."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time

from status_page.board import Board
from status_page.server import ServeConfig, StatusServer
from status_page.tls import page_certificate, server_context

from .conftest import make_overview


def _client_ctx(pki, role: str | None, name: str = "v1") -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert_path))
    if role is not None:
        ident = pki.identity(role, name)
        ctx.load_cert_chain(ident.cert, ident.key)
    return ctx


async def _get(port: int, path: str, ctx: ssl.SSLContext | None = None, raw: bytes | None = None) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                   server_hostname="localhost" if ctx else None)
    writer.write(raw or f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


async def _next_event(reader: asyncio.StreamReader) -> dict:
    while True:
        block = await reader.readuntil(b"\n\n")
        if block.startswith(b"event: state\n"):
            return json.loads(block.split(b"data: ", 1)[1])


async def _open_stream(port: int, ctx: ssl.SSLContext | None = None):
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, limit=8 * 1024 * 1024,
                                                   server_hostname="localhost" if ctx else None)
    writer.write(b"GET /events HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
    return reader, writer


async def test_https_admits_admin_and_dns_and_refuses_others_with_a_reason(pki):
    cert, key = page_certificate(pki)
    board = Board("test")
    server = StatusServer(ServeConfig(port=0), server_context(pki.ca_cert_path, cert, key), board.document)
    port = await server.start()
    try:
        for role in ("admin", "dns"):
            status, body = await _get(port, "/", _client_ctx(pki, role))
            assert status == 200 and b"geomesh status" in body
        status, body = await _get(port, "/", _client_ctx(pki, "gateway", "gw9"))
        assert status == 403 and b"role &#x27;gateway&#x27;" in body and b"admin, dns" in body
        status, body = await _get(port, "/events", _client_ctx(pki, None))
        assert status == 403 and b"no client certificate" in body
        # the event stream works over TLS too, and pushes a change
        reader, writer = await _open_stream(port, _client_ctx(pki, "admin"))
        assert (await asyncio.wait_for(_next_event(reader), 2))["view"]["gateways"] == []
        server.publish(board.apply(make_overview(2, 2)))
        doc = await asyncio.wait_for(_next_event(reader), 2)
        assert len(doc["view"]["gateways"]) == 4
        writer.close()
    finally:
        await server.stop()


async def test_bad_requests_get_their_status_never_a_silent_close():
    server = StatusServer(ServeConfig(port=0, head_timeout=0.5, max_viewers=1), None, Board("test").document)
    port = await server.start()
    try:
        assert (await _get(port, "", raw=b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"))[0] == 413
        assert (await _get(port, "", raw=b"DELETE / HTTP/1.1\r\nHost: x\r\n\r\n"))[0] == 405
        assert (await _get(port, "/etc/passwd"))[0] == 404
        assert (await _get(port, "", raw=b"\x16\x03\x01garbage\r\n\r\n"))[0] == 400
        status, body = await _get(port, "", raw=b"GET / HTTP/1.1\r\n")  # never finished: 408 after 0.5 s
        assert status == 408 and b"0.5 s" in body
        state = await _get(port, "/api/state")
        assert state[0] == 200 and json.loads(state[1])["view"]["revision"] == 0
        _r, w = await _open_stream(port)
        status, body = await _get(port, "/events")
        assert status == 503 and b"--max-viewers" in body
        w.close()
    finally:
        await server.stop()


async def test_a_viewer_that_never_reads_is_dropped_and_the_others_keep_being_served():
    board = Board("test")
    server = StatusServer(ServeConfig(port=0, viewer_buffer=8192, stall_timeout=0.5), None, board.document)
    port = await server.start()
    try:
        reader, writer = await _open_stream(port)
        assert (await asyncio.wait_for(_next_event(reader), 2))["view"]["revision"] == 0
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")  # and never reads
        await asyncio.sleep(0.2)
        assert len(server.viewers) == 2
        big = make_overview(10, 100)  # ~200 kB documents
        deadline = time.monotonic() + 8
        for i in range(100):  # bounded: until the silent viewer is dropped
            big.revision = i + 1
            server.publish(board.apply(big))
            doc = await asyncio.wait_for(_next_event(reader), 2)
            assert doc["view"]["revision"] >= 1
            if len(server.viewers) == 1:
                break
            assert time.monotonic() < deadline, "the silent viewer was never dropped"
            await asyncio.sleep(0.1)
        assert len(server.viewers) == 1
        assert server.buffered_bytes() < 1024 * 1024
        sock.close()
        writer.close()
    finally:
        await server.stop()


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


async def test_memory_stays_flat_with_500_idle_viewers():
    board = Board("test")
    server = StatusServer(ServeConfig(port=0), None, board.document)
    port = await server.start()
    server.publish(board.apply(make_overview(5, 20)))
    socks: list[socket.socket] = []
    try:
        before = _rss_kb()
        for _ in range(500):
            s = socket.socket()
            s.setblocking(False)
            await asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", port))
            await asyncio.get_running_loop().sock_sendall(s, b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
            socks.append(s)  # idle: never reads
        deadline = time.monotonic() + 10
        while len(server.viewers) < 500:
            assert time.monotonic() < deadline, f"only {len(server.viewers)} viewers connected"
            await asyncio.sleep(0.05)
        overview = make_overview(5, 20)
        for i in range(20):  # twenty changes pushed to 500 viewers that read nothing
            overview.revision = 100 + i
            server.publish(board.apply(overview))
            await asyncio.sleep(0.02)
        grown_mb = (_rss_kb() - before) / 1024
        assert grown_mb < 50, f"RSS grew {grown_mb:.1f} MB with 500 idle viewers"
        assert server.buffered_bytes() <= 500 * (256 * 1024 + len(server.state_event))
        # and a new viewer is still served at once
        reader, writer = await _open_stream(port)
        assert (await asyncio.wait_for(_next_event(reader), 2))["view"]["revision"] == 119
        writer.close()
    finally:
        for s in socks:
            s.close()
        await server.stop()
