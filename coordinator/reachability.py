"""Reachability by quorum of regions: the pure decision the coordinator makes from probe votes.

Gateways probe each other's public endpoints the way clients reach them (`geomesh.probe_plan`
says who probes whom) and report a per-target verdict, already debounced on the prober (down
after K failed probes in a row, up after R good ones). This module turns those votes into one
verdict per gateway, with the guard rails of Route 53's multi-region checkers and Envoy's panic
threshold:

- **only other regions vote**, and only live, registered probers; a vote about an unknown
  gateway, a gateway's vote about itself or about its own region, and stale votes are ignored and
  counted (`Decision.ignored`).
- **cut-off probers do not vote.** A prober region that reaches fewer than half of the other
  regions it probes (a region counts as reached when any of its gateways answered) is itself
  cut off; its votes do not count.
- **quorum.** Each voting region has one voice about a target: down when all of its live votes
  about it are down. With V voting regions, the quorum is max(2, V // 2 + 1). A reachable gateway
  becomes unreachable when a quorum of regions says down; an unreachable one becomes reachable
  when a quorum says up (or when fewer than two regions can vote at all: with no quorum possible,
  nothing is excluded — fail-open).
- **panic threshold.** At most `max_share` of all gateways may be unreachable at once. Past it,
  gateways already unreachable stay so, new ones are added by strength of evidence (most down
  regions, then name) up to the cap, and the rest are held reachable and named in
  `Decision.panic_held`.

Pure: votes, gateways and the previous verdicts in, a `Decision` out. Table-tested in
`tests/coordinator/test_reachability.py`.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

DEFAULT_MAX_SHARE = 0.5
DEFAULT_VOTE_MAX_AGE = 10.0  # seconds a vote counts without being renewed


@dataclass(frozen=True, slots=True)
class Vote:
    """What prober gateway `prober` last said about `target`: up or down, its last probe's RTT
    (ms, 0 when the probe failed) and when the coordinator heard it (monotonic seconds)."""

    prober: str
    target: str
    up: bool
    rtt_ms: float = 0.0
    at: float = 0.0


@dataclass(frozen=True, slots=True)
class Verdict:
    reachable: bool
    seen_by: tuple[str, ...] = ()   # regions whose probers reach it
    down_by: tuple[str, ...] = ()   # regions whose probers do not
    rtt_ms: float = 0.0             # the lowest last RTT among the up votes, 0 when none


@dataclass(frozen=True, slots=True)
class Decision:
    verdicts: Mapping[str, Verdict]
    cut_off: frozenset[str] = frozenset()          # prober regions whose votes did not count
    panic_held: tuple[str, ...] = ()               # would be unreachable, held by the panic threshold
    ignored: Mapping[str, int] = field(default_factory=dict)  # reason -> votes ignored

    @property
    def unreachable(self) -> frozenset[str]:
        return frozenset(n for n, v in self.verdicts.items() if not v.reachable)


def decide(regions_of: Mapping[str, str], votes: list[Vote] | tuple[Vote, ...], *,
           live: frozenset[str] | set[str], previous: frozenset[str] | set[str] = frozenset(),
           now: float = 0.0, max_age: float = DEFAULT_VOTE_MAX_AGE,
           max_share: float = DEFAULT_MAX_SHARE) -> Decision:
    """Verdicts for gateways `regions_of` (name -> region) from `votes`; `live` are the gateways
    whose votes may count (session open), `previous` the gateways unreachable before."""
    ignored: Counter[str] = Counter()
    valid: list[Vote] = []
    for v in votes:
        if v.target not in regions_of:
            ignored["unknown-target"] += 1
        elif v.prober not in regions_of:
            ignored["unknown-prober"] += 1
        elif v.prober == v.target:
            ignored["self"] += 1
        elif regions_of[v.prober] == regions_of[v.target]:
            ignored["same-region"] += 1
        elif v.prober not in live:
            ignored["prober-not-live"] += 1
        elif now - v.at > max_age:
            ignored["stale"] += 1
        else:
            valid.append(v)

    # which prober regions are cut off: they reach fewer than half of the regions they probe
    probed: dict[str, set[str]] = defaultdict(set)
    reached: dict[str, set[str]] = defaultdict(set)
    for v in valid:
        p, t = regions_of[v.prober], regions_of[v.target]
        probed[p].add(t)
        if v.up:
            reached[p].add(t)
    cut_off = frozenset(p for p in probed if 2 * len(reached[p]) < len(probed[p]))
    if cut_off:
        ignored["cut-off-region"] += sum(1 for v in valid if regions_of[v.prober] in cut_off)

    # one voice per region and target: down when every live vote of that region says down
    region_up: dict[str, dict[str, bool]] = defaultdict(dict)
    best_rtt: dict[str, float] = {}
    for v in valid:
        p = regions_of[v.prober]
        if p in cut_off:
            continue
        region_up[v.target][p] = region_up[v.target].get(p, False) or v.up
        if v.up and v.rtt_ms > 0:
            best_rtt[v.target] = min(best_rtt.get(v.target, v.rtt_ms), v.rtt_ms)

    verdicts: dict[str, Verdict] = {}
    evidence: dict[str, int] = {}
    for name in regions_of:
        voices = region_up.get(name, {})
        up = tuple(sorted(r for r, ok in voices.items() if ok))
        down = tuple(sorted(r for r, ok in voices.items() if not ok))
        quorum = max(2, len(voices) // 2 + 1)
        if len(voices) < 2:
            reachable = True  # no quorum possible: never exclude on one region's word
        elif name in previous:
            reachable = len(up) >= quorum
        else:
            reachable = len(down) < quorum
        if not reachable:
            evidence[name] = len(down)
        verdicts[name] = Verdict(reachable, up, down, best_rtt.get(name, 0.0))

    cap = int(max_share * len(regions_of))
    held: list[str] = []
    if len(evidence) > cap:
        keep = sorted(evidence, key=lambda n: (n not in previous, -evidence[n], n))[:cap]
        held = sorted(set(evidence) - set(keep))
        for n in held:
            v = verdicts[n]
            verdicts[n] = Verdict(True, v.seen_by, v.down_by, v.rtt_ms)
    return Decision(verdicts, cut_off, tuple(held), dict(ignored))
