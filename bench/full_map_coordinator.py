"""The "full map" strategy for bench/mesh_convergence.py: the real coordinator, whole peer list per change.

headscale-style control planes answer every change by sending each node its complete map. This
module runs geomesh's own coordinator (same flags, same etcd store, cache, servicers, mTLS and
streams: `coordinator.main.main`) with one thing swapped: `FullMapState.mesh_update` returns the
complete peer set (`MeshUpdate.snapshot = true`) to every gateway whenever any peer changed,
instead of only the changed peers. Routing deltas are unchanged, so the two strategies differ
in the mesh part of `SessionDown` alone.

To measure the strategy and not a naive implementation of it, the full peer list is built once
per (revision, viewer region) with the coordinator's own `mesh_peer`, and each gateway's copy
is a protobuf `CopyFrom` of it minus the gateway itself; the region's subnet owner is memoised
per revision. Benchmark use only: `python -m bench.full_map_coordinator <coordinator flags>`.
"""

from __future__ import annotations

import sys

import coordinator.main as coordinator_main
from coordinator.operations import Operations
from coordinator.server import Coordinator, CoordinatorConfig
from coordinator.state import Delta, State
from geomesh.api import geomesh_pb2 as pb


class FullMapState(State):
    def __init__(self, mesh_cidr: str = "10.88.0.0/16") -> None:
        super().__init__(mesh_cidr)
        self._owners: tuple[int, dict[str, str | None]] = (-1, {})
        self._maps: tuple[int, dict[str | None, tuple[pb.MeshUpdate, dict[str, int]]]] = (-1, {})

    def subnet_owner(self, region: str) -> str | None:
        revision, owners = self._owners
        if revision != self.revision:
            owners = {}
            self._owners = (self.revision, owners)
        if region not in owners:
            owners[region] = super().subnet_owner(region)
        return owners[region]

    def _full_map(self, viewer_region: str | None) -> tuple[pb.MeshUpdate, dict[str, int]]:
        """Every registered gateway as seen from `viewer_region`, and each one's index in it."""
        revision, maps = self._maps
        if revision != self.revision:
            maps = {}
            self._maps = (self.revision, maps)
        if viewer_region not in maps:
            full = pb.MeshUpdate(snapshot=True)
            index: dict[str, int] = {}
            for name in sorted(self.gateways):
                peer = self.mesh_peer(name, viewer_region)
                if peer is not None:
                    index[name] = len(full.upserts)
                    full.upserts.append(peer)
            maps[viewer_region] = (full, index)
        return maps[viewer_region]

    def mesh_update(self, delta: Delta, for_gateway: str) -> pb.MeshUpdate:
        if delta.mesh is not None and not (delta.mesh - {for_gateway}):
            return pb.MeshUpdate(revision=delta.revision)  # no peer of this gateway changed
        me = self.gateways.get(for_gateway)
        full, index = self._full_map(me.region if me is not None else None)
        out = pb.MeshUpdate()
        out.CopyFrom(full)
        i = index.get(for_gateway)
        if i is not None:
            del out.upserts[i]
        out.revision = delta.revision
        return out


class FullMapCoordinator(Coordinator):
    def __init__(self, config: CoordinatorConfig) -> None:
        super().__init__(config)
        self.state = FullMapState(config.mesh_cidr)
        self.ops = Operations(self.store, self.state)


def main(argv: list[str] | None = None) -> int:
    coordinator_main.Coordinator = FullMapCoordinator  # the only difference from geomesh-coordinator
    return coordinator_main.main(argv)


if __name__ == "__main__":
    sys.exit(main())
