"""Interface address, link state and routes of the WireGuard device, through pyroute2.

Shared by both backends: they differ in how the device and its peers are configured, not in
how the interface is addressed. The interface holds exactly one address of the mesh family
(`ensure_address` replaces a stale one, e.g. after a mesh IP change) and is up. Peers' allowed
IPs that the interface's own subnet does not already cover (say a region's instance subnet) get
a route through the interface, marked with our routing protocol number so that `sync_routes`
adds and removes only routes geomesh made. `routes_needed` is the pure part.

pyroute2 (0.9) binds its sync sockets to a per-thread event loop, and uses the running loop if
the calling thread has one; so `iproute()` opens a short-lived socket for one batch of calls,
and refuses to run on a thread with a running asyncio loop (run backend calls in a worker
thread, as `MeshApplier` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Iterable, Iterator
from typing import Any

from geomesh.logs import event
from regional_gateway.wireguard.backend import WireGuardError

log = logging.getLogger(__name__)

ROUTE_PROTO = 77  # rtm_protocol marking routes geomesh installed (free in /etc/iproute2/rt_protos)
MAIN_TABLE = 254


def off_event_loop(what: str) -> None:
    """Raise if called on a thread that runs an asyncio loop (blocking calls belong in a worker)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise WireGuardError(f"{what} blocks: call it in a worker thread (asyncio.to_thread), not on the event loop")


@contextlib.contextmanager
def iproute(netns: str | None = None) -> Iterator[Any]:
    """A pyroute2 IPRoute in `netns` (None: the current namespace), closed after the block."""
    from pyroute2 import IPRoute

    off_event_loop("pyroute2 IPRoute")
    ipr = IPRoute(netns=netns) if netns else IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def routes_needed(address_cidr: str, allowed_ips: Iterable[str]) -> set[str]:
    """Allowed IPs that need an explicit route: not inside the interface's connected subnet and
    not a default route (which would swallow the tunnel's own UDP packets)."""
    connected = ipaddress.ip_interface(address_cidr).network
    out = set()
    for text in allowed_ips:
        net = ipaddress.ip_network(text, strict=False)
        if net.prefixlen == 0:
            event(log, "default route in allowed IPs not routed", logging.WARNING, network=str(net))
            continue
        if net.version == connected.version and net.subnet_of(connected):  # type: ignore[arg-type]
            continue
        out.add(str(net))
    return out


def link_index(ipr: Any, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def ensure_address(ipr: Any, index: int, address_cidr: str) -> None:
    """Make `address_cidr` the interface's only global address of its family."""
    want = ipaddress.ip_interface(address_cidr)
    family = 2 if want.version == 4 else 10
    present = False
    for msg in ipr.get_addr(index=index, family=family):
        if msg.get("scope", 0) != 0:  # keep link-local and host-scope addresses
            continue
        addr = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        have = ipaddress.ip_interface(f"{addr}/{msg['prefixlen']}")
        if have == want:
            present = True
        else:
            ipr.addr("del", index=index, address=str(have.ip), prefixlen=have.network.prefixlen)
            event(log, "stale interface address removed", address=str(have))
    if not present:
        ipr.addr("add", index=index, address=str(want.ip), prefixlen=want.network.prefixlen)


def set_up(ipr: Any, index: int) -> None:
    ipr.link("set", index=index, state="up")


def our_routes(ipr: Any, index: int) -> set[str]:
    out = set()
    for family in (2, 10):
        for msg in ipr.get_routes(family=family, table=MAIN_TABLE):
            if msg.get_attr("RTA_OIF") != index or msg.get("proto") != ROUTE_PROTO:
                continue
            dst = msg.get_attr("RTA_DST")
            out.add(str(ipaddress.ip_network(f"{dst}/{msg['dst_len']}")))
    return out


def sync_routes(ipr: Any, index: int, wanted: set[str]) -> None:
    """Add missing routes through the interface and delete ours that are no longer wanted."""
    have = our_routes(ipr, index)
    for net in sorted(wanted - have):
        ipr.route("replace", dst=net, oif=index, proto=ROUTE_PROTO, table=MAIN_TABLE)
    for net in sorted(have - wanted):
        ipr.route("del", dst=net, oif=index, proto=ROUTE_PROTO, table=MAIN_TABLE)
    if wanted != have:
        event(log, "mesh routes synced", added=sorted(wanted - have), removed=sorted(have - wanted))
