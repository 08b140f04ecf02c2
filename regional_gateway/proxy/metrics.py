"""Prometheus metrics of the data plane, counted in plain dicts and exported at scrape time.

The request path only bumps integers in dicts (a prometheus_client `labels().inc()` per request
costs a lock and a label lookup, a measurable share of a 20 µs request); a custom collector turns
them into metric families when /metrics is scraped (served by `geomesh.metrics.serve`). Exported:

- `geomesh_gateway_requests_total{app,backend,code}`: responses sent (backend "-" = answered by the
  gateway itself, e.g. 404; "gateway:<name>" = forwarded to another region);
- `geomesh_gateway_upstream_latency_seconds{app}`: request sent -> response head received;
- `geomesh_gateway_errors_total{cause}`: errors the gateway answered or hit, by cause;
- `geomesh_gateway_forwarded_total{app,region}`: requests and tunnels sent to another region;
- `geomesh_gateway_active_connections{listener}`: open client connections (http, https, mesh, tunnel, h2);
- `geomesh_gateway_backend_up{app,backend,state}`: 1 if the backend takes traffic, with its state;
- `geomesh_gateway_routes_reloads_total{result}`: routes updates applied or refused;
- `geomesh_gateway_certificate_not_after_seconds{name,source}`: expiry (unix seconds) of each
  certificate in service (source managed: sent by the coordinator, named as it names it; file:
  from the config or routes file, named by its first DNS name).
"""

from __future__ import annotations

import weakref
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ProxyMetrics:
    """Counters of one proxy server. Mutated only from its event loop thread."""

    __slots__ = ("requests", "errors", "forwarded", "latency", "reloads", "server", "__weakref__")

    def __init__(self, server: Any) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        self.errors: dict[str, int] = {}
        self.forwarded: dict[tuple[str, str], int] = {}
        self.latency: dict[str, list[float]] = {}  # app -> [count per bucket..., +Inf count, sum]
        self.reloads: dict[str, int] = {}
        self.server = server
        _COLLECTOR.servers.add(self)

    def request(self, app: str, backend: str, code: int) -> None:
        k = (app, backend, code)
        r = self.requests
        r[k] = r.get(k, 0) + 1

    def error(self, cause: str) -> None:
        self.errors[cause] = self.errors.get(cause, 0) + 1

    def forward(self, app: str, region: str) -> None:
        k = (app, region)
        self.forwarded[k] = self.forwarded.get(k, 0) + 1

    def observe(self, app: str, seconds: float) -> None:
        h = self.latency.get(app)
        if h is None:
            h = self.latency[app] = [0.0] * (len(BUCKETS) + 2)
        h[bisect_left(BUCKETS, seconds)] += 1
        h[-1] += seconds

    def record(self, app: str, backend: str, code: int, took: float) -> None:
        """A request answered: `request` and, unless `took` < 0 (no response head), `observe` in one call."""
        k = (app, backend, code)
        r = self.requests
        r[k] = r.get(k, 0) + 1
        if took >= 0.0:
            h = self.latency.get(app)
            if h is None:
                h = self.latency[app] = [0.0] * (len(BUCKETS) + 2)
            h[bisect_left(BUCKETS, took)] += 1
            h[-1] += took

    def reload(self, result: str) -> None:
        self.reloads[result] = self.reloads.get(result, 0) + 1


class _Collector(Collector):
    def __init__(self) -> None:
        self.servers: weakref.WeakSet[ProxyMetrics] = weakref.WeakSet()

    def collect(self) -> Iterator[Any]:
        req = CounterMetricFamily("geomesh_gateway_requests", "Responses sent to clients",
                                  labels=["app", "backend", "code"])
        err = CounterMetricFamily("geomesh_gateway_errors", "Errors answered or hit by the gateway, by cause",
                                  labels=["cause"])
        fwd = CounterMetricFamily("geomesh_gateway_forwarded", "Requests and tunnels forwarded to another region",
                                  labels=["app", "region"])
        rel = CounterMetricFamily("geomesh_gateway_routes_reloads", "Routes updates by result", labels=["result"])
        lat = HistogramMetricFamily("geomesh_gateway_upstream_latency_seconds",
                                    "Request sent upstream -> response head received", labels=["app"])
        conns = GaugeMetricFamily("geomesh_gateway_active_connections", "Open client connections",
                                  labels=["listener"])
        up = GaugeMetricFamily("geomesh_gateway_backend_up", "1 if the backend takes traffic",
                               labels=["app", "backend", "state"])
        expiry = GaugeMetricFamily("geomesh_gateway_certificate_not_after_seconds",
                                   "Expiry (unix seconds) of each certificate in service", labels=["name", "source"])
        sums: dict[str, dict] = {"req": {}, "err": {}, "fwd": {}, "rel": {}, "conn": {}, "exp": {}}
        hist: dict[str, list[float]] = {}
        for m in list(self.servers):
            for src, dst in ((m.requests, sums["req"]), (m.errors, sums["err"]), (m.forwarded, sums["fwd"]),
                             (m.reloads, sums["rel"])):
                for k, val in list(src.items()):
                    dst[k] = dst.get(k, 0) + val
            for app, h in list(m.latency.items()):
                acc = hist.setdefault(app, [0.0] * len(h))
                for i, val in enumerate(list(h)):
                    acc[i] += val
            server = m.server
            if server is not None:
                for kind, n in server.connection_counts().items():
                    sums["conn"][kind] = sums["conn"].get(kind, 0) + n
                for app, key, state, is_up in server.backend_states():
                    up.add_metric([app, key, state], 1.0 if is_up else 0.0)
                for name, source, not_after in server.certs.expiries():
                    sums["exp"][(name, source)] = not_after
        for (app, backend, code), val in sorted(sums["req"].items()):
            req.add_metric([app, backend, str(code)], val)
        for cause, val in sorted(sums["err"].items()):
            err.add_metric([cause], val)
        for (app, region), val in sorted(sums["fwd"].items()):
            fwd.add_metric([app, region], val)
        for result, val in sorted(sums["rel"].items()):
            rel.add_metric([result], val)
        for kind in ("http", "https", "mesh", "tunnel", "h2"):
            conns.add_metric([kind], sums["conn"].get(kind, 0))
        for app, h in sorted(hist.items()):
            cumulative, buckets = 0.0, []
            for bound, count in zip((*BUCKETS, float("inf")), h[:-1], strict=True):
                cumulative += count
                buckets.append((str(bound) if bound != float("inf") else "+Inf", cumulative))
            lat.add_metric([app], buckets, h[-1])
        for (name, source), not_after in sorted(sums["exp"].items()):
            expiry.add_metric([name, source], not_after)
        yield from (req, err, fwd, rel, lat, conns, up, expiry)


_COLLECTOR = _Collector()
REGISTRY.register(_COLLECTOR)
