"""`geomesh-status`: command line, configuration and process lifecycle of the status page.

`StatusConfig` is built from flags and validated before anything starts (errors name the flag);
`run()` loads the TLS context, starts the HTTP(S) server, then follows the coordinator until
SIGINT or SIGTERM, and shuts down in order: stop following, stop accepting, close the viewers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from geomesh import logs, metrics
from geomesh.errors import ValidationError
from geomesh.pki import Identity, Pki
from status_page.board import Board
from status_page.follower import FollowConfig, Follower
from status_page.server import ServeConfig, StatusServer
from status_page.tls import page_certificate, server_context


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def _split_hostport(field: str, value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValidationError(field, f"{value!r} is not host:port")
    return host.strip("[]"), int(port)


@dataclass(frozen=True, slots=True)
class StatusConfig:
    coordinators: tuple[str, ...]
    listen: str = "127.0.0.1:8480"
    pki_dir: Path | None = None
    name: str = "status"
    insecure: bool = False        # plaintext to an --insecure coordinator
    insecure_http: bool = False   # serve plain HTTP (loopback only)
    cert: Path | None = None
    key: Path | None = None
    server_hosts: tuple[str, ...] = ()
    debounce: float = 0.2
    refresh: float = 30.0
    viewer_buffer: int = 256 * 1024
    stall_timeout: float = 30.0
    max_viewers: int = 1000
    head_timeout: float = 10.0

    def __post_init__(self) -> None:
        if not self.coordinators:
            raise ValidationError("coordinator", "at least one coordinator address is required")
        host, _ = _split_hostport("listen", self.listen)
        if self.insecure_http and not _is_loopback(host):
            raise ValidationError("insecure_http", "plain HTTP is allowed only on a loopback address")
        if self.pki_dir is None and not (self.insecure and self.insecure_http):
            raise ValidationError("pki_dir", "is required unless both --insecure and --insecure-http")
        if (self.cert is None) != (self.key is None):
            raise ValidationError("cert", "--cert and --key go together")
        if not 0.01 <= self.debounce <= 10:
            raise ValidationError("debounce", "must be 0.01..10 seconds")
        if not 1 <= self.refresh <= 3600:
            raise ValidationError("refresh", "must be 1..3600 seconds")
        try:
            self.serve_config()
        except ValueError as exc:
            field, _, why = str(exc).partition(" ")
            raise ValidationError(field, why) from None

    def serve_config(self) -> ServeConfig:
        host, port = _split_hostport("listen", self.listen)
        return ServeConfig(host=host, port=port, head_timeout=self.head_timeout, viewer_buffer=self.viewer_buffer,
                           stall_timeout=self.stall_timeout, max_viewers=self.max_viewers)

    def identity(self) -> Identity | None:
        """The admin identity the follower uses (issued in the PKI on first use)."""
        if self.pki_dir is None:
            return None
        return Pki(self.pki_dir).identity("admin", self.name)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="geomesh-status",
        description="geomesh status page: follows the coordinator (RoutingFeed.Watch, one Admin/GetOverview "
                    "per change) and serves a live page over HTTPS with the geomesh PKI. See docs/status-page.md.")
    p.add_argument("--coordinator", action="append", default=[], metavar="HOST:PORT",
                   help="coordinator address; repeat or comma-separate replicas (rotated on failure)")
    p.add_argument("--pki-dir", type=Path, help="geomesh PKI directory: the admin identity to follow with and "
                   "the page's serving certificate come from it (required unless --insecure and --insecure-http)")
    p.add_argument("--name", default="status", help="name of the admin identity (default %(default)s)")
    p.add_argument("--insecure", action="store_true", help="plaintext to an --insecure coordinator (loopback demos)")
    p.add_argument("--listen", default="127.0.0.1:8480", help="page address host:port; port 0 picks one "
                   "(default %(default)s)")
    p.add_argument("--insecure-http", action="store_true",
                   help="serve plain HTTP to anyone who can connect; only on a loopback --listen")
    p.add_argument("--cert", type=Path, help="serving certificate PEM (default: issued from the PKI)")
    p.add_argument("--key", type=Path, help="its private key PEM")
    p.add_argument("--server-host", action="append", default=[], metavar="HOST",
                   help="extra DNS name or IP for the issued serving certificate (repeatable)")
    p.add_argument("--debounce", type=float, default=0.2,
                   help="seconds between two GetOverview calls however fast changes come (default %(default)s)")
    p.add_argument("--refresh", type=float, default=30.0,
                   help="GetOverview at least this often, in seconds, changes or not (default %(default)s)")
    p.add_argument("--viewer-buffer", type=int, default=256 * 1024,
                   help="bytes unsent to one viewer before it is sent nothing more (default %(default)s)")
    p.add_argument("--stall-timeout", type=float, default=30.0,
                   help="a viewer over --viewer-buffer for this many seconds is dropped (default %(default)s)")
    p.add_argument("--max-viewers", type=int, default=1000,
                   help="event streams open at once; more get 503 (default %(default)s)")
    p.add_argument("--head-timeout", type=float, default=10.0,
                   help="seconds a client has to send its request head; then 408 (default %(default)s)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="Prometheus metrics bind address (default %(default)s)")
    p.add_argument("--metrics-port", type=int, default=-1,
                   help="Prometheus metrics port; -1 disables, 0 picks one (default %(default)s)")
    p.add_argument("--port-file", type=Path, help="write the bound page port to this file once serving")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="json", choices=["json", "text"])
    return p


def config_of(args: argparse.Namespace) -> StatusConfig:
    coordinators = tuple(t.strip() for item in args.coordinator for t in item.split(",") if t.strip())
    return StatusConfig(coordinators=coordinators, listen=args.listen, pki_dir=args.pki_dir, name=args.name,
                        insecure=args.insecure, insecure_http=args.insecure_http, cert=args.cert, key=args.key,
                        server_hosts=tuple(args.server_host), debounce=args.debounce, refresh=args.refresh,
                        viewer_buffer=args.viewer_buffer, stall_timeout=args.stall_timeout,
                        max_viewers=args.max_viewers, head_timeout=args.head_timeout)


def url_of(config: StatusConfig, port: int) -> str:
    host, _ = _split_hostport("listen", config.listen)
    host = f"[{host}]" if ":" in host else host
    return f"{'http' if config.insecure_http else 'https'}://{host}:{port}/"


def _write_port_file(path: Path, port: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{port}\n")
    tmp.replace(path)


async def run(config: StatusConfig, *, port_file: Path | None = None) -> None:
    tls = None
    if not config.insecure_http:
        assert config.pki_dir is not None
        pki = Pki(config.pki_dir)
        cert, key = (config.cert, config.key) if config.cert and config.key else \
            page_certificate(pki, config.server_hosts)
        tls = server_context(pki.ca_cert_path, cert, key)
    board = Board(source=",".join(config.coordinators))
    server = StatusServer(config.serve_config(), tls, board.document)
    follower = Follower(FollowConfig(config.coordinators, config.identity(), insecure=config.insecure,
                                     debounce=config.debounce, refresh=config.refresh), board, server.publish)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    port = await server.start()
    if port_file is not None:
        _write_port_file(port_file, port)
    print(f"geomesh-status serving {url_of(config, port)}", file=sys.stderr, flush=True)
    following = asyncio.create_task(follower.run())
    try:
        await stop.wait()
    finally:
        following.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await following
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    try:
        config = config_of(args)
    except ValidationError as exc:
        print(f"geomesh-status: invalid configuration: {exc}", file=sys.stderr)
        return 2
    metrics_port = metrics.serve(args.metrics_host, args.metrics_port)
    if metrics_port:
        print(f"geomesh-status metrics on {args.metrics_host}:{metrics_port}", file=sys.stderr, flush=True)
    asyncio.run(run(config, port_file=args.port_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
