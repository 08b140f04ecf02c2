"""Prometheus metrics of geomesh-dns, read from `geodns.stats` snapshots at scrape time.

The answer path only bumps plain counters (`Stats`); this collector turns a snapshot into
metric families when Prometheus scrapes, so the data path pays nothing for labels or locks.
With `--workers N` the parent process serves the metrics and sums the snapshots its workers
send it every second. Exported:

- `geodns_queries_total{transport,rcode,region}` queries answered (region: where the answer's
  gateways are, empty for answers without gateways)
- `geomesh_dns_fail_open_total` app (and `gw.<region>`) answers that named gateways found
  unreachable because no reachable one was left (fail-open, docs/reachability.md)
- `geodns_cache_hits_total`, `geodns_cache_misses_total`, `geodns_cache_hit_ratio`
- `geodns_dropped_total` packets that got no reply; `geodns_rrl_total{action}` slip/drop
- `geodns_udp_batches_total`, `geodns_udp_datagrams_total` recvmmsg calls and what they read
- `geodns_cache_bytes{cache}`, `geodns_cache_entries{cache}` what the exact and answer caches
  hold (accounted bytes), `geodns_cache_evictions_total{cache}` entries evicted to stay in bounds
- `geodns_oversize_queries_total` queries refused with FORMERR for their size
- `geodns_tcp_connections` open TCP connections, `geodns_tcp_refused_total{reason}` connections
  closed at once (`max_connections`: the process is full; `per_client`: that client's share is)
- `geodns_region_map_build_seconds{stage}` how long the last build took (`database`: walking the
  GeoIP file; `regions`: ranking its places against the regions), `geodns_region_map_builds_total{stage}`,
  `geodns_region_map_failures_total`, `geodns_region_map_bytes`, `geodns_region_map_blocks`,
  `geodns_region_map_rankings`, `geodns_region_map_ready` (processes answering from a map),
  `geodns_region_map_rss_bytes` the process's memory after the last build
- `geodns_geoip_build_timestamp_seconds`, `geodns_geoip_age_seconds` when the loaded database was built
- `geodns_table_revision`, `geodns_feed_connected`, `geodns_feed_updates_total`,
  `geodns_feed_reconnects_total`, `geodns_workers`
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class GeoDnsCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        q = CounterMetricFamily("geodns_queries", "DNS queries answered, by transport, rcode and region chosen",
                                labels=["transport", "rcode", "region"])
        for (transport, rcode, region), n in sorted(snap["queries"].items()):
            q.add_metric([transport, rcode, region], n)
        yield q
        yield CounterMetricFamily("geomesh_dns_fail_open", "answers that named gateways found unreachable because "
                                  "no reachable gateway was left for the name (fail-open)",
                                  value=snap.get("fail_open", 0))
        hits, misses = snap["cache_hits"], snap["cache_misses"]
        yield CounterMetricFamily("geodns_cache_hits", "answers served from a cache", value=hits)
        yield CounterMetricFamily("geodns_cache_misses", "answers computed from the routing view", value=misses)
        yield GaugeMetricFamily("geodns_cache_hit_ratio", "cache hits / answers since start",
                                value=hits / (hits + misses) if hits + misses else 0.0)
        yield CounterMetricFamily("geodns_dropped", "packets that got no reply (not a query, oversize, "
                                  "send buffer full)", value=snap["dropped"])
        yield CounterMetricFamily("geodns_udp_batches", "recvmmsg calls that returned datagrams",
                                  value=snap.get("udp_batches", 0))
        yield CounterMetricFamily("geodns_udp_datagrams", "datagrams read by those calls (datagrams/batches = "
                                  "average batch)", value=snap.get("udp_datagrams", 0))
        cache = snap.get("cache", {})
        size = GaugeMetricFamily("geodns_cache_bytes", "accounted bytes held by each cache", labels=["cache"])
        entries = GaugeMetricFamily("geodns_cache_entries", "entries held by each cache", labels=["cache"])
        evictions = CounterMetricFamily("geodns_cache_evictions", "entries evicted to keep each cache within "
                                        "--cache-bytes and --cache-size", labels=["cache"])
        for name, values in sorted(cache.items()):
            size.add_metric([name], values.get("bytes", 0))
            entries.add_metric([name], values.get("entries", 0))
            evictions.add_metric([name], values.get("evictions", 0))
        yield size
        yield entries
        yield evictions
        yield CounterMetricFamily("geodns_oversize_queries", "queries longer than a query may be, refused "
                                  "with FORMERR before decoding", value=snap.get("oversize", 0))
        yield GaugeMetricFamily("geodns_tcp_connections", "open TCP connections", value=snap.get("tcp_connections", 0))
        refused = CounterMetricFamily("geodns_tcp_refused", "TCP connections closed at once, by reason "
                                      "(max_connections: the process is full; per_client: the client's share is)",
                                      labels=["reason"])
        for reason, n in sorted(snap.get("tcp_refused", {}).items()):
            refused.add_metric([reason], n)
        yield refused
        rrl = CounterMetricFamily("geodns_rrl", "responses limited by RRL, by action", labels=["action"])
        for action, n in sorted(snap["rrl"].items()):
            rrl.add_metric([action], n)
        yield rrl
        yield from _region_map(snap.get("region_map"))
        yield from _geoip(snap.get("geoip_build_epoch", 0))
        feed = snap.get("feed", {})
        yield GaugeMetricFamily("geodns_table_revision", "revision of the routing view served "
                                "(the lowest among workers)", value=feed.get("revision", 0))
        yield GaugeMetricFamily("geodns_feed_connected", "processes with an open RoutingFeed stream",
                                value=feed.get("connected", 0))
        yield CounterMetricFamily("geodns_feed_updates", "routing updates applied", value=feed.get("updates", 0))
        yield CounterMetricFamily("geodns_feed_reconnects", "RoutingFeed reconnections",
                                  value=feed.get("reconnects", 0))
        yield GaugeMetricFamily("geodns_workers", "serving processes", value=snap.get("workers", 1))


def _region_map(m: dict[str, Any] | None) -> Iterator[Metric]:
    """The region map's metrics and the database's age (none with --no-region-map)."""
    if not m:
        return
    secs = GaugeMetricFamily("geodns_region_map_build_seconds", "seconds the last build of the region map took, "
                             "by stage (database: the GeoIP file walked; regions: places ranked against the "
                             "regions)", labels=["stage"])
    builds = CounterMetricFamily("geodns_region_map_builds", "region map builds, by stage", labels=["stage"])
    for stage in sorted(m["builds"]):
        secs.add_metric([stage], m["seconds"][stage])
        builds.add_metric([stage], m["builds"][stage])
    yield secs
    yield builds
    yield CounterMetricFamily("geodns_region_map_failures", "region map builds that failed (the map in "
                              "service stays)", value=m["failures"])
    yield GaugeMetricFamily("geodns_region_map_bytes", "bytes of the region map's arrays", value=m["bytes"])
    yield GaugeMetricFamily("geodns_region_map_blocks", "address blocks in the region map", value=m["blocks"])
    yield GaugeMetricFamily("geodns_region_map_rankings", "distinct region rankings in the map", value=m["rankings"])
    yield GaugeMetricFamily("geodns_region_map_ready", "processes answering from a region map",
                            value=m["ready"])
    yield GaugeMetricFamily("geodns_region_map_rss_bytes", "resident memory of the process(es) after the last "
                            "region map build", value=m["rss"])


def _geoip(epoch: int) -> Iterator[Metric]:
    """How old the GeoIP database in service is (the oldest among workers)."""
    yield GaugeMetricFamily("geodns_geoip_build_timestamp_seconds", "when the GeoIP database in use was built "
                            "(its metadata's build_epoch)", value=epoch)
    yield GaugeMetricFamily("geodns_geoip_age_seconds", "age of the GeoIP database in use",
                            value=max(0.0, time.time() - epoch) if epoch else 0.0)
