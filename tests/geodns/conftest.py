"""Fixtures of the geodns tests: the real GeoLite2 City database, client networks drawn from it on
several continents, the test zone as a static state file, and running geomesh-dns processes."""

from __future__ import annotations

import ipaddress
import random
import socket
from dataclasses import dataclass
from pathlib import Path

import maxminddb
import pytest

from geodns.nearest import default_database
from geomesh.geo import great_circle_km

from .clients import DnsProcess

ZONE = "geo.example.com"

# name, lat, lon, gateways [(name, ipv4, ipv6, state)]
REGIONS = {
    "us-east": (39.04, -77.49, [("us-1", "192.0.2.10", "", "active"), ("us-2", "192.0.2.11", "2001:db8::11", "active")]),
    "eu-central": (50.11, 8.68, [("eu-1", "192.0.2.20", "2001:db8::20", "active"),
                                 ("eu-2", "192.0.2.21", "", "draining")]),
    "ap-southeast": (1.29, 103.85, [("ap-1", "192.0.2.30", "", "active")]),
    "sa-east": (-23.55, -46.63, [("sa-1", "192.0.2.40", "", "active")]),
    "af-south": (-33.92, 18.42, [("af-1", "192.0.2.50", "", "active")]),
    "au-east": (-33.87, 151.21, [("au-1", "192.0.2.60", "", "active")]),
    # unhealthy: its only gateway is draining
    "ap-northeast": (35.68, 139.69, [("jp-1", "192.0.2.70", "", "draining")]),
    # forty gateways: an answer too big for 512 octets
    "us-west": (37.34, -121.89, [(f"usw-{i}", f"198.51.100.{i + 1}", "", "active") for i in range(40)]),
}
HEALTHY = [r for r in REGIONS if r != "ap-northeast"]
PLACED = ["us-east", "eu-central", "ap-southeast", "sa-east", "af-south", "au-east"]
APPS = {
    "shop": [r for r in REGIONS if r != "us-west"],  # everywhere but the big region
    "blog": ["us-east"],
    "big": ["us-west"],
    "orphan": [],
}
PINNED = {"pinned": (["eu-central"], [])}  # name -> (pinned_regions, hosting)
DEFAULT_REGION = "eu-central"


def gateway_ip(region: str) -> set[str]:
    return {ip for _, ip, _, state in REGIONS[region][2] if state == "active"}


def state_toml(regions: dict = REGIONS, apps: dict = APPS, *, default_region: str = DEFAULT_REGION,
               extra_zone: str = "") -> str:
    out = ["[zone]", f'name = "{ZONE}"', 'nameservers = ["ns1=192.0.2.53", "ns2=192.0.2.54,2001:db8::54"]',
           f'default_region = "{default_region}"', "ttl = 30", "negative_ttl = 60", extra_zone, ""]
    for name, (lat, lon, gws) in regions.items():
        items = []
        for gname, v4, v6, state in gws:
            parts = [f'name = "{gname}"', f'ipv4 = "{v4}"'] + ([f'ipv6 = "{v6}"'] if v6 else [])
            parts.append(f'state = "{state}"')
            items.append("{ " + ", ".join(parts) + " }")
        out += ["[[regions]]", f'name = "{name}"', f"latitude = {lat}", f"longitude = {lon}",
                "gateways = [" + ", ".join(items) + "]", ""]
    for name, hosting in apps.items():
        out += ["[[apps]]", f'name = "{name}"', "regions = [" + ", ".join(f'"{r}"' for r in hosting) + "]", ""]
    for name, (pinned, hosting) in PINNED.items():
        out += ["[[apps]]", f'name = "{name}"', "regions = [" + ", ".join(f'"{r}"' for r in hosting) + "]",
                "pinned_regions = [" + ", ".join(f'"{r}"' for r in pinned) + "]", ""]
    return "\n".join(out)


@pytest.fixture(scope="session")
def mmdb() -> Path:
    path = default_database()
    if path is None:
        pytest.fail("GeoLite2-City.mmdb of the maxminddb-geolite2 package is missing (pip install -e '.[test]')")
    return path


@dataclass(frozen=True)
class Client:
    subnet: str  # "a.b.c.0/24"
    continent: str
    latitude: float
    longitude: float
    nearest: str  # nearest region among PLACED (clear winner)


def _nearest(lat: float, lon: float, regions: list[str]) -> list[tuple[float, str]]:
    return sorted((great_circle_km(lat, lon, REGIONS[r][0], REGIONS[r][1]), r) for r in regions)


@pytest.fixture(scope="session")
def clients(mmdb: Path) -> dict[str, list[Client]]:
    """For each region of PLACED, two /24s that the database places clearly nearest to it
    (>= 1000 km closer than to any other region), drawn at random with a fixed seed."""
    rng = random.Random(5)
    want = {r: 2 for r in PLACED}
    found: dict[str, list[Client]] = {r: [] for r in PLACED}
    with maxminddb.open_database(str(mmdb)) as db:
        for _ in range(400_000):
            if all(len(found[r]) >= n for r, n in want.items()):
                break
            net = (rng.getrandbits(24) << 8).to_bytes(4, "big")
            if not ipaddress.IPv4Address(net).is_global:
                continue
            rec = db.get(socket.inet_ntoa(net))
            loc = rec.get("location") if isinstance(rec, dict) else None
            if not loc or "latitude" not in loc:
                continue
            ranked = _nearest(loc["latitude"], loc["longitude"], PLACED + ["ap-northeast", "us-west"])
            (d1, best), (d2, _) = ranked[0], ranked[1]
            if best not in found or len(found[best]) >= want[best] or d2 - d1 < 1000:
                continue
            found[best].append(Client(f"{socket.inet_ntoa(net)}/24", rec["continent"]["code"],
                                      loc["latitude"], loc["longitude"], best))
    missing = [r for r, n in want.items() if len(found[r]) < n]
    assert not missing, f"the database gave no clear clients for {missing}"
    return found


@pytest.fixture(scope="session")
def japan_client(mmdb: Path) -> Client:
    """A /24 placed near Tokyo (its region ap-northeast is unhealthy in the test zone)."""
    rng = random.Random(11)
    with maxminddb.open_database(str(mmdb)) as db:
        for _ in range(2_000_000):
            net = (rng.getrandbits(24) << 8).to_bytes(4, "big")
            rec = db.get(socket.inet_ntoa(net))
            loc = rec.get("location") if isinstance(rec, dict) else None
            if not loc or "latitude" not in loc:
                continue
            ranked = _nearest(loc["latitude"], loc["longitude"], list(REGIONS))
            if ranked[0][1] == "ap-northeast" and ranked[0][0] < 300:
                return Client(f"{socket.inet_ntoa(net)}/24", rec["continent"]["code"], loc["latitude"],
                              loc["longitude"], "ap-northeast")
    pytest.fail("no Japanese network found in the database")


@pytest.fixture(scope="session")
def ipv6_client(mmdb: Path) -> tuple[str, str]:
    """An IPv6 /48 the database places clearly nearest to one of PLACED: (subnet, region)."""
    rng = random.Random(3)
    with maxminddb.open_database(str(mmdb)) as db:
        for _ in range(200_000):
            # 2a00::/12 (RIPE: mostly Europe) and 2400::/12 (APNIC)
            top = rng.choice([0x2A00, 0x2400]) | rng.getrandbits(4)
            addr = ipaddress.IPv6Address((top << 112) | (rng.getrandbits(32) << 80))
            rec = db.get(str(addr))
            loc = rec.get("location") if isinstance(rec, dict) else None
            if not loc or "latitude" not in loc:
                continue
            ranked = _nearest(loc["latitude"], loc["longitude"], PLACED + ["ap-northeast", "us-west"])
            if ranked[0][1] in PLACED and ranked[1][0] - ranked[0][0] > 1000:
                return f"{addr}/48", ranked[0][1]
    pytest.fail("no IPv6 network placed by the database")


@pytest.fixture(scope="module")
def static_dns(tmp_path_factory: pytest.TempPathFactory, mmdb: Path):
    """geomesh-dns serving the test zone from a static state file (one per test module)."""
    work = tmp_path_factory.mktemp("geodns")
    state = work / "state.toml"
    state.write_text(state_toml())
    proc = DnsProcess(work, "--state", str(state), "--geoip-db", str(mmdb), "--log-format", "json",
                      "--tcp-idle-timeout", "1.5", "--metrics-port", "0")
    proc.state = state  # type: ignore[attr-defined]
    proc.start()
    yield proc
    proc.stop()
