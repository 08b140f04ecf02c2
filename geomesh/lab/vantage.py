"""Client vantage points for the lab: real addresses located on given continents.

Chosen from the GeoLite2 City database itself (the one geodns uses), so the lab's "a client in
Europe" is whatever that database says is in Europe: for each continent we probe the first
address of /16 networks in a fixed order and keep the first one the database places there with
coordinates. Deterministic for a given database.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

import maxminddb


@dataclass(frozen=True, slots=True)
class Vantage:
    continent: str      # GeoIP continent code: NA, EU, AS, ...
    address: str        # an address in that continent
    subnet: str         # its /24, what a resolver sends as EDNS Client Subnet
    country: str
    latitude: float
    longitude: float


def default_database() -> Path:
    import _maxminddb_geolite2  # shipped by the maxminddb-geolite2 package

    return Path(_maxminddb_geolite2.__file__).parent / "GeoLite2-City.mmdb"


def find(continents: tuple[str, ...] = ("NA", "EU", "AS"), database: Path | None = None) -> dict[str, Vantage]:
    found: dict[str, Vantage] = {}
    with maxminddb.open_database(str(database or default_database())) as reader:
        for first in range(1, 224):
            if len(found) == len(continents):
                break
            for second in range(0, 256, 7):
                addr = ipaddress.IPv4Address(f"{first}.{second}.1.1")
                if not addr.is_global:
                    continue
                rec = reader.get(str(addr))
                if not rec or "location" not in rec or "continent" not in rec:
                    continue
                code = rec["continent"].get("code", "")
                if code in continents and code not in found and rec["location"].get("accuracy_radius", 1000) <= 500:
                    net = ipaddress.ip_network(f"{addr}/24", strict=False)
                    found[code] = Vantage(code, str(addr), str(net), rec.get("country", {}).get("iso_code", "?"),
                                          rec["location"]["latitude"], rec["location"]["longitude"])
    missing = [c for c in continents if c not in found]
    if missing:
        raise LookupError(f"no address located in {', '.join(missing)} in the GeoIP database")
    return found
