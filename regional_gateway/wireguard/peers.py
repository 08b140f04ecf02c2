"""WireGuard peers as values, and the plan that turns the actual peer set into the desired one.

Pure: no I/O. `Peer` holds what we configure (public key, endpoint, allowed IPs, keepalive) in
a canonical form — allowed IPs masked, deduplicated and sorted, so their order never matters —
plus, for peers read back from a device, what we observe (last handshake, rx/tx bytes). Only the
configured part takes part in equality. `plan(desired, actual)` returns the adds, updates and
removes that make `actual` equal `desired`; equal sets give an empty plan, which is what keeps
an agent restart from touching (and flapping) links that are already right.

One bad record never freezes the mesh (probe finding 9): when two desired peers claim the same
allowed IP (two regions given the same instance subnet), WireGuard would give it to whichever was
configured last and the next diff would flap; `plan` leaves that range out of every claimant,
keeps everything else of theirs (their mesh /32 with it) and applies the rest of the set. The
ranges left out are in `Plan.conflicts`, counted in
`geomesh_mesh_allowed_ips_skipped_total{reason}` and logged when they change.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client import Counter

from geomesh.errors import ValidationError
from regional_gateway.wireguard.keys import canonical_key, decode_key

log = logging.getLogger("geomesh.mesh")

ALLOWED_IPS_SKIPPED = Counter("geomesh_mesh_allowed_ips_skipped_total",
                              "allowed IPs left out of the desired peers (claimed_twice: two peers claim the "
                              "range; it is left out of both, the rest applies)", ["reason"])
MAX_KEEPALIVE = 65535
CONFIG_FIELDS = ("endpoint", "allowed_ips", "persistent_keepalive")


def normalize_endpoint(value: str | None) -> str | None:
    """'ip:port' (IPv6 as '[ip]:port') in canonical form; None stays None. Hostnames are refused:
    WireGuard endpoints are addresses, names must be resolved by whoever hands them out."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValidationError("endpoint", f"expected 'ip:port', got {type(value).__name__}")
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValidationError("endpoint", f"{value!r} is not 'ip:port'")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValidationError("endpoint", f"{value!r}: {host!r} is not an IP address") from None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValidationError("endpoint", f"{value!r}: port must be 1..65535")
    port = int(port_text)
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def normalize_allowed_ips(values: Iterable[str]) -> tuple[str, ...]:
    """Allowed IPs as sorted, unique, masked CIDRs ('10.77.0.1' -> '10.77.0.1/32')."""
    if isinstance(values, str):
        values = (values,)
    nets = set()
    for value in values:
        try:
            nets.add(ipaddress.ip_network(str(value).strip(), strict=False))
        except ValueError:
            raise ValidationError("allowed_ips", f"{value!r} is not an IP network") from None
    return tuple(str(n) for n in sorted(nets, key=lambda n: (n.version, n.network_address, n.prefixlen)))


@dataclass(frozen=True, slots=True)
class Peer:
    """One WireGuard peer. Equality covers the configured fields only."""

    public_key: str
    endpoint: str | None = None
    allowed_ips: tuple[str, ...] = ()
    persistent_keepalive: int = 0
    # not configuration: a display name, and what a device reports
    name: str = field(default="", compare=False)
    last_handshake: float | None = field(default=None, compare=False)  # unix time, None = never
    rx_bytes: int = field(default=0, compare=False)
    tx_bytes: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "public_key", canonical_key("public_key", self.public_key))
        object.__setattr__(self, "endpoint", normalize_endpoint(self.endpoint))
        object.__setattr__(self, "allowed_ips", normalize_allowed_ips(self.allowed_ips))
        ka = self.persistent_keepalive
        if isinstance(ka, bool) or not isinstance(ka, int) or not 0 <= ka <= MAX_KEEPALIVE:
            raise ValidationError("persistent_keepalive", f"{ka!r} is not a number of seconds 0..{MAX_KEEPALIVE}")

    @property
    def endpoint_host_port(self) -> tuple[str, int] | None:
        """(address, port) of the endpoint, or None."""
        if self.endpoint is None:
            return None
        host, _, port = self.endpoint.rpartition(":")
        return host.strip("[]"), int(port)

    def differences(self, actual: Peer) -> frozenset[str]:
        """Configured fields where `actual` falls short of this desired value. A desired peer
        without an endpoint accepts whatever endpoint the device learned (nothing to unset)."""
        changed = {f for f in CONFIG_FIELDS if getattr(self, f) != getattr(actual, f)}
        if self.endpoint is None:
            changed.discard("endpoint")
        return frozenset(changed)


@dataclass(frozen=True, slots=True)
class PeerUpdate:
    """A peer that exists but differs: the desired value and which fields to change."""

    peer: Peer
    changed: frozenset[str]


@dataclass(frozen=True, slots=True)
class Conflict:
    """An allowed IP that several desired peers claim: left out of all of them."""

    allowed_ip: str
    public_keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do to a device: each tuple sorted by public key. `conflicts`: ranges left out of
    the desired peers because several claim them (see `without_conflicts`)."""

    adds: tuple[Peer, ...] = ()
    updates: tuple[PeerUpdate, ...] = ()
    removes: tuple[str, ...] = ()  # public keys
    conflicts: tuple[Conflict, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.adds or self.updates or self.removes)

    @property
    def touches_allowed_ips(self) -> bool:
        """Whether applying this can change which prefixes the device routes."""
        return bool(self.adds or self.removes or any("allowed_ips" in u.changed for u in self.updates))

    def summary(self) -> dict[str, int]:
        return {"adds": len(self.adds), "updates": len(self.updates), "removes": len(self.removes)}


def peer_map(peers: Mapping[str, Peer] | Iterable[Peer], *, field_name: str = "peers") -> dict[str, Peer]:
    """A {public_key: Peer} dict from a mapping (keys checked) or an iterable (no duplicates)."""
    out: dict[str, Peer] = {}
    if isinstance(peers, Mapping):
        for key, peer in peers.items():
            if not isinstance(peer, Peer):
                raise ValidationError(field_name, f"value for {key!r} is a {type(peer).__name__}, not a Peer")
            if canonical_key(field_name, key) != peer.public_key:
                raise ValidationError(field_name, f"key {key!r} is not the peer's public key {peer.public_key!r}")
            out[peer.public_key] = peer
        return out
    for peer in peers:
        if not isinstance(peer, Peer):
            raise ValidationError(field_name, f"{peer!r} is not a Peer")
        if peer.public_key in out:
            raise ValidationError(field_name, f"public key {peer.public_key} appears twice")
        out[peer.public_key] = peer
    return out


def check_disjoint(peers: Mapping[str, Peer]) -> None:
    """Refuse a set where two peers claim the same allowed IP: WireGuard would give it to the last
    one configured, the next diff would see the other one wrong, and the link would flap forever.
    (`plan` does not refuse: it leaves such ranges out, see `without_conflicts`.)"""
    _peers, conflicts = without_conflicts(peers)
    if conflicts:
        c = conflicts[0]
        raise ValidationError("allowed_ips", f"{c.allowed_ip} is claimed by both {c.public_keys[0]} and {c.public_keys[1]}")


def without_conflicts(peers: Mapping[str, Peer]) -> tuple[dict[str, Peer], tuple[Conflict, ...]]:
    """`peers` with every allowed IP that more than one of them claims left out of all of its
    claimants (each keeps its other ranges), and those ranges. Pure; equal input, equal output."""
    owners: dict[str, list[str]] = {}
    for key in sorted(peers):
        for net in peers[key].allowed_ips:
            owners.setdefault(net, []).append(key)
    claimed = {net: tuple(keys) for net, keys in owners.items() if len(keys) > 1}
    if not claimed:
        return dict(peers), ()
    out = {}
    for key, peer in peers.items():
        keep = tuple(n for n in peer.allowed_ips if n not in claimed)
        out[key] = peer if keep == peer.allowed_ips else dataclasses.replace(peer, allowed_ips=keep)
    return out, tuple(Conflict(net, keys) for net, keys in sorted(claimed.items()))


_logged_conflicts: frozenset[Conflict] = frozenset()


def plan(desired: Mapping[str, Peer], actual: Mapping[str, Peer]) -> Plan:
    """The changes that turn `actual` into `desired` (both {public_key: Peer}). An allowed IP that
    several desired peers claim is left out of all of them (`Plan.conflicts`), counted, and
    logged when the set of conflicts changes; it never stops the rest from applying."""
    global _logged_conflicts
    todo = plan_pure(desired, actual)
    for c in todo.conflicts:
        ALLOWED_IPS_SKIPPED.labels("claimed_twice").inc(len(c.public_keys))
    now = frozenset(todo.conflicts)
    if now != _logged_conflicts:
        for c in sorted(now - _logged_conflicts, key=lambda c: c.allowed_ip):
            peers = [desired[k].name or k for k in c.public_keys if k in desired]
            log.warning("allowed IP claimed by several peers: left out of all of them (the rest applies)",
                        extra={"fields": {"allowed_ip": c.allowed_ip, "peers": peers}})
        _logged_conflicts = now
    return todo


def plan_pure(desired: Mapping[str, Peer], actual: Mapping[str, Peer]) -> Plan:
    """`plan` without the counting and logging: the adds, updates and removes, and the conflicts."""
    want = peer_map(desired, field_name="desired")
    have = peer_map(actual, field_name="actual")
    want, conflicts = without_conflicts(want)
    adds = tuple(want[k] for k in sorted(want.keys() - have.keys()))
    removes = tuple(sorted(have.keys() - want.keys()))
    updates = []
    for k in sorted(want.keys() & have.keys()):
        changed = want[k].differences(have[k])
        if changed:
            updates.append(PeerUpdate(want[k], changed))
    return Plan(adds=adds, updates=tuple(updates), removes=removes, conflicts=conflicts)


def keepalive_delay(own_public_key: str, peer_public_key: str, settle: float) -> float:
    """How long a new peer's persistent keepalive is held back: `settle` on the end of the link
    with the smaller public key (bytewise), twice that on the other end.

    Setting a keepalive makes the device initiate a handshake at once. On a join both ends of each
    new link get the other at about the same moment; if one initiates before the other knows it,
    or both initiate together (each answer overwrites the other's pending handshake), the link
    waits for WireGuard's 5 s retry. Held back like this, the first initiation comes when both
    ends have the peer, from one end only; the other end's keepalive then rides the session."""
    own = decode_key("own_public_key", own_public_key)
    return settle if own < decode_key("public_key", peer_public_key) else 2 * settle


def hold_keepalives(todo: Plan, held_until: Mapping[str, float], now: float) -> Plan:
    """`todo` without the keepalives of peers held until after `now` (added with none; a
    keepalive-only update dropped). The next apply after the hold sets them."""
    def held(key: str) -> bool:
        return held_until.get(key, 0.0) > now

    adds = tuple(dataclasses.replace(p, persistent_keepalive=0) if p.persistent_keepalive and held(p.public_key)
                 else p for p in todo.adds)
    updates = []
    for u in todo.updates:
        if "persistent_keepalive" in u.changed and held(u.peer.public_key):
            rest = u.changed - {"persistent_keepalive"}
            if rest:
                updates.append(PeerUpdate(u.peer, rest))
        else:
            updates.append(u)
    return Plan(adds=adds, updates=tuple(updates), removes=todo.removes, conflicts=todo.conflicts)
