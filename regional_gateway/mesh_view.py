"""The gateway's local mesh view: MeshUpdates in, the desired WireGuard peer set out.

Pure. The coordinator sends a snapshot of every other gateway as a `MeshPeer`, then deltas
(upserts and removals by name). `apply_mesh_update` folds one update into the current view;
`desired_peers` turns the view into `regional_gateway.wireguard.peers.Peer` values keyed by public
key, which the applier diffs against the interface.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from geomesh.api import geomesh_pb2 as pb
from regional_gateway.wireguard.peers import Peer


@dataclass(frozen=True, slots=True)
class MeshPeerInfo:
    name: str
    region: str
    public_key: str
    endpoint: str
    allowed_ips: tuple[str, ...]
    mesh_ip: str
    proxy_port: int

    @classmethod
    def from_proto(cls, m: pb.MeshPeer) -> MeshPeerInfo:
        return cls(m.name, m.region, m.public_key, m.endpoint, tuple(m.allowed_ips), m.mesh_ip, m.proxy_port)


def apply_mesh_update(view: Mapping[str, MeshPeerInfo], update: pb.MeshUpdate, self_name: str) -> dict[str, MeshPeerInfo]:
    """The view after `update`; a snapshot replaces it, a delta patches it. Never includes us."""
    out: dict[str, MeshPeerInfo] = {} if update.snapshot else dict(view)
    for name in update.removals:
        out.pop(name, None)
    for m in update.upserts:
        if m.name != self_name:
            out[m.name] = MeshPeerInfo.from_proto(m)
    return out


def desired_peers(view: Mapping[str, MeshPeerInfo], *, keepalive: int = 15,
                  own_public_key: str | None = None) -> dict[str, Peer]:
    """WireGuard peers for every gateway in the view, keyed by public key."""
    peers: dict[str, Peer] = {}
    for info in sorted(view.values(), key=lambda i: i.name):
        if info.public_key == own_public_key:
            continue
        peers[info.public_key] = Peer(public_key=info.public_key, endpoint=info.endpoint,
                                      allowed_ips=info.allowed_ips, persistent_keepalive=keepalive, name=info.name)
    return peers
