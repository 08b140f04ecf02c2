"""Active health probes: a TCP connect or an HTTP GET to every local backend, on a timer.

For each app whose health check is not "none", every backend is probed every `interval`
seconds with a `timeout`; results feed the backend's `HealthState` (`rise`/`fall` thresholds),
and a change of availability goes through `ProxyServer.health_changed`. An HTTP probe sends
`GET <path>` with `Host: <app>.<zone>` and counts 2xx and 3xx as healthy. Probes run off the
request path as small tasks, at most one at a time per backend.
"""

from __future__ import annotations

import asyncio
import logging

from regional_gateway.proxy.host import ConnectionHost
from regional_gateway.proxy.route_state import BackendRuntime
from regional_gateway.proxy.routes import HealthCheck

log = logging.getLogger("geomesh.gateway.health")
TICK = 0.1
MAX_STATUS_LINE = 1024


async def probe_once(host: str, port: int, check: HealthCheck, host_header: str) -> tuple[bool, str]:
    """Run one probe; (healthy, detail)."""
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        return False, f"connect: {exc.strerror or exc}"
    try:
        if check.check != "http":
            return True, ""
        writer.write(f"GET {check.path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: geomesh-gateway-probe\r\n"
                     "Connection: close\r\n\r\n".encode())
        line = await reader.readline()
        parts = line[:MAX_STATUS_LINE].split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            return False, "not an HTTP response"
        status = int(parts[1])
        return (200 <= status < 400), f"HTTP {status}"
    except OSError as exc:
        return False, f"read: {exc.strerror or exc}"
    finally:
        writer.close()


class Prober:
    def __init__(self, server: ConnectionHost) -> None:
        self.server = server

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(TICK)
            now = loop.time()
            state = self.server.state
            zone = state.routes.zone
            for app in state.apps.values():
                check = app.spec.health
                if check.check == "none":
                    continue
                for rt in app.backends:
                    if rt.probing or now < rt.next_probe:
                        continue
                    rt.probing = True
                    rt.next_probe = now + check.interval
                    self.server.spawn(self._probe(rt, check, f"{app.spec.name}.{zone}"))

    async def _probe(self, rt: BackendRuntime, check: HealthCheck, host_header: str) -> None:
        try:
            ok, detail = await asyncio.wait_for(probe_once(rt.host, rt.port, check, host_header), check.timeout)
        except TimeoutError:
            ok, detail = False, f"no answer within {check.timeout:g}s"
        finally:
            rt.probing = False
        if rt.health.probe(ok, self.server.now, detail):
            self.server.health_changed(rt)
