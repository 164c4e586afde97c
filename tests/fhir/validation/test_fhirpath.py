"""Compiled invariants agree with fhirpathpy (gateway.fhir.validation.fhirpath)."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.fhir import json as fjson
from gateway.fhir.validation import FhirValidator
from gateway.fhir.validation import walker as walker_module
from gateway.fhir.validation.fhirpath import (
    Env,
    EvaluationError,
    compile_invariant,
    date_compare,
    reference_evaluator,
)
from gateway.fhir.validation.model import Invariant

DATA = Path(__file__).resolve().parents[2] / "data"

#: where fhirpathpy 2.x is wrong or cannot evaluate, and the compiled form is right
FHIRPATHPY_GAPS = {
    "rng-2": "fhirpathpy cannot compare two Quantities ('<=' between dicts)",
    "que-7": "fhirpathpy's 'is Boolean' does not see answerBoolean through the choice",
}


def _evaluations(validator: FhirValidator) -> list[tuple[Invariant, Any, Env]]:
    seen: list[tuple[Invariant, Any, Env]] = []
    original = walker_module.Walker.invariants

    def record(self: walker_module.Walker, invariants: tuple[Invariant, ...], item: Any,
               loc: Any) -> None:
        seen.extend((inv, item, self.env) for inv in invariants)
        original(self, invariants, item, loc)

    walker_module.Walker.invariants = record  # type: ignore[method-assign]
    try:
        with gzip.open(DATA / "r4-examples.ndjson.gz", "rt", encoding="utf-8") as f:
            for row in map(json.loads, f):
                validator.validate(fjson.loads(row["text"]))
    finally:
        walker_module.Walker.invariants = original  # type: ignore[method-assign]
    return seen


def _outcome(fn: Any, item: Any, env: Env) -> bool | str | None:
    try:
        return fn(item, env)  # type: ignore[no-any-return]
    except EvaluationError:
        return "error"


def test_compiled_invariants_agree_with_fhirpathpy_on_the_r4_examples(
    validator: FhirValidator,
) -> None:
    seen = _evaluations(validator)
    assert len(seen) > 5000
    references: dict[tuple[str, str], Any] = {}
    disagreements: dict[str, int] = {}
    fully_compiled = 0
    for inv, item, env in seen:
        key = (inv.expression, inv.type_path)
        if key not in references:
            references[key] = reference_evaluator(inv.expression, inv.type_path)
        ours, theirs = _outcome(inv.evaluate, item, env), _outcome(references[key], item, env)
        if ours != theirs:
            disagreements[inv.key] = disagreements.get(inv.key, 0) + 1
        if inv.compiled.fallbacks == 0:
            fully_compiled += 1
    assert set(disagreements) <= set(FHIRPATHPY_GAPS), disagreements
    # fhirpathpy runs for a handful of rare expressions only
    assert fully_compiled / len(seen) > 0.99


@pytest.mark.parametrize(("a", "b", "expected"), [
    ("2020-01-01", "2020-01-02", -1),
    ("2020-01-02", "2020-01-01", 1),
    ("2020-01-01", "2020-01-01", 0),
    ("2020-01", "2020-01-15", None),  # precision differs where the values agree
    ("2020-01", "2020-02-15", -1),  # ... but not where they differ
    ("2019", "2020-01", -1),
    ("2020-01-01T10:00:00+02:00", "2020-01-01T08:30:00Z", -1),
    ("2020-01-01T10:00:00+02:00", "2020-01-01T08:00:00Z", 0),
    ("2020-01-01T10:00:00.5Z", "2020-01-01T10:00:00Z", 1),
    ("2020-01-01", "2020-01-01T10:00:00Z", None),
])
def test_date_comparison_follows_fhirpath_precision(a: str, b: str,
                                                    expected: int | None) -> None:
    assert date_compare(a, b) == expected


def _table(validator: FhirValidator, type_name: str) -> Any:
    return validator.model.type_node(type_name)


@pytest.mark.parametrize(("expression", "item", "expected"), [
    ("start.hasValue().not() or end.hasValue().not() or (start <= end)",
     {"start": "2020-01-02", "end": "2020-01-01"}, False),
    ("start.hasValue().not() or end.hasValue().not() or (start <= end)",
     {"start": "2020-01", "end": "2020-01-01"}, None),
    ("start.hasValue().not() or end.hasValue().not() or (start <= end)",
     {"_start": {"extension": [{"url": "x", "valueString": "y"}]}, "end": "2020"}, True),
    ("start.exists() xor end.exists()", {"start": "2020"}, True),
    ("start.exists() implies end.exists()", {"start": "2020"}, False),
    ("start.exists() implies end.exists()", {"end": "2020"}, True),
    ("start = '2020' and end.empty()", {"start": "2020"}, True),  # date '=': fhirpathpy
])
def test_period_expressions(validator: FhirValidator, expression: str,
                            item: dict[str, Any], expected: bool | None) -> None:
    # (fhirpathpy says True for '2020-01' <= '2020-01-01' and fails on the value-less
    # start; FHIRPath's answers are empty and true)
    compiled = compile_invariant(expression, _table(validator, "Period"), "Period")
    assert compiled.evaluate(item, Env(None, None)) is expected


def test_expressions_outside_the_subset_run_in_fhirpathpy(validator: FhirValidator) -> None:
    expression = "coding.code.combine(coding.system).count() = 4 or text.exists()"
    compiled = compile_invariant(expression, _table(validator, "CodeableConcept"),
                                 "CodeableConcept")
    assert compiled.fallbacks == 1
    env = Env(None, None)
    two = {"coding": [{"system": "a", "code": "1"}, {"system": "b", "code": "2"}]}
    assert compiled.evaluate(two, env) is True
    assert compiled.evaluate({"coding": [{"code": "1"}]}, env) is False
    assert compiled.evaluate({"text": "x"}, env) is True


def test_resource_variable_and_membership(validator: FhirValidator) -> None:
    obs = validator.model.type_node("Observation")
    expression = ("value.empty() or component.code.where(coding.intersect("
                  "%resource.code.coding).exists()).empty()")
    compiled = compile_invariant(expression, obs, "Observation", obs)
    assert compiled.fallbacks == 0
    coding = {"system": "http://loinc.org", "code": "1"}
    bad = {"resourceType": "Observation", "code": {"coding": [coding]}, "valueString": "x",
           "component": [{"code": {"coding": [dict(coding)]}}]}
    assert compiled.evaluate(bad, Env(bad, bad)) is False
    ok = {**bad, "component": [{"code": {"coding": [{"system": "x", "code": "2"}]}}]}
    assert compiled.evaluate(ok, Env(ok, ok)) is True
    status = compile_invariant("status in ('final' | 'amended')", obs, "Observation")
    assert status.fallbacks == 0
    assert status.evaluate({"status": "final"}, Env(None, None)) is True
    assert status.evaluate({"status": "preliminary"}, Env(None, None)) is False
    assert status.evaluate({}, Env(None, None)) is None


def test_patterns_from_profiles_cannot_backtrack(validator: FhirValidator) -> None:
    """``matches()`` and ``replaceMatches()`` -- compiled here or left to fhirpathpy --
    match with RE2, linear in the text: ``(a+)+b`` on 25 ``a`` is no slower than on
    three (Python's ``re`` takes seconds, twice as long for each ``a`` more)."""
    hostile = {"family": "a" * 25}
    env = Env(None, None)
    name = _table(validator, "HumanName")
    started = time.monotonic()
    compiled = compile_invariant("family.matches('(a+)+b').not()", name, "HumanName")
    assert compiled.fallbacks == 0
    assert compiled.evaluate(hostile, env) is True
    assert compiled.evaluate({"family": "a" * 25 + "b"}, env) is False
    by_fhirpathpy = reference_evaluator("family.matches('(a+)+b').not()", "HumanName")
    assert by_fhirpathpy(hostile, env) is True
    replaced = compile_invariant("family.replaceMatches('(a|aa)+c', 'x') = family",
                                 name, "HumanName")
    assert replaced.fallbacks == 1
    assert replaced.evaluate(hostile, env) is True
    assert time.monotonic() - started < 2
    # FHIRPath's single-line mode, substitution of groups
    assert compile_invariant("family.matches('^a.b$')", name, "HumanName").evaluate(
        {"family": "a\nb"}, env) is True
    swapped = compile_invariant("family.replaceMatches('(\\\\w+) (\\\\w+)', '$2 $1') = 'b a'",
                                name, "HumanName")
    assert swapped.evaluate({"family": "a b"}, env) is True
    # what RE2 cannot match in linear time is an evaluation error, as a bad pattern is
    for pattern in ("(a)\\\\1", "a(?=b)", "(["):
        invariant = compile_invariant(f"family.matches('{pattern}')", name, "HumanName")
        with pytest.raises(EvaluationError, match="not supported"):
            invariant.evaluate({"family": "aab"}, env)
