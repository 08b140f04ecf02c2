#!/usr/bin/env python3
"""The gateway's Python cost per request, without sockets: a low-noise companion to bench/http.py.

    .venv/bin/python bench/proxy_path.py [--requests 100000] [--repeats 7] [--policies rr,lc,hash]

On a shared machine wrk runs of the real proxy vary by +-10% from one round to the next, more
than most changes to the hot path are worth. This drives the real `ClientConnection` and
`UpstreamConnection` objects of `regional_gateway.proxy` in-process: a request as wrk sends it
(`GET / HTTP/1.1`, one Host header) is fed to the client side, the response nginx sends (seven
headers, a 100-byte body) to the upstream side, over pooled upstream connections whose
transports only count the writes. Everything the gateway does per request runs (parsing,
routing, the balancer, the head rewrite, the pool, in-flight counts, health accounting,
metrics); the kernel does not. For comparison the same bytes go through the floor: the two
httptools parsers with the callbacks a router needs and nothing else (what
`bench/_relay_floor.py` runs between its sockets).

Prints microseconds per request (best and median of --repeats runs of --requests each) for each
policy and for the floor, and the difference: the gateway's own work. CPU-bound and
single-threaded: pin it with taskset for steadier numbers. No network at all.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: import from the repository, not from bench/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from httptools import HttpRequestParser, HttpResponseParser  # noqa: E402

from bench._relay_floor import RequestCallbacks, ResponseCallbacks  # noqa: E402
from regional_gateway.proxy.conn_state import IDLE  # noqa: E402
from regional_gateway.proxy.downstream import ClientConnection  # noqa: E402
from regional_gateway.proxy.routes_file import parse_routes  # noqa: E402
from regional_gateway.proxy.server import ProxyServer  # noqa: E402
from regional_gateway.proxy.settings import ProxySettings  # noqa: E402
from regional_gateway.proxy.upstream import UpstreamConnection  # noqa: E402

POLICIES = {"rr": "round_robin", "lc": "least_connections", "hash": "ip_hash"}
BACKENDS = [("127.0.0.1", 9001), ("127.0.0.1", 9002), ("127.0.0.1", 9003)]  # never connected to
REQUESTS = {
    "wrk": b"GET / HTTP/1.1\r\nHost: app.bench.test\r\n\r\n",  # what bench/http.py's load sends
    "browser": (b"GET /catalog/items?page=2 HTTP/1.1\r\nHost: app.bench.test\r\nConnection: keep-alive\r\n"
                b"sec-ch-ua: \"Chromium\";v=\"130\", \"Not?A_Brand\";v=\"99\"\r\nsec-ch-ua-mobile: ?0\r\n"
                b"sec-ch-ua-platform: \"Linux\"\r\nUpgrade-Insecure-Requests: 1\r\n"
                b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
                b"Chrome/130.0.0.0 Safari/537.36\r\n"
                b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8\r\n"
                b"Sec-Fetch-Site: same-origin\r\nSec-Fetch-Mode: navigate\r\nSec-Fetch-Dest: document\r\n"
                b"Referer: https://app.bench.test/catalog\r\nAccept-Encoding: gzip, deflate, br, zstd\r\n"
                b"Accept-Language: en-US,en;q=0.9\r\nCookie: session=4f2a9c; theme=dark\r\n\r\n"),
}
REQUEST = REQUESTS["wrk"]
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Thu, 26 Nov 2026 02:40:50 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 100\r\nConnection: keep-alive\r\nX-Backend: b1\r\n\r\n"
            + b"0" * 100)


class CountingTransport:
    """Stands in for a socket transport: counts writes, never blocks."""

    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1

    def get_extra_info(self, name: str) -> Any:
        return self.peer

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


def gateway_exchange(policy: str, request: bytes = REQUEST):
    """A function that runs one request/response through the gateway's objects."""
    import tomllib

    toml = (f'zone = "bench.test"\nname = "bench-gw"\n[health]\ncheck = "tcp"\n[[apps]]\nname = "app"\n'
            f'lb = "{policy}"\nbackends = [' + ", ".join(f'"{h}:{p}"' for h, p in BACKENDS) + "]\n")
    routes, _ = parse_routes(tomllib.loads(toml), Path("."))
    server = ProxyServer(ProxySettings(http=("127.0.0.1:0",)), routes)
    for addr in BACKENDS:
        for _ in range(4):
            up = UpstreamConnection(server.pool, addr)
            up.connection_made(CountingTransport(addr))
            server.pool.put(up)
    client = ClientConnection(server, "http", "http", False)
    transport = CountingTransport(("127.0.0.1", 40000))
    client.connection_made(transport)

    def one() -> None:
        client.data_received(request)
        client.active.upstream.data_received(RESPONSE)  # type: ignore[union-attr]

    def check() -> None:
        one()
        if transport.writes < 1 or client.active is not None or client.state is not IDLE:
            raise RuntimeError("the gateway did not complete an exchange in the harness")
    return one, check


class _FloorUpstream(ResponseCallbacks):
    def __init__(self, client: _FloorClient) -> None:
        self.client = client
        self.parser = HttpResponseParser(self)
        self.transport = CountingTransport(BACKENDS[0])

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        self.client.transport.write(data)


class _FloorClient(RequestCallbacks):
    """The floor relay's client side (`bench/_relay_floor.py`) on counting transports."""

    def __init__(self) -> None:
        self.parser = HttpRequestParser(self)
        self.transport = CountingTransport(("127.0.0.1", 40000))
        self.upstream = _FloorUpstream(self)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        self.upstream.transport.write(data)


def floor_exchange(request: bytes = REQUEST):
    client = _FloorClient()

    def one() -> None:
        client.data_received(request)
        client.upstream.data_received(RESPONSE)

    def check() -> None:
        one()
        if client.host != b"app.bench.test" or client.upstream.status != 200:
            raise RuntimeError("the floor did not parse the exchange")
    return one, check


def measure(one, requests: int, repeats: int) -> list[float]:
    for _ in range(min(requests, 2000)):  # warm up caches and the pool
        one()
    runs = []
    for _ in range(repeats):
        gc.collect()
        t = time.perf_counter()
        for _ in range(requests):
            one()
        runs.append((time.perf_counter() - t) / requests * 1e6)
    return runs


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=100_000, help="exchanges per timed run (default %(default)s)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per system; best and median are printed "
                   "(default %(default)s)")
    p.add_argument("--policies", default="rr,lc,hash", help="comma list of rr, lc, hash (default %(default)s)")
    p.add_argument("--request", choices=sorted(REQUESTS), default="wrk",
                   help="wrk: GET with only a Host header (what bench/http.py sends); browser: a browser's "
                        "navigation GET with 16 headers (default %(default)s)")
    p.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if not 1 <= args.requests <= 5_000_000 or not 1 <= args.repeats <= 50:
        ap.error("--requests must be 1..5000000 and --repeats 1..50")
    policies = [p for p in args.policies.split(",") if p]
    for p in policies:
        if p not in POLICIES:
            ap.error(f"unknown policy {p!r} (rr, lc, hash)")
    request = REQUESTS[args.request]
    systems = {"floor": floor_exchange(request)} | {f"geomesh-{p}": gateway_exchange(POLICIES[p], request)
                                                    for p in policies}
    results: dict[str, dict[str, float]] = {}
    print(f"# {args.repeats} runs x {args.requests:,} exchanges each ({args.request} request), in-process, no sockets")
    for name, (one, check) in systems.items():
        check()
        runs = measure(one, args.requests, args.repeats)
        results[name] = {"best_us": min(runs), "median_us": statistics.median(runs)}
        print(f"{name:<14} best {min(runs):6.2f} us/request   median {statistics.median(runs):6.2f}", flush=True)
    floor = results["floor"]["best_us"]
    for name, r in results.items():
        if name != "floor":
            r["over_floor_us"] = r["best_us"] - floor
            print(f"{name:<14} gateway work: {r['over_floor_us']:.2f} us/request over the parsers alone (best runs)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
