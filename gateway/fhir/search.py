"""Parse a FHIR R4 search request into a plain-data :class:`SearchQuery`.

Pure: no I/O. The storage layer compiles the result to SQL
(:mod:`gateway.storage.search_sql`).

Spec: https://hl7.org/fhir/R4/search.html

Conventions
-----------
* ``pairs`` are the decoded query pairs in order. A repeated name is AND, a
  comma inside a value is OR; ``\\,`` ``\\|`` ``\\$`` ``\\\\`` escape.
* Values are typed here, once: dates become inclusive epoch-µs bounds (via
  :func:`gateway.fhir.indexer.date_bounds`), numbers get their implicit
  precision range, strings are normalised like ``sp_string.value``.
* ``_id`` and ``_lastUpdated`` are answered from the ``resource`` row; every
  other parameter from the ``sp_*`` index table of its type, under its code.
* Invalid values raise ``FhirError(INVALID_SEARCH_VALUE)`` always. Unknown
  parameters raise ``UNKNOWN_SEARCH_PARAM`` when ``strict`` (``Prefer:
  handling=strict``), otherwise they are dropped with a warning; parameters we
  know but cannot answer (special, ``_text``, ``_filter``, a composite other
  than a token and one more component …) raise ``UNSUPPORTED_SEARCH`` when
  strict, otherwise warn.
* A composite value is ``token$value``: both must hold on one element the
  parameter's expression selects (one ``sp_composite`` row).

Prefix semantics (R4 search.html §prefix, "range" reading)
-----------------------------------------------------------
For a date the search value's precision defines an inclusive range
[slo, shi] (``2013-01`` is the whole month); a stored value is a range
[lo, hi]. ``eq``: [slo, shi] contains [lo, hi]; ``ne``: it does not; ``gt``:
hi > shi; ``lt``: lo < slo; ``ge``: gt or eq; ``le``: lt or eq; ``sa``: lo >
shi; ``eb``: hi < slo; ``ap``: the ranges overlap once the search range is
widened on both sides by 10 % of the distance between now and the search
value, and by at least one day (:data:`AP_DATE_MIN_MICROS`).

For numbers and quantities ``eq``/``ne`` use the implicit range of the
search value's precision, half-open [v - ½·10^e, v + ½·10^e) where e is the
decimal exponent of the literal (``100`` -> [99.5, 100.5), ``100.00`` ->
[99.995, 100.005), ``1e2`` -> [50, 150)); ``gt lt ge le sa eb`` compare with
the value exactly (as the R4 number table says); ``ap`` is ±10 % of the value
(widened to at least the implicit range).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from decimal import Decimal, localcontext
from typing import TYPE_CHECKING, Protocol

import orjson

from gateway.fhir.geo import UNIT_KM, valid_position
from gateway.fhir.indexer import EMBEDDED, composite_supported, date_bounds, normalize_string
from gateway.fhir.outcome import Code, FhirError

if TYPE_CHECKING:
    from gateway.fhir.indexer import SearchParam

__all__ = [
    "AP_DATE_MIN_MICROS",
    "PREFIXES",
    "Chain",
    "Criterion",
    "DateValue",
    "Has",
    "Include",
    "MissingValue",
    "NumberValue",
    "QuantityValue",
    "ReferenceValue",
    "SearchQuery",
    "SortKey",
    "StringValue",
    "TokenValue",
    "UriValue",
    "Value",
    "parse_search",
]

PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
#: The smallest widening of a date ``ap`` search, each side (one day).
AP_DATE_MIN_MICROS = 86_400 * 1_000_000
#: How deep chains and ``_has`` may nest.
MAX_DEPTH = 4
#: The most parameters one search may filter by (each a condition the database joins;
#: PostgreSQL's planning time grows steeply with their number: 0.8 s for 64).
MAX_CRITERIA = 32
#: The most values one search may test, counted through every type a chain or
#: ``_has`` looks into (``subject.name=a,b`` on Observation tests 2 values for each of
#: subject's 4 target types).
MAX_VALUES = 1_000

# -- the parsed query ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenValue:
    """``code`` / ``system|code`` / ``|code`` / ``system|``.

    ``any_system`` True: match ``code`` in any system (``system`` is None).
    Otherwise ``system`` None means "no system" (``|code``). ``code`` None
    means any code in ``system`` (``system|``). Also used for ``_id`` (code =
    the id) and, on the ``ident_*`` columns, for reference ``:identifier``.
    """

    code: str | None
    system: str | None = None
    any_system: bool = True


@dataclass(frozen=True, slots=True)
class StringValue:
    """``text`` as given (for ``:exact``), ``normalized`` like ``sp_string.value``."""

    text: str
    normalized: str


@dataclass(frozen=True, slots=True)
class DateValue:
    """Inclusive epoch-µs bounds of the search value; for ``ap`` already widened."""

    prefix: str
    lo: int
    hi: int
    text: str


@dataclass(frozen=True, slots=True)
class NumberValue:
    """``value`` exactly (gt lt ge le sa eb); ``[lo, hi)`` the implicit range
    (eq ne); for ``ap`` ``[lo, hi]`` is the approximate range."""

    prefix: str
    value: float
    lo: float
    hi: float
    text: str


@dataclass(frozen=True, slots=True)
class QuantityValue:
    """A number plus optional ``system``/``code``. With ``system`` None and a
    ``code``, the code matches ``sp_quantity.code`` or ``unit``. No unit
    conversion."""

    prefix: str
    value: float
    lo: float
    hi: float
    text: str
    system: str | None = None
    code: str | None = None


@dataclass(frozen=True, slots=True)
class ReferenceValue:
    """``Type/id`` (type may be None: any type), ``Type/id/_history/v``, or an
    absolute/canonical ``url`` (canonical ``|version`` split off into
    ``version`` and not compared)."""

    type: str | None = None
    id: str | None = None
    url: str | None = None
    version: str | None = None


@dataclass(frozen=True, slots=True)
class UriValue:
    value: str


@dataclass(frozen=True, slots=True)
class MissingValue:
    missing: bool


@dataclass(frozen=True, slots=True)
class OfTypeValue:
    """A token ``:of-type`` value ``type-system|type-code|value``: an Identifier with
    that type coding and that value."""

    type_system: str
    type_code: str
    value: str


@dataclass(frozen=True, slots=True)
class InValue:
    """A token ``:in``/``:not-in`` value: the ValueSet's canonical ``url`` (with
    ``|version`` if given) and, once the caller has expanded it
    (:func:`with_value_sets`), its members as (system, code) pairs.

    Token ``:below``/``:above`` are value sets too, defined here: ``compose`` (JSON)
    includes the code and what it subsumes (or what subsumes it), and ``url``
    names that definition (``below:system|code``)."""

    url: str
    codes: frozenset[tuple[str, str]] | None = None
    compose: str | None = None


@dataclass(slots=True)
class ValueSetUse:
    """A value set a query names: its definition when the query gives one (see
    :class:`InValue`), and the (resource type, parameter) pairs it is used with."""

    compose: str | None
    used_by: set[tuple[str | None, str]]


@dataclass(frozen=True, slots=True)
class NearValue:
    """A position and a distance (``near``, location.html#positional): within ``km``
    kilometres of ``latitude``/``longitude``; ``km`` None: at that very position."""

    latitude: float
    longitude: float
    km: float | None


@dataclass(frozen=True, slots=True)
class CompositeValue:
    """``token$value`` of a composite parameter: both on one element (``sp_composite``);
    ``second_type`` is the second component's parameter type."""

    first: TokenValue
    second: Value
    second_type: str


Value = (
    TokenValue | StringValue | DateValue | NumberValue | QuantityValue | ReferenceValue
    | UriValue | MissingValue | CompositeValue | InValue | OfTypeValue | NearValue
)


@dataclass(frozen=True, slots=True)
class Chain:
    """Chained search: the reference points at a ``target_type`` resource that
    matches ``criterion``."""

    target_type: str
    criterion: Criterion
    #: ``target_type`` is a canonical resource: a reference may name it by its ``url``
    canonical: bool = False


@dataclass(frozen=True, slots=True)
class Has:
    """Reverse chain: some ``source_type`` resource whose reference parameter
    ``param_code`` points at this resource matches ``criterion``."""

    source_type: str
    param_code: str
    criterion: Criterion
    #: the resource searched is a canonical resource: named by its ``url`` too
    canonical: bool = False


@dataclass(frozen=True, slots=True)
class Criterion:
    """One search parameter occurrence; ``values`` are OR-ed.

    * plain: ``values`` typed per ``type`` (``MissingValue`` for ``:missing``;
      ``StringValue`` for token ``:text``; ``TokenValue`` for reference
      ``:identifier``), ``chain``/``has`` empty.
    * chained (``subject:Patient.name=x``): ``type`` 'reference', ``values``
      empty, ``chain`` one entry per candidate target type (OR-ed),
      ``modifier`` the type modifier if given.
    * reverse chain: ``code`` and ``type`` '_has', ``has`` set.

    ``modifier`` is one of None, 'missing', 'exact', 'contains', 'not',
    'text', 'identifier', 'below', 'above' or a resource type.

    ``stored``: the parameters whose index rows answer this one, when it has
    none of its own (``SearchParam.stored_as``); :attr:`codes` in either case.
    """

    code: str
    type: str
    modifier: str | None = None
    values: tuple[Value, ...] = ()
    chain: tuple[Chain, ...] = ()
    has: Has | None = None
    stored: tuple[str, ...] = ()

    @property
    def codes(self) -> tuple[str, ...]:
        """The ``param`` values of the index rows to look at."""
        return self.stored or (self.code,)


@dataclass(frozen=True, slots=True)
class SortKey:
    param_code: str
    descending: bool = False
    type: str = ""  # the parameter's type, for the SQL compiler
    stored: tuple[str, ...] = ()  # as Criterion.stored
    #: ``_sort=near``: the positions the search's ``near`` measures from (the distance
    #: to the nearest of them orders the result)
    origins: tuple[tuple[float, float], ...] = ()

    @property
    def codes(self) -> tuple[str, ...]:
        return self.stored or (self.param_code,)


@dataclass(frozen=True, slots=True)
class Include:
    """``_include``/``_revinclude``. ``source_type`` is the type holding the
    reference and ``param_code`` its reference parameter; ``Type:*`` sets
    ``wildcard`` (any parameter, ``param_code`` '*') and a bare ``*`` also
    makes ``source_type`` '*' (any type). ``target_type`` restricts the type
    referred to."""

    source_type: str
    param_code: str
    target_type: str | None = None
    iterate: bool = False
    wildcard: bool = False
    #: the canonical resource types it may refer to, which a reference (a
    #: ``canonical``) names by their ``url`` (search.html#reference)
    canonical: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SearchQuery:
    resource_type: str | None
    types: tuple[str, ...] = ()  # system search restricted by _type (empty: all)
    criteria: tuple[Criterion, ...] = ()  # AND
    sort: tuple[SortKey, ...] = ()
    count: int | None = None
    #: offset paging, as HAPI FHIR and Medplum offer it (``_offset``: matches to skip)
    #: and Aidbox (``_page``: the page, from 1, of ``_count`` matches)
    offset: int | None = None
    page: int | None = None
    total: str | None = None  # none | estimate | accurate
    summary: str | None = None  # true | false | text | data | count
    elements: tuple[str, ...] = ()
    includes: tuple[Include, ...] = ()
    revincludes: tuple[Include, ...] = ()
    warnings: tuple[str, ...] = ()
    #: the (name, value) pairs the search did not use (a lenient search ignores what it
    #: does not know); its self link leaves them out (search.html#errors)
    ignored: tuple[tuple[str, str], ...] = ()
    #: only resources created up to this stored version (``resource_history.seq``):
    #: a paged search read on later finds what existed when it began
    created_by: int | None = None
    #: (parameter, id, its target types) of each bare id given to a reference parameter
    #: that may refer to several types, in a chain or ``_has`` too: the search is to be
    #: refused when the id names resources of more than one of them (search.html#reference)
    untyped_ids: tuple[tuple[str, str, tuple[str, ...]], ...] = ()


def near_origins(criteria: tuple[Criterion, ...]) -> tuple[tuple[float, float], ...]:
    """The positions a search's ``near`` criteria measure from."""
    return tuple(dict.fromkeys((v.latitude, v.longitude) for c in criteria
                               for v in c.values if isinstance(v, NearValue)))


def related_types(query: SearchQuery) -> set[str]:
    """The types a query looks into besides its own: chain targets and ``_has``
    sources (at any depth: it filters on their data), ``_revinclude`` sources and
    ``_include`` targets it names (it returns them). A wildcard or an include
    without a target type names none (what it finds is checked one by one)."""
    out: set[str] = set()

    def walk(c: Criterion) -> None:
        for link in c.chain:
            out.add(link.target_type)
            walk(link.criterion)
        if c.has is not None:
            out.add(c.has.source_type)
            walk(c.has.criterion)

    for criterion in query.criteria:
        walk(criterion)
    out.update(i.source_type for i in query.revincludes if i.source_type != "*")
    out.update(i.target_type for i in query.includes if i.target_type)
    return out


# -- parameter definitions ------------------------------------------------------


class _Param(Protocol):
    @property
    def code(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def expression(self) -> str | None: ...
    @property
    def targets(self) -> tuple[str, ...]: ...
    @property
    def parts(self) -> tuple[_Param, ...]: ...
    @property
    def stored_as(self) -> tuple[str, ...]: ...


@dataclass(frozen=True, slots=True)
class _Builtin:
    code: str
    type: str
    expression: str | None
    targets: tuple[str, ...] = ()
    parts: tuple[_Param, ...] = ()
    stored_as: tuple[str, ...] = ()


#: The parameters every resource type has; all a system search may use (without _type).
_COMMON: dict[str, _Builtin] = {
    p.code: p
    for p in (
        _Builtin("_id", "token", "Resource.id"),
        _Builtin("_lastUpdated", "date", "Resource.meta.lastUpdated"),
        _Builtin("_tag", "token", "Resource.meta.tag"),
        _Builtin("_profile", "uri", "Resource.meta.profile"),
        _Builtin("_security", "token", "Resource.meta.security"),
        _Builtin("_source", "uri", "Resource.meta.source"),
    )
}

_IGNORED = frozenset(
    {"_format", "_pretty", "_getpages", "_getpagesoffset", "_contained", "_containedType"}
)
_UNSUPPORTED_CONTROL = frozenset({"_filter", "_query", "_text", "_content"})
#: a List's id (``_list=42``)
_LIST_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
#: parameters answered from the resource table, which a Bundle's first resource
#: is not in (``Parser.embedded``)
NOT_EMBEDDED = frozenset({"_id", "_lastUpdated"})
_RESULT_PARAMS = frozenset(
    {"_sort", "_count", "_total", "_summary", "_elements", "_include", "_revinclude", "_type",
     "_offset", "_page"}
)
_KNOWN_MODIFIERS = frozenset(
    {"missing", "exact", "contains", "not", "text", "in", "not-in", "below", "above",
     "type", "identifier", "of-type", "iterate", "recurse"}
)
_MODIFIERS: dict[str, frozenset[str]] = {
    "string": frozenset({"missing", "exact", "contains"}),
    "token": frozenset({"missing", "not", "text", "in", "not-in", "of-type", "below",
                        "above"}),
    "reference": frozenset({"missing", "identifier"}),
    "date": frozenset({"missing"}),
    "number": frozenset({"missing"}),
    "quantity": frozenset({"missing"}),
    "uri": frozenset({"missing", "below", "above"}),
    "composite": frozenset({"missing"}),
    "special": frozenset({"missing"}),
}
_UNSUPPORTED_MODIFIERS: dict[str, frozenset[str]] = {
    "reference": frozenset({"below", "above"}),
    "uri": frozenset({"in", "not-in"}),
}
_SUMMARY = ("true", "false", "text", "data", "count")
_TOTAL = ("none", "estimate", "accurate")

_TYPE_NAME = re.compile(r"[A-Z][A-Za-z0-9]*")
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_RELATIVE = re.compile(
    r"(?P<type>[A-Z][A-Za-z0-9]*)/(?P<id>[A-Za-z0-9\-.]{1,64})(?:/_history/(?P<ver>[^/]+))?"
)
_ABSOLUTE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:.+")
#: a path that keeps the references to one type (``Observation.subject.where(resolve() is
#: Patient)``)
_RESOLVES_TO = re.compile(r"\.where\(resolve\(\) is ([A-Z][A-Za-z0-9]*)\)$")
_DECIMAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_PREFIXED = re.compile(r"(eq|ne|gt|lt|ge|le|sa|eb|ap)?(.*)", re.DOTALL)
#: ``name``, ``Patient.name`` (of one type), ``name.family`` (below the top)
_ELEMENT = re.compile(r"(?:[A-Z][A-Za-z0-9]*\.)?[A-Za-z_][A-Za-z0-9_]*(?:\[x\])?"
                      r"(?:\.[a-z][A-Za-z0-9]*(?:\[x\])?)*")
# "+01:00" arrives as " 01:00" when a client forgets to percent-encode the plus
_SPACE_TZ = re.compile(r"(T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?) (\d{2}:\d{2})$")


class _Unknown(Exception):
    """A parameter the server does not know (strict: error; lenient: warning)."""


class _Unsupported(Exception):
    """A parameter or feature the server knows but cannot answer."""


def _q(text: str) -> str:
    """``text`` quoted for a diagnostic, shortened if long."""
    return repr(text if len(text) <= 80 else text[:77] + "...")


def _invalid(msg: str) -> FhirError:
    return FhirError(Code.INVALID_SEARCH_VALUE, msg)


# -- escaping -------------------------------------------------------------------


def split_escaped(text: str, sep: str) -> list[str]:
    """Split on ``sep`` not preceded by an escaping backslash; escapes are kept."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            cur.append(text[i : i + 2])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def unescape(text: str) -> str:
    """Undo ``\\,`` ``\\|`` ``\\$`` ``\\\\``; any other backslash stays as written."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in ",|$\\":
            out.append(text[i + 1])
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


# -- the parser -----------------------------------------------------------------


def value_sets(query: SearchQuery) -> dict[str, ValueSetUse]:
    """The value sets the query's ``:in``/``:not-in``/``:below``/``:above`` values name
    (chains and ``_has`` included), by URL."""
    found: dict[str, ValueSetUse] = {}

    def walk(c: Criterion, rtype: str | None) -> None:
        for v in c.values:
            if isinstance(v, InValue):
                found.setdefault(v.url, ValueSetUse(v.compose, set())).used_by.update(
                    (rtype, code) for code in c.codes)
        for link in c.chain:
            walk(link.criterion, link.target_type)
        if c.has is not None:
            walk(c.has.criterion, c.has.source_type)

    for c in query.criteria:
        walk(c, query.resource_type)
    return found


def with_value_sets(query: SearchQuery,
                    members: Mapping[str, frozenset[tuple[str, str]]]) -> SearchQuery:
    """``query`` with each ``:in``/``:not-in`` value given its ValueSet's members."""

    def fill(c: Criterion) -> Criterion:
        return replace(
            c,
            values=tuple(replace(v, codes=members[v.url]) if isinstance(v, InValue) else v
                         for v in c.values),
            chain=tuple(replace(link, criterion=fill(link.criterion)) for link in c.chain),
            has=None if c.has is None else replace(c.has, criterion=fill(c.has.criterion)))

    return replace(query, criteria=tuple(fill(c) for c in query.criteria))


def parse_search(
    resource_type: str | None,
    pairs: list[tuple[str, str]],
    params: Callable[[str], Mapping[str, SearchParam]],
    *,
    strict: bool = False,
    now: int | None = None,
    base_url: str | None = None,
) -> SearchQuery:
    """Parse decoded query ``pairs`` for a search on ``resource_type`` (None:
    whole system). ``params(type)`` gives the parameters of a type (with the
    Resource-level ones; an empty mapping or KeyError for an unknown type).
    ``now`` (epoch µs) anchors ``ap`` on dates; ``base_url`` (this server's
    base) turns absolute reference values under it into relative ones."""
    parser = _Parser(resource_type, params, strict, now, base_url)
    return parser.parse(pairs)


class _Parser:
    def __init__(
        self,
        resource_type: str | None,
        params: Callable[[str], Mapping[str, SearchParam]],
        strict: bool,
        now: int | None,
        base_url: str | None,
    ) -> None:
        self.resource_type = resource_type
        self._params = params
        self.strict = strict
        self.now = now if now is not None else int(time.time() * 1_000_000)
        self.base_url = base_url.rstrip("/") + "/" if base_url else None
        self.warnings: list[str] = []
        self.untyped_ids: dict[tuple[str, str, tuple[str, ...]], None] = {}
        self._cache: dict[str, Mapping[str, _Param]] = {}
        self._values = 0  # tested so far, against MAX_VALUES

    # -- lookups

    def params_of(self, rtype: str) -> Mapping[str, _Param]:
        found = self._cache.get(rtype)
        if found is None:
            try:
                found = self._params(rtype) or {}
            except KeyError:
                found = {}
            self._cache[rtype] = found
        return found

    def canonical(self, rtype: str) -> bool:
        """Whether ``rtype`` is a canonical resource: versioned, its ``url`` parameter
        its ``url`` element (Questionnaire, PlanDefinition, StructureDefinition, …; not
        Subscription, whose ``url`` is its endpoint, nor Device, whose ``url`` is an
        address and which has no version)."""
        params = self.params_of(rtype)
        p, version = params.get("url"), params.get("version")
        return p is not None and p.type == "uri" and version is not None and f"{rtype}.url" in (
            part.strip() for part in (p.expression or "").split("|"))

    def known_type(self, rtype: str) -> bool:
        return bool(_TYPE_NAME.fullmatch(rtype)) and bool(self.params_of(rtype))

    def where(self, rtype: str | None) -> str:
        return rtype if rtype else "a system-wide search"

    def warn(self, msg: str) -> None:
        if msg not in self.warnings:
            self.warnings.append(msg)

    # -- top level

    def parse(self, pairs: list[tuple[str, str]]) -> SearchQuery:
        rt = self.resource_type
        if rt is not None and not self.known_type(rt):
            raise FhirError(Code.UNKNOWN_RESOURCE_TYPE, f"Unknown resource type '{rt}'")
        types: list[str] = []
        if rt is None:
            for name, value in pairs:
                if name == "_type":
                    for t in (unescape(p).strip() for p in split_escaped(value, ",")):
                        if not t:
                            continue
                        if not self.known_type(t):
                            raise _invalid(f"_type: unknown resource type '{t}'")
                        if t not in types:
                            types.append(t)
                elif name.startswith("_type:"):
                    raise _invalid(f"Unknown modifier on '{name}'")
        top = self.system_params(types) if rt is None else self.params_of(rt)

        criteria: list[Criterion] = []
        sort: list[SortKey] = []
        includes: list[Include] = []
        revincludes: list[Include] = []
        elements: dict[str, None] = {}  # each once, in the order given
        paging: dict[str, int] = {}  # _count, _offset, _page
        total: str | None = None
        summary: str | None = None

        ignored: list[tuple[str, str]] = []
        for name, value in pairs:
            base, _, modifier = name.partition(":")
            if base == "_contained" and value not in ("", "false"):
                # searching inside contained resources (search.html#contained) is not offered
                msg = f"_contained={value[:20]} is not supported"
                if self.strict:
                    raise FhirError(Code.UNSUPPORTED_SEARCH, msg)
                self.warn(f"{msg}; the parameter was ignored")
                ignored.append((name, value))
                continue
            if base in _IGNORED:
                continue
            if base in _RESULT_PARAMS:
                if base == "_type":
                    if rt is not None:
                        self.warn(f"Search parameter '_type' is only for a system-wide "
                                  f"search; ignored for {rt}")
                        ignored.append((name, value))
                    continue
                if base in ("_include", "_revinclude"):
                    if modifier not in ("", "iterate", "recurse"):
                        raise _invalid(f"Unknown modifier on '{name}'")
                    target = includes if base == "_include" else revincludes
                    for inc in self.include(base, value, rt, types, bool(modifier)):
                        if inc not in target:
                            target.append(inc)
                    continue
                if modifier:
                    raise _invalid(f"Search parameter '{base}' takes no modifier")
                value = value.strip()
                if not value:
                    continue
                if base == "_sort":
                    for key in self.sort(value, rt, top):
                        # a key given again cannot change the order the first one made
                        if all(key.param_code != seen.param_code for seen in sort):
                            sort.append(key)
                elif base in ("_count", "_offset", "_page"):
                    least = 1 if base == "_page" else 0
                    if not (value.isascii() and value.isdigit()) or int(value) < least:
                        kind = "a positive" if least else "a non-negative"
                        raise _invalid(f"{base} must be {kind} integer, not {_q(value)}")
                    paging[base] = int(value)
                elif base == "_total":
                    if value not in _TOTAL:
                        raise _invalid(f"_total must be one of {', '.join(_TOTAL)}")
                    total = value
                elif base == "_summary":
                    if value not in _SUMMARY:
                        raise _invalid(f"_summary must be one of {', '.join(_SUMMARY)}")
                    summary = value
                else:  # _elements
                    for el in (e.strip() for e in value.split(",")):
                        if not el:
                            continue
                        if not _ELEMENT.fullmatch(el):
                            raise _invalid(f"_elements: invalid element name {_q(el)}")
                        elements[el] = None
                continue
            try:
                crit = self.criterion(rt, top, name, value, 0)
            except _Unknown as exc:
                if self.strict:
                    raise FhirError(Code.UNKNOWN_SEARCH_PARAM, str(exc)) from None
                some = [t for t in types if base in self.params_of(t)]
                if some:
                    # ignored, it would widen "this patient's data" to everything of
                    # every type: refused (search.html#_type: the parameters must be
                    # common to all the types)
                    raise FhirError(Code.UNKNOWN_SEARCH_PARAM, (
                        f"'{base[:64]}' is a parameter of {', '.join(some[:5])} but not of"
                        f" every type _type names; a search across types takes only"
                        f" parameters common to all of them")) from None
                self.warn(f"{exc} was ignored")
                ignored.append((name, value))
                continue
            except _Unsupported as exc:
                if self.strict:
                    raise FhirError(Code.UNSUPPORTED_SEARCH, str(exc)) from None
                self.warn(f"{exc}; the parameter was ignored")
                ignored.append((name, value))
                continue
            if crit is None:
                self.warn(f"Search parameter '{name}' has no value and was ignored")
                ignored.append((name, value))
                continue
            criteria.append(crit)
            if len(criteria) > MAX_CRITERIA:
                raise FhirError(Code.SEARCH_TOO_COSTLY,
                                f"A search may filter by at most {MAX_CRITERIA} parameters")
        if any(k.type == "special" for k in sort):
            # by distance: from the position(s) the search's near names
            origins = near_origins(tuple(criteria))
            if not origins:
                raise _invalid("_sort=near orders by the distance from the position that"
                               " 'near' gives: the search needs a near parameter")
            sort = [replace(k, origins=origins) if k.type == "special" else k for k in sort]

        return SearchQuery(
            resource_type=rt,
            types=tuple(types),
            criteria=tuple(criteria),
            sort=tuple(sort),
            count=paging.get("_count"),
            offset=paging.get("_offset"),
            page=paging.get("_page"),
            total=total,
            summary=summary,
            elements=tuple(elements),
            includes=tuple(includes),
            revincludes=tuple(revincludes),
            warnings=tuple(self.warnings),
            ignored=tuple(ignored),
            untyped_ids=tuple(self.untyped_ids),
        )

    def system_params(self, types: list[str]) -> Mapping[str, _Param]:
        if not types:
            return _COMMON
        common: dict[str, _Param] = dict(self.params_of(types[0]))
        for t in types[1:]:
            other = self.params_of(t)
            common = {  # the same kind, answered by the same index rows
                code: p for code, p in common.items()
                if code in other and other[code].type == p.type
                and other[code].stored_as == p.stored_as
            }
        for code, p in _COMMON.items():
            common.setdefault(code, p)
        return common

    # -- _sort, _include

    def sort(self, value: str, rt: str | None, top: Mapping[str, _Param]) -> list[SortKey]:
        keys: list[SortKey] = []
        for item in (s.strip() for s in value.split(",")):
            if not item:
                continue
            desc = item.startswith("-")
            code = item[1:] if desc else item
            head, dot, tail = code.partition(".")
            prefix = ""
            if dot and rt == "Bundle" and head in EMBEDDED and tail not in NOT_EMBEDDED:
                # by the Bundle's first resource (composition.date): its rows, kept
                # with the Bundle (Parser.embedded)
                prefix, p = f"{head}.", self.params_of(EMBEDDED[head]).get(tail)
            else:
                p = top.get(code)
            if p is None:
                raise _invalid(f"_sort: unknown search parameter '{code}' for {self.where(rt)}")
            if p.type not in ("string", "token", "date", "number", "quantity", "reference",
                              "uri", "special"):
                raise _invalid(f"_sort: cannot sort by {p.type} parameter '{code}'")
            if p.code not in ("_id", "_lastUpdated") and not p.expression:
                raise _invalid(f"_sort: parameter '{code}' is not indexed")
            keys.append(SortKey(code, desc, p.type, tuple(prefix + c for c in p.stored_as)))
        return keys

    def include(
        self, which: str, value: str, rt: str | None, types: list[str], iterate: bool
    ) -> list[Include]:
        value = value.strip()
        if not value:
            return []
        if value == "*":
            return [Include("*", "*", None, iterate, True)]
        parts = value.split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise _invalid(f"{which}: expected Type:param[:TargetType], not {_q(value)}")
        source, code = parts[0], parts[1]
        target = parts[2] if len(parts) == 3 else None
        if not self.known_type(source):
            raise _invalid(f"{which}: unknown resource type '{source}'")
        if target is not None and not self.known_type(target):
            raise _invalid(f"{which}: unknown resource type '{target}'")
        if code == "*":
            return [Include(source, "*", target, iterate, True)]
        p = self.params_of(source).get(code)
        if p is None or p.type != "reference":
            raise _invalid(
                f"{which}: '{code}' is not a reference search parameter of {source}"
            )
        if target is not None and p.targets and target not in p.targets:
            raise _invalid(f"{which}: {source}:{code} cannot refer to {target}")
        canonical = tuple(t for t in ((target,) if target else p.targets) if self.canonical(t))
        return [Include(source, code, target, iterate, False, canonical)]

    # -- criteria

    def criterion(
        self, rt: str | None, pmap: Mapping[str, _Param], name: str, value: str, depth: int
    ) -> Criterion | None:
        if depth > MAX_DEPTH:
            raise _Unsupported(f"Chains and _has may nest at most {MAX_DEPTH} levels ('{name}')")
        if name == "_has" or name.startswith("_has:"):
            return self.has(rt, name, value, depth)
        head, dot, tail = name.partition(".")
        code, _, modifier = head.partition(":")
        if not code:
            raise _invalid(f"Invalid search parameter name {_q(name)}")
        if code in _UNSUPPORTED_CONTROL:
            raise _Unsupported(f"Search parameter '{code}' is not supported")
        if code == "_list":
            return self.listed(rt, name, value, depth)
        p = pmap.get(code)
        if p is None:
            raise _Unknown(f"Unknown search parameter '{code}' for {self.where(rt)}")
        if dot and rt == "Bundle" and code in EMBEDDED:
            return self.embedded(p, modifier, tail, value, depth)
        if dot:
            return self.chain(rt, p, modifier, tail, value, depth)
        if (p.type == "special" and not p.expression) or (
                p.type == "composite" and not composite_supported(p)):
            raise _Unsupported(f"{p.type.capitalize()} search parameter '{code}' is not supported")
        if p.code not in ("_id", "_lastUpdated") and not p.expression:
            raise _Unsupported(f"Search parameter '{code}' is not supported")
        mod = self.modifier(p, modifier)
        values = self.values(p, mod, value)
        if not values:
            return None
        if p.type == "reference" and mod is None:
            targets = self.targets(rt, p)
            for v in values:
                if isinstance(v, ReferenceValue) and v.type is None and v.id is not None \
                        and len(targets) > 1:
                    self.untyped_ids[(p.code, v.id, targets)] = None
        return Criterion(code, p.type, mod, tuple(values), stored=p.stored_as)

    def targets(self, rt: str | None, p: _Param) -> tuple[str, ...]:
        """The types ``p`` may refer to from ``rt``: its targets, or those its expression
        keeps for ``rt`` when each of its paths there ends in ``.where(resolve() is X)``
        (``patient`` targets Patient and Group, but indexes an Observation's subject
        only when it is a Patient)."""
        if rt is None or not p.expression:
            return p.targets
        paths = [x.strip() for x in p.expression.split("|")
                 if x.strip().startswith(f"{rt}.")]
        kept = [_RESOLVES_TO.search(x) for x in paths]
        if not paths or not all(kept):
            return p.targets
        named = {m.group(1) for m in kept if m is not None}
        return tuple(t for t in p.targets if t in named)

    def listed(self, rt: str | None, name: str, value: str, depth: int) -> Criterion | None:
        """``_list=42``: the resources List/42 names (search.html#list); its values are the
        Lists' ids, OR-ed, until the members are read (``with_list_members``)."""
        if name != "_list":
            raise _invalid(f"'_list' takes no modifier or chain ({_q(name)})")
        if rt is None or depth:
            raise _Unsupported("_list is supported in a search of one type")
        ids = [unescape(v).strip() for v in split_escaped(value, ",") if v.strip()]
        for id in ids:
            if id.startswith("$"):
                raise _Unsupported(f"functional lists ({_q(id)}) are not supported")
            if not _LIST_ID.fullmatch(id):
                raise _invalid(f"_list: {_q(id)} is not a List id")
        if not ids:
            return None
        return Criterion("_list", "_list", None, tuple(
            TokenValue(id, None, True) for id in dict.fromkeys(ids)))

    def modifier(self, p: _Param, modifier: str) -> str | None:
        if not modifier:
            return None
        if p.type == "reference" and _TYPE_NAME.fullmatch(modifier):
            if p.targets and modifier not in p.targets:
                raise _invalid(f"Search parameter '{p.code}' cannot refer to {modifier}")
            if not p.targets and not self.known_type(modifier):
                raise _invalid(f"Unknown resource type '{modifier}' in '{p.code}:{modifier}'")
            return modifier
        allowed = _MODIFIERS.get(p.type, frozenset())
        if p.code == "_id":
            allowed = frozenset({"missing", "not"})
        if modifier in allowed:
            return modifier
        if modifier in _UNSUPPORTED_MODIFIERS.get(p.type, frozenset()):
            raise FhirError(
                Code.UNSUPPORTED_SEARCH,
                f"Modifier ':{modifier}' on '{p.code}' is not supported",
            )
        if modifier in _KNOWN_MODIFIERS:
            raise _invalid(f"Modifier ':{modifier}' does not apply to {p.type} "
                           f"parameter '{p.code}'")
        raise _invalid(f"Unknown modifier ':{modifier}' on '{p.code}'")

    def chain(
        self, rt: str | None, p: _Param, modifier: str, tail: str, value: str, depth: int
    ) -> Criterion | None:
        if p.type != "reference":
            raise _invalid(f"Cannot chain from {p.type} parameter '{p.code}'")
        if modifier:
            if not _TYPE_NAME.fullmatch(modifier):
                raise _invalid(f"Only a resource type may modify chained parameter '{p.code}'")
            self.modifier(p, modifier)
            candidates: tuple[str, ...] = (modifier,)
        else:
            candidates = tuple(t for t in p.targets if self.known_type(t))
            if not candidates:
                raise _invalid(
                    f"Chained parameter '{p.code}' needs a type modifier ('{p.code}:Type.')"
                )
        links: list[Chain] = []
        unknown: _Unknown | None = None
        for target in candidates:
            try:
                inner = self.criterion(target, self.params_of(target), tail, value, depth + 1)
            except _Unknown as exc:
                unknown = exc
                continue
            if inner is None:
                return None
            links.append(Chain(target, inner, self.canonical(target)))
        if not links:
            if len(candidates) == 1 and unknown is not None:
                raise unknown
            raise _Unknown(
                f"Unknown chained search parameter '{tail}' for {'|'.join(candidates)}"
                f" (in '{p.code}.{tail}' on {self.where(rt)})"
            )
        return Criterion(p.code, "reference", modifier or None, (), tuple(links))

    def embedded(
        self, p: _Param, modifier: str, tail: str, value: str, depth: int
    ) -> Criterion | None:
        """A chain into a Bundle's first resource (``composition.subject=…``): a criterion
        on the rows the Bundle holds for it (``gateway.fhir.indexer.EMBEDDED``)."""
        target = EMBEDDED[p.code]
        if modifier and modifier != target:
            raise _invalid(f"Search parameter '{p.code}' cannot refer to {modifier}")
        inner = self.criterion(target, self.params_of(target), tail, value, depth + 1)
        if inner is None:
            return None
        if inner.code in NOT_EMBEDDED or inner.has is not None:
            raise _Unsupported(f"'{p.code}.{inner.code}' is not supported: "
                               f"search the Bundle's {p.code} by its content")
        return replace(inner, code=f"{p.code}.{inner.code}",
                       stored=tuple(f"{p.code}.{c}" for c in inner.stored))

    def has(self, rt: str | None, name: str, value: str, depth: int) -> Criterion | None:
        parts = name.split(":", 3)
        if len(parts) != 4 or not all(parts[1:]):
            raise _invalid(f"_has must be _has:Type:reference:parameter, not {_q(name)}")
        _, source, ref_code, rest = parts
        if rt is None:
            raise _Unsupported("_has is not supported in a system-wide search")
        if not self.known_type(source):
            raise _invalid(f"{name}: unknown resource type '{source}'")
        spmap = self.params_of(source)
        ref = spmap.get(ref_code)
        if ref is None:
            raise _Unknown(f"Unknown search parameter '{ref_code}' for {source} (in '{name}')")
        if ref.type != "reference":
            raise _invalid(f"{name}: '{ref_code}' is not a reference parameter of {source}")
        if ref.targets and rt not in ref.targets:
            raise _invalid(f"{name}: {source}.{ref_code} cannot refer to {rt}")
        inner = self.criterion(source, spmap, rest, value, depth + 1)
        if inner is None:
            return None
        return Criterion("_has", "_has", None, (), (),
                         Has(source, ref_code, inner, self.canonical(rt)))

    # -- values

    def values(self, p: _Param, modifier: str | None, raw: str) -> list[Value]:
        parts = [s for s in split_escaped(raw, ",") if s.strip() != ""]
        self._values += len(parts)
        if self._values > MAX_VALUES:
            raise FhirError(Code.SEARCH_TOO_COSTLY,
                            f"A search may test at most {MAX_VALUES:,} values in all (counted"
                            f" through every type a chain or _has looks into)")
        # each value once, in the order given
        return list(dict.fromkeys(self.value(p, modifier, part) for part in parts))

    def value(self, p: _Param, modifier: str | None, raw: str) -> Value:
        if modifier == "missing":
            text = raw.strip()
            if text not in ("true", "false"):
                raise _invalid(f"'{p.code}:missing' must be true or false, not {_q(text)}")
            return MissingValue(text == "true")
        t = p.type
        if p.code == "_id":
            text = unescape(raw).strip()
            if not _ID.fullmatch(text):
                raise _invalid(f"Invalid resource id {_q(text)}")
            return TokenValue(text)
        if t == "string":
            text = unescape(raw)
            return StringValue(text, normalize_string(text))
        if t == "token":
            if modifier == "text":
                text = unescape(raw)
                return StringValue(text, normalize_string(text))
            if modifier == "of-type":
                pieces = [unescape(x) for x in split_escaped(raw, "|")]
                if len(pieces) != 3 or not all(pieces):
                    raise _invalid(f"'{p.code}:of-type' takes type-system|type-code|value,"
                                   f" not {_q(raw)}")
                return OfTypeValue(*pieces)
            if modifier in ("below", "above"):
                tok = self.token(p, raw)
                if tok.any_system or tok.system is None or tok.code is None:
                    raise _invalid(f"'{p.code}:{modifier}' takes system|code, not {_q(raw)}")
                op = "is-a" if modifier == "below" else "generalizes"
                compose = {"include": [{"system": tok.system, "filter": [
                    {"property": "concept", "op": op, "value": tok.code}]}]}
                return InValue(f"{modifier}:{tok.system}|{tok.code}",
                               compose=orjson.dumps(compose).decode())
            if modifier in ("in", "not-in"):
                url = unescape(raw).strip()
                if not _ABSOLUTE.fullmatch(url):
                    raise _invalid(f"'{p.code}:{modifier}' takes a ValueSet's canonical URL,"
                                   f" not {_q(url)}")
                return InValue(url)
            return self.token(p, raw)
        if t == "date":
            return self.date(p, raw)
        if t == "number":
            prefix, value, lo, hi, text = self.number(p, raw.strip())
            return NumberValue(prefix, value, lo, hi, text)
        if t == "quantity":
            return self.quantity(p, raw)
        if t == "special":
            return self.near(p, raw)
        if t == "reference":
            if modifier == "identifier":
                return self.token(p, raw)
            return self.reference(p, modifier, unescape(raw).strip())
        if t == "uri":
            text = unescape(raw).strip()
            if not text:
                raise _invalid(f"Empty uri value for '{p.code}'")
            return UriValue(text)
        if t == "composite":
            return self.composite(p, raw)
        raise _Unsupported(f"Search parameter type '{t}' ('{p.code}') is not supported")

    def composite(self, p: _Param, raw: str) -> CompositeValue:
        pieces = split_escaped(raw, "$")
        if len(pieces) != 2 or not pieces[0].strip() or not pieces[1].strip():
            raise _invalid(f"Invalid value {_q(raw)} for composite parameter '{p.code}'"
                           f" (expected {p.parts[0].code}${p.parts[1].code},"
                           " e.g. system|code$value)")
        first, second = p.parts
        value = self.value(second, None, pieces[1])
        return CompositeValue(self.token(first, pieces[0]), value, second.type)

    def token(self, p: _Param, raw: str) -> TokenValue:
        pieces = split_escaped(raw, "|")
        if len(pieces) == 1:
            code = unescape(pieces[0])
            return TokenValue(code)
        if len(pieces) != 2:
            raise _invalid(f"Invalid token {_q(raw)} for '{p.code}' (use [system]|[code])")
        system, code = unescape(pieces[0]), unescape(pieces[1])
        if not system and not code:
            raise _invalid(f"Invalid token {_q(raw)} for '{p.code}'")
        return TokenValue(code or None, system or None, False)

    def date(self, p: _Param, raw: str) -> DateValue:
        m = _PREFIXED.fullmatch(unescape(raw).strip())
        assert m is not None
        prefix = m.group(1) or "eq"
        text = _SPACE_TZ.sub(r"\1+\2", m.group(2))
        bounds = date_bounds(text) if text else None
        if bounds is None:
            raise _invalid(f"Invalid date {_q(raw)} for '{p.code}' "
                           f"(expected [prefix]YYYY[-MM[-DD[Thh:mm:ss[.fff][Z|±hh:mm]]]])")
        lo, hi = bounds
        if prefix == "ap":
            mid = (lo + hi) // 2
            delta = max(abs(self.now - mid) // 10, AP_DATE_MIN_MICROS)
            lo, hi = lo - delta, hi + delta
        return DateValue(prefix, lo, hi, text)

    def number(self, p: _Param, raw: str) -> tuple[str, float, float, float, str]:
        m = _PREFIXED.fullmatch(raw)
        assert m is not None
        prefix = m.group(1) or "eq"
        text = m.group(2).strip()
        if not _DECIMAL.fullmatch(text):
            raise _invalid(f"Invalid number {_q(raw)} for '{p.code}'")
        try:
            with localcontext() as ctx:
                ctx.prec = 50
                d = Decimal(text)
                exponent = d.as_tuple().exponent
                assert isinstance(exponent, int)
                half = Decimal(5).scaleb(exponent - 1)
                lo, hi = d - half, d + half
                if prefix == "ap":
                    spread = abs(d) / 10
                    lo, hi = min(lo, d - spread), max(hi, d + spread)
                bounds = float(d), float(lo), float(hi)
        except ArithmeticError:  # decimal's Overflow, InvalidOperation, ...
            raise _invalid(f"Number {_q(raw)} for '{p.code}' is out of range") from None
        if not all(math.isfinite(b) for b in bounds):
            raise _invalid(f"Number {_q(raw)} for '{p.code}' is out of range")
        return prefix, *bounds, text

    def near(self, p: _Param, raw: str) -> NearValue:
        """``latitude|longitude|distance|units`` (location.html#positional): units UCUM,
        kilometres when not given; no distance (or 0): the position itself, as HAPI
        FHIR reads it."""
        pieces = [unescape(x).strip() for x in split_escaped(raw, "|")]
        usage = f"'{p.code}' takes latitude|longitude[|distance[|units]], not {_q(raw)}"
        if not 2 <= len(pieces) <= 4 or not all(
                _DECIMAL.fullmatch(x) for x in pieces[:3] if x):
            raise _invalid(usage)
        if not pieces[0] or not pieces[1]:
            raise _invalid(usage)
        lat, lon = float(pieces[0]), float(pieces[1])
        if not valid_position(lat, lon):
            raise _invalid(f"'{p.code}': latitude must lie within ±90 and longitude within"
                           f" ±180 degrees, not {_q(raw)}")
        km: float | None = None
        if len(pieces) >= 3 and pieces[2]:
            unit = pieces[3] if len(pieces) == 4 and pieces[3] else "km"
            if unit not in UNIT_KM:
                raise _invalid(f"'{p.code}': unknown distance unit {_q(unit)} (UCUM: "
                               f"{', '.join(UNIT_KM)})")
            km = float(pieces[2]) * UNIT_KM[unit]
            if not math.isfinite(km) or km < 0:
                raise _invalid(f"'{p.code}': the distance must be a positive number, not"
                               f" {_q(pieces[2])}")
            km = km or None
        return NearValue(lat, lon, km)

    def quantity(self, p: _Param, raw: str) -> QuantityValue:
        pieces = split_escaped(raw, "|")
        if len(pieces) not in (1, 3):
            raise _invalid(f"Invalid quantity {_q(raw)} for '{p.code}' "
                           f"(use [prefix]number or [prefix]number|system|code)")
        prefix, value, lo, hi, text = self.number(p, unescape(pieces[0]).strip())
        system = code = None
        if len(pieces) == 3:
            system = unescape(pieces[1]) or None
            code = unescape(pieces[2]) or None
        return QuantityValue(prefix, value, lo, hi, text, system, code)

    def reference(self, p: _Param, modifier: str | None, text: str) -> ReferenceValue:
        if not text:
            raise _invalid(f"Empty reference value for '{p.code}'")
        if self.base_url and text.startswith(self.base_url):
            local = text[len(self.base_url):]
            if _RELATIVE.fullmatch(local):
                text = local
        m = _RELATIVE.fullmatch(text)
        if m:
            rtype = m.group("type")
            if modifier and rtype != modifier:
                raise _invalid(f"'{p.code}:{modifier}' does not match reference {_q(text)}")
            return ReferenceValue(rtype, m.group("id"), None, m.group("ver"))
        if _ID.fullmatch(text):
            rtype = modifier
            if rtype is None and len(p.targets) == 1:
                rtype = p.targets[0]
            return ReferenceValue(rtype, text)
        if _ABSOLUTE.fullmatch(text):
            url, bar, version = text.partition("|")
            return ReferenceValue(None, None, url, version if bar else None)
        raise _invalid(f"Invalid reference {_q(text)} for '{p.code}'")

