"""What a gateway saves to come up without a coordinator, and reading it back (pure).

The payload of the gateway's state file (`geomesh.state_file`, kind "gateway", owner the gateway's
name) is one JSON object: the registration the coordinator answered (mesh IP, mesh CIDR, the
WireGuard public key it was registered with), the routing table and the mesh peers as protobuf
snapshots (base64), their etcd revision, and the certificate files in use with the sha256 of each
(the files themselves stay where the config names them: no private key is copied). `decode`
refuses a payload written for another WireGuard key (the key file was replaced: the saved mesh
address belongs to a registration this gateway no longer has) as `Foreign`, and anything it cannot
parse as `Corrupt`, so the agent starts as if it had no saved state.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from geomesh.api import geomesh_pb2 as pb
from geomesh.routing_table import RoutingTable
from geomesh.state_file import Corrupt, Foreign
from regional_gateway.mesh_view import MeshPeerInfo, apply_mesh_update

KIND = "gateway"


@dataclass(frozen=True, slots=True)
class GatewaySaved:
    mesh_ip: str
    mesh_cidr: str
    public_key: str
    revision: int
    table: RoutingTable
    mesh: Mapping[str, MeshPeerInfo]
    certificates: tuple[tuple[str, str], ...] = ()  # (cert file, sha256 of its bytes)


def mesh_snapshot(mesh: Mapping[str, MeshPeerInfo], revision: int) -> pb.MeshUpdate:
    return pb.MeshUpdate(revision=revision, snapshot=True, upserts=[
        pb.MeshPeer(name=p.name, region=p.region, public_key=p.public_key, endpoint=p.endpoint,
                    allowed_ips=list(p.allowed_ips), mesh_ip=p.mesh_ip, proxy_port=p.proxy_port,
                    https_port=p.https_port, unreachable=p.unreachable)
        for p in sorted(mesh.values(), key=lambda p: p.name)])


def fingerprint(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


def encode(saved: GatewaySaved) -> bytes:
    body = {
        "mesh_ip": saved.mesh_ip, "mesh_cidr": saved.mesh_cidr, "public_key": saved.public_key,
        "revision": saved.revision,
        "routing": base64.b64encode(saved.table.to_snapshot().SerializeToString()).decode(),
        "mesh": base64.b64encode(mesh_snapshot(saved.mesh, saved.revision).SerializeToString()).decode(),
        "certificates": [list(c) for c in saved.certificates],
    }
    return json.dumps(body, sort_keys=True).encode()


def decode(payload: bytes, *, name: str, public_key: str) -> GatewaySaved:
    """The saved state of gateway `name` registered with `public_key`; Corrupt or Foreign."""
    try:
        body = json.loads(payload)
        routing = pb.RoutingUpdate.FromString(base64.b64decode(body["routing"], validate=True))
        mesh_update = pb.MeshUpdate.FromString(base64.b64decode(body["mesh"], validate=True))
        mesh_ip, mesh_cidr, key = str(body["mesh_ip"]), str(body["mesh_cidr"]), str(body["public_key"])
        revision = int(body["revision"])
        certificates = tuple((str(c), str(h)) for c, h in body.get("certificates", []))
        if not routing.snapshot or not mesh_update.snapshot:
            raise ValueError("routing and mesh must be snapshots")
        table = RoutingTable().apply(routing)
        mesh = apply_mesh_update({}, mesh_update, name)
    except Exception as exc:  # any malformed payload is one answer: corrupt
        raise Corrupt(f"payload: {type(exc).__name__}: {exc}") from None
    if not mesh_ip:
        raise Corrupt("payload: no mesh_ip")
    if key != public_key:
        raise Foreign("saved for another WireGuard key (the key file changed): its registration is not ours")
    return GatewaySaved(mesh_ip, mesh_cidr, key, revision, table, mesh, certificates)
