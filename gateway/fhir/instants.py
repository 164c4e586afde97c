"""The gateway's timestamps (epoch microseconds) as FHIR ``instant`` text.

One rendering for ``meta.lastUpdated``, ``Bundle.entry.response.lastModified``
(an ``instant``, not an HTTP date: https://hl7.org/fhir/R4/bundle-definitions.html#Bundle.entry.response.lastModified)
and notification timestamps: millisecond precision, UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache


@lru_cache(maxsize=4096)
def instant(micros: int) -> str:
    """``1700000000123000`` -> ``2023-11-14T22:13:20.123+00:00`` (remembered: the writes
    of one transaction and the notifications of one event share their time)."""
    return datetime.fromtimestamp(micros / 1_000_000, UTC).isoformat(timespec="milliseconds")
