"""`geomesh-gateway`: the regional gateway process.

Two modes:

- standalone, `geomesh-gateway --routes FILE [--http ADDR] [--https ADDR] [--mesh ADDR] ...`: the
  data plane alone, routes from a TOML file (docs/gateway-dataplane.md), reloaded on SIGHUP (an
  invalid file is refused, naming the field, and the routes in service stay);
- coordinator mode, `geomesh-gateway --config FILE`: the gateway agent (registration, mesh,
  routing feed) runs the data plane itself; this module hands over to `regional_gateway.agent.run`.
  With a saved state and no coordinator answering within `[state] coordinator_deadline`, the
  agent brings WireGuard and the proxy up from that state before it registers
  (docs/static-stability.md).

`Config` is the one settings value of a standalone process: defaults, then the `[server]` table of
the routes file, then flags, validated before anything starts. SIGTERM/SIGINT drain: stop
accepting, finish the exchanges in flight for up to `--drain-timeout` seconds, then exit.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geomesh import logs
from geomesh.errors import ValidationError

log = logging.getLogger("geomesh.gateway")

SETTING_HELP = {
    "http": "plain HTTP listener host:port (repeatable; default 0.0.0.0:8080 when no listener is given)",
    "https": "TLS listener host:port: termination by SNI with the routes' certificates, and TLS passthrough "
             "for <app>-<port>s names (repeatable)",
    "mesh": "mesh listener host:port: requests forwarded by other gateways; their X-Forwarded-* and "
            "X-Geomesh-Forwarded headers are trusted here only (repeatable)",
    "trusted_peers": "IP of another gateway whose forwarded requests and tunnels (PROXY v2) are trusted on every "
                     "listener, as on the mesh listener (for gateways reached without a mesh; repeatable)",
    "max_connections": "client connections over all listeners, TLS handshakes included; lowered at start to what "
                       "the file descriptor limit carries ((soft RLIMIT_NOFILE - 64) / 2); beyond it new ones get "
                       "503 (TLS: closed) at accept",
    "max_connections_per_client": "connections one client (IPv4 address, IPv6 /64) may hold over all listeners, "
                                  "TLS handshakes included; beyond, 503 (TLS: closed) at accept; 0 = no share; "
                                  "the mesh listener and --trusted-peers are exempt",
    "max_header_bytes": "request line + headers limit in bytes (431 beyond)",
    "max_headers": "number of header fields limit (431 beyond)",
    "max_body_bytes": "request body limit in bytes, 0 = none (413 beyond)",
    "header_timeout": "seconds to receive a complete request head (408 after; slowloris guard)",
    "body_timeout": "seconds a request body may go without a byte (408 after); also the window over which "
                    "--body-min-rate is measured",
    "body_min_rate": "bytes/s a request body must average over each --body-timeout window, 0 = off (408 "
                     "below; slow-body guard)",
    "idle_timeout": "seconds a keep-alive connection may stay idle, or a response may stall",
    "connect_timeout": "seconds to connect to a backend (another backend is tried; 504 when none answers)",
    "upstream_timeout": "seconds from request sent to the first response byte (504 after)",
    "tunnel_idle_timeout": "seconds a WebSocket or passthrough tunnel may stay silent",
    "drain_timeout": "seconds in-flight requests get to finish on SIGTERM",
    "pool_max_idle": "idle keep-alive connections kept per backend",
    "pool_idle_timeout": "seconds an idle upstream connection is kept",
    "cert_check_interval": "seconds between checks of the certificate files for changes",
    "backlog": "listen(2) backlog",
    "g_mode": "how <app>-<port>g names are proxied: streams = HTTP/2 terminated, every call (stream) balanced "
              "by the app's policy; tunnel = each client connection a byte tunnel to one backend (faster, "
              "balanced per connection)",
    "h2_max_resets": "HTTP/2: client stream resets and refused streams a connection may cause in a burst, "
                     "refilled over 10 s (each completed call earns one back); beyond, GOAWAY ENHANCE_YOUR_CALM "
                     "(rapid reset guard)",
    "h2_max_control_frames": "HTTP/2: PING, SETTINGS, PRIORITY, WINDOW_UPDATE and empty DATA frames a connection may "
                             "send in a burst, refilled over 10 s (DATA sent to it earns some back); beyond, GOAWAY "
                             "ENHANCE_YOUR_CALM (flood guard)",
    "penalty_cooldown": "seconds a client is refused at accept after a connection of its got HTTP/2 GOAWAY "
                        "ENHANCE_YOUR_CALM (rapid reset, frame flood, unread replies); doubled per repeat offence; "
                        "0 = no penalty box",
    "penalty_cooldown_max": "where the penalty doubling stops; a client clean for this long after its cool-down "
                            "starts over",
    "penalty_clients": "clients the penalty box remembers (the least recent offender is forgotten first)",
    "resolver": "recursive resolver IP:port for custom domains by TXT record: a Host that is neither the zone's "
                "nor a configured domain is looked up as _geomesh-app-address.<host> TXT \"app=<name>[:<port>]\" "
                "(or the seed's _dstack-app-address.<host> \"app-id=<name>\") and routed to that app "
                "(docs/custom-domains.md); empty = off",
    "resolver_timeout": "seconds per UDP try of a TXT look-up (two tries, then a truncated answer one TCP try)",
    "custom_domain_min_ttl": "a custom domain's TXT answer is cached for its TTL, at least this long",
    "custom_domain_max_ttl": "a custom domain's TXT answer is cached at most this long",
    "custom_domain_negative_ttl": "the longest a custom-domain look-up without a mapping (NXDOMAIN, no TXT, only "
                                  "garbage) or a failed one is cached (the SOA's negative TTL when shorter)",
    "custom_domain_client_rate": "TXT look-ups per second one client (IPv4 address, IPv6 /64) may cause; cached "
                                 "answers are free; beyond, 429",
    "custom_domain_client_burst": "TXT look-ups one client may save up (its bucket size)",
    "custom_domain_rate": "TXT look-ups per second for all clients together; beyond, 503",
    "custom_domain_burst": "TXT look-ups all clients together may save up (the shared bucket size)",
    "custom_domain_cache_entries": "custom-domain hosts whose look-up answer is kept (the oldest dropped first)",
    "on_demand_wait": "seconds a TLS handshake for a custom domain without a certificate waits while the "
                      "coordinator obtains one on demand, then a TLS unrecognized_name alert (coordinator mode: "
                      "[custom_domains] on_demand_wait; a standalone gateway has no coordinator to ask)",
    "https_redirect": "redirect plain HTTP requests to HTTPS: a request on a plain listener for a host with a TLS "
                      "listener and a certificate gets 301 to https:// (--no-https-redirect turns it off; ACME "
                      "HTTP-01 paths, the mesh listener and trusted peers never are redirected)",
}


@dataclass(frozen=True, slots=True)
class Config:
    routes_path: Path
    settings: Any  # ProxySettings
    metrics_host: str = "127.0.0.1"
    metrics_port: int = -1
    log_level: str = "info"
    log_format: str = "json"
    use_uvloop: bool = True
    check_only: bool = False

    def __post_init__(self) -> None:
        if not -1 <= self.metrics_port <= 65535:
            raise ValidationError("metrics_port", f"{self.metrics_port} is not -1 (off), 0 (any) or a port")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ValidationError("log_level", f"{self.log_level!r} is not debug, info, warning or error")
        if self.log_format not in ("json", "text"):
            raise ValidationError("log_format", f"{self.log_format!r} is not json or text")


def build_parser() -> argparse.ArgumentParser:
    from regional_gateway.proxy.settings import G_MODES, ProxySettings

    p = argparse.ArgumentParser(
        prog="geomesh-gateway",
        description="geomesh regional gateway. Standalone data plane: --routes FILE (TOML, see "
                    "docs/gateway-dataplane.md; SIGHUP reloads it). Coordinator mode: --config FILE "
                    "(gateway agent config: registration, WireGuard mesh, routing feed, data plane).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--routes", type=Path, metavar="FILE", help="standalone mode: the routes TOML file")
    mode.add_argument("--config", type=Path, metavar="FILE", help="coordinator mode: the gateway agent config")
    defaults = ProxySettings(http=("0.0.0.0:8080",))
    for f in dataclasses.fields(ProxySettings):
        flag = "--" + f.name.replace("_", "-")
        if f.type.startswith("tuple"):
            p.add_argument(flag, action="append", metavar="IP" if f.name == "trusted_peers" else "HOST:PORT",
                           default=None, help=SETTING_HELP[f.name])
        elif f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{SETTING_HELP[f.name]} (default {'on' if getattr(defaults, f.name) else 'off'})")
        elif f.name == "g_mode":
            p.add_argument(flag, choices=G_MODES, default=None,
                           help=f"{SETTING_HELP[f.name]} (default {getattr(defaults, f.name)})")
        elif f.type == "str":
            p.add_argument(flag, default=None, metavar="IP:PORT", help=SETTING_HELP[f.name])
        else:
            kind = int if f.type.startswith("int") else float
            default = getattr(defaults, f.name)
            shown = "a quarter of the cap, at least 16" if default is None else default
            p.add_argument(flag, type=kind, default=None, metavar="N" if kind is int else "SECONDS",
                           help=f"{SETTING_HELP[f.name]} (default {shown})")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address of the Prometheus /metrics endpoint")
    p.add_argument("--metrics-port", type=int, default=-1, help="port of /metrics (-1 = off, 0 = any free port)")
    p.add_argument("--log-level", default="info", help="debug, info, warning or error")
    p.add_argument("--log-format", default="json", help="json (one object per line) or text")
    p.add_argument("--no-uvloop", action="store_true", help="use the stock asyncio loop instead of uvloop")
    p.add_argument("--check", action="store_true", help="validate the routes file and settings, then exit")
    return p


def load_config(args: argparse.Namespace) -> Config:
    """Defaults < the routes file's [server] table < flags; raises ValidationError naming the field."""
    from regional_gateway.proxy.routes_file import load_routes
    from regional_gateway.proxy.settings import ProxySettings

    _routes, server_table = load_routes(args.routes)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(ProxySettings):
        if f.name in server_table:
            value = server_table[f.name]
            if f.type.startswith("tuple"):
                value = tuple(value) if isinstance(value, list) else (value,)
            values[f.name] = value
        flag = getattr(args, f.name)
        if flag is not None:
            values[f.name] = tuple(flag) if f.type.startswith("tuple") else flag
    if not any(values.get(k) for k in ("http", "https", "mesh")):
        values["http"] = ("0.0.0.0:8080",)
    try:
        settings = ProxySettings(**values)
    except TypeError as exc:
        raise ValidationError("server", str(exc)) from None
    return Config(routes_path=args.routes, settings=settings, metrics_host=args.metrics_host,
                  metrics_port=args.metrics_port, log_level=args.log_level, log_format=args.log_format,
                  use_uvloop=not args.no_uvloop, check_only=args.check)


async def run_standalone(config: Config) -> None:
    from geomesh import metrics
    from regional_gateway.proxy.routes_file import load_routes
    from regional_gateway.proxy.server import ProxyServer

    routes, server_table = load_routes(config.routes_path)
    server = ProxyServer(config.settings, routes)
    await server.start()
    port = metrics.serve(config.metrics_host, config.metrics_port)
    if port:
        logs.event(log, "metrics listening", address=f"{config.metrics_host}:{port}")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def reload() -> None:
        try:
            new, new_server = load_routes(config.routes_path)
        except ValidationError as exc:
            server.metrics.reload("refused")
            logs.event(log, "routes reload refused, keeping the routes in service", logging.ERROR,
                       file=str(config.routes_path), field=exc.field, error=exc.message)
            return
        if new_server != server_table:
            logs.event(log, "[server] settings changed in the routes file: restart to apply them", logging.WARNING)
        server.update_routes(new)

    loop.add_signal_handler(signal.SIGHUP, reload)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logs.event(log, "shutting down", drain_timeout=config.settings.drain_timeout)
    await server.shutdown()


def run_agent(config_path: Path, args: argparse.Namespace) -> int:
    """Coordinator mode: the gateway agent owns the process (and runs the data plane)."""
    try:
        from regional_gateway import agent
    except ImportError as exc:
        print(f"geomesh-gateway: coordinator mode is not available in this build ({exc})", file=sys.stderr)
        return 2
    run = getattr(agent, "run", None)
    if run is None:
        print("geomesh-gateway: coordinator mode is not available in this build "
              "(regional_gateway.agent has no run())", file=sys.stderr)
        return 2
    result = run(config_path, args)
    if asyncio.iscoroutine(result):
        result = asyncio.run(result)
    return int(result or 0)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    from regional_gateway.proxy.fd_pressure import raise_nofile_limit

    soft, hard = raise_nofile_limit()  # every connection is a descriptor (two when proxied)
    logs.event(log, "file descriptor limit", soft=soft, hard=hard)
    if args.config is not None:
        return run_agent(args.config, args)
    try:
        config = load_config(args)
    except ValidationError as exc:
        print(f"geomesh-gateway: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if config.check_only:
        print(f"{config.routes_path}: ok")
        return 0
    if config.use_uvloop:
        import uvloop

        runner = uvloop.run
    else:
        runner = asyncio.run
    try:
        runner(run_standalone(config))
    except ValidationError as exc:
        print(f"geomesh-gateway: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"geomesh-gateway: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
