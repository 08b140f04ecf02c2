"""Geographic maths: great-circle distance and "nearest region" ordering.

Pure functions used by geodns (which region answers a client) and by the gateways (which region
to forward to when the app has no healthy instance locally). Ties break on the region name, so
every process makes the same choice for the same inputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

EARTH_RADIUS_KM = 6371.0088


def great_circle_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Haversine distance in kilometres."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp = p2 - p1
    dl = math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def by_distance(lat: float, lon: float, places: Iterable[tuple[str, float, float]]) -> list[str]:
    """Names of `places` (name, lat, lon) from nearest to farthest; ties by name."""
    return [name for _, name in sorted((great_circle_km(lat, lon, plat, plon), name)
                                       for name, plat, plon in places)]
