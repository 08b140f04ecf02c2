"""The WireGuard backend interface, its errors, and the choice between implementations.

A backend owns one WireGuard interface in the current network namespace (or in a named one,
for the lab and tests): `ensure_interface` creates it — or adopts the one a previous run of the
agent left up, without touching its peers — `peers()` reads the actual peers with their
handshake times and counters, `apply(plan)` makes exactly the changes a `Plan` lists, and
`close()` releases the backend (leaving the interface up unless asked to remove it). Calls block;
the asyncio side runs them in a thread (`MeshApplier`). Two implementations: userspace
wireguard-go over its UAPI socket (`userspace.py`) and kernel WireGuard over generic netlink
(`kernel.py`); `selection.select_backend` picks the kernel one when the module is present (it
lives there so that this interface never imports its implementations).
"""

from __future__ import annotations

import abc
import ipaddress
import re
from typing import Literal

from geomesh.errors import GeomeshError, ValidationError
from regional_gateway.wireguard.keys import PrivateKey
from regional_gateway.wireguard.peers import Peer, Plan

IFNAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$")
BackendKind = Literal["auto", "kernel", "userspace"]


class WireGuardError(GeomeshError):
    """The WireGuard device could not be created, read or configured."""


def check_ifname(name: str) -> str:
    """Linux interface names: 1..15 characters, no '/', ':' or whitespace."""
    if not isinstance(name, str) or not IFNAME_RE.match(name):
        raise ValidationError(
            "interface", f"{name!r} is not an interface name (1-15 of A-Z a-z 0-9 _ . -, not starting with . or -)"
        )
    return name


def check_interface_args(name: str, listen_port: int, address_cidr: str) -> None:
    """What every backend's ensure_interface validates before touching the host."""
    check_ifname(name)
    if not isinstance(listen_port, int) or not 1 <= listen_port <= 65535:
        raise ValidationError("listen_port", f"{listen_port!r} is not 1..65535")
    try:
        ipaddress.ip_interface(address_cidr)
    except ValueError:
        raise ValidationError("address", f"{address_cidr!r} is not an address with prefix length") from None


class WireGuardBackend(abc.ABC):
    """One WireGuard interface, configured from `Plan`s."""

    kind: str = ""

    @abc.abstractmethod
    def ensure_interface(self, name: str, private_key: PrivateKey, listen_port: int, address_cidr: str) -> None:
        """Create (or adopt) the interface with this key and port, address it and bring it up.
        Existing peers of an adopted interface are left alone."""

    @abc.abstractmethod
    def peers(self) -> dict[str, Peer]:
        """The actual peers, {public key: Peer} with last_handshake/rx_bytes/tx_bytes filled in."""

    @abc.abstractmethod
    def apply(self, plan: Plan) -> None:
        """Make the changes in `plan` (nothing else), and the routes they need."""

    @abc.abstractmethod
    def close(self, *, remove_interface: bool = False) -> None:
        """Release resources; with remove_interface, also take the interface (and its tunnels) down."""

    def __init__(self, *, netns: str | None = None) -> None:
        self.netns = netns
        self._name: str | None = None  # set by ensure_interface
        self._public_key: str | None = None
        self._address: str | None = None

    @property
    def interface(self) -> str | None:
        """The interface name once ensure_interface succeeded."""
        return self._name

    @property
    def public_key(self) -> str | None:
        """This device's public key once ensure_interface succeeded."""
        return self._public_key

