"""What a plain HTTP listener answers itself: ACME HTTP-01 challenges, and the redirect to HTTPS.

**ACME HTTP-01.** The coordinator sends every gateway the set of challenges in flight
(`SessionDown.http_challenges`); `challenge_table` checks them (a token is base64url, its key
authorization `<token>.<thumbprint>`) into a `{token: key authorization}` table the server holds.
`GET /.well-known/acme-challenge/<token>` on a plain connection, for any Host, is answered from
that table before routing and without a backend: 200 `text/plain` with the key authorization, or
404 for a token not in it (`challenge_answer`). The CA may reach any region's gateway (GeoDNS),
so every gateway holds the same set. The data path pays one prefix check per request for this.

**Redirect to HTTPS.** A request on a public plain listener for a host the gateway serves over TLS
(it has a TLS listener, and a certificate, file or managed, whose exact name or `*.` wildcard
covers the host) gets `301 Moved Permanently` (`308 Permanent Redirect` for methods other than
GET and HEAD, so a client keeps its method and body) to `https://<host>[:<TLS port unless
443>]<path and query>` (`HttpsRedirect`). Every other request is routed as before: hosts without
a certificate, the mesh listener and trusted peers (forwarded requests), ACME paths, the health
path. `ProxySettings.https_redirect` turns it off. Whether a host is covered is memoised per Host
value until the certificates change (the memo is bounded).

Pure apart from reading the certificate store: bytes in, response bytes (or None) out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from geomesh import validate
from geomesh.errors import ValidationError
from regional_gateway.proxy.hostnames import Authority, parse_authority

if TYPE_CHECKING:
    from regional_gateway.proxy.certificates import CertificateStore

ACME_PATH = b"/.well-known/acme-challenge/"
ACME_GET = b"GET " + ACME_PATH  # the prefix of a request line the listener answers itself
MAX_CHALLENGES = 1024  # challenges in one set (an order has one per name; many orders may run)
MEMO_LIMIT = 4096  # Host values whose redirect decision is remembered


def challenge_table(pairs: Iterable[tuple[str, str]]) -> tuple[dict[bytes, bytes], list[str]]:
    """The challenges to answer (token -> key authorization, as bytes) and the refused ones, each
    named with its reason (at most MAX_CHALLENGES are taken)."""
    table: dict[bytes, bytes] = {}
    refused: list[str] = []
    for i, (token, key_authorization) in enumerate(pairs):
        if i >= MAX_CHALLENGES:
            refused.append(f"http_challenges[{i}]: over {MAX_CHALLENGES} challenges")
            continue
        try:
            validate.acme_token(f"http_challenges[{i}].token", token)
            validate.key_authorization(f"http_challenges[{i}].key_authorization", key_authorization, token)
        except ValidationError as exc:
            refused.append(str(exc))
            continue
        table[token.encode()] = key_authorization.encode()
    return table, refused


def challenge_answer(head: bytes, table: Mapping[bytes, bytes], *, close: bool) -> tuple[int, bytes]:
    """The answer to a request whose head starts with ACME_GET: (status, response bytes)."""
    end = head.find(b" ", len(ACME_GET))
    token = head[len(ACME_GET):end].split(b"?", 1)[0]
    value = table.get(token)
    if value is None:
        return 404, _response(b"404 Not Found", b"no such ACME challenge token\n", close=close)
    return 200, _response(b"200 OK", value, close=close)


class HttpsRedirect:
    """Which plain requests go to HTTPS, and where (see the module's docstring)."""

    def __init__(self, certs: CertificateStore, https_port: int) -> None:
        self.certs = certs
        self.suffix = b"" if https_port == 443 else b":%d" % https_port
        self._memo: dict[bytes, bytes | None] = {}  # Host value -> b"https://host[:port]" or None
        self._generation = certs.generation

    def location(self, host: bytes | None, head: bytes, method: bytes) -> bytes | None:
        """Where the request goes (the Location value), or None: route it as usual."""
        if host is None:
            return None
        if self._generation != self.certs.generation or len(self._memo) >= MEMO_LIMIT:
            self._memo.clear()
            self._generation = self.certs.generation
        base = self._memo.get(host, b"")
        if base == b"":
            base = self._memo[host] = self._base(host)
        if base is None:
            return None
        target = head[len(method) + 1:head.rfind(b" ", 0, head.find(b"\r\n"))]  # origin-form path?query
        return base + target

    def _base(self, host: bytes) -> bytes | None:
        auth = parse_authority(host.decode("latin-1"))
        if type(auth) is not Authority or auth.host.startswith("[") or not self.certs.covers(auth.host):
            return None
        return b"https://" + auth.host.encode() + self.suffix


def redirect_answer(location: bytes, method: bytes, *, close: bool) -> tuple[int, bytes]:
    """301 (GET, HEAD) or 308 (other methods: kept with their body) to `location`."""
    status = 301 if method in (b"GET", b"HEAD") else 308
    reason = b"301 Moved Permanently" if status == 301 else b"308 Permanent Redirect"
    return status, _response(reason, b"redirecting to " + location + b"\n", close=close,
                             extra=b"location: " + location + b"\r\n")


def _response(status: bytes, body: bytes, *, close: bool, extra: bytes = b"") -> bytes:
    return b"".join((b"HTTP/1.1 ", status, b"\r\ncontent-type: text/plain\r\ncache-control: no-store\r\n", extra,
                     b"content-length: %d\r\n" % len(body), b"connection: close\r\n" if close else b"",
                     b"\r\n", body))
