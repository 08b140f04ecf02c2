"""Linearizability of per-key registers: a checker for histories recorded under faults.

A history is writes and reads of keys, each with the client's start and end time (one clock).
Per key there is one writer at a time, writing values that increase (its sequence number); a
write that failed or timed out has no end (`end=None`): it may have applied or not, at any time
after it started. The checker is pure and sound (every `Violation` it reports is a real breach
of linearizability) though not complete; it finds what a failing store or client does break:
a value nobody wrote, a read of a write that had not begun, a stale read (an acknowledged later
write had ended before the read began) and a read going back in time behind an earlier read.
Used by `bench/faults.py` and the etcd cluster tests. Cost: O(n log n) per key.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Write:
    key: str
    value: int  # unique per key, increasing in the writer's order
    start: float
    end: float | None  # None: not acknowledged (outcome unknown)


@dataclass(frozen=True, slots=True)
class Read:
    key: str
    value: int | None  # None: the key had no value
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class Violation:
    key: str
    rule: str  # unwritten | future | stale | backwards
    read: Read
    detail: str


def check(writes: Iterable[Write], reads: Iterable[Read]) -> list[Violation]:
    """Every rule broken by a read of the history; [] for a history that passed."""
    by_key_w: dict[str, list[Write]] = defaultdict(list)
    by_key_r: dict[str, list[Read]] = defaultdict(list)
    for w in writes:
        by_key_w[w.key].append(w)
    for r in reads:
        by_key_r[r.key].append(r)
    out: list[Violation] = []
    for k, rs in by_key_r.items():
        out += _check_key(k, sorted(by_key_w.get(k, []), key=lambda w: w.value), rs)
    return out


def _check_key(k: str, ws: list[Write], rs: list[Read]) -> list[Violation]:
    for a, b in zip(ws, ws[1:], strict=False):
        if a.value == b.value:
            raise ValueError(f"key {k!r}: value {a.value} written twice")
        if a.end is not None and b.start < a.end:
            raise ValueError(f"key {k!r}: writes {a.value} and {b.value} overlap (one writer at a time)")
    index = {w.value: i for i, w in enumerate(ws)}
    acked = [(w.end, i) for i, w in enumerate(ws) if w.end is not None]
    acked.sort()
    acked_ends = [e for e, _ in acked]
    latest_acked = []  # latest_acked[n]: the highest index among the first n+1 acked writes by end
    best = -1
    for _, i in acked:
        best = max(best, i)
        latest_acked.append(best)
    out: list[Violation] = []
    floor, floor_read = -1, None  # the newest write some read that ended already saw
    by_end = sorted(rs, key=lambda r: r.end)
    pos = 0
    for r in sorted(rs, key=lambda r: r.start):
        while pos < len(by_end) and by_end[pos].end < r.start:
            seen = by_end[pos]
            if seen.value is not None and seen.value in index and index[seen.value] > floor:
                floor, floor_read = index[seen.value], seen
            pos += 1
        if r.value is None:
            i = -1
        elif r.value not in index:
            out.append(Violation(k, "unwritten", r, f"value {r.value} was never written"))
            continue
        else:
            i = index[r.value]
            if ws[i].start > r.end:
                out.append(Violation(k, "future", r, f"value {r.value} was written only after the read ended"))
                continue
        n = bisect.bisect_left(acked_ends, r.start)
        newest = latest_acked[n - 1] if n else -1
        overwritten = i == -1 or ws[i].end is not None
        if overwritten and newest > i:
            out.append(Violation(k, "stale", r, f"read {r.value} after write {ws[newest].value} was acknowledged"))
        elif overwritten and floor > i:
            out.append(Violation(k, "backwards", r,
                                 f"read {r.value} after an earlier read saw {floor_read.value if floor_read else None}"))
    return out
