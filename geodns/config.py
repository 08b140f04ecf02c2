"""geomesh-dns configuration: one validated dataclass built from the command line.

`parser()` documents every flag (`geomesh-dns --help`); `Config.from_args` checks them all at
start and raises `ValidationError` naming the flag, so a bad setting stops the process with a
clear message instead of surfacing later. Building a Config has no side effects: sockets, the
GeoIP database and the state file are opened by `geodns.server`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from geodns.answer import DEFAULT_CACHE_BYTES, DEFAULT_CACHE_SIZE, DEFAULT_UDP_PAYLOAD
from geodns.nearest import default_database
from geodns.rrl import RrlConfig
from geodns.tcp import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS
from geodns.tcp_admission import (
    DEFAULT_ABUSE_COOLDOWN,
    DEFAULT_ABUSE_COOLDOWN_MAX,
    DEFAULT_PENALTY_CLIENTS,
    default_per_client,
)
from geodns.view import NameServer
from geomesh import validate as v
from geomesh.errors import ValidationError

MAX_UDP_PAYLOAD = 4096
MAX_WORKERS = 64
MIN_CACHE_BYTES = 64 << 10
MAX_CACHE_BYTES = 64 << 30
DEFAULT_GEOIP_POLL = 5.0


def parse_listen(field_name: str, value: str) -> tuple[str, int]:
    """`HOST:PORT` or `[V6]:PORT` -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValidationError(field_name, f"{value!r} is not HOST:PORT")
    host = host.strip("[]")
    try:
        num = int(port)
    except ValueError:
        raise ValidationError(field_name, f"{value!r}: port {port!r} is not a number") from None
    v.port(field_name, num, allow_zero=True)
    v.ip_address(field_name, host)
    return host, num


@dataclass(frozen=True)
class Config:
    listen: tuple[tuple[str, int], ...] = (("0.0.0.0", 53),)
    state: Path | None = None
    coordinators: tuple[str, ...] = ()
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    insecure: bool = False
    name: str = "dns"
    announce_address: str = ""  # with --coordinator: where the coordinator queries us ("": the first --listen)
    zone_overrides: dict = field(default_factory=dict)  # zone settings from flags (None = not given)
    geoip_db: Path | None = None
    udp_payload: int = DEFAULT_UDP_PAYLOAD
    cache_size: int = DEFAULT_CACHE_SIZE
    cache_bytes: int = DEFAULT_CACHE_BYTES
    reply_cache: bool = True  # the exact (query bytes -> reply) cache
    region_map: bool = True  # compile the GeoIP database against the regions (else a lookup per query)
    geoip_poll: float = DEFAULT_GEOIP_POLL  # seconds between checks of the database file; 0: never
    tcp_idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    tcp_max_connections: int = DEFAULT_MAX_CONNECTIONS
    tcp_max_per_client: int | None = None  # None: default_per_client(tcp_max_connections)
    tcp_abuse_cooldown: float = DEFAULT_ABUSE_COOLDOWN  # 0: no penalty box
    tcp_abuse_cooldown_max: float = DEFAULT_ABUSE_COOLDOWN_MAX
    tcp_abuse_clients: int = DEFAULT_PENALTY_CLIENTS
    rrl: RrlConfig = field(default_factory=RrlConfig)
    workers: int = 1
    batch_io: bool = True
    query_log: bool = False
    metrics_host: str = "127.0.0.1"
    metrics_port: int = -1
    port_file: Path | None = None
    state_dir: Path | None = None  # with --coordinator: the last view is saved here and served at start
    state_max_age: float = 0.0  # seconds; a saved view older than this is not served at start (0: any age)
    resync_hold: float = 15.0  # seconds a snapshot's emptied region keeps its previous gateways (0: off)
    log_level: str = "info"
    log_format: str = "json"

    def __post_init__(self) -> None:
        if (self.state is None) == (not self.coordinators):
            raise ValidationError("--state/--coordinator", "give exactly one: a static state file or coordinator addresses")
        if self.coordinators:
            if not self.zone_overrides.get("name"):
                raise ValidationError("--zone", "is required with --coordinator")
            if not self.insecure and not (self.tls_ca and self.tls_cert and self.tls_key):
                raise ValidationError("--tls-ca/--tls-cert/--tls-key", "are required unless --insecure")
        if self.state is not None and not self.state.is_file():
            raise ValidationError("--state", f"{self.state} is not a file")
        if self.geoip_db is None:
            raise ValidationError("--geoip-db", "no database given and the maxminddb-geolite2 package is not installed")
        if not self.geoip_db.is_file():
            raise ValidationError("--geoip-db", f"{self.geoip_db} is not a file")
        if not 512 <= self.udp_payload <= MAX_UDP_PAYLOAD:
            raise ValidationError("--edns-payload", f"{self.udp_payload} is outside 512-{MAX_UDP_PAYLOAD}")
        if self.cache_size < 0:
            raise ValidationError("--cache-size", "must be >= 0")
        if self.cache_bytes != 0 and not MIN_CACHE_BYTES <= self.cache_bytes <= MAX_CACHE_BYTES:
            raise ValidationError("--cache-bytes", f"{self.cache_bytes} is outside {MIN_CACHE_BYTES}-"
                                  f"{MAX_CACHE_BYTES} (or 0 to disable caching)")
        if self.geoip_poll != 0 and not 0.1 <= self.geoip_poll <= 86400:
            raise ValidationError("--geoip-poll", f"{self.geoip_poll} is outside 0.1-86400 seconds (or 0: never)")
        if not 0.1 <= self.tcp_idle_timeout <= 3600:
            raise ValidationError("--tcp-idle-timeout", f"{self.tcp_idle_timeout} is outside 0.1-3600 seconds")
        if not 1 <= self.tcp_max_connections <= 1_000_000:
            raise ValidationError("--tcp-max-connections", "must be 1-1000000")
        if self.tcp_max_per_client is not None and not 1 <= self.tcp_max_per_client <= self.tcp_max_connections:
            raise ValidationError("--tcp-max-per-client", f"{self.tcp_max_per_client} is outside "
                                  f"1-{self.tcp_max_connections} (--tcp-max-connections)")
        if self.tcp_abuse_cooldown != 0 and not 0.01 <= self.tcp_abuse_cooldown <= 3600:
            raise ValidationError("--tcp-abuse-cooldown", f"{self.tcp_abuse_cooldown} is outside 0.01-3600 "
                                  "seconds (or 0 to disable the penalty box)")
        if not max(self.tcp_abuse_cooldown, 0.01) <= self.tcp_abuse_cooldown_max <= 86400:
            raise ValidationError("--tcp-abuse-cooldown-max", f"{self.tcp_abuse_cooldown_max} is outside "
                                  f"{max(self.tcp_abuse_cooldown, 0.01)}-86400 seconds (at least --tcp-abuse-cooldown)")
        if not 1 <= self.tcp_abuse_clients <= 10_000_000:
            raise ValidationError("--tcp-abuse-clients", f"{self.tcp_abuse_clients} is outside 1-10000000")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ValidationError("--workers", f"{self.workers} is outside 1-{MAX_WORKERS}")
        if self.workers > 1 and any(port == 0 for _, port in self.listen) and len(self.listen) > 1:
            raise ValidationError("--listen", "with --workers > 1 and several addresses, give explicit ports")
        v.dns_label("--name", self.name)
        if self.announce_address:
            if not self.coordinators:
                raise ValidationError("--announce-address", "is for --coordinator (it is announced on the routing feed)")
            object.__setattr__(self, "announce_address", v.query_address("--announce-address", self.announce_address))
        if self.state_dir is not None and not self.coordinators:
            raise ValidationError("--state-dir", "is for --coordinator (a --state file is already on disk)")
        if self.state_max_age < 0 or self.state_max_age > 10 * 365 * 86400:
            raise ValidationError("--state-max-age", f"{self.state_max_age} is outside 0 (any age)-315360000 seconds")
        if not 0 <= self.resync_hold <= 3600:
            raise ValidationError("--resync-hold", f"{self.resync_hold} is outside 0-3600 seconds")
        if self.zone_overrides.get("default_region"):
            v.dns_label("--default-region", self.zone_overrides["default_region"])

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> Config:
        a = parser().parse_args(argv)
        listen = tuple(parse_listen("--listen", x) for x in (a.listen or ["0.0.0.0:53"]))
        coordinators = tuple(t.strip() for item in a.coordinator for t in item.split(",") if t.strip())
        zone_name = v.fqdn("--zone", a.zone) if a.zone else None
        nameservers = None
        if a.ns:
            if not zone_name and a.state is None:
                raise ValidationError("--ns", "needs --zone")
            try:
                nameservers = [NameServer.parse(spec, zone_name or "") if zone_name else spec for spec in a.ns]
            except ValidationError as exc:
                raise ValidationError("--ns", exc.message) from None
        overrides = {"name": zone_name, "nameservers": nameservers, "soa_rname": a.soa_rname, "ttl": a.ttl,
                     "negative_ttl": a.negative_ttl, "ns_ttl": a.ns_ttl, "default_region": a.default_region}
        rrl = RrlConfig(a.rrl_rate, a.rrl_window, a.rrl_slip, a.rrl_ipv4_prefix, a.rrl_ipv6_prefix)
        return cls(
            listen=listen, state=a.state, coordinators=coordinators, tls_ca=a.tls_ca, tls_cert=a.tls_cert,
            tls_key=a.tls_key, insecure=a.insecure, name=a.name, announce_address=a.announce_address or "",
            zone_overrides=overrides,
            geoip_db=a.geoip_db or default_database(), udp_payload=a.edns_payload, cache_size=a.cache_size,
            cache_bytes=a.cache_bytes, reply_cache=not a.no_reply_cache, region_map=not a.no_region_map,
            geoip_poll=a.geoip_poll, tcp_idle_timeout=a.tcp_idle_timeout,
            tcp_max_connections=a.tcp_max_connections, tcp_max_per_client=a.tcp_max_per_client,
            tcp_abuse_cooldown=a.tcp_abuse_cooldown, tcp_abuse_cooldown_max=a.tcp_abuse_cooldown_max,
            tcp_abuse_clients=a.tcp_abuse_clients, rrl=rrl,
            workers=a.workers, batch_io=not a.no_batch_io, query_log=a.query_log,
            metrics_host=a.metrics_host, metrics_port=a.metrics_port, port_file=a.port_file,
            state_dir=a.state_dir, state_max_age=a.state_max_age, resync_hold=a.resync_hold,
            log_level=a.log_level, log_format=a.log_format,
        )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="geomesh-dns",
        description="geomesh GeoDNS: an authoritative DNS server answering each client with the "
                    "gateways of the nearest healthy region that hosts the app. Runs from the "
                    "coordinator's routing feed (--coordinator) or from a static TOML state file (--state).",
        epilog="Zone flags (--zone, --ns, --soa-rname, --ttl, --negative-ttl, --ns-ttl, --default-region) "
               "override the state file's [zone] table. See docs/geodns.md for the state file format "
               "and the metrics.")
    src = p.add_argument_group("where the routing table comes from (exactly one)")
    src.add_argument("--state", type=Path, metavar="FILE",
                     help="static TOML state file (zone, regions with gateways, apps); re-read on SIGHUP")
    src.add_argument("--coordinator", action="append", default=[], metavar="HOST:PORT",
                     help="coordinator address for the RoutingFeed stream; repeat or comma-separate "
                          "replicas (rotated on failure); unix:/path works too")
    src.add_argument("--tls-ca", type=Path, metavar="PEM", help="CA certificate of the geomesh PKI")
    src.add_argument("--tls-cert", type=Path, metavar="PEM", help="this server's certificate (role dns)")
    src.add_argument("--tls-key", type=Path, metavar="PEM", help="this server's private key")
    src.add_argument("--insecure", action="store_true",
                     help="plaintext to an --insecure coordinator (loopback demos only)")
    src.add_argument("--name", default="dns", help="this server's name as a dns identity (default %(default)s)")
    src.add_argument("--announce-address", metavar="HOST:PORT",
                     help="with --coordinator: the address (ip:port, [v6]:port) where the coordinator can query this "
                          "server over UDP, announced on the routing feed under this server's identity name (the "
                          "certificate's CN; --name with --insecure) while the feed is open, so that an ACME "
                          "challenge is validated only once every live server answers it (default: the first "
                          "--listen address; needed when that is 0.0.0.0 or [::], which is not announced)")
    src.add_argument("--state-dir", type=Path, metavar="DIR",
                     help="with --coordinator: save the last routing view here (geodns.state, atomic, checksummed) "
                          "and answer from it at start while no coordinator answers (docs/static-stability.md)")
    src.add_argument("--state-max-age", type=float, default=0.0, metavar="SECONDS",
                     help="a saved view older than this is not served at start; 0 = any age (default %(default)s)")
    src.add_argument("--resync-hold", type=float, default=15.0, metavar="SECONDS",
                     help="when a snapshot leaves a region with no routable gateway while it had some (a "
                          "restarted coordinator before the gateways reconnected), keep answering its previous "
                          "gateways this long or until one is back; 0 = off (default %(default)s)")

    zone = p.add_argument_group("zone")
    zone.add_argument("--zone", help="the zone served, e.g. geo.example.com (required with --coordinator)")
    zone.add_argument("--ns", action="append", metavar="NAME[=ADDR,...]",
                      help="a name server of the zone with its addresses (glue); repeat for several; "
                           "a NAME without a dot is taken inside the zone (default ns1.<zone>)")
    zone.add_argument("--soa-rname", help="SOA mailbox as a name (default hostmaster.<zone>)")
    zone.add_argument("--ttl", type=int, help="TTL of A/AAAA answers in seconds (default 30)")
    zone.add_argument("--negative-ttl", type=int,
                      help="SOA minimum = TTL of NXDOMAIN/NODATA answers in seconds (default 30)")
    zone.add_argument("--ns-ttl", type=int, help="TTL of NS records and name server addresses (default 3600)")
    zone.add_argument("--default-region",
                      help="region answering clients the GeoIP database cannot place (private or unknown "
                           "addresses); without it such clients get the first region by name")

    dns = p.add_argument_group("serving")
    dns.add_argument("--listen", action="append", metavar="HOST:PORT",
                     help="UDP and TCP address to serve on; repeat for several; port 0 picks a free port "
                          "(the same for UDP and TCP) (default 0.0.0.0:53)")
    dns.add_argument("--port-file", type=Path, metavar="FILE", help="write the bound port here once serving")
    dns.add_argument("--geoip-db", type=Path, metavar="MMDB",
                     help="GeoIP2/GeoLite2 City database (default: GeoLite2-City.mmdb of the "
                          "maxminddb-geolite2 package)")
    dns.add_argument("--edns-payload", type=int, default=DEFAULT_UDP_PAYLOAD,
                     help="largest UDP reply to EDNS queries, advertised in OPT (default %(default)s; "
                          "without EDNS 512); larger answers are sent with TC set")
    dns.add_argument("--cache-size", type=int, default=DEFAULT_CACHE_SIZE,
                     help="entries in each of the two answer caches; full, a cache evicts its older "
                          "half, not what is still asked for; emptied when the table changes; "
                          "0 disables caching (default %(default)s)")
    dns.add_argument("--cache-bytes", type=int, default=DEFAULT_CACHE_BYTES,
                     help="bytes both answer caches may hold together per process (accounted: what the "
                          "entries hold plus an estimate of their overhead); 0 disables caching "
                          f"(default %(default)s = {DEFAULT_CACHE_BYTES >> 20} MiB)")
    dns.add_argument("--no-reply-cache", action="store_true",
                     help="switch off the reply cache (complete replies kept by the query's bytes, patched with "
                          "the ID): every answer is assembled from its template, so every answer rotates")
    dns.add_argument("--no-region-map", action="store_true",
                     help="do not compile the GeoIP database into the region map; place each client with a "
                          "City look-up (memoised) instead")
    dns.add_argument("--geoip-poll", type=float, default=DEFAULT_GEOIP_POLL, metavar="SECONDS",
                     help="check the GeoIP database file (inode, size, mtime) this often and rebuild the region "
                          "map from it when it changed; 0 never (default %(default)s)")
    dns.add_argument("--tcp-idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT,
                     help="close a TCP connection after this many seconds without a query (default %(default)s)")
    dns.add_argument("--tcp-max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                     help="concurrent TCP connections per process; more are reset at once (default %(default)s)")
    dns.add_argument("--tcp-max-per-client", type=int, default=None, metavar="N",
                     help="concurrent TCP connections per process from one client (an IPv4 address or an "
                          "IPv6 /56); more are reset at once (default: a tenth of --tcp-max-connections, "
                          f"{default_per_client(DEFAULT_MAX_CONNECTIONS)} of {DEFAULT_MAX_CONNECTIONS})")
    dns.add_argument("--tcp-abuse-cooldown", type=float, default=DEFAULT_ABUSE_COOLDOWN, metavar="SECONDS",
                     help="a TCP message no query can be (over 1024 octets, answer/authority records, more than "
                          "two additional records) gets FORMERR and its connection is closed; its client's new "
                          "connections are then reset for this long, doubled on each repeat offence; 0 disables "
                          "the cool-down, not the close (default %(default)s)")
    dns.add_argument("--tcp-abuse-cooldown-max", type=float, default=DEFAULT_ABUSE_COOLDOWN_MAX, metavar="SECONDS",
                     help="where the doubling stops; a client clean for this long after its cool-down starts "
                          "over (default %(default)s)")
    dns.add_argument("--tcp-abuse-clients", type=int, default=DEFAULT_PENALTY_CLIENTS, metavar="N",
                     help="clients the penalty box remembers per process; the least recent offender is "
                          "forgotten first (default %(default)s)")
    dns.add_argument("--workers", type=int, default=1,
                     help="processes serving the same port with SO_REUSEPORT (default %(default)s)")
    dns.add_argument("--no-batch-io", action="store_true",
                     help="use one recvfrom/sendto per packet instead of recvmmsg/sendmmsg batches")

    rrl = p.add_argument_group("response rate limiting (off by default)")
    rrl.add_argument("--rrl-rate", type=float, default=0.0,
                     help="UDP responses per second per client network; 0 disables RRL (default %(default)s)")
    rrl.add_argument("--rrl-window", type=float, default=15.0,
                     help="seconds of debt a flooding network must work off (default %(default)s)")
    rrl.add_argument("--rrl-slip", type=int, default=2,
                     help="send every Nth limited response truncated (TC) instead of dropping it; "
                          "0 drops all (default %(default)s)")
    rrl.add_argument("--rrl-ipv4-prefix", type=int, default=24, help="IPv4 client network size (default /%(default)s)")
    rrl.add_argument("--rrl-ipv6-prefix", type=int, default=56, help="IPv6 client network size (default /%(default)s)")

    ops = p.add_argument_group("operations")
    ops.add_argument("--query-log", action="store_true",
                     help="log every query as a structured line (off by default; costs throughput)")
    ops.add_argument("--metrics-host", default="127.0.0.1", help="Prometheus metrics bind address (default %(default)s)")
    ops.add_argument("--metrics-port", type=int, default=-1,
                     help="Prometheus metrics port; -1 disables, 0 picks one (default %(default)s)")
    ops.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                     help="log level (default %(default)s)")
    ops.add_argument("--log-format", default="json", choices=["json", "text"], help="log format (default %(default)s)")
    return p
