"""Choosing where one request or tunnel goes: a local backend, another region's gateway, or an error.

`choose` is the single routing decision shared by HTTP requests, TLS passthrough and the mesh
listener: given the live `RouteState`, the name match, the client key and what was already tried,
it returns a `Target` or the `ProxyError` to answer. Order: the local backends by the app's
policy (an `<instance-id>` name: that instance only); if none is available and forwarding is
allowed (the request was not already forwarded), a routable gateway of the nearest region that
hosts the app (one users can reach, unless none of that region's can: `cross_region.forwarding_order`); then, as a last resort, a local backend that is only passively ejected (it may
be back); else 503 naming the app and region.

Ports: a name with a port (`<app>-<port>`) goes to a local backend only if the app's backends here
serve that port (`AppRoute.serves_port`), and to another region only if that region serves it
(`RemoteRegion.serves`); `RouteState.lookup` has already refused a port no place serves, so
neither a local backend nor a far gateway is ever asked to connect to an unexposed port.
"""

from __future__ import annotations

from dataclasses import dataclass

from regional_gateway.proxy.cross_region import FORWARD_FAIL_OPEN, candidate_regions, forwarding_order
from regional_gateway.proxy.hostnames import NameMatch
from regional_gateway.proxy.http_errors import NoHealthyBackend, ProxyError, UnknownHost
from regional_gateway.proxy.route_state import BackendRuntime, RouteState
from regional_gateway.proxy.routes import RemoteRegion, Routes


@dataclass(slots=True)
class Target:
    backend: BackendRuntime
    addr: tuple[str, int]
    app: str
    region: RemoteRegion | None = None  # set when the target is another region's gateway

    @property
    def where(self) -> str:
        """The endpoint tried, for error texts: "addr:port" (the port of the name, not the backend's
        default) or "gateway:<name>"."""
        if self.region is not None:
            return self.backend.label
        host, port = self.addr
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _regions(routes: Routes, match: NameMatch) -> tuple[RemoteRegion, ...]:
    """The candidate regions for `match` that serve its port."""
    regions = candidate_regions(routes, match)
    if match.port:
        regions = tuple(r for r in regions if r.serves(match.app, match.instance, match.port))
    return regions


def choose(state: RouteState, match: NameMatch, client: bytes, *, may_forward: bool,
           exclude: tuple[str, ...] = ()) -> Target | ProxyError:
    routes = state.routes
    app = None
    label = match.app
    port = match.port
    if match.instance:
        rt = state.instances.get(match.instance)
        if rt is not None and rt.app is not None:
            label = rt.app.spec.name
            if not rt.app.spec.serves_port(port):  # (lookup refuses these first)
                return UnknownHost(f"instance {match.instance!r} of app {label!r} does not expose port {port}")
            if rt.key not in exclude and rt.health.probed_up:
                return Target(rt, (rt.host, match.port or rt.port), label)
            why = rt.health.reason or "it failed"
            return NoHealthyBackend(f"instance {match.instance!r} of app {label!r} is unavailable: {why}")
        label = match.instance
    else:
        app = state.apps.get(match.app)
        if app is not None and not app.spec.serves_port(port):
            if not may_forward:  # a port only other regions serve, on a request that cannot go there
                return UnknownHost(f"app {match.app!r} does not expose port {port} here")
            app = None  # forward it; never a local backend
        if app is not None:
            rt = app.pick(client, exclude)
            if rt is not None:
                return Target(rt, (rt.host, match.port or rt.port), label)
    if may_forward:
        for region in _regions(routes, match):
            gws = [(g, state.gateways[g.name]) for g in region.gateways if g.name in state.gateways]
            ready, fail_open = forwarding_order([(g, rt) for g, rt in gws if rt.available and rt.key not in exclude])
            if ready:
                if fail_open:
                    FORWARD_FAIL_OPEN.labels(region.name).inc()
                state.region_cursor += 1
                gw = ready[state.region_cursor % len(ready)]
                return Target(gw, (gw.host, gw.port), label, region)
    if app is not None:
        rt = app.pick_any(exclude)
        if rt is not None:
            return Target(rt, (rt.host, match.port or rt.port), label)
    if app is None and not match.instance and not routes.knows_app(match.app):
        return UnknownHost(f"no app named {match.app!r}")
    where = f" in region {routes.region!r}" if routes.region else ""
    total = len(app.backends) if app is not None else 0
    if may_forward:
        elsewhere = "; no other region has a reachable gateway for it" if _regions(routes, match) \
            else "; no other region hosts it"
    else:
        elsewhere = " (request already forwarded once, not forwarding again)"
    what = f"instance {match.instance!r}" if match.instance else f"app {match.app!r}"
    if port:
        what += f" on port {port}"
    return NoHealthyBackend(f"no healthy backend for {what}{where} ({total} configured){elsewhere}")
