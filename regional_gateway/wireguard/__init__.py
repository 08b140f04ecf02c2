"""The gateway's side of the WireGuard full mesh.

`keys` (the X25519 key and its 0600 file), `peers` (Peer values and the pure diff `plan`),
`uapi` (wireguard-go's text protocol, pure), `backend` (the interface every implementation
offers), `userspace` (wireguard-go) and `kernel` (pyroute2 generic netlink) implementations,
`selection` (`select_backend`, the choice between them), `links` (addresses, link state, routes
via pyroute2), and `applier` (`MeshApplier`, what the agent calls with each desired peer set). See docs/mesh.md.
"""

from regional_gateway.wireguard.applier import MeshApplier
from regional_gateway.wireguard.backend import WireGuardBackend, WireGuardError
from regional_gateway.wireguard.keys import KeyFileError, PrivateKey, load_or_create
from regional_gateway.wireguard.peers import Peer, PeerUpdate, Plan, plan
from regional_gateway.wireguard.selection import select_backend

__all__ = [
    "KeyFileError", "MeshApplier", "Peer", "PeerUpdate", "Plan", "PrivateKey", "WireGuardBackend",
    "WireGuardError", "load_or_create", "plan", "select_backend",
]
