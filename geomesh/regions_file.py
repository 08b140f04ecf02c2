"""Region files (`deploy/regions/*.toml`): one region and its gateways per file.

Parsed into validated `Region` values plus `GatewaySpec`s (the host-side facts of each gateway:
name, public address, ports). Errors name the file and the field.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from geomesh import validate
from geomesh.errors import ValidationError
from geomesh.model import Region


@dataclass(frozen=True, slots=True)
class GatewaySpec:
    name: str
    region: str
    public_ip: str
    wg_port: int = 51820
    proxy_port: int = 8080


@dataclass(frozen=True, slots=True)
class RegionFile:
    region: Region
    gateways: tuple[GatewaySpec, ...]


def load(path: Path) -> RegionFile:
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValidationError(str(path), f"is not valid TOML: {exc}") from None
    try:
        region = Region(name=data.get("name", ""), latitude=data.get("latitude", float("nan")),
                        longitude=data.get("longitude", float("nan")), display_name=data.get("display_name", ""),
                        instance_subnet=data.get("instance_subnet", ""))
        gws = []
        for i, g in enumerate(data.get("gateways", [])):
            gws.append(GatewaySpec(
                name=validate.dns_label(f"gateways[{i}].name", g.get("name", "")),
                region=region.name,
                public_ip=validate.ip_address(f"gateways[{i}].public_ip", g.get("public_ip", ""), version=4),
                wg_port=validate.port(f"gateways[{i}].wg_port", g.get("wg_port", 51820)),
                proxy_port=validate.port(f"gateways[{i}].proxy_port", g.get("proxy_port", 8080))))
    except ValidationError as exc:
        raise ValidationError(f"{path.name}: {exc.field}", exc.message) from None
    return RegionFile(region, tuple(gws))


def load_dir(directory: Path) -> list[RegionFile]:
    files = sorted(directory.glob("*.toml"))
    if not files:
        raise ValidationError(str(directory), "has no region files (*.toml)")
    out = [load(f) for f in files]
    names = [r.region.name for r in out]
    if len(set(names)) != len(names):
        raise ValidationError(str(directory), "defines a region twice")
    return out
