"""Subscription filters: ``backport-filter-criteria`` strings, evaluated per event.

A filter string is search-style: ``Encounter?patient=Patient/123`` (or without
the type, ``patient=Patient/123``, for every resource type the topic triggers
on). Several parameters in one string, and several strings, all must hold
(logical AND, as the IG says); comma-separated values of one parameter are
alternatives (OR). Spec:
https://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition-backport-filter-criteria.html

Value semantics follow the search parameter types
(https://hl7.org/fhir/R4/search.html): ``reference`` (``Type/id`` or a bare id
for a resource of this server, an absolute URL for one elsewhere), ``token``
(``system|code``, ``|code``, ``code``, ``system|``), ``string``
(case-insensitive, starts-with).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from gateway.subscriptions.topics import FilterDef, Topic


class FilterError(ValueError):
    """A filter string the topic does not support."""


@dataclass(frozen=True, slots=True)
class Criterion:
    resource_type: str | None  # None: every trigger type of the topic
    name: str
    values: tuple[str, ...]

    def text(self) -> str:
        prefix = f"{self.resource_type}?" if self.resource_type else ""
        return f"{prefix}{self.name}={','.join(self.values)}"


def parse_filter(text: str, topic: Topic, own_base: str | None = None) -> list[Criterion]:
    """Criteria of one filter string, checked against what ``topic`` can filter by. A
    value naming a resource by ``own_base`` (the URL the notifications' ``focus`` uses)
    names it as ``Type/id``, as a search does: references to this server are stored
    relative."""
    own = f"{own_base.rstrip('/')}/" if own_base else None
    head, sep, query = text.strip().partition("?")
    if not sep:
        head, query = "", text.strip()
    rt = head or None
    if rt is not None and rt not in topic.resource_types:
        raise FilterError(f"topic {topic.url} has no trigger on {rt!r}")
    pairs = parse_qsl(query, keep_blank_values=True)
    if not pairs:
        raise FilterError(f"filter {text[:100]!r} has no parameter")
    out = []
    for name, value in pairs:
        if ":" in name:
            raise FilterError(f"filter modifiers are not supported ({name[:60]!r})")
        types = [rt] if rt else sorted(topic.resource_types)
        missing = [t for t in types if topic.filter(t, name) is None]
        if missing:
            raise FilterError(f"topic {topic.url} cannot filter {'/'.join(missing)} by "
                              f"{name[:60]!r}")
        values = tuple(v.strip().removeprefix(own) if own else v.strip()
                       for v in value.split(",") if v.strip())
        if not values:
            raise FilterError(f"filter {name[:60]!r} has no value")
        out.append(Criterion(rt, name, values))
    return out


def _strip(text: str) -> str:
    folded = unicodedata.normalize("NFKD", text).casefold()
    return "".join(c for c in folded if not unicodedata.combining(c))


def _reference_keys(value: Any) -> set[str]:
    ref = value.get("reference") if isinstance(value, dict) else value
    if not isinstance(ref, str) or not ref:
        return set()
    ref = ref.split("/_history/", 1)[0].rstrip("/")
    parts = ref.split("/")
    if len(parts) == 2 and ":" not in ref:  # Type/id: this server's resource
        return {ref, parts[1]}
    # an absolute url names a resource elsewhere (references to this server are
    # stored relative, and so are filter values naming them): it matches only itself
    return {ref}


def _tokens(value: Any, implied: str | None = None) -> set[tuple[str | None, str]]:
    """(system, code) pairs of a code (of the system its binding implies), Coding,
    CodeableConcept or Identifier."""
    if isinstance(value, bool):
        return {(None, "true" if value else "false")}
    if isinstance(value, str):
        return {(implied, value)}
    if not isinstance(value, dict):
        return set()
    if "coding" in value or ("text" in value and "code" not in value):
        out: set[tuple[str | None, str]] = set()
        for coding in value.get("coding", []) or []:
            out |= _tokens(coding)
        return out
    code = value.get("code", value.get("value"))
    return {(value.get("system"), str(code))} if code is not None else set()


def _matches(kind: str, wanted: str, values: list[Any], implied: str | None = None) -> bool:
    if kind == "reference":
        key = wanted.split("/_history/", 1)[0].rstrip("/")
        return any(key in _reference_keys(v) for v in values)
    if kind == "token":
        system, bar, code = wanted.partition("|")
        for sys_, code_ in (t for v in values for t in _tokens(v, implied)):
            if not bar and code_ == wanted:
                return True
            if bar and not system and sys_ is None and code_ == code:
                return True
            if bar and system and sys_ == system and (not code or code_ == code):
                return True
        return False
    needle = _strip(wanted)
    return any(isinstance(v, str) and _strip(v).startswith(needle) for v in values)


class EventValues:
    """Filter values of one event's resource, computed once per filter."""

    def __init__(self, resource: dict[str, Any] | None) -> None:
        self.resource = resource
        self._cache: dict[str, list[Any]] = {}

    def get(self, definition: FilterDef) -> list[Any]:
        if self.resource is None:
            return []
        values = self._cache.get(definition.expression)
        if values is None:
            values = self._cache[definition.expression] = definition.values(self.resource)
        return values


def accepts(topic: Topic, criteria: list[Criterion], resource_type: str,
            values: EventValues) -> bool:
    """Whether an event on ``resource_type`` passes every criterion that applies to it."""
    for criterion in criteria:
        if criterion.resource_type not in (None, resource_type):
            continue
        definition = topic.filter(resource_type, criterion.name)
        if definition is None:
            return False
        found = values.get(definition)
        if not any(_matches(definition.kind, v, found, definition.system)
                   for v in criterion.values):
            return False
    return True
