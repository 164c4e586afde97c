"""Offline ValueSet expansion (gateway.fhir.validation.terminology)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.fhir.validation import Definitions
from gateway.fhir.validation.terminology import Expander, Unexpandable

CS = "urn:test:cs"


def code_system() -> dict[str, Any]:
    return {"resourceType": "CodeSystem", "url": CS, "content": "complete", "concept": [
        {"code": "a", "property": [{"code": "colour", "valueCode": "red"}], "concept": [
            {"code": "a1", "concept": [{"code": "a11"}]}, {"code": "a2"}]},
        {"code": "b", "property": [{"code": "colour", "valueCode": "blue"}]},
        {"code": "c", "property": [{"code": "parent", "valueCode": "b"}]},
    ]}


def expand(compose: dict[str, Any], extra: dict[str, Any] | None = None) -> set[str]:
    vs = {"resourceType": "ValueSet", "url": "urn:test:vs", "compose": compose}
    value_sets = {"urn:test:vs": vs, **(extra or {})}
    codes = Expander({CS: code_system()}, value_sets).expand("urn:test:vs")
    return {c for _, c in codes}


@pytest.mark.parametrize(("include", "expected"), [
    ({"system": CS}, {"a", "a1", "a11", "a2", "b", "c"}),
    ({"system": CS, "concept": [{"code": "b"}, {"code": "zz"}]}, {"b", "zz"}),
    ({"system": CS, "filter": [{"property": "concept", "op": "is-a", "value": "a"}]},
     {"a", "a1", "a11", "a2"}),
    ({"system": CS, "filter": [{"property": "concept", "op": "descendent-of", "value": "a"}]},
     {"a1", "a11", "a2"}),
    ({"system": CS, "filter": [{"property": "concept", "op": "is-not-a", "value": "a"}]},
     {"b", "c"}),
    ({"system": CS, "filter": [{"property": "concept", "op": "is-a", "value": "b"}]},
     {"b", "c"}),  # hierarchy from the parent property
    ({"system": CS, "filter": [{"property": "colour", "op": "=", "value": "blue"}]}, {"b"}),
    ({"system": CS, "filter": [{"property": "code", "op": "regex", "value": "a[0-9]+"}]},
     {"a1", "a11", "a2"}),
])
def test_include_forms(include: dict[str, Any], expected: set[str]) -> None:
    assert expand({"include": [include]}) == expected


def test_exclude_and_value_set_imports() -> None:
    other = {"urn:test:other": {"resourceType": "ValueSet", "url": "urn:test:other",
                                "compose": {"include": [{"system": CS,
                                                         "concept": [{"code": "b"}]}]}}}
    compose = {"include": [{"valueSet": ["urn:test:other"]}, {"system": CS,
                                                               "concept": [{"code": "c"}]}],
               "exclude": [{"system": CS, "concept": [{"code": "c"}]}]}
    assert expand(compose, other) == {"b"}


@pytest.mark.parametrize("include", [
    {"system": "http://snomed.info/sct"},
    {"valueSet": ["urn:test:missing"]},
    {"system": CS, "filter": [{"property": "concept", "op": "generalizes", "value": "a"}]},
])
def test_what_cannot_be_expanded_offline_says_so(include: dict[str, Any]) -> None:
    with pytest.raises(Unexpandable):
        expand({"include": [include]})


def test_required_r4_value_sets_are_shipped_expanded(definitions: Definitions) -> None:
    gender = definitions.value_sets["http://hl7.org/fhir/ValueSet/administrative-gender"]
    assert {c for _, c in gender} == {"male", "female", "other", "unknown"}
    assert len(definitions.value_sets) > 200
    # the few that need external code systems are recorded, not silently skipped
    assert set(definitions.unexpanded) >= {"http://hl7.org/fhir/ValueSet/mimetypes",
                                           "http://hl7.org/fhir/ValueSet/currencies"}


def test_the_gateways_own_value_sets_expand(definitions: Definitions) -> None:
    own = [u for u in definitions.value_sets if u.startswith("https://carepath-gateway.org/")]
    assert own
    assert not [u for u in definitions.unexpanded
                if u.startswith("https://carepath-gateway.org/fhir/ValueSet/")]
