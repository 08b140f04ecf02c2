"""Pinned domains (`Admin/AddDomain`) are pending until their TXT record names their app.

An admin pins `shop.example` to the app `web`; the gateways route it only once the coordinator has
seen `_geomesh-app-address.shop.example TXT "app=web"` (or the seed's `_dstack-app-address`
`app-id=web`) through its `--resolver` (`coordinator.domain_txt`), so pinning a domain proves
nothing by itself: its owner publishing the record does. `Domain.verified` is that verdict,
written through `Operations.set_domain_verified`; `AddDomain` always stores it false.

One replica checks (`domaincheck/leader`, `coordinator.leadership`). The schedule (`judge`, pure,
clock passed in): a new domain at once; a verified one every `interval` (`--domain-verify-interval`,
10 min); a pending one after `pending` (`--domain-pending-interval`, 30 s), doubling per check that
does not verify it, up to `interval`. A record that names the domain's app verifies it; one that
is gone, names another app, or is only garbage makes it pending again (logged, counted in
`geomesh_coordinator_pinned_domain_changes_total{to}`). A look-up that fails (resolver timeout,
SERVFAIL) changes nothing and is retried after `pending`: a flaky resolver never un-routes a
domain. A domain added or removed wakes the checker at once. Without `--resolver` nothing checks:
pinned domains stay pending (a warning at start).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from coordinator.domain_txt import DomainTxt, TxtVerdict
from coordinator.leadership import Leadership
from coordinator.operations import Operations
from coordinator.state import State
from coordinator.store import EtcdStore, ReplicaLease
from geomesh.errors import GeomeshError, StoreUnavailableError, ValidationError
from geomesh.logs import event
from geomesh.model import Domain

log = logging.getLogger("geomesh.coordinator.domains")

LEADER = Gauge("geomesh_coordinator_domain_checker", "1 on the replica that checks pinned domains' TXT records")
PINNED = Gauge("geomesh_coordinator_pinned_domains", "Pinned domains by state, as the checking replica sees them",
               ["state"])
CHANGES = Counter("geomesh_coordinator_pinned_domain_changes", "Pinned domains that became verified or pending",
                  ["to"])
for _s in ("verified", "pending"):
    PINNED.labels(_s)
    CHANGES.labels(_s)
PARALLEL = 16  # look-ups at once


@dataclass(frozen=True, slots=True)
class VerifyPolicy:
    interval: float = 600.0  # a verified domain is checked again after this many seconds
    pending: float = 30.0    # a pending one after this, doubling per miss up to `interval`

    def __post_init__(self) -> None:
        if not 1 <= self.interval <= 86400:
            raise ValidationError("domain_verify_interval", f"{self.interval:g} is not 1..86400 seconds")
        if not 0.2 <= self.pending <= self.interval:
            raise ValidationError("domain_pending_interval",
                                  f"{self.pending:g} is not 0.2 seconds..domain_verify_interval")


@dataclass(frozen=True, slots=True)
class Plan:
    """What the checker remembers of one domain between checks (in memory: a new checker starts afresh)."""

    app: str
    due: float        # unix seconds: the next check
    misses: int = 0   # checks in a row that did not verify it


@dataclass(frozen=True, slots=True)
class Outcome:
    verified: bool  # what Domain.verified should say now
    reason: str
    plan: Plan


def judge(domain: Domain, verdict: TxtVerdict, previous: Plan | None, now: float, policy: VerifyPolicy) -> Outcome:
    """One check's verdict -> the domain's state and its next check (pure)."""
    misses = previous.misses if previous is not None and previous.app == domain.app else 0
    if verdict.failure:
        return Outcome(domain.verified, f"{verdict.explain()}; kept {'verified' if domain.verified else 'pending'}",
                       Plan(domain.app, now + policy.pending, misses))
    if verdict.names(domain.app):
        return Outcome(True, verdict.explain(), Plan(domain.app, now + policy.interval))
    if verdict.address is not None:
        reason = f"{verdict.explain()}, not the pinned app {domain.app!r}"
    else:
        reason = verdict.explain()
    wait = min(policy.interval, policy.pending * 2 ** min(misses, 20))
    return Outcome(False, reason, Plan(domain.app, now + wait, misses + 1))


def due(domains: Mapping[str, Domain], plans: Mapping[str, Plan], now: float) -> list[str]:
    """The domains to check now: new ones (or pinned to another app since), and those due (pure)."""
    return sorted(f for f, d in domains.items()
                  if (p := plans.get(f)) is None or p.app != d.app or p.due <= now)


class PinnedDomains:
    """The checking loop (see the module); `run()` on every replica, one checks."""

    def __init__(self, store: EtcdStore, state: State, ops: Operations, lease: ReplicaLease, txt: DomainTxt,
                 policy: VerifyPolicy = VerifyPolicy(), *, check_interval: float = 5.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.state = state
        self.ops = ops
        self.txt = txt
        self.policy = policy
        self.check_interval = check_interval  # how often leadership is looked at
        self.clock = clock
        self.leader = Leadership(store, lease, "domaincheck/leader")
        self.plans: dict[str, Plan] = {}

    async def run(self) -> None:
        while True:
            try:
                leading = await self.leader.hold()
                LEADER.set(1 if leading else 0)
                if leading:
                    await self.round_once()
                else:
                    self.plans.clear()
            except StoreUnavailableError as exc:
                event(log, "pinned domain checks skipped: etcd unavailable", logging.WARNING, error=str(exc))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bug must not end the loop
                log.exception("pinned domain round failed", extra={"fields": {"error": str(exc)}})
            await self._pause()

    async def _pause(self) -> None:
        """Until the next check is due, leadership is to be looked at, or a domain is added or removed."""
        loop = asyncio.get_running_loop()
        wait = self.check_interval
        if self.leader.held and self.plans:
            wait = max(0.05, min(wait, min(p.due for p in self.plans.values()) - self.clock()))
        end = loop.time() + wait
        seen = self.state.dir_revision.get("domains", 0)
        while (left := end - loop.time()) > 0:
            await self.state.wait_change(self.state.revision, timeout=left)
            if self.leader.held and self.state.dir_revision.get("domains", 0) != seen:
                return

    async def round_once(self) -> int:
        """Check every domain that is due; returns how many were checked."""
        domains = dict(self.state.snapshot().domains)
        for gone in set(self.plans) - set(domains):
            del self.plans[gone]
        now = self.clock()
        todo = due(domains, self.plans, now)
        gate = asyncio.Semaphore(PARALLEL)

        async def one(fqdn: str) -> None:
            async with gate:
                await self._check(domains[fqdn])

        await asyncio.gather(*(one(f) for f in todo))
        snap = self.state.snapshot().domains
        PINNED.labels("verified").set(sum(1 for d in snap.values() if d.verified))
        PINNED.labels("pending").set(sum(1 for d in snap.values() if not d.verified))
        return len(todo)

    async def _check(self, domain: Domain) -> None:
        verdict = await self.txt.check(domain.fqdn, "pinned")
        first = domain.fqdn not in self.plans
        out = judge(domain, verdict, self.plans.get(domain.fqdn), self.clock(), self.policy)
        self.plans[domain.fqdn] = out.plan
        if out.verified == domain.verified:
            if verdict.failure:
                event(log, "pinned domain check failed, state kept", logging.WARNING, domain=domain.fqdn,
                      app=domain.app, reason=out.reason)
            elif first and not out.verified:
                event(log, "pinned domain pending", domain=domain.fqdn, app=domain.app, reason=out.reason,
                      next_check_in=round(out.plan.due - self.clock(), 1))
            return
        try:
            written = await self.ops.set_domain_verified(domain.fqdn, domain.app, out.verified)
        except GeomeshError as exc:
            event(log, "pinned domain state not written", logging.WARNING, domain=domain.fqdn, error=str(exc))
            self.plans[domain.fqdn] = Plan(domain.app, self.clock() + self.policy.pending, out.plan.misses)
            return
        if not written:  # removed or re-pinned meanwhile: the next round sees the new record
            self.plans.pop(domain.fqdn, None)
            return
        to = "verified" if out.verified else "pending"
        CHANGES.labels(to).inc()
        event(log, f"pinned domain {to}", logging.INFO if out.verified else logging.WARNING,
              domain=domain.fqdn, app=domain.app, reason=out.reason)
