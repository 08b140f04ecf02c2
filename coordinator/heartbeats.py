"""Rules for a gateway's heartbeats: what a valid one is, how many count, when health is written.

Pure and synchronous (time is passed in), so the rules are table-tested without a server. A
heartbeat is checked on arrival (`HeartbeatReport.from_proto`: `load` finite and >= 0,
`active_connections` >= 0, or `ValidationError` naming the field). A `TokenBucket` per session
caps how many heartbeats per second are looked at; the excess still proves the gateway is there
but its content is ignored (every heartbeat reports every backend, so the next one accepted
carries the same news). A `HealthCoalescer` per session keeps the latest reported health of each
instance that differs from what etcd has, and hands it out at most once per interval, so a
gateway costs at most one etcd write batch per interval however fast its backends flap; the
last reported value wins.

Instance health has one owner per instance (`health_owner`): the gateway of the instance's
region with an open session ranked first by rendezvous hash of (gateway, instance), so two
gateways that disagree cannot flip the record; the others' reports are ignored. Reachability
votes (`Heartbeat.reach`) are checked by `check_votes` (a known target, not the prober itself nor
its region, one vote per target, at most `MAX_VOTES_PER_HEARTBEAT`, a finite RTT; the rest is
ignored and counted, never an error) and merged into the prober's vote map by `merge_votes`.

What a gateway reports about itself (load, connections, `SessionHello.version`, its peers'
WireGuard handshake ages in `Heartbeat.peers`, the ACME HTTP-01 challenge set it applied in
`Heartbeat.http_challenges_revision`) is kept by `GatewayStats`, in memory on the
replica holding the session, never in etcd (one write per heartbeat per gateway would be too
chatty): with several replicas, each replica's GetOverview shows what its own sessions reported.
`check_handshakes` keeps the valid handshake entries (a known peer, not the gateway itself, one
entry per peer, a finite age >= 0, at most the mesh size); the rest is ignored and counted.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass, field

from geomesh.api import geomesh_pb2 as pb
from geomesh.errors import ValidationError


@dataclass(frozen=True, slots=True)
class HeartbeatReport:
    """One heartbeat, validated: backends maps "app/id" to healthy (the last entry of a name wins)."""

    load: float
    active_connections: int
    backends: Mapping[str, bool]

    def __post_init__(self) -> None:
        if not math.isfinite(self.load) or self.load < 0:
            raise ValidationError("heartbeat.load", f"{self.load!r} is not a finite number >= 0")
        if self.active_connections < 0:
            raise ValidationError("heartbeat.active_connections", f"{self.active_connections} is negative")

    @classmethod
    def from_proto(cls, m: pb.Heartbeat) -> HeartbeatReport:
        return cls(m.load, m.active_connections, {f"{b.app}/{b.instance_id}": b.healthy for b in m.backends})


@dataclass(slots=True)
class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; `take` spends one if there is one."""

    rate: float
    burst: float
    tokens: float = -1.0  # -1: start full
    at: float | None = None

    def take(self, now: float) -> bool:
        if self.tokens < 0 or self.at is None:
            self.tokens = self.burst
        else:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def wait(self, now: float) -> float:
        """Seconds from `now` until `take` would succeed (0 when it would now)."""
        if self.tokens < 0 or self.at is None:
            return 0.0
        have = min(self.burst, self.tokens + (now - self.at) * self.rate)
        return 0.0 if have >= 1 else (1 - have) / self.rate + 1e-6


@dataclass(slots=True)
class HealthCoalescer:
    """Health changes of one gateway's instances, written at most once per `interval`.

    `offer` takes a heartbeat's report and what the cache says now (only instances the gateway
    may report on); a value is pending when it differs from the cache, or from what is being
    written right now (`inflight`, the cache does not show it yet). `take` hands the pending
    values to the writer; `done` says whether they were written (if not, they are pending again
    unless a newer value came meanwhile).
    """

    interval: float
    pending: dict[str, bool] = field(default_factory=dict)
    inflight: dict[str, bool] = field(default_factory=dict)
    last_take: float = -math.inf

    def offer(self, reported: Mapping[str, bool], cached: Mapping[str, bool]) -> bool:
        """Record a report; True when something is pending."""
        for name, healthy in reported.items():
            current = cached.get(name)
            if current is None:
                continue  # unknown instance, or not this gateway's to report on
            if name in self.pending or healthy != self.inflight.get(name, current):
                self.pending[name] = healthy
        return bool(self.pending)

    def due_at(self) -> float | None:
        """When the pending values may be written (None: nothing pending)."""
        return self.last_take + self.interval if self.pending else None

    def take(self, now: float) -> dict[str, bool]:
        batch, self.pending = self.pending, {}
        self.inflight = dict(batch)
        self.last_take = now
        return batch

    def done(self, written: bool) -> None:
        if not written:
            for name, healthy in self.inflight.items():
                self.pending.setdefault(name, healthy)
        self.inflight = {}


# -- instance health: one owner per instance -------------------------------------------------

def _score(gateway: str, instance: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{gateway}\0{instance}".encode(), digest_size=8).digest(), "big")


def health_owner(instance: str, candidates: Iterable[str]) -> str | None:
    """The gateway whose reports set `instance`'s health: among `candidates` (the gateways of the
    instance's region with an open session), the first by rendezvous hash of (gateway, instance);
    None when there is none. A gateway joining or leaving moves only the instances it wins or
    loses, and every replica picks the same owner from the same cache."""
    best: tuple[int, str] | None = None
    for name in candidates:
        rank = (_score(name, instance), name)
        if best is None or rank > best:
            best = rank
    return None if best is None else best[1]


# -- reachability votes ------------------------------------------------------------------------

MAX_VOTES_PER_HEARTBEAT = 4096

VoteMap = dict[str, tuple[bool, float]]  # target -> (up, rtt_ms)


def fold_heartbeats(older: pb.Heartbeat, newer: pb.Heartbeat,
                    limit: int = MAX_VOTES_PER_HEARTBEAT) -> pb.Heartbeat:
    """One heartbeat saying what `older` then `newer` said, for a heartbeat that waits over the
    rate and is replaced: load, backends and peers are `newer`'s (each heartbeat reports them
    all), votes are deltas so none is lost: `older`'s votes on targets `newer` does not name are
    kept (unless `newer` is a complete list), at most `limit` of them, the newest first kept."""
    folded = pb.Heartbeat()
    folded.CopyFrom(newer)
    if newer.reach_complete or not older.reach:
        return folded
    named = {v.target for v in newer.reach}
    carried = [v for v in older.reach if v.target not in named]
    room = limit - len(newer.reach)
    carried = carried[max(0, len(carried) - room):] if room > 0 else []
    del folded.reach[:]
    folded.reach.extend(carried)
    folded.reach.extend(newer.reach)
    folded.reach_complete = older.reach_complete
    return folded


def check_votes(prober: str, votes: Iterable[pb.ReachVote], region_of: Callable[[str], str | None],
                limit: int = MAX_VOTES_PER_HEARTBEAT) -> tuple[VoteMap, Counter[str]]:
    """The valid votes of one heartbeat of `prober` (target -> (up, rtt_ms)) and what was ignored
    (reason -> count). `region_of(name)` is a known gateway's region, None for an unknown name.
    Reasons: too-many (past `limit`), duplicate (a second vote about one target: the first
    counts), unknown-target, self, same-region (only other regions vote), bad-rtt (not a finite
    number >= 0)."""
    accepted: VoteMap = {}
    ignored: Counter[str] = Counter()
    own = region_of(prober)
    for i, vote in enumerate(votes):
        if i >= limit:
            ignored["too-many"] += 1
            continue
        target = vote.target
        region = region_of(target)
        if target in accepted:
            ignored["duplicate"] += 1
        elif region is None:
            ignored["unknown-target"] += 1
        elif target == prober:
            ignored["self"] += 1
        elif region == own:
            ignored["same-region"] += 1
        elif not math.isfinite(vote.rtt_ms) or vote.rtt_ms < 0:
            ignored["bad-rtt"] += 1
        else:
            accepted[target] = (vote.up, round(vote.rtt_ms, 3))
    return accepted, ignored


def merge_votes(current: Mapping[str, tuple[bool, float]], accepted: Mapping[str, tuple[bool, float]],
                complete: bool, known: Container[str]) -> VoteMap:
    """The prober's vote map after one heartbeat: `accepted` replaces the map when `complete`
    (the prober's whole set), else updates it; targets no longer `known` are dropped."""
    merged = dict(accepted) if complete else {**current, **accepted}
    return {t: v for t, v in merged.items() if t in known}


# -- what a gateway reports about itself -----------------------------------------------------

MAX_VERSION_LEN = 64


def check_handshakes(reporter: str, peers: Iterable[pb.PeerHandshake], known: Container[str],
                     limit: int) -> tuple[dict[str, float], Counter[str]]:
    """The valid handshake ages of one heartbeat (peer -> seconds, 0 = never) and what was
    ignored (reason -> count). Reasons: too-many (past `limit`, the mesh size), duplicate (the
    first entry of a peer counts), unknown-peer (not a registered gateway), self, bad-age (not a
    finite number >= 0)."""
    accepted: dict[str, float] = {}
    ignored: Counter[str] = Counter()
    for i, peer in enumerate(peers):
        if i >= limit:
            ignored["too-many"] += 1
        elif peer.name in accepted:
            ignored["duplicate"] += 1
        elif peer.name == reporter:
            ignored["self"] += 1
        elif peer.name not in known:
            ignored["unknown-peer"] += 1
        elif not math.isfinite(peer.age_seconds) or peer.age_seconds < 0:
            ignored["bad-age"] += 1
        else:
            accepted[peer.name] = round(peer.age_seconds, 1)
    return accepted, ignored


def checked_version(version: str) -> str:
    """`SessionHello.version` as shown: printable, at most MAX_VERSION_LEN characters (else cut)."""
    return "".join(c for c in version if c.isprintable())[:MAX_VERSION_LEN]


@dataclass(slots=True)
class GatewayReport:
    """The latest self-report of one gateway, as its session received it."""

    load: float = 0.0
    active_connections: int = 0
    version: str = ""
    handshakes: dict[str, float] = field(default_factory=dict)
    handshakes_at: float = 0.0  # clock time the handshakes were reported (ages grow from there)
    http01_revision: int = 0  # the revision of the last HTTP-01 challenge set it applied (its ack)


@dataclass(slots=True)
class GatewayStats:
    """gateway -> its latest `GatewayReport`, for the sessions this replica holds (in memory).

    A session opens the gateway's entry (`open`), its heartbeats update it, and its end drops
    it (`close`, only when no newer session of the gateway replaced it)."""

    reports: dict[str, GatewayReport] = field(default_factory=dict)

    def open(self, gateway: str, version: str) -> GatewayReport:
        report = GatewayReport(version=checked_version(version))
        self.reports[gateway] = report
        return report

    def close(self, gateway: str, report: GatewayReport) -> None:
        if self.reports.get(gateway) is report:
            del self.reports[gateway]

    def unacked(self, revision: int) -> list[str]:
        """The gateways with a session here that have not applied an HTTP-01 challenge set of at
        least `revision` (`Heartbeat.http_challenges_revision`), by name."""
        return sorted(g for g, report in self.reports.items() if report.http01_revision < revision)

    def handshakes(self, gateway: str, now: float) -> dict[str, float]:
        """The gateway's peers' handshake ages now (0 = never): reported age + time since."""
        report = self.reports.get(gateway)
        if report is None:
            return {}
        grown = max(0.0, now - report.handshakes_at)
        return {p: (round(age + grown, 1) if age > 0 else 0.0) for p, age in report.handshakes.items()}
