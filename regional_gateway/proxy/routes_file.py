"""The standalone routes file (TOML) -> `Routes` (+ optional `[server]` settings overrides).

Used by `geomesh-gateway --routes FILE` for a gateway without a coordinator (single region,
tests, benchmarks). Every rule broken is reported as a `ValidationError` naming the field by its
path in the file (`apps[1].backends[0].port`), so an operator can fix it without reading our
code; on SIGHUP an invalid file is refused and the routes in service stay. The format is
documented in docs/gateway-dataplane.md; in short:

    zone = "apps.example"          # required
    name = "gw-eu-1"               # this gateway (marks forwarded requests)
    region = "eu"                  # this gateway's region
    latitude = 48.86
    longitude = 2.35
    [health]                       # defaults for every app (see HealthCheck)
    [[apps]]                       # name, lb, backends, ports, proxy_protocol, health
                                   # ports: extra ports for `<app>-<port>` names; the backends' own
                                   # ports (and the domains') are always exposed, no other port is
    [[domains]]                    # fqdn, app, port, passthrough
    [[certificates]]               # cert, key (paths relative to the file)
    [[regions]]                    # other regions: name, latitude, longitude, apps, instances, gateways
    [server]                       # ProxySettings fields (flags override them)
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from geomesh.errors import ValidationError
from regional_gateway.proxy.certificates import load as load_certificate
from regional_gateway.proxy.routes import (
    AppRoute,
    Backend,
    CertificateSpec,
    DomainRoute,
    HealthCheck,
    RemoteGateway,
    RemoteRegion,
    Routes,
)
from regional_gateway.proxy.settings import ProxySettings

_TOP = {"zone", "name", "region", "latitude", "longitude", "health", "apps", "domains", "certificates",
        "regions", "server"}
_HEALTH = {f.name for f in dataclasses.fields(HealthCheck)}
_APP = {"name", "lb", "backends", "ports", "proxy_protocol", "health"}
_BACKEND = {"address", "port", "id"}
_DOMAIN = {"fqdn", "app", "port", "passthrough"}
_CERT = {"cert", "key"}
_REGION = {"name", "latitude", "longitude", "apps", "instances", "gateways"}
_GATEWAY = {"name", "mesh_ip", "proxy_port"}


def _table(where: str, value: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValidationError(where or "file", "must be a table")
    unknown = sorted(set(value) - allowed)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValidationError(f"{prefix}{unknown[0]}", f"is not a known field (known: {', '.join(sorted(allowed))})")
    return value


def _list(where: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ValidationError(where, "must be a list")
    return value


def _nested(where: str, build: Any) -> Any:
    """Run a constructor, prefixing the field of any ValidationError with `where`."""
    try:
        return build()
    except ValidationError as exc:
        raise ValidationError(f"{where}.{exc.field}", exc.message) from None
    except TypeError as exc:
        raise ValidationError(where, str(exc)) from None


def _health(where: str, value: Any, base: HealthCheck) -> HealthCheck:
    t = _table(where, value, _HEALTH)
    return _nested(where, lambda: dataclasses.replace(base, **t))


def _backend(where: str, value: Any) -> Backend:
    if isinstance(value, str):
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit():
            raise ValidationError(where, f"{value!r} is not address:port")
        return _nested(where, lambda: Backend(host.strip("[]"), int(port)))
    t = _table(where, value, _BACKEND)
    for k in ("address", "port"):
        if k not in t:
            raise ValidationError(f"{where}.{k}", "is required")
    return _nested(where, lambda: Backend(t["address"], t["port"], t.get("id", "")))


def parse_routes(data: dict[str, Any], base_dir: Path, *, check_files: bool = True) -> tuple[Routes, dict[str, Any]]:
    """Validate a parsed routes document; returns the routes and the raw `[server]` table."""
    top = _table("", data, _TOP)
    if "zone" not in top:
        raise ValidationError("zone", "is required")
    health = _health("health", top.get("health", {}), HealthCheck())
    apps: dict[str, AppRoute] = {}
    for i, raw in enumerate(_list("apps", top.get("apps", []))):
        where = f"apps[{i}]"
        t = _table(where, raw, _APP)
        if "name" not in t:
            raise ValidationError(f"{where}.name", "is required")
        backends = tuple(_backend(f"{where}.backends[{j}]", b) for j, b in enumerate(_list(f"{where}.backends",
                                                                                            t.get("backends", []))))
        app_health = _health(f"{where}.health", t.get("health", {}), health)
        ports = tuple(_list(f"{where}.ports", t.get("ports", [])))  # checked by AppRoute (geomesh.model.app_ports)
        pp = _bool(f"{where}.proxy_protocol", t.get("proxy_protocol", False))
        app = _nested(where, lambda t=t, b=backends, h=app_health, ports=ports, pp=pp: AppRoute(
            t["name"], t.get("lb", "round_robin"), b, ports, pp, h))
        if app.name in apps:
            raise ValidationError(f"{where}.name", f"app {app.name!r} is defined twice")
        apps[app.name] = app
    domains: dict[str, DomainRoute] = {}
    for i, raw in enumerate(_list("domains", top.get("domains", []))):
        where = f"domains[{i}]"
        t = _table(where, raw, _DOMAIN)
        for k in ("fqdn", "app"):
            if k not in t:
                raise ValidationError(f"{where}.{k}", "is required")
        d = _nested(where, lambda t=t: DomainRoute(t["fqdn"], t["app"], t.get("port", 0),
                                                   _bool("passthrough", t.get("passthrough", False))))
        if d.fqdn in domains:
            raise ValidationError(f"{where}.fqdn", f"{d.fqdn!r} is listed twice")
        domains[d.fqdn] = d
    certs = []
    for i, raw in enumerate(_list("certificates", top.get("certificates", []))):
        where = f"certificates[{i}]"
        t = _table(where, raw, _CERT)
        for k in ("cert", "key"):
            if not isinstance(t.get(k), str) or not t.get(k):
                raise ValidationError(f"{where}.{k}", "is required (a file path)")
        spec = CertificateSpec(base_dir / t["cert"], base_dir / t["key"])
        if check_files:
            load_certificate(spec, where)
        certs.append(spec)
    regions = []
    for i, raw in enumerate(_list("regions", top.get("regions", []))):
        where = f"regions[{i}]"
        t = _table(where, raw, _REGION)
        for k in ("name", "latitude", "longitude"):
            if k not in t:
                raise ValidationError(f"{where}.{k}", "is required")
        gws = []
        for j, g in enumerate(_list(f"{where}.gateways", t.get("gateways", []))):
            gt = _table(f"{where}.gateways[{j}]", g, _GATEWAY)
            for k in _GATEWAY:
                if k not in gt:
                    raise ValidationError(f"{where}.gateways[{j}].{k}", "is required")
            gws.append(_nested(f"{where}.gateways[{j}]",
                               lambda gt=gt: RemoteGateway(gt["name"], gt["mesh_ip"], gt["proxy_port"])))
        region_apps = _list(f"{where}.apps", t.get("apps", []))
        region_instances = _list(f"{where}.instances", t.get("instances", []))
        regions.append(_nested(where, lambda t=t, g=gws, a=region_apps, ri=region_instances: RemoteRegion(
            t["name"], t["latitude"], t["longitude"], frozenset(a), frozenset(ri), tuple(g))))
    known = set(apps) | {a for r in regions if r.gateways for a in r.apps}
    zone = top["zone"] if isinstance(top["zone"], str) else ""
    for i, d in enumerate(domains.values()):
        if d.app not in known:
            raise ValidationError(f"domains[{i}].app", f"{d.app!r} is not an app of this file (apps or regions)")
        if zone and (d.fqdn == zone.lower().rstrip(".") or d.fqdn.endswith("." + zone.lower().rstrip("."))):
            raise ValidationError(f"domains[{i}].fqdn", f"{d.fqdn!r} is inside the zone {zone!r}")
    try:
        routes = Routes(zone=top["zone"], self_name=top.get("name", ""), region=top.get("region", ""),
                        latitude=top.get("latitude"), longitude=top.get("longitude"), apps=apps, domains=domains,
                        regions=tuple(regions), certificates=tuple(certs))
    except TypeError as exc:
        raise ValidationError("file", str(exc)) from None
    server = _table("server", top.get("server", {}), set(ProxySettings.field_names()))
    return routes, server


def _bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValidationError(where, f"{value!r} is not true or false")
    return value


def load_routes(path: Path, *, check_files: bool = True) -> tuple[Routes, dict[str, Any]]:
    """Read and validate a routes file; raises ValidationError naming the field."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ValidationError("routes", f"cannot read {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValidationError("routes", f"{path} is not valid TOML: {exc}") from None
    routes, server = parse_routes(data, Path(path).resolve().parent, check_files=check_files)
    stat = Path(path).stat()
    routes = dataclasses.replace(routes, version=f"file:{int(stat.st_mtime)}")
    return routes, server
