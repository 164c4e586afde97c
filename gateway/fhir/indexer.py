"""Search-index extraction: FHIR R4 resource -> rows of the ``sp_*`` index tables.

Each SearchParameter's FHIRPath ``expression`` is compiled once (per resource
type) into Python closures by :mod:`gateway.fhir.paths`; expressions the compiler
does not translate are evaluated with ``fhirpathpy`` instead (see
:meth:`Indexer.fallbacks`).  Values are then turned into rows according to the
parameter type and the FHIR type of the value, following
https://hl7.org/fhir/R4/search.html.

Row shapes (the caller prefixes ``res_type``/``res_id``):

``sp_string``    ``(param, value, exact)``
``sp_token``     ``(param, system, code, display)``
``sp_date``      ``(param, lo, hi)``              inclusive epoch microseconds
``sp_number``    ``(param, lo, hi)``              floats
``sp_quantity``  ``(param, system, code, unit, lo, hi)``
``sp_reference`` ``(param, target_type, target_id, target_version, url,
                  ident_system, ident_value)``
``sp_uri``       ``(param, value)``
``sp_composite`` ``(param, a_system, a_code,`` + :data:`COMPOSITE_COLUMNS` ``)``: a
                 composite parameter of a token and one other component, one row
                 per element its expression selects and pair of component values
                 found on that element (the second component's value in the
                 columns its own table uses; dates in ``dlo``/``dhi``). Also,
                 under a token parameter's code, an Identifier's type coding
                 with its system and value (``:of-type``).
"""

from __future__ import annotations

import copy
import logging
import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import orjson

from gateway.fhir.geo import position_of
from gateway.fhir.paths import (
    Branch,
    CompileError,
    Compiler,
    LiteralOutOfRange,
    Model,
    Step,
    reference_target_type,
    root_name,
    split_union,
)
from gateway.fhir.references import rewrite
from gateway.settings import Settings

log = logging.getLogger(__name__)

Row = tuple[Any, ...]
Rows = list[Row]
Converter = Callable[[str, Any, Rows], None]

TABLES: tuple[str, ...] = (
    "sp_string",
    "sp_token",
    "sp_date",
    "sp_number",
    "sp_quantity",
    "sp_reference",
    "sp_uri",
    "sp_composite",
    "sp_coords",
)
TABLE_FOR_TYPE: dict[str, str] = {
    "composite": "sp_composite",
    "string": "sp_string",
    "token": "sp_token",
    "date": "sp_date",
    "number": "sp_number",
    "quantity": "sp_quantity",
    "reference": "sp_reference",
    "uri": "sp_uri",
    # the one special parameter of R4 with an expression: Location near (a position)
    "special": "sp_coords",
}

#: ``sp_composite``'s columns for the second component, after ``a_system``, ``a_code``
COMPOSITE_COLUMNS: tuple[str, ...] = (
    "system", "code", "unit", "lo", "hi", "dlo", "dhi", "value", "exact",
    "target_type", "target_id", "target_version", "url", "ident_system", "ident_value",
)
#: each table's value columns as named in ``sp_composite``
_COMPONENT_COLUMNS: dict[str, tuple[str, ...]] = {
    "sp_string": ("value", "exact"),
    "sp_token": ("system", "code", "display"),
    "sp_date": ("dlo", "dhi"),
    "sp_number": ("lo", "hi"),
    "sp_quantity": ("system", "code", "unit", "lo", "hi"),
    "sp_reference": ("target_type", "target_id", "target_version", "url", "ident_system",
                     "ident_value"),
    "sp_uri": ("value",),
}
#: the composites indexed and searched: a token, then one of these
COMPOSITE_SECOND = frozenset({"token", "quantity", "number", "date", "string", "reference",
                              "uri"})


class _Composite(Protocol):
    @property
    def type(self) -> str: ...
    @property
    def parts(self) -> Sequence[_Composite]: ...


def composite_supported(sp: _Composite) -> bool:
    """Indexed and searched: a composite of a token and one other component."""
    parts = sp.parts
    return (sp.type == "composite" and len(parts) == 2 and parts[0].type == "token"
            and parts[1].type in COMPOSITE_SECOND)


def _spreader(table: str) -> Callable[[Row], Row]:
    """A component row of ``table`` -> its values in :data:`COMPOSITE_COLUMNS` order."""
    names = _COMPONENT_COLUMNS[table]
    picks = tuple(names.index(c) + 1 if c in names else 0 for c in COMPOSITE_COLUMNS)

    def spread(row: Row) -> Row:
        return tuple(row[i] if i else None for i in picks)

    return spread


#: Longest text stored in an index column that no database index covers (sp_string's
#: ``exact``, displays); longer values are truncated.
MAX_LEN = 2000
#: Longest text, in UTF-8 bytes, of a column that database indexes cover (PostgreSQL's
#: B-tree takes at most 2,704 bytes per entry, and some indexes hold two such
#: columns): longer values are clipped (:func:`clip`), and so are search values.
MAX_KEY_BYTES = 800


def clip(s: str) -> str:
    """``s`` cut to :data:`MAX_KEY_BYTES` of UTF-8 (at a character boundary)."""
    if len(s) <= MAX_KEY_BYTES // 4:  # no character takes more than four bytes
        return s
    raw = s.encode("utf-8", "surrogatepass")
    if len(raw) <= MAX_KEY_BYTES:
        return s
    return raw[:MAX_KEY_BYTES].decode("utf-8", "ignore")


def clip_normalized(s: str) -> str:
    """:func:`clip` of a :func:`normalize_string` result, still normalised (no
    trailing space): what string rows hold and string searches look for."""
    return clip(s).rstrip(" ")
#: Open ends of date ranges (Period without start/end).
DATE_MIN = -(2**62)
DATE_MAX = 2**62
#: Open ends of number/quantity ranges (Range without low/high, comparators).
NUM_MIN = -1e300
NUM_MAX = 1e300
ISO4217 = "urn:iso:std:iso:4217"

#: Parameters kept on the resource row by the storage, never indexed here.
NOT_INDEXED = frozenset({"_id", "_lastUpdated"})

#: Bundle parameters whose value is the Bundle's first resource itself (R4:
#: ``Bundle.entry[0].resource``), by the type that resource must have. Such a
#: resource is not stored on its own, so a chain into it (``Bundle?composition.
#: subject=…``) has nothing to join: its index rows are kept as the Bundle's own,
#: under ``<parameter>.<its parameter>`` (``composition.subject``).
EMBEDDED: dict[str, str] = {"composition": "Composition", "message": "MessageHeader"}

_QUANTITY_TYPES = frozenset(
    {"Quantity", "Age", "Duration", "Distance", "Count", "SimpleQuantity", "MoneyQuantity"}
)
_TEXT_TYPES = frozenset(
    {"string", "markdown", "code", "id", "uri", "url", "canonical", "oid", "uuid", "xhtml"}
)
_NUMBER_TYPES = frozenset({"integer", "decimal", "positiveInt", "unsignedInt"})
_DATE_TYPES = frozenset({"date", "dateTime", "instant"})


# --------------------------------------------------------------------------- definitions


@dataclass(frozen=True, slots=True)
class SearchParam:
    code: str
    type: str  # number|date|string|token|reference|composite|quantity|uri|special
    url: str
    base: tuple[str, ...]
    expression: str | None
    targets: tuple[str, ...] = ()
    modifiers: tuple[str, ...] = ()
    comparators: tuple[str, ...] = ()
    chains: tuple[str, ...] = ()
    multiple_or: bool | None = None
    multiple_and: bool | None = None
    #: composite parameters: (component definition url, component expression)
    components: tuple[tuple[str, str], ...] = ()
    #: composite parameters: the components' definitions, each with the component's
    #: expression (relative to an element the composite's expression selects); empty
    #: when a component's definition is unknown
    parts: tuple[SearchParam, ...] = ()
    #: (set per resource type by :meth:`Indexer.params_for`) the parameters whose
    #: index rows are this one's too: it has the same expression as one of them
    #: (Patient ``phonetic`` is ``name``) or is their union (Observation
    #: ``combo-code`` is ``code | component-code``). It gets no rows of its own.
    stored_as: tuple[str, ...] = ()

    @property
    def table(self) -> str | None:
        """The index table holding this parameter's rows (None: not indexed)."""
        return TABLE_FOR_TYPE.get(self.type)

    @classmethod
    def from_resource(cls, sp: dict[str, Any]) -> SearchParam:
        def strs(key: str) -> tuple[str, ...]:
            v = sp.get(key)
            return tuple(x for x in v if isinstance(x, str)) if isinstance(v, list) else ()

        def opt_bool(key: str) -> bool | None:
            v = sp.get(key)
            return v if isinstance(v, bool) else None

        expression = sp.get("expression")
        components = tuple(
            (str(c.get("definition", "")), str(c.get("expression", "")))
            for c in sp.get("component") or ()
            if isinstance(c, dict)
        )
        return cls(
            code=str(sp["code"]),
            type=str(sp["type"]),
            url=str(sp.get("url", "")),
            base=strs("base"),
            expression=expression if isinstance(expression, str) and expression else None,
            targets=strs("target"),
            modifiers=strs("modifier"),
            comparators=strs("comparator"),
            chains=strs("chain"),
            multiple_or=opt_bool("multipleOr"),
            multiple_and=opt_bool("multipleAnd"),
            components=components,
        )


# --------------------------------------------------------------------------- value helpers


def normalize_string(s: str) -> str:
    """Search normalisation: NFKD, no combining marks, casefolded, single spaces, stripped."""
    if s.isascii():
        return " ".join(s.lower().split())
    s = "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c))
    s = s.casefold()
    if not s.isascii():
        s = "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c))
    return " ".join(s.split())


_DATE_RE = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?"
    r"(Z|[+-]\d{2}:\d{2})?)?)?)?"
)
_EPOCH = date(1970, 1, 1).toordinal()
_DAY = 86_400_000_000
_UTC = ZoneInfo("UTC")
_local_zone = ZoneInfo(Settings().local_timezone)


def _days(y: int, m: int, d: int) -> int:
    return date(y, m, d).toordinal() - _EPOCH


def set_local_timezone(name: str) -> None:
    """Take dates and times without a zone in ``name`` (IANA) from now on (the
    server's local time zone, ``CAREPATH_TIMEZONE``)."""
    global _local_zone
    _local_zone = ZoneInfo(name)


def local_timezone() -> ZoneInfo:
    """The zone dates and times without one are taken in."""
    return _local_zone


def date_bounds(text: str, zone: ZoneInfo | None = None) -> tuple[int, int] | None:
    """Inclusive epoch-microsecond bounds of a FHIR date/dateTime/instant, or None.

    The bounds cover the value's precision: ``2020`` is all of 2020, ``2020-05``
    the month, ``2020-05-17`` the whole day, ``2020-05-17T10:00+02:00`` one
    minute, ``2020-05-17T10:00:00+02:00`` one second, ``...:00.5Z`` 100 ms.
    A value without a timezone is taken in ``zone``, by default the server's
    local time zone (:func:`set_local_timezone`; search.html#date): a day is
    that zone's day, with the offset of its date (summer time).  Anything else
    (bad shape, impossible date such as ``2021-02-30``, a non-string) gives None.
    """
    if not isinstance(text, str) or len(text) > 64:
        return None
    return _date_bounds(text, zone or _local_zone)


@lru_cache(maxsize=8192)
def _date_bounds(text: str, zone: ZoneInfo) -> tuple[int, int] | None:
    m = _DATE_RE.fullmatch(text.strip())
    if m is None:
        return None
    ys, ms, ds, hs, mins, ss, fs, tz = m.groups()
    try:
        y = int(ys)
        if y < 1:
            return None
        if ms is None:
            lo = _days(y, 1, 1) * _DAY
            return _local(lo, (_days(y, 12, 31) + 1) * _DAY, zone)
        mo = int(ms)
        if ds is None:
            lo = _days(y, mo, 1) * _DAY
            end = _days(y, 12, 31) + 1 if mo == 12 else _days(y, mo + 1, 1)
            return _local(lo, end * _DAY, zone)
        day = _days(y, mo, int(ds))
        if hs is None:
            return _local(day * _DAY, (day + 1) * _DAY, zone)
        h, mi = int(hs), int(mins)
        if h > 23 or mi > 59:
            return None
        us = day * _DAY + (h * 3600 + mi * 60) * 1_000_000
        if ss is None:
            width = 60_000_000
        else:
            sec = int(ss)
            if sec > 59:
                return None
            us += sec * 1_000_000
            if fs is None:
                width = 1_000_000
            elif len(fs) >= 6:
                us += int(fs[:6])
                width = 1
            else:
                width = 10 ** (6 - len(fs))
                us += int(fs) * width
        if tz is None:
            us -= _utc_offset(us, zone)
        elif tz != "Z":
            oh, om = int(tz[1:3]), int(tz[4:6])
            if oh > 23 or om > 59:
                return None
            offset = (oh * 60 + om) * 60_000_000
            us += -offset if tz[0] == "+" else offset
        return us, us + width - 1
    except ValueError:
        return None


_EPOCH_TIME = datetime(1970, 1, 1)
_WALL_MAX = (date.max.toordinal() - _EPOCH + 1) * _DAY - 1


def _local(lo: int, end: int, zone: ZoneInfo) -> tuple[int, int]:
    """Bounds of the local wall-clock span ``[lo, end)`` (epoch microseconds as if UTC)."""
    return lo - _utc_offset(lo, zone), end - _utc_offset(end, zone) - 1


def _utc_offset(wall: int, zone: ZoneInfo) -> int:
    """``zone``'s UTC offset (microseconds) at local wall-clock time ``wall``."""
    if zone is _UTC:
        return 0
    offset = zone.utcoffset(_EPOCH_TIME + timedelta(microseconds=min(wall, _WALL_MAX)))
    return 0 if offset is None else offset // timedelta(microseconds=1)


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float | Decimal):
        return None
    try:
        f = float(v)
    except (ValueError, OverflowError):
        return None
    return f if math.isfinite(f) else None


def _str(v: Any) -> str | None:
    return clip(v) if isinstance(v, str) and v else None


def _display(v: Any) -> str | None:
    if not isinstance(v, str):
        return None
    n = normalize_string(v)[:MAX_LEN]
    return n or None


_REL_REF = re.compile(
    r"([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/([A-Za-z0-9\-.]{1,64}))?"
)
_ABS_REF = re.compile(
    r"([A-Za-z][A-Za-z0-9+.\-]*://.+?)/([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})"
    r"(?:/_history/([A-Za-z0-9\-.]{1,64}))?"
)


# --------------------------------------------------------------------------- converters


class _Converters:
    """Value -> rows, per (parameter type, FHIR type)."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.resource_types = model.resource_types
        c = self
        self.table: dict[str, dict[str, Converter]] = {
            "string": {
                **dict.fromkeys(_TEXT_TYPES, c.string_text),
                "HumanName": c.string_name,
                "Address": c.string_address,
                "CodeableConcept": c.string_cc,
                "Coding": c.string_coding,
                "Annotation": c.string_annotation,
                "ContactPoint": c.string_contact,
            },
            "token": {
                **dict.fromkeys(_TEXT_TYPES, c.token_text),
                "CodeableConcept": c.token_cc,
                "Coding": c.token_coding,
                "Identifier": c.token_identifier,
                "ContactPoint": c.token_contact,
                "boolean": c.token_boolean,
                **dict.fromkeys(_NUMBER_TYPES, c.token_number),
                "Reference": c.token_reference,
            },
            "date": {
                **dict.fromkeys(_DATE_TYPES, c.date_text),
                "Period": c.date_period,
                "Timing": c.date_timing,
            },
            "number": {
                **dict.fromkeys(_NUMBER_TYPES, c.number_value),
                "Range": c.number_range,
                **dict.fromkeys(_QUANTITY_TYPES, c.number_quantity),
            },
            "quantity": {
                **dict.fromkeys(_QUANTITY_TYPES, c.quantity),
                "Money": c.quantity_money,
                "Range": c.quantity_range,
                **dict.fromkeys(_NUMBER_TYPES, c.quantity_number),
            },
            "reference": {
                "Reference": c.reference,
                "canonical": c.reference_uri,
                "uri": c.reference_uri,
                "url": c.reference_uri,
                "Resource": c.reference_resource,
                "Attachment": c.reference_attachment,
                "Identifier": c.reference_identifier,
            },
            "uri": dict.fromkeys(("uri", "url", "canonical", "oid", "uuid", "string"), c.uri),
            "special": {"BackboneElement": c.coords},
        }

    def for_type(self, param_type: str, fhir_type: str | None) -> Converter | None:
        """The converter for values of ``fhir_type`` (None: decided per value)."""
        convs = self.table.get(param_type)
        if convs is None:
            return None
        if fhir_type is None or fhir_type in ("Extension", "Element"):
            return self._dynamic(param_type)
        conv = convs.get(fhir_type)
        if conv is None:
            for sup in convs:  # profiles / specialisations (e.g. SimpleQuantity)
                if self.model.is_subtype(fhir_type, sup):
                    return convs[sup]
        return conv

    def _dynamic(self, param_type: str) -> Converter:
        convs = self.table[param_type]

        def dynamic(code: str, v: Any, out: Rows) -> None:
            value, t = self.typed(v, param_type)
            if t is not None:
                conv = convs.get(t)
                if conv is not None:
                    conv(code, value, out)

        return dynamic

    def typed(self, v: Any, param_type: str) -> tuple[Any, str | None]:
        """Guess the FHIR type of an untyped value (fallback results, extensions)."""
        if isinstance(v, bool):
            return v, "boolean"
        if isinstance(v, int | float | Decimal):
            return v, "decimal"
        if isinstance(v, str):
            if param_type == "date":
                return v, "dateTime"
            if param_type == "reference":
                return v, "uri"
            return v, "string"
        if not isinstance(v, dict):
            return v, None
        if "url" in v and not ("reference" in v or "contentType" in v):
            for key, value in v.items():  # an Extension: index its value[x]
                if key.startswith("value") and len(key) > 5:
                    t = self.model.type_by_suffix.get(key[5:])
                    if t is not None:
                        return value, t
            return v, None
        if "resourceType" in v:
            return v, "Resource"
        if "reference" in v or ("identifier" in v and param_type == "reference"):
            return v, "Reference"
        if "coding" in v or ("text" in v and len(v) == 1 and param_type == "token"):
            return v, "CodeableConcept"
        if "family" in v or "given" in v:
            return v, "HumanName"
        if "line" in v or "city" in v or "postalCode" in v:
            return v, "Address"
        if "low" in v or "high" in v:
            return v, "Range"
        if "start" in v or "end" in v:
            return v, "Period"
        if "event" in v or "repeat" in v:
            return v, "Timing"
        if "currency" in v:
            return v, "Money"
        if "value" in v and _num(v.get("value")) is not None:
            return v, "Quantity"
        if "value" in v and v.get("system") in (
            "phone", "fax", "email", "pager", "url", "sms", "other"
        ):
            return v, "ContactPoint"
        if "value" in v:
            return v, "Identifier"
        if "code" in v or "system" in v or "display" in v:
            return v, "Coding"
        return v, None

    # ---- string

    @staticmethod
    def _add_string(code: str, s: Any, out: Rows) -> None:
        if isinstance(s, str):
            value = normalize_string(s)
            if value:
                out.append((code, clip_normalized(value), s[:MAX_LEN]))

    def string_text(self, code: str, v: Any, out: Rows) -> None:
        self._add_string(code, v, out)

    def _string_parts(self, code: str, v: Any, out: Rows, single: tuple[str, ...],
                      multi: tuple[str, ...]) -> None:
        if not isinstance(v, dict):
            return
        add = self._add_string
        for key in single:
            s = v.get(key)
            if s is not None:
                add(code, s, out)
        for key in multi:
            items = v.get(key)
            if isinstance(items, list):
                for s in items:
                    add(code, s, out)
            elif items is not None:
                add(code, items, out)

    def string_name(self, code: str, v: Any, out: Rows) -> None:
        self._string_parts(code, v, out, ("family", "text"), ("given", "prefix", "suffix"))

    def string_address(self, code: str, v: Any, out: Rows) -> None:
        self._string_parts(
            code, v, out, ("city", "district", "state", "postalCode", "country", "text"), ("line",)
        )

    def string_cc(self, code: str, v: Any, out: Rows) -> None:
        if isinstance(v, dict):
            self._add_string(code, v.get("text"), out)
            for c in v.get("coding") or ():
                self.string_coding(code, c, out)

    def string_coding(self, code: str, v: Any, out: Rows) -> None:
        if isinstance(v, dict):
            self._add_string(code, v.get("display"), out)

    def string_annotation(self, code: str, v: Any, out: Rows) -> None:
        if isinstance(v, dict):
            self._add_string(code, v.get("text"), out)

    def string_contact(self, code: str, v: Any, out: Rows) -> None:
        if isinstance(v, dict):
            self._add_string(code, v.get("value"), out)

    # ---- token

    def token_text(self, code: str, v: Any, out: Rows) -> None:
        if isinstance(v, str) and v:
            out.append((code, None, clip(v), None))

    def token_number(self, code: str, v: Any, out: Rows) -> None:
        if _num(v) is not None:
            out.append((code, None, str(v), None))

    def token_boolean(self, code: str, v: Any, out: Rows) -> None:
        if isinstance(v, bool):
            out.append((code, None, "true" if v else "false", None))

    def token_coding(self, code: str, v: Any, out: Rows) -> None:
        self._coding_row(code, v, out, None)

    def _coding_row(self, code: str, v: Any, out: Rows, fallback_display: str | None) -> str | None:
        """Append the row of a Coding; returns the display used."""
        if not isinstance(v, dict):
            return None
        system, value = _str(v.get("system")), _str(v.get("code"))
        display = _display(v.get("display")) or fallback_display
        if value is None and system is None and display is None:
            return None
        out.append((code, system, value, display))
        return display

    def token_cc(self, code: str, v: Any, out: Rows) -> None:
        if not isinstance(v, dict):
            return
        text = _display(v.get("text"))
        codings = v.get("coding")
        shown: set[str | None] = set()
        if isinstance(codings, list):
            for c in codings:
                shown.add(self._coding_row(code, c, out, text))
        if text is not None and text not in shown:
            out.append((code, None, None, text))

    def token_identifier(self, code: str, v: Any, out: Rows) -> None:
        if not isinstance(v, dict):
            return
        system, value = _str(v.get("system")), _str(v.get("value"))
        if system is None and value is None:
            return
        t = v.get("type")
        out.append((code, system, value, _display(t.get("text")) if isinstance(t, dict) else None))

    def token_contact(self, code: str, v: Any, out: Rows) -> None:
        if isinstance(v, dict):
            value = _str(v.get("value"))
            if value is not None:
                out.append((code, _str(v.get("system")), value, None))

    def token_reference(self, code: str, v: Any, out: Rows) -> None:
        if isinstance(v, dict):
            self.token_identifier(code, v.get("identifier"), out)

    # ---- date

    def date_text(self, code: str, v: Any, out: Rows) -> None:
        if isinstance(v, str):
            b = date_bounds(v)
            if b is not None:
                out.append((code, b[0], b[1]))

    def date_period(self, code: str, v: Any, out: Rows) -> None:
        if not isinstance(v, dict):
            return
        start, end = v.get("start"), v.get("end")
        if start is None and end is None:
            return
        lo, hi = DATE_MIN, DATE_MAX
        if start is not None:
            b = date_bounds(start) if isinstance(start, str) else None
            if b is None:
                return
            lo = b[0]
        if end is not None:
            b = date_bounds(end) if isinstance(end, str) else None
            if b is None:
                return
            hi = b[1]
        out.append((code, lo, hi))

    def date_timing(self, code: str, v: Any, out: Rows) -> None:
        if not isinstance(v, dict):
            return
        events = v.get("event")
        if isinstance(events, list):
            for e in events:
                self.date_text(code, e, out)
        repeat = v.get("repeat")
        if isinstance(repeat, dict):
            self.date_period(code, repeat.get("boundsPeriod"), out)

    # ---- number

    def number_value(self, code: str, v: Any, out: Rows) -> None:
        f = _num(v)
        if f is not None:
            out.append((code, f, f))

    def number_quantity(self, code: str, v: Any, out: Rows) -> None:
        if isinstance(v, dict):
            self.number_value(code, v.get("value"), out)

    def number_range(self, code: str, v: Any, out: Rows) -> None:
        if not isinstance(v, dict):
            return
        low, high = v.get("low"), v.get("high")
        lo = _num(low.get("value")) if isinstance(low, dict) else None
        hi = _num(high.get("value")) if isinstance(high, dict) else None
        if lo is None and hi is None:
            return
        out.append((code, NUM_MIN if lo is None else lo, NUM_MAX if hi is None else hi))

    # ---- quantity

    def quantity(self, code: str, v: Any, out: Rows) -> None:
        if not isinstance(v, dict):
            return
        f = _num(v.get("value"))
        if f is None:
            return
        lo = hi = f
        comparator = v.get("comparator")
        if comparator in ("<", "<="):
            lo = NUM_MIN
        elif comparator in (">", ">="):
            hi = NUM_MAX
        out.append((code, _str(v.get("system")), _str(v.get("code")), _str(v.get("unit")), lo, hi))

    def quantity_money(self, code: str, v: Any, out: Rows) -> None:
        if isinstance(v, dict):
            f = _num(v.get("value"))
            if f is not None:
                out.append((code, ISO4217, _str(v.get("currency")), None, f, f))

    def quantity_number(self, code: str, v: Any, out: Rows) -> None:
        f = _num(v)
        if f is not None:
            out.append((code, None, None, None, f, f))

    def quantity_range(self, code: str, v: Any, out: Rows) -> None:
        if not isinstance(v, dict):
            return
        low, high = v.get("low"), v.get("high")
        low = low if isinstance(low, dict) else {}
        high = high if isinstance(high, dict) else {}
        lo, hi = _num(low.get("value")), _num(high.get("value"))
        if lo is None and hi is None:
            return
        units = low if lo is not None else high
        out.append((
            code,
            _str(units.get("system")),
            _str(units.get("code")),
            _str(units.get("unit")),
            NUM_MIN if lo is None else lo,
            NUM_MAX if hi is None else hi,
        ))

    # ---- reference

    def parse_reference(self, ref: str) -> tuple[str | None, str | None, str | None, str | None]:
        """``(type, id, version, url)`` of a literal reference.

        A relative reference (``Patient/1``) names a resource of this server: type,
        id and version. Anything else is a url only: an absolute RESTful url
        (``http://other.org/fhir/Patient/1``, kept without its ``_history`` part)
        names a resource elsewhere, which local searches, chains, includes and
        compartments must not take for this server's ``Patient/1``. References to
        this server's own base are made relative before storage
        (:func:`gateway.interactions.base.admit`; ADR 0005)."""
        m = _REL_REF.fullmatch(ref)
        if m is not None and m.group(1) in self.resource_types:
            return m.group(1), m.group(2), m.group(3), None
        m = _ABS_REF.fullmatch(ref)
        if m is not None and m.group(2) in self.resource_types:
            return None, None, None, clip(f"{m.group(1)}/{m.group(2)}/{m.group(3)}")
        return None, None, None, clip(ref)

    def reference(self, code: str, v: Any, out: Rows) -> None:
        if not isinstance(v, dict):
            return
        ident = v.get("identifier")
        isys = ival = None
        if isinstance(ident, dict):
            isys, ival = _str(ident.get("system")), _str(ident.get("value"))
        ref = v.get("reference")
        if isinstance(ref, str) and ref and not ref.startswith("#"):
            t, i, ver, url = self.parse_reference(ref)
            out.append((code, t, i, ver, url, isys, ival))
        elif ival is not None or isys is not None:
            out.append((code, None, None, None, None, isys, ival))

    def reference_uri(self, code: str, v: Any, out: Rows) -> None:
        if not isinstance(v, str) or not v or v.startswith("#"):
            return
        canonical = v.split("|", 1)[0]
        t, i, _version, url = self.parse_reference(canonical)
        out.append((code, t, i, None, url, None, None))

    def reference_resource(self, code: str, v: Any, out: Rows) -> None:
        if isinstance(v, dict):
            t, i = v.get("resourceType"), _str(v.get("id"))
            if isinstance(t, str) and i is not None:
                out.append((code, t, i, None, None, None, None))

    def reference_attachment(self, code: str, v: Any, out: Rows) -> None:
        if isinstance(v, dict):
            self.reference_uri(code, v.get("url"), out)

    def reference_identifier(self, code: str, v: Any, out: Rows) -> None:
        if isinstance(v, dict):
            isys, ival = _str(v.get("system")), _str(v.get("value"))
            if isys is not None or ival is not None:
                out.append((code, None, None, None, None, isys, ival))

    # ---- uri

    def uri(self, code: str, v: Any, out: Rows) -> None:
        if isinstance(v, str) and v:
            out.append((code, clip(v)))
            if "|" in v:  # canonical|version also matches the version-less canonical
                out.append((code, clip(v.split("|", 1)[0])))

    def coords(self, code: str, v: Any, out: Rows) -> None:
        """A position (``Location.position``): its latitude and longitude, in degrees."""
        position = position_of(v)
        if position is not None:
            out.append((code, *position))


# --------------------------------------------------------------------------- fallback


def _fallback_getter(expression: str, resource_types: frozenset[str]) -> Step:
    """Evaluate ``expression`` with fhirpathpy (for what :mod:`paths` cannot compile)."""
    from fhirpathpy import compile as fp_compile
    from fhirpathpy.engine.nodes import ResourceNode
    from fhirpathpy.models import models

    def resolve(inputs: list[Any]) -> list[Any]:
        out = []
        for v in inputs:
            t = reference_target_type(v, resource_types)
            if t is not None:
                node = ResourceNode.create_node({"resourceType": t}, t)  # type: ignore[no-untyped-call]
                out.append(node)
        return out

    options = {"userInvocationTable": {"resolve": {"fn": resolve, "arity": {0: []}}}}
    fn = fp_compile(expression, models["r4"], options)

    def get(roots: list[Any]) -> list[Any]:
        try:
            result = fn(roots[0], None)
        except Exception:
            return []
        return [
            v if isinstance(v, dict | list | str | bool | int | float | Decimal) else str(v)
            for v in result
        ]

    return get


# --------------------------------------------------------------------------- indexer


class _ImpliedSystems:
    """The code system a ``code`` element's values come from, when a required binding
    names a ValueSet of one code system (``Patient.gender``: administrative-gender).
    search.html: the system of a code is implied by its binding; it is indexed, so
    ``gender=http://hl7.org/fhir/administrative-gender|female`` and ``:in`` match."""

    def __init__(self, structure_definitions: list[dict[str, Any]],
                 value_sets: Iterable[dict[str, Any]]) -> None:
        self._elements: dict[str, dict[str, Any]] = {}
        self._complex: set[str] = set()
        for sd in structure_definitions:
            if sd.get("derivation") == "constraint":
                continue
            if sd.get("kind") == "complex-type":
                self._complex.add(str(sd.get("type")))
            for el in (sd.get("snapshot") or {}).get("element") or []:
                self._elements.setdefault(str(el.get("path")), el)
        self._vs_systems: dict[str, set[str]] = {}
        for vs in value_sets:
            systems: set[str] = set()
            stack = list((vs.get("expansion") or {}).get("contains") or [])
            while stack:
                c = stack.pop()
                if isinstance(c, dict):
                    if isinstance(c.get("system"), str):
                        systems.add(c["system"])
                    stack.extend(c.get("contains") or [])
            if isinstance(vs.get("url"), str):
                self._vs_systems[vs["url"]] = systems

    def of(self, expression: str) -> str | None:
        """The implied system of the element a simple path (``Type.a.b``) names."""
        segments = expression.strip().split(".")
        if len(segments) < 2 or not all(s.isidentifier() for s in segments):
            return None
        path, el = segments[0], None
        for i, seg in enumerate(segments[1:], start=1):
            el = self._elements.get(f"{path}.{seg}")
            if el is None:
                return None
            types = [t.get("code") for t in el.get("type") or []]
            if i < len(segments) - 1:
                path = types[0] if len(types) == 1 and types[0] in self._complex else (
                    f"{path}.{seg}")
        binding = (el or {}).get("binding") or {}
        if binding.get("strength") != "required" or not isinstance(binding.get("valueSet"),
                                                                   str):
            return None
        systems = self._vs_systems.get(binding["valueSet"].split("|", 1)[0], set())
        return next(iter(systems)) if len(systems) == 1 else None


def _with_system(conv: Converter, system: str) -> Converter:
    """``conv`` with ``system`` filled into the rows it leaves without one."""
    def implied(code: str, v: Any, out: Rows) -> None:
        n = len(out)
        conv(code, v, out)
        for i in range(n, len(out)):
            row = out[i]
            if row[1] is None:
                out[i] = (row[0], system, *row[2:])

    return implied


def _identifier_of_type(code: str, v: Any, out: Rows) -> None:
    """An Identifier's type codings with its value, as ``sp_composite`` rows under the
    token parameter's own code (token ``:of-type``): ``a_system``/``a_code`` the type
    coding, ``system``/``code`` the identifier's system and value."""
    if not isinstance(v, dict):
        return
    value = _str(v.get("value"))
    t = v.get("type")
    codings = t.get("coding") if isinstance(t, dict) else None
    if value is None or not isinstance(codings, list):
        return
    system = _str(v.get("system"))
    for c in codings:
        if isinstance(c, dict) and (type_code := _str(c.get("code"))) is not None:
            out.append((code, _str(c.get("system")), type_code, system, value,
                        *(None,) * (len(COMPOSITE_COLUMNS) - 2)))


def _composite_converter(first: list[tuple[Step, Converter]],
                         second: list[tuple[Step, Converter]],
                         spread: Callable[[Row], Row]) -> Converter:
    def composite(code: str, element: Any, out: Rows) -> None:
        # the second component first: most elements lack it (an Observation has one
        # value[x] of the several types Observation's composites pair with its code)
        values: Rows = []
        for run, conv in second:
            for v in run([element]):
                conv(code, v, values)
        spread_values = [row for row in map(spread, values) if any(x is not None for x in row)]
        if not spread_values:
            return
        tokens: Rows = []
        for run, conv in first:
            for v in run([element]):
                conv(code, v, tokens)
        for t in tokens:
            if t[1] is not None or t[2] is not None:
                out.extend((code, t[1], t[2], *row) for row in spread_values)

    return composite


def _with_parts(sp: SearchParam, by_url: dict[str, SearchParam]) -> SearchParam:
    """A composite parameter with its components' definitions resolved."""
    parts = []
    for url, expression in sp.components:
        definition = by_url.get(url)
        if definition is None or not expression:
            return sp
        parts.append(replace(definition, expression=expression))
    return replace(sp, parts=tuple(parts))


@dataclass(frozen=True, slots=True)
class Fallback:
    """An expression part evaluated by fhirpathpy because it could not be compiled."""

    resource_type: str
    code: str
    expression: str
    reason: str


_Entry = tuple[str, str, Step, Converter]  # code, table, run, converter


@dataclass(frozen=True, slots=True)
class _Plan:
    #: entries whose ``run`` starts from the values of a top-level key
    by_key: tuple[tuple[str, tuple[_Entry, ...]], ...]
    #: entries whose ``run`` starts from ``[resource]``
    rooted: tuple[_Entry, ...]


def _profiles_dir() -> Path:
    import gateway

    pkg = Path(gateway.__file__).parent
    for candidate in (pkg / "_data" / "profiles" / "r4", pkg.parent / "profiles" / "r4"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("profiles/r4 not found next to the gateway package")


def _bundle_resources(path: Path) -> list[dict[str, Any]]:
    bundle = orjson.loads(path.read_bytes())
    return [
        e["resource"]
        for e in bundle.get("entry") or ()
        if isinstance(e, dict) and isinstance(e.get("resource"), dict)
    ]


class Indexer:
    """Extracts search-index rows from resources (thread-safe after construction)."""

    #: Re-raise unexpected errors instead of skipping the value (tests only).
    raise_errors: bool = False

    def __init__(
        self, search_parameters: list[dict[str, Any]], structure_definitions: list[dict[str, Any]],
        value_sets: Iterable[dict[str, Any]] = (),
    ) -> None:
        self.model = Model(structure_definitions)
        self._conv = _Converters(self.model)
        self._systems = _ImpliedSystems(structure_definitions, value_sets)
        by_type: dict[str, dict[str, SearchParam]] = {}
        core: set[tuple[str, str]] = set()
        parsed = [(raw, SearchParam.from_resource(raw)) for raw in search_parameters
                  if isinstance(raw, dict) and raw.get("code") and raw.get("type")]
        by_url = {sp.url: sp for _raw, sp in parsed if sp.url}
        for raw, sp in parsed:
            if sp.components:
                sp = _with_parts(sp, by_url)
            is_core = raw.get("version") == "4.0.1"
            for base in sp.base:
                params = by_type.setdefault(base, {})
                if sp.code in params and ((base, sp.code) in core or not is_core):
                    continue  # keep the first / the core definition of a code
                params[sp.code] = sp
                if is_core:
                    core.add((base, sp.code))
        self._by_base = by_type
        self._params: dict[str, dict[str, SearchParam]] = {}
        self._plans: dict[str, _Plan] = {}
        self._part_plans: dict[tuple[str, frozenset[str]], _Plan] = {}
        self._fallbacks: dict[str, tuple[Fallback, ...]] = {}
        self._left_out: dict[str, dict[str, str]] = {}


    def implied_system(self, expression: str) -> str | None:
        """The code system the values of the ``code`` element at ``expression`` (a
        simple path) come from, when its required binding implies one."""
        return self._systems.of(expression)
    def with_params(self, search_parameters: Iterable[dict[str, Any]]) -> Indexer:
        """This indexer with more (non-composite) parameters: those stored on a server.
        A code a base type has already keeps its first definition. What the two
        share (the model, converters, implied systems) is not built again."""
        out = copy.copy(self)
        by_type = {rtype: dict(params) for rtype, params in self._by_base.items()}
        for raw in search_parameters:
            if isinstance(raw, dict) and raw.get("code") and raw.get("type"):
                sp = SearchParam.from_resource(raw)
                for base in sp.base:
                    by_type.setdefault(base, {}).setdefault(sp.code, sp)
        out._by_base = by_type
        out._params, out._plans, out._part_plans, out._fallbacks = {}, {}, {}, {}
        out._left_out = {}
        return out

    @classmethod
    def from_profiles(cls, directory: Path | None = None) -> Indexer:
        d = directory or _profiles_dir()
        return cls(
            _bundle_resources(d / "Bundle-r4-search-parameters.json"),
            _bundle_resources(d / "Bundle-r4-structure-definitions.json"),
            _bundle_resources(d / "Bundle-r4-required-valuesets.json"),
        )

    @property
    def resource_types(self) -> frozenset[str]:
        return self.model.resource_types

    def params_for(self, resource_type: str) -> dict[str, SearchParam]:
        """Search parameters of a type, code -> param (including Resource/DomainResource ones)."""
        params = self._params.get(resource_type)
        if params is None:
            if resource_type not in self.model.resource_types:
                return {}
            params = dict(self._by_base.get("Resource", {}))
            if resource_type in self.model.domain_resource_types:
                params.update(self._by_base.get("DomainResource", {}))
            params.update(self._by_base.get(resource_type, {}))
            params = self._shared_rows(resource_type, params)
            self._params[resource_type] = params
        return dict(params)

    def common_params(self) -> dict[str, SearchParam]:
        """The parameters every type has (based on Resource): a system-level search's."""
        return dict(self._by_base.get("Resource", {}))

    def _applies(self, part: str, resource_type: str) -> bool:
        """Whether an expression part (of a union) is about ``resource_type``: rooted
        at it, at Resource/DomainResource, or relative (``name | alias``)."""
        root = root_name(part)
        if root is None:
            return False
        model = self.model
        return not model.is_type_name(root) or root in (resource_type, "Resource") or (
            root == "DomainResource" and resource_type in model.domain_resource_types)

    def _shared_rows(self, resource_type: str,
                     params: dict[str, SearchParam]) -> dict[str, SearchParam]:
        """``params`` with ``stored_as`` set where a parameter's rows would repeat other
        parameters' rows: the parts of its expression (those about this type) are
        exactly the parts of other parameters of the same type together (for a
        composite: with the same components). Parameters are looked at smallest
        first, the shorter code first among equals, so of two with the same
        expression the first keeps the rows. References are left alone: their rows
        also serve _include, chains and compartments by their own code."""
        parts_of: dict[str, frozenset[tuple[Any, ...]]] = {}
        for code, sp in params.items():
            if sp.type in ("reference", "special") or sp.table is None \
                    or sp.expression is None or code in NOT_INDEXED \
                    or (sp.type == "composite" and not composite_supported(sp)):
                continue
            components = tuple((c.type, c.expression) for c in sp.parts)
            parts = frozenset((sp.type, p, components) for p in split_union(sp.expression)
                              if self._applies(p, resource_type))
            if parts:
                parts_of[code] = parts
        owners: list[str] = []
        out = dict(params)
        for code in sorted(parts_of, key=lambda c: (len(parts_of[c]), len(c), c)):
            mine = parts_of[code]
            within = [o for o in owners if parts_of[o] <= mine]
            if within and frozenset().union(*(parts_of[o] for o in within)) == mine:
                out[code] = replace(params[code], stored_as=tuple(sorted(within)))
            else:
                owners.append(code)
        return out

    def fallbacks(self, resource_types: Iterable[str] | None = None) -> list[Fallback]:
        """Expression parts evaluated by fhirpathpy (compiling the types' plans if needed)."""
        out: list[Fallback] = []
        for rt in sorted(self.model.resource_types if resource_types is None else resource_types):
            self._plan(rt)
            out.extend(self._fallbacks.get(rt, ()))
        return out

    def left_out(self, resource_type: str) -> dict[str, str]:
        """The parameters of ``resource_type`` not indexed because their expression
        could not be compiled at all (code -> why; compiling the type's plan if needed)."""
        self._plan(resource_type)
        return dict(self._left_out.get(resource_type, {}))

    def _plan(self, resource_type: str) -> _Plan:
        plan = self._plans.get(resource_type)
        if plan is not None:
            return plan
        by_key: dict[str, list[_Entry]] = {}
        rooted: list[_Entry] = []
        fallbacks: list[Fallback] = []
        left_out: dict[str, str] = {}
        compiler = Compiler(self.model, resource_type)
        for code, sp in self.params_for(resource_type).items():
            if sp.table is None or sp.expression is None or code in NOT_INDEXED or sp.stored_as:
                continue
            try:
                planned = self._entries(compiler, resource_type, sp, fallbacks)
            except Exception as exc:
                # (a SearchParameter stored before its expression was refused, or one
                # the compiler fails on): left out, not a failure of every write of
                # the type
                left_out[code] = str(exc)[:200] or type(exc).__name__
                log.warning("search parameter %s of %s (%s) is not indexed: %s", code,
                            resource_type, sp.url[:200], left_out[code])
                continue
            for key, entry in planned:
                if key is None:
                    rooted.append(entry)
                else:
                    by_key.setdefault(key, []).append(entry)
        plan = _Plan(tuple((k, tuple(v)) for k, v in by_key.items()), tuple(rooted))
        self._plans[resource_type] = plan
        self._fallbacks[resource_type] = tuple(fallbacks)
        self._left_out[resource_type] = left_out
        return plan

    def _entries(self, compiler: Compiler, resource_type: str, sp: SearchParam,
                 fallbacks: list[Fallback]) -> list[tuple[str | None, _Entry]]:
        """The plan entries of one parameter (and, in ``fallbacks``, the parts of its
        expression evaluated by fhirpathpy)."""
        if sp.type == "composite":
            return self._composite_entries(compiler, resource_type, sp)
        code, table, model = sp.code, sp.table, self.model
        assert table is not None and sp.expression is not None
        out: list[tuple[str | None, _Entry]] = []
        for part in split_union(sp.expression):
            root = root_name(part)
            if root is None:
                continue
            if model.is_type_name(root) and root not in (resource_type, "Resource") and not (
                root == "DomainResource" and resource_type in model.domain_resource_types
            ):
                continue  # the part of a shared expression for another type
            branches: list[Branch]
            try:
                branches = compiler.compile(part)
            except LiteralOutOfRange:
                raise  # not FHIRPath at all: left out, as a write of it is refused
            except (CompileError, RecursionError) as exc:
                fallbacks.append(Fallback(resource_type, code, part, str(exc)))
                try:
                    getter = _fallback_getter(part, model.resource_types)
                except Exception:  # noqa: S112 - not even fhirpathpy understands it
                    continue
                branches = [Branch(getter, None)]
            for b in branches:
                conv = self._conv.for_type(sp.type, b.type)
                if conv is None:
                    continue
                if sp.type == "token" and b.type == "code":
                    system = self._systems.of(part)
                    if system is not None:
                        conv = _with_system(conv, system)
                entries: list[_Entry] = [(code, table, b.run, conv)]
                if sp.type == "token" and b.type == "Identifier":  # for :of-type
                    entries.append((code, "sp_composite", b.run, _identifier_of_type))
                out.extend((b.key, e) for e in entries)
        return out

    def _composite_entries(self, compiler: Compiler, resource_type: str,
                           sp: SearchParam) -> list[tuple[str | None, _Entry]]:
        """Plan entries of a composite parameter: ``run`` selects the elements, the
        converter pairs the components' values found on each."""
        if not composite_supported(sp) or sp.expression is None:
            return []
        first_sp, second_sp = sp.parts
        second_table = second_sp.table
        assert second_table is not None
        spread = _spreader(second_table)
        out: list[tuple[str | None, _Entry]] = []
        for part in split_union(sp.expression):
            root = root_name(part)
            if root is None or (self.model.is_type_name(root)
                                and root not in (resource_type, "Resource")):
                continue
            try:
                for branch, ctx in compiler.compile_elements(part):
                    if ctx is None:
                        continue
                    first = self._component(compiler, first_sp, ctx)
                    second = self._component(compiler, second_sp, ctx)
                    if first and second:
                        conv = _composite_converter(first, second, spread)
                        out.append((branch.key, (sp.code, "sp_composite", branch.run, conv)))
            except (CompileError, RecursionError):
                continue  # not indexed; a search on it finds nothing
        return out

    def _component(self, compiler: Compiler, sp: SearchParam,
                   ctx: str) -> list[tuple[Step, Converter]]:
        assert sp.expression is not None
        out = []
        for b in compiler.compile_relative(sp.expression, ctx):
            conv = self._conv.for_type(sp.type, b.type)
            if conv is not None:
                out.append((b.run, conv))
        return out

    def _part_plan(self, resource_type: str, codes: frozenset[str]) -> _Plan:
        """The plan of ``resource_type`` restricted to the parameters ``codes``."""
        plan = self._part_plans.get((resource_type, codes))
        if plan is None:
            whole = self._plan(resource_type)
            by_key = tuple((k, kept) for k, entries in whole.by_key
                           if (kept := tuple(e for e in entries if e[0] in codes)))
            plan = _Plan(by_key, tuple(e for e in whole.rooted if e[0] in codes))
            self._part_plans[(resource_type, codes)] = plan
        return plan

    def reference_rows(self, code: str, value: Any) -> Rows:
        """``sp_reference`` rows of one Reference under ``code``, as a reference search
        parameter would index it (for rows derived outside the search parameters)."""
        out: Rows = []
        self._conv.reference(code, value, out)
        return out

    def extract(
        self, resource: dict[str, Any], codes: frozenset[str] | None = None
    ) -> dict[str, list[tuple[Any, ...]]]:
        """Index rows of ``resource``, table name -> deduplicated rows (every table present);
        only those of the parameters ``codes`` when given."""
        out: dict[str, Rows] = {t: [] for t in TABLES}
        if not isinstance(resource, dict):
            return out
        rt = resource.get("resourceType")
        if not isinstance(rt, str) or rt not in self.model.resource_types:
            return out
        plan = self._plan(rt) if codes is None else self._part_plan(rt, codes)
        get = resource.get
        for key, entries in plan.by_key:
            x = get(key)
            if x is None:
                continue
            self._run(entries, x if isinstance(x, list) else [x], out)
        if plan.rooted:
            self._run(plan.rooted, [resource], out)
        if rt == "Bundle" and (codes is None or any(
                c.partition(".")[0] in EMBEDDED for c in codes)):
            self._embedded(resource, out)
            if codes is not None:
                out = {t: [r for r in rows if r[0] in codes] for t, rows in out.items()}
        for table, rows in out.items():
            if len(rows) > 1:
                out[table] = list(dict.fromkeys(rows))
        return out

    def _embedded(self, bundle: dict[str, Any], out: dict[str, Rows]) -> None:
        """The rows of a Bundle's first resource (:data:`EMBEDDED`), under the Bundle;
        the reference row only under the parameter of that resource's type."""
        entries = bundle.get("entry")
        head = entries[0] if isinstance(entries, list) and entries else None
        first = head.get("resource") if isinstance(head, dict) else None
        kind = first.get("resourceType") if isinstance(first, dict) else None
        out["sp_reference"] = [r for r in out["sp_reference"]
                               if r[0] not in EMBEDDED or EMBEDDED[r[0]] == kind]
        for code, rtype in EMBEDDED.items():
            if rtype != kind or not isinstance(first, dict):
                continue
            # a reference to another entry by its fullUrl (urn:uuid:…) names that
            # entry's resource: Type/id, as the document's reader resolves it
            names = {e["fullUrl"]: f"{r['resourceType']}/{r['id']}" for e in entries or ()
                     if isinstance(e, dict) and isinstance(e.get("fullUrl"), str)
                     and isinstance(r := e.get("resource"), dict)
                     and isinstance(r.get("resourceType"), str)
                     and isinstance(r.get("id"), str)}
            rows_of = self.extract(rewrite(copy.deepcopy(first), names, model=self.model)
                                   if names else first)
            for table, rows in rows_of.items():
                out[table].extend((f"{code}.{r[0]}", *r[1:]) for r in rows)

    def _run(self, entries: tuple[_Entry, ...], start: list[Any], out: dict[str, Rows]) -> None:
        for code, table, run, conv in entries:
            try:
                values = run(start)
                if values:
                    rows = out[table]
                    for v in values:
                        conv(code, v, rows)
            except Exception:
                if self.raise_errors:
                    raise
                continue
