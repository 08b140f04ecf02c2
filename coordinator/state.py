"""The coordinator's in-memory mirror of etcd and its change history; hands out immutable snapshots.

One watch over `/geomesh/v1/` feeds `State.apply_batch`; everything the services read comes from
here, so reads keep working while etcd is away. Besides the current objects, the mirror keeps a
change history: for each etcd revision, which routing resources and which mesh peers changed.
A stream that is at revision R asks `changes_since(R)` and sends only those (coalesced), so a
slow consumer catches up in one message and a join in an N-gateway mesh costs each other
gateway one peer, not N. A consumer older than the history gets a snapshot instead.

`snapshot()` is the cache at the current revision as an immutable `coordinator.snapshot.Snapshot`
(a directory unchanged since the last snapshot shares its copy); the views
(`coordinator.views`) are pure functions of it, and `coordinator.fanout` memoises the messages
streams share. Values are decoded by one table (`DECODERS`: directory -> model and the dict it
fills); a value that does not decode is ignored rather than poison the cache.

A gateway as consumers see it (`Snapshot.gateway(name)`) joins three keys: its record
(`gateways/<g>`), its liveness and session state (`alive/<g>`) and the reachability decision
(`reach/<g>`); a change to any of them is a Gateway upsert in the routing feed, and a `reach/`
change also a mesh peer change (`MeshPeer.unreachable`). Probers' votes (`votes/<g>`) are kept
for the decider (`coordinator.reach_decider`), which is woken through `reach_epoch`. The live
GeoDNS servers (`dns/<name>`, written while their feed is open: `coordinator.dns_servers`) are
mirrored as `dns_servers` (name -> answer address); they are in no feed. ACME HTTP-01 challenges
(`http01/<token>`, `coordinator.http01`) are mirrored as `http01`: in no feed either, the gateway
sessions send the whole set when the directory changes (`dir_revision["http01"]`). Custom domains'
certificate requests (`certrequests/<name>`, `coordinator.cert_requests`) are mirrored as
`cert_requests`, for the ordering leader; in no feed.

Everything here is synchronous and pure apart from the asyncio future used to wake waiters.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import MappingProxyType

from coordinator.cert_records import CertificateRecord, CertRequest, Http01Record, RenewalStatus
from coordinator.heartbeats import VoteMap, health_owner
from coordinator.reach_keys import ReachRecord, session_of, votes_from_json
from coordinator.snapshot import Delta, Snapshot
from coordinator.store import KV, Event
from coordinator.views import subnet_carrier
from geomesh import validate
from geomesh.api import geomesh_pb2 as pb
from geomesh.errors import ValidationError
from geomesh.model import App, Domain, Gateway, Instance, Region, SessionState, TxtRecord

__all__ = ["ACCESS_DIRS", "HISTORY_LIMIT", "PREFIX", "Change", "Delta", "Snapshot", "State", "key"]

PREFIX = b"/geomesh/v1/"
K = pb.ResourceKey
_KIND_OF_DIR = {"regions": K.KIND_REGION, "gateways": K.KIND_GATEWAY, "alive": K.KIND_GATEWAY,
                "reach": K.KIND_GATEWAY, "apps": K.KIND_APP, "instances": K.KIND_INSTANCE,
                "domains": K.KIND_DOMAIN, "txt": K.KIND_TXT}
_REACH_INPUTS = frozenset({"gateways", "alive", "votes", "reach"})  # what the reach decider reads
ACCESS_DIRS = ("enrollments", "revoked")  # kept raw for coordinator.access (not in any feed)
HISTORY_LIMIT = 50_000

# directory -> (the State attribute its decoded values fill, decoder of one value given its mod revision)
DECODERS: dict[str, tuple[str, Callable[[bytes, int], object]]] = {
    "regions": ("regions", lambda v, _rev: Region.from_json(v)),
    "gateways": ("gateways", lambda v, rev: Gateway.from_json(v, mod_revision=rev)),
    "apps": ("apps", lambda v, rev: App.from_json(v, mod_revision=rev)),
    "instances": ("instances", lambda v, _rev: Instance.from_json(v)),
    "domains": ("domains", lambda v, _rev: Domain.from_json(v)),
    "txt": ("txt", lambda v, _rev: TxtRecord.from_json(v)),
    "certs": ("certs", lambda v, _rev: CertificateRecord.from_json(v)),
    "certstatus": ("cert_status", lambda v, _rev: RenewalStatus.from_json(v)),
    "http01": ("http01", lambda v, _rev: Http01Record.from_json(v)),
    "certrequests": ("cert_requests", lambda v, _rev: CertRequest.from_json(v)),
    "ipam": ("ipam", lambda v, _rev: v.decode()),
    "alive": ("sessions", lambda v, _rev: session_of(v)),
    "votes": ("votes", lambda v, _rev: votes_from_json(v)),
    "reach": ("reach", lambda v, _rev: ReachRecord.from_json(v)),
    "dns": ("dns_servers", lambda v, _rev: dns_address(v)),
}
# Snapshot field -> the directory it mirrors
_SNAPSHOT_DIRS = {"regions": "regions", "gateways": "gateways", "apps": "apps", "instances": "instances",
                  "domains": "domains", "txt": "txt", "sessions": "alive", "reach": "reach",
                  "certs": "certs", "cert_status": "certstatus", "dns_servers": "dns",
                  "http01": "http01", "cert_requests": "certrequests"}


def dns_address(value: bytes) -> str:
    """The address a live GeoDNS server announced (`dns/<name>`, `coordinator.dns_servers`)."""
    data = json.loads(value)
    return validate.query_address("dns.address", data.get("address", "") if isinstance(data, dict) else "")


def key(kind: str, name: str) -> bytes:
    """The etcd key of an object: key("gateways", "gw1") -> b"/geomesh/v1/gateways/gw1"."""
    return PREFIX + f"{kind}/{name}".encode()


@dataclass(slots=True)
class Change:
    revision: int
    routing: set[tuple[int, str]] = field(default_factory=set)  # (ResourceKey.Kind, name)
    mesh: set[str] = field(default_factory=set)                  # gateway names whose peer changed


class State:
    def __init__(self, mesh_cidr: str = "10.88.0.0/16") -> None:
        self.mesh_network = ipaddress.ip_network(mesh_cidr)
        self.revision = 0
        self.floor = 0  # we know every change after this revision
        self.raw: dict[str, dict[str, KV]] = {d: {} for d in (*_KIND_OF_DIR, "ipam", "votes", "certs", "certstatus",
                                                               "dns", "http01", "certrequests", *ACCESS_DIRS)}
        self.dir_revision: dict[str, int] = {}  # directory -> revision of its last change (or load)
        self.regions: dict[str, Region] = {}
        self.gateways: dict[str, Gateway] = {}  # stored records (alive filled in by Snapshot.gateway)
        self.apps: dict[str, App] = {}
        self.instances: dict[str, Instance] = {}
        self.domains: dict[str, Domain] = {}
        self.txt: dict[str, TxtRecord] = {}
        self.certs: dict[str, CertificateRecord] = {}      # certificates obtained (coordinator.acme_orders)
        self.cert_status: dict[str, RenewalStatus] = {}
        self.http01: dict[str, Http01Record] = {}          # http01/<token>: challenges every gateway answers
        self.cert_requests: dict[str, CertRequest] = {}    # certrequests/<name>: on-demand orders to make
        self.ipam: dict[str, str] = {}  # mesh ip -> gateway
        self.sessions: dict[str, SessionState] = {}   # alive/<g>: open or timed out (absent: closed)
        self.votes: dict[str, VoteMap] = {}           # votes/<prober>: target -> (up, rtt_ms)
        self.reach: dict[str, ReachRecord] = {}       # reach/<g>: the decision (absent: reachable)
        self.dns_servers: dict[str, str] = {}         # dns/<name>: live GeoDNS servers' answer addresses
        self.reach_epoch = 0  # bumped when gateways, alive, votes or reach change (wakes the decider)
        # the decider's last round, for GetOverview (every replica computes the same)
        self._cut_off_regions: tuple[str, ...] = ()
        self._panic_held: tuple[str, ...] = ()
        self.history: deque[Change] = deque()
        self._tick: asyncio.Future | None = None
        self._snapshot: Snapshot | None = None  # of the current revision, made on demand
        self._edits: dict[str, int] = dict.fromkeys(self.raw, 0)  # directory -> edit count
        self._frozen: dict[str, tuple[int, MappingProxyType]] = {}  # directory -> (edit count, copy)
        self._owners: dict[str, str | None] = {}  # region -> gateway carrying its subnet
        self._health_owners: dict[tuple[str, str], str | None] = {}  # (instance, region) -> owner
        self._open_in: dict[str, list[str]] = {}  # region -> gateways with an open session

    # -- loading and applying ----------------------------------------------------------------

    def load(self, revision: int, kvs: Iterable[KV]) -> None:
        """Replace everything with a consistent snapshot taken at `revision`."""
        for d in self.raw.values():
            d.clear()
        for attribute, _ in DECODERS.values():
            getattr(self, attribute).clear()
        for directory in self._edits:
            self._edits[directory] += 1
        for kv in kvs:
            self._set(kv.key, kv.value, kv.mod_revision)
        self.revision = revision
        self.dir_revision = dict.fromkeys(self.raw, revision)
        self.floor = revision  # history before this point is unknown: older consumers get snapshots
        self.history.clear()
        self._health_owners.clear()
        self._open_in.clear()
        self.reach_epoch += 1
        self._owners = {r: self._compute_owner(r) for r in {g.region for g in self.gateways.values()}}
        self._wake()

    def apply_batch(self, events: list[Event]) -> Change:
        """Apply the events of one etcd revision; returns what changed."""
        rev = events[0].mod_revision
        change = Change(rev)
        for ev in events:
            parsed = self._split(ev.key)
            if parsed is None:
                continue
            directory, name = parsed
            before_subnet = self.regions[name].instance_subnet if directory == "regions" and name in self.regions else None
            before_gateway = self.gateways.get(name) if directory == "gateways" else None
            self._set(ev.key, ev.value, ev.mod_revision)
            kind = _KIND_OF_DIR.get(directory)
            if kind is not None:
                change.routing.add((kind, name))
            if directory in _REACH_INPUTS:
                self.reach_epoch += 1
            if directory in ("gateways", "alive"):
                self._health_owners.clear()
                self._open_in.clear()
            if directory == "reach":
                change.mesh.add(name)  # MeshPeer.unreachable
            elif directory == "gateways":
                change.mesh.add(name)
                # the region's instance subnet rides on one gateway of the region (the first by
                # name): a join or leave that moves it changes the old and the new carrier
                after_gateway = self.gateways.get(name)
                for region in {g.region for g in (before_gateway, after_gateway) if g is not None}:
                    old_owner = self._owners.get(region)
                    new_owner = self._compute_owner(region)
                    self._owners[region] = new_owner
                    if old_owner != new_owner:
                        change.mesh.update(n for n in (old_owner, new_owner) if n)
            elif directory == "regions":
                after = self.regions.get(name)
                if (after.instance_subnet if after else None) != before_subnet and self._owners.get(name):
                    change.mesh.add(self._owners[name])  # type: ignore[arg-type]
        self.revision = max(self.revision, rev)
        if change.routing or change.mesh:
            self.history.append(change)
            while len(self.history) > HISTORY_LIMIT:
                self.floor = self.history.popleft().revision
        self._wake()
        return change

    def _compute_owner(self, region: str) -> str | None:
        return subnet_carrier(g.name for g in self.gateways.values() if g.region == region)

    def note_progress(self, revision: int) -> None:
        if revision > self.revision:
            self.revision = revision
            self._wake()

    def _wake(self) -> None:
        self._snapshot = None
        tick, self._tick = self._tick, None
        if tick is not None and not tick.done():
            tick.set_result(None)

    def changed(self) -> asyncio.Future:
        """A future resolved at the next change (shared by every waiter: no task per waiter)."""
        if self._tick is None or self._tick.done():
            self._tick = asyncio.get_running_loop().create_future()
        return self._tick

    async def wait_change(self, after_revision: int, timeout: float | None = None) -> bool:
        """Wait until the state is past `after_revision`; False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self.revision <= after_revision:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            try:
                await asyncio.wait_for(asyncio.shield(self.changed()), remaining)
            except TimeoutError:
                return False
        return True

    @staticmethod
    def _split(raw_key: bytes) -> tuple[str, str] | None:
        if not raw_key.startswith(PREFIX):
            return None
        rest = raw_key[len(PREFIX):].decode(errors="replace")
        directory, _, name = rest.partition("/")
        return (directory, name) if name else None

    def _set(self, raw_key: bytes, value: bytes | None, mod_revision: int) -> None:
        parsed = self._split(raw_key)
        if parsed is None or parsed[0] not in self.raw:
            return
        directory, name = parsed
        self.dir_revision[directory] = max(self.dir_revision.get(directory, 0), mod_revision)
        self._edits[directory] += 1
        store = self.raw[directory]
        if value is None:
            store.pop(name, None)
        else:
            store[name] = KV(raw_key, value, 0, mod_revision)
        decoder = DECODERS.get(directory)
        if decoder is None:
            return  # kept raw only (enrollments, revoked)
        attribute, decode = decoder
        target: dict = getattr(self, attribute)
        try:
            decoded = None if value is None else decode(value, mod_revision)
        except (ValueError, ValidationError, TypeError):
            decoded = None  # a hand-edited or foreign value: ignore it rather than poison the cache
        if decoded is None:
            target.pop(name, None)
        else:
            target[name] = decoded

    # -- snapshots ---------------------------------------------------------------------------

    @property
    def cut_off_regions(self) -> tuple[str, ...]:
        return self._cut_off_regions

    @cut_off_regions.setter
    def cut_off_regions(self, regions: tuple[str, ...]) -> None:
        self._cut_off_regions = regions
        self._snapshot = None  # the decider's round is part of the next snapshot

    @property
    def panic_held(self) -> tuple[str, ...]:
        return self._panic_held

    @panic_held.setter
    def panic_held(self, regions: tuple[str, ...]) -> None:
        self._panic_held = regions
        self._snapshot = None

    def snapshot(self) -> Snapshot:
        """The cache at the current revision, immutable (made once per revision, on demand)."""
        snap = self._snapshot
        if snap is None:
            parts = {f: self._frozen_copy(d, getattr(self, f)) for f, d in _SNAPSHOT_DIRS.items()}
            snap = self._snapshot = Snapshot(self.revision, cut_off_regions=self._cut_off_regions,
                                             panic_held=self._panic_held, **parts)
        return snap

    def _frozen_copy(self, directory: str, values: dict) -> MappingProxyType:
        """A read-only copy of one directory's values, shared until the directory is edited."""
        edits = self._edits[directory]
        held = self._frozen.get(directory)
        if held is None or held[0] != edits:
            held = self._frozen[directory] = (edits, MappingProxyType(dict(values)))
        return held[1]

    # -- mirror reads for the writers and the heartbeat rules ----------------------------------

    def alive(self, gateway: str) -> bool:
        """Its session is open or timed out (`alive/<g>` exists)."""
        return gateway in self.raw["alive"]

    def session(self, gateway: str) -> SessionState:
        return self.sessions.get(gateway, SessionState.CLOSED) if self.alive(gateway) else SessionState.CLOSED

    def gateway(self, name: str) -> Gateway | None:
        """The gateway joined with its liveness and reachability (see `Snapshot.gateway`)."""
        return self.snapshot().gateway(name)

    def open_gateways(self, region: str) -> list[str]:
        """Gateways of `region` whose session is open (memoised until a gateway or session changes)."""
        if region not in self._open_in:
            self._open_in[region] = [n for n, g in self.gateways.items()
                                     if g.region == region and self.session(n) is SessionState.OPEN]
        return self._open_in[region]

    def health_owner(self, instance: str, region: str) -> str | None:
        """The gateway whose reports set `instance`'s health (see `heartbeats.health_owner`),
        memoised until a gateway or a session changes."""
        memo = (instance, region)
        if memo not in self._health_owners:
            self._health_owners[memo] = health_owner(instance, self.open_gateways(region))
        return self._health_owners[memo]

    def changes_since(self, revision: int) -> Delta:
        """Everything that changed after `revision`; None fields mean "too old: snapshot"."""
        if revision < self.floor or revision > self.revision:
            return Delta(self.revision, None, None)
        routing: set[tuple[int, str]] = set()
        mesh: set[str] = set()
        for change in reversed(self.history):
            if change.revision <= revision:
                break
            routing |= change.routing
            mesh |= change.mesh
        return Delta(self.revision, frozenset(routing), frozenset(mesh))

    def free_mesh_ips(self) -> Iterable[str]:
        """Candidate mesh addresses not in the (possibly stale) cache, lowest first."""
        for host in self.mesh_network.hosts():
            ip = str(host)
            if ip not in self.ipam:
                yield ip
