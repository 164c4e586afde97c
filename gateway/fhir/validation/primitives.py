"""Checks of the R4 primitive types in their JSON form.

Spec: https://hl7.org/fhir/R4/datatypes.html#primitive (regular expressions)
and https://hl7.org/fhir/R4/json.html#primitive (JSON representation:
``boolean`` is JSON ``true``/``false``, integers are JSON integers, ``decimal``
is a JSON number, everything else a non-empty JSON string).

Each check takes the JSON value and returns ``None`` when it is valid, else a
short reason. Values come from ``gateway.fhir.json``: numbers are ``int``,
``float`` or :class:`~gateway.fhir.json.Number` (a ``Decimal`` that keeps its
text), so ``1.0`` is a float and never an integer.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from gateway.fhir.json import Number

Check = Callable[[Any], "str | None"]

#: strings may not exceed 1 MB (datatypes.html#string)
MAX_STRING = 1024 * 1024

_YEAR = r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)"
_MONTH = r"(0[1-9]|1[0-2])"
_DAY = r"(0[1-9]|[1-2][0-9]|3[0-1])"
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?"
_TZ = r"(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))"

DATE_RE = re.compile(rf"{_YEAR}(-{_MONTH}(-{_DAY})?)?")
DATETIME_RE = re.compile(rf"{_YEAR}(-{_MONTH}(-{_DAY}(T{_TIME}{_TZ})?)?)?")
INSTANT_RE = re.compile(rf"{_YEAR}-{_MONTH}-{_DAY}T{_TIME}{_TZ}")
TIME_RE = re.compile(_TIME)
ID_RE = re.compile(r"[A-Za-z0-9\-.]{1,64}")
CODE_RE = re.compile(r"[^\s]+( [^\s]+)*")
URI_RE = re.compile(r"\S+")
OID_RE = re.compile(r"urn:oid:[0-2](\.(0|[1-9][0-9]*))+")
UUID_RE = re.compile(r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_B64_CHARS = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_WS = re.compile(r"\s+")
# JSON number text of an integer: no fraction, no exponent
_INT_TEXT = re.compile(r"-?(0|[1-9][0-9]*)")

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def _string(value: Any) -> str | None:
    if type(value) is not str:
        return "must be a JSON string"
    if not value:
        return "must not be empty"
    if len(value) > MAX_STRING // 4 and len(value.encode()) > MAX_STRING:
        return "is longer than 1 MB"
    return None


def _matcher(rx: re.Pattern[str], what: str) -> Check:
    fullmatch = rx.fullmatch

    def check(value: Any) -> str | None:
        if type(value) is not str:
            return "must be a JSON string"
        if fullmatch(value) is None:
            return f"'{value[:60]}' is not a valid {what}"
        return None

    return check


_DAYS = (0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _calendar_ok(value: str) -> bool:
    """``2023-02-30`` matches the regular expression but is no date."""
    if len(value) < 10:
        return True
    day = int(value[8:10])
    if day <= 28:
        return True
    month = int(value[5:7])
    if month != 2:
        return day <= _DAYS[month]
    return day <= 28 + calendar.isleap(int(value[0:4]))


def _dated(rx: re.Pattern[str], what: str) -> Check:
    fullmatch = rx.fullmatch

    def check(value: Any) -> str | None:
        if type(value) is not str:
            return "must be a JSON string"
        if fullmatch(value) is None or not _calendar_ok(value):
            return f"'{value[:60]}' is not a valid {what}"
        return None

    return check


def _boolean(value: Any) -> str | None:
    return None if value is True or value is False else "must be a JSON boolean (true or false)"


def _integer_value(value: Any) -> int | None:
    t = type(value)
    if t is int:
        return int(value)
    if t is Number and _INT_TEXT.fullmatch(value.text):
        return int(value)
    return None


def _integer_check(low: int, what: str) -> Check:
    def check(value: Any) -> str | None:
        n = _integer_value(value)
        if n is None:
            return "must be a JSON integer"
        if n < low or n > INT32_MAX:
            return f"{n} is not a valid {what}"
        return None

    return check


def _decimal(value: Any) -> str | None:
    t = type(value)
    if t is int or t is Number or t is Decimal:
        return None
    if t is float:
        return None if value == value and value not in (float("inf"), float("-inf")) \
            else "is not a finite number"
    return "must be a JSON number"


def _base64(value: Any) -> str | None:
    if type(value) is not str:
        return "must be a JSON string"
    if not value:
        return "must not be empty"
    compact = _WS.sub("", value) if not value.isalnum() else value
    if len(compact) % 4 or _B64_CHARS.fullmatch(compact) is None:
        return "is not valid base64"
    return None


def _uri(value: Any) -> str | None:
    if type(value) is not str:
        return "must be a JSON string"
    if not value:
        return "must not be empty"
    if URI_RE.fullmatch(value) is None:
        return f"'{value[:60]}' is not a valid URI (no whitespace)"
    return None


def _xhtml(value: Any) -> str | None:
    # the content is checked by ``xhtml.check_narrative`` (txt-1, txt-2)
    return "must be a JSON string" if type(value) is not str else None


CHECKS: dict[str, Check] = {
    "boolean": _boolean,
    "integer": _integer_check(INT32_MIN, "integer"),
    "unsignedInt": _integer_check(0, "unsignedInt"),
    "positiveInt": _integer_check(1, "positiveInt"),
    "decimal": _decimal,
    "string": _string,
    "markdown": _string,
    "code": _matcher(CODE_RE, "code"),
    "id": _matcher(ID_RE, "id"),
    "uri": _uri,
    "url": _uri,
    "canonical": _uri,
    "oid": _matcher(OID_RE, "oid"),
    "uuid": _matcher(UUID_RE, "uuid"),
    "base64Binary": _base64,
    "date": _dated(DATE_RE, "date"),
    "dateTime": _dated(DATETIME_RE, "dateTime"),
    "instant": _dated(INSTANT_RE, "instant"),
    "time": _matcher(TIME_RE, "time"),
    "xhtml": _xhtml,
}

#: JSON shape of each primitive, for the "wrong JSON type" message
JSON_KIND: dict[str, str] = {
    "boolean": "boolean", "integer": "number", "unsignedInt": "number",
    "positiveInt": "number", "decimal": "number",
}

PRIMITIVES = frozenset(CHECKS)

#: the types FHIRPath ``System.String``-like comparisons may use directly
STRING_LIKE = frozenset(
    ("string", "markdown", "code", "id", "uri", "url", "canonical", "oid", "uuid",
     "base64Binary")
)
NUMERIC = frozenset(("integer", "unsignedInt", "positiveInt", "decimal"))
URI_LIKE = frozenset(("uri", "url", "canonical"))
