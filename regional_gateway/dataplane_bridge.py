"""The seam between the gateway agent and the proxy data plane in one process.

The agent owns registration and the session stream; it hands each new RoutingTable to
`ProxyDataPlane.update_table`, which turns it into proxy `Routes` (`routes_from_table`, pure) and
swaps them in atomically. The proxy listens for clients on `proxy_listen:proxy_port` and, once
the WireGuard interface carries the mesh address, for forwarded requests from other gateways on
`mesh_ip:proxy_port` (the only listener whose X-Forwarded-* / X-Geomesh-Forwarded headers are
trusted). Backend health measured by the proxy's probes goes up with each heartbeat. The routing
table's gateways carry the coordinator's reachability verdict (`Gateway.unreachable`): cross-region
forwarding skips unreachable gateways while their region has a reachable one
(`proxy.cross_region.forwarding_order`). The data plane also answers the reserved health path
that other gateways' outside-in probes ask for (docs/reachability.md). The certificates the
coordinator sends, once opened and checked by the agent's `CertificateIntake`, go to the proxy's
certificate store with `update_certificates` (docs/certificates.md, "On the gateway"), and the
ACME HTTP-01 challenges in flight to the plain listener with `update_http_challenges`
(`proxy.port80`). The agent's way to ask the coordinator for a custom domain's certificate
(`certificate_requests`) becomes the TLS listener's certificates on demand (`proxy.on_demand`).
"""

from __future__ import annotations

import logging

from geomesh.errors import ValidationError
from geomesh.logs import event
from geomesh.routing_table import RoutingTable
from regional_gateway.agent_config import AgentConfig
from regional_gateway.mesh_view import MeshPeerInfo
from regional_gateway.proxy.certificates import ManagedCertificate
from regional_gateway.proxy.on_demand import Ask, OnDemandCertificates
from regional_gateway.proxy.routes import Routes, routes_from_table
from regional_gateway.proxy.server import ProxyServer
from regional_gateway.proxy.settings import ProxySettings

log = logging.getLogger("geomesh.gateway.dataplane")


class ProxyDataPlane:
    def __init__(self, config: AgentConfig, server: ProxyServer) -> None:
        self.config = config
        self.server = server

    def update_table(self, table: RoutingTable, mesh: dict[str, MeshPeerInfo]) -> None:
        try:
            routes = routes_from_table(table, region=self.config.region, zone=self.config.zone,
                                       self_name=self.config.name, certificates=self.config.certificates)
        except ValidationError as exc:  # keep serving the routes in force
            event(log, "routing table refused by the data plane", logging.ERROR, field=exc.field, error=exc.message)
            return
        self.server.update_routes(routes)

    def update_certificates(self, certificates: list[ManagedCertificate]) -> None:
        """Serve these managed certificates from the next handshake on (open connections keep theirs)."""
        self.server.certs.set_managed(certificates)
        event(log, "managed certificates in service", names=[c.name for c in certificates])

    def update_http_challenges(self, challenges: dict[str, str]) -> None:
        """Answer these ACME HTTP-01 challenges (token -> key authorization) on the plain listener."""
        refused = self.server.set_http_challenges(challenges.items())
        if refused:
            event(log, "ACME challenges refused", logging.ERROR, count=len(refused), first=refused[0])

    def backend_health(self) -> list[tuple[str, str, bool]]:
        out = []
        for name, app in list(self.server.state.apps.items()):
            for b in app.backends:
                if b.instance_id:
                    out.append((name, b.instance_id, b.available))
        return out

    def active_connections(self) -> int:
        return len(self.server.connections)


async def start_dataplane(config: AgentConfig, mesh_ip: str,
                          ask: Ask | None = None) -> tuple[ProxyServer, ProxyDataPlane]:
    """Start the proxy (empty routes until the first table arrives); with `ask` (the agent's way to
    the coordinator's RequestCertificate) custom domains get certificates on demand."""
    listen = config.proxy_listen or config.public_ip
    mesh = (f"{mesh_ip}:{config.proxy_port}",) if mesh_ip and config.wg_backend != "none" else ()
    https = (f"{listen}:{config.https_port}",) if config.https_port else ()
    settings = ProxySettings(http=(f"{listen}:{config.proxy_port}",), https=https, mesh=mesh, g_mode=config.g_mode,
                             https_redirect=config.https_redirect, **config.custom_domains)
    server = ProxyServer(settings, Routes(zone=config.zone, self_name=config.name, region=config.region,
                                          certificates=config.certificates))
    if ask is not None and https:
        server.on_demand = OnDemandCertificates(server.certs, ask, wait=settings.on_demand_wait)
    await server.start()
    event(log, "data plane listening", http=f"{listen}:{config.proxy_port}", https=list(https), mesh=list(mesh))
    return server, ProxyDataPlane(config, server)
