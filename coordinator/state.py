"""The coordinator's in-memory cache of etcd, and the views computed from it.

One watch over `/geomesh/v1/` feeds `State.apply_batch`; everything the services read comes from
here, so reads keep working while etcd is away. Besides the current objects, the state keeps a
change history: for each etcd revision, which routing resources and which mesh peers changed.
A stream that is at revision R asks `changes_since(R)` and sends only those (coalesced), so a
slow consumer catches up in one message and a join in an N-gateway mesh costs each other
gateway one peer, not N. A consumer older than the history gets a snapshot instead.

Messages computed for a revision (snapshots, deltas from a given revision, and their serialized
bytes) are memoised until the next change, so N streams at one revision share one copy.

A gateway as consumers see it (`gateway(name)`) joins three keys: its record (`gateways/<g>`),
its liveness and session state (`alive/<g>`) and the reachability decision (`reach/<g>`); a
change to any of them is a Gateway upsert in the routing feed, and a `reach/` change also a mesh
peer change (`MeshPeer.unreachable`). Probers' votes (`votes/<g>`) are kept for the decider
(`coordinator.reach_decider`), which is woken through `reach_epoch`.

Everything here is synchronous and pure apart from the asyncio future used to wake streams (and a
counter of shared snapshots).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client import Counter

from coordinator.heartbeats import VoteMap, health_owner
from coordinator.reach_keys import ReachRecord, session_of, votes_from_json
from coordinator.store import KV, Event
from geomesh.api import geomesh_pb2 as pb
from geomesh.errors import ValidationError
from geomesh.model import (
    App,
    Domain,
    Gateway,
    GatewayState,
    Instance,
    Region,
    Resource,
    SessionState,
    resource_to_proto,
)
from geomesh.routing_table import RoutingTable

PREFIX = b"/geomesh/v1/"
K = pb.ResourceKey
_KIND_OF_DIR = {"regions": K.KIND_REGION, "gateways": K.KIND_GATEWAY, "alive": K.KIND_GATEWAY,
                "reach": K.KIND_GATEWAY, "apps": K.KIND_APP, "instances": K.KIND_INSTANCE,
                "domains": K.KIND_DOMAIN}
_REACH_INPUTS = frozenset({"gateways", "alive", "votes", "reach"})  # what the reach decider reads
ACCESS_DIRS = ("enrollments", "revoked")  # kept raw for coordinator.access (not in any feed)
HISTORY_LIMIT = 50_000
SNAPSHOT_CACHE = Counter("geomesh_coordinator_snapshot_cache_total",
                         "routing snapshots asked for by streams: hit = the revision's serialized snapshot was shared",
                         ["result"])
MAX_OVERVIEW_LINKS = 1000


def key(kind: str, name: str) -> bytes:
    """The etcd key of an object: key("gateways", "gw1") -> b"/geomesh/v1/gateways/gw1"."""
    return PREFIX + f"{kind}/{name}".encode()


@dataclass(slots=True)
class Change:
    revision: int
    routing: set[tuple[int, str]] = field(default_factory=set)  # (ResourceKey.Kind, name)
    mesh: set[str] = field(default_factory=set)                  # gateway names whose peer changed


@dataclass(frozen=True, slots=True)
class Delta:
    """What changed after a revision: routing keys and mesh peers (None => send a snapshot)."""

    revision: int
    routing: frozenset[tuple[int, str]] | None
    mesh: frozenset[str] | None


class State:
    def __init__(self, mesh_cidr: str = "10.88.0.0/16") -> None:
        self.mesh_network = ipaddress.ip_network(mesh_cidr)
        self.revision = 0
        self.floor = 0  # we know every change after this revision
        self.raw: dict[str, dict[str, KV]] = {d: {} for d in (*_KIND_OF_DIR, "ipam", "votes", *ACCESS_DIRS)}
        self.dir_revision: dict[str, int] = {}  # directory -> revision of its last change (or load)
        self.regions: dict[str, Region] = {}
        self.gateways: dict[str, Gateway] = {}  # stored records (alive filled in by resource())
        self.apps: dict[str, App] = {}
        self.instances: dict[str, Instance] = {}
        self.domains: dict[str, Domain] = {}
        self.ipam: dict[str, str] = {}  # mesh ip -> gateway
        self.sessions: dict[str, SessionState] = {}   # alive/<g>: open or timed out (absent: closed)
        self.votes: dict[str, VoteMap] = {}           # votes/<prober>: target -> (up, rtt_ms)
        self.reach: dict[str, ReachRecord] = {}       # reach/<g>: the decision (absent: reachable)
        self.reach_epoch = 0  # bumped when gateways, alive, votes or reach change (wakes the decider)
        # the decider's last round, for GetOverview (every replica computes the same)
        self.cut_off_regions: tuple[str, ...] = ()
        self.panic_held: tuple[str, ...] = ()
        self.history: deque[Change] = deque()
        self._tick: asyncio.Future | None = None
        self._table: RoutingTable | None = None
        # per-revision memos: every session at the same revision shares one computed message
        self._gateway_view: dict[str, Gateway] = {}         # gateway with `alive` filled in
        self._owners: dict[str, str | None] = {}            # region -> gateway carrying its subnet
        self._memo: dict[tuple, object] = {}                # (kind, from, to[, region]) -> message
        self._health_owners: dict[tuple[str, str], str | None] = {}  # (instance, region) -> owner
        self._open_in: dict[str, list[str]] = {}  # region -> gateways with an open session

    # -- loading and applying ----------------------------------------------------------------

    def load(self, revision: int, kvs: Iterable[KV]) -> None:
        """Replace everything with a consistent snapshot taken at `revision`."""
        for d in self.raw.values():
            d.clear()
        for obj in (self.regions, self.gateways, self.apps, self.instances, self.domains, self.ipam,
                    self.sessions, self.votes, self.reach):
            obj.clear()
        for kv in kvs:
            self._set(kv.key, kv.value, kv.mod_revision)
        self.revision = revision
        self.dir_revision = dict.fromkeys(self.raw, revision)
        self.floor = revision  # history before this point is unknown: older consumers get snapshots
        self.history.clear()
        self._gateway_view.clear()
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
            if directory in ("gateways", "alive", "reach"):
                self._gateway_view.pop(name, None)
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
        names = [g.name for g in self.gateways.values() if g.region == region]
        return min(names) if names else None

    def note_progress(self, revision: int) -> None:
        if revision > self.revision:
            self.revision = revision
            self._wake()

    def _wake(self) -> None:
        self._table = None
        self._memo.clear()
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
        store = self.raw[directory]
        if value is None:
            store.pop(name, None)
        else:
            store[name] = KV(raw_key, value, 0, mod_revision)
        try:
            self._decode(directory, name, value, mod_revision)
        except (ValueError, ValidationError, TypeError):
            # a hand-edited or foreign value: ignore it rather than poison the cache
            self._decode(directory, name, None, mod_revision)

    def _decode(self, directory: str, name: str, value: bytes | None, mod_revision: int) -> None:
        if directory == "regions":
            _put(self.regions, name, None if value is None else Region.from_json(value))
        elif directory == "gateways":
            _put(self.gateways, name, None if value is None else Gateway.from_json(value, mod_revision=mod_revision))
        elif directory == "apps":
            _put(self.apps, name, None if value is None else App.from_json(value, mod_revision=mod_revision))
        elif directory == "instances":
            _put(self.instances, name, None if value is None else Instance.from_json(value))
        elif directory == "domains":
            _put(self.domains, name, None if value is None else Domain.from_json(value))
        elif directory == "ipam":
            _put(self.ipam, name, None if value is None else value.decode())
        elif directory == "alive":
            _put(self.sessions, name, None if value is None else session_of(value))
        elif directory == "votes":
            _put(self.votes, name, None if value is None else votes_from_json(value))
        elif directory == "reach":
            _put(self.reach, name, None if value is None else ReachRecord.from_json(value))

    # -- objects -----------------------------------------------------------------------------

    def alive(self, gateway: str) -> bool:
        """Its session is open or timed out (`alive/<g>` exists)."""
        return gateway in self.raw["alive"]

    def session(self, gateway: str) -> SessionState:
        return self.sessions.get(gateway, SessionState.CLOSED) if self.alive(gateway) else SessionState.CLOSED

    def gateway(self, name: str) -> Gateway | None:
        """The stored gateway with `alive`, `session` and the reachability verdict filled in
        (cached until its record, its alive key or its reach key changes)."""
        view = self._gateway_view.get(name)
        if view is not None:
            return view
        g = self.gateways.get(name)
        if g is None:
            return None
        reach = self.reach.get(name, ReachRecord())
        view = dataclasses.replace(g, alive=self.alive(name), session=self.session(name),
                                   unreachable=reach.unreachable, seen_by=reach.seen_by,
                                   down_by=reach.down_by, probe_rtt_ms=reach.probe_rtt_ms)
        self._gateway_view[name] = view
        return view

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

    def resource(self, kind: int, name: str) -> Resource | None:
        if kind == K.KIND_REGION:
            return self.regions.get(name)
        if kind == K.KIND_GATEWAY:
            return self.gateway(name)
        if kind == K.KIND_APP:
            return self.apps.get(name)
        if kind == K.KIND_INSTANCE:
            return self.instances.get(name)
        if kind == K.KIND_DOMAIN:
            return self.domains.get(name)
        return None

    def table(self) -> RoutingTable:
        if self._table is None or self._table.revision != self.revision:
            gws = [self.gateway(n) for n in self.gateways]
            self._table = RoutingTable.from_resources(
                self.revision, [*self.regions.values(), *(g for g in gws if g), *self.apps.values(),
                                *self.instances.values(), *self.domains.values()])
        return self._table

    # -- deltas ------------------------------------------------------------------------------

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

    def routing_update(self, delta: Delta, since: int | None = None) -> pb.RoutingUpdate:
        """The RoutingUpdate for `delta`; with `since` (the revision it starts from) it is memoised
        for this revision, so every stream at the same revision shares one message. A snapshot is
        the same whatever the stream had before, so all snapshots of a revision are one message."""
        memo_key = ("routing", None if delta.routing is None else since, delta.revision)
        if since is not None and memo_key in self._memo:
            return self._memo[memo_key]  # type: ignore[return-value]
        update = self._routing_update(delta)
        if since is not None:
            self._memo[memo_key] = update
        return update

    def routing_wire(self, delta: Delta, since: int) -> bytes:
        """`routing_update(delta, since)` serialized, memoised alike: N streams at one revision
        send one shared bytes object instead of N copies of a (possibly large) snapshot."""
        memo_key = ("routing-wire", None if delta.routing is None else since, delta.revision)
        wire = self._memo.get(memo_key)
        if delta.routing is None:
            SNAPSHOT_CACHE.labels("hit" if wire is not None else "miss").inc()
        if wire is None:
            wire = self.routing_update(delta, since).SerializeToString()
            self._memo[memo_key] = wire
        assert isinstance(wire, bytes)
        return wire

    def _routing_update(self, delta: Delta) -> pb.RoutingUpdate:
        if delta.routing is None:
            return self.table().to_snapshot()
        upserts, removals = [], []
        for kind, name in sorted(delta.routing):
            obj = self.resource(kind, name)
            if obj is None:
                removals.append(pb.ResourceKey(kind=kind, name=name))
            else:
                upserts.append(resource_to_proto(obj))
        return pb.RoutingUpdate(revision=delta.revision, snapshot=False, upserts=upserts, removals=removals)

    def subnet_owner(self, region: str) -> str | None:
        """The gateway that carries `region`'s instance subnet in its peers' allowed IPs."""
        if region not in self._owners:
            self._owners[region] = self._compute_owner(region)
        return self._owners[region]

    def mesh_peer(self, name: str, viewer_region: str | None = None) -> pb.MeshPeer | None:
        """Gateway `name` as a WireGuard peer, seen from a gateway in `viewer_region`."""
        g = self.gateways.get(name)
        if g is None or not g.mesh_ip:
            return None
        allowed = [f"{g.mesh_ip}/{32 if ipaddress.ip_address(g.mesh_ip).version == 4 else 128}"]
        region = self.regions.get(g.region)
        # WireGuard routes a network to one peer only: one gateway per region carries the region's
        # instance subnet, and never towards gateways of the same region (the subnet is local there)
        if (region is not None and region.instance_subnet and g.region != viewer_region
                and self.subnet_owner(g.region) == name):
            allowed.append(region.instance_subnet)
        return pb.MeshPeer(name=g.name, region=g.region, public_key=g.wg_public_key,
                           endpoint=f"{g.public_ip}:{g.wg_port}", allowed_ips=allowed, mesh_ip=g.mesh_ip,
                           proxy_port=g.proxy_port, https_port=g.https_port,
                           unreachable=self.reach.get(name, ReachRecord()).unreachable)

    def mesh_update(self, delta: Delta, for_gateway: str, since: int | None = None) -> pb.MeshUpdate:
        """The mesh view of `for_gateway`: every other registered gateway is a peer.

        Peers depend only on the viewer's region, so with `since` the message is built once per
        (revision range, region) and shared; only the viewer itself is left out per session."""
        me = self.gateways.get(for_gateway)
        viewer_region = me.region if me is not None else None
        memo_key = ("mesh", since, delta.revision, viewer_region)
        shared = self._memo.get(memo_key) if since is not None else None
        if shared is None:
            shared = self._mesh_update(delta, viewer_region)
            if since is not None:
                self._memo[memo_key] = shared
        assert isinstance(shared, pb.MeshUpdate)
        if not any(p.name == for_gateway for p in shared.upserts) and for_gateway not in shared.removals:
            return shared
        return pb.MeshUpdate(revision=shared.revision, snapshot=shared.snapshot,
                             upserts=[p for p in shared.upserts if p.name != for_gateway],
                             removals=[n for n in shared.removals if n != for_gateway])

    def _mesh_update(self, delta: Delta, viewer_region: str | None) -> pb.MeshUpdate:
        if delta.mesh is None:
            peers = [p for n in sorted(self.gateways) if (p := self.mesh_peer(n, viewer_region))]
            return pb.MeshUpdate(revision=delta.revision, snapshot=True, upserts=peers)
        upserts, removals = [], []
        for name in sorted(delta.mesh):
            peer = self.mesh_peer(name, viewer_region)
            if peer is None:
                removals.append(name)
            else:
                upserts.append(peer)
        return pb.MeshUpdate(revision=delta.revision, snapshot=False, upserts=upserts, removals=removals)

    # -- overview ----------------------------------------------------------------------------

    def overview(self) -> pb.Overview:
        out = pb.Overview(revision=self.revision, apps=len(self.apps), domains=len(self.domains),
                          cut_off_regions=self.cut_off_regions, panic_held=self.panic_held)
        views = [g for n in self.gateways if (g := self.gateway(n)) is not None]
        in_dns = dns_presence(views, self.apps.values())
        for g in sorted(views, key=lambda g: (g.region, g.name)):
            out.gateways.append(pb.GatewayHealth(
                name=g.name, region=g.region, session=g.to_proto().session, reachable=not g.unreachable,
                seen_by=g.seen_by, down_by=g.down_by, probe_rtt_ms=g.probe_rtt_ms,
                draining=g.state is GatewayState.DRAINING, in_dns=g.name in in_dns))
        for name in sorted(self.regions):
            gws = [self.gateway(g) for g in self.gateways if self.gateways[g].region == name]
            insts = [i for i in self.instances.values() if i.region == name]
            out.regions.append(pb.RegionOverview(
                region=self.regions[name].to_proto(), gateways=len(gws),
                gateways_alive=sum(1 for g in gws if g and g.alive),
                gateways_draining=sum(1 for g in gws if g and g.state is GatewayState.DRAINING),
                instances=len(insts), instances_healthy=sum(1 for i in insts if i.healthy),
                apps=sorted({i.app for i in insts})))
        names = sorted(self.gateways)
        alive = [n for n in names if self.alive(n)]
        out.links_total = len(names) * (len(names) - 1) // 2
        out.links_up = len(alive) * (len(alive) - 1) // 2
        dead = [n for n in names if not self.alive(n)]
        for a in dead:  # every link with a dead end, each pair once, bounded
            for b in names:
                if b != a and (self.alive(b) or b > a):
                    if len(out.links) >= MAX_OVERVIEW_LINKS:
                        return out
                    out.links.append(pb.MeshLink(a=min(a, b), b=max(a, b), up=False))
        return out

    def free_mesh_ips(self) -> Iterable[str]:
        """Candidate mesh addresses not in the (possibly stale) cache, lowest first."""
        for host in self.mesh_network.hosts():
            ip = str(host)
            if ip not in self.ipam:
                yield ip


def dns_presence(gateways: Iterable[Gateway], apps: Iterable[App]) -> frozenset[str]:
    """The gateways GeoDNS answers with (`GatewayHealth.in_dns`): the reachable routable ones,
    and, where fail-open applies, the routable ones anyway. Fail-open applies to the regions an
    app may be served from (its pinned regions, or every region) when none of their routable
    gateways is reachable: GeoDNS then answers the nearest such region's routable gateways, so
    each of them may be answered. Per-app hosting is not looked at (DNS may send an app to any
    healthy region it may be served from)."""
    gws = list(gateways)
    out = {g.name for g in gws if g.reachable_routable}
    # None: an app not pinned may be served from every region (and so, with no app yet, may any)
    groups: set[frozenset[str] | None] = {frozenset(a.pinned_regions) if a.pinned_regions else None for a in apps}
    groups = groups or {None}
    for allowed in groups:
        members = [g for g in gws if g.routable and (allowed is None or g.region in allowed)]
        if members and not any(g.reachable_routable for g in members):
            out.update(g.name for g in members)
    return frozenset(out)


def _put(d: dict, name: str, value: object) -> None:
    if value is None:
        d.pop(name, None)
    else:
        d[name] = value
