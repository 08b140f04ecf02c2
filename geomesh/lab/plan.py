"""What the lab builds, decided before anything starts (pure).

From the region files: one gateway per region (its public address and ports), two instances of
the app `hello` in every region and two of `solo` in the last region only (so another region
must reach it over the mesh), instance addresses from each region's instance subnet. In loopback
mode (no root or no wireguard-go) public and instance addresses move to 127.0.0.0/8 instead.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from geomesh.regions_file import RegionFile

ZONE = "lab.geomesh.test"
APP_PORT = 8000


@dataclass(frozen=True, slots=True)
class LabGateway:
    name: str
    region: str
    public_ip: str
    wg_port: int
    proxy_port: int
    short: str  # namespace / interface tag


@dataclass(frozen=True, slots=True)
class LabInstance:
    app: str
    id: str
    region: str
    address: str
    port: int


@dataclass(frozen=True, slots=True)
class LabPlan:
    zone: str
    netns: bool
    gateways: tuple[LabGateway, ...]
    instances: tuple[LabInstance, ...]
    solo_region: str

    def gateway_of(self, region: str) -> LabGateway:
        return next(g for g in self.gateways if g.region == region)


def make_plan(regions: list[RegionFile], *, netns: bool) -> LabPlan:
    if len(regions) < 3:
        raise ValueError("the lab wants at least 3 regions in deploy/regions/")
    gateways: list[LabGateway] = []
    instances: list[LabInstance] = []
    solo_region = regions[-1].region.name
    for i, rf in enumerate(regions):
        spec = rf.gateways[0] if rf.gateways else None
        name = spec.name if spec else f"gw-{rf.region.name}-1"
        public_ip = spec.public_ip if (spec and netns) else f"127.0.1.{11 + i}"
        proxy_port = spec.proxy_port if spec else 8080
        gateways.append(LabGateway(name, rf.region.name, public_ip, spec.wg_port if spec else 51820,
                                   proxy_port, f"g{i}"))
        if netns and rf.region.instance_subnet:
            base = ipaddress.ip_network(rf.region.instance_subnet).network_address
            addrs = [str(base + 11), str(base + 12), str(base + 21), str(base + 22)]
        else:
            addrs = [f"127.0.2.{10 * i + k}" for k in (11, 12, 13, 14)]
        short = rf.region.name.split("-")[0][:2] + str(i)
        instances += [LabInstance("hello", f"hello-{short}-{k + 1}", rf.region.name, addrs[k], APP_PORT) for k in range(2)]
        if rf.region.name == solo_region:
            instances += [LabInstance("solo", f"solo-{short}-{k + 1}", rf.region.name, addrs[2 + k], APP_PORT)
                          for k in range(2)]
    return LabPlan(ZONE, netns, tuple(gateways), tuple(instances), solo_region)
