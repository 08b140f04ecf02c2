"""The reachability decider: each replica turns the probers' votes in its cache into `reach/` keys.

Gateways probe each other from outside (`geomesh.probe_plan` says who probes whom) and report
verdict changes in their heartbeats; the replica holding a prober's session writes its vote map
to `votes/<prober>`. Every replica runs this loop: when gateways, sessions, votes or decisions
change in its cache (debounced by `debounce`, 50 ms), it runs the pure
`coordinator.reachability.decide` over the active (not draining) gateways, with the votes of
probers whose session is open, and the gateways `reach/` says unreachable as the previous
verdicts. The `reach/<g>` records the decision changes are written in one transaction that
compares each key's mod revision: every replica computes the same decision from the same cache,
one wins, the others' compares fail and they re-decide on the next change (a lost race is fine).

Logs each verdict change it wrote (gateway, verdict, seen_by, down_by), and when the cut-off
regions or the gateways held by the panic threshold change. Metrics: decisions written per
verdict, gauges of unreachable gateways, panic-held gateways and cut-off regions, and the last
verdict and RTT of each prober region about each gateway.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping

from prometheus_client import Counter, Gauge

from coordinator.operations import Operations
from coordinator.reach_keys import ReachRecord, reach_writes, votes_of
from coordinator.reachability import DEFAULT_MAX_SHARE, Decision, decide
from coordinator.state import State
from geomesh.errors import StoreUnavailableError
from geomesh.model import GatewayState, SessionState

log = logging.getLogger("geomesh.coordinator.reach")

DECISIONS = Counter("geomesh_coordinator_reach_decisions_total",
                    "reachability verdict changes this replica wrote to etcd", ["verdict"])
UNREACHABLE = Gauge("geomesh_coordinator_reach_unreachable", "gateways decided unreachable now")
PANIC_HELD = Gauge("geomesh_coordinator_reach_panic_held",
                   "gateways a quorum finds unreachable but held reachable by the panic threshold")
CUT_OFF = Gauge("geomesh_coordinator_reach_cut_off_regions", "prober regions whose votes do not count now")
PROBE_UP = Gauge("geomesh_coordinator_reach_probe_up",
                 "last verdict of a prober region's open-session probers about a gateway (1 up, 0 down)",
                 ["from_region", "target"])
PROBE_RTT = Gauge("geomesh_coordinator_reach_probe_rtt_ms",
                  "lowest last probe round trip (ms) of a prober region's probers that reach a gateway",
                  ["from_region", "target"])


def decide_from(state: State, max_share: float) -> tuple[Decision, dict[str, str]]:
    """The decision for the state's cache now, and the gateways it was made over (name -> region)."""
    regions_of = {n: g.region for n, g in state.gateways.items() if g.state is GatewayState.ACTIVE}
    live = frozenset(n for n in regions_of if state.session(n) is SessionState.OPEN)
    previous = frozenset(n for n, r in state.reach.items() if r.unreachable and n in regions_of)
    # votes in etcd are each prober's current set: no age limit (a prober whose session is not
    # open does not count at all)
    decision = decide(regions_of, votes_of(state.votes), live=live, previous=previous, now=0.0,
                      max_age=math.inf, max_share=max_share)
    return decision, regions_of


class ReachDecider:
    def __init__(self, state: State, ops: Operations, *, max_share: float = DEFAULT_MAX_SHARE,
                 debounce: float = 0.05) -> None:
        self.state = state
        self.ops = ops
        self.max_share = max_share
        self.debounce = debounce
        self._probe_labels: set[tuple[str, str]] = set()

    async def run(self) -> None:
        seen: int | None = None
        while True:
            if self.state.reach_epoch == seen:
                await asyncio.shield(self.state.changed())  # shared future: never cancel it
                continue
            await asyncio.sleep(self.debounce)
            seen = self.state.reach_epoch
            try:
                await self.round()
            except StoreUnavailableError as exc:
                log.warning("could not write reachability decisions; retrying",
                            extra={"fields": {"error": str(exc)}})
                seen = None
                await asyncio.sleep(0.5)
            except Exception:
                log.exception("reachability decision failed")
                seen = None
                await asyncio.sleep(1.0)

    async def round(self) -> bool:
        """Decide once and write what changed; False when a compare failed (decided elsewhere)."""
        decision, regions_of = decide_from(self.state, self.max_share)
        self._observe(decision, regions_of)
        current = {n: self.state.reach.get(n, ReachRecord()) for n in decision.verdicts}
        writes = reach_writes(decision, current)
        if not writes:
            return True
        raw = self.state.raw["reach"]
        ok = await self.ops.write_reach({n: (r, raw[n].mod_revision if n in raw else 0) for n, r in writes.items()})
        if ok:
            for name, record in sorted(writes.items()):
                if record.unreachable == current[name].unreachable:
                    continue  # who sees it changed, not the verdict
                verdict = "unreachable" if record.unreachable else "reachable"
                DECISIONS.labels(verdict).inc()
                (log.warning if record.unreachable else log.info)(
                    "gateway reachability changed",
                    extra={"fields": {"gateway": name, "region": regions_of.get(name, ""), "verdict": verdict,
                                      "seen_by": list(record.seen_by), "down_by": list(record.down_by)}})
        return ok

    def _observe(self, decision: Decision, regions_of: Mapping[str, str]) -> None:
        cut_off = tuple(sorted(decision.cut_off))
        held = tuple(sorted(decision.panic_held))
        if cut_off != self.state.cut_off_regions:
            (log.warning if cut_off else log.info)(
                "prober regions cut off: their votes do not count" if cut_off else "no prober region is cut off",
                extra={"fields": {"regions": list(cut_off)}})
        if held != self.state.panic_held:
            (log.warning if held else log.info)(
                "panic threshold: gateways held reachable" if held else "panic threshold released",
                extra={"fields": {"gateways": list(held), "max_share": self.max_share,
                                  "unreachable": len(decision.unreachable)}})
        self.state.cut_off_regions = cut_off
        self.state.panic_held = held
        UNREACHABLE.set(len(decision.unreachable))
        PANIC_HELD.set(len(held))
        CUT_OFF.set(len(cut_off))
        # per (prober region, target): any live prober of the region up, lowest RTT among them
        up: dict[tuple[str, str], bool] = {}
        rtt: dict[tuple[str, str], float] = {}
        for prober, votes in self.state.votes.items():
            region = regions_of.get(prober)
            if region is None or self.state.session(prober) is not SessionState.OPEN:
                continue
            for target, (ok, ms) in votes.items():
                if target not in regions_of:
                    continue
                pair = (region, target)
                up[pair] = up.get(pair, False) or ok
                if ok and ms > 0:
                    rtt[pair] = min(rtt.get(pair, ms), ms)
        for pair in self._probe_labels - up.keys():
            PROBE_UP.remove(*pair)
            PROBE_RTT.remove(*pair)
        for pair, ok in up.items():
            PROBE_UP.labels(*pair).set(1 if ok else 0)
            PROBE_RTT.labels(*pair).set(rtt.get(pair, 0.0))
        self._probe_labels = set(up)
