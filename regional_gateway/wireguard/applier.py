"""MeshApplier: makes the local WireGuard interface match the desired peer set, off the data path.

The agent calls `apply_peers(desired)` whenever its mesh view changes. The applier reads the
interface's actual peers, computes the `Plan` (pure, `peers.plan`), and has the backend apply
just that difference — all blocking work in a worker thread, one apply at a time, so the event
loop (and the proxy on it) never waits on WireGuard. Equal sets give an empty plan and no call
at all: restarting the agent leaves existing peers, and their tunnels, untouched. Our own public
key is never configured as a peer. A new peer's persistent keepalive is held back for
`settle_delay` seconds on one end of the link and twice that on the other (`keepalive_delay`), so
the first handshake starts once both ends know each other, from one end only; a follow-up apply
sets the held keepalives. Metrics: peers configured, last handshake age per peer,
applies, errors and peer changes by kind, labelled by interface (several appliers can share one
process, as in the tests).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import Counter, Gauge

from geomesh.logs import event
from regional_gateway.wireguard.backend import WireGuardBackend
from regional_gateway.wireguard.peers import Peer, Plan, hold_keepalives, keepalive_delay, peer_map, plan

log = logging.getLogger(__name__)

PEERS_CONFIGURED = Gauge("geomesh_mesh_peers_configured", "WireGuard peers configured on the interface",
                         ["interface"])
HANDSHAKE_AGE = Gauge("geomesh_mesh_peer_handshake_age_seconds",
                      "Seconds since the last WireGuard handshake with the peer (+Inf: never)",
                      ["interface", "peer"])
APPLIES = Counter("geomesh_mesh_applies_total", "Desired peer sets applied (including empty plans)",
                  ["interface"])
APPLY_ERRORS = Counter("geomesh_mesh_apply_errors_total", "Desired peer sets that failed to apply",
                       ["interface"])
PEER_CHANGES = Counter("geomesh_mesh_peer_changes_total", "Peers added, updated or removed on the interface",
                       ["interface", "change"])


class MeshApplier:
    """Applies desired peer sets to one backend (whose interface is already ensured)."""

    def __init__(self, backend: WireGuardBackend, *, clock: Callable[[], float] = time.time,
                 settle_delay: float = 1.0) -> None:
        self.backend = backend
        self.settle_delay = settle_delay
        self._clock = clock
        self._lock = asyncio.Lock()
        self._last: dict[str, Peer] | None = None
        self._held: dict[str, float] = {}  # public key -> monotonic time its keepalive may be set
        self._followup: asyncio.Task[None] | None = None
        self._names: dict[str, str] = {}  # public key -> display name, from the desired sets
        self._labelled: set[str] = set()

    @property
    def _ifname(self) -> str:
        return self.backend.interface or "?"

    async def apply_peers(self, desired: Mapping[str, Peer] | Iterable[Peer]) -> Plan:
        """Make the interface's peers equal `desired`; returns the plan that was applied (held
        keepalives, see `keepalive_delay`, show as not set yet; a follow-up apply sets them)."""
        want = peer_map(desired, field_name="desired")
        own = self.backend.public_key
        if own is not None and own in want:
            del want[own]  # a device never peers with itself
        async with self._lock:
            self._last = want
            try:
                result = await asyncio.to_thread(self._apply_blocking, want)
            except Exception as e:
                APPLY_ERRORS.labels(self._ifname).inc()
                event(log, "mesh apply failed", logging.ERROR, interface=self._ifname, error=str(e))
                raise
        APPLIES.labels(self._ifname).inc()
        if self._held and (self._followup is None or self._followup.done()):
            self._followup = asyncio.create_task(self._settle())
        return result

    async def _settle(self) -> None:
        """Re-apply the latest desired set when held keepalives come due."""
        while self._held and self._last is not None:
            due = min(self._held.values(), default=0.0)
            await asyncio.sleep(max(0.0, due - time.monotonic()) + 0.005)
            try:
                await self.apply_peers(self._last)
            except Exception:  # counted and logged by apply_peers; the next delta retries
                return

    def _apply_blocking(self, want: dict[str, Peer]) -> Plan:
        actual = self.backend.peers()
        todo = plan(want, actual)
        now = time.monotonic()
        own = self.backend.public_key
        held = dict(self._held)  # replaced, never mutated: the event loop thread reads it
        if own is not None and self.settle_delay > 0:
            for p in todo.adds:
                if p.persistent_keepalive:
                    held[p.public_key] = now + keepalive_delay(own, p.public_key, self.settle_delay)
        self._held = {k: t for k, t in held.items() if k in want and t > now}
        self._names = {k: p.name for k, p in want.items() if p.name}
        todo = hold_keepalives(todo, self._held, now)
        if not todo.empty:
            self.backend.apply(todo)
            ifname = self._ifname
            PEER_CHANGES.labels(ifname, "add").inc(len(todo.adds))
            PEER_CHANGES.labels(ifname, "update").inc(len(todo.updates))
            PEER_CHANGES.labels(ifname, "remove").inc(len(todo.removes))
            event(log, "mesh peers applied", interface=ifname, **todo.summary(),
                  added=[self._label(p.public_key) for p in todo.adds],
                  updated={self._label(u.peer.public_key): sorted(u.changed) for u in todo.updates},
                  removed=[self._label(k) for k in todo.removes])
            actual = self.backend.peers()
        self._update_gauges(actual)
        return todo

    async def observe(self) -> dict[str, Peer]:
        """The interface's actual peers (with handshakes and counters); refreshes the gauges."""
        async with self._lock:
            actual = await asyncio.to_thread(self.backend.peers)
        self._update_gauges(actual)
        return actual

    async def run_observer(self, interval: float = 5.0) -> None:
        """Refresh the handshake gauges every `interval` seconds until cancelled."""
        while True:
            try:
                await self.observe()
            except Exception as e:  # keep observing: the next round may work
                event(log, "mesh observe failed", logging.WARNING, interface=self._ifname, error=str(e))
            await asyncio.sleep(interval)

    def _label(self, key: str) -> str:
        return self._names.get(key) or key

    def _update_gauges(self, actual: Mapping[str, Peer]) -> None:
        ifname = self._ifname
        PEERS_CONFIGURED.labels(ifname).set(len(actual))
        now = self._clock()
        labels = set()
        for key, peer in actual.items():
            label = self._label(key)
            labels.add(label)
            age = math.inf if peer.last_handshake is None else max(0.0, now - peer.last_handshake)
            HANDSHAKE_AGE.labels(ifname, label).set(age)
        for gone in self._labelled - labels:
            try:
                HANDSHAKE_AGE.remove(ifname, gone)
            except KeyError:
                pass
        self._labelled = labels

    async def close(self, *, remove_interface: bool = False) -> None:
        """Close the backend (in a thread); the interface stays up unless remove_interface."""
        ifname = self._ifname
        if self._followup is not None:
            self._followup.cancel()
            self._followup = None
        async with self._lock:
            await asyncio.to_thread(self.backend.close, remove_interface=remove_interface)
        if remove_interface:
            for label in self._labelled:
                try:
                    HANDSHAKE_AGE.remove(ifname, label)
                except KeyError:
                    pass
            self._labelled = set()
            try:
                PEERS_CONFIGURED.remove(ifname)
            except KeyError:
                pass
