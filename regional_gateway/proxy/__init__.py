"""The regional gateway's data plane: an HTTP/1.1 reverse proxy with TLS, routing, LB and health.

The API the gateway agent (coordinator mode) and `regional_gateway.main` (standalone mode) use:

    server = ProxyServer(settings, routes)      # no side effects
    await server.start()                        # bind listeners, start sweeper and prober
    server.update_routes(new_routes)            # atomic swap, any time, from the loop thread
    await server.shutdown()                     # drain and stop

`routes_from_table(table, region=..., zone=..., self_name=...)` builds `Routes` from the
coordinator's routing table; `load_routes(path)` from the standalone TOML file.
"""

from regional_gateway.proxy.routes import (
    AppRoute,
    Backend,
    CertificateSpec,
    DomainRoute,
    HealthCheck,
    RemoteGateway,
    RemoteRegion,
    Routes,
    routes_from_table,
)
from regional_gateway.proxy.routes_file import load_routes
from regional_gateway.proxy.server import ProxyServer
from regional_gateway.proxy.settings import ProxySettings

__all__ = ["AppRoute", "Backend", "CertificateSpec", "DomainRoute", "HealthCheck", "ProxyServer", "ProxySettings",
           "RemoteGateway", "RemoteRegion", "Routes", "load_routes", "routes_from_table"]
