"""The data plane's process settings: listeners, limits and timeouts (not routes).

One frozen value validated on construction, built by `regional_gateway.main` from flags and
the optional `[server]` table of the routes file (or by the agent from its own config). Routes
change at run time (`ProxyServer.update_routes`); these settings are fixed for the life of the
server.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, fields

from geomesh.errors import ValidationError


def parse_listen(field: str, value: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port); port 0 picks a free port."""
    if not isinstance(value, str) or ":" not in value:
        raise ValidationError(field, f"{value!r} is not host:port")
    host, _, port_s = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValidationError(field, f"{host!r} is not an IP address") from None
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValidationError(field, f"{port_s!r} is not a port (0-65535)")
    return host, int(port_s)


G_MODES = ("streams", "tunnel")


@dataclass(frozen=True, slots=True)
class ProxySettings:
    http: tuple[str, ...] = ()  # plain HTTP listeners, "host:port"
    https: tuple[str, ...] = ()  # TLS listeners (termination by SNI and passthrough)
    mesh: tuple[str, ...] = ()  # mesh listeners: forwarded requests from other gateways are trusted here
    trusted_peers: tuple[str, ...] = ()  # peer IPs treated like the mesh on any listener (gateways without a mesh)
    max_connections: int = 10000  # client connections over all listeners (lowered to fit RLIMIT_NOFILE at start)
    # connections one client (IPv4 address, IPv6 /64) may hold, TLS handshakes included; None: a
    # quarter of the effective max_connections, at least 16; 0: no share (mesh and trusted peers exempt)
    max_connections_per_client: int | None = None
    max_header_bytes: int = 32768  # request line + headers
    max_headers: int = 100
    max_body_bytes: int = 100 * 1024 * 1024  # request body; 0 = no limit
    header_timeout: float = 10.0  # seconds to receive a full request head (slowloris guard)
    body_timeout: float = 10.0  # request body: longest silence between reads (408 after)
    body_min_rate: int = 1024  # request body: bytes/s it must average over each body_timeout window; 0 = off
    idle_timeout: float = 60.0  # keep-alive idle, and a stalled request body or response
    connect_timeout: float = 3.0  # upstream TCP connect
    upstream_timeout: float = 60.0  # request sent -> first response byte
    tunnel_idle_timeout: float = 3600.0  # WebSocket / passthrough without traffic
    drain_timeout: float = 15.0  # SIGTERM: how long in-flight requests may finish
    pool_max_idle: int = 256  # idle upstream connections kept per backend
    pool_idle_timeout: float = 30.0  # an idle upstream connection is closed after this
    cert_check_interval: float = 5.0  # how often certificate files are checked for changes
    backlog: int = 1024
    # how `g` names are proxied: "streams" (HTTP/2 terminated here, every call balanced on its own)
    # or "tunnel" (the clear HTTP/2 connection is a byte stream to one backend: faster, but all the
    # calls of a client connection go to the backend chosen when it connected)
    g_mode: str = "streams"
    # HTTP/2 clients (h2_guard): client resets + refused streams, and no-op frames (PING, SETTINGS,
    # PRIORITY, WINDOW_UPDATE, empty DATA), allowed per connection in a burst, refilled over 10 s;
    # beyond, GOAWAY (ENHANCE_YOUR_CALM) and close
    h2_max_resets: int = 1000
    h2_max_control_frames: int = 1000
    # penalty box (admission.PenaltyBox): a client whose connection was closed for abuse (HTTP/2
    # GOAWAY ENHANCE_YOUR_CALM: rapid reset, frame flood, unread replies) is refused at accept
    # for penalty_cooldown seconds (0 = off), doubled per repeat offence up to penalty_cooldown_max;
    # penalty_clients offenders are remembered (the least recent forgotten first)
    penalty_cooldown: float = 1.0
    penalty_cooldown_max: float = 60.0
    penalty_clients: int = 10000
    # custom domains by TXT record (docs/custom-domains.md): a host that is not the zone's and not a
    # configured domain is looked up as `_geomesh-app-address.<host>` (and the seed's
    # `_dstack-app-address.<host>`) through this recursive resolver, "host:port"; "" = off
    resolver: str = ""
    resolver_timeout: float = 1.0  # seconds per UDP try (two tries; a truncated answer: one TCP try)
    custom_domain_min_ttl: float = 5.0  # an answer is cached for its TTL, at least this long...
    custom_domain_max_ttl: float = 3600.0  # ...and at most this long
    custom_domain_negative_ttl: float = 5.0  # the longest a "no mapping" (or a failed look-up) is cached
    custom_domain_client_rate: int = 2  # look-ups per second one client may cause (cache hits are free)...
    custom_domain_client_burst: int = 10  # ...with this many saved up (beyond: 429)
    custom_domain_rate: int = 100  # look-ups per second for all clients together...
    custom_domain_burst: int = 200  # ...with this many saved up (beyond: 503)
    custom_domain_cache_entries: int = 10000  # hosts whose answer is kept
    # certificates on demand (coordinator mode): how long a TLS handshake for a custom domain with no
    # certificate waits while the coordinator obtains one (`on_demand`); then an unrecognized_name alert
    on_demand_wait: float = 10.0
    # a plain listener's request for a host served over TLS (a TLS listener and a certificate for the
    # name) is redirected to https:// (301; 308 for methods other than GET/HEAD); ACME HTTP-01
    # paths, the mesh listener and trusted peers never are (`port80`)
    https_redirect: bool = True

    def __post_init__(self) -> None:
        for name in ("http", "https", "mesh"):
            values = tuple(getattr(self, name))
            for i, item in enumerate(values):
                parse_listen(f"{name}[{i}]", item)
            object.__setattr__(self, name, values)
        peers = tuple(self.trusted_peers)
        for i, ip in enumerate(peers):
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise ValidationError(f"trusted_peers[{i}]", f"{ip!r} is not an IP address") from None
        object.__setattr__(self, "trusted_peers", peers)
        if not (self.http or self.https or self.mesh):
            raise ValidationError("listen", "no listener configured (give --http, --https or --mesh)")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                if isinstance(value, bool) or not isinstance(value, int) or value < 0 or \
                        (value == 0 and f.name not in ("max_body_bytes", "body_min_rate")):
                    raise ValidationError(f.name, f"{value!r} is not a positive integer")
            elif f.type == "float":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
                        or not 0 <= value <= 86400 * 7 or (value == 0 and f.name != "penalty_cooldown"):
                    raise ValidationError(f.name, f"{value!r} is not a positive number of seconds")
                object.__setattr__(self, f.name, float(value))
        per_client = self.max_connections_per_client
        if per_client is not None and (isinstance(per_client, bool) or not isinstance(per_client, int)
                                       or per_client < 0):
            raise ValidationError("max_connections_per_client",
                                  f"{per_client!r} is not a number of connections (0 = no per-client share)")
        if self.penalty_cooldown > 3600:
            raise ValidationError("penalty_cooldown", f"{self.penalty_cooldown:g} is over 3600 seconds")
        if self.penalty_cooldown_max < self.penalty_cooldown or self.penalty_cooldown_max > 86400:
            raise ValidationError("penalty_cooldown_max", f"{self.penalty_cooldown_max:g} is outside "
                                  f"{self.penalty_cooldown:g}-86400 seconds (at least penalty_cooldown)")
        if not isinstance(self.https_redirect, bool):
            raise ValidationError("https_redirect", f"{self.https_redirect!r} is not true or false")
        if self.g_mode not in G_MODES:
            raise ValidationError("g_mode", f"{self.g_mode!r} is not one of: {', '.join(G_MODES)}")
        if self.resolver:
            if parse_listen("resolver", self.resolver)[1] == 0:
                raise ValidationError("resolver", "needs a port (1-65535)")
        if self.custom_domain_min_ttl > self.custom_domain_max_ttl:
            raise ValidationError("custom_domain_min_ttl", f"{self.custom_domain_min_ttl:g} is over "
                                  f"custom_domain_max_ttl ({self.custom_domain_max_ttl:g})")
        if not 0.5 <= self.on_demand_wait <= 60:
            raise ValidationError("on_demand_wait", f"{self.on_demand_wait:g} is not 0.5..60 seconds")
        if self.resolver_timeout > 30:
            raise ValidationError("resolver_timeout", f"{self.resolver_timeout:g} is over 30 seconds")
        if self.max_header_bytes < 1024:
            raise ValidationError("max_header_bytes", "must be at least 1024")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
