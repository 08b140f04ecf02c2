"""The gateway agent's configuration: one TOML file, validated at start, errors name the field.

Example (`deploy/gateway.example.toml` documents every field)::

    name = "gw-eu-central-1"
    region = "eu-central"
    coordinators = ["10.0.0.5:7443", "10.0.0.6:7443"]
    public_ip = "198.51.100.21"
    zone = "apps.example.com"
    proxy_port = 80
    https_port = 443
    https_redirect = true            # plain HTTP for a host with a certificate: 301 to https://
    [[certificates]]
    cert = "/etc/geomesh/apps.example.com.pem"
    key = "/etc/geomesh/apps.example.com.key"
    [tls]
    ca = "/etc/geomesh/ca.pem"
    cert = "/etc/geomesh/gateway.pem"
    key = "/etc/geomesh/gateway.key"
    [wireguard]
    interface = "gm0"
    listen_port = 51820
    key_file = "/var/lib/geomesh/wg.key"
    backend = "auto"
    [reach]                          # outside-in probes of other gateways (docs/reachability.md)
    interval = 0.5
    timeout = 0.5
    fall = 3
    rise = 2
    prober_regions = 3
    [state]                          # static stability (docs/static-stability.md)
    dir = "/var/lib/geomesh/state"   # default: "state" beside the WireGuard key file
    max_age = 0                      # seconds; a saved state older than this is not served (0 = any age)
    coordinator_deadline = 2.0       # seconds to wait for a coordinator at start before serving saved state
    [custom_domains]                 # custom domains by TXT record (docs/custom-domains.md)
    resolver = "127.0.0.1:53"        # recursive resolver IP:port; none: off
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geomesh import validate
from geomesh.errors import ValidationError
from geomesh.probe_plan import DEFAULT_PROBER_REGIONS
from regional_gateway.proxy.certificates import load as load_certificate
from regional_gateway.proxy.routes import CertificateSpec
from regional_gateway.proxy.settings import G_MODES, ProxySettings

BACKENDS = ("auto", "userspace", "kernel", "none")
REACH_KEYS = ("interval", "timeout", "fall", "rise", "prober_regions")
STATE_KEYS = ("dir", "max_age", "coordinator_deadline")
# [custom_domains] key -> the ProxySettings field it sets (docs/custom-domains.md)
CUSTOM_DOMAIN_KEYS = {"resolver": "resolver", "resolver_timeout": "resolver_timeout",
                      "min_ttl": "custom_domain_min_ttl", "max_ttl": "custom_domain_max_ttl",
                      "negative_ttl": "custom_domain_negative_ttl", "client_rate": "custom_domain_client_rate",
                      "client_burst": "custom_domain_client_burst", "rate": "custom_domain_rate",
                      "burst": "custom_domain_burst", "cache_entries": "custom_domain_cache_entries",
                      "on_demand_wait": "on_demand_wait"}


@dataclass(frozen=True, slots=True)
class AgentConfig:
    name: str
    region: str
    coordinators: tuple[str, ...]
    public_ip: str
    zone: str = "geomesh.test"
    public_ipv6: str = ""
    proxy_port: int = 8080              # where clients (and peers over the mesh) reach the proxy
    proxy_listen: str = ""              # bind address of the client-facing listener ("" = public_ip)
    https_port: int = 0                 # TLS listener on proxy_listen (SNI termination, `s`, `g`); 0 = none
    certificates: tuple[CertificateSpec, ...] = ()  # served by SNI on https_port
    https_redirect: bool = True         # plain HTTP for a host with a TLS certificate: 301 to https://
    g_mode: str = "streams"             # `g` names: streams (per-call balancing) or tunnel
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    insecure: bool = False              # plaintext to a --insecure coordinator (loopback demos)
    wg_interface: str = "gm0"
    wg_listen_port: int = 51820
    wg_key_file: Path = Path("wg.key")
    wg_backend: str = "auto"
    wg_keepalive: int = 15
    heartbeat_interval: float = 1.0
    metrics_host: str = "127.0.0.1"
    metrics_port: int = -1
    dataplane: bool = True              # run the HTTP proxy in this process
    # [reach]: outside-in probes of the gateways the probe plan assigns to this one
    reach_interval: float = 0.5         # seconds between probes of one target
    reach_timeout: float = 0.5          # seconds one probe may take (connect + request + answer [+ TLS])
    reach_fall: int = 3                 # failed probes in a row before a target is voted down
    reach_rise: int = 2                 # good probes in a row before it is voted up again
    reach_prober_regions: int = DEFAULT_PROBER_REGIONS  # regions probing each gateway (m of the plan)
    # [state]: the last applied state, served at start while no coordinator answers
    state_dir: Path | None = None       # None: "state" beside the WireGuard key file
    state_max_age: float = 0.0          # seconds; an older saved state is not served at start (0 = any age)
    coordinator_deadline: float = 2.0   # seconds to wait for a coordinator at start before serving saved state
    # [custom_domains]: the data plane's TXT look-ups, as ProxySettings fields (CUSTOM_DOMAIN_KEYS)
    custom_domains: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def state_root(self) -> Path:
        """The state directory (several gateways may share one: each file carries its gateway's name)."""
        return self.state_dir or self.wg_key_file.parent / "state"

    @property
    def state_file(self) -> Path:
        """Where this gateway saves its last applied state."""
        return self.state_root / f"gateway-{self.name}.state"

    @property
    def sealing_key_file(self) -> Path:
        """This gateway's X25519 sealing key (mode 0600): the coordinator seals certificates' keys to it."""
        return self.state_root / f"gateway-{self.name}.sealing.key"

    @property
    def certs_dir(self) -> Path:
        """Where the certificates the coordinator sent are kept (`<name>.pem`, `<name>.key` 0600)."""
        return self.state_root / f"gateway-{self.name}.certs"

    def __post_init__(self) -> None:
        validate.dns_label("name", self.name)
        validate.dns_label("region", self.region)
        if not self.coordinators:
            raise ValidationError("coordinators", "needs at least one host:port")
        for i, c in enumerate(self.coordinators):
            if c.startswith("unix:/"):
                continue
            host, _, port = c.rpartition(":")
            if not host or not port.isdigit():
                raise ValidationError(f"coordinators[{i}]", f"{c!r} is not host:port or unix:/path")
        validate.ip_address("public_ip", self.public_ip, version=4)
        validate.ip_address("public_ipv6", self.public_ipv6, version=6, optional=True)
        validate.fqdn("zone", self.zone)
        validate.port("proxy_port", self.proxy_port)
        if self.https_port:
            validate.port("https_port", self.https_port)
            if self.https_port == self.proxy_port:
                raise ValidationError("https_port", "must differ from proxy_port (plain HTTP listens there)")
        if not isinstance(self.https_redirect, bool):
            raise ValidationError("https_redirect", f"{self.https_redirect!r} is not true or false")
        for i, spec in enumerate(self.certificates):
            load_certificate(spec, f"certificates[{i}]")  # readable, a certificate, the key matches
        if self.g_mode not in G_MODES:
            raise ValidationError("g_mode", f"{self.g_mode!r} is not one of: {', '.join(G_MODES)}")
        validate.port("wireguard.listen_port", self.wg_listen_port)
        if not 1 <= len(self.wg_interface) <= 15:
            raise ValidationError("wireguard.interface", "must be 1-15 characters (a Linux interface name)")
        if self.wg_backend not in BACKENDS:
            raise ValidationError("wireguard.backend", f"{self.wg_backend!r} is not one of {', '.join(BACKENDS)}")
        if not self.insecure and not (self.tls_ca and self.tls_cert and self.tls_key):
            raise ValidationError("tls", "ca, cert and key are required unless insecure = true")
        if not 0.1 <= self.heartbeat_interval <= 30:
            raise ValidationError("heartbeat_interval", "must be 0.1..30 seconds")
        _seconds("reach.interval", self.reach_interval, 0.05, 60.0)
        _seconds("reach.timeout", self.reach_timeout, 0.01, 30.0)
        if self.reach_timeout > self.reach_interval:
            raise ValidationError("reach.timeout", f"{self.reach_timeout!r} is longer than reach.interval "
                                  f"({self.reach_interval!r}): one probe per target at a time")
        _count("reach.fall", self.reach_fall, 1, 100)
        _count("reach.rise", self.reach_rise, 1, 100)
        _count("reach.prober_regions", self.reach_prober_regions, 1, 64)
        if self.state_max_age != 0:
            _seconds("state.max_age", self.state_max_age, 1.0, 10 * 365 * 86400.0)
        _seconds("state.coordinator_deadline", self.coordinator_deadline, 0.1, 60.0)
        fields_of = {v: k for k, v in CUSTOM_DOMAIN_KEYS.items()}
        for name in self.custom_domains:
            if name not in fields_of:
                raise ValidationError(f"custom_domains.{name}", "is not a data plane custom-domain setting")
        try:
            ProxySettings(http=("127.0.0.1:0",), **self.custom_domains)
        except ValidationError as exc:
            raise ValidationError(f"custom_domains.{fields_of.get(exc.field, exc.field)}", exc.message) from None


def _seconds(name: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
            or not low <= value <= high:
        raise ValidationError(name, f"{value!r} is not a number of seconds in {low}..{high}")


def _count(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValidationError(name, f"{value!r} is not an integer in {low}..{high}")


def _table(data: dict, name: str, keys: Iterable[str]) -> dict:
    """`data[name]` (empty when absent), which must be a table of known `keys` only (else a
    ValidationError naming the table or the unknown key)."""
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise ValidationError(name, "must be a table")
    unknown = sorted(set(table) - set(keys))
    if unknown:
        raise ValidationError(f"{name}.{unknown[0]}", f"is not a known setting (known: {', '.join(keys)})")
    return table


def load(path: Path) -> AgentConfig:
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValidationError(str(path), f"cannot be read as TOML: {exc}") from None
    base = Path(path).resolve().parent

    def rel(value: str | None) -> Path | None:
        if not value:
            return None
        p = Path(value)
        return p if p.is_absolute() else base / p

    tls = data.get("tls", {})
    wg = data.get("wireguard", {})
    known = {"name", "region", "coordinators", "public_ip", "public_ipv6", "zone", "proxy_port", "proxy_listen",
             "https_port", "https_redirect", "certificates", "g_mode", "insecure", "heartbeat_interval", "metrics_host", "metrics_port",
             "dataplane", "tls", "wireguard", "reach", "routes", "state", "custom_domains"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValidationError(unknown[0], "is not a known setting")
    reach = _table(data, "reach", REACH_KEYS)
    state = _table(data, "state", STATE_KEYS)
    custom = _table(data, "custom_domains", CUSTOM_DOMAIN_KEYS)
    coordinators = data.get("coordinators", [])
    if isinstance(coordinators, str):
        coordinators = [coordinators]
    certificates = []
    for i, item in enumerate(data.get("certificates", [])):
        if not isinstance(item, dict) or set(item) != {"cert", "key"}:
            raise ValidationError(f"certificates[{i}]", "must be a table with cert and key (file paths)")
        certificates.append(CertificateSpec(cert=rel(item["cert"]), key=rel(item["key"])))  # type: ignore[arg-type]
    return AgentConfig(
        name=data.get("name", ""), region=data.get("region", ""), coordinators=tuple(coordinators),
        public_ip=data.get("public_ip", ""), public_ipv6=data.get("public_ipv6", ""),
        zone=data.get("zone", "geomesh.test"), proxy_port=data.get("proxy_port", 8080),
        proxy_listen=data.get("proxy_listen", ""), https_port=data.get("https_port", 0),
        https_redirect=data.get("https_redirect", True),
        certificates=tuple(certificates), g_mode=data.get("g_mode", "streams"), insecure=bool(data.get("insecure", False)),
        tls_ca=rel(tls.get("ca")), tls_cert=rel(tls.get("cert")), tls_key=rel(tls.get("key")),
        wg_interface=wg.get("interface", "gm0"), wg_listen_port=wg.get("listen_port", 51820),
        wg_key_file=rel(wg.get("key_file", "wg.key")) or base / "wg.key", wg_backend=wg.get("backend", "auto"),
        wg_keepalive=wg.get("persistent_keepalive", 15), heartbeat_interval=float(data.get("heartbeat_interval", 1.0)),
        metrics_host=data.get("metrics_host", "127.0.0.1"), metrics_port=data.get("metrics_port", -1),
        dataplane=bool(data.get("dataplane", True)), extra={"routes": data.get("routes")},
        reach_interval=reach.get("interval", 0.5), reach_timeout=reach.get("timeout", 0.5),
        reach_fall=reach.get("fall", 3), reach_rise=reach.get("rise", 2),
        reach_prober_regions=reach.get("prober_regions", DEFAULT_PROBER_REGIONS),
        state_dir=rel(state.get("dir")), state_max_age=state.get("max_age", 0.0),
        coordinator_deadline=state.get("coordinator_deadline", 2.0),
        custom_domains={CUSTOM_DOMAIN_KEYS[k]: v for k, v in custom.items()},
    )
