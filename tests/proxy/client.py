"""A small blocking HTTP/1.1 client on raw sockets, so tests control every byte they send.

`Conn(addr)` keeps one connection open (keep-alive); `request()` sends one request and reads one
response (Content-Length, chunked or until close); `send_raw()`/`read_response()` split the two
for pipelining and malformed input. `get(addr, host, path)` is the one-shot form.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass, field


@dataclass
class Response:
    status: int
    reason: str
    headers: dict[str, list[str]] = field(default_factory=dict)
    body: bytes = b""
    raw_head: bytes = b""

    def header(self, name: str) -> str | None:
        v = self.headers.get(name.lower())
        return v[0] if v else None


class Conn:
    def __init__(self, addr: tuple[str, int], *, timeout: float = 10.0, source: str | None = None,
                 tls: ssl.SSLContext | None = None, server_name: str | None = None) -> None:
        self.sock = socket.create_connection(addr, timeout=timeout,
                                             source_address=(source, 0) if source else None)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname=server_name)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def read_until_close(self) -> bytes:
        while self._fill():
            pass
        out, self.buf = self.buf, b""
        return out

    def closed_by_peer(self) -> bool:
        """True if the peer closed (EOF or reset) without sending anything more."""
        try:
            return not self._fill() and not self.buf
        except (ConnectionResetError, BrokenPipeError):
            return True

    def read_response(self, *, head_only: bool = False) -> Response:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError(f"connection closed before a response head (got {self.buf[:200]!r})")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        _, status, reason = (lines[0].split(" ", 2) + [""])[:3]
        headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers.setdefault(k.strip().lower(), []).append(v.strip())
        resp = Response(int(status), reason, headers, raw_head=head)
        code = int(status)
        if head_only or code in (204, 304) or 100 <= code < 200:
            return resp
        if "chunked" in ",".join(headers.get("transfer-encoding", [])).lower():
            body = bytearray()
            while True:
                while b"\r\n" not in self.buf:
                    if not self._fill():
                        raise ConnectionError("closed inside a chunked body")
                line, self.buf = self.buf.split(b"\r\n", 1)
                size = int(line.split(b";")[0], 16)
                while len(self.buf) < size + 2:
                    if not self._fill():
                        raise ConnectionError("closed inside a chunk")
                body += self.buf[:size]
                self.buf = self.buf[size + 2:]
                if size == 0:
                    break
            resp.body = bytes(body)
        elif "content-length" in headers:
            n = int(headers["content-length"][0])
            while len(self.buf) < n:
                if not self._fill():
                    raise ConnectionError(f"closed after {len(self.buf)} of {n} body bytes")
            resp.body, self.buf = self.buf[:n], self.buf[n:]
        else:
            resp.body = self.read_until_close()
        return resp

    def request(self, host: str | None, path: str = "/", *, method: str = "GET",
                headers: dict[str, str] | list[tuple[str, str]] | None = None, body: bytes | None = None,
                version: str = "HTTP/1.1") -> Response:
        lines = [f"{method} {path} {version}"]
        if host is not None:
            lines.append(f"Host: {host}")
        items = headers.items() if isinstance(headers, dict) else (headers or [])
        lines += [f"{k}: {v}" for k, v in items]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        self.send_raw(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
        return self.read_response(head_only=method == "HEAD")


def get(addr: tuple[str, int], host: str | None, path: str = "/", **kw) -> Response:
    source = kw.pop("source", None)
    timeout = kw.pop("timeout", 10.0)
    with Conn(addr, source=source, timeout=timeout) as c:
        return c.request(host, path, **kw)
