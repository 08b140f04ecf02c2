"""Kernel WireGuard through pyroute2's generic netlink `WireGuard` socket.

Used when the wireguard module is loaded (not on the machines this was written on, so the
device I/O here is thin and the message building is pure and unit-tested): `netlink_requests`
turns a `Plan` into the keyword arguments of `pyroute2.WireGuard.set` calls — pyroute2 takes
one peer per call, so a plan is a short sequence of calls, removes first — and
`device_from_netlink` turns the messages of `WireGuard.info` into the device's key, port and
`Peer`s (merging a peer split across the parts of a multipart dump, as the kernel does for
peers with many allowed IPs). The interface itself is an `ip link add ... type wireguard`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from geomesh.errors import ValidationError
from geomesh.logs import event
from regional_gateway.wireguard import links
from regional_gateway.wireguard.backend import WireGuardBackend, WireGuardError, check_interface_args
from regional_gateway.wireguard.keys import PrivateKey
from regional_gateway.wireguard.peers import Peer, Plan

log = logging.getLogger(__name__)


def _peer_args(peer: Peer, changed: frozenset[str] | None) -> dict[str, Any]:
    args: dict[str, Any] = {"public_key": peer.public_key}
    if changed is not None:
        args["update_only"] = True
    hp = peer.endpoint_host_port
    if hp is not None and (changed is None or "endpoint" in changed):
        args["endpoint_addr"], args["endpoint_port"] = hp
    if (changed is None and peer.persistent_keepalive) or (changed is not None and "persistent_keepalive" in changed):
        args["persistent_keepalive"] = peer.persistent_keepalive
    if changed is None or "allowed_ips" in changed:
        args["replace_allowed_ips"] = True
        args["allowed_ips"] = list(peer.allowed_ips)
    return args


def netlink_requests(plan: Plan) -> list[dict[str, Any]]:
    """Keyword arguments of the `WireGuard.set(ifname, **kwargs)` calls that apply `plan`."""
    calls: list[dict[str, Any]] = [{"peer": {"public_key": key, "remove": True}} for key in plan.removes]
    calls += [{"peer": _peer_args(u.peer, u.changed)} for u in plan.updates]
    calls += [{"peer": _peer_args(p, None)} for p in plan.adds]
    return calls


def device_request(private_key: PrivateKey | None, listen_port: int | None) -> dict[str, Any]:
    """Keyword arguments of the `WireGuard.set` call for the device-level settings."""
    args: dict[str, Any] = {}
    if private_key is not None:
        args["private_key"] = private_key.secret_base64()
    if listen_port is not None:
        args["listen_port"] = listen_port
    return args


@dataclass(frozen=True, slots=True)
class KernelDevice:
    private_key: str | None = field(default=None, repr=False)  # base64
    listen_port: int = 0
    peers: dict[str, Peer] = field(default_factory=dict)


def _text(value: Any) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


def device_from_netlink(messages: Iterable[Any]) -> KernelDevice:
    """Device settings and peers from the decoded messages of a WG_CMD_GET_DEVICE dump."""
    private_key = None
    listen_port = 0
    fields: dict[str, dict[str, Any]] = {}
    for msg in messages:
        if msg.get_attr("WGDEVICE_A_PRIVATE_KEY") is not None:
            private_key = _text(msg.get_attr("WGDEVICE_A_PRIVATE_KEY"))
        if msg.get_attr("WGDEVICE_A_LISTEN_PORT") is not None:
            listen_port = int(msg.get_attr("WGDEVICE_A_LISTEN_PORT"))
        for p in msg.get_attr("WGDEVICE_A_PEERS") or ():
            key = _text(p.get_attr("WGPEER_A_PUBLIC_KEY"))
            cur = fields.setdefault(key, {"public_key": key, "allowed_ips": []})
            ep = p.get_attr("WGPEER_A_ENDPOINT")
            if ep and ep.get("port"):
                addr = ipaddress.ip_address(ep["addr"])
                cur["endpoint"] = f"[{addr}]:{ep['port']}" if addr.version == 6 else f"{addr}:{ep['port']}"
            ka = p.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL")
            if ka is not None:
                cur["persistent_keepalive"] = int(ka)
            hs = p.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
            if hs is not None:
                sec, nsec = int(hs.get("tv_sec", 0)), int(hs.get("tv_nsec", 0))
                cur["last_handshake"] = None if sec == 0 and nsec == 0 else sec + nsec / 1e9
            for name, attr in (("rx_bytes", "WGPEER_A_RX_BYTES"), ("tx_bytes", "WGPEER_A_TX_BYTES")):
                if p.get_attr(attr) is not None:
                    cur[name] = int(p.get_attr(attr))
            for a in p.get_attr("WGPEER_A_ALLOWEDIPS") or ():
                if not hasattr(a, "get") or not a.get("addr"):
                    raise WireGuardError(f"undecodable allowed IP for peer {key}: {a!r}")
                cur["allowed_ips"].append(a["addr"])
    peers = {}
    for key, kw in fields.items():
        try:
            peers[key] = Peer(**kw)
        except ValidationError as e:
            raise WireGuardError(f"the kernel reported an invalid peer {key}: {e}") from None
    return KernelDevice(private_key=private_key, listen_port=listen_port, peers=peers)


class KernelBackend(WireGuardBackend):
    """In-kernel WireGuard, configured over generic netlink."""

    kind = "kernel"

    def __init__(self, *, netns: str | None = None) -> None:
        super().__init__(netns=netns)

    @contextlib.contextmanager
    def _wg(self) -> Iterator[Any]:
        """A short-lived generic netlink socket (see links.iproute for why not a long-lived one)."""
        from pyroute2 import WireGuard

        links.off_event_loop("pyroute2 WireGuard")
        wg = WireGuard(netns=self.netns) if self.netns else WireGuard()
        try:
            yield wg
        finally:
            wg.close()

    def _device(self) -> KernelDevice:
        if self._name is None:
            raise WireGuardError("ensure_interface() has not been called")
        try:
            with self._wg() as wg:
                return device_from_netlink(wg.info(self._name))
        except OSError as e:
            raise WireGuardError(f"{self._name}: reading the device failed: {e}") from None

    def ensure_interface(self, name: str, private_key: PrivateKey, listen_port: int, address_cidr: str) -> None:
        check_interface_args(name, listen_port, address_cidr)
        with links.iproute(self.netns) as ipr:
            index = links.link_index(ipr, name)
            adopted = index is not None
            try:
                if index is None:
                    ipr.link("add", ifname=name, kind="wireguard")
                    index = links.link_index(ipr, name)
                self._name = name
                device = self._device()
                need_key = device.private_key != private_key.secret_base64()
                need_port = device.listen_port != listen_port
                if need_key or need_port:
                    with self._wg() as wg:
                        wg.set(name, **device_request(private_key if need_key else None,
                                                      listen_port if need_port else None))
            except OSError as e:
                raise WireGuardError(f"{name}: configuring the kernel device failed: {e}") from None
            assert index is not None
            self._public_key = private_key.public_key
            self._address = address_cidr
            links.ensure_address(ipr, index, address_cidr)
            links.set_up(ipr, index)
            self._sync_routes(device.peers, ipr)
        event(log, "wireguard interface ready", interface=name, backend=self.kind, public_key=self._public_key,
              listen_port=listen_port, address=address_cidr, adopted=adopted, peers=len(device.peers))

    def _sync_routes(self, peers: dict[str, Peer], ipr: Any) -> None:
        assert self._name is not None and self._address is not None
        index = links.link_index(ipr, self._name)
        if index is None:
            raise WireGuardError(f"{self._name}: interface vanished")
        links.sync_routes(ipr, index, links.routes_needed(self._address, [n for p in peers.values() for n in p.allowed_ips]))

    def peers(self) -> dict[str, Peer]:
        return self._device().peers

    def apply(self, plan: Plan) -> None:
        if plan.empty:
            return
        if self._name is None:
            raise WireGuardError("ensure_interface() has not been called")
        try:
            with self._wg() as wg:
                for kwargs in netlink_requests(plan):
                    wg.set(self._name, **kwargs)
        except OSError as e:
            raise WireGuardError(f"{self._name}: applying the plan failed: {e}") from None
        if plan.touches_allowed_ips:
            with links.iproute(self.netns) as ipr:
                self._sync_routes(self.peers(), ipr)

    def close(self, *, remove_interface: bool = False) -> None:
        if not remove_interface or self._name is None:
            return  # nothing held between calls; the interface stays up
        with links.iproute(self.netns) as ipr:
            index = links.link_index(ipr, self._name)
            if index is not None:
                ipr.link("del", index=index)
        event(log, "wireguard interface removed", interface=self._name)
        self._name = None
