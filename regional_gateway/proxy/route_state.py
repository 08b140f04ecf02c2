"""The live routing state of a proxy server: one `Routes` compiled for the data path.

`RouteState.compile(routes, previous)` turns an immutable `Routes` into what the request path
reads: per app the backend states (health machine, requests in flight, availability) with the
list of available ones kept ready and a balancer; the remote gateways with their own passive
health; a host-name cache. Backend and gateway states are carried over from the previous state
when their identity is unchanged, so a routes update keeps health verdicts and in-flight counts,
and swapping the state is a single attribute assignment (the data path never waits for it).

`lookup` is where every listener (HTTP/1, TLS passthrough, HTTP/2, the mesh) turns a name into a
target, so the port allow-list is enforced there: a `-<port>` name on a port the app does not
expose (`Routes.port_refusal`) comes out as an `UnknownName`, refused exactly like a name that does
not exist (404, or the TLS `unrecognized_name` alert), before any connection is tried; each such
refusal counts in `geomesh_gateway_ports_refused_total{app}`.
"""

from __future__ import annotations

import re

from prometheus_client import Counter

from regional_gateway.proxy import balancers
from regional_gateway.proxy.health import HealthState
from regional_gateway.proxy.hostnames import Mode, NameMatch, UnknownName, normalize_host, resolve
from regional_gateway.proxy.routes import AppRoute, Backend, HealthCheck, RemoteGateway, Routes

HOST_CACHE_MAX = 4096
PORTS_REFUSED = Counter("geomesh_gateway_ports_refused", "Names refused because their app does not expose the "
                        "port in the name (`<app>-<port>` forms)", ["app"])
_PORT_SUFFIX = re.compile(r"-[0-9]{1,5}[sg]?$")
GATEWAY_HEALTH = HealthCheck(check="none", eject_connect_failures=1, eject_5xx=0, eject_seconds=3.0)


class BackendRuntime:
    """One backend (or remote gateway) as the data path sees it. Mutable, owned by the loop."""

    __slots__ = ("key", "host", "port", "addr", "instance_id", "app", "health", "inflight", "available",
                 "next_probe", "probing", "label")

    def __init__(self, key: str, host: str, port: int, health: HealthCheck, app: AppRuntime | None,
                 instance_id: str = "", label: str = "") -> None:
        self.key = key
        self.host = host
        self.port = port
        self.addr = (host, port)
        self.instance_id = instance_id
        self.app = app
        self.health = HealthState(health)
        self.inflight = 0
        self.available = True
        self.next_probe = 0.0
        self.probing = False
        self.label = label or key

    def sync(self) -> bool:
        """Refresh `available` from the health machine; True if it changed."""
        now = self.health.available
        if now != self.available:
            self.available = now
            if self.app is not None:
                self.app.refresh()
            return True
        return False


class AppRuntime:
    __slots__ = ("spec", "name", "backends", "ready", "balancer")

    def __init__(self, spec: AppRoute) -> None:
        self.spec = spec
        self.name = spec.name
        self.backends: list[BackendRuntime] = []
        self.ready: list[BackendRuntime] = []
        self.balancer: balancers.Balancer = balancers.RoundRobin()

    def refresh(self) -> None:
        self.ready = [b for b in self.backends if b.available]

    def pick(self, client: bytes, exclude: tuple[str, ...] = ()) -> BackendRuntime | None:
        """An available backend for `client` by the app's policy, avoiding `exclude` (retries)."""
        ready = self.ready
        if exclude:
            ready = [b for b in ready if b.key not in exclude]
        return self.balancer.pick(ready, client)

    def pick_any(self, exclude: tuple[str, ...] = ()) -> BackendRuntime | None:
        """Last resort when nothing is available: a passively ejected (not probed-down) backend."""
        for b in self.backends:
            if b.health.probed_up and b.key not in exclude:
                return b
        return None


class RouteState:
    __slots__ = ("routes", "apps", "instances", "gateways", "host_cache", "fast", "refused", "region_cursor")

    def __init__(self, routes: Routes) -> None:
        self.routes = routes
        self.apps: dict[str, AppRuntime] = {}
        self.instances: dict[str, BackendRuntime] = {}
        self.gateways: dict[str, BackendRuntime] = {}
        self.host_cache: dict[bytes, NameMatch | UnknownName] = {}
        # host -> (app, port) for plain `<app>[-<port>]` HTTP names of a local app: the request fast path
        self.fast: dict[bytes, tuple[AppRuntime, int]] = {}
        self.refused: dict[bytes, str] = {}  # host -> app label, for names refused for their port
        self.region_cursor = 0

    @classmethod
    def compile(cls, routes: Routes, previous: RouteState | None = None) -> RouteState:
        state = cls(routes)
        old_backends: dict[tuple[str, str], BackendRuntime] = {}
        old_gateways: dict[str, BackendRuntime] = {}
        if previous is not None:
            for name, app in previous.apps.items():
                for b in app.backends:
                    old_backends[(name, b.key)] = b
            old_gateways = dict(previous.gateways)
        for name, spec in routes.apps.items():
            app = AppRuntime(spec)
            for b in spec.backends:
                rt = old_backends.get((name, b.key))
                if rt is None:
                    rt = _backend(b, spec.health, app)
                elif rt.health.check != spec.health:  # same backend, new settings: fresh verdicts
                    rt.health = HealthState(spec.health)  # (the object stays: requests in flight count on it)
                    rt.available = True
                    rt.next_probe = 0.0
                rt.app = app
                rt.instance_id = b.instance_id
                app.backends.append(rt)
                if b.instance_id:
                    state.instances[b.instance_id] = rt
            prev = previous.apps.get(name) if previous is not None else None
            if prev is not None and prev.spec.lb_policy == spec.lb_policy and len(prev.backends) == len(app.backends) \
                    and all(a is b for a, b in zip(prev.backends, app.backends, strict=True)):
                app.balancer = prev.balancer  # same backends: keep the ring / cursor (no rebuild on every update)
            else:
                app.balancer = balancers.make_balancer(spec.lb_policy, app.backends)
            app.refresh()
            state.apps[name] = app
        for region in routes.regions:
            for gw in region.gateways:
                rt = old_gateways.get(gw.name)
                if rt is None or (rt.host, rt.port) != (gw.mesh_ip, gw.proxy_port):
                    rt = _gateway(gw)
                state.gateways[gw.name] = rt
        return state

    def lookup(self, raw_host: bytes) -> NameMatch | UnknownName:
        """Resolve a Host header / SNI value, cached per routes version; ports not exposed are refused."""
        found = self.host_cache.get(raw_host)
        if found is None:
            found, refused = _resolve(self.routes, normalize_host(raw_host.decode("latin-1")))
            if len(self.host_cache) >= HOST_CACHE_MAX:
                self.host_cache.clear()
                self.fast.clear()
                self.refused.clear()
            self.host_cache[raw_host] = found
            if refused is not None:
                self.refused[raw_host] = refused
            if isinstance(found, NameMatch) and found.mode is Mode.HTTP and not found.instance:
                app = self.apps.get(found.app)
                if app is not None and app.spec.serves_port(found.port):  # a port only another region serves
                    self.fast[raw_host] = (app, found.port)                 # is forwarded: not the fast path
        if type(found) is UnknownName:
            refused = self.refused.get(raw_host)
            if refused is not None:
                PORTS_REFUSED.labels(refused).inc()
        return found

    def all_backends(self) -> list[BackendRuntime]:
        out = [b for app in self.apps.values() for b in app.backends]
        out.extend(self.gateways.values())
        return out


def _resolve(routes: Routes, host: str) -> tuple[NameMatch | UnknownName, str | None]:
    """`resolve` plus the port allow-list; second: the app label when the name is refused for its port.

    `resolve` already refuses an app name on a port the app does not allow; this adds the
    `<instance-id>-<port>` forms and names known only from other regions (`Routes.port_refusal`),
    and tells a port refusal from an unknown name (the name without its `-<port>` suffix resolves).
    """
    found = resolve(routes, host)
    if isinstance(found, NameMatch):
        why = routes.port_refusal(found.app, found.instance, found.port)
        if why is None:
            return found, None
        return UnknownName(why), found.app or "-"
    label, dot, rest = host.partition(".")
    m = _PORT_SUFFIX.search(label)
    if m is not None and rest == routes.zone:
        base = resolve(routes, f"{label[:m.start()]}.{rest}")
        if isinstance(base, NameMatch):
            return found, base.app or "-"
    return found, None


def _backend(b: Backend, health: HealthCheck, app: AppRuntime) -> BackendRuntime:
    return BackendRuntime(b.key, b.address, b.port, health, app, b.instance_id)


def _gateway(gw: RemoteGateway) -> BackendRuntime:
    return BackendRuntime(gw.key, gw.mesh_ip, gw.proxy_port, GATEWAY_HEALTH, None, label=f"gateway:{gw.name}")
