"""Counters of the answer path, cheap enough to bump once per packet.

Every answer has a small integer `index` standing for its (rcode, region, fail-open) triple (an
answer fails open when it names gateways found unreachable because no reachable one was left,
docs/reachability.md); the transports
add one to `fast[index]` (a UDP answer served straight from the exact-query cache), `slow[index]`
(any other UDP answer) or `tcp[index]`. Plain lists and ints, no locks, no label look-ups on the
data path. `snapshot()` turns them into plain data that `geodns.metrics` exports to Prometheus
(and that worker processes send to their parent).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

RRL_ACTIONS = ("slip", "drop")
TCP_REFUSALS = ("max_connections", "per_client")  # why a TCP connection was closed at once
CACHES = ("exact", "answer")


@dataclass
class Stats:
    labels: list[tuple[str, str]] = field(default_factory=list)  # index -> (rcode, region)
    fail_open: list[bool] = field(default_factory=list)  # index -> the answer failed open
    fast: list[int] = field(default_factory=list)
    slow: list[int] = field(default_factory=list)
    tcp: list[int] = field(default_factory=list)
    cache_hits: int = 0  # answers assembled from the structured cache (exact-cache hits: sum(fast))
    cache_misses: int = 0  # answers computed from the view
    dropped: int = 0  # packets that got no reply (not a query, too large, ...)
    udp_batches: int = 0  # recvmmsg calls that returned datagrams
    udp_datagrams: int = 0  # datagrams they returned
    rrl: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RRL_ACTIONS, 0))
    oversize: int = 0  # queries over wire.MAX_QUERY_OCTETS, refused with FORMERR
    tcp_refused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TCP_REFUSALS, 0))
    _index: dict[tuple[str, str, bool], int] = field(default_factory=dict)

    def index(self, rcode: str, region: str, fail_open: bool = False) -> int:
        key = (rcode, region, fail_open)
        i = self._index.get(key)
        if i is None:
            i = self._index[key] = len(self.labels)
            self.labels.append((rcode, region))
            self.fail_open.append(fail_open)
            self.fast.append(0)
            self.slow.append(0)
            self.tcp.append(0)
        return i

    def snapshot(self) -> dict[str, Any]:
        """Plain, picklable totals: {"queries": {(transport, rcode, region): n}, ...}."""
        queries: dict[tuple[str, str, str], int] = {}
        fail_open = 0
        for i, (rcode, region) in enumerate(self.labels):
            udp = self.fast[i] + self.slow[i]
            if udp:
                queries[("udp", rcode, region)] = queries.get(("udp", rcode, region), 0) + udp
            if self.tcp[i]:
                queries[("tcp", rcode, region)] = queries.get(("tcp", rcode, region), 0) + self.tcp[i]
            if self.fail_open[i]:
                fail_open += udp + self.tcp[i]
        return {
            "queries": queries,
            "fail_open": fail_open,
            "cache_hits": self.cache_hits + sum(self.fast),
            "cache_misses": self.cache_misses,
            "dropped": self.dropped,
            "rrl": dict(self.rrl),
            "udp_batches": self.udp_batches,
            "udp_datagrams": self.udp_datagrams,
            "oversize": self.oversize,
            "tcp_refused": dict(self.tcp_refused),
        }


def merge(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """The sum of several processes' snapshots."""
    out: dict[str, Any] = {"queries": {}, "fail_open": 0, "cache_hits": 0, "cache_misses": 0, "dropped": 0,
                           "rrl": dict.fromkeys(RRL_ACTIONS, 0), "udp_batches": 0, "udp_datagrams": 0,
                           "oversize": 0, "tcp_refused": dict.fromkeys(TCP_REFUSALS, 0), "tcp_connections": 0,
                           "cache": {c: {"bytes": 0, "entries": 0, "evictions": 0} for c in CACHES}}
    for snap in snapshots:
        for key, n in snap["queries"].items():
            out["queries"][key] = out["queries"].get(key, 0) + n
        for name in ("fail_open", "cache_hits", "cache_misses", "dropped", "udp_batches", "udp_datagrams",
                     "oversize", "tcp_connections"):
            out[name] += snap.get(name, 0)
        for action, n in snap["rrl"].items():
            out["rrl"][action] = out["rrl"].get(action, 0) + n
        for reason, n in snap.get("tcp_refused", {}).items():
            out["tcp_refused"][reason] = out["tcp_refused"].get(reason, 0) + n
        for cache, values in snap.get("cache", {}).items():
            totals = out["cache"].setdefault(cache, {"bytes": 0, "entries": 0, "evictions": 0})
            for name, n in values.items():
                totals[name] = totals.get(name, 0) + n
    feeds = [snap["feed"] for snap in snapshots if "feed" in snap]
    if feeds:
        out["feed"] = {"revision": min(f["revision"] for f in feeds),
                       "connected": sum(f["connected"] for f in feeds),
                       "updates": sum(f["updates"] for f in feeds),
                       "reconnects": sum(f["reconnects"] for f in feeds)}
    out["workers"] = len(snapshots)
    return out
