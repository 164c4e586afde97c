"""``_summary`` and ``_elements``: https://hl7.org/fhir/R4/search.html#summary.

Subsetting works on top-level elements (the ones a StructureDefinition marks
``isSummary`` for ``_summary=true``; ``text`` and the mandatory ones for
``_summary=text``; everything but ``text`` for ``_summary=data``), and tags
the result ``SUBSETTED`` as the spec asks.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

SUBSETTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
    "display": "subsetted",
}

_ALWAYS = frozenset({"resourceType", "id", "meta"})


def _element_name(key: str, choices: Collection[str]) -> str:
    """``valueQuantity`` -> ``value`` for a choice ``value[x]``; ``_birthDate`` -> ``birthDate``."""
    key = key.lstrip("_")
    for choice in choices:
        if key.startswith(choice) and key[len(choice) : len(choice) + 1].isupper():
            return choice
    return key


def subset(
    resource: dict[str, Any], keep: Collection[str], choices: Collection[str]
) -> dict[str, Any]:
    out = {
        k: v
        for k, v in resource.items()
        if k in _ALWAYS or _element_name(k, choices) in keep
    }
    meta = dict(out.get("meta") or {})
    tags = [t for t in meta.get("tag", []) if t.get("code") != "SUBSETTED"]
    meta["tag"] = [*tags, SUBSETTED]
    out["meta"] = meta
    return out


def summarize(
    resource: dict[str, Any],
    mode: str,
    *,
    summary: Collection[str],
    mandatory: Collection[str],
    choices: Collection[str],
) -> dict[str, Any]:
    if mode == "true":
        return subset(resource, summary, choices)
    if mode == "text":
        return subset(resource, {"text", *mandatory}, choices)
    if mode == "data":
        keep = {_element_name(k, choices) for k in resource} - {"text"}
        return subset(resource, keep, choices)
    return resource
