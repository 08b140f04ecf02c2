"""What the DNS server answers from: one immutable `View` of the zone at one revision.

A view holds the zone's own settings (`ZoneConfig`: name, name servers, SOA timers, TTLs, the
default region) and what the routing table says about regions, their routable gateways and the
apps with the regions that host them. It is built either from a coordinator-fed
`geomesh.routing_table.RoutingTable` (`View.from_table`) or from a static state file
(`geodns.static_state`). Building is pure and happens off the data path; the answer path only
reads dicts of plain tuples. Health is decided here, once: a region is healthy when it has at
least one alive, non-draining gateway that the coordinator has not found unreachable
(`Gateway.reachable_routable`, docs/reachability.md); an app is hosted where it has a healthy
instance (limited to its pinned regions, when it has some). Each region also keeps the addresses
of all its routable gateways, reachable or not (`routable_ipv4`/`routable_ipv6`): what the answer
path falls back to (fail-open) when the reachable ones would leave an app with no answer. The
view also knows where each instance lives (`instances`: instance id -> the regions with an
instance of that id, whatever its health), so `<instance-id>.<zone>` names answer with that
region's gateways, as the gateways route them. It also holds the routing table's TXT records
inside the zone (`txt`: owner name -> values and TTL; ACME DNS-01 challenges) and the names above
them up to the zone (`txt_parents`), which exist as empty non-terminals.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from geomesh import validate as v
from geomesh.errors import ValidationError
from geomesh.routing_table import RoutingTable

DEFAULT_TTL = 30
DEFAULT_NEGATIVE_TTL = 30
DEFAULT_NS_TTL = 3600
SOA_REFRESH = 3600
SOA_RETRY = 600
SOA_EXPIRE = 86400


@dataclass(frozen=True, slots=True)
class NameServer:
    name: str  # fqdn, lowercase, no trailing dot
    addresses: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", v.fqdn("ns.name", self.name))
        addrs = tuple(v.ip_address("ns.addresses", a) for a in self.addresses)
        object.__setattr__(self, "addresses", addrs)

    @classmethod
    def parse(cls, spec: str, zone: str) -> NameServer:
        """`NAME[=ADDR[,ADDR...]]`; a NAME without a dot is taken relative to the zone."""
        name, _, addrs = spec.partition("=")
        name = name.strip().rstrip(".")
        if name and "." not in name:
            name = f"{name}.{zone}"
        return cls(name, tuple(a.strip() for a in addrs.split(",") if a.strip()))


@dataclass(frozen=True, slots=True)
class ZoneConfig:
    """The zone's own data: everything an answer needs that the routing table does not hold."""

    name: str
    nameservers: tuple[NameServer, ...] = ()
    soa_rname: str = ""  # mailbox as a name, e.g. hostmaster.<zone>
    ttl: int = DEFAULT_TTL
    negative_ttl: int = DEFAULT_NEGATIVE_TTL
    ns_ttl: int = DEFAULT_NS_TTL
    default_region: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", v.fqdn("zone", self.name))
        if not self.nameservers:
            object.__setattr__(self, "nameservers", (NameServer(f"ns1.{self.name}"),))
        object.__setattr__(self, "soa_rname", v.fqdn("soa_rname", self.soa_rname or f"hostmaster.{self.name}"))
        for fname in ("ttl", "negative_ttl", "ns_ttl"):
            value = getattr(self, fname)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 604800:
                raise ValidationError(fname, f"{value!r} is not a TTL in seconds (0-604800)")
        if self.default_region:
            v.dns_label("default_region", self.default_region)

    @property
    def soa_mname(self) -> str:
        return self.nameservers[0].name


@dataclass(frozen=True, slots=True)
class RegionView:
    """A region's gateway addresses, sorted by gateway name: `ipv4`/`ipv6` of the reachable
    routable gateways (what DNS answers), `routable_ipv4`/`routable_ipv6` of every routable one,
    reachable or not (the fail-open answer; defaults to the reachable ones)."""

    name: str
    latitude: float
    longitude: float
    ipv4: tuple[str, ...] = ()
    ipv6: tuple[str, ...] = ()
    routable_ipv4: tuple[str, ...] = ()
    routable_ipv6: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.routable_ipv4 and not self.routable_ipv6:
            object.__setattr__(self, "routable_ipv4", self.ipv4)
            object.__setattr__(self, "routable_ipv6", self.ipv6)

    @property
    def healthy(self) -> bool:
        """Has a gateway DNS may send clients to (alive, active, reachable)."""
        return bool(self.ipv4 or self.ipv6)

    @property
    def routable(self) -> bool:
        """Has an alive, active gateway, reachable or not (a fail-open answer is possible)."""
        return bool(self.ipv4 or self.ipv6 or self.routable_ipv4 or self.routable_ipv6)

    def addresses(self, version: int) -> tuple[tuple[str, ...], bool]:
        """The addresses of one family to answer with, and whether they fail open: the reachable
        gateways' addresses, else (all of this family's gateways found unreachable) the routable ones."""
        reachable, routable = (self.ipv4, self.routable_ipv4) if version == 4 else (self.ipv6, self.routable_ipv6)
        if reachable or not routable:
            return reachable, False
        return routable, True


@dataclass(frozen=True, slots=True)
class AppView:
    name: str
    hosting: frozenset[str] = frozenset()  # regions with a healthy instance (within pinned)
    pinned: tuple[str, ...] = ()  # when set, answers never leave these regions


@dataclass(frozen=True, slots=True)
class View:
    zone: ZoneConfig
    revision: int = 0
    regions: Mapping[str, RegionView] = field(default_factory=lambda: MappingProxyType({}))
    apps: Mapping[str, AppView] = field(default_factory=lambda: MappingProxyType({}))
    ready: bool = True  # False until the first routing snapshot arrived
    # instance id -> regions with an instance of that id (sorted; ids may repeat across apps)
    instances: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))
    # owner fqdn (lowercase) -> (values, ttl): TXT records inside the zone
    txt: Mapping[str, tuple[tuple[str, ...], int]] = field(default_factory=lambda: MappingProxyType({}))
    txt_parents: frozenset[str] = frozenset()  # names between a TXT owner and the zone (not the zone)

    @property
    def serial(self) -> int:
        return (self.revision & 0xFFFFFFFF) or 1

    @classmethod
    def build(cls, zone: ZoneConfig, revision: int, regions: Iterable[RegionView],
              apps: Iterable[AppView], ready: bool = True,
              instances: Mapping[str, Iterable[str]] | None = None,
              txt: Mapping[str, tuple[Iterable[str], int]] | None = None) -> View:
        """A view; TXT records whose owner is outside the zone are left out."""
        placed = {i: tuple(sorted(set(where))) for i, where in (instances or {}).items()}
        suffix = "." + zone.name
        records = {name: (tuple(values), ttl) for name, (values, ttl) in (txt or {}).items()
                   if name == zone.name or name.endswith(suffix)}
        parents = set()
        for name in records:
            labels = name[:len(name) - len(zone.name)].rstrip(".").split(".") if name != zone.name else []
            parents.update(".".join(labels[i:]) + suffix for i in range(1, len(labels)))
        return cls(zone, revision, MappingProxyType({r.name: r for r in regions}),
                   MappingProxyType({a.name: a for a in apps}), ready, MappingProxyType(placed),
                   MappingProxyType(records), frozenset(parents))

    @classmethod
    def from_table(cls, table: RoutingTable, zone: ZoneConfig) -> View:
        """The view of a routing table: the same rules as `RoutingTable.gateways_in` and
        `.hosting_regions`, computed in one pass over gateways and instances."""
        # (reachable?, family) -> region -> [(gateway name, address)]
        found: dict[tuple[bool, int], dict[str, list[tuple[str, str]]]] = {
            (ok, fam): {} for ok in (True, False) for fam in (4, 6)}
        for gw in table.gateways.values():
            if gw.routable:
                for ok in {gw.reachable_routable, False}:
                    found[(ok, 4)].setdefault(gw.region, []).append((gw.name, gw.public_ip))
                    if gw.public_ipv6:
                        found[(ok, 6)].setdefault(gw.region, []).append((gw.name, gw.public_ipv6))

        def ips(reachable: bool, family: int, region: str) -> tuple[str, ...]:
            return tuple(ip for _, ip in sorted(found[(reachable, family)].get(region, ())))

        regions = [RegionView(r.name, r.latitude, r.longitude, ips(True, 4, r.name), ips(True, 6, r.name),
                              ips(False, 4, r.name), ips(False, 6, r.name))
                   for r in table.regions.values()]
        hosting: dict[str, set[str]] = {}
        placed: dict[str, set[str]] = {}
        for inst in table.instances.values():
            placed.setdefault(inst.id, set()).add(inst.region)
            if inst.healthy:
                hosting.setdefault(inst.app, set()).add(inst.region)
        apps = []
        for app in table.apps.values():
            where = hosting.get(app.name, set())
            if app.pinned_regions:
                where &= set(app.pinned_regions)
            apps.append(AppView(app.name, frozenset(where), tuple(app.pinned_regions)))
        txt = {name: (rec.values, rec.ttl) for name, rec in table.txt.items()}
        return cls.build(zone, table.revision, regions, apps, instances=placed, txt=txt)

    @classmethod
    def empty(cls, zone: ZoneConfig) -> View:
        """The view before the first snapshot: apex and name servers only, apps SERVFAIL."""
        return cls(zone, 0, ready=False)


def check_address(field_name: str, value: str) -> tuple[int, str]:
    """(version, canonical text) of an IP address, or a ValidationError naming the field."""
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise ValidationError(field_name, f"{str(value)[:80]!r} is not an IP address") from None
    return addr.version, str(addr)
