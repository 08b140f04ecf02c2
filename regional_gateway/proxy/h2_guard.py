"""Rules that protect the HTTP/2 proxy from hostile clients, kept apart from the I/O (sans-IO).

Three things a client can make an HTTP/2 server do for free, each bounded per connection here:

- **rapid reset** (CVE-2023-44487): open a stream and reset it at once, thousands of times a
  second, so the server starts work (a backend stream) that is cancelled before it matters.
  Client RST_STREAMs and streams the gateway had to refuse are counted in a `RateBudget`; every
  stream that completes normally earns one back, so a client that cancels some of its calls
  (deadlines, hedging) never runs out, and one that only resets does after `max_resets`;
- **no-op frame floods** (CVE-2019-9512 ping, 9515 settings, 9516/9518 empty frames, 9513
  priority): PING, SETTINGS, PRIORITY, WINDOW_UPDATE, unknown frames and empty DATA frames
  without END_STREAM cost the server a reply or work and carry nothing. They share one budget;
  the DATA the gateway sends earns some back (a client acknowledges what it receives with
  WINDOW_UPDATEs and, for gRPC's bandwidth probe, PINGs);
- **replies nobody reads**: while the client does not read (the transport is over its
  high-water mark) the gateway stops reading it, and at most `MAX_QUEUED_CONTROL` replies
  (PING and SETTINGS ACKs) may be produced in that state.

Past a budget the connection gets GOAWAY (ENHANCE_YOUR_CALM) and is closed; `Calm` names the
reason (also the `cause` label of the error counter). `request_problem` checks the request
head for what the `h2` library does not: it already refuses, as a connection error
(GOAWAY PROTOCOL_ERROR), CR/LF/NUL in any field value, upper-case or empty field names,
connection-specific fields, `te` other than `trailers`, an empty `:path` and a content-length
that the DATA frames do not match; what it lets through and matters to a backend that turns
HTTP/2 into an HTTP/1.1 request line is whitespace or a control character in `:method`,
`:path`, `:scheme` or `:authority`.
"""

from __future__ import annotations

import enum
import re

# a connection may cause this many client resets/refused streams, or send this many no-op
# frames, in a burst; the budget refills over WINDOW seconds (so the long-run rate is N/WINDOW)
DEFAULT_MAX_RESETS = 1000
DEFAULT_MAX_CONTROL_FRAMES = 1000
WINDOW = 10.0
# PING/SETTINGS ACKs the gateway may produce while the client is not reading
MAX_QUEUED_CONTROL = 1000
# no-op frames earned back per DATA frame sent to the client (a WINDOW_UPDATE for the stream,
# one for the connection, a bandwidth-probe PING)
CREDIT_PER_DATA_FRAME = 3
DATA_FRAME = 16384


class Calm(enum.Enum):
    """Why a connection was told to calm down (GOAWAY ENHANCE_YOUR_CALM)."""

    RAPID_RESET = "h2-rapid-reset"
    CONTROL_FLOOD = "h2-control-flood"
    UNREAD_REPLIES = "h2-unread-replies"


class RateBudget:
    """A leaky bucket: `hit()` adds one, the level drains at `limit / window` per second, and
    the budget is exceeded when the level goes over `limit` (a burst of `limit`, then
    `limit / window` per second). `credit(n)` takes n off (work that earns the budget back).
    Times are seconds on any monotonic clock the caller passes in."""

    __slots__ = ("limit", "rate", "level", "last")

    def __init__(self, limit: int, window: float = WINDOW, now: float = 0.0) -> None:
        self.limit = limit
        self.rate = limit / window
        self.level = 0.0
        self.last = now

    def hit(self, now: float, n: int = 1) -> bool:
        """Count `n` events at `now`; True when the budget is exceeded."""
        level = self.level
        if now != self.last:
            level -= (now - self.last) * self.rate
            if level < 0.0:
                level = 0.0
            self.last = now
        level += n
        self.level = level
        return level > self.limit

    def credit(self, n: float) -> None:
        level = self.level - n
        self.level = level if level > 0.0 else 0.0


def data_credit(sent: int) -> int:
    """No-op frames earned back by sending `sent` bytes of DATA to the client."""
    return CREDIT_PER_DATA_FRAME * (1 + sent // DATA_FRAME)


_REQUEST_PSEUDO = (b":method", b":path", b":scheme", b":authority")
_BAD_BYTE = re.compile(rb"[\x00-\x20\x7f]")


def request_problem(headers: list[tuple[bytes, bytes]]) -> str | None:
    """What is wrong with a request head that `h2` accepted, or None. Pseudo-header fields come
    first (`h2` enforces it), so only those are looked at: a space, tab or control character in
    one of them would split or extend an HTTP/1.1 request line behind a downgrading backend."""
    for name, value in headers:
        if not name.startswith(b":"):
            break
        if name in _REQUEST_PSEUDO and _BAD_BYTE.search(value) is not None:
            return f"{name.decode()} holds whitespace or a control character: {value[:64]!r}"
    return None
