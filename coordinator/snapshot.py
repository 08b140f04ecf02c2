"""The coordinator's cache at one etcd revision, as an immutable value.

`coordinator.state.State` (the etcd mirror) hands out a `Snapshot` per revision; the views
(`coordinator.views`) and the servicers read only snapshots, never the mirror's mutable dicts.
A snapshot's mappings are read-only copies taken when it was made (a directory that did not
change since the previous snapshot shares that snapshot's copy), so a snapshot stays the same
whatever the mirror applies later: the go-control-plane `Snapshot` idea. `Delta` is the other
input of the views: which routing keys and mesh peers changed after a revision.

A snapshot memoises what is derived from it (gateways joined with their liveness and
reachability, the routing table, the subnet carriers): the values are immutable, so the memo
is only a cache of pure functions of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from coordinator.cert_records import CertificateRecord, CertRequest, Http01Record, RenewalStatus
from coordinator.reach_keys import ReachRecord
from geomesh.model import App, Domain, Gateway, Instance, Region, SessionState, TxtRecord

NOT_REACH = ReachRecord()


def _empty() -> Mapping:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Delta:
    """What changed after a revision: routing keys and mesh peers (None => send a snapshot)."""

    revision: int
    routing: frozenset[tuple[int, str]] | None
    mesh: frozenset[str] | None


@dataclass(frozen=True, slots=True, eq=False)
class Snapshot:
    """Every object of the cache at `revision`. `gateways` are the stored records; `gateway(name)`
    joins one with its session (`alive/<g>`) and reachability verdict (`reach/<g>`)."""

    revision: int
    regions: Mapping[str, Region] = field(default_factory=_empty)
    gateways: Mapping[str, Gateway] = field(default_factory=_empty)
    apps: Mapping[str, App] = field(default_factory=_empty)
    instances: Mapping[str, Instance] = field(default_factory=_empty)
    domains: Mapping[str, Domain] = field(default_factory=_empty)
    txt: Mapping[str, TxtRecord] = field(default_factory=_empty)  # txt/<name>: ACME challenges
    certs: Mapping[str, CertificateRecord] = field(default_factory=_empty)  # certs/<name>, keys sealed
    cert_status: Mapping[str, RenewalStatus] = field(default_factory=_empty)  # certstatus/<name>
    sessions: Mapping[str, SessionState] = field(default_factory=_empty)  # alive/<g>: open or timed out (absent: closed)
    reach: Mapping[str, ReachRecord] = field(default_factory=_empty)       # reach/<g>: the decision (absent: reachable)
    dns_servers: Mapping[str, str] = field(default_factory=_empty)  # dns/<name>: live GeoDNS servers -> "ip:port"
    http01: Mapping[str, Http01Record] = field(default_factory=_empty)  # http01/<token>: HTTP-01 challenges
    cert_requests: Mapping[str, CertRequest] = field(default_factory=_empty)  # certrequests/<name>: on demand
    cut_off_regions: tuple[str, ...] = ()  # the reachability decider's last round
    panic_held: tuple[str, ...] = ()
    memo: dict[object, object] = field(default_factory=dict, repr=False)  # pure derived values

    def alive(self, gateway: str) -> bool:
        """Its session is open or timed out (`alive/<g>` exists)."""
        return gateway in self.sessions

    def session(self, gateway: str) -> SessionState:
        return self.sessions.get(gateway, SessionState.CLOSED)

    def gateway(self, name: str) -> Gateway | None:
        """The stored gateway with `alive`, `session` and the reachability verdict filled in."""
        memo_key = ("gateway", name)
        view = self.memo.get(memo_key)
        if view is None:
            g = self.gateways.get(name)
            if g is None:
                return None
            reach = self.reach.get(name, NOT_REACH)
            view = dataclasses.replace(g, alive=self.alive(name), session=self.session(name),
                                       unreachable=reach.unreachable, seen_by=reach.seen_by,
                                       down_by=reach.down_by, probe_rtt_ms=reach.probe_rtt_ms)
            self.memo[memo_key] = view
        assert isinstance(view, Gateway)
        return view
