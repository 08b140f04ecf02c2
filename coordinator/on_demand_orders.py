"""The ordering leader's work on custom domains' certificates: order, renew, re-check, drop.

Certificates for custom domains are obtained on demand (`coordinator.cert_requests` records
`certrequests/<name>`), by ACME HTTP-01 answered at every gateway (`ZoneCertificates.order_http01`,
`coordinator.http01`), by the replica that holds `acme/leader` (`coordinator.acme_orders`). Every
replica runs `OnDemandOrders.run()`; only the leader acts. It wakes when a request is recorded
(the mirror's `certrequests` directory changes), when something is due, and every check interval.

What a round does is decided by `plan` (pure, clock passed in):

- **Order** a recorded request when `renewal.due_at` says so (at once for a new name; after the
  backoff of `certstatus/<name>` when earlier attempts failed). The TXT record is looked up again
  first unless the request is younger than `RECHECK_AFTER` (the replica that recorded it has just
  looked). A record that is gone or names no existing app drops the request, nothing is ordered.
  A look-up that fails holds the name off for `HOLD_OFF` (30 s); the certificate held serves on.
  A success stores `certs/<name>` (the sessions bring it to every gateway) and removes the
  request; a failure is in `certstatus/<name>` (failures in a row, last error, next attempt) and
  the request stays, up to `max_failures` failed attempts in a row, then it is dropped (a gateway
  asks again on a later handshake; the backoff of `certstatus/` still holds).
- **Renew** a custom domain's certificate on the zone's schedule (`--acme-renew-before`), its TXT
  record looked up first.
- **Re-check** every custom domain's certificate's TXT record each `verify_interval`
  (`--domain-verify-interval`). A record that is gone, names another app than one that exists,
  or is only garbage **drops the certificate at once** (`certs/<name>` and `certstatus/<name>`
  deleted: every gateway withdraws it with the next certificate set); a look-up that fails keeps
  it. So a domain whose owner pointed it elsewhere is neither renewed nor served for long.
- **Forget** the status of a name with neither certificate nor request once its next attempt is
  `retry_max` past (the backoff memory of a refused name does not pile up forever).

At most `parallel` orders run at once; a name is never ordered twice at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import Counter

from coordinator.acme_client import AcmeError
from coordinator.acme_orders import ZoneCertificates
from coordinator.cert_records import CERTS_DIR, REQUESTS_DIR, STATUS_DIR, CertRequest
from coordinator.domain_txt import DomainTxt, TxtVerdict
from coordinator.renewal import RenewalPolicy, due_at
from coordinator.snapshot import Snapshot
from coordinator.state import State, key
from coordinator.store import Txn
from geomesh.errors import StoreUnavailableError
from geomesh.logs import event

log = logging.getLogger("geomesh.coordinator.acme")

RECHECK_AFTER = 60.0  # seconds: a request older than this has its TXT record looked up again before the order
HOLD_OFF = 30.0  # seconds: no order for a name whose TXT look-up failed (the resolver is not asked in a loop)
LOOKUPS_AT_ONCE = 16  # TXT look-ups of the re-checks and orders at once
DROPPED = Counter("geomesh_certificate_on_demand_dropped", "Custom domains' certificate requests or certificates "
                  "dropped, by reason", ["what", "reason"])
for _w, _r in (("request", "txt"), ("request", "failures"), ("certificate", "txt")):
    DROPPED.labels(_w, _r)


@dataclass(frozen=True, slots=True)
class Order:
    name: str
    names: tuple[str, ...]
    recheck: bool          # look the TXT record up before ordering
    request: bool          # True: a recorded request; False: a renewal


@dataclass(frozen=True, slots=True)
class Recheck:
    name: str


@dataclass(frozen=True, slots=True)
class Forget:
    name: str  # a certstatus/ left behind


@dataclass(frozen=True, slots=True)
class Round:
    orders: tuple[Order, ...] = ()
    rechecks: tuple[Recheck, ...] = ()
    forget: tuple[Forget, ...] = ()
    drop_requests: tuple[str, ...] = ()  # failed max_failures times in a row
    done_requests: tuple[str, ...] = ()  # the certificate is held
    wake_at: float = float("inf")        # unix seconds: the earliest thing due later


@dataclass(slots=True)
class Memory:
    """What the leader keeps between rounds (lost with leadership: a new leader re-checks at once)."""

    running: set[str] = field(default_factory=set)
    checked: dict[str, float] = field(default_factory=dict)  # name -> unix time of its last TXT check
    held_off: dict[str, float] = field(default_factory=dict)  # name -> no order before (its TXT look-up failed)


def plan(snap: Snapshot, zone: str, memory: Memory, now: float, policy: RenewalPolicy, *,
         verify_interval: float, max_failures: int, parallel: int) -> Round:
    """What to do now (see the module; pure)."""
    orders: list[Order] = []
    rechecks: list[Recheck] = []
    drops: list[str] = []
    done: list[str] = []
    wake = float("inf")
    free = parallel - len(memory.running)
    for name, req in sorted(snap.cert_requests.items()):
        if name in memory.running:
            continue
        if memory.held_off.get(name, 0.0) > now:
            wake = min(wake, memory.held_off[name])
            continue
        status = snap.cert_status.get(name)
        if status is not None and status.failures >= max_failures and name not in snap.certs:
            drops.append(name)
            continue
        when = due_at(snap.certs.get(name), status, (name,), policy)
        if when > now and name in snap.certs:
            done.append(name)  # held already (a request recorded in a race with the order)
        elif when > now:
            wake = min(wake, when)
        elif free > 0:
            orders.append(Order(name, (name,), now - req.requested_at >= RECHECK_AFTER, True))
            free -= 1
    for name, rec in sorted(snap.certs.items()):
        if name == zone or name in memory.running or name in snap.cert_requests:
            continue
        when = max(due_at(rec, snap.cert_status.get(name), rec.dns_names, policy), memory.held_off.get(name, 0.0))
        checked = memory.checked.get(name)
        if when <= now:
            if free > 0:  # else: a job ending wakes the loop
                orders.append(Order(name, rec.dns_names, True, False))
                free -= 1
            continue
        wake = min(wake, when)
        if checked is None or now - checked >= verify_interval:
            rechecks.append(Recheck(name))
        else:
            wake = min(wake, checked + verify_interval)
    forget = tuple(Forget(n) for n, s in sorted(snap.cert_status.items())
                   if n != zone and n not in snap.certs and n not in snap.cert_requests
                   and n not in memory.running and s.renew_at + policy.retry_max < now)
    return Round(tuple(orders), tuple(rechecks), forget, tuple(drops), tuple(done), wake)


def keeps(verdict: TxtVerdict, apps: object) -> bool | None:
    """Whether a TXT verdict still justifies a custom domain's certificate: True, False (gone,
    garbage, or an app that does not exist), None (the look-up failed: nothing is known)."""
    if verdict.failure:
        return None
    return verdict.address is not None and verdict.address.app in apps  # type: ignore[operator]


class OnDemandOrders:
    """The loop (see the module)."""

    def __init__(self, orderer: ZoneCertificates, state: State, txt: DomainTxt, *, verify_interval: float = 600.0,
                 max_failures: int = 5, parallel: int = 4, clock: Callable[[], float] = time.time) -> None:
        self.orderer = orderer
        self.store = orderer.store
        self.state = state
        self.txt = txt
        self.verify_interval = verify_interval
        self.max_failures = max_failures
        self.parallel = parallel
        self.clock = clock
        self.memory = Memory()
        self.tasks: set[asyncio.Task] = set()
        self.wake_at = 0.0
        self.kick = asyncio.Event()
        self.gate = asyncio.Semaphore(LOOKUPS_AT_ONCE)

    async def run(self) -> None:
        try:
            while True:
                try:
                    if self.orderer.leading:
                        await self.round_once()
                    else:
                        self.memory.checked.clear()
                        self.memory.held_off.clear()
                except StoreUnavailableError as exc:
                    event(log, "on-demand round skipped: etcd unavailable", logging.WARNING, error=str(exc))
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a bug must not end the loop
                    log.exception("on-demand round failed", extra={"fields": {"error": str(exc)}})
                await self._pause()
        finally:
            for task in self.tasks:
                task.cancel()

    async def _pause(self) -> None:
        """Until something is due, a request is recorded, a job ends, or leadership is to be looked at."""
        loop = asyncio.get_running_loop()
        wait = self.orderer.settings.check_interval
        if self.orderer.leading:
            wait = max(0.05, min(wait, self.wake_at - self.clock()))
        end = loop.time() + wait
        seen = self.state.dir_revision.get(REQUESTS_DIR, 0)
        while (left := end - loop.time()) > 0 and not self.kick.is_set():
            kicked = asyncio.ensure_future(self.kick.wait())
            await asyncio.wait({kicked, self.state.changed()}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            kicked.cancel()
            if self.state.dir_revision.get(REQUESTS_DIR, 0) != seen:
                break
        self.kick.clear()

    async def round_once(self) -> Round:
        snap = self.state.snapshot()
        now = self.clock()
        todo = plan(snap, self.orderer.settings.zone, self.memory, now, self.orderer.settings.policy,
                    verify_interval=self.verify_interval, max_failures=self.max_failures, parallel=self.parallel)
        self.wake_at = todo.wake_at
        for name in todo.drop_requests:
            DROPPED.labels("request", "failures").inc()
            event(log, "certificate request dropped after failed orders", logging.WARNING, name=name,
                  failures=snap.cert_status[name].failures, error=snap.cert_status[name].last_error[:300])
            await self.store.txn(Txn().delete(key(REQUESTS_DIR, name)))
        for name in todo.done_requests:
            await self.store.txn(Txn().delete(key(REQUESTS_DIR, name)))
        for f in todo.forget:
            await self.store.txn(Txn().delete(key(STATUS_DIR, f.name)))
        for job in (*todo.orders, *todo.rechecks):
            self.memory.running.add(job.name)
            task = asyncio.create_task(self._order(job, snap) if isinstance(job, Order) else self._recheck(job.name))
            self.tasks.add(task)
            task.add_done_callback(lambda t, n=job.name: self._done(t, n))
        return todo

    def _done(self, task: asyncio.Task, name: str) -> None:
        self.tasks.discard(task)
        self.memory.running.discard(name)
        if not task.cancelled() and task.exception() is not None:
            log.error("on-demand job failed", exc_info=task.exception(), extra={"fields": {"name": name}})
        self.kick.set()  # a slot is free: look again now

    async def _verdict(self, name: str, purpose: str) -> bool | None:
        async with self.gate:
            verdict = await self.txt.check(name, purpose)
        self.memory.checked[name] = self.clock()
        ok = keeps(verdict, self.state.snapshot().apps)
        if ok is None:
            self.memory.held_off[name] = self.clock() + HOLD_OFF
        else:
            self.memory.held_off.pop(name, None)
        if ok is None:
            event(log, "custom domain TXT look-up failed, nothing changed", logging.WARNING, name=name,
                  reason=verdict.explain())
        elif not ok:
            event(log, "custom domain TXT no longer names an app here", logging.WARNING, name=name,
                  reason=verdict.explain())
        return ok

    async def _order(self, job: Order, snap: Snapshot) -> None:
        if job.recheck:
            ok = await self._verdict(job.name, "certificate" if job.request else "renewal")
            if ok is None:
                return  # retried at the next round that finds it due
            if not ok:
                await self._drop(job.name, request=job.request)
                return
        try:
            await self.orderer.order_http01(job.names)
        except AcmeError:
            return  # recorded in certstatus/ by the orderer, logged there; retried after the backoff
        self.memory.checked[job.name] = self.clock()
        if job.request:
            await self.store.txn(Txn().delete(key(REQUESTS_DIR, job.name)))

    async def _recheck(self, name: str) -> None:
        if await self._verdict(name, "renewal") is False:
            await self._drop(name, request=False)

    async def _drop(self, name: str, *, request: bool) -> None:
        if request:
            DROPPED.labels("request", "txt").inc()
            await self.store.txn(Txn().delete(key(REQUESTS_DIR, name)))
            return
        DROPPED.labels("certificate", "txt").inc()
        await self.store.txn(Txn().delete(key(CERTS_DIR, name)).delete(key(STATUS_DIR, name)))
        self.memory.checked.pop(name, None)
        event(log, "custom domain certificate dropped: its TXT record no longer names an app here",
              logging.WARNING, name=name)


__all__ = ["CertRequest", "Forget", "Memory", "OnDemandOrders", "Order", "Recheck", "Round", "keeps", "plan"]
