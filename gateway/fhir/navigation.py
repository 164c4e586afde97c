"""FHIRPath navigation in fhirpathpy, in time linear in the collection.

fhirpathpy (2.2) gathers a member of every item of a collection
(``fhirpathpy.engine.evaluators.member_invocation``), the ``children()`` and the
``descendants()`` of a collection (``...invocations.navigation``) by folding each
item's values into one list with ``acc = acc + values``: the list gathered so far
is copied for every item whose member repeats, and ``descendants()`` copies its
result again for every level. Over many items that is quadratic. R4's ``que-2``
(``descendants().linkId.isDistinct()``) and ``csd-1``
(``concept.code.combine($this.descendants().concept.code).isDistinct()``), checked
on every write of a Questionnaire and a CodeSystem, took 10.5 s of a 4 MB
Questionnaire of nested groups and 58 s of a 7 MB CodeSystem of nested concepts.

The functions here gather the same nodes, in the same order (for
``descendants()``: level by level, each level in document order), by extending
one list with what fhirpathpy's own step gives for each item. Importing this module
puts them in fhirpathpy's tables; ``gateway.fhir`` imports it, so every fhirpathpy
evaluation in the gateway uses them.
"""

from __future__ import annotations

from typing import Any

from fhirpathpy.engine import do_eval
from fhirpathpy.engine.evaluators import create_reduce_member_invocation, evaluators
from fhirpathpy.engine.invocations import invocation_registry
from fhirpathpy.engine.invocations.navigation import create_reduce_children
from fhirpathpy.engine.nodes import ResourceNode

# fhirpathpy carries no annotations
_functions: Any = invocation_registry
_evaluators: Any = evaluators
_do_eval: Any = do_eval
_member_step: Any = create_reduce_member_invocation
_children_step: Any = create_reduce_children
_create_node: Any = ResourceNode.create_node


def member(ctx: Any, parent: Any, node: Any) -> list[Any]:
    """The member the node names, of every item of ``parent``; a capitalised name
    that is the ``resourceType`` of items selects those items (``Bundle.entry.resource.
    Patient``), as fhirpathpy's own does."""
    key = _do_eval(ctx, parent, node["children"][0])[0].replace("`", "")
    if not isinstance(parent, list):
        return []
    if key[:1] == key[:1].upper():
        try:
            return [_create_node(x, key) for x in parent if x["resourceType"] == key]
        except TypeError:
            pass
    step = _member_step(ctx["model"], key)
    out: list[Any] = []
    for item in parent:
        out.extend(step([], item))
    return out


def children(ctx: Any, coll: list[Any]) -> list[Any]:
    """The children of every node of ``coll`` (primitive extensions left out), in order."""
    step = _children_step(ctx, True)
    out: list[Any] = []
    for node in coll:
        out.extend(step([], node))
    return out


def descendants(ctx: Any, coll: list[Any]) -> list[Any]:
    """Every node below ``coll``: its children, then theirs, level by level."""
    step = _children_step(ctx, False)
    out: list[Any] = []
    level = coll
    while level:
        below: list[Any] = []
        for node in level:
            below.extend(step([], node))
        out.extend(below)
        level = below
    return out


def _route_fhirpathpy() -> None:
    _evaluators["MemberInvocation"] = member
    for name, fn in (("children", children), ("descendants", descendants)):
        _functions[name]["fn"] = fn


_route_fhirpathpy()

__all__ = ["children", "descendants", "member"]
