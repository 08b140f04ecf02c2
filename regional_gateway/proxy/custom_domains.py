"""The custom-domain directory: which app a host's TXT record names, looked up once, cached for its TTL.

A request whose Host is neither the zone's nor a configured domain (`hostnames.custom_candidate`)
asks `CustomDomains`: `peek(host)` answers from the cache; else `lookup(host, client)` starts one
look-up of both record names (`app_address.OWNERS`) through the resolver (`txt_resolver`) and
returns a future, or the `lookup_budget.Refusal` when the client or the gateway is over its rate.
Concurrent requests for one host share the look-up in flight (and cost no budget). Nothing waits
under a lock: the request's connection registers a callback and goes on serving nothing else
meanwhile, every other connection is untouched.

What a look-up found (`decide`, pure) is cached until it expires (`DomainCache`, bounded, the
oldest entry dropped first): a mapping for its records' TTL clamped to `min_ttl..max_ttl`; no
mapping (NXDOMAIN, NODATA, only garbage values) for the SOA's negative TTL or, without one,
`negative_ttl`, at most `negative_ttl`; a failed look-up (timeout, SERVFAIL) for the shorter of
`min_ttl` and `negative_ttl`, so a dead resolver is not asked for the same host on every request.
A domain whose TXT record is removed stops routing once its cached answer expires.

`verify(routes, host, client)` is the seam for the TLS listener (certificates on demand): a
`NameMatch` only for a host whose TXT record names an app that exists here on a port it exposes.

Metrics (prometheus_client; one directory per gateway process):
- `geomesh_gateway_custom_domain_lookups_total{result}`: per request asking the directory:
  `hit` (answered from the cache, mapping or not), `miss` (not cached: looked up, or joined a
  look-up in flight, and the record named an app), `negative` (looked up: no mapping), `error`
  (the look-up failed), `rate_limited` (refused by the budget);
- `geomesh_gateway_custom_domain_txt_rejected_total{reason}`: TXT values refused
  (`app_address.Garbage`), counted once per look-up;
- `geomesh_gateway_custom_domain_cache_entries`, `geomesh_gateway_custom_domain_lookups_in_flight`.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import Counter
from prometheus_client.core import REGISTRY, GaugeMetricFamily
from prometheus_client.registry import Collector

from geomesh.app_address import OWNERS, AppAddress, Garbage, read_records
from geomesh.logs import event
from geomesh.txt_resolver import Answer, NoTxt, ResolverError, TxtRecords, TxtResolver, ask_owners
from regional_gateway.proxy.hostnames import NameMatch, UnknownName, custom_candidate, resolve_custom
from regional_gateway.proxy.http_errors import LookupFailed, LookupRateLimited, LookupsBusy, ProxyError
from regional_gateway.proxy.lookup_budget import LookupBudget, Refusal
from regional_gateway.proxy.routes import Routes
from regional_gateway.proxy.settings import ProxySettings, parse_listen

log = logging.getLogger("geomesh.gateway.custom_domains")
RESULTS = ("hit", "miss", "negative", "error", "rate_limited")
LOOKUPS = Counter("geomesh_gateway_custom_domain_lookups", "Requests that asked the custom-domain directory, "
                  "by result", ["result"])
REJECTED = Counter("geomesh_gateway_custom_domain_txt_rejected", "Custom-domain TXT values refused, by reason",
                   ["reason"])
for _r in RESULTS:
    LOOKUPS.labels(_r)
for _g in Garbage:
    REJECTED.labels(_g.value)
FAILURE_LOG_INTERVAL = 60.0  # seconds: failed look-ups are logged at most this often



class Resolver(Protocol):
    async def query(self, name: str) -> TxtRecords | NoTxt: ...


@dataclass(frozen=True, slots=True)
class TtlLimits:
    min_ttl: float = 5.0
    max_ttl: float = 3600.0
    negative_ttl: float = 5.0


@dataclass(frozen=True, slots=True)
class Lookup:
    """What a look-up found for one host, good until `expires`."""

    address: AppAddress | None  # None: no mapping, or the look-up failed
    expires: float
    failure: str = ""  # the look-up failed: why
    garbage: tuple[Garbage, ...] = ()  # the TXT values refused, one reason each

    @property
    def result(self) -> str:
        return "error" if self.failure else "negative" if self.address is None else "miss"


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


def decide(answers: Mapping[str, Answer], now: float, limits: TtlLimits) -> Lookup:
    """The answers at the record names (by owner, `app_address.OWNERS`) -> what to cache (pure).

    The owners are read in order of precedence: the first that names an app wins; a failed look-up
    of an owner before any mapping makes the whole look-up a failure (a later owner's record must
    not stand in for an earlier one that could not be read)."""
    garbage: list[Garbage] = []
    negative: list[int] = []
    for owner in OWNERS:
        answer = answers.get(owner)
        if answer is None:
            continue
        if isinstance(answer, ResolverError):
            return Lookup(None, now + min(limits.min_ttl, limits.negative_ttl), answer.message, tuple(garbage))
        if isinstance(answer, TxtRecords):
            verdict = read_records(owner, answer.values)
            garbage.extend(verdict.garbage)
            if verdict.address is not None:
                return Lookup(verdict.address, now + _clamp(answer.ttl, limits.min_ttl, limits.max_ttl),
                              garbage=tuple(garbage))
            negative.append(answer.ttl)
        elif answer.ttl is not None:
            negative.append(answer.ttl)
    ttl = min(negative) if negative else limits.negative_ttl
    return Lookup(None, now + _clamp(ttl, min(limits.min_ttl, limits.negative_ttl), limits.negative_ttl),
                  garbage=tuple(garbage))


class DomainCache:
    """host -> `Lookup`, at most `max_entries`; an expired entry is never returned."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self.entries: dict[str, Lookup] = {}

    def get(self, host: str, now: float) -> Lookup | None:
        found = self.entries.get(host)
        if found is None:
            return None
        if found.expires <= now:
            del self.entries[host]
            return None
        return found

    def put(self, host: str, lookup: Lookup, now: float) -> None:
        entries = self.entries
        entries.pop(host, None)
        while entries:  # the oldest entries first: drop the expired ones at the front, then make room
            first = next(iter(entries))
            if entries[first].expires > now and len(entries) < self.max_entries:
                break
            del entries[first]
        entries[host] = lookup


class CustomDomains:
    def __init__(self, resolver: Resolver, budget: LookupBudget, limits: TtlLimits = TtlLimits(),
                 max_entries: int = 10_000, clock: Callable[[], float] | None = None) -> None:
        self.resolver = resolver
        self.budget = budget
        self.limits = limits
        self.cache = DomainCache(max_entries)
        self.clock = clock or (lambda: asyncio.get_running_loop().time())
        self.inflight: dict[str, tuple[asyncio.Task, list[int]]] = {}  # host -> (look-up, [requests waiting])
        self.last_failure_log = float("-inf")
        # the longest a look-up can take (the resolver's bound when it says, else a generous one)
        self.max_wait: float = getattr(resolver, "max_wait", 10.0) + 1.0
        _COLLECTOR.directories.add(self)

    @classmethod
    def from_settings(cls, settings: ProxySettings, clock: Callable[[], float] | None = None) -> CustomDomains | None:
        """The directory `settings` ask for, or None when no resolver is configured."""
        if not settings.resolver:
            return None
        resolver = TxtResolver(parse_listen("resolver", settings.resolver), settings.resolver_timeout)
        budget = LookupBudget(settings.custom_domain_client_rate, settings.custom_domain_client_burst,
                              settings.custom_domain_rate, settings.custom_domain_burst)
        limits = TtlLimits(settings.custom_domain_min_ttl, settings.custom_domain_max_ttl,
                           settings.custom_domain_negative_ttl)
        return cls(resolver, budget, limits, settings.custom_domain_cache_entries, clock)

    def peek(self, host: str, *, count: bool = True) -> Lookup | None:
        """The cached answer for `host`, if it has not expired (counted as a `hit`)."""
        found = self.cache.get(host, self.clock())
        if found is not None and count:
            LOOKUPS.labels("hit").inc()
        return found

    def lookup(self, host: str, client: str | None) -> asyncio.Future[Lookup] | Refusal:
        """A look-up of `host` for `client` (None: exempt from the per-client rate): the one in
        flight, a new one, or the budget's refusal. Call `peek` first: this always asks the resolver."""
        pending = self.inflight.get(host)
        if pending is not None:
            pending[1][0] += 1
            return pending[0]
        refusal = self.budget.take(client, self.clock())
        if refusal is not None:
            LOOKUPS.labels("rate_limited").inc()
            return refusal
        task = asyncio.ensure_future(self._look_up(host))
        self.inflight[host] = (task, [1])
        task.add_done_callback(lambda t: self._landed(host, t))
        return task

    async def verify(self, routes: Routes, host: str, client: str | None = None) -> NameMatch | UnknownName:
        """Is `host` a custom domain whose TXT record names an app here? (For the TLS listener:
        a certificate is worth asking for only on a `NameMatch`.)"""
        if not custom_candidate(routes, host):
            return UnknownName(f"{host!r} cannot be a custom domain")
        found = self.peek(host)
        if found is None:
            pending = self.lookup(host, client)
            if isinstance(pending, Refusal):
                return UnknownName(refusal_error(host, pending).message)
            try:
                found = await asyncio.shield(pending)
            except asyncio.CancelledError:
                return UnknownName(f"the look-up of {host} was cancelled")
        if found.address is None:
            return UnknownName(found.failure or f"{host} has no valid app address TXT record")
        return resolve_custom(routes, host, found.address)

    def close(self) -> None:
        """Cancel the look-ups in flight (server shutdown)."""
        for task, _ in list(self.inflight.values()):
            task.cancel()

    async def _look_up(self, host: str) -> Lookup:
        try:
            answers: dict[str, Answer] = await ask_owners(self.resolver, host)
        except Exception as exc:  # a bug must not leave requests waiting: it is a failed look-up
            log.exception("custom domain look-up crashed", extra={"fields": {"host": host}})
            answers = {OWNERS[0]: ResolverError("internal", f"internal error: {exc}")}
        found = decide(answers, self.clock(), self.limits)
        if found.failure:
            now = self.clock()
            if now - self.last_failure_log >= FAILURE_LOG_INTERVAL:
                self.last_failure_log = now
                event(log, "custom domain look-up failed", logging.WARNING, host=host, error=found.failure,
                      note=f"logged at most every {FAILURE_LOG_INTERVAL:g}s; see "
                           "geomesh_gateway_custom_domain_lookups_total{result=\"error\"}")
        return found

    def _landed(self, host: str, task: asyncio.Task) -> None:
        _, waiting = self.inflight.pop(host, (None, [0]))
        if task.cancelled():
            return
        found: Lookup = task.result()
        self.cache.put(host, found, self.clock())
        LOOKUPS.labels(found.result).inc(waiting[0])
        for reason in found.garbage:
            REJECTED.labels(reason.value).inc()


def refusal_error(host: str, refusal: Refusal) -> ProxyError:
    """The answer to a request whose custom-domain look-up the budget refused."""
    if refusal is Refusal.CLIENT:
        return LookupRateLimited(f"too many custom domain look-ups from your address; {host} was not looked "
                                 "up, try again in a few seconds")
    return LookupsBusy(f"the gateway is looking up too many custom domains; {host} was not looked up, "
                       "try again in a few seconds")


def failure_error(host: str, found: Lookup) -> ProxyError:
    """The answer to a request whose custom-domain look-up failed."""
    return LookupFailed(f"the TXT record of custom domain {host} could not be looked up: {found.failure}")


class _Collector(Collector):
    def __init__(self) -> None:
        self.directories: weakref.WeakSet[CustomDomains] = weakref.WeakSet()

    def collect(self) -> Iterator[Any]:
        size = GaugeMetricFamily("geomesh_gateway_custom_domain_cache_entries",
                                 "Custom-domain hosts whose look-up answer is cached (expired ones until dropped)")
        flying = GaugeMetricFamily("geomesh_gateway_custom_domain_lookups_in_flight",
                                   "Custom-domain TXT look-ups waiting for the resolver")
        dirs = list(self.directories)
        size.add_metric([], sum(len(d.cache.entries) for d in dirs))
        flying.add_metric([], sum(len(d.inflight) for d in dirs))
        yield from (size, flying)


_COLLECTOR = _Collector()
REGISTRY.register(_COLLECTOR)
