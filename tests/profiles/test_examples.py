"""The example instances in ``tests/profiles/examples`` against the validator.

``manifest.json`` lists every example: valid ones with what they show, invalid
ones with the rule they break and the issue the validator must report (GW code,
``issue.expression``, and a text its diagnostics must mention: the constraint
key, the element id or the value set). Each profile has at least one valid and
one invalid example; each required binding to one of the gateway's value sets
and each of the profiles' own FHIRPath constraints has an invalid example.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest

from gateway.fhir.outcome import Issue
from gateway.fhir.validation import FhirValidator, load_definitions
from tests.profiles.helpers import BASE, EXAMPLES, PROFILES, load_json, manifest, of_type

MANIFEST = manifest()
VALID = MANIFEST["valid"]
INVALID = MANIFEST["invalid"]
PROFILE_URLS = {sd["url"] for sd in of_type("StructureDefinition") if sd["type"] != "Extension"}


@cache
def validator() -> FhirValidator:
    return FhirValidator(load_definitions(PROFILES))


def errors(issues: list[Issue]) -> list[Issue]:
    return [i for i in issues if i.severity in ("error", "fatal")]


def describe(issues: list[Issue]) -> str:
    return "\n".join(f"{i.severity} {i.code.gw} {i.expression} {i.diagnostics}" for i in issues)


def test_manifest_lists_every_example_file_once() -> None:
    listed = [e["file"] for e in VALID + INVALID]
    on_disk = sorted(str(p.relative_to(EXAMPLES)) for p in EXAMPLES.glob("*/*.json"))
    assert sorted(listed) == on_disk
    assert len(set(listed)) == len(listed)


def test_every_profile_has_a_valid_and_an_invalid_example() -> None:
    assert {e["profile"] for e in VALID} == PROFILE_URLS
    assert {e["profile"] for e in INVALID} == PROFILE_URLS


def test_every_own_required_binding_and_constraint_has_an_invalid_example() -> None:
    mentioned = " ".join(e["expect"]["mentions"] for e in INVALID)
    for sd in of_type("StructureDefinition"):
        for el in sd["differential"]["element"]:
            binding = el.get("binding", {})
            if binding.get("strength") == "required" and binding["valueSet"].startswith(BASE):
                vs = binding["valueSet"].removeprefix(f"{BASE}/")
                assert vs in mentioned, f"no invalid example breaks {sd['id']} {el['id']} -> {vs}"
            for c in el.get("constraint", []):
                assert c["key"] in mentioned, f"no invalid example breaks {c['key']}"


@pytest.mark.parametrize("entry", VALID, ids=lambda e: e["file"])
def test_valid_example_claims_its_profile_and_validates_clean(entry: dict[str, Any]) -> None:
    resource = load_json(EXAMPLES / entry["file"])
    assert entry["profile"] in resource["meta"]["profile"]
    issues = validator().validate(resource)
    assert not errors(issues), describe(issues)


@pytest.mark.parametrize("entry", VALID, ids=lambda e: e["file"])
def test_valid_example_validates_clean_when_the_profile_is_named(entry: dict[str, Any]) -> None:
    resource = load_json(EXAMPLES / entry["file"])
    resource.pop("meta")
    issues = validator().validate(resource, profile=entry["profile"])
    assert not errors(issues), describe(issues)


@pytest.mark.parametrize("entry", INVALID, ids=lambda e: e["file"])
def test_invalid_example_fails_at_the_expected_element_with_the_profile_rule(
        entry: dict[str, Any]) -> None:
    resource = load_json(EXAMPLES / entry["file"])
    assert entry["profile"] in resource["meta"]["profile"]
    issues = errors(validator().validate(resource))
    expect = entry["expect"]
    found = [i for i in issues
             if i.code.gw == expect["code"] and expect["expression"] in i.expression
             and expect["mentions"] in (i.diagnostics or "")]
    assert found, f"{entry['breaks']}: expected {expect}, got\n{describe(issues)}"


@pytest.mark.parametrize("entry", INVALID, ids=lambda e: e["file"])
def test_invalid_example_is_valid_r4_apart_from_the_profile(entry: dict[str, Any]) -> None:
    """What fails is the profile's rule, not base R4 (except bdl-11 for a misplaced Composition)."""
    resource = load_json(EXAMPLES / entry["file"])
    resource.pop("meta")
    for nested in resource.get("entry", []):
        nested["resource"].pop("meta", None)
    issues = errors(validator().validate(resource))
    allowed = {"Bundle-composition-not-first.json": "bdl-11"}
    name = entry["file"].rsplit("/", 1)[-1]
    assert all(allowed.get(name, "\0") in (i.diagnostics or "") for i in issues), describe(issues)
