"""One HTTP/1.1 request/response pair (`Exchange`) and the limits every exchange kind shares.

An `Exchange` is what `downstream.ClientConnection` keeps per request: the head to forward, the
body framing, the backend chosen and its attempts, the upstream connection carrying it, and how
far each direction got. It is a mutable record, not a value: it lives on the hot path, where
setting a few class-level defaults per request is measurably cheaper than thirty slots (see the
class); how many tries it gets and after which failures is `attempt`. `LINGER` is how long a connection ended by an error keeps reading and dropping what its client
still sends, so the client reads the answer instead of a reset.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # modules below this one (none of them imports it)
    from regional_gateway.proxy.http_errors import ProxyError
    from regional_gateway.proxy.route_state import BackendRuntime
    from regional_gateway.proxy.routes import RemoteRegion
    from regional_gateway.proxy.upstream import UpstreamConnection

LINGER = 2.0  # seconds


class Exchange:
    """One request/response pair on a client connection.

    Plain attributes with class-level defaults: an exchange on the fast path sets only the few it
    needs, which is measurably cheaper than initialising thirty slots per request.
    """

    method = b""
    host: bytes | None = None
    head = b""
    keep_alive = True
    upgrade = False
    head_only = False
    chunked = False
    has_body = False
    error: ProxyError | None = None
    upstream: UpstreamConnection | None = None
    pending: list[bytes] | None = None
    pending_len = 0
    req_done = False
    resp_done = False
    status = 0
    backend: BackendRuntime | None = None  # counted in its `inflight` while `counted`
    addr: tuple[str, int] | None = None
    region: RemoteRegion | None = None  # set when forwarded to another region's gateway
    app = "-"
    backend_label = "-"
    t_sent = 0.0
    t_head = 0.0
    attempts = 0
    tried: tuple[str, ...] = ()
    discard = False
    body_len = 0
    final_head = b""
    counted = False
    marked = False  # arrived with a trusted X-Geomesh-Forwarded: never forwarded again
    held: list[bytes] | None = None  # bytes after an upgrade request's head, until the backend's 101
    held_len = 0

