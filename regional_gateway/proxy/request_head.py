"""The HTTP/1 request-head rules the gateway enforces before it forwards anything.

Pure functions over header values: each returns what the gateway forwards, or a `Refusal` (the
status and the message of the answer). `downstream.ClientConnection` calls them only for heads
that are not plain (a special header, an odd target or method), so a common request pays
nothing for them. The rules are the ones HAProxy and nginx apply against request smuggling:

- `Connection` may name hop-by-hop headers to drop, but never the framing (`Content-Length`,
  `Transfer-Encoding`), the routing (`Host`) or a header the gateway sets itself (the
  client-address headers, `X-Geomesh-Forwarded`): naming one is a 400 (RFC 9110 section 7.6.1
  lets a proxy drop what `Connection` names, which would desynchronise gateway and backend);
- `Transfer-Encoding` must end with exactly one `chunked` (RFC 9112 section 6.1); anything else
  (`identity`, `xchunked`, `chunked, identity`, two `chunked`) is a 400 before the head is sent,
  and in an HTTP/1.0 request it is refused too (the framing cannot be trusted);
- an absolute-form target (`GET http://host/path`) is split into its authority (routed by, and
  compared with Host) and the origin-form forwarded (RFC 9112 section 3.2.2);
- only HTTP/1.0 and HTTP/1.1 are forwarded: other versions get a 505.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from regional_gateway.proxy.client_address import CLIENT_ADDRESS_HEADERS, LOOKALIKE_HEADERS, mesh_headers
from regional_gateway.proxy.exchange import Exchange
from regional_gateway.proxy.hostnames import Authority, parse_authority
from regional_gateway.proxy.http_errors import (
    BadFraming,
    BadHost,
    BadRequest,
    BodyTooLarge,
    HeadersTooLarge,
    MethodNotAllowed,
    ProtectedHeader,
    ProxyError,
    SniMismatch,
    VersionNotSupported,
)

# Connection tokens that are hop-by-hop anyway (the gateway writes its own connection management)
CONNECTION_OPTIONS = frozenset((b"close", b"keep-alive", b"upgrade"))
# headers `Connection` may never remove: framing, routing, and what the gateway sets or trusts
PROTECTED_HEADERS = frozenset((b"host", b"content-length", b"transfer-encoding")) | CLIENT_ADDRESS_HEADERS \
    | LOOKALIKE_HEADERS
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a head is refused: `kind` picks the error class (see `downstream`), `message` names the rule."""

    kind: str  # "protected-header", "framing", "host", "version"
    message: str


def connection_drops(value: bytes) -> frozenset[bytes] | Refusal:
    """The header names a `Connection` value (all fields joined by ',') asks to drop, lower case."""
    names = frozenset(t.strip(b" \t").lower() for t in value.split(b",")) - CONNECTION_OPTIONS - {b""}
    bad = sorted(names & PROTECTED_HEADERS)
    if bad:
        shown = bad[0].decode("latin-1")
        return Refusal("protected-header", f"Connection names {shown!r}: the gateway does not let a client "
                                           "remove framing, routing or client-address headers")
    return names


def transfer_coding(value: bytes, version: str) -> bytes | Refusal:
    """The Transfer-Encoding to forward for the received value(s) (joined by ','), or a refusal."""
    if version == "1.0":
        return Refusal("framing", "Transfer-Encoding in an HTTP/1.0 request (RFC 9112 section 6.1)")
    codings = [t.strip(b" \t").lower() for t in value.split(b",")]
    if not codings or codings[-1] != b"chunked":
        return Refusal("framing", f"Transfer-Encoding {_show(value)} does not end with chunked")
    if codings.count(b"chunked") > 1:
        return Refusal("framing", f"Transfer-Encoding {_show(value)} applies chunked more than once")
    for c in codings:
        name = c.split(b";", 1)[0].strip(b" \t")
        if not name or not set(name) <= _TCHAR:
            return Refusal("framing", f"Transfer-Encoding {_show(value)} has an empty or invalid coding")
    return b", ".join(codings)


def split_target(url: bytes) -> tuple[bytes, bytes] | Refusal:
    """An absolute-form target -> (authority, origin-form target); refused if not http(s)://host[...]."""
    scheme, sep, rest = url.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return Refusal("host", f"request target {_show(url)} is neither a path nor an http(s) URL")
    end = len(rest)
    for ch in (b"/", b"?", b"#"):
        i = rest.find(ch)
        if 0 <= i < end:
            end = i
    authority, tail = rest[:end], rest[end:]
    if b"@" in authority:
        return Refusal("host", "a user name in the request target is not allowed")
    if not authority:
        return Refusal("host", f"request target {_show(url)} has no host")
    if tail.startswith(b"#"):
        return Refusal("host", "a fragment in the request target is not allowed")
    if not tail.startswith(b"/"):
        tail = b"/" + tail
    return authority, tail


def version_refusal(version: str) -> Refusal | None:
    """None for the versions forwarded (1.0, 1.1); a 505 otherwise (HTTP/2.0 request lines, 0.9)."""
    if version == "1.1" or version == "1.0":
        return None
    return Refusal("version", f"HTTP/{version} requests are not served here: use HTTP/1.1, or HTTP/2 over TLS "
                              "with ALPN h2")


# ---------------------------------------------------------------- the head builder

_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"))
_ADDR = CLIENT_ADDRESS_HEADERS
_SPECIAL = _HOP | _ADDR | LOOKALIKE_HEADERS | frozenset((b"host", b"transfer-encoding", b"content-length"))
_ODD_METHODS = frozenset((b"CONNECT", b"TRACE"))  # refused (405); checked with the other odd-request signs
_CONN_SIMPLE = frozenset((b"keep-alive", b"close", b"upgrade"))  # a Connection value that names no header
_REFUSALS: dict[str, type[ProxyError]] = {"protected-header": ProtectedHeader, "framing": BadFraming,
                                          "host": BadHost, "version": VersionNotSupported}
_VERSION_LINE = {"1.1": b" HTTP/1.1\r\n", "1.0": b" HTTP/1.0\r\n"}


class HeadParser(Protocol):
    """What `HeadBuilder.complete` asks of the parser (httptools' `HttpRequestParser`)."""

    def get_http_version(self) -> str: ...
    def should_upgrade(self) -> bool: ...


class HeadBuilder:
    """One connection's request head under construction, and the rules that complete it.

    The parser's `on_url` and `on_header` callbacks are this object's methods (`ParserCallbacks`
    hands them to httptools, which binds them once); `complete` turns the head into the bytes to
    forward, or a `ProxyError` on the exchange. No I/O: the connection decides what to do with
    the result. The rarely used fields are reset only when `h_special` (a head with a header the
    gateway interprets), so a plain head costs a list, a URL and a Host.
    """

    __slots__ = ("trusted", "sni", "client_ip", "scheme", "addr_headers", "max_headers", "max_header_bytes",
                 "max_body_bytes", "h_parts", "h_url", "h_host", "h_dropped", "h_dropped_size", "h_special",
                 "h_te", "h_te_val", "h_cl", "h_err", "h_xff", "h_fwd", "h_proto", "h_mark", "h_upgrade", "h_conn")

    def __init__(self, *, trusted: bool, sni: bytes | None, client_ip: str, scheme: str, addr_headers: bytes,
                 max_headers: int, max_header_bytes: int, max_body_bytes: int) -> None:
        self.trusted = trusted  # a peer gateway: its client-address headers are believed
        self.sni = sni  # the TLS server name, which Host must name (None: not TLS)
        self.client_ip = client_ip
        self.scheme = scheme
        self.addr_headers = addr_headers  # the client-address headers of an untrusted client
        self.max_headers = max_headers
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes  # 0: no limit
        self.h_parts: list[bytes] = []  # name, b": ", value, CRLF per forwarded field
        self.h_url = b""
        self.h_host: bytes | None = None
        self.h_dropped = 0  # header fields not forwarded as they came (only ever set with h_special)
        self.h_dropped_size = 0
        self.h_special = False
        self.h_te = False
        self.h_te_val = b""
        self.h_cl = -1
        self.h_err: ProxyError | None = None
        self.h_xff: bytes | None = None
        self.h_fwd: bytes | None = None
        self.h_proto: bytes | None = None
        self.h_mark: bytes | None = None
        self.h_upgrade: bytes | None = None
        self.h_conn: bytes | None = None

    def complete(self, ex: Exchange, keep: bool, read_bytes: int, parser: HeadParser) -> bool:
        """The head is complete: fill `ex` (`head`, `host`, body framing, `upgrade`; or `error`)
        and reset for the next head. Returns whether the connection may read another request.

        `read_bytes` is the size of the reads the head came in (an upper bound of its size: only a
        head that may be too large is measured); the parser is asked for the version and the
        upgrade only when needed (the common head needs neither)."""
        method = ex.method
        host = ex.host = self.h_host
        count = (len(self.h_parts) >> 2) + self.h_dropped
        too_big = read_bytes > self.max_header_bytes and self._head_size() > self.max_header_bytes
        # the odd requests: a special header, an odd method, no Host, too many fields, a target that
        # is not a path (absolute-form, `*`), a Host other than the TLS SNI
        if self.h_special or method in _ODD_METHODS or host is None or count > self.max_headers \
                or self.h_url[:1] != b"/" or (self.sni is not None and host != self.sni):
            self._head_checks(ex, method, count, too_big, parser.get_http_version() if self.h_te else "",
                              parser.should_upgrade() if self.h_upgrade is not None else False)
        elif too_big:
            ex.error = HeadersTooLarge(f"request head over {self.max_header_bytes} bytes")
        if ex.error is None:
            if keep and not self.h_special and not self.trusted:  # plain HTTP/1.1 (1.0 keep-alive needs a header)
                ex.head = b"".join((method, b" ", self.h_url, b" HTTP/1.1\r\n", *self.h_parts, self.addr_headers,
                                    b"\r\n"))
            else:
                ex.head = self._head_slow(ex, method, parser.get_http_version())
                if ex.error is not None:
                    keep = False
        elif ex.error.closes:
            keep = False
        if self.h_special:
            self.reset()
        else:  # inlined reset, the common case
            self.h_parts = []
            self.h_url = b""
            self.h_host = None
        return keep

    def size(self) -> int:
        """Header fields + URL in bytes of the head in progress, as received."""
        return self._head_size()

    def reset(self) -> None:
        """Forget the head in progress (after it completed, or failed)."""
        self.h_parts = []
        self.h_url = b""
        self.h_host = None
        if self.h_special:
            self.h_special = False
            self.h_dropped = 0
            self.h_dropped_size = 0
            self.h_te = False
            self.h_te_val = b""
            self.h_cl = -1
            self.h_err = None
            self.h_xff = self.h_fwd = self.h_proto = self.h_mark = self.h_upgrade = self.h_conn = None

    def on_url(self, url: bytes) -> None:
        self.h_url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # the common header costs a lower(), a set lookup and an append; how many fields and bytes
        # the head holds is derived when it completes (`_head_size`), not counted per field here
        lname = name.lower()
        if lname not in _SPECIAL:
            self.h_parts += (name, b": ", value, b"\r\n")
            return
        if lname == b"host" and self.h_host is None:
            self.h_host = value
            self.h_parts += (name, b": ", value, b"\r\n")
            return
        self.h_special = True
        if not self._special_header(lname, name, value):  # not forwarded as is: count it here
            self.h_dropped += 1
            self.h_dropped_size += len(name) + len(value) + 4

    def _special_header(self, lname: bytes, name: bytes, value: bytes) -> bool:
        """A header the gateway interprets; True if it is forwarded as it came (into `h_parts`).

        Content-Length and Transfer-Encoding are never forwarded as they came: `_head_slow` writes
        the framing of the body the gateway forwards (llhttp has already refused the ambiguous
        combinations: both, two lengths, a length that is not digits)."""
        if lname == b"host":
            self._head_error(BadHost("more than one Host header"))
        elif lname == b"content-length":
            digits = value.strip(b" \t")
            if self.h_cl >= 0:
                self._head_error(BadFraming("more than one Content-Length"))
            elif not digits.isdigit():
                self._head_error(BadFraming(f"Content-Length {value[:40]!r} is not a decimal number"))
            else:
                self.h_cl = int(digits)
            return False
        elif lname == b"transfer-encoding":
            self.h_te = True
            self.h_te_val = value if not self.h_te_val else self.h_te_val + b"," + value
            return False
        elif lname == b"connection":
            self.h_conn = value if self.h_conn is None else self.h_conn + b"," + value
            return False
        elif lname == b"upgrade":
            self.h_upgrade = value
            return False
        elif lname in _ADDR:
            if not self.trusted:
                return False
            if lname == b"x-forwarded-for":
                self.h_xff = value if self.h_xff is None else self.h_xff + b", " + value
                return False
            if lname == b"forwarded":
                self.h_fwd = value if self.h_fwd is None else self.h_fwd + b", " + value
                return False
            if lname == b"x-forwarded-proto":
                self.h_proto = value
                return False
            if lname == b"x-geomesh-forwarded":
                self.h_mark = value  # and the app sees which gateway forwarded it
        elif lname in LOOKALIKE_HEADERS:  # X_Forwarded_For, True-Client-IP, ...: believed from a peer only
            if not self.trusted:
                return False
        else:  # other hop-by-hop headers (keep-alive, te, trailer, proxy-connection) are dropped
            return False
        self.h_parts += (name, b": ", value, b"\r\n")
        return True

    def _head_error(self, err: ProxyError) -> None:
        if self.h_err is None:  # the first problem found is the one answered
            self.h_err = err

    def _head_size(self) -> int:
        """Header fields + URL in bytes, as received (name, ': ', value, CRLF per field)."""
        return sum(map(len, self.h_parts)) + self.h_dropped_size + len(self.h_url)

    def _head_checks(self, ex: Exchange, method: bytes, count: int, too_big: bool, version: str, upgrade: bool) -> None:
        """The checks a plain request does not need (a special header, or an odd request)."""
        ex.chunked = self.h_te
        ex.has_body = self.h_te or self.h_cl > 0
        if self.h_err is not None:
            ex.error = self.h_err
        elif count > self.max_headers:
            ex.error = HeadersTooLarge(f"{count} header fields, at most {self.max_headers}")
        elif too_big:
            ex.error = HeadersTooLarge(f"request head over {self.max_header_bytes} bytes")
        elif method in _ODD_METHODS:
            ex.error = MethodNotAllowed(f"{method.decode('latin-1')} is not supported by this gateway")
        elif self.h_host is None and self.sni is None:
            ex.error = BadRequest("no Host header: the gateway routes by host name")
        elif self.max_body_bytes and self.h_cl > self.max_body_bytes:
            ex.error = BodyTooLarge(f"Content-Length {self.h_cl} is over the limit of {self.max_body_bytes} bytes")
        elif self.h_te:  # before anything is sent: llhttp itself objects only after the head went out
            coding = transfer_coding(self.h_te_val, version)
            if type(coding) is Refusal:
                ex.error = _REFUSALS[coding.kind](coding.message)
            else:
                self.h_te_val = coding  # type: ignore[assignment]
        if ex.error is None and self.h_url[:1] != b"/":
            ex.error = self._absolute_target(ex, method)
        if ex.error is None and self.sni is not None and ex.host is not None and ex.host != self.sni:
            ex.error = self._check_sni(ex.host)
        if ex.error is None and self.h_upgrade is not None:
            ex.upgrade = upgrade

    def _absolute_target(self, ex: Exchange, method: bytes) -> ProxyError | None:
        """An absolute-form target (RFC 9112 section 3.2.2): routed by its authority, which must
        agree with Host; the backend gets the origin-form and a Host naming the same server."""
        url = self.h_url
        if url == b"*":
            return None if method == b"OPTIONS" else BadRequest("the '*' target is only for OPTIONS")
        split = split_target(url)
        if type(split) is Refusal:
            return BadHost(split.message)
        authority, origin = split  # type: ignore[misc]
        auth = parse_authority(authority.decode("latin-1"))
        if type(auth) is not Authority:
            return BadHost(f"bad host in the request target: {auth.reason}")  # type: ignore[union-attr]
        canon = auth.render().encode()
        if self.h_host is not None:
            host = parse_authority(self.h_host.decode("latin-1"))
            if type(host) is not Authority or host.host != auth.host or \
                    (host.port is not None and auth.port is not None and host.port != auth.port):
                return BadHost(f"the request target names {auth.render()!r} but Host is "
                               f"{self.h_host[:100].decode('latin-1')!r}")
            parts = self.h_parts
            for i in range(0, len(parts), 4):  # forward Host as the target names it
                if parts[i].lower() == b"host":
                    parts[i + 2] = canon
                    break
        else:
            self.h_parts += (b"Host", b": ", canon, b"\r\n")
        ex.host = canon
        self.h_url = origin
        return None

    def _check_sni(self, host: bytes) -> ProxyError | None:
        """Over TLS, Host must name the server the client asked for in SNI (RFC 9110 section 7.4:
        otherwise a certificate for one name would front for every app: 421)."""
        sni = self.sni
        assert sni is not None
        got = parse_authority(host.decode("latin-1"))
        if type(got) is not Authority:
            return BadHost(f"bad Host {host[:100].decode('latin-1')!r}: {got.reason}")  # type: ignore[union-attr]
        want = parse_authority(sni.decode("latin-1"))
        if type(want) is Authority and want.host == got.host:
            return None
        return SniMismatch(f"Host {got.host!r} is not the name this TLS connection was opened for "
                           f"({sni.decode('latin-1')!r}): open a connection for {got.host!r}")

    def _head_slow(self, ex: Exchange, method: bytes, version: str) -> bytes:
        """The upstream head when the request had special headers, came from the mesh, or is not 1.1.

        May refuse the request instead (sets `ex.error`): a Connection header naming a protected
        header, an HTTP version other than 1.0/1.1."""
        refused = version_refusal(version)
        if refused is not None:
            ex.error = _REFUSALS[refused.kind](refused.message)
            return b""
        parts = self.h_parts
        conn = self.h_conn
        if conn is not None and conn.lower() not in _CONN_SIMPLE:
            drops = connection_drops(conn)
            if type(drops) is Refusal:
                ex.error = _REFUSALS[drops.kind](drops.message)
                return b""
            if drops:  # headers the client named hop-by-hop in Connection are not forwarded
                parts = _drop_named(parts, drops)  # type: ignore[arg-type]
        addr = self.addr_headers
        if self.trusted:
            addr = mesh_headers(self.client_ip, self.scheme, self.h_xff, self.h_fwd, self.h_proto)
            ex.marked = self.h_mark is not None
        # the framing of the body as the gateway forwards it, never the client's header as it came
        if self.h_te:
            frame = b"Transfer-Encoding: " + self.h_te_val + b"\r\n"
        elif self.h_cl >= 0:
            frame = b"Content-Length: %d\r\n" % self.h_cl
        else:
            frame = b""
        extra = b""
        if ex.upgrade and self.h_upgrade is not None:
            extra = b"Connection: upgrade\r\nUpgrade: " + self.h_upgrade + b"\r\n"
            ex.keep_alive = False  # after an upgrade attempt the client's stream is no longer HTTP
        elif version != "1.1":
            extra = b"Connection: keep-alive\r\n"
        line = _VERSION_LINE[version]
        return b"".join((method, b" ", self.h_url, line, *parts, frame, addr, extra, b"\r\n"))



def with_host(head: bytes, host: bytes, replace: bool) -> bytes:
    """`head` with its Host value replaced by `host` (or a Host line added after the request line)."""
    if replace:
        i = head.lower().find(b"\r\nhost:")
        if i >= 0:
            start = i + 7
            end = head.index(b"\r\n", start)
            return head[:start] + b" " + host + head[end:]
    line_end = head.index(b"\r\n") + 2
    return head[:line_end] + b"Host: " + host + b"\r\n" + head[line_end:]


def _drop_named(parts: list[bytes], names: set[bytes] | frozenset[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for i in range(0, len(parts), 4):
        if parts[i].lower() not in names:
            out += parts[i:i + 4]
    return out


def _show(value: bytes) -> str:
    return repr(value[:80].decode("latin-1"))


class MessageEvents(Protocol):
    """The parser callbacks a connection takes itself (`downstream.ClientConnection`)."""

    def on_message_begin(self) -> None: ...
    def on_headers_complete(self) -> None: ...
    def on_body(self, data: bytes) -> None: ...
    def on_message_complete(self) -> None: ...


class ParserCallbacks:
    """What httptools calls: the head callbacks go to the `HeadBuilder`, the rest to the connection.

    httptools looks each callback up once, when the parser is made, so routing them through this
    object costs nothing per call."""

    __slots__ = ("on_message_begin", "on_url", "on_header", "on_headers_complete", "on_body", "on_message_complete")

    def __init__(self, conn: MessageEvents, head: HeadBuilder) -> None:
        self.on_message_begin = conn.on_message_begin
        self.on_url = head.on_url
        self.on_header = head.on_header
        self.on_headers_complete = conn.on_headers_complete
        self.on_body = conn.on_body
        self.on_message_complete = conn.on_message_complete
