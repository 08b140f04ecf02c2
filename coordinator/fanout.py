"""The fan-out interface the streams use: subscribe, next change, one shared message per revision.

`Fanout` stands between the etcd mirror (`coordinator.state.State`) and the stream servicers
(Watch, the gateway Session): a stream asks `changes_since(have)` for the `Delta` after the
revision its client has, builds its message with `routing_update` / `routing_wire` /
`mesh_update`, and waits on `changed()` (one future shared by every waiter: no task per stream).
Messages are computed from the revision's immutable `Snapshot` by the pure `coordinator.views`
and memoised until the revision moves, keyed by (kind, revision the stream starts from, revision
[, viewer region]): N streams at one revision share one message, and Watch streams share one
serialized bytes object (go-control-plane's `marshaledResponse`), so 200 stalled watchers of a
large table hold one copy of its snapshot. The streams see nothing of the mirror's dicts.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from prometheus_client import Counter

from coordinator import views
from coordinator.snapshot import Delta, Snapshot
from geomesh.api import geomesh_pb2 as pb

if TYPE_CHECKING:  # a forward edge only: state.py does not import this module
    from coordinator.state import State

SNAPSHOT_CACHE = Counter("geomesh_coordinator_snapshot_cache_total",
                         "routing snapshots asked for by streams: hit = the revision's serialized snapshot was shared",
                         ["result"])


class Fanout:
    """The streams' view of the cache: the current revision, deltas, shared messages, wake-ups."""

    def __init__(self, state: State) -> None:
        self._state = state
        self._memo: dict[tuple, object] = {}
        self._memo_of: Snapshot | None = None  # the snapshot the memo was computed from

    @property
    def revision(self) -> int:
        return self._state.revision

    def changed(self) -> asyncio.Future:
        """A future resolved at the next change (shared by every waiter: never cancel it, shield it)."""
        return self._state.changed()

    def changes_since(self, revision: int) -> Delta:
        """Everything that changed after `revision`; None fields mean "too old: snapshot"."""
        return self._state.changes_since(revision)

    def snapshot(self) -> Snapshot:
        return self._state.snapshot()

    def _shared(self) -> dict[tuple, object]:
        """The memo of the current snapshot (emptied when the mirror hands out a new one)."""
        snap = self._state.snapshot()
        if snap is not self._memo_of:
            self._memo.clear()
            self._memo_of = snap
        return self._memo

    def routing_update(self, delta: Delta, since: int | None = None) -> pb.RoutingUpdate:
        """The RoutingUpdate for `delta`; with `since` (the revision it starts from) it is memoised
        for this revision, so every stream at the same revision shares one message. A snapshot is
        the same whatever the stream had before, so all snapshots of a revision are one message."""
        if since is None:
            return views.routing_update(self.snapshot(), delta)
        memo = self._shared()
        memo_key = ("routing", None if delta.routing is None else since, delta.revision)
        update = memo.get(memo_key)
        if update is None:
            update = memo[memo_key] = views.routing_update(self.snapshot(), delta)
        assert isinstance(update, pb.RoutingUpdate)
        return update

    def routing_wire(self, delta: Delta, since: int) -> bytes:
        """`routing_update(delta, since)` serialized, memoised alike: N streams at one revision
        send one shared bytes object instead of N copies of a (possibly large) snapshot."""
        memo = self._shared()
        memo_key = ("routing-wire", None if delta.routing is None else since, delta.revision)
        wire = memo.get(memo_key)
        if delta.routing is None:
            SNAPSHOT_CACHE.labels("hit" if wire is not None else "miss").inc()
        if wire is None:
            wire = memo[memo_key] = self.routing_update(delta, since).SerializeToString()
        assert isinstance(wire, bytes)
        return wire

    def mesh_update(self, delta: Delta, for_gateway: str, since: int | None = None) -> pb.MeshUpdate:
        """The mesh view of `for_gateway`: every other registered gateway is a peer.

        Peers depend only on the viewer's region, so with `since` the message is built once per
        (revision range, region) and shared; only the viewer itself is left out per session."""
        snap = self.snapshot()
        region = views.viewer_region(snap, for_gateway)
        if since is None:
            return views.without_viewer(self._mesh_update(snap, delta, region), for_gateway)
        memo = self._shared()
        memo_key = ("mesh", since, delta.revision, region)
        shared = memo.get(memo_key)
        if shared is None:
            shared = memo[memo_key] = self._mesh_update(snap, delta, region)
        assert isinstance(shared, pb.MeshUpdate)
        return views.without_viewer(shared, for_gateway)

    def _mesh_update(self, snap: Snapshot, delta: Delta, viewer_region: str | None) -> pb.MeshUpdate:
        """The shared part of a mesh update (a bench swaps the strategy here)."""
        return views.mesh_update(snap, delta, viewer_region)
