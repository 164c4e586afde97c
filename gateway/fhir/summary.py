"""``_summary`` and ``_elements``: https://hl7.org/fhir/R4/search.html#summary.

Subsetting works on top-level elements (the ones a StructureDefinition marks
``isSummary`` for ``_summary=true``; ``text`` and the mandatory ones for
``_summary=text``; everything but ``text`` for ``_summary=data``), and tags
the result ``SUBSETTED`` as the spec asks. ``_summary=true`` also keeps only
the summary elements of the backbone elements it keeps (``Observation.component``
without its ``interpretation``, ``CapabilityStatement.rest`` without its
resources); a data type's value is kept whole.

``_elements`` names top-level elements (R4), and, as HAPI FHIR accepts them,
elements of one type (``Observation.code``: the others are whole unless an
unqualified name asks for them too) and elements below the top
(``name.family``, ``component.code``): the element keeps only those children.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

from gateway.fhir.paths import Model

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


#: what ``_elements`` keeps of a resource: element name -> what it keeps of that
#: element (an empty tree: all of it)
Tree = dict[str, "Tree"]


def element_tree(elements: Iterable[str], resource_type: str) -> Tree | None:
    """The elements ``_elements`` keeps of a resource of ``resource_type``; None: none of
    them is about this type (``Observation.code`` leaves a Patient whole)."""
    tree: Tree = {}
    applies = False
    for element in elements:
        head, dot, rest = element.partition(".")
        if head[:1].isupper():  # Type.element
            if head != resource_type or not dot:
                continue
            element = rest
        applies = True
        node = tree
        parts = [part.removesuffix("[x]") for part in element.split(".")]
        for depth, part in enumerate(parts):
            if part in node and not node[part]:
                break  # asked for whole already
            if depth == len(parts) - 1:
                node[part] = {}
            else:
                node = node.setdefault(part, {})
    return tree if applies else None


def subset(
    resource: dict[str, Any], keep: Collection[str], choices: Collection[str],
    tree: Tree | None = None, model: Model | None = None,
) -> dict[str, Any]:
    """``resource`` with the top-level elements ``keep`` names (and, with ``tree`` and
    ``model``, below the top only the children the tree names)."""
    out = {
        k: v
        for k, v in resource.items()
        if k in _ALWAYS or k in keep or _element_name(k, choices) in keep
    }
    if tree and model is not None:
        rt = resource.get("resourceType")
        for key in list(out):
            below = tree.get(key) or tree.get(_element_name(key, choices))
            if below and not key.startswith("_") and isinstance(rt, str):
                out[key] = _pruned(out[key], below, _context(model, rt, key), model)
                if not out[key]:  # none of the children asked for is there
                    del out[key]
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


def _context(model: Model, ctx: str, key: str) -> str | None:
    """Where the children of JSON key ``key`` under ``ctx`` are defined."""
    found = model.child(ctx, key)
    return found[1].ctx if found else None


def _pruned(value: Any, tree: Tree, ctx: str | None, model: Model) -> Any:
    """``value`` (an element, or a list of them) with only the children ``tree`` names;
    an element whose definition is not known is kept whole."""
    if isinstance(value, list):  # (an item left empty is left out: JSON has no nulls)
        return [kept for item in value if (kept := _pruned(item, tree, ctx, model))]
    if not isinstance(value, dict) or ctx is None:
        return value
    out = {}
    for key, item in value.items():
        name = _child_name(key, tree, ctx, model)
        if name is None:
            continue
        below = tree[name]
        kept = _pruned(item, below, _context(model, ctx, key), model) \
            if below and not key.startswith("_") else item
        if kept or not below:
            out[key] = kept
    return out


def _child_name(key: str, tree: Tree, ctx: str, model: Model) -> str | None:
    """The element of ``tree`` that JSON key ``key`` under ``ctx`` holds
    (``valueQuantity``: ``value``, ``_family``: ``family``)."""
    bare = key.lstrip("_")
    if bare in tree:
        return bare
    found = model.child(ctx, bare)
    return found[0] if found and found[0] in tree else None
