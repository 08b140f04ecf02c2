"""HTTP/1.1 for the status page, sans-IO: request heads in, decisions and response bytes out.

`RequestReader.feed(data)` parses with httptools and returns a `Request` once a whole head has
arrived, or raises `HttpError` carrying the status to answer: 400 for a malformed request, 413 for
a request with a body (the page is read-only), 414 for a target longer than `MAX_TARGET`, 431 for
a head larger than `MAX_HEAD`. `route(request)` decides what a path is. `response(...)` builds
the bytes. Every response closes the connection except the event stream, which stays open.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from email.utils import formatdate

import httptools

MAX_HEAD = 16 * 1024  # request line + headers, bytes
MAX_TARGET = 2048
REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout", 413: "Content Too Large", 414: "URI Too Long",
           431: "Request Header Fields Too Large", 503: "Service Unavailable"}


class HttpError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]


class RequestReader:
    """Reads one request head; the page serves one request per connection."""

    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._size = 0
        self._url = b""
        self._headers: dict[str, str] = {}
        self._done = False
        self._body = False

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_TARGET:
            raise HttpError(414, f"request target longer than {MAX_TARGET} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._done = True

    def on_body(self, body: bytes) -> None:
        self._body = True

    def feed(self, data: bytes) -> Request | None:
        """The request once its head is complete, else None (feed more)."""
        if self._done:
            return None
        self._size += len(data)
        try:
            self._parser.feed_data(data)
        except HttpError:
            raise
        except httptools.HttpParserUpgrade:
            pass  # an Upgrade request: answered as a plain request (no upgrade is offered)
        except httptools.HttpParserError as exc:
            cause = exc.__context__ if isinstance(exc.__context__, HttpError) else None
            if cause is not None:
                raise cause from None
            raise HttpError(400, f"malformed request: {exc}") from None
        if not self._done:
            if self._size > MAX_HEAD:
                raise HttpError(431, f"request head larger than {MAX_HEAD} bytes")
            return None
        if self._size > MAX_HEAD:
            raise HttpError(431, f"request head larger than {MAX_HEAD} bytes")
        length = self._headers.get("content-length", "0").strip()
        if self._body or (length not in ("", "0")) or "transfer-encoding" in self._headers:
            raise HttpError(413, "the status page is read-only: requests carry no body")
        method = self._parser.get_method().decode("latin-1")
        path = httptools.parse_url(self._url).path.decode("latin-1") if self._url else "/"
        return Request(method, path, self._headers)


STATIC = {  # path -> (package file, content type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/app.css": ("app.css", "text/css; charset=utf-8"),
    "/static/world.json": ("world.json", "application/json"),
}


def route(request: Request) -> str:
    """'static', 'state', 'events', 'healthz'; raises HttpError for anything else."""
    if request.method not in ("GET", "HEAD"):
        raise HttpError(405, f"method {request.method} not allowed: the status page is read-only (GET, HEAD)")
    if request.path in STATIC:
        return "static"
    if request.path == "/api/state":
        return "state"
    if request.path == "/events":
        return "events"
    if request.path == "/healthz":
        return "healthz"
    raise HttpError(404, f"no such page: {request.path}")


SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
     "connect-src 'self'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)


def head(status: int, content_type: str, length: int | None, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}", f"Date: {formatdate(usegmt=True)}",
             "Server: geomesh-status", f"Content-Type: {content_type}"]
    if length is not None:
        lines += [f"Content-Length: {length}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (*SECURITY_HEADERS, *extra)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def response(status: int, content_type: str, body: bytes, *, head_only: bool = False) -> bytes:
    return head(status, content_type, len(body)) + (b"" if head_only else body)


def error_page(status: int, reason: str, *, head_only: bool = False) -> bytes:
    """A small readable page naming the reason (never a blank page)."""
    title = f"{status} {REASONS.get(status, '')}"
    body = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body><h1>{html.escape(title)}</h1><p id='reason'>{html.escape(reason)}</p>"
            f"<p>geomesh status page</p></body></html>\n").encode()
    return response(status, "text/html; charset=utf-8", body, head_only=head_only)


SSE_HEAD = head(200, "text/event-stream", None, (("Connection", "keep-alive"), ("X-Accel-Buffering", "no")))


def sse_message(event: str, data: str) -> bytes:
    """One Server-Sent Event; `data` must hold no newline (JSON without indentation does not)."""
    return f"event: {event}\ndata: {data}\n\n".encode()
