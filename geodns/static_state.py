"""The static state file: a TOML description of the zone, regions, gateways and apps.

For DNS-only deployments and tests, geodns can run without a coordinator (`--state FILE`). The
file is read once at start and again on SIGHUP; a file that fails to load is reported and the
previous view stays in service. Every key is checked and unknown keys are refused, so a typo is
an error naming the key, never a silently ignored setting. Format (see docs/geodns.md):

    [zone]
    name = "geo.example.com"          # required
    nameservers = ["ns1=192.0.2.53"]  # NAME[=ADDR,...]; NAME without a dot is in the zone
    soa_rname = "hostmaster.geo.example.com"
    ttl = 30                          # A/AAAA answers
    negative_ttl = 30                 # SOA minimum and TTL of negative answers
    ns_ttl = 3600                     # NS records and name server addresses
    default_region = "eu-central"     # for clients the database cannot place
    serial = 0                        # SOA serial; 0 = the file's modification time

    [[regions]]
    name = "eu-central"
    latitude = 50.11
    longitude = 8.68
    gateways = [{ name = "eu-1", ipv4 = "192.0.2.10", ipv6 = "2001:db8::10" },
                { name = "eu-2", ipv4 = "192.0.2.11", state = "draining" },
                { name = "eu-3", ipv4 = "192.0.2.12", reachable = false }]
    # state: active | draining; alive (default true); reachable (default true): false = found
    # unreachable, answered only when no reachable gateway is left for a name (fail-open)

    [[apps]]
    name = "shop"
    regions = ["eu-central"]          # where it has healthy instances
    pinned_regions = []               # when set, answers never leave these regions
    instances = { shop-1 = "eu-central" }  # instance id = its region: <instance-id>.<zone> names
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from geodns.view import AppView, NameServer, RegionView, View, ZoneConfig, check_address
from geomesh import validate as v
from geomesh.errors import ValidationError

_ZONE_KEYS = {"name", "nameservers", "soa_rname", "ttl", "negative_ttl", "ns_ttl", "default_region", "serial"}
_REGION_KEYS = {"name", "latitude", "longitude", "display_name", "gateways"}
_GATEWAY_KEYS = {"name", "ipv4", "ipv6", "state", "alive", "reachable"}
_APP_KEYS = {"name", "regions", "pinned_regions", "instances"}
_TOP_KEYS = {"zone", "regions", "apps"}


class StateError(ValidationError):
    """The state file cannot be used; the message names the file and the key."""


def _check_keys(where: str, table: Any, allowed: set[str]) -> Mapping[str, Any]:
    if not isinstance(table, dict):
        raise ValidationError(where, "must be a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ValidationError(where, f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    return table


def _list(where: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ValidationError(where, "must be an array")
    return value


def zone_from(data: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> tuple[ZoneConfig, int]:
    """The zone settings of a state file's [zone] table (flags in `overrides` win) and its serial."""
    raw = dict(_check_keys("zone", data, _ZONE_KEYS))
    raw.update({k: val for k, val in (overrides or {}).items() if val is not None})
    if "name" not in raw:
        raise ValidationError("zone.name", "is required")
    name = v.fqdn("zone.name", raw["name"])
    ns_specs = _list("zone.nameservers", raw.get("nameservers", []))
    nameservers = []
    for i, spec in enumerate(ns_specs):
        if isinstance(spec, NameServer):
            nameservers.append(spec)
            continue
        if not isinstance(spec, str):
            raise ValidationError(f"zone.nameservers[{i}]", "must be a string NAME[=ADDR,...]")
        try:
            nameservers.append(NameServer.parse(spec, name))
        except ValidationError as exc:
            raise ValidationError(f"zone.nameservers[{i}]", exc.message) from None
    serial = raw.get("serial", 0)
    if not isinstance(serial, int) or isinstance(serial, bool) or not 0 <= serial <= 0xFFFFFFFF:
        raise ValidationError("zone.serial", f"{serial!r} is not a 32-bit unsigned integer")
    try:
        zone = ZoneConfig(name, tuple(nameservers), raw.get("soa_rname", ""),
                          raw.get("ttl", 30), raw.get("negative_ttl", 30), raw.get("ns_ttl", 3600),
                          raw.get("default_region", ""))
    except ValidationError as exc:
        raise ValidationError(f"zone.{exc.field}", exc.message) from None
    return zone, serial


def view_from(data: Mapping[str, Any], revision: int, overrides: Mapping[str, Any] | None = None) -> View:
    """The view described by parsed TOML `data`."""
    _check_keys("state", data, _TOP_KEYS)
    zone, serial = zone_from(data.get("zone", {}), overrides)
    regions = []
    names: set[str] = set()
    gateway_names: set[str] = set()
    for i, reg in enumerate(_list("regions", data.get("regions", []))):
        where = f"regions[{i}]"
        _check_keys(where, reg, _REGION_KEYS)
        rname = v.dns_label(f"{where}.name", reg.get("name", ""))
        if rname in names:
            raise ValidationError(f"{where}.name", f"region {rname!r} is listed twice")
        names.add(rname)
        lat = v.latitude(f"{where}.latitude", reg.get("latitude"))
        lon = v.longitude(f"{where}.longitude", reg.get("longitude"))
        v.text(f"{where}.display_name", reg.get("display_name", ""))
        v4: list[tuple[str, str]] = []  # reachable routable gateways
        v6: list[tuple[str, str]] = []
        all4: list[tuple[str, str]] = []  # every routable gateway
        all6: list[tuple[str, str]] = []
        for j, gw in enumerate(_list(f"{where}.gateways", reg.get("gateways", []))):
            gwhere = f"{where}.gateways[{j}]"
            _check_keys(gwhere, gw, _GATEWAY_KEYS)
            gname = v.dns_label(f"{gwhere}.name", gw.get("name", ""))
            if gname in gateway_names:
                raise ValidationError(f"{gwhere}.name", f"gateway {gname!r} is listed twice")
            gateway_names.add(gname)
            state = gw.get("state", "active")
            if state not in ("active", "draining"):
                raise ValidationError(f"{gwhere}.state", f"{state!r} is not active or draining")
            alive = gw.get("alive", True)
            if not isinstance(alive, bool):
                raise ValidationError(f"{gwhere}.alive", "must be true or false")
            reachable = gw.get("reachable", True)
            if not isinstance(reachable, bool):
                raise ValidationError(f"{gwhere}.reachable", "must be true or false")
            if "ipv4" not in gw and "ipv6" not in gw:
                raise ValidationError(gwhere, "needs ipv4, ipv6 or both")
            addrs = []
            for key, want in (("ipv4", 4), ("ipv6", 6)):
                if key in gw:
                    version, text = check_address(f"{gwhere}.{key}", gw[key])
                    if version != want:
                        raise ValidationError(f"{gwhere}.{key}", f"{gw[key]!r} is not an IPv{want} address")
                    addrs.append((key, text))
            if state == "active" and alive:
                for key, text in addrs:
                    (all4 if key == "ipv4" else all6).append((gname, text))
                    if reachable:
                        (v4 if key == "ipv4" else v6).append((gname, text))
        regions.append(RegionView(rname, lat, lon, *(tuple(ip for _, ip in sorted(x)) for x in (v4, v6, all4, all6))))
    if zone.default_region and zone.default_region not in names:
        raise ValidationError("zone.default_region", f"{zone.default_region!r} is not one of the regions")
    apps = []
    app_names: set[str] = set()
    placed: dict[str, set[str]] = {}
    for i, app in enumerate(_list("apps", data.get("apps", []))):
        where = f"apps[{i}]"
        _check_keys(where, app, _APP_KEYS)
        aname = v.dns_label(f"{where}.name", app.get("name", ""))
        if aname in app_names:
            raise ValidationError(f"{where}.name", f"app {aname!r} is listed twice")
        app_names.add(aname)
        hosting: list[str] = []
        pinned: tuple[str, ...] = ()
        for key in ("regions", "pinned_regions"):
            values = _list(f"{where}.{key}", app.get(key, []))
            for j, r in enumerate(values):
                if r not in names:
                    raise ValidationError(f"{where}.{key}[{j}]", f"{r!r} is not one of the regions")
            if key == "regions":
                hosting = values
            else:
                pinned = tuple(values)
        where_hosted = set(hosting) & set(pinned) if pinned else set(hosting)
        apps.append(AppView(aname, frozenset(where_hosted), pinned))
        instances = app.get("instances", {})
        if not isinstance(instances, dict):
            raise ValidationError(f"{where}.instances", "must be a table of instance id = region")
        for iid, r in instances.items():
            v.dns_label(f"{where}.instances", iid)
            if r not in names:
                raise ValidationError(f"{where}.instances.{iid}", f"{r!r} is not one of the regions")
            placed.setdefault(iid, set()).add(r)
    return View.build(zone, serial or revision, regions, apps, instances=placed)


def load(path: str | Path, overrides: Mapping[str, Any] | None = None) -> View:
    """Read and check a state file; raises StateError naming the file and the key."""
    p = Path(path)
    try:
        raw = p.read_bytes()
        mtime = int(p.stat().st_mtime)
    except OSError as exc:
        raise StateError(str(p), f"cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise StateError(str(p), f"is not valid TOML: {exc}") from None
    try:
        return view_from(data, mtime, overrides)
    except ValidationError as exc:
        raise StateError(f"{p}: {exc.field}", exc.message) from None
