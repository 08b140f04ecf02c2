"""The errors the proxy answers itself, one class per condition, and their HTTP rendering.

Every refusal is a complete HTTP/1.1 response with a short plain-text body naming the cause
(never a silent close): `render` turns an error into bytes. The `cause` tag also labels the
`geomesh_gateway_errors_total` metric and the `X-Geomesh-Error` response header, so a client, a
log line and a dashboard all say the same thing.
"""

from __future__ import annotations

from http import HTTPStatus


class ProxyError(Exception):
    status = 500
    cause = "internal"
    closes = False  # the connection cannot continue after this error

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ProxyError):
    status, cause, closes = 400, "bad-request", True


class ProtectedHeader(BadRequest):
    """`Connection` names a header the gateway relies on (request smuggling shape)."""

    cause = "connection-protected-header"


class BadFraming(BadRequest):
    """Transfer-Encoding / Content-Length the gateway will not forward."""

    cause = "bad-framing"


class BadHost(BadRequest):
    """A Host or request-target authority that is not a host name, or the two disagree."""

    cause = "bad-host"


class IncompleteRequest(BadRequest):
    """The client ended its side of the connection inside a request."""

    cause = "incomplete-request"


class RequestTimeout(ProxyError):
    status, cause, closes = 408, "request-timeout", True


class BodyTimeout(RequestTimeout):
    """The request body stopped or trickled (idle longer than body_timeout, or under body_min_rate)."""

    cause = "body-timeout"


class UnknownHost(ProxyError):
    status, cause = 404, "unknown-host"


class MethodNotAllowed(ProxyError):
    status, cause, closes = 405, "method-not-allowed", True


class BodyTooLarge(ProxyError):
    status, cause, closes = 413, "body-too-large", True


class MisdirectedRequest(ProxyError):
    status, cause = 421, "misdirected"


class SniMismatch(MisdirectedRequest):
    """Over TLS, Host names another server than the SNI the connection was set up for."""

    cause = "sni-host-mismatch"


class LookupRateLimited(ProxyError):
    """A custom domain's TXT look-up refused: this client's look-ups are over their rate."""

    status, cause = 429, "custom-domain-rate-limited"


class HeadersTooLarge(ProxyError):
    status, cause, closes = 431, "headers-too-large", True


class UpstreamFailed(ProxyError):
    status, cause = 502, "upstream-failed"


class NoHealthyBackend(ProxyError):
    status, cause = 503, "no-healthy-backend"


class Overloaded(ProxyError):
    status, cause, closes = 503, "too-many-connections", True


class LookupsBusy(ProxyError):
    """A custom domain's TXT look-up refused: the gateway's look-ups are over their rate."""

    status, cause = 503, "custom-domain-lookups-busy"


class LookupFailed(ProxyError):
    """A custom domain's TXT look-up got no answer (resolver timeout, SERVFAIL, ...)."""

    status, cause = 503, "custom-domain-lookup-failed"


class ShuttingDown(ProxyError):
    status, cause, closes = 503, "shutting-down", True


class UpstreamTimeout(ProxyError):
    status, cause = 504, "upstream-timeout"


class VersionNotSupported(ProxyError):
    status, cause, closes = 505, "http-version", True


def render(err: ProxyError, *, close: bool, head_only: bool = False) -> bytes:
    """The full HTTP/1.1 response for `err`."""
    reason = HTTPStatus(err.status).phrase
    body = f"{err.status} {reason}: {err.message}\n".encode("utf-8", "replace")
    head = (f"HTTP/1.1 {err.status} {reason}\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"X-Geomesh-Error: {err.cause}\r\n"
            "Cache-Control: no-store\r\n"
            + ("Connection: close\r\n" if close else "")
            + "\r\n").encode()
    return head if head_only else head + body
