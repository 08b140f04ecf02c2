"""What the data plane routes: one immutable `Routes` value per version of the routing state.

A `Routes` holds the zone, this gateway's identity and location, the local apps (LB policy,
backends, health-check settings, exposed ports, PROXY-protocol wish), custom domains, TLS
certificate files and, for cross-region forwarding, the other regions (location, the apps and
instances they host, the ports those serve, their routable gateways) sorted nearest first. It is built either from the
standalone TOML file (`routes_file.load_routes`) or from the coordinator's routing table
(`routes_from_table`), validated on construction, and handed to the proxy server as a whole
(`ProxyServer.update_routes`), so the data path always reads one consistent version. From a
table, an entry the data plane cannot take (an instance id used twice in the region or equal to
an app name, a bad address) is skipped, logged and counted
(`geomesh_gateway_table_entries_skipped_total{kind,reason}`) and everything else applies: one
bad record never freezes a region's routing (issue 13).

Port allow-list (probe finding 15): an `<app>-<port>` name reaches only a port the app exposes,
its declared `ports`, its backends' own ports and the ports its custom domains name
(`AppRoute.serves_port`); in coordinator mode a port only another region serves is valid here
too, and goes there (`AppRoute.allows_port`, `RemoteRegion.serves`). `Routes.port_refusal` is the
rule as one pure function; the proxy applies it when it resolves a name, before any connection.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from prometheus_client import Counter

from geomesh import geo
from geomesh import validate as v
from geomesh.errors import ValidationError
from geomesh.model import LbPolicy, app_ports
from geomesh.routing_table import RoutingTable

log = logging.getLogger("geomesh.gateway.routes")

HEALTH_CHECKS = ("tcp", "http", "none")
_EMPTY: Mapping = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """Active probe and passive ejection settings for the backends of an app."""

    check: str = "tcp"  # tcp: connect; http: GET path, 2xx/3xx is healthy; none: no probes
    path: str = "/"
    interval: float = 2.0  # seconds between probes of one backend
    timeout: float = 1.0  # seconds for one probe
    rise: int = 2  # consecutive good probes to mark a down backend up
    fall: int = 2  # consecutive bad probes to mark an up backend down
    eject_connect_failures: int = 1  # consecutive connect failures that eject a backend (0 = never)
    eject_5xx: int = 5  # consecutive 5xx responses that eject a backend (0 = never)
    eject_seconds: float = 5.0  # how long a passive ejection lasts before the backend is retried

    def __post_init__(self) -> None:
        if self.check not in HEALTH_CHECKS:
            raise ValidationError("check", f"{self.check!r} is not one of {', '.join(HEALTH_CHECKS)}")
        if not isinstance(self.path, str) or not self.path.startswith("/") or any(
                ord(c) <= 32 or ord(c) >= 127 for c in self.path):
            raise ValidationError("path", f"{self.path!r} is not an absolute path without spaces")
        for name, low, high in (("interval", 0.05, 3600.0), ("timeout", 0.01, 600.0),
                                ("eject_seconds", 0.05, 86400.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
                    or not low <= value <= high:
                raise ValidationError(name, f"{value!r} is not a number of seconds in {low}..{high}")
            object.__setattr__(self, name, float(value))
        for name, low in (("rise", 1), ("fall", 1), ("eject_connect_failures", 0), ("eject_5xx", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 1000:
                raise ValidationError(name, f"{value!r} is not an integer in {low}..1000")


@dataclass(frozen=True, slots=True)
class Backend:
    """One instance of an app as the proxy reaches it (address and default port)."""

    address: str
    port: int
    instance_id: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", v.ip_address("address", self.address))
        v.port("port", self.port)
        if self.instance_id:
            v.dns_label("id", self.instance_id)

    @property
    def key(self) -> str:
        """The endpoint's identity for health, pools and metrics ("addr:port", IPv6 bracketed)."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class AppRoute:
    """A local app: how to balance over its backends in this region, and the ports it exposes.

    `ports` are the app's declared ports; with its backends' own ports (and the ports of its
    custom domains, `domain_ports`, filled in by `Routes`) they make `served`, the ports this
    region's backends are reached on. `remote_ports` (filled in by `Routes` from the other
    regions' `app_ports`) are ports only other regions serve: a name on one of them is valid here
    and forwarded, never sent to a local backend. Any other port is refused.
    """

    name: str
    lb_policy: LbPolicy = LbPolicy.ROUND_ROBIN
    backends: tuple[Backend, ...] = ()
    ports: tuple[int, ...] = ()  # declared ports, besides each backend's own (at most 64)
    proxy_protocol: bool = False  # send a PROXY v2 header on TLS passthrough connections
    health: HealthCheck = field(default_factory=HealthCheck)
    domain_ports: frozenset[int] = frozenset()  # set by Routes: ports named by the app's custom domains
    remote_ports: frozenset[int] = frozenset()  # set by Routes: ports the app's other regions serve
    served: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        v.dns_label("name", self.name)
        object.__setattr__(self, "lb_policy", LbPolicy.parse("lb", self.lb_policy))
        object.__setattr__(self, "backends", tuple(self.backends))
        seen: set[str] = set()
        for i, b in enumerate(self.backends):
            if b.key in seen:
                raise ValidationError(f"backends[{i}]", f"{b.key} is listed twice")
            seen.add(b.key)
        object.__setattr__(self, "ports", app_ports("ports", self.ports))
        object.__setattr__(self, "domain_ports", frozenset(self.domain_ports))
        object.__setattr__(self, "remote_ports", frozenset(self.remote_ports))
        object.__setattr__(self, "served", frozenset(self.ports).union(
            (b.port for b in self.backends), self.domain_ports))

    def serves_port(self, port: int) -> bool:
        """May this region's backends be reached on `port`? (0: each backend's own port.)"""
        return not port or port in self.served

    def allows_port(self, port: int) -> bool:
        """Is `<app>-<port>` a valid name through this gateway (served here or in another region)?"""
        return not port or port in self.served or port in self.remote_ports


@dataclass(frozen=True, slots=True)
class DomainRoute:
    """A custom domain pointing at an app (port 0 = the app's default port)."""

    fqdn: str
    app: str
    port: int = 0
    passthrough: bool = False  # TLS passthrough by SNI instead of termination

    def __post_init__(self) -> None:
        object.__setattr__(self, "fqdn", v.fqdn("fqdn", self.fqdn))
        v.dns_label("app", self.app)
        v.port("port", self.port, allow_zero=True)
        if self.passthrough and not self.port:
            raise ValidationError("port", "is required for a passthrough domain")


@dataclass(frozen=True, slots=True)
class RemoteGateway:
    """A gateway of another region, reached over the mesh at mesh_ip:proxy_port. `unreachable`:
    the coordinator found that clients cannot reach it (docs/reachability.md); forwarding skips it
    while its region has a reachable one (`cross_region.forwarding_order`)."""

    name: str
    mesh_ip: str
    proxy_port: int
    unreachable: bool = False

    def __post_init__(self) -> None:
        v.dns_label("name", self.name)
        object.__setattr__(self, "mesh_ip", v.ip_address("mesh_ip", self.mesh_ip))
        v.port("proxy_port", self.proxy_port)

    @property
    def key(self) -> str:
        host = f"[{self.mesh_ip}]" if ":" in self.mesh_ip else self.mesh_ip
        return f"{host}:{self.proxy_port}"


@dataclass(frozen=True, slots=True)
class RemoteRegion:
    """Another region: where it is, what it hosts (healthy), and its routable gateways.

    `app_ports` / `instance_ports`: the ports an app / an instance is reached on there (declared
    ports, that region's instance ports, domain ports), so a name on another port is not sent
    there. An app or instance missing from them (a routes file lists names only) is not checked
    here: the far gateway applies its own list and refuses.
    """

    name: str
    latitude: float
    longitude: float
    apps: frozenset[str] = frozenset()
    instances: frozenset[str] = frozenset()
    gateways: tuple[RemoteGateway, ...] = ()
    app_ports: Mapping[str, frozenset[int]] = field(default_factory=lambda: _EMPTY)
    instance_ports: Mapping[str, frozenset[int]] = field(default_factory=lambda: _EMPTY)

    def __post_init__(self) -> None:
        v.dns_label("name", self.name)
        object.__setattr__(self, "latitude", v.latitude("latitude", self.latitude))
        object.__setattr__(self, "longitude", v.longitude("longitude", self.longitude))
        object.__setattr__(self, "apps", frozenset(self.apps))
        object.__setattr__(self, "instances", frozenset(self.instances))
        object.__setattr__(self, "gateways", tuple(self.gateways))
        for i, a in enumerate(sorted(self.apps)):
            v.dns_label(f"apps[{i}]", a)
        for name in ("app_ports", "instance_ports"):
            ports = {k: frozenset(p) for k, p in getattr(self, name).items()}
            for k, p in ports.items():
                for port in p:
                    v.port(f"{name}.{k}", port)
            object.__setattr__(self, name, MappingProxyType(ports))

    def __hash__(self) -> int:  # the port maps are not hashable; the name identifies a region
        return hash(self.name)

    def serves(self, app: str, instance: str, port: int) -> bool:
        """May a request for `app` (or `instance`) on `port` be sent to this region?"""
        if not port:
            return True
        known = self.instance_ports.get(instance) if instance else self.app_ports.get(app)
        return known is None or port in known


@dataclass(frozen=True, slots=True)
class CertificateSpec:
    """A PEM certificate chain and its key; the names it serves come from its SANs."""

    cert: Path
    key: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "cert", Path(self.cert))
        object.__setattr__(self, "key", Path(self.key))


@dataclass(frozen=True, slots=True)
class InstanceRoute:
    """A local instance addressed as `<instance-id>.<zone>`."""

    app: str
    backend: Backend


@dataclass(frozen=True, slots=True)
class Routes:
    zone: str
    self_name: str = ""
    region: str = ""
    latitude: float | None = None
    longitude: float | None = None
    apps: Mapping[str, AppRoute] = field(default_factory=lambda: _EMPTY)
    domains: Mapping[str, DomainRoute] = field(default_factory=lambda: _EMPTY)
    regions: tuple[RemoteRegion, ...] = ()  # nearest first once constructed
    certificates: tuple[CertificateSpec, ...] = ()
    version: str = ""
    # derived indexes
    instances: Mapping[str, InstanceRoute] = field(init=False)
    remote_apps: Mapping[str, tuple[RemoteRegion, ...]] = field(init=False)
    remote_instances: Mapping[str, tuple[RemoteRegion, ...]] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "zone", v.fqdn("zone", self.zone))
        if self.self_name:
            v.dns_label("name", self.self_name)
        if self.region:
            v.dns_label("region", self.region)
        if (self.latitude is None) != (self.longitude is None):
            raise ValidationError("latitude", "latitude and longitude go together")
        if self.latitude is not None:
            object.__setattr__(self, "latitude", v.latitude("latitude", self.latitude))
            object.__setattr__(self, "longitude", v.longitude("longitude", self.longitude))
        apps = dict(self.apps)
        for name, app in apps.items():
            if name != app.name:
                raise ValidationError(f"apps.{name}", f"is keyed by a different name than {app.name!r}")
        object.__setattr__(self, "domains", MappingProxyType(dict(self.domains)))
        object.__setattr__(self, "certificates", tuple(self.certificates))
        regions = tuple(self.regions)
        names = [r.name for r in regions]
        if len(set(names)) != len(names):
            raise ValidationError("regions", "lists a region twice")
        if self.region and self.region in names:
            raise ValidationError("regions", f"lists this gateway's own region {self.region!r}")
        if self.latitude is not None:
            order = geo.by_distance(self.latitude, self.longitude,  # type: ignore[arg-type]
                                    ((r.name, r.latitude, r.longitude) for r in regions))
        else:
            order = sorted(names)
        by_name = {r.name: r for r in regions}
        regions = tuple(by_name[n] for n in order)
        object.__setattr__(self, "regions", regions)

        instances: dict[str, InstanceRoute] = {}
        for app in apps.values():
            for b in app.backends:
                if not b.instance_id:
                    continue
                if b.instance_id in instances:
                    raise ValidationError(f"apps.{app.name}.backends",
                                          f"instance id {b.instance_id!r} is used twice")
                if b.instance_id in apps:
                    raise ValidationError(f"apps.{app.name}.backends",
                                          f"instance id {b.instance_id!r} is also an app name")
                instances[b.instance_id] = InstanceRoute(app.name, b)
        object.__setattr__(self, "instances", MappingProxyType(instances))
        remote_apps: dict[str, list[RemoteRegion]] = {}
        remote_instances: dict[str, list[RemoteRegion]] = {}
        for r in regions:
            if not r.gateways:
                continue
            for a in r.apps:
                remote_apps.setdefault(a, []).append(r)
            for i in r.instances:
                remote_instances.setdefault(i, []).append(r)
        object.__setattr__(self, "remote_apps", MappingProxyType({k: tuple(x) for k, x in remote_apps.items()}))
        object.__setattr__(self, "remote_instances",
                           MappingProxyType({k: tuple(x) for k, x in remote_instances.items()}))
        for fqdn, d in self.domains.items():
            if fqdn != d.fqdn:
                raise ValidationError(f"domains.{fqdn}", f"is keyed by a different name than {d.fqdn!r}")
            if d.app not in apps and d.app not in remote_apps:
                raise ValidationError(f"domains.{fqdn}.app", f"{d.app!r} is not a known app")
            if d.fqdn == self.zone or d.fqdn.endswith("." + self.zone):
                raise ValidationError(f"domains.{fqdn}", f"is inside the zone {self.zone!r}")
        # the ports each local app is valid on: its domains' ports are served here, the ports its
        # other regions serve are forwarded there (derived here, so both sources of routes agree)
        domain_ports: dict[str, set[int]] = {}
        for d in self.domains.values():
            if d.port:
                domain_ports.setdefault(d.app, set()).add(d.port)
        remote_ports: dict[str, set[int]] = {}
        for r in regions:
            if r.gateways:
                for a, ports in r.app_ports.items():
                    remote_ports.setdefault(a, set()).update(ports)
        for name, app in apps.items():
            dp = frozenset(domain_ports.get(name, ()))
            rp = frozenset(remote_ports.get(name, ()))
            if dp != app.domain_ports or rp != app.remote_ports:
                apps[name] = dataclasses.replace(app, domain_ports=dp, remote_ports=rp)
        object.__setattr__(self, "apps", MappingProxyType(apps))

    def knows_app(self, app: str) -> bool:
        return app in self.apps or app in self.remote_apps

    def port_refusal(self, app: str, instance: str, port: int) -> str | None:
        """Why `<app|instance>-<port>` must be refused, or None if the port may be reached.

        The rule (probe finding 15): an app is reached only on its declared ports, its instances'
        own ports and its custom domains' ports, so the name form is not a scanner of whatever
        else listens on an instance's host. An `<instance-id>` name: the ports its app serves in
        this region (a local instance) or in the instance's region. A name nobody here can judge
        (an app or instance known only by name from another region) is left to that region's
        gateway, which applies its own list. Port 0 (no port in the name) is always fine.
        """
        if not port:
            return None
        rule = "(an app is reached only on its instances' ports and its declared ports)"
        if instance:
            local = self.instances.get(instance)
            if local is not None:
                if self.apps[local.app].serves_port(port):
                    return None
                return f"instance {instance!r} of app {local.app!r} does not expose port {port} {rule}"
            regions = self.remote_instances.get(instance, ())
            if regions and all(r.instance_ports.get(instance) is not None and not r.serves(app, instance, port)
                               for r in regions):
                return f"instance {instance!r} does not expose port {port} {rule}"
            return None
        spec = self.apps.get(app)
        if spec is not None:
            return None if spec.allows_port(port) else f"app {app!r} does not expose port {port} {rule}"
        regions = self.remote_apps.get(app, ())
        if regions and all(r.app_ports.get(app) is not None and not r.serves(app, "", port) for r in regions):
            return f"app {app!r} does not expose port {port} {rule}"
        return None


@dataclass(frozen=True, slots=True)
class SkippedEntry:
    """A table entry the data plane left out of its routes (the rest apply). `kind`: app,
    instance, domain or gateway; `reason`: duplicate_id (an instance id another local instance
    of the region has), id_is_app_name (an instance id equal to an app's name), invalid (a value
    the data plane refuses, e.g. a bad address from an older coordinator)."""

    kind: str
    name: str
    reason: str
    detail: str = ""


TABLE_SKIPPED = Counter("geomesh_gateway_table_entries_skipped_total",
                        "routing table entries left out of the data plane's routes (the rest applied)",
                        ["kind", "reason"])
_last_skipped: dict[str, frozenset[SkippedEntry]] = {}  # self_name -> what was logged last


def routes_from_table(table: RoutingTable, *, region: str, zone: str, self_name: str,
                      health: HealthCheck | None = None,
                      certificates: Iterable[CertificateSpec] = (),
                      proxy_protocol_apps: Iterable[str] = (), forward_via: str = "mesh") -> Routes:
    """`checked_routes_from_table` for the agent: every skipped entry is counted in
    `geomesh_gateway_table_entries_skipped_total{kind,reason}` and logged when the set of
    skipped entries changes (not on every update), and the routes of everything else returned."""
    routes, skipped = checked_routes_from_table(
        table, region=region, zone=zone, self_name=self_name, health=health, certificates=certificates,
        proxy_protocol_apps=proxy_protocol_apps, forward_via=forward_via)
    for entry in skipped:
        TABLE_SKIPPED.labels(entry.kind, entry.reason).inc()
    now, before = frozenset(skipped), _last_skipped.get(self_name, frozenset())
    if now != before:
        _last_skipped[self_name] = now
        for entry in sorted(now - before, key=lambda e: (e.kind, e.name)):
            log.warning("routing table entry skipped by the data plane (the rest applies)",
                        extra={"fields": {"kind": entry.kind, "name": entry.name, "reason": entry.reason,
                                          "detail": entry.detail, "revision": table.revision}})
    return routes


def checked_routes_from_table(table: RoutingTable, *, region: str, zone: str, self_name: str,
                              health: HealthCheck | None = None,
                              certificates: Iterable[CertificateSpec] = (),
                              proxy_protocol_apps: Iterable[str] = (),
                              forward_via: str = "mesh") -> tuple[Routes, tuple[SkippedEntry, ...]]:
    """The data plane's view of a coordinator routing table, for the gateway `self_name` in `region`,
    and the entries it had to leave out (pure).

    Local apps: every app of the table with this region's instances as backends (the gateway's own
    probes decide their health; the table's `healthy` flag only steers other regions). Custom
    domains: every verified domain of the table (a pinned domain is pending until the coordinator
    has seen its TXT record name its app: `coordinator.pinned_domains`). Remote regions: every other region with at least one
    routable gateway (each with the coordinator's reachability verdict), with the apps it hosts (healthy instances, pinning respected, as
    `RoutingTable.hosting_regions`) and its instance ids, nearest first from this region.
    Ports: each app's declared `ports` (Admin API `App.ports`); each other region carries the
    ports its instances of each app serve (`RemoteRegion.app_ports`), so a `-<port>` name goes only
    where that port is exposed.
    `forward_via="public"` forwards to the other gateways' public addresses instead of their mesh
    addresses (a lab without WireGuard; pair it with `ProxyServer.trusted_peers`).

    One bad entry never blocks the rest (issue 13): a local instance whose id another local
    instance already has (the first by "<app>/<id>" is kept), whose id is an app's name, or whose
    values the data plane refuses is skipped; so is an app, domain or remote gateway the data
    plane refuses. The coordinator refuses all of these at write time; this is the reader's guard
    against old records and older coordinators.
    """
    if forward_via not in ("mesh", "public"):
        raise ValidationError("forward_via", f"{forward_via!r} is not mesh or public")
    health = health or HealthCheck()
    pp = set(proxy_protocol_apps)
    skipped: list[SkippedEntry] = []
    local: dict[str, list] = {}
    local_ids: dict[str, str] = {}  # instance id -> "<app>/<id>" of the local instance that has it
    hosted: dict[str, set[str]] = {}  # region -> apps with a healthy instance there
    remote_ids: dict[str, set[str]] = {}
    remote_ports: dict[str, dict[str, set[int]]] = {}  # region -> app -> ports its instances there serve
    remote_app_of: dict[str, dict[str, str]] = {}  # region -> instance id -> app
    for name in sorted(table.instances):
        inst = table.instances[name]
        if inst.region == region:
            if inst.id in table.apps:
                skipped.append(SkippedEntry("instance", name, "id_is_app_name",
                                            f"instance id {inst.id!r} is also an app name"))
                continue
            if inst.id in local_ids:
                skipped.append(SkippedEntry("instance", name, "duplicate_id",
                                            f"instance id {inst.id!r} is used by {local_ids[inst.id]!r} too"))
                continue
            local_ids[inst.id] = name
            local.setdefault(inst.app, []).append(inst)
            continue
        remote_ids.setdefault(inst.region, set()).add(inst.id)
        remote_ports.setdefault(inst.region, {}).setdefault(inst.app, set()).add(inst.port)
        remote_app_of.setdefault(inst.region, {})[inst.id] = inst.app
        if inst.healthy:
            spec = table.apps.get(inst.app)
            if spec is None or not spec.pinned_regions or inst.region in spec.pinned_regions:
                hosted.setdefault(inst.region, set()).add(inst.app)
    apps: dict[str, AppRoute] = {}
    for name in sorted(set(table.apps) | set(local)):
        spec = table.apps.get(name)
        insts = sorted(local.get(name, ()), key=lambda i: i.id)
        seen: set[tuple[str, int]] = set()
        backends = []
        for i in insts:
            if (i.address, i.port) in seen:
                continue
            try:
                backend = Backend(i.address, i.port, i.id)
            except ValidationError as exc:
                skipped.append(SkippedEntry("instance", i.key, "invalid", str(exc)))
                continue
            seen.add((i.address, i.port))
            backends.append(backend)
        try:
            apps[name] = AppRoute(name, spec.lb_policy if spec else LbPolicy.ROUND_ROBIN, tuple(backends),
                                  spec.ports if spec else (), proxy_protocol=name in pp, health=health)
        except ValidationError as exc:
            skipped.append(SkippedEntry("app", name, "invalid", str(exc)))
    pinned = [d for d in table.domains.values() if d.verified]  # pending ones wait for their TXT check
    domain_ports: dict[str, set[int]] = {}
    for d in pinned:
        if d.port:
            domain_ports.setdefault(d.app, set()).add(d.port)
    regions = []
    for r in table.regions.values():
        if r.name == region:
            continue
        gws = []
        for g in table.gateways_in(r.name):
            address = g.mesh_ip if forward_via == "mesh" else g.public_ip
            if g.name == self_name or not address:
                continue
            try:
                gws.append(RemoteGateway(g.name, address, g.proxy_port, unreachable=g.unreachable))
            except ValidationError as exc:
                skipped.append(SkippedEntry("gateway", g.name, "invalid", str(exc)))
        if not gws:
            continue
        app_ports: dict[str, frozenset[int]] = {}
        for a, ports in remote_ports.get(r.name, {}).items():
            spec = table.apps.get(a)
            app_ports[a] = frozenset(ports).union(spec.ports if spec else (), domain_ports.get(a, ()))
        instance_ports: dict[str, frozenset[int]] = {}
        for i, a in remote_app_of.get(r.name, {}).items():
            instance_ports[i] = instance_ports.get(i, frozenset()) | app_ports[a]  # ids may repeat across apps
        regions.append(RemoteRegion(r.name, r.latitude, r.longitude, frozenset(hosted.get(r.name, ())),
                                    frozenset(remote_ids.get(r.name, ())), tuple(gws), app_ports, instance_ports))
    me = table.regions.get(region)
    known = set(apps) | {a for r in regions for a in r.apps}
    domains = {}
    for d in pinned:
        if d.app not in known or d.fqdn == zone or d.fqdn.endswith("." + zone):
            continue
        try:
            domains[d.fqdn] = DomainRoute(d.fqdn, d.app, d.port)
        except ValidationError as exc:
            skipped.append(SkippedEntry("domain", d.fqdn, "invalid", str(exc)))
    routes = Routes(zone=zone, self_name=self_name, region=region,
                    latitude=me.latitude if me else None, longitude=me.longitude if me else None,
                    apps=apps, domains=domains, regions=tuple(regions), certificates=tuple(certificates),
                    version=f"rev{table.revision}")
    return routes, tuple(skipped)
