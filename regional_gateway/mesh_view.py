"""The gateway's local mesh view: MeshUpdates in, the desired WireGuard peer set out.

Pure. The coordinator sends a snapshot of every other gateway as a `MeshPeer`, then deltas
(upserts and removals by name). `apply_mesh_update` folds one update into the current view;
`desired_peers` turns the view into `regional_gateway.wireguard.peers.Peer` values keyed by public
key, which the applier diffs against the interface. Each peer also carries what the reachability
probes need (`public_ip`, `proxy_port`, `https_port`: where clients reach it, never the mesh) and
the coordinator's verdict (`unreachable`); `probe_targets` turns the view and the probe plan into
the targets of this gateway's `ReachProber`; `handshake_ages` names the interface's peers'
handshake ages by gateway for the heartbeats.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from geomesh.api import geomesh_pb2 as pb
from geomesh.probe_plan import ProbePlan
from regional_gateway.reach_prober import ProbeTarget
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
    https_port: int = 0        # TLS port clients reach, 0 = none
    unreachable: bool = False  # the coordinator's verdict: clients cannot reach it (do not forward there)

    @classmethod
    def from_proto(cls, m: pb.MeshPeer) -> MeshPeerInfo:
        return cls(m.name, m.region, m.public_key, m.endpoint, tuple(m.allowed_ips), m.mesh_ip, m.proxy_port,
                   m.https_port, m.unreachable)

    @property
    def public_ip(self) -> str:
        """The public address of the WireGuard endpoint ("ip:port", "[v6]:port"): where clients reach it."""
        host = self.endpoint.rpartition(":")[0] if ":" in self.endpoint else self.endpoint
        return host.strip("[]")


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


def probe_regions(view: Mapping[str, MeshPeerInfo], self_name: str, self_region: str) -> dict[str, str]:
    """Gateway name -> region for the probe plan: every peer of the view, and this gateway."""
    out = {info.name: info.region for info in view.values()}
    out[self_name] = self_region
    return out


def probe_targets(view: Mapping[str, MeshPeerInfo], plan: ProbePlan, self_name: str) -> dict[str, ProbeTarget]:
    """The targets the plan gives `self_name`, as clients reach them: the public IP of the peer's
    WireGuard endpoint, its proxy port and its TLS port (never the mesh address). A peer without
    a usable public address or proxy port is left out."""
    out: dict[str, ProbeTarget] = {}
    for name in plan.targets_of(self_name):
        info = view.get(name)
        if info is None or not info.public_ip or not info.proxy_port:
            continue
        out[name] = ProbeTarget(name=name, region=info.region, host=info.public_ip, http_port=info.proxy_port,
                                https_port=info.https_port)
    return out


def handshake_ages(actual: dict, mesh: dict[str, MeshPeerInfo], now: float) -> dict[str, float]:
    """Mesh peer name -> seconds since its last handshake (0 = never), for the interface's peers
    (`actual`: public key -> Peer with `last_handshake` in unix time) that are mesh peers."""
    names = {p.public_key: p.name for p in mesh.values()}
    out: dict[str, float] = {}
    for key, peer in actual.items():
        name = names.get(key)
        if name is not None:
            out[name] = 0.0 if peer.last_handshake is None else round(max(0.1, now - peer.last_handshake), 1)
    return out
