"""FHIRPath member access, ``children()`` and ``descendants()`` (gateway.fhir.navigation)
give what fhirpathpy's own give, node for node and in the same order, and R4's
``que-2`` and ``csd-1`` still find a code given twice at any depth."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path
from typing import Any

import fhirpathpy
import pytest
from fhirpathpy.engine.evaluators import evaluators
from fhirpathpy.engine.invocations import invocation_registry
from fhirpathpy.engine.invocations import navigation as upstream
from fhirpathpy.models import models

from gateway.fhir import navigation
from gateway.fhir.validation import FhirValidator, load_definitions
from gateway.fhir.validation.fhirpath import Env, reference_evaluator
from gateway.registry import profiles_dir

r4_model = models["r4"]
DATA = Path(__file__).resolve().parent.parent / "data"
EXPRESSIONS = ("descendants()", "children()", "children().children()", "descendants().reference",
               "item.descendants().linkId", "descendants().extension.url",
               "descendants().code", "entry.resource.id", "contained.id",
               "name.given | telecom.value")
_upstream_member = sys.modules["fhirpathpy.engine.evaluators"].member_invocation


def _examples() -> list[dict[str, Any]]:
    with gzip.open(DATA / "r4-examples.ndjson.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(json.loads(line)["text"]) for line in f]
    # every resource type once, with the largest example of each
    largest: dict[str, dict[str, Any]] = {}
    for r in rows:
        rt = r.get("resourceType")
        if rt and len(json.dumps(r)) > len(json.dumps(largest.get(rt, {}))):
            largest[rt] = r
    return list(largest.values())


def _evaluate(resource: dict[str, Any], expression: str, *, own: bool) -> Any:
    table: Any = invocation_registry
    kinds: Any = evaluators
    saved = table["children"]["fn"], table["descendants"]["fn"], kinds["MemberInvocation"]
    if not own:
        table["children"]["fn"], table["descendants"]["fn"] = \
            upstream.children, upstream.descendants
        kinds["MemberInvocation"] = _upstream_member
    try:
        return fhirpathpy.evaluate(resource, expression, {}, r4_model,
                                   {"returnRawData": True})
    finally:
        table["children"]["fn"], table["descendants"]["fn"], kinds["MemberInvocation"] = saved


def test_the_gateway_routes_the_three() -> None:
    table: Any = invocation_registry
    assert table["descendants"]["fn"] is navigation.descendants
    assert table["children"]["fn"] is navigation.children
    assert evaluators["MemberInvocation"] is navigation.member


@pytest.mark.parametrize("expression", EXPRESSIONS)
def test_same_nodes_in_the_same_order_as_fhirpathpy(expression: str) -> None:
    examples = _examples()
    assert len(examples) > 100
    compared = 0
    for resource in examples:
        ours = _evaluate(resource, expression, own=True)
        theirs = _evaluate(resource, expression, own=False)
        assert ours == theirs, (resource.get("resourceType"), resource.get("id"))
        compared += len(theirs)
    assert compared > 0


def _nested(groups: int, depth: int, duplicate: bool = False) -> dict[str, Any]:
    count = 0

    def group(d: int) -> dict[str, Any]:
        nonlocal count
        count += 1
        if d == 0:
            return {"linkId": f"q{count}", "type": "string"}
        return {"linkId": f"g{count}", "type": "group", "item": [group(d - 1) for _ in range(3)]}

    items = [group(depth) for _ in range(groups)]
    if duplicate:  # the deepest question of the last group takes the first group's id
        node = items[-1]
        while "item" in node:
            node = node["item"][-1]
        node["linkId"] = items[0]["linkId"]
    return {"resourceType": "Questionnaire", "status": "active", "item": items}


@pytest.mark.parametrize("duplicate", [False, True])
def test_que_2_over_nested_groups(duplicate: bool) -> None:
    q = _nested(8, 5, duplicate)
    que_2 = reference_evaluator("descendants().linkId.isDistinct()", "Questionnaire")
    assert que_2(q, Env(q, q)) is (not duplicate)
    validator = FhirValidator(load_definitions(profiles_dir()), max_depth=64, max_nesting=6)
    found = [str(i.diagnostics)[:6] for i in validator.validate(q) if i.severity == "error"]
    assert found == (["que-2:"] if duplicate else [])


@pytest.mark.parametrize("duplicate", [False, True])
def test_csd_1_over_nested_concepts(duplicate: bool) -> None:
    def concept(code: str, depth: int) -> dict[str, Any]:
        c: dict[str, Any] = {"code": code}
        if depth:
            c["concept"] = [concept(f"{code}.{i}", depth - 1) for i in range(4)]
        return c

    cs = {"resourceType": "CodeSystem", "status": "active", "content": "complete",
          "concept": [concept(f"C{i}", 3) for i in range(5)]}
    if duplicate:  # a code deep in the last chapter is the first chapter's
        cs["concept"][-1]["concept"][2]["concept"][1]["code"] = "C0"
    validator = FhirValidator(load_definitions(profiles_dir()), max_depth=64, max_nesting=6)
    found = [str(i.diagnostics)[:6] for i in validator.validate(cs) if i.severity == "error"]
    assert found == (["csd-1:"] if duplicate else [])
