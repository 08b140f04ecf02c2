"""The "full map" strategy for bench/mesh_convergence.py: the real coordinator, whole peer list per change.

headscale-style control planes answer every change by sending each node its complete map. This
module runs geomesh's own coordinator (same flags, same etcd store, cache, servicers, mTLS and
streams: `coordinator.main.main`) with one thing swapped: `FullMapFanout.mesh_update` returns the
complete peer set (`MeshUpdate.snapshot = true`) to every gateway whenever any peer changed,
instead of only the changed peers. Routing deltas are unchanged, so the two strategies differ
in the mesh part of `SessionDown` alone.

To measure the strategy and not a naive implementation of it, the full peer list is built once
per (revision, viewer region) with the coordinator's own `views.mesh_peer` and memoisation, and each
gateway's copy leaves out the gateway itself, as the delta strategy's messages do. Benchmark use only: `python -m bench.full_map_coordinator <coordinator flags>`.
"""

from __future__ import annotations

import sys

import coordinator.main as coordinator_main
from coordinator import views
from coordinator.fanout import Fanout
from coordinator.server import Coordinator, CoordinatorConfig
from coordinator.snapshot import Delta, Snapshot
from geomesh.api import geomesh_pb2 as pb


class FullMapFanout(Fanout):
    """Every mesh change sends the complete peer list. The base Fanout memoises `_mesh_update` per
    (revision range, viewer region) and leaves the viewer itself out per session, so the full list
    is built once per region and revision, exactly as the delta strategy's messages are."""

    def _mesh_update(self, snap: Snapshot, delta: Delta, viewer_region: str | None) -> pb.MeshUpdate:
        if delta.mesh is not None and not delta.mesh:
            return pb.MeshUpdate(revision=delta.revision)  # no peer changed
        full = pb.MeshUpdate(revision=delta.revision, snapshot=True)
        for name in sorted(snap.gateways):
            peer = views.mesh_peer(snap, name, viewer_region)
            if peer is not None:
                full.upserts.append(peer)
        return full


class FullMapCoordinator(Coordinator):
    def __init__(self, config: CoordinatorConfig) -> None:
        super().__init__(config)
        self.feed = FullMapFanout(self.state)


def main(argv: list[str] | None = None) -> int:
    coordinator_main.Coordinator = FullMapCoordinator  # the only difference from geomesh-coordinator
    return coordinator_main.main(argv)


if __name__ == "__main__":
    sys.exit(main())
