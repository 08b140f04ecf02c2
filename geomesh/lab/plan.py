"""What the lab builds, decided before anything starts (pure).

From the region files: every gateway a region file lists (one when it lists none: its public
address and ports), two instances of the app `hello` in every region and two of `solo` in the
last region only (so another region must reach it over the mesh), instance addresses from each
region's instance subnet. The instances live beside the region's *first* gateway
(`instance_host`); a second gateway of a region has no route to them, which is how the
end-to-end tests make two gateways of one region disagree about an instance's health. In
loopback mode (no root or no wireguard-go) public and instance addresses move to 127.0.0.0/8.
Every gateway has a TLS listener (`https_port`: 443 in namespaces, 8443 on loopback) serving the
zone certificate the coordinator obtains from the lab's pebble. The customer's zone
(`customer_zone`, a documentation name of RFC 2606) is served by the lab's gdnsd; its owner points
`custom_domain` at the app `hello` by TXT record in the walkthrough, and its certificate is
obtained on demand by ACME HTTP-01, which pebble validates at one port for every gateway
(`http01_port`): every gateway's plain `proxy_port` must be the same, or the plan is refused.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from geomesh.errors import ValidationError
from geomesh.regions_file import GatewaySpec, RegionFile

ZONE = "lab.geomesh.test"
APP_PORT = 8000
CUSTOMER_ZONE = "shop.example.net"  # the customer's own zone (the lab's gdnsd is its authority)
CUSTOM_DOMAIN = f"www.{CUSTOMER_ZONE}"  # the customer's domain for the app `hello`, by TXT record
HTTPS_PORTS = {True: 443, False: 8443}  # the gateways' TLS port in netns mode / on loopback


@dataclass(frozen=True, slots=True)
class LabGateway:
    name: str
    region: str
    public_ip: str
    wg_port: int
    proxy_port: int
    short: str  # namespace / interface tag
    https_port: int = 0  # the TLS listener (the zone certificate)


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
    customer_zone: str = CUSTOMER_ZONE
    custom_domain: str = CUSTOM_DOMAIN

    def gateway_of(self, region: str) -> LabGateway:
        """The region's first gateway: the one its instances live beside."""
        return next(g for g in self.gateways if g.region == region)

    def gateways_of(self, region: str) -> tuple[LabGateway, ...]:
        return tuple(g for g in self.gateways if g.region == region)

    def instance_host(self, gateway: str) -> bool:
        """Whether the region's instances live beside this gateway (its region's first)."""
        spec = next(g for g in self.gateways if g.name == gateway)
        return self.gateway_of(spec.region).name == gateway

    @property
    def regions(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(g.region for g in self.gateways))

    @property
    def http01_port(self) -> int:
        """The gateways' plain port, where the lab's pebble validates HTTP-01 (one for all)."""
        return self.gateways[0].proxy_port


def make_plan(regions: list[RegionFile], *, netns: bool) -> LabPlan:
    if len(regions) < 3:
        raise ValueError("the lab wants at least 3 regions in deploy/regions/")
    gateways: list[LabGateway] = []
    instances: list[LabInstance] = []
    solo_region = regions[-1].region.name
    for i, rf in enumerate(regions):
        specs = rf.gateways or (GatewaySpec(f"gw-{rf.region.name}-1", rf.region.name, ""),)
        for spec in specs:
            k = len(gateways)
            public_ip = spec.public_ip if (netns and spec.public_ip) else f"127.0.1.{11 + k}"
            gateways.append(LabGateway(spec.name, rf.region.name, public_ip, spec.wg_port, spec.proxy_port, f"g{k}",
                                       HTTPS_PORTS[netns]))
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
    ports = {g.proxy_port for g in gateways}
    if len(ports) > 1:
        odd = next(g for g in gateways if g.proxy_port != gateways[0].proxy_port)
        raise ValidationError("gateways.proxy_port", f"{odd.name} has {odd.proxy_port}, {gateways[0].name} "
                              f"{gateways[0].proxy_port}: the lab's pebble validates HTTP-01 at one port, so every "
                              "gateway's proxy_port must be the same")
    return LabPlan(ZONE, netns, tuple(gateways), tuple(instances), solo_region)
