"""Who is nearest: the client's place from GeoIP, and the region that should answer it.

`Locator` wraps a GeoIP2/GeoLite2 City database: `locate(packed_address, prefix)` returns the
`Place` of that network -- latitude and longitude when the database knows them, and the prefix
length of the database network actually used (which bounds the ECS scope). Private, reserved and
unknown addresses have no coordinates. Lookups are memoised per (address, prefix) because a City
record decodes into large dicts.

`region_order` and `choose` are pure: regions sorted by great-circle distance from the place
(`geomesh.geo`, ties by name); a place without coordinates stands at the default region, and
without a default region the order is by name. `choose` walks that order for an app: the nearest
healthy region hosting it, else the nearest healthy region it may be served from (its pinned
regions, or any region: that gateway forwards over the mesh). Healthy means with a reachable
gateway; when no region qualifies that way, the same walk over regions with any routable gateway
(reachable or not) picks the fail-open region, so an app that has gateways never gets NODATA
(`geodns.zone.records` then answers that region's routable addresses and flags the answer).
"""

from __future__ import annotations

import importlib.util
import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import maxminddb

from geodns.view import AppView, RegionView
from geomesh.geo import great_circle_km

_PREFIX_BITS = {4: 32, 16: 128}
_V4_MAPPED = b"\0" * 10 + b"\xff\xff"


def default_database() -> Path | None:
    """GeoLite2-City.mmdb as shipped by the `maxminddb-geolite2` package, when installed."""
    spec = importlib.util.find_spec("_maxminddb_geolite2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "GeoLite2-City.mmdb"
    return path if path.is_file() else None


@dataclass(frozen=True, slots=True)
class Place:
    latitude: float | None
    longitude: float | None
    prefix: int  # length of the database network used, never longer than the query's prefix
    network: bytes  # the address masked to `prefix` (4 or 16 octets)

    @property
    def known(self) -> bool:
        return self.latitude is not None


def mask(packed: bytes, prefix: int) -> bytes:
    bits = len(packed) * 8
    value = int.from_bytes(packed, "big") & (((1 << prefix) - 1) << (bits - prefix) if prefix else 0)
    return value.to_bytes(len(packed), "big")


class Locator:
    """GeoIP City lookups, memoised. Not thread-safe (one per process, used by one loop)."""

    def __init__(self, database: str | Path, memo_size: int = 131072) -> None:
        try:
            self._reader = maxminddb.open_database(str(database))
        except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
            raise ValueError(f"cannot open GeoIP database {database}: {exc}") from None
        meta = self._reader.metadata()
        if "City" not in meta.database_type:
            raise ValueError(f"{database} is a {meta.database_type} database, a City database is needed")
        self.database_type = meta.database_type
        self.build_epoch = meta.build_epoch
        self._memo: dict[tuple[bytes, int], Place] = {}
        self._memo_size = memo_size
        # database networks already decoded: (address bits, network value, prefix) -> (lat, lon)
        self._networks: dict[tuple[int, int, int], tuple[float | None, float | None]] = {}
        self._lengths: dict[int, list[int]] = {32: [], 128: []}  # prefix lengths seen, longest first

    def close(self) -> None:
        self._reader.close()

    def locate(self, packed: bytes, prefix: int | None = None) -> Place:
        """The place of `packed` (4 or 16 octets) taken as a /`prefix` network (default: the
        whole address)."""
        bits = _PREFIX_BITS[len(packed)]
        if prefix is None or prefix > bits:
            prefix = bits
        key = (packed, prefix)
        place = self._memo.get(key)
        if place is None:
            place = self._lookup(mask(packed, prefix), prefix)
            if len(self._memo) >= self._memo_size:
                self._memo.clear()
            self._memo[key] = place
        return place

    def _lookup(self, packed: bytes, prefix: int) -> Place:
        if len(packed) == 16 and packed[:12] == _V4_MAPPED and prefix >= 96:
            inner = self._lookup(packed[12:], prefix - 96)
            scope = inner.prefix + 96
            return Place(inner.latitude, inner.longitude, scope, mask(packed, scope))
        special = _special_prefix(packed)
        if special is not None:
            # private, loopback, documentation, ...: the database cannot place it
            scope = min(prefix, special)
            return Place(None, None, scope, mask(packed, scope))
        # a database network decoded before holds this address: no need to decode its record again
        bits = len(packed) * 8
        value = int.from_bytes(packed, "big")
        networks = self._networks
        for length in self._lengths[bits]:
            if length <= prefix:
                found = networks.get((bits, value >> (bits - length), length))
                if found is not None:
                    return Place(found[0], found[1], length, mask(packed, length))
        try:
            record, db_prefix = self._reader.get_with_prefix_len(socket.inet_ntop(
                socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed))
        except ValueError:
            record, db_prefix = None, prefix
        scope = min(prefix, db_prefix)
        lat = lon = None
        if isinstance(record, dict):
            loc = record.get("location")
            if isinstance(loc, dict):
                lat, lon = loc.get("latitude"), loc.get("longitude")
                if not isinstance(lat, (int, float)) or not isinstance(lon, (int, float)):
                    lat = lon = None
        if db_prefix <= prefix:  # the whole database network shares this record
            if len(networks) >= self._memo_size:
                networks.clear()
            networks[(bits, value >> (bits - db_prefix), db_prefix)] = (lat, lon)
            lengths = self._lengths[bits]
            if db_prefix not in lengths:
                lengths.append(db_prefix)
                lengths.sort(reverse=True)
        return Place(lat, lon, scope, mask(packed, scope))


def _special_prefix(packed: bytes) -> int | None:
    """The prefix length of the special-purpose block holding the address (e.g. 10.0.0.0/8)."""
    value = int.from_bytes(packed, "big")
    for net, netmask, length in (_SPECIAL_V4 if len(packed) == 4 else _SPECIAL_V6):
        if value & netmask == net:
            return length
    return None


def _blocks(*cidrs: str) -> list[tuple[int, int, int]]:
    out = []
    for cidr in cidrs:
        net = ipaddress.ip_network(cidr)
        out.append((int(net.network_address), int(net.netmask), net.prefixlen))
    return out


# special-purpose blocks (RFC 6890 and friends) that no GeoIP database places
_SPECIAL_V4 = _blocks("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
                      "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
                      "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4")
_SPECIAL_V6 = _blocks("::/127", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32", "fc00::/7",
                      "fe80::/10", "ff00::/8")


# -- pure choice ------------------------------------------------------------------------------


def region_order(regions: Mapping[str, RegionView], place: Place | None, default_region: str = "") -> list[RegionView]:
    """Regions from nearest to farthest from `place` (ties by name)."""
    if place is not None and place.known:
        lat, lon = place.latitude, place.longitude
    elif default_region in regions:
        home = regions[default_region]
        lat, lon = home.latitude, home.longitude
    else:
        return sorted(regions.values(), key=lambda r: r.name)
    assert lat is not None and lon is not None
    return sorted(regions.values(), key=lambda r: (great_circle_km(lat, lon, r.latitude, r.longitude), r.name))


def choose(app: AppView, order: list[RegionView]) -> RegionView | None:
    """The region whose gateways answer for `app`, given regions nearest first: by reachable
    gateways, else (fail-open) by routable ones."""
    allowed = set(app.pinned) if app.pinned else None
    for usable in (_healthy, _routable):
        for region in order:
            if region.name in app.hosting and usable(region):
                return region
        for region in order:
            if usable(region) and (allowed is None or region.name in allowed):
                return region
    return None


def _healthy(region: RegionView) -> bool:
    return region.healthy


def _routable(region: RegionView) -> bool:
    return region.routable
