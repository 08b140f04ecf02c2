"""The etcd values of reachability and liveness, and the pure rules that turn a decision into writes.

Three directories under `/geomesh/v1/` (JSON, readable with etcdctl):

- `alive/<g>`: `{"session": "open"}` while the gateway's control session is open, `{"session":
  "timed_out"}` after its heartbeats stopped (kept, same lease: the gateway stays alive while a
  quorum still reaches it); deleted when the stream is reset or closed. The value `1` of older
  coordinators reads as open.
- `votes/<prober>`: `{"<target>": {"up": bool, "rtt_ms": float}, ...}`, the prober's current
  debounced verdicts, written by the replica holding its session when they change.
- `reach/<gateway>`: `{"unreachable": bool, "seen_by": [...], "down_by": [...], "probe_rtt_ms":
  float}`, the decision of `coordinator.reachability.decide`, written only when it changes. An
  absent key reads as reachable and seen by nobody (`ReachRecord()`).

Pure: bytes in, values out, and `reach_writes(decision, current)` says which `reach/` keys a
decision changes. A value that does not parse reads as absent (a hand edit cannot poison the cache).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

from coordinator.heartbeats import VoteMap
from coordinator.reachability import Decision, Verdict, Vote
from geomesh.model import SessionState

# -- alive/<g> -----------------------------------------------------------------------------------

def alive_value(session: SessionState) -> bytes:
    return json.dumps({"session": session.value}, separators=(",", ":")).encode()


def session_of(value: bytes) -> SessionState:
    """The session state an `alive/<g>` value says: timed_out when it says so, else open (the key
    exists, so the gateway is alive; older coordinators wrote `1`)."""
    try:
        data = json.loads(value)
    except ValueError:
        return SessionState.OPEN
    if isinstance(data, dict) and data.get("session") == SessionState.TIMED_OUT.value:
        return SessionState.TIMED_OUT
    return SessionState.OPEN


# -- votes/<prober> ------------------------------------------------------------------------------

def votes_to_json(votes: Mapping[str, tuple[bool, float]]) -> bytes:
    return json.dumps({t: {"up": up, "rtt_ms": rtt} for t, (up, rtt) in sorted(votes.items())},
                      separators=(",", ":")).encode()


def votes_from_json(value: bytes) -> VoteMap:
    """A prober's vote map; entries that are not `{"up": bool, "rtt_ms": number}` are skipped."""
    try:
        data = json.loads(value)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    out: VoteMap = {}
    for target, vote in data.items():
        if not isinstance(vote, dict) or not isinstance(vote.get("up"), bool):
            continue
        rtt = vote.get("rtt_ms", 0.0)
        if isinstance(rtt, bool) or not isinstance(rtt, int | float) or not math.isfinite(rtt) or rtt < 0:
            rtt = 0.0
        out[str(target)] = (vote["up"], float(rtt))
    return out


def votes_of(maps: Mapping[str, Mapping[str, tuple[bool, float]]]) -> list[Vote]:
    """Every prober's map as `Vote`s for `decide` (at 0: votes in etcd are current, no max age)."""
    return [Vote(prober, target, up, rtt) for prober, votes in sorted(maps.items())
            for target, (up, rtt) in sorted(votes.items())]


# -- reach/<gateway> -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ReachRecord:
    unreachable: bool = False
    seen_by: tuple[str, ...] = ()
    down_by: tuple[str, ...] = ()
    probe_rtt_ms: float = 0.0

    @classmethod
    def of(cls, verdict: Verdict) -> ReachRecord:
        return cls(not verdict.reachable, tuple(verdict.seen_by), tuple(verdict.down_by), round(verdict.rtt_ms, 3))

    def to_json(self) -> bytes:
        return json.dumps({"unreachable": self.unreachable, "seen_by": list(self.seen_by),
                           "down_by": list(self.down_by), "probe_rtt_ms": self.probe_rtt_ms},
                          separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, value: bytes) -> ReachRecord:
        """The record, or the default (reachable) when it does not parse."""
        try:
            data = json.loads(value)
        except ValueError:
            return cls()
        if not isinstance(data, dict):
            return cls()

        def names(field: str) -> tuple[str, ...]:
            raw = data.get(field, [])
            return tuple(str(x) for x in raw) if isinstance(raw, list) else ()

        rtt = data.get("probe_rtt_ms", 0.0)
        if isinstance(rtt, bool) or not isinstance(rtt, int | float) or not math.isfinite(rtt):
            rtt = 0.0
        return cls(data.get("unreachable") is True, names("seen_by"), names("down_by"), float(rtt))


def reach_writes(decision: Decision, current: Mapping[str, ReachRecord]) -> dict[str, ReachRecord]:
    """The `reach/` records `decision` changes: gateway -> new record (absent reads as default)."""
    out: dict[str, ReachRecord] = {}
    for name, verdict in decision.verdicts.items():
        record = ReachRecord.of(verdict)
        if record != current.get(name, ReachRecord()):
            out[name] = record
    return out
