"""Prometheus metrics endpoint shared by the long-running processes.

Each process defines its own metrics next to the code that updates them (prometheus_client's
default registry); this module only serves them on a separate HTTP port (`--metrics-port`).
"""

from __future__ import annotations

import prometheus_client


def serve(host: str, port: int) -> int:
    """Start the /metrics HTTP server in a daemon thread; returns the bound port (0 = none)."""
    if port < 0:
        return 0
    server, _thread = prometheus_client.start_http_server(port, addr=host)
    return server.server_address[1]
