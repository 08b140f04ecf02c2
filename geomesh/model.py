"""geomesh's domain values: regions, gateways, apps, instances, custom domains.

Frozen, slotted dataclasses that validate themselves on construction (a value that exists is a
valid value). They convert to and from protobuf at the wire (`to_proto`/`from_proto`) and to and
from JSON for etcd (`to_json`/`from_json`, one small object per key, readable with etcdctl).
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import json
from dataclasses import dataclass, field
from typing import Any, Self

from geomesh import validate as v
from geomesh.api import geomesh_pb2 as pb
from geomesh.errors import ValidationError


class LbPolicy(enum.StrEnum):
    ROUND_ROBIN = "round_robin"
    LEAST_CONNECTIONS = "least_connections"
    IP_HASH = "ip_hash"

    @classmethod
    def parse(cls, field_name: str, value: str) -> LbPolicy:
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(p.value for p in cls)
            raise ValidationError(field_name, f"{value!r} is not one of {choices}") from None


_LB_TO_PB = {
    LbPolicy.ROUND_ROBIN: pb.LB_POLICY_ROUND_ROBIN,
    LbPolicy.LEAST_CONNECTIONS: pb.LB_POLICY_LEAST_CONNECTIONS,
    LbPolicy.IP_HASH: pb.LB_POLICY_IP_HASH,
}
_PB_TO_LB = {v_: k for k, v_ in _LB_TO_PB.items()} | {pb.LB_POLICY_UNSPECIFIED: LbPolicy.ROUND_ROBIN}


class GatewayState(enum.StrEnum):
    ACTIVE = "active"
    DRAINING = "draining"


_GW_TO_PB = {GatewayState.ACTIVE: pb.GATEWAY_STATE_ACTIVE, GatewayState.DRAINING: pb.GATEWAY_STATE_DRAINING}
_PB_TO_GW = {v_: k for k, v_ in _GW_TO_PB.items()} | {pb.GATEWAY_STATE_UNSPECIFIED: GatewayState.ACTIVE}


class SessionState(enum.StrEnum):
    """What the coordinator knows of a gateway's control session (from `alive/<g>`): open
    (heartbeats flowing), timed out (heartbeats stopped; the gateway stays alive while a quorum
    of other regions still reaches it) or closed (stream reset, never opened: not alive)."""

    OPEN = "open"
    TIMED_OUT = "timed_out"
    CLOSED = "closed"


_SESSION_TO_PB = {SessionState.OPEN: pb.SESSION_STATE_OPEN, SessionState.TIMED_OUT: pb.SESSION_STATE_TIMED_OUT,
                  SessionState.CLOSED: pb.SESSION_STATE_CLOSED}
_PB_TO_SESSION = {v_: k for k, v_ in _SESSION_TO_PB.items()}


class _Json:
    """JSON (etcd) round trip for the dataclasses below."""

    def to_json(self) -> bytes:
        def conv(value: Any) -> Any:
            if isinstance(value, enum.Enum):
                return value.value
            if isinstance(value, tuple):
                return [conv(x) for x in value]
            return value

        data = {f.name: conv(getattr(self, f.name)) for f in dataclasses.fields(self)  # type: ignore[arg-type]
                if f.metadata.get("stored", True)}
        return json.dumps(data, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes | str, **extra: Any) -> Self:
        data = json.loads(raw)
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        data = {k: (tuple(val) if isinstance(val, list) else val) for k, val in data.items() if k in names}
        data.update(extra)
        return cls(**data)


@dataclass(frozen=True, slots=True)
class Region(_Json):
    name: str
    latitude: float
    longitude: float
    display_name: str = ""
    instance_subnet: str = ""

    def __post_init__(self) -> None:
        v.dns_label("name", self.name)
        object.__setattr__(self, "latitude", v.latitude("latitude", self.latitude))
        object.__setattr__(self, "longitude", v.longitude("longitude", self.longitude))
        v.text("display_name", self.display_name)
        object.__setattr__(self, "instance_subnet", v.cidr("instance_subnet", self.instance_subnet, optional=True))

    def to_proto(self) -> pb.Region:
        return pb.Region(name=self.name, latitude=self.latitude, longitude=self.longitude,
                         display_name=self.display_name, instance_subnet=self.instance_subnet)

    @classmethod
    def from_proto(cls, m: pb.Region) -> Region:
        return cls(m.name, m.latitude, m.longitude, m.display_name, m.instance_subnet)


@dataclass(frozen=True, slots=True)
class Gateway(_Json):
    name: str
    region: str
    public_ip: str
    wg_port: int
    wg_public_key: str
    mesh_ip: str
    proxy_port: int
    public_ipv6: str = ""
    state: GatewayState = GatewayState.ACTIVE
    https_port: int = 0  # TLS port clients reach, 0 = none
    sealing_public_key: str = ""  # base64 X25519 key certificates' keys are sealed to; "" = none
    # not stored in the gateway's key: `alive` and `session` come from alive/<g>, the
    # reachability verdict (`unreachable`, `seen_by`, `down_by`, `probe_rtt_ms`) from reach/<g>,
    # the revision from etcd
    alive: bool = field(default=False, metadata={"stored": False})
    mod_revision: int = field(default=0, metadata={"stored": False})
    session: SessionState = field(default=SessionState.CLOSED, metadata={"stored": False})
    unreachable: bool = field(default=False, metadata={"stored": False})
    seen_by: tuple[str, ...] = field(default=(), metadata={"stored": False})   # regions that reach it
    down_by: tuple[str, ...] = field(default=(), metadata={"stored": False})   # regions that do not
    probe_rtt_ms: float = field(default=0.0, metadata={"stored": False})

    def __post_init__(self) -> None:
        v.dns_label("name", self.name)
        v.dns_label("region", self.region)
        object.__setattr__(self, "public_ip", v.ip_address("public_ip", self.public_ip, version=4))
        object.__setattr__(self, "public_ipv6", v.ip_address("public_ipv6", self.public_ipv6, version=6, optional=True))
        v.port("wg_port", self.wg_port)
        v.wg_key("wg_public_key", self.wg_public_key)
        object.__setattr__(self, "mesh_ip", v.ip_address("mesh_ip", self.mesh_ip, optional=True))
        v.port("proxy_port", self.proxy_port)
        v.port("https_port", self.https_port, allow_zero=True)
        if self.sealing_public_key:
            v.wg_key("sealing_public_key", self.sealing_public_key)  # the same shape: base64 of 32 bytes
        object.__setattr__(self, "state", GatewayState(self.state))
        # `session` agrees with `alive`: alive without a stated session is open, not alive is closed
        session = SessionState(self.session)
        if not self.alive:
            session = SessionState.CLOSED
        elif session is SessionState.CLOSED:
            session = SessionState.OPEN
        object.__setattr__(self, "session", session)
        object.__setattr__(self, "seen_by", tuple(self.seen_by))
        object.__setattr__(self, "down_by", tuple(self.down_by))

    @property
    def routable(self) -> bool:
        """Alive (session open, or timed out) and not draining. The reachability verdict is
        apart: see `reachable_routable`."""
        return self.alive and self.state is GatewayState.ACTIVE

    @property
    def reachable_routable(self) -> bool:
        """Should DNS and peers send new clients here? Routable and not found unreachable by a
        quorum of other regions' probers (consumers fail open when this leaves nothing)."""
        return self.routable and not self.unreachable

    def to_proto(self) -> pb.Gateway:
        return pb.Gateway(name=self.name, region=self.region, public_ip=self.public_ip,
                          public_ipv6=self.public_ipv6, wg_port=self.wg_port,
                          wg_public_key=self.wg_public_key, mesh_ip=self.mesh_ip,
                          proxy_port=self.proxy_port, state=_GW_TO_PB[self.state], alive=self.alive,
                          mod_revision=self.mod_revision, https_port=self.https_port,
                          unreachable=self.unreachable, session=_SESSION_TO_PB[self.session],
                          seen_by=list(self.seen_by), down_by=list(self.down_by),
                          probe_rtt_ms=self.probe_rtt_ms, sealing_public_key=self.sealing_public_key)

    @classmethod
    def from_proto(cls, m: pb.Gateway) -> Gateway:
        session = _PB_TO_SESSION.get(m.session)
        if session is None:  # unspecified (an older coordinator): what `alive` says
            session = SessionState.OPEN if m.alive else SessionState.CLOSED
        return cls(name=m.name, region=m.region, public_ip=m.public_ip, wg_port=m.wg_port,
                   wg_public_key=m.wg_public_key, mesh_ip=m.mesh_ip, proxy_port=m.proxy_port,
                   public_ipv6=m.public_ipv6, state=_PB_TO_GW.get(m.state, GatewayState.ACTIVE),
                   https_port=m.https_port, alive=m.alive, mod_revision=m.mod_revision, session=session,
                   unreachable=m.unreachable, seen_by=tuple(m.seen_by), down_by=tuple(m.down_by),
                   probe_rtt_ms=m.probe_rtt_ms, sealing_public_key=m.sealing_public_key)


def sealing_key_text(raw: bytes) -> str:
    """A Register request's `sealing_public_key` (32 raw bytes, or none) as the record keeps it
    (base64); ValidationError naming the field for any other length or the all-zero key (a
    low-order point nothing can be sealed to)."""
    if not raw:
        return ""
    if len(raw) != 32:
        raise ValidationError("sealing_public_key", f"is {len(raw)} bytes; an X25519 public key has 32")
    if raw == bytes(32):
        raise ValidationError("sealing_public_key", "is the all-zero key: nothing can be sealed to it")
    return base64.b64encode(raw).decode()


MAX_PINNED = 32
MAX_PORTS = 64


def app_ports(field_name: str, ports: Any) -> tuple[int, ...]:
    """An app's declared ports, checked: each 1..65535, no duplicates, at most `MAX_PORTS`.

    Shared by the Admin API's `App.ports` and the gateway routes file's `apps[i].ports`, so both
    refuse the same values with the same words (`ports[2]: 0 is not a port (1-65535)`).
    """
    ports = tuple(ports)
    if len(ports) > MAX_PORTS:
        raise ValidationError(field_name, f"has {len(ports)} entries, at most {MAX_PORTS}")
    seen: set[int] = set()
    for i, p in enumerate(ports):
        if isinstance(p, bool):
            raise ValidationError(f"{field_name}[{i}]", f"{p!r} is not a port (1-65535)")
        v.port(f"{field_name}[{i}]", p)
        if p in seen:
            raise ValidationError(f"{field_name}[{i}]", f"port {p} is listed twice")
        seen.add(p)
    return ports


@dataclass(frozen=True, slots=True)
class App(_Json):
    """An app. `ports`: the ports its `<app>-<port>` names may reach besides each instance's own
    port (the gateways refuse every other port; see docs/gateway-dataplane.md)."""

    name: str
    lb_policy: LbPolicy = LbPolicy.ROUND_ROBIN
    pinned_regions: tuple[str, ...] = ()
    mod_revision: int = field(default=0, metadata={"stored": False})
    ports: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        v.dns_label("name", self.name)
        object.__setattr__(self, "lb_policy", LbPolicy.parse("lb_policy", self.lb_policy))
        pinned = tuple(self.pinned_regions)
        if len(pinned) > MAX_PINNED:
            raise ValidationError("pinned_regions", f"has {len(pinned)} entries, at most {MAX_PINNED}")
        for i, r in enumerate(pinned):
            v.dns_label(f"pinned_regions[{i}]", r)
        if len(set(pinned)) != len(pinned):
            raise ValidationError("pinned_regions", "lists a region twice")
        object.__setattr__(self, "pinned_regions", pinned)
        object.__setattr__(self, "ports", app_ports("ports", self.ports))

    def to_proto(self) -> pb.App:
        return pb.App(name=self.name, lb_policy=_LB_TO_PB[self.lb_policy],
                      pinned_regions=list(self.pinned_regions), mod_revision=self.mod_revision,
                      ports=list(self.ports))

    @classmethod
    def from_proto(cls, m: pb.App) -> App:
        if m.lb_policy not in _PB_TO_LB:
            raise ValidationError("lb_policy", f"unknown value {m.lb_policy}")
        return cls(m.name, _PB_TO_LB[m.lb_policy], tuple(m.pinned_regions), m.mod_revision, tuple(m.ports))


@dataclass(frozen=True, slots=True)
class Instance(_Json):
    app: str
    id: str
    region: str
    address: str
    port: int
    healthy: bool = True

    def __post_init__(self) -> None:
        v.dns_label("app", self.app)
        v.dns_label("id", self.id)
        v.dns_label("region", self.region)
        object.__setattr__(self, "address", v.ip_address("address", self.address))
        v.port("port", self.port)

    @property
    def key(self) -> str:
        return f"{self.app}/{self.id}"

    def to_proto(self) -> pb.Instance:
        return pb.Instance(app=self.app, id=self.id, region=self.region, address=self.address,
                           port=self.port, healthy=self.healthy)

    @classmethod
    def from_proto(cls, m: pb.Instance) -> Instance:
        return cls(m.app, m.id, m.region, m.address, m.port, m.healthy)


@dataclass(frozen=True, slots=True)
class Domain(_Json):
    fqdn: str
    app: str
    port: int = 0
    verified: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "fqdn", v.fqdn("fqdn", self.fqdn))
        v.dns_label("app", self.app)
        v.port("port", self.port, allow_zero=True)

    def to_proto(self) -> pb.Domain:
        return pb.Domain(fqdn=self.fqdn, app=self.app, port=self.port, verified=self.verified)

    @classmethod
    def from_proto(cls, m: pb.Domain) -> Domain:
        return cls(m.fqdn, m.app, m.port, m.verified)


@dataclass(frozen=True, slots=True)
class TxtRecord(_Json):
    """A TXT record GeoDNS serves in the zone (ACME DNS-01 challenges): each value one RR."""

    name: str
    values: tuple[str, ...] = ()
    ttl: int = 60

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", v.owner_name("name", self.name))
        object.__setattr__(self, "values", tuple(self.values))
        if not 1 <= len(self.values) <= 16:
            raise ValidationError("values", f"a TXT record has 1 to 16 values, not {len(self.values)}")
        for i, value in enumerate(self.values):
            if not isinstance(value, str) or not value.isascii() or len(value) > 255:
                raise ValidationError(f"values[{i}]", "is not an ASCII string of at most 255 characters")
        if not 0 <= self.ttl <= 86400:
            raise ValidationError("ttl", f"{self.ttl} is not within 0..86400 seconds")

    def to_proto(self) -> pb.TxtRecord:
        return pb.TxtRecord(name=self.name, values=self.values, ttl=self.ttl)

    @classmethod
    def from_proto(cls, m: pb.TxtRecord) -> TxtRecord:
        return cls(m.name, tuple(m.values), m.ttl)


KIND_OF: dict[type, int] = {
    Region: pb.ResourceKey.KIND_REGION,
    Gateway: pb.ResourceKey.KIND_GATEWAY,
    App: pb.ResourceKey.KIND_APP,
    Instance: pb.ResourceKey.KIND_INSTANCE,
    Domain: pb.ResourceKey.KIND_DOMAIN,
    TxtRecord: pb.ResourceKey.KIND_TXT,
}
Resource = Region | Gateway | App | Instance | Domain | TxtRecord


def resource_name(obj: Resource) -> str:
    """The name a resource is keyed by in the routing table and in ResourceKey.name."""
    if isinstance(obj, Instance):
        return obj.key
    if isinstance(obj, Domain):
        return obj.fqdn
    return obj.name  # TxtRecord: its name


def resource_to_proto(obj: Resource) -> pb.Resource:
    field_name = {Region: "region", Gateway: "gateway", App: "app", Instance: "instance", Domain: "domain",
                  TxtRecord: "txt"}[type(obj)]
    return pb.Resource(**{field_name: obj.to_proto()})


def resource_from_proto(m: pb.Resource) -> Resource:
    which = m.WhichOneof("kind")
    cls = {"region": Region, "gateway": Gateway, "app": App, "instance": Instance, "domain": Domain,
           "txt": TxtRecord}.get(which or "")
    if cls is None:
        raise ValidationError("resource", "has no kind set")
    return cls.from_proto(getattr(m, which))  # type: ignore[attr-defined]
