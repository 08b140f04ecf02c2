"""The routing table: an immutable snapshot of regions, gateways, apps, instances and domains.

The coordinator computes it from its etcd cache; geodns and the gateways hold a local copy fed by
`RoutingUpdate` messages (snapshot, then deltas). `apply` is pure: it returns a new table, so a
reader on the data path always sees one consistent revision and never waits for the control
plane. The queries here (which regions host an app, which gateways are routable) are the ones
every consumer needs; consumers add their own indexes on top.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from prometheus_client import Counter

from geomesh.api import geomesh_pb2 as pb
from geomesh.errors import GeomeshError
from geomesh.logs import event
from geomesh.model import (
    KIND_OF,
    App,
    Domain,
    Gateway,
    Instance,
    Region,
    Resource,
    TxtRecord,
    resource_from_proto,
    resource_name,
    resource_to_proto,
)

_EMPTY: Mapping = MappingProxyType({})
_ATTR_OF_KIND = {
    pb.ResourceKey.KIND_REGION: "regions",
    pb.ResourceKey.KIND_GATEWAY: "gateways",
    pb.ResourceKey.KIND_APP: "apps",
    pb.ResourceKey.KIND_INSTANCE: "instances",
    pb.ResourceKey.KIND_DOMAIN: "domains",
    pb.ResourceKey.KIND_TXT: "txt",
}


SKIPPED = Counter("geomesh_routing_resources_skipped_total",
                  "routing resources received that failed validation and were left out of the table", ["kind"])
log = logging.getLogger("geomesh.routing_table")


def _valid(upserts: Iterable[pb.Resource]) -> Iterator[Resource]:
    for res in upserts:
        try:
            yield resource_from_proto(res)
        except (GeomeshError, ValueError, TypeError) as exc:
            kind = res.WhichOneof("kind") or "unknown"
            SKIPPED.labels(kind).inc()
            event(log, "routing resource skipped", logging.WARNING, kind=kind, error=str(exc)[:200])


@dataclass(frozen=True, slots=True)
class RoutingTable:
    revision: int = 0
    regions: Mapping[str, Region] = field(default_factory=lambda: _EMPTY)
    gateways: Mapping[str, Gateway] = field(default_factory=lambda: _EMPTY)
    apps: Mapping[str, App] = field(default_factory=lambda: _EMPTY)
    instances: Mapping[str, Instance] = field(default_factory=lambda: _EMPTY)  # key "<app>/<id>"
    domains: Mapping[str, Domain] = field(default_factory=lambda: _EMPTY)
    txt: Mapping[str, TxtRecord] = field(default_factory=lambda: _EMPTY)  # by name (ACME challenges)

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_resources(cls, revision: int, resources: Iterable[Resource]) -> RoutingTable:
        tables: dict[str, dict] = {a: {} for a in _ATTR_OF_KIND.values()}
        for obj in resources:
            tables[_ATTR_OF_KIND[KIND_OF[type(obj)]]][resource_name(obj)] = obj
        return cls(revision, **{k: MappingProxyType(d) for k, d in tables.items()})

    def resources(self) -> Iterable[Resource]:
        for attr in _ATTR_OF_KIND.values():
            yield from getattr(self, attr).values()

    def apply(self, update: pb.RoutingUpdate) -> RoutingTable:
        """The table after `update` (a snapshot replaces everything, a delta patches). A resource
        this process refuses (it fails the model's validation: a record written by another version,
        say) is skipped, logged and counted, and the rest applies: one bad record never blocks
        everyone's routing."""
        if update.snapshot:
            return RoutingTable.from_resources(update.revision, _valid(update.upserts))
        changed: dict[str, dict] = {}

        def table(attr: str) -> dict:
            if attr not in changed:
                changed[attr] = dict(getattr(self, attr))
            return changed[attr]

        for key in update.removals:
            attr = _ATTR_OF_KIND.get(key.kind)
            if attr is not None:
                table(attr).pop(key.name, None)
        for obj in _valid(update.upserts):
            table(_ATTR_OF_KIND[KIND_OF[type(obj)]])[resource_name(obj)] = obj
        fields = {a: MappingProxyType(d) for a, d in changed.items()}
        return RoutingTable(
            revision=max(self.revision, update.revision),
            regions=fields.get("regions", self.regions),
            gateways=fields.get("gateways", self.gateways),
            apps=fields.get("apps", self.apps),
            instances=fields.get("instances", self.instances),
            domains=fields.get("domains", self.domains),
            txt=fields.get("txt", self.txt),
        )

    def to_snapshot(self) -> pb.RoutingUpdate:
        return pb.RoutingUpdate(revision=self.revision, snapshot=True,
                                upserts=[resource_to_proto(r) for r in self.resources()])

    # -- queries ---------------------------------------------------------------------------

    def gateways_in(self, region: str, *, routable_only: bool = True) -> list[Gateway]:
        """Gateways of a region sorted by name; by default only alive, non-draining ones."""
        return sorted((g for g in self.gateways.values()
                       if g.region == region and (g.routable or not routable_only)),
                      key=lambda g: g.name)

    def hosting_regions(self, app: str) -> set[str]:
        """Regions with at least one healthy instance of `app`, limited to its pinned regions."""
        regions = {i.region for i in self.instances.values() if i.app == app and i.healthy}
        spec = self.apps.get(app)
        if spec is not None and spec.pinned_regions:
            regions &= set(spec.pinned_regions)
        return regions

    def instances_of(self, app: str, region: str | None = None) -> list[Instance]:
        return sorted((i for i in self.instances.values()
                       if i.app == app and (region is None or i.region == region)),
                      key=lambda i: i.id)
