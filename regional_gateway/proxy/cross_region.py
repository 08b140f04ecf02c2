"""Cross-region forwarding: which other regions may serve a request this region cannot.

A request whose app has no available backend here goes, over the WireGuard mesh, to a gateway of
the nearest region hosting the app (`Routes.regions` is sorted nearest first). One hop at most:
the forwarding gateway marks the request (`X-Geomesh-Forwarded: <its name>`, or a PROXY v2
preamble for TLS passthrough), and a gateway receiving a marked request on its mesh listener
serves it locally or answers 503; it never forwards again. The mark is believed only on the mesh
listener (public listeners drop it), so a client cannot use it to pin a request to a region.

Within the chosen region, gateways the coordinator found unreachable from the internet
(`RemoteGateway.unreachable`, docs/reachability.md) are skipped while a reachable one can take
the request; when every candidate of the region is unreachable they are used anyway (fail-open:
the mesh may still reach a gateway that clients cannot), counted in
`geomesh_gateway_forward_fail_open_total{region}`.
Pure: a `Routes` and a name match in, the candidate regions out; candidates in, the order to use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from prometheus_client import Counter

from regional_gateway.proxy.hostnames import NameMatch
from regional_gateway.proxy.routes import RemoteGateway, RemoteRegion, Routes

FORWARD_FAIL_OPEN = Counter("geomesh_gateway_forward_fail_open", "requests forwarded to a gateway found "
                            "unreachable because no reachable gateway of the region could take them", ["region"])

T = TypeVar("T")


def candidate_regions(routes: Routes, match: NameMatch) -> tuple[RemoteRegion, ...]:
    """Other regions, nearest first, with a routable gateway that can serve `match`."""
    if match.instance:
        if match.instance in routes.instances:
            return ()  # the instance lives here; there is nowhere else to send it
        return routes.remote_instances.get(match.instance, ())
    return routes.remote_apps.get(match.app, ())


def forwarding_order(candidates: Sequence[tuple[RemoteGateway, T]]) -> tuple[list[T], bool]:
    """Of a region's usable gateways (each with its runtime), those to forward to: the reachable
    ones; when there is none, all of them (fail-open, second item True)."""
    reachable = [rt for gw, rt in candidates if not gw.unreachable]
    if reachable or not candidates:
        return reachable, False
    return [rt for _, rt in candidates], True
