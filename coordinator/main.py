"""`geomesh-coordinator`: command line and process lifecycle of the coordinator."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import uvloop

from coordinator.acme_orders import AcmeSettings
from coordinator.cert_requests import RequestLimits
from coordinator.pinned_domains import VerifyPolicy
from coordinator.renewal import DAY, RenewalPolicy
from coordinator.server import Coordinator, CoordinatorConfig
from geomesh import logs, metrics
from geomesh.errors import ValidationError

DEFAULT_ETCD = "127.0.0.1:2379"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="geomesh-coordinator",
        description="geomesh coordinator: the gRPC control plane (Admin, GatewayControl, RoutingFeed) over etcd. "
                    "Run several replicas against one etcd cluster; they agree through etcd.")
    p.add_argument("--etcd", action="append", metavar="ENDPOINT[,ENDPOINT...]",
                   help="etcd members' client endpoints, host:port or https://host:port; comma-separated "
                        "and/or repeated, every member of the cluster (the coordinator fails over between "
                        f"them); default {DEFAULT_ETCD}")
    p.add_argument("--etcd-ca", type=Path, metavar="PEM",
                   help="CA certificate that signed the etcd members' server certificates; turns TLS on "
                        "(without it, https:// endpoints are checked against the system's roots)")
    p.add_argument("--etcd-cert", type=Path, metavar="PEM", help="client certificate for etcd (with --etcd-key)")
    p.add_argument("--etcd-key", type=Path, metavar="PEM", help="private key of --etcd-cert")
    p.add_argument("--listen", default="127.0.0.1:7443",
                   help="gRPC listen address host:port; port 0 picks a free port (default %(default)s)")
    p.add_argument("--listen-unix", type=Path, metavar="PATH",
                   help="also serve on this unix socket (same TLS rules); lets processes in other network "
                        "namespaces on this host reach the coordinator without any route")
    p.add_argument("--pki-dir", type=Path, help="PKI directory made by `geomesh pki init`: ca.pem and "
                   "server/ (the coordinator's certificate and key); ca.key is not needed. Required unless --insecure")
    p.add_argument("--insecure", action="store_true",
                   help="serve plaintext without client certificates; only allowed on a loopback address, "
                        "for demos. Callers name themselves with the x-geomesh-identity header (default admin)")
    p.add_argument("--server-host", action="append", default=[], metavar="HOST",
                   help="a DNS name or IP the serving certificate must cover; checked at start, never issued here "
                        "(reissue it with `geomesh pki server --server-host`) (repeatable)")
    p.add_argument("--mesh-cidr", default="10.88.0.0/16", help="range the gateways' mesh IPs come from (default %(default)s)")
    p.add_argument("--lease-ttl", type=int, default=3,
                   help="seconds a gateway stays alive after its coordinator loses contact (default %(default)s)")
    p.add_argument("--etcd-timeout", type=float, default=2.0, help="deadline of each etcd call in seconds (default %(default)s)")
    p.add_argument("--watch-send-timeout", type=float, default=30.0,
                   help="a RoutingFeed.Watch client that takes no message for this many seconds is dropped "
                        "(default %(default)s); gateway sessions use 1.5 x --lease-ttl")
    p.add_argument("--health-write-interval", type=float, default=1.0,
                   help="at most one etcd write of heartbeat health per gateway per interval, seconds (default %(default)s)")
    p.add_argument("--heartbeat-rate", type=float, default=20.0,
                   help="heartbeats per second per gateway whose content is looked at; the rest are counted "
                        "and ignored (default %(default)s, burst twice that)")
    p.add_argument("--reach-max-unreachable-share", type=float, default=0.5,
                   help="panic threshold: at most this share of all gateways is ever decided unreachable; past "
                        "it the rest are held reachable, logged and counted (default %(default)s)")
    p.add_argument("--reach-vote-write-rate", type=float, default=5.0,
                   help="at most this many etcd writes of one gateway's probe votes per second, burst twice "
                        "that; a change waits for the next token (default %(default)s)")
    p.add_argument("--allow-loopback-instances", action="store_true",
                   help="accept app instances on loopback addresses (127.0.0.0/8, ::1); for tests and the loopback "
                        "lab, where gateway and instances share one host. Without it such an address is "
                        "INVALID_ARGUMENT (a gateway would proxy to itself)")
    p.add_argument("--audit-log", type=Path, metavar="PATH",
                   help="also append every write call's audit line (JSON: caller role, name, certificate serial, "
                        "method, key fields, code) to this file; they are always in the process log too")
    acme = p.add_argument_group("certificates (ACME DNS-01 through geomesh-dns; docs/certificates.md)")
    acme.add_argument("--acme-directory", metavar="URL",
                      help="ACME directory of the CA to obtain the zone's certificate from (off when absent)")
    acme.add_argument("--acme-zone", metavar="NAME", help="the zone to certify: <zone> and *.<zone> (required with --acme-directory)")
    acme.add_argument("--acme-email", default="", help="contact address for the ACME account (optional)")
    acme.add_argument("--acme-ca-bundle", type=Path, metavar="PEM",
                      help="CA certificates to trust for the ACME directory's HTTPS (default: the system's)")
    acme.add_argument("--acme-renew-before", type=float, default=30.0, metavar="DAYS",
                      help="renew this many days before the certificate expires (default %(default)s)")
    acme.add_argument("--acme-retry", type=float, default=30.0, metavar="SECONDS",
                      help="first retry after a failed order; doubles per failure (default %(default)s)")
    acme.add_argument("--acme-retry-max", type=float, default=3600.0, metavar="SECONDS",
                      help="longest wait between retries (default %(default)s)")
    acme.add_argument("--acme-check-interval", type=float, default=5.0, metavar="SECONDS",
                      help="how often each replica checks who orders and whether an order is due (default %(default)s)")
    acme.add_argument("--acme-http01-grace", type=float, default=1.0, metavar="SECONDS",
                      help="HTTP-01 orders (custom domains): after the gateways with a session on this replica "
                           "acked the challenges, wait this long for those on other replicas (default %(default)s)")
    acme.add_argument("--secrets-key", type=Path, metavar="PATH",
                      help="32-byte key every replica shares, sealing what rests in etcd (the ACME account and "
                           "certificate keys); made with mode 0600 when absent (default <pki-dir>/secrets.key)")
    domains = p.add_argument_group("custom domains (TXT records; docs/custom-domains.md)")
    domains.add_argument("--resolver", default="", metavar="IP:PORT",
                         help="recursive resolver that looks up custom domains' TXT records "
                              "(_geomesh-app-address.<domain>); without it pinned domains (AddDomain) stay pending "
                              "and no certificate is ordered for a custom domain")
    domains.add_argument("--resolver-timeout", type=float, default=1.0, metavar="SECONDS",
                         help="seconds per UDP try (two tries, then one TCP try when truncated) (default %(default)s)")
    domains.add_argument("--domain-verify-interval", type=float, default=600.0, metavar="SECONDS",
                         help="a verified pinned domain's TXT record is checked again this often; gone or naming "
                              "another app, the domain is pending again (default %(default)s)")
    domains.add_argument("--domain-pending-interval", type=float, metavar="SECONDS",
                         help="a pending domain is checked again after this, doubling per check up to "
                              "--domain-verify-interval (default 30, or --domain-verify-interval when shorter)")
    domains.add_argument("--cert-request-rate", type=float, default=1.0, metavar="PER_SECOND",
                         help="certificates on demand: requests per second one gateway may make that reach the TXT "
                              "check, burst twice that (at least 5); beyond, RESOURCE_EXHAUSTED (default %(default)s)")
    domains.add_argument("--cert-request-global-rate", type=float, default=10.0, metavar="PER_SECOND",
                         help="the same for all gateways together, per replica (default %(default)s)")
    domains.add_argument("--cert-request-max-pending", type=int, default=100, metavar="N",
                         help="certificate requests waiting for their order at most (default %(default)s)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="Prometheus metrics bind address (default %(default)s)")
    p.add_argument("--metrics-port", type=int, default=-1, help="Prometheus metrics port; -1 disables, 0 picks one (default %(default)s)")
    p.add_argument("--port-file", type=Path, help="write the bound gRPC port to this file once serving")
    p.add_argument("--no-uvloop", action="store_true", help="run on the stock asyncio event loop instead of uvloop")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log level (default %(default)s)")
    p.add_argument("--log-format", default="json", choices=["json", "text"], help="log format (default %(default)s)")
    return p


def acme_settings(args: argparse.Namespace) -> AcmeSettings | None:
    if not args.acme_directory:
        return None
    if not args.acme_zone:
        raise ValidationError("acme_zone", "is required with --acme-directory")
    return AcmeSettings(args.acme_directory, args.acme_zone, email=args.acme_email, ca_bundle=args.acme_ca_bundle,
                        policy=RenewalPolicy(renew_before=args.acme_renew_before * DAY, retry_base=args.acme_retry,
                                             retry_max=args.acme_retry_max),
                        check_interval=args.acme_check_interval, http01_grace=args.acme_http01_grace)


async def run(args: argparse.Namespace) -> None:
    config = CoordinatorConfig(etcd=",".join(args.etcd or [DEFAULT_ETCD]), etcd_ca=args.etcd_ca,
                               etcd_cert=args.etcd_cert, etcd_key=args.etcd_key, listen=args.listen,
                               pki_dir=args.pki_dir, insecure=args.insecure,
                               mesh_cidr=args.mesh_cidr, lease_ttl=args.lease_ttl, metrics_host=args.metrics_host,
                               metrics_port=args.metrics_port, server_hosts=tuple(args.server_host),
                               etcd_timeout=args.etcd_timeout, listen_unix=args.listen_unix,
                               watch_send_timeout=args.watch_send_timeout,
                               health_write_interval=args.health_write_interval, heartbeat_rate=args.heartbeat_rate,
                               reach_max_unreachable_share=args.reach_max_unreachable_share,
                               reach_vote_write_rate=args.reach_vote_write_rate, audit_log=args.audit_log,
                               allow_loopback_instances=args.allow_loopback_instances,
                               acme=acme_settings(args), secrets_key=args.secrets_key,
                               resolver=args.resolver, resolver_timeout=args.resolver_timeout,
                               domain_policy=VerifyPolicy(interval=args.domain_verify_interval,
                                                          pending=args.domain_pending_interval
                                                          if args.domain_pending_interval is not None
                                                          else min(30.0, args.domain_verify_interval)),
                               cert_requests=RequestLimits(gateway_rate=args.cert_request_rate,
                                                           global_rate=args.cert_request_global_rate,
                                                           max_pending=args.cert_request_max_pending))
    coordinator = Coordinator(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    port = await coordinator.start()
    metrics_port = metrics.serve(config.metrics_host, config.metrics_port)
    if args.port_file:
        args.port_file.write_text(f"{port}\n")
    print(f"geomesh-coordinator serving on port {port}" + (f", metrics on {metrics_port}" if metrics_port else ""),
          file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        await coordinator.stop()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    try:
        if args.no_uvloop:
            asyncio.run(run(args))
        else:
            uvloop.run(run(args))
    except ValidationError as exc:
        print(f"geomesh-coordinator: invalid configuration: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
