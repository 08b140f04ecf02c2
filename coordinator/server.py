"""The coordinator process: etcd cache + gRPC server, started and stopped in one order.

`CoordinatorConfig` has no side effects; `Coordinator.start()` connects to etcd, loads the cache
(waiting for etcd if it is not up yet), starts the single watch, the lease keepalive stream and
the reachability decider (`coordinator.reach_decider`), then serves Admin, GatewayControl, RoutingFeed, reflection and grpc.health.v1 with mTLS (or
plaintext on loopback when --insecure was asked for). With mTLS it reads the CA certificate and
its own serving certificate and key from --pki-dir and never issues one (a coordinator host needs
no ca.key; `geomesh pki init` makes the serving certificate offline). `coordinator.access` judges
every caller and ends the streams of revoked or unenrolled ones; writes are audit lines
(`coordinator.audit`, also appended to --audit-log). `stop()` follows the house shutdown order:
health NOT_SERVING, stop accepting, drain streams with a deadline, cancel the rest, release leases.
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import logging
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Gauge

from coordinator import audit
from coordinator.access import Access
from coordinator.acme_orders import AcmeSettings, ZoneCertificates
from coordinator.cert_requests import CertificateRequests, RequestLimits
from coordinator.dns_servers import Announcer
from coordinator.domain_txt import DomainTxt, resolver_address
from coordinator.fanout import Fanout
from coordinator.http01 import Http01Challenges
from coordinator.on_demand_orders import OnDemandOrders
from coordinator.operations import Operations
from coordinator.pinned_domains import PinnedDomains, VerifyPolicy
from coordinator.reach_decider import ReachDecider
from coordinator.reachability import DEFAULT_MAX_SHARE
from coordinator.rpc_common import quiet_client_gone
from coordinator.services import AdminService, GatewayControlService, RoutingFeedService, add_services
from coordinator.state import PREFIX, State
from coordinator.store import Compacted, EtcdConfig, EtcdStore, LeaseSet, ReplicaLease
from geomesh import validate
from geomesh.api import geomesh_pb2 as pb
from geomesh.errors import StoreUnavailableError, ValidationError
from geomesh.pki import Pki
from geomesh.sealing import SealError, SecretBox

log = logging.getLogger("geomesh.coordinator")

CACHE_REVISION = Gauge("geomesh_coordinator_cache_revision", "etcd revision of the coordinator's cache")
ETCD_UP = Gauge("geomesh_coordinator_etcd_connected", "1 while the coordinator's watch on etcd is healthy")
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
LARGE_BLOCK = 128 * 1024
SERVICE_NAMES = tuple(pb.DESCRIPTOR.services_by_name[s].full_name for s in ("Admin", "GatewayControl", "RoutingFeed"))


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    etcd: str = "127.0.0.1:2379"
    listen: str = "127.0.0.1:7443"
    pki_dir: Path | None = None
    insecure: bool = False
    mesh_cidr: str = "10.88.0.0/16"
    lease_ttl: int = 3
    metrics_host: str = "127.0.0.1"
    metrics_port: int = -1  # -1: off
    server_hosts: tuple[str, ...] = field(default_factory=tuple)
    etcd_timeout: float = 2.0
    listen_unix: Path | None = None  # also serve on this unix socket (reachable from other netns)
    watch_send_timeout: float = 30.0  # a Watch stream whose client takes no message for this long is dropped
    health_write_interval: float = 1.0  # at most one health write batch per gateway per interval
    heartbeat_rate: float = 20.0  # heartbeats per second and gateway looked at (burst: twice that)
    reach_max_unreachable_share: float = DEFAULT_MAX_SHARE  # panic threshold: at most this share unreachable
    reach_vote_write_rate: float = 5.0  # votes/<prober> writes per second and gateway (burst: twice that)
    allow_loopback_instances: bool = False  # instance addresses on 127.0.0.0/8, ::1 (tests, loopback lab)
    audit_log: Path | None = None  # also append the audit lines (JSON) to this file
    etcd_ca: Path | None = None  # etcd: CA that signed the members' certificates (TLS)
    etcd_cert: Path | None = None  # etcd: our client certificate and key
    etcd_key: Path | None = None
    acme: AcmeSettings | None = None  # obtain the zone's certificate by ACME DNS-01 (docs/certificates.md)
    secrets_key: Path | None = None  # the replicas' shared key for what rests sealed in etcd (default <pki-dir>/secrets.key)
    resolver: str = ""  # recursive resolver ip:port for custom domains' TXT records ("": pinned domains stay pending)
    resolver_timeout: float = 1.0  # seconds per UDP try (two tries, one TCP try when truncated)
    domain_policy: VerifyPolicy = VerifyPolicy()  # when pinned domains' TXT records are checked
    cert_requests: RequestLimits = RequestLimits()  # gateways' requests for certificates on demand

    @property
    def secrets_path(self) -> Path | None:
        if self.secrets_key is not None:
            return self.secrets_key
        return self.pki_dir / "secrets.key" if self.pki_dir is not None else None

    @property
    def etcd_config(self) -> EtcdConfig:
        """`etcd` (comma-separated endpoints) with the TLS files; raises ValidationError naming the field."""
        return EtcdConfig.parse(self.etcd, ca=self.etcd_ca, cert=self.etcd_cert, key=self.etcd_key)

    def __post_init__(self) -> None:
        _ = self.etcd_config
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit():
            raise ValidationError("listen", f"{self.listen!r} is not host:port")
        if self.insecure:
            try:
                loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
            except ValueError:
                loopback = host == "localhost"
            if not loopback:
                raise ValidationError("insecure", "plaintext is allowed only on a loopback address")
        elif self.pki_dir is None:
            raise ValidationError("pki_dir", "is required unless --insecure (loopback demos only)")
        validate.cidr("mesh_cidr", self.mesh_cidr)
        if not 1 <= self.lease_ttl <= 60:
            raise ValidationError("lease_ttl", "must be 1..60 seconds")
        if self.acme is not None and self.secrets_path is None:
            raise ValidationError("secrets_key", "is required with --acme-directory (or --pki-dir, which holds secrets.key)")
        if not 1 <= self.watch_send_timeout <= 3600:
            raise ValidationError("watch_send_timeout", "must be 1..3600 seconds")
        if not 0.05 <= self.health_write_interval <= 60:
            raise ValidationError("health_write_interval", "must be 0.05..60 seconds")
        if not 1 <= self.heartbeat_rate <= 1000:
            raise ValidationError("heartbeat_rate", "must be 1..1000 per second")
        if not 0 <= self.reach_max_unreachable_share <= 1:
            raise ValidationError("reach_max_unreachable_share", "must be 0..1")
        if not 0.5 <= self.reach_vote_write_rate <= 100:
            raise ValidationError("reach_vote_write_rate", "must be 0.5..100 per second")
        if self.resolver:
            resolver_address(self.resolver)
        if not 0.1 <= self.resolver_timeout <= 30:
            raise ValidationError("resolver_timeout", "must be 0.1..30 seconds")


def return_large_blocks_on_free() -> bool:
    """Have malloc serve blocks over 128 KiB with mmap, so they go back to the OS when freed.

    grpc's core copies every message it sends (a snapshot per stream) into its own buffers; glibc
    raises its mmap threshold after the first such block is freed, so later ones land in the heap
    and the process kept ~40 MB per 200 snapshot-sized sends after the streams ended. A fixed
    threshold turns that off. False (nothing changed) where libc has no mallopt."""
    try:
        return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK))
    except (OSError, AttributeError):
        return False


class Coordinator:
    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self.store = EtcdStore(config.etcd_config, timeout=config.etcd_timeout)
        self.state = State(config.mesh_cidr)
        self.feed = Fanout(self.state)  # what the streams see of the cache
        self.leases = LeaseSet()
        self.lease = ReplicaLease(self.store, self.leases, config.lease_ttl)
        self.ops = Operations(self.store, self.state, allow_loopback_instances=config.allow_loopback_instances)
        self.decider = ReachDecider(self.state, self.ops, max_share=config.reach_max_unreachable_share)
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self.access: Access | None = None  # made in start(), over the final state and with the CA
        self._audit_handler: logging.Handler | None = None
        self.server: grpc.aio.Server | None = None
        self.gateway_control: GatewayControlService | None = None
        self.port = 0
        self._tasks: list[asyncio.Task] = []
        self._loaded = asyncio.Event()
        self.certificates: ZoneCertificates | None = None
        self.domain_txt: DomainTxt | None = None  # custom domains' TXT records (--resolver)
        self.pinned: PinnedDomains | None = None
        self.on_demand: OnDemandOrders | None = None  # custom domains' certificates (ACME and --resolver)

    async def start(self) -> int:
        cfg = self.config
        # the PKI first: a missing certificate is a configuration error, not a wait for etcd
        identity, ca_cert = None, None
        if not cfg.insecure:
            assert cfg.pki_dir is not None
            pki = Pki(cfg.pki_dir)
            try:
                identity = pki.serving(cfg.server_hosts)
                ca_cert = x509.load_pem_x509_certificate(pki.ca_cert_path.read_bytes())
            except (FileNotFoundError, ValueError) as exc:
                raise ValidationError("pki_dir", str(exc)) from None
            if pki.ca_key_path.exists():
                log.warning("the CA key is on this host: a coordinator needs only ca.pem and server/; keep "
                            "ca.key where certificates are issued", extra={"fields": {"path": str(pki.ca_key_path)}})
        return_large_blocks_on_free()
        self._tasks.append(asyncio.create_task(self._watch_loop(), name="etcd-watch"))
        self._tasks.append(asyncio.create_task(
            self.store.keepalive_forever(self.leases, max(cfg.lease_ttl / 3, 0.3)), name="lease-keepalive"))
        await self._loaded.wait()
        self._tasks.append(asyncio.create_task(self.decider.run(), name="reach-decider"))
        secrets = None
        if cfg.acme is not None:
            assert cfg.secrets_path is not None
            try:
                secrets = SecretBox.load_or_create(cfg.secrets_path)
            except (OSError, SealError) as exc:
                raise ValidationError("secrets_key", f"{cfg.secrets_path}: {exc}") from None
            self.certificates = ZoneCertificates(cfg.acme, self.store, self.state, self.lease, secrets)
            self._tasks.append(asyncio.create_task(self.certificates.run(), name="zone-certificate"))
        if cfg.resolver:
            self.domain_txt = DomainTxt.at(cfg.resolver, timeout=cfg.resolver_timeout)
            self.pinned = PinnedDomains(self.store, self.state, self.ops, self.lease, self.domain_txt,
                                        cfg.domain_policy)
            self._tasks.append(asyncio.create_task(self.pinned.run(), name="pinned-domains"))
        else:
            log.warning("no --resolver: pinned domains (AddDomain) stay pending and are not routed, and no "
                        "certificate is ordered for a custom domain")

        server = grpc.aio.server(options=[
            ("grpc.keepalive_time_ms", 5000),
            ("grpc.keepalive_timeout_ms", 3000),
            ("grpc.http2.min_ping_interval_without_data_ms", 1000),
            ("grpc.keepalive_permit_without_calls", 1),
        ])
        self.access = Access(self.state, insecure=cfg.insecure, ca=ca_cert)
        quiet_client_gone()
        if cfg.audit_log is not None:
            self._audit_handler = audit.add_file(cfg.audit_log)
        self._tasks.append(asyncio.create_task(self.access.run(), name="access"))
        self.gateway_control = GatewayControlService(
            self.feed, self.state, self.ops, self.store, self.lease, self.access,
            lease_ttl=cfg.lease_ttl, mesh_cidr=cfg.mesh_cidr,
            health_interval=cfg.health_write_interval,
            heartbeat_rate=cfg.heartbeat_rate, vote_write_rate=cfg.reach_vote_write_rate, secrets=secrets)
        if self.certificates is not None and cfg.acme is not None:  # HTTP-01 through every gateway
            self.certificates.http01 = Http01Challenges(self.store, self.state, self.lease, self.gateway_control.stats,
                                                        grace=cfg.acme.http01_grace,
                                                        deadline=cfg.acme.propagation_deadline)
        # certificates on demand for custom domains: the gateways ask, the ordering leader orders
        self.gateway_control.cert_requests = CertificateRequests(
            self.store, self.state, zone=cfg.acme.zone if cfg.acme is not None else None, txt=self.domain_txt,
            limits=cfg.cert_requests)
        if self.certificates is not None and self.domain_txt is not None:
            self.on_demand = OnDemandOrders(self.certificates, self.state, self.domain_txt,
                                            verify_interval=cfg.domain_policy.interval)
            self._tasks.append(asyncio.create_task(self.on_demand.run(), name="on-demand-certificates"))
        add_services(server, AdminService(self.feed, self.ops, self.access, stats=self.gateway_control.stats),
                     RoutingFeedService(self.feed, self.ops, self.access, send_timeout=cfg.watch_send_timeout,
                                        announcer=Announcer(self.store, self.lease)),
                     self.gateway_control)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        if cfg.insecure:
            self.port = server.add_insecure_port(cfg.listen)
        else:
            assert identity is not None
            ca, cert, key = identity.read()
            creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
            self.port = server.add_secure_port(cfg.listen, creds)
        if self.port == 0:
            raise OSError(f"could not listen on {cfg.listen}")
        if cfg.listen_unix is not None:
            cfg.listen_unix.unlink(missing_ok=True)
            target = f"unix:{cfg.listen_unix}"
            ok = server.add_insecure_port(target) if cfg.insecure else server.add_secure_port(target, creds)
            if not ok:
                raise OSError(f"could not listen on {target}")
        await server.start()
        self.server = server
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("coordinator serving", extra={"fields": {"port": self.port, "etcd": cfg.etcd,
                                                           "revision": self.state.revision, "tls": not cfg.insecure}})
        return self.port

    async def _watch_loop(self) -> None:
        """The one watch: load a snapshot, then follow every revision; reload on compaction."""
        need_snapshot = True
        backoff = 0.1
        while True:
            try:
                if need_snapshot:
                    revision, kvs = await self.store.get_prefix(PREFIX)
                    self.state.load(revision, kvs)
                    need_snapshot = False
                    log.info("cache loaded", extra={"fields": {"revision": revision, "keys": len(kvs)}})
                    self._loaded.set()
                ETCD_UP.set(1)
                async for item in self.store.watch_prefix(PREFIX, self.state.revision + 1):
                    if isinstance(item, Compacted):
                        log.warning("watch revision compacted: reloading", extra={"fields": {"compact_revision": item.compact_revision}})
                        need_snapshot = True
                        break
                    self.state.apply_batch(item)
                    CACHE_REVISION.set(self.state.revision)
                    backoff = 0.1
            except asyncio.CancelledError:
                raise
            except StoreUnavailableError as exc:
                ETCD_UP.set(0)
                log.warning("etcd unavailable; serving from cache", extra={"fields": {"error": str(exc), "revision": self.state.revision}})
            except Exception:
                ETCD_UP.set(0)
                log.exception("watch loop error")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def stop(self, grace: float = 2.0) -> None:
        await self.health.enter_graceful_shutdown()
        if self.gateway_control is not None:
            # a planned stop empties nothing: the sessions end without deleting alive/<g>, and the
            # lease is not revoked but left to expire (lease_ttl), so each gateway reconnects to
            # another replica (or this one restarted) and rewrites its alive key before then
            self.gateway_control.planned_stop = True
        if self.server is not None:
            await self.server.stop(grace)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.lease.id is not None:
            log.info("stopping: replica lease left to expire", extra={"fields": {"ttl_s": self.config.lease_ttl}})
        await self.store.close()
        if self._audit_handler is not None:
            audit.log.removeHandler(self._audit_handler)
            self._audit_handler.close()
