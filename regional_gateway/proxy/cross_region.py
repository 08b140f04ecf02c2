"""Cross-region forwarding: which other regions may serve a request this region cannot.

A request whose app has no available backend here goes, over the WireGuard mesh, to a gateway of
the nearest region hosting the app (`Routes.regions` is sorted nearest first). One hop at most:
the forwarding gateway marks the request (`X-Geomesh-Forwarded: <its name>`, or a PROXY v2
preamble for TLS passthrough), and a gateway receiving a marked request on its mesh listener
serves it locally or answers 503; it never forwards again. The mark is believed only on the mesh
listener (public listeners drop it), so a client cannot use it to pin a request to a region.
Pure: a `Routes` and a name match in, the candidate regions out.
"""

from __future__ import annotations

from regional_gateway.proxy.hostnames import NameMatch
from regional_gateway.proxy.routes import RemoteRegion, Routes


def candidate_regions(routes: Routes, match: NameMatch) -> tuple[RemoteRegion, ...]:
    """Other regions, nearest first, with a routable gateway that can serve `match`."""
    if match.instance:
        if match.instance in routes.instances:
            return ()  # the instance lives here; there is nowhere else to send it
        return routes.remote_instances.get(match.instance, ())
    return routes.remote_apps.get(match.app, ())
