"""Who probes whom: the reachability probe plan every gateway and the coordinator compute alike.

Full N x N probing does not scale (N = 1000 is a million probes per interval), so each gateway
is probed from `m` other regions only, and every region still looks at every other region:

- **target probers.** For a target gateway T, the other regions are ranked by rendezvous hash
  (HRW) of (region, T); the first `m` are its prober regions, and in each the gateway ranked
  first by HRW of (gateway, T) probes it. A gateway joining or leaving moves only the
  assignments it wins or loses, and every process holding the same gateway set computes the
  same plan, with no coordination.
- **region coverage.** So that a region cut off from the internet can be told apart from a
  target that is down (a cut-off region fails on most others, and its votes must not count),
  every region P probes at least one gateway of every other region Q: where no target of Q
  already has a prober in P, the gateway of P ranked first by HRW of (gateway, "P>Q") probes the
  gateway of Q ranked first by HRW of (gateway, "P>Q").

Probes per interval: N * m for the targets plus at most R * (R - 1) for coverage (R regions), so
on average each gateway sends and receives about m + (R - 1) * R / N probes per interval,
whatever N is. Pure: no I/O, deterministic across processes (blake2b).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

DEFAULT_PROBER_REGIONS = 3


def _score(a: str, b: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{a}\0{b}".encode(), digest_size=8).digest(), "big")


def _first(candidates: Iterable[str], key: str) -> str:
    return max(candidates, key=lambda c: (_score(c, key), c))


@dataclass(frozen=True, slots=True)
class ProbePlan:
    """The plan for one gateway set: `probers[target]` and `targets[prober]`, both sorted names."""

    probers: Mapping[str, tuple[str, ...]]
    targets: Mapping[str, tuple[str, ...]]

    def targets_of(self, prober: str) -> tuple[str, ...]:
        return self.targets.get(prober, ())

    def probers_of(self, target: str) -> tuple[str, ...]:
        return self.probers.get(target, ())


def plan(regions_of: Mapping[str, str], m: int = DEFAULT_PROBER_REGIONS) -> ProbePlan:
    """The probe plan for gateways `regions_of` (gateway name -> region name), `m` prober regions
    per target (fewer when there are fewer other regions)."""
    if m < 1:
        raise ValueError(f"prober regions: {m} must be at least 1")
    by_region: dict[str, list[str]] = defaultdict(list)
    for name, region in regions_of.items():
        by_region[region].append(name)
    for names in by_region.values():
        names.sort()
    pairs: set[tuple[str, str]] = set()
    covered: set[tuple[str, str]] = set()  # (prober region, target region)
    for target in sorted(regions_of):
        own = regions_of[target]
        others = [r for r in by_region if r != own]
        ranked = sorted(others, key=lambda r: (_score(r, target), r), reverse=True)[:m]
        for region in ranked:
            pairs.add((_first(by_region[region], target), target))
            covered.add((region, own))
    for p_region in sorted(by_region):
        for t_region in sorted(by_region):
            if p_region == t_region or (p_region, t_region) in covered:
                continue
            key = f"{p_region}>{t_region}"
            pairs.add((_first(by_region[p_region], key), _first(by_region[t_region], key)))
    probers: dict[str, list[str]] = defaultdict(list)
    targets: dict[str, list[str]] = defaultdict(list)
    for prober, target in sorted(pairs):
        probers[target].append(prober)
        targets[prober].append(target)
    return ProbePlan(probers={k: tuple(v) for k, v in probers.items()},
                     targets={k: tuple(v) for k, v in targets.items()})
