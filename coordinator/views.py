"""What each consumer sees, as pure functions of a `Snapshot` (and a `Delta`).

No I/O, no etcd, no clock: gateways, regions and the other objects in, protobuf messages out,
so each rule is table-tested on hand-built snapshots (`tests/coordinator/test_views.py`).

- `subnet_carrier`: WireGuard routes a network to one peer only, so a region's instance subnet
  rides on one of its gateways (the first by name); `subnet_owner` applies it to a snapshot.
- `mesh_peer` / `mesh_update`: a gateway as a WireGuard peer, and the peers a gateway of a
  region sees (all registered gateways; the region's subnet never towards its own region).
  Peers depend only on the viewer's region, so one message per region is shared and
  `without_viewer` leaves the viewer itself out per session.
- `routing_update`: the routing resources changed after a revision (or the whole table).
- `overview` and `dns_presence`: the admin's GetOverview (with what the gateways reported to
  this replica, `heartbeats.GatewayStats`, passed in with the time).

Memoising and sharing these messages between streams is `coordinator.fanout`'s job.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from coordinator.heartbeats import GatewayStats
from coordinator.snapshot import NOT_REACH, Delta, Snapshot
from geomesh.api import geomesh_pb2 as pb
from geomesh.model import App, Gateway, GatewayState, Resource, resource_to_proto
from geomesh.routing_table import RoutingTable

K = pb.ResourceKey
MAX_OVERVIEW_LINKS = 1000


def subnet_carrier(gateways_of_region: Iterable[str]) -> str | None:
    """The gateway that carries its region's instance subnet: the first by name (None: none)."""
    return min(gateways_of_region, default=None)


def subnet_owners(snap: Snapshot) -> dict[str, str]:
    """Region -> the gateway carrying its instance subnet (regions with a gateway only)."""
    owners = snap.memo.get("owners")
    if owners is None:
        by_region: dict[str, list[str]] = {}
        for g in snap.gateways.values():
            by_region.setdefault(g.region, []).append(g.name)
        owners = {r: c for r, names in by_region.items() if (c := subnet_carrier(names)) is not None}
        snap.memo["owners"] = owners
    assert isinstance(owners, dict)
    return owners


def subnet_owner(snap: Snapshot, region: str) -> str | None:
    """The gateway that carries `region`'s instance subnet in its peers' allowed IPs."""
    return subnet_owners(snap).get(region)


def resource(snap: Snapshot, kind: int, name: str) -> Resource | None:
    """The routing resource of that kind and name (gateways joined with liveness), or None."""
    if kind == K.KIND_REGION:
        return snap.regions.get(name)
    if kind == K.KIND_GATEWAY:
        return snap.gateway(name)
    if kind == K.KIND_APP:
        return snap.apps.get(name)
    if kind == K.KIND_INSTANCE:
        return snap.instances.get(name)
    if kind == K.KIND_DOMAIN:
        return snap.domains.get(name)
    if kind == K.KIND_TXT:
        return snap.txt.get(name)
    return None


def table(snap: Snapshot) -> RoutingTable:
    """The whole routing table at the snapshot's revision (built once per snapshot)."""
    built = snap.memo.get("table")
    if built is None:
        gws = [snap.gateway(n) for n in snap.gateways]
        built = RoutingTable.from_resources(
            snap.revision, [*snap.regions.values(), *(g for g in gws if g), *snap.apps.values(),
                            *snap.instances.values(), *snap.domains.values(), *snap.txt.values()])
        snap.memo["table"] = built
    assert isinstance(built, RoutingTable)
    return built


def routing_update(snap: Snapshot, delta: Delta) -> pb.RoutingUpdate:
    """The RoutingUpdate for `delta`: the changed resources (removed when gone), or the table."""
    if delta.routing is None:
        return table(snap).to_snapshot()
    upserts, removals = [], []
    for kind, name in sorted(delta.routing):
        obj = resource(snap, kind, name)
        if obj is None:
            removals.append(pb.ResourceKey(kind=kind, name=name))
        else:
            upserts.append(resource_to_proto(obj))
    return pb.RoutingUpdate(revision=delta.revision, snapshot=False, upserts=upserts, removals=removals)


def mesh_peer(snap: Snapshot, name: str, viewer_region: str | None = None) -> pb.MeshPeer | None:
    """Gateway `name` as a WireGuard peer, seen from a gateway in `viewer_region` (None: it has no
    mesh address yet, or is not registered)."""
    g = snap.gateways.get(name)
    if g is None or not g.mesh_ip:
        return None
    allowed = [f"{g.mesh_ip}/{32 if ipaddress.ip_address(g.mesh_ip).version == 4 else 128}"]
    region = snap.regions.get(g.region)
    # WireGuard routes a network to one peer only: one gateway per region carries the region's
    # instance subnet, and never towards gateways of the same region (the subnet is local there)
    if (region is not None and region.instance_subnet and g.region != viewer_region
            and subnet_owner(snap, g.region) == name):
        allowed.append(region.instance_subnet)
    return pb.MeshPeer(name=g.name, region=g.region, public_key=g.wg_public_key,
                       endpoint=f"{g.public_ip}:{g.wg_port}", allowed_ips=allowed, mesh_ip=g.mesh_ip,
                       proxy_port=g.proxy_port, https_port=g.https_port,
                       unreachable=snap.reach.get(name, NOT_REACH).unreachable)


def mesh_update(snap: Snapshot, delta: Delta, viewer_region: str | None) -> pb.MeshUpdate:
    """The peers a gateway of `viewer_region` gets for `delta` (the viewer itself included: see
    `without_viewer`): every registered gateway on a snapshot, else the changed ones."""
    if delta.mesh is None:
        peers = [p for n in sorted(snap.gateways) if (p := mesh_peer(snap, n, viewer_region))]
        return pb.MeshUpdate(revision=delta.revision, snapshot=True, upserts=peers)
    upserts, removals = [], []
    for name in sorted(delta.mesh):
        peer = mesh_peer(snap, name, viewer_region)
        if peer is None:
            removals.append(name)
        else:
            upserts.append(peer)
    return pb.MeshUpdate(revision=delta.revision, snapshot=False, upserts=upserts, removals=removals)


def without_viewer(update: pb.MeshUpdate, viewer: str) -> pb.MeshUpdate:
    """`update` without the viewer itself (the same object when it is not in it)."""
    if not any(p.name == viewer for p in update.upserts) and viewer not in update.removals:
        return update
    return pb.MeshUpdate(revision=update.revision, snapshot=update.snapshot,
                         upserts=[p for p in update.upserts if p.name != viewer],
                         removals=[n for n in update.removals if n != viewer])


def viewer_region(snap: Snapshot, gateway: str) -> str | None:
    me = snap.gateways.get(gateway)
    return me.region if me is not None else None


def overview(snap: Snapshot, stats: GatewayStats | None = None, now: float = 0.0) -> pb.Overview:
    """GetOverview: every gateway's health, per-region counts, the reachability decider's last
    round, the certificates the coordinators obtain (expiry, next attempt, failures), the live GeoDNS servers, and the mesh links with a dead end (at most MAX_OVERVIEW_LINKS: a 1000-gateway mesh
    has 500k pairs). With `stats` (at clock time `now`), each gateway's last reported load,
    connections, version and peers' handshake ages (peers still registered, by name)."""
    out = pb.Overview(revision=snap.revision, apps=len(snap.apps), domains=len(snap.domains),
                      cut_off_regions=snap.cut_off_regions, panic_held=snap.panic_held)
    for name in sorted({*snap.certs, *snap.cert_status}):  # chains, expiry, schedule: never a key
        rec, plan = snap.certs.get(name), snap.cert_status.get(name)
        out.certificates.append(rec.status(plan) if rec is not None else plan.to_proto())  # type: ignore[union-attr]
    views = [g for n in snap.gateways if (g := snap.gateway(n)) is not None]
    in_dns = dns_presence(views, snap.apps.values())
    for g in sorted(views, key=lambda g: (g.region, g.name)):
        out.gateways.append(pb.GatewayHealth(
            name=g.name, region=g.region, session=g.to_proto().session, reachable=not g.unreachable,
            seen_by=g.seen_by, down_by=g.down_by, probe_rtt_ms=g.probe_rtt_ms,
            draining=g.state is GatewayState.DRAINING, in_dns=g.name in in_dns))
        report = stats.reports.get(g.name) if stats is not None else None
        if report is not None:
            health = out.gateways[-1]
            health.load, health.active_connections, health.version = (
                report.load, report.active_connections, report.version)
            health.peers.extend(pb.PeerHandshake(name=p, age_seconds=age)
                                for p, age in sorted(stats.handshakes(g.name, now).items()) if p in snap.gateways)
    for name in sorted(snap.regions):
        gws = [g for g in views if g.region == name]
        insts = [i for i in snap.instances.values() if i.region == name]
        out.regions.append(pb.RegionOverview(
            region=snap.regions[name].to_proto(), gateways=len(gws),
            gateways_alive=sum(1 for g in gws if g.alive),
            gateways_draining=sum(1 for g in gws if g.state is GatewayState.DRAINING),
            instances=len(insts), instances_healthy=sum(1 for i in insts if i.healthy),
            apps=sorted({i.app for i in insts})))
    out.dns_servers.extend(pb.DnsServer(name=n, address=a) for n, a in sorted(snap.dns_servers.items()))
    names = sorted(snap.gateways)
    alive = [n for n in names if snap.alive(n)]
    out.links_total = len(names) * (len(names) - 1) // 2
    out.links_up = len(alive) * (len(alive) - 1) // 2
    dead = [n for n in names if not snap.alive(n)]
    for a in dead:  # every link with a dead end, each pair once, bounded
        for b in names:
            if b != a and (snap.alive(b) or b > a):
                if len(out.links) >= MAX_OVERVIEW_LINKS:
                    return out
                out.links.append(pb.MeshLink(a=min(a, b), b=max(a, b), up=False))
    return out


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
