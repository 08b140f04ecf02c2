"""Host names to route targets: the platform's name forms, resolved against one `Routes`.

Pure: a Host header or TLS SNI value in, a `NameMatch` (app, port, instance, mode) or an
`UnknownName` (with the reason for the 404 body) out. The forms, under the zone `Z`:

- `<app>.Z`: the app on its backends' default port, HTTP (TLS terminated on the TLS listener);
- `<app>-<port>.Z`: the same app on `port`;
- `<app>-<port>s.Z`: TLS passthrough to `port`, routed by SNI without terminating;
- `<app>-<port>g.Z`: TLS terminated with ALPN h2, the decrypted stream tunnelled to `port` (h2c);
- `<instance-id>.Z` (and the `-<port>[s|g]` forms): one instance only;
- a custom domain from the domain table: its app and port (passthrough if the domain says so);
- a custom domain by TXT record (`custom_candidate` says which hosts may be one): the app and port
  its record names (`resolve_custom`, given the record the caller looked up; docs/custom-domains.md).

A label equal to an app or instance name wins over the `-<port>` reading, so an app called
`api-2` is reachable as `api-2.Z`.

Before any of that, `parse_authority` checks the syntax of a Host value (or a request target's
authority): a DNS name (letters, digits, `-`, `_`; labels of 1-63, at most 253 in all, one
trailing dot allowed), an IPv4 literal or a bracketed IPv6 literal without a zone id, and an
optional port of 1-65535. What it returns is the canonical form the gateway routes by and
forwards (lower case, no trailing dot); what it refuses is a 400 naming the rule.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass

from geomesh.app_address import DSTACK_OWNER, GEOMESH_OWNER, AppAddress, owner_name
from regional_gateway.proxy.routes import Routes

_PORT_FORM = re.compile(r"^([a-z0-9][a-z0-9-]*?)-([0-9]{1,5})([sg]?)$")
_LABEL = re.compile(r"[a-z0-9_-]{1,63}")


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


@dataclass(frozen=True, slots=True)
class Authority:
    """A checked Host value: `host` lower case without a trailing dot (IPv6 in brackets)."""

    host: str
    port: int | None = None

    def render(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class BadAuthority:
    reason: str


def parse_authority(raw: str) -> Authority | BadAuthority:
    """A Host header value or a target's authority -> its canonical form, or why it is refused.

    RFC 9110 section 7.2 and RFC 3986 section 3.2.2, kept to what a DNS name or an IP literal can
    be: an empty port (`name:`) is allowed and dropped, `name..`, `:99999`, `:abc`, a zone id, a
    user part and any other character are refused.
    """
    value = raw.strip(" \t")
    if not value:
        return BadAuthority("empty host")
    port: int | None = None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return BadAuthority("IPv6 literal without a closing ']'")
        name, rest = value[1:end], value[end + 1:]
        if "%" in name:
            return BadAuthority("IPv6 zone ids are not allowed in a host")
        try:
            host = f"[{ipaddress.IPv6Address(name).compressed}]"
        except ValueError:
            return BadAuthority(f"{name!r} is not an IPv6 address")
        if rest and not rest.startswith(":"):
            return BadAuthority("characters after the IPv6 literal")
        port_s = rest[1:] if rest else ""
    else:
        name, colon, port_s = value.partition(":")
        if ":" in port_s:
            return BadAuthority("more than one ':' (an IPv6 address must be in brackets)")
        host = name.lower()
        if host.endswith("."):
            host = host[:-1]
        if not host:
            return BadAuthority("empty host name")
        if len(host) > 253:
            return BadAuthority("host name over 253 characters")
        for label in host.split("."):
            if not label:
                return BadAuthority(f"empty label in {name!r}")
            if not _LABEL.fullmatch(label):
                return BadAuthority(f"label {label[:64]!r} is not 1-63 of a-z, 0-9, '-', '_'")
        if not colon:
            return Authority(host)
    if port_s:
        if not port_s.isascii() or not port_s.isdigit() or len(port_s) > 5 or not 1 <= int(port_s) <= 65535:
            return BadAuthority(f"port {port_s[:16]!r} is not 1-65535")
        port = int(port_s)
    return Authority(host, port)


def normalize_host(raw: str) -> str:
    """Lowercase, without a port and without a trailing dot ("" if unusable: see `parse_authority`)."""
    found = parse_authority(raw)
    return found.host if type(found) is Authority else ""


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


def custom_candidate(routes: Routes, host: str) -> bool:
    """May `host` (canonical, as `parse_authority` gives it) be a custom domain by TXT record? Not
    the zone or a name under it, not a configured domain, not an IP literal, at least two labels,
    and short enough for its TXT names to be domain names."""
    zone = routes.zone
    if not host or host == zone or host.endswith("." + zone) or host in routes.domains:
        return False
    if host.startswith("[") or "." not in host or host.rpartition(".")[2].isdigit():
        return False  # an IPv6 literal, a single label, an IPv4 literal (no TLD is all digits)
    return owner_name(GEOMESH_OWNER, host) is not None and owner_name(DSTACK_OWNER, host) is not None


def resolve_custom(routes: Routes, host: str, address: AppAddress) -> NameMatch | UnknownName:
    """The route target for a custom domain whose TXT record names `address`: its app on its port,
    as HTTP (TLS terminated on the TLS listener), if the app exists and exposes that port."""
    record = f"{address.owner}.{host}"
    if not routes.knows_app(address.app):
        return UnknownName(f"custom domain {host} names app {address.app!r}, which does not exist "
                           f"(TXT record {record})")
    why = routes.port_refusal(address.app, "", address.port)
    if why is not None:
        return UnknownName(f"custom domain {host} (TXT record {record}): {why}")
    return NameMatch(address.app, address.port, Mode.HTTP)
