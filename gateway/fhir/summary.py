"""``_summary`` and ``_elements``: https://hl7.org/fhir/R4/search.html#summary.

Subsetting works on top-level elements (the ones a StructureDefinition marks
``isSummary`` for ``_summary=true``; ``text`` and the mandatory ones for
``_summary=text``; everything but ``text`` for ``_summary=data``), and tags
the result ``SUBSETTED`` as the spec asks. ``_summary=true`` also keeps only
the summary elements of the backbone elements it keeps (``Observation.component``
without its ``interpretation``, ``CapabilityStatement.rest`` without its
resources); a data type's value is kept whole.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
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
    nested: Mapping[str, tuple[Collection[str], Collection[str]]] | None = None,
    aliases: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    if mode == "true":
        out = subset(resource, summary, choices)
        for key, value in out.items():
            if key not in _ALWAYS:
                out[key] = _summary_of(value, _element_name(key, choices), nested, aliases)
        return out
    if mode == "text":
        return subset(resource, {"text", *mandatory}, choices)
    if mode == "data":
        keep = {_element_name(k, choices) for k in resource} - {"text"}
        return subset(resource, keep, choices)
    return resource


def _summary_of(value: Any, path: str,
                nested: Mapping[str, tuple[Collection[str], Collection[str]]] | None,
                aliases: Mapping[str, str] | None) -> Any:
    """A backbone element's value at ``path`` with its summary elements only."""
    path = (aliases or {}).get(path, path)
    if not nested or path not in nested:
        return value  # a data type's value, or a primitive's
    if isinstance(value, list):
        return [_summary_of(item, path, nested, aliases) for item in value]
    if not isinstance(value, dict):
        return value
    keep, choices = nested[path]
    out = {}
    for key, item in value.items():
        name = _element_name(key, choices)
        if name in keep:
            out[key] = _summary_of(item, f"{path}.{name}", nested, aliases)
    return out
