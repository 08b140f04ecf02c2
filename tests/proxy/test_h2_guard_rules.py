"""Table tests of the gateway's HTTP/2 guard rules (`regional_gateway.proxy.h2_guard`), pure: the
per-connection rate budgets and their credit, the request-head problems it refuses, and the frame
cutter that feeds a large read to the h2 state machine in slices on frame boundaries. The same
rules against a real gateway and real clients are in `test_h2_abuse.py`."""

from __future__ import annotations

import random

import h2.errors
import pytest

from regional_gateway.proxy.h2_guard import FEED_FRAMES, FrameCutter, RateBudget, data_credit, request_problem
from tests.proxy.test_h2_abuse import client, request_headers


@pytest.mark.parametrize(("hits", "gap", "limit", "over"), [
    (10, 0.0, 10, False),   # a burst of `limit` is allowed
    (11, 0.0, 10, True),    # one more is not
    (30, 1.0, 10, False),   # refilled at limit/window per second: 1 a second here
    (30, 0.5, 10, True),    # faster than the refill: over after about 20
])
def test_rate_budget(hits, gap, limit, over):
    b = RateBudget(limit, window=10.0)
    results = [b.hit(i * gap) for i in range(hits)]
    assert any(results) is over


def test_rate_budget_credit():
    b = RateBudget(10, window=10.0)
    for _ in range(10):
        b.hit(0.0)
    b.credit(5)
    assert not any(b.hit(0.0) for _ in range(5))
    assert b.hit(0.0)
    b.credit(100)
    assert b.level == 0.0


def test_data_credit():
    assert data_credit(1) == 3 and data_credit(16384) == 6 and data_credit(100_000) == 21


@pytest.mark.parametrize(("headers", "problem"), [
    ([(b":method", b"GET"), (b":path", b"/a/b?c=d%20e"), (b"x", b"a b")], None),
    ([(b":method", b"GET"), (b":path", b"/a b")], ":path"),
    ([(b":method", b"GET"), (b":path", b"/a\tb")], ":path"),
    ([(b":method", b"GET"), (b":path", b"/a\x7fb")], ":path"),
    ([(b":method", b"GE T"), (b":path", b"/")], ":method"),
    ([(b":authority", b"a.test\x01"), (b":path", b"/")], ":authority"),
    ([(b":scheme", b"https "), (b":path", b"/")], ":scheme"),
    ([(b":path", b"/\xc3\xa9")], None),  # raw UTF-8 is not a request-line splitter
    ([(b":method", b"GET"), (b"x-later", b"a\x01")], None),  # regular fields: h2's job
])
def test_request_problem(headers, problem):
    got = request_problem(headers)
    assert (got is None) if problem is None else (got is not None and got.startswith(problem))


def _frames() -> bytes:
    """A client's preface and frames of several sizes (HEADERS, RST_STREAM, DATA, PING, SETTINGS)."""
    c = client()
    for i in range(200):
        sid = 1 + 2 * i
        c.send_headers(sid, request_headers("a.test", method=b"POST"))
        if i % 3 == 0:
            c.send_data(sid, b"x" * (i * 37 % 700), end_stream=True)
        elif i % 3 == 1:
            c.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        else:
            c.ping(i.to_bytes(8, "big"))
            c.end_stream(sid)
    return c.data_to_send()


def _frame_starts(data: bytes) -> list[int]:
    starts, pos = [], 24
    while pos < len(data):
        starts.append(pos)
        pos += 9 + int.from_bytes(data[pos:pos + 3], "big")
    return starts


@pytest.mark.parametrize("max_frames", [1, 7, FEED_FRAMES])
@pytest.mark.parametrize("seed", range(4))
def test_frame_cutter_feeds_at_most_max_frames_on_frame_boundaries(max_frames, seed):
    data = _frames()
    starts = _frame_starts(data)
    rng = random.Random(seed)
    reads, i = [], 0
    while i < len(data):  # what the transport delivers: any split, down to single octets
        n = rng.choice([1, 2, 5, 9, 10, 100, 4000, 70000])
        reads.append(data[i:i + n])
        i += n
    cutter, offset, feeds = FrameCutter(), 0, []
    for read in reads:
        at = 0
        while at < len(read):
            end = cutter.cut(read, at, max_frames)
            assert end > at
            feeds.append((offset + at, offset + end))
            at = end
        offset += len(read)
    assert feeds[0][0] == 0 and feeds[-1][1] == len(data)
    assert all(a[1] == b[0] for a, b in zip(feeds, feeds[1:], strict=False))  # contiguous, in order
    for a, b in feeds:
        inside = [p for p in starts if a <= p < b]
        assert len(inside) <= max_frames
        if b < len(data) and b not in (offset for offset in starts):
            # a feed ends mid-frame only where the read ended (never cut early inside a frame)
            assert any(b == sum(len(r) for r in reads[:k]) for k in range(1, len(reads) + 1))


def test_frame_cutter_accepts_a_memoryview_and_garbage():
    data = _frames()
    cutter = FrameCutter()
    assert cutter.cut(memoryview(data), 0, 3) == _frame_starts(data)[3]
    junk = FrameCutter()
    end = junk.cut(b"\xff" * 100, 0, 2)  # not HTTP/2: cut somewhere, h2 refuses it anyway
    assert 0 < end <= 100
