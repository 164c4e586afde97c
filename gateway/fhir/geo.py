"""Distances on the Earth for Location ``near`` (location.html#positional).

Positions are WGS84 latitude and longitude in degrees (``Location.position``).
Distances are great-circle distances on a sphere of the Earth's mean radius
(haversine formula): within 0.5% of the ellipsoid's, which is the accuracy the
specification leaves to servers ("Servers may search using various techniques
that might have differing accuracies").
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

#: the extension on ``Bundle.entry.search`` giving a match's distance
LOCATION_DISTANCE = "http://hl7.org/fhir/StructureDefinition/location-distance"

#: the Earth's mean radius (IUGG), kilometres
EARTH_RADIUS_KM = 6371.0088

#: distance units of a ``near`` search (UCUM), in kilometres; none given: km
UNIT_KM: dict[str, float] = {
    "km": 1.0,
    "m": 0.001,
    "[mi_i]": 1.609344,  # international mile
    "[mi_us]": 1.609347219,  # US survey mile
    "[nmi_i]": 1.852,  # international nautical mile
}


def valid_position(latitude: float, longitude: float) -> bool:
    return -90.0 <= latitude <= 90.0 and -180.0 <= longitude <= 180.0


def position_of(value: Any) -> tuple[float, float] | None:
    """A ``Location.position``'s latitude and longitude in degrees, when both are
    numbers on the globe (None otherwise)."""
    if not isinstance(value, dict):
        return None
    lat, lon = value.get("latitude"), value.get("longitude")
    if isinstance(lat, bool) or isinstance(lon, bool) \
            or not isinstance(lat, int | float | Decimal) \
            or not isinstance(lon, int | float | Decimal):
        return None
    la, lo = float(lat), float(lon)
    return (la, lo) if valid_position(la, lo) else None


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance between two positions, in kilometres."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    a = (math.sin((p2 - p1) / 2) ** 2
         + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2)
    return 2 * EARTH_RADIUS_KM * math.asin(math.sqrt(min(1.0, a)))


def latitude_band(latitude: float, km: float) -> tuple[float, float]:
    """The latitudes within ``km`` of ``latitude``: a range an index can scan before
    the exact distance is computed (a degree of latitude is the same length
    everywhere on a sphere)."""
    degrees = math.degrees(km / EARTH_RADIUS_KM)
    return max(-90.0, latitude - degrees), min(90.0, latitude + degrees)
