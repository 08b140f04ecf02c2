"""Who is nearest: GeoIP places (checked against direct database reads) and the pure region choice."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import maxminddb
import pytest

from geodns.nearest import Locator, Place, choose, region_order
from geodns.view import AppView, RegionView


def test_places_match_the_database_including_remembered_networks(mmdb: Path) -> None:
    loc = Locator(mmdb)
    rng = random.Random(17)
    nets = [(rng.getrandbits(24) << 8).to_bytes(4, "big") for _ in range(3000)]
    with maxminddb.open_database(str(mmdb)) as db:
        for net in nets:
            place = loc.locate(net, 24)
            text = socket.inet_ntoa(net)
            if text.startswith(("10.", "127.", "0.")) or net[0] >= 224:
                continue  # special-purpose: never looked up
            record, db_prefix = db.get_with_prefix_len(text)
            where = (record or {}).get("location") or {}
            assert (place.latitude, place.longitude) == (where.get("latitude"), where.get("longitude")), text
            assert place.prefix == min(24, db_prefix), text
            assert place.network == (int.from_bytes(net, "big") >> (32 - place.prefix) << (32 - place.prefix)).to_bytes(4, "big")


@pytest.mark.parametrize("address, prefix, scope", [
    ("10.1.2.3", 32, 8), ("10.1.2.0", 24, 8), ("192.168.7.0", 24, 16), ("127.0.0.1", None, 8),
    ("192.0.2.0", 24, 24), ("100.64.1.0", 24, 10), ("::1", None, 127), ("fd00:1::", 48, 7),
    ("2001:db8::", 32, 32), ("2001:db8::", 48, 32),
])
def test_special_purpose_addresses_are_not_placed(mmdb: Path, address: str, prefix: int | None, scope: int) -> None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    place = Locator(mmdb).locate(socket.inet_pton(family, address), prefix)
    assert not place.known and place.prefix == scope


def test_ipv4_mapped_ipv6_is_placed_like_ipv4(mmdb: Path) -> None:
    loc = Locator(mmdb)
    v4 = loc.locate(socket.inet_aton("193.0.6.1"))
    mapped = loc.locate(socket.inet_pton(socket.AF_INET6, "::ffff:193.0.6.1"))
    assert v4.known and (mapped.latitude, mapped.longitude) == (v4.latitude, v4.longitude)
    assert mapped.prefix == v4.prefix + 96


def test_not_a_database(tmp_path: Path) -> None:
    bad = tmp_path / "x.mmdb"
    bad.write_bytes(b"not a database")
    with pytest.raises(ValueError, match="cannot open GeoIP database"):
        Locator(bad)


REGIONS = {
    "eu": RegionView("eu", 50.1, 8.7, ("192.0.2.1",)),
    "us": RegionView("us", 39.0, -77.5, ("192.0.2.2",)),
    "ap": RegionView("ap", 1.3, 103.8, ("192.0.2.3",)),
    "down": RegionView("down", 48.9, 2.4),  # Paris, no routable gateway
}
PARIS = Place(48.86, 2.35, 24, b"\0\0\0\0")
NOWHERE = Place(None, None, 8, b"\0\0\0\0")


def names(order: list[RegionView]) -> list[str]:
    return [r.name for r in order]


def test_region_order() -> None:
    assert names(region_order(REGIONS, PARIS, "us")) == ["down", "eu", "us", "ap"]
    assert names(region_order(REGIONS, NOWHERE, "us")) == ["us", "down", "eu", "ap"]  # stands at us
    assert names(region_order(REGIONS, NOWHERE, "")) == ["ap", "down", "eu", "us"]  # by name
    tie = {"b": RegionView("b", 0, 10), "a": RegionView("a", 0, -10)}
    assert names(region_order(tie, Place(0.0, 0.0, 24, b""), "")) == ["a", "b"]  # equal distance: by name


@pytest.mark.parametrize("app, want", [
    (AppView("web", frozenset({"eu", "us"})), "eu"),  # nearest hosting and healthy
    (AppView("web", frozenset({"down", "ap"})), "ap"),  # the nearer host is down: next host
    (AppView("web", frozenset({"down"})), "eu"),  # no healthy host: nearest healthy region
    (AppView("web", frozenset()), "eu"),
    (AppView("web", frozenset(), ("us",)), "us"),  # pinned: never leaves its regions
    (AppView("web", frozenset(), ("down",)), None),  # pinned region down: nothing to answer
])
def test_choose(app: AppView, want: str | None) -> None:
    got = choose(app, region_order(REGIONS, PARIS, ""))
    assert (got.name if got else None) == want
