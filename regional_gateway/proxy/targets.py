"""Choosing where one request or tunnel goes: a local backend, another region's gateway, or an error.

`choose` is the single routing decision shared by HTTP requests, TLS passthrough and the mesh
listener: given the live `RouteState`, the name match, the client key and what was already tried,
it returns a `Target` or the `ProxyError` to answer. Order: the local backends by the app's
policy (an `<instance-id>` name: that instance only); if none is available and forwarding is
allowed (the request was not already forwarded), a routable gateway of the nearest region that
hosts the app; then, as a last resort, a local backend that is only passively ejected (it may
be back); else 503 naming the app and region.
"""

from __future__ import annotations

from dataclasses import dataclass

from regional_gateway.proxy.cross_region import candidate_regions
from regional_gateway.proxy.hostnames import NameMatch
from regional_gateway.proxy.http_errors import NoHealthyBackend, ProxyError, UnknownHost
from regional_gateway.proxy.route_state import BackendRuntime, RouteState
from regional_gateway.proxy.routes import RemoteRegion


@dataclass(slots=True)
class Target:
    backend: BackendRuntime
    addr: tuple[str, int]
    app: str
    region: RemoteRegion | None = None  # set when the target is another region's gateway


def choose(state: RouteState, match: NameMatch, client: bytes, *, may_forward: bool,
           exclude: tuple[str, ...] = ()) -> Target | ProxyError:
    routes = state.routes
    app = None
    label = match.app
    if match.instance:
        rt = state.instances.get(match.instance)
        if rt is not None and rt.app is not None:
            label = rt.app.spec.name
            if rt.key not in exclude and rt.health.probed_up:
                return Target(rt, (rt.host, match.port or rt.port), label)
            why = rt.health.reason or "it failed"
            return NoHealthyBackend(f"instance {match.instance!r} of app {label!r} is unavailable: {why}")
        label = match.instance
    else:
        app = state.apps.get(match.app)
        if app is not None:
            rt = app.pick(client, exclude)
            if rt is not None:
                return Target(rt, (rt.host, match.port or rt.port), label)
    if may_forward:
        for region in candidate_regions(routes, match):
            gws = [state.gateways[g.name] for g in region.gateways if g.name in state.gateways]
            ready = [g for g in gws if g.available and g.key not in exclude]
            if ready:
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
        elsewhere = "; no other region has a reachable gateway for it" if candidate_regions(routes, match) \
            else "; no other region hosts it"
    else:
        elsewhere = " (request already forwarded once, not forwarding again)"
    what = f"instance {match.instance!r}" if match.instance else f"app {match.app!r}"
    return NoHealthyBackend(f"no healthy backend for {what}{where} ({total} configured){elsewhere}")
