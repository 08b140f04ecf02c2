"""The arithmetic of the benchmarks: percentiles, medians over rounds, cell formatting, an aim
as a CPU budget.

Pure functions over lists of numbers, shared by `bench/coordinator.py`,
`bench/mesh_convergence.py`, `bench/http.py` and `bench/dns.py`. Percentiles are nearest-rank on the sorted sample (no
interpolation), so p99 of fewer than 100 samples is the largest-but-one or the maximum.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 1]; NaN for an empty sample."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def median(values: Sequence[float]) -> float:
    clean = [v for v in values if not math.isnan(v)]
    return statistics.median(clean) if clean else math.nan


def fmt(value: float, digits: int = 2) -> str:
    if value is None or math.isnan(value):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def fmt_bytes(value: float) -> str:
    if value is None or math.isnan(value):
        return "-"
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def ratio(a: float, b: float) -> float:
    if b == 0 or math.isnan(a) or math.isnan(b):
        return math.nan
    return a / b


def cpu_budget(peer_us: float, floor_us: float, aim: float) -> dict[str, float]:
    """An aim "`aim` x the peer's rate on one core" as CPU per operation (request, query): a
    server that is CPU-bound reaches it when it spends at most the peer's CPU per operation /
    `aim` (`allowed_us`). `headroom_us` is what that leaves above `floor_us`, the cost of the
    least a server on our stack can do per operation, measured in the same run: what all of our
    own work must fit in; <= 0 means the aim sits below the floor."""
    allowed = peer_us / aim
    return {"peer_us": peer_us, "floor_us": floor_us, "allowed_us": allowed, "headroom_us": allowed - floor_us}
