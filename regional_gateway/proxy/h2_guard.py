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
reason (also the `cause` label of the error counter), and the client goes into the gateway's
penalty box (`admission.PenaltyBox`): its reconnections are refused at accept for a while.

One read can hold thousands of frames: uvloop's TLS transport hands over all it has decrypted
(reads of 240-490 KiB seen under a rapid-reset flood), and a 256 KiB read of HEADERS +
RST_STREAM pairs is about 10,000 pairs, 0.4-0.7 s of `h2` parsing in one callback, every other
client waiting.
`FrameCutter` tells the proxy where to cut what a client sent so that the `h2` state machine is
fed at most `FEED_FRAMES` frames per event-loop callback; the rest waits for the next turn of the
loop (reading paused meanwhile). It only reads the 9-octet frame headers (the length), so a
read of a few large DATA frames goes in one piece. `request_problem` checks the request
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
# frames fed to the h2 state machine per event-loop callback: `h2` takes some 30-80 µs per small
# frame (HEADERS, RST_STREAM, PING) here, so about 1-3 ms of parsing
FEED_FRAMES = 32
PREFACE_LENGTH = 24  # b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", before the client's first frame
FRAME_HEADER = 9
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


class FrameCutter:
    """Where to cut a client's byte stream so that one feed holds at most `max_frames` frames.

    Follows the frame boundaries from the 9-octet headers alone (a header split over two reads
    is kept until it is whole); a frame counts where its header starts. What it is told about
    must be the bytes that are fed, in order: `cut` returns the end of the feed and has then
    accounted for exactly that much. Garbage is cut somewhere; `h2` refuses it anyway."""

    __slots__ = ("skip", "head")

    def __init__(self, skip: int = PREFACE_LENGTH) -> None:
        self.skip = skip  # octets before the next frame header starts (the preface, a frame's payload)
        self.head = b""  # the first octets of a frame header that the last feed ended in

    def cut(self, data: bytes | memoryview, start: int = 0, max_frames: int = FEED_FRAMES) -> int:
        """The end (an offset into `data`) of the next feed starting at `start`: `len(data)`,
        or the start of the frame after the `max_frames`-th one that starts there."""
        end = len(data)
        pos = start + self.skip
        frames = 0
        if self.head:  # a header begun in the previous feed: it counted there, finish reading it
            need = FRAME_HEADER - len(self.head)
            if end - start < need:
                self.head += bytes(data[start:end])
                return end
            length = int.from_bytes((self.head + bytes(data[start:start + need]))[:3], "big")
            self.head = b""
            pos = start + need + length
        while pos < end:
            if frames >= max_frames:
                self.skip = 0
                return pos
            if pos + FRAME_HEADER > end:
                self.head = bytes(data[pos:end])
                self.skip = 0
                return end
            pos += FRAME_HEADER + int.from_bytes(data[pos:pos + 3], "big")
            frames += 1
        self.skip = pos - end
        return end


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
