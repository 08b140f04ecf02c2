"""Host names to route targets: the platform's name forms, resolved against one `Routes`.

Pure: a Host header or TLS SNI value in, a `NameMatch` (app, port, instance, mode) or an
`UnknownName` (with the reason for the 404 body) out. The forms, under the zone `Z`:

- `<app>.Z`: the app on its backends' default port, HTTP (TLS terminated on the TLS listener);
- `<app>-<port>.Z`: the same app on `port`;
- `<app>-<port>s.Z`: TLS passthrough to `port`, routed by SNI without terminating;
- `<app>-<port>g.Z`: TLS terminated with ALPN h2, the decrypted stream tunnelled to `port` (h2c);
- `<instance-id>.Z` (and the `-<port>[s|g]` forms): one instance only;
- a custom domain from the domain table: its app and port (passthrough if the domain says so).

A label equal to an app or instance name wins over the `-<port>` reading, so an app called
`api-2` is reachable as `api-2.Z`.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from regional_gateway.proxy.routes import Routes

_PORT_FORM = re.compile(r"^([a-z0-9][a-z0-9-]*?)-([0-9]{1,5})([sg]?)$")


class Mode(enum.Enum):
    HTTP = "http"
    PASSTHROUGH = "passthrough"
    H2 = "h2"


_SUFFIX = {"": Mode.HTTP, "s": Mode.PASSTHROUGH, "g": Mode.H2}


@dataclass(frozen=True, slots=True)
class NameMatch:
    app: str
    port: int = 0  # 0: the backend's default port
    mode: Mode = Mode.HTTP
    instance: str = ""  # set for the `<instance-id>` forms


@dataclass(frozen=True, slots=True)
class UnknownName:
    reason: str


def normalize_host(raw: str) -> str:
    """Lowercase, without a port and without a trailing dot ("" if empty/unusable)."""
    host = raw.strip().lower()
    if host.startswith("["):  # IPv6 literal, maybe with a port
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def resolve(routes: Routes, host: str) -> NameMatch | UnknownName:
    """The route target for a normalized host name."""
    if not host:
        return UnknownName("no host name given")
    domain = routes.domains.get(host)
    if domain is not None:
        return NameMatch(domain.app, domain.port, Mode.PASSTHROUGH if domain.passthrough else Mode.HTTP)
    zone = routes.zone
    if not host.endswith(zone) or len(host) <= len(zone) + 1 or host[-len(zone) - 1] != ".":
        return UnknownName(f"{host!r} is not under the zone {zone!r} and is not a custom domain")
    label = host[: -len(zone) - 1]
    if "." in label:
        return UnknownName(f"{host!r} has more than one label under the zone {zone!r}")
    found = _name(routes, label, 0, Mode.HTTP)
    if found is not None:
        return found
    m = _PORT_FORM.match(label)
    if m is not None:
        base, port_s, suffix = m.groups()
        port = int(port_s)
        if not 1 <= port <= 65535:
            return UnknownName(f"port {port} in {host!r} is outside 1-65535")
        found = _name(routes, base, port, _SUFFIX[suffix])
        if found is not None:
            app = routes.apps.get(found.app)
            if app is not None and not app.allows_port(port):
                return UnknownName(f"app {found.app!r} does not expose port {port}")
            return found
        return UnknownName(f"no app or instance named {base!r} in zone {zone!r}")
    return UnknownName(f"no app or instance named {label!r} in zone {zone!r}")


def _name(routes: Routes, label: str, port: int, mode: Mode) -> NameMatch | None:
    if routes.knows_app(label):
        return NameMatch(label, port, mode)
    inst = routes.instances.get(label)
    if inst is not None:
        return NameMatch(inst.app, port, mode, label)
    if label in routes.remote_instances:
        return NameMatch("", port, mode, label)
    return None
