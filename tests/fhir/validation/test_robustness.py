"""The validator reports problems; it never raises, whatever the JSON (hypothesis)."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.fhir import json as fjson
from gateway.fhir.validation import FhirValidator
from tests.fhir.validation.conftest import TEST_BASE

DATA = Path(__file__).resolve().parents[2] / "data"
with gzip.open(DATA / "r4-examples.ndjson.gz", "rt", encoding="utf-8") as _f:
    EXAMPLES = [fjson.loads(row["text"]) for row in map(json.loads, _f)
                if len(row["text"]) < 20_000]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.sampled_from(["#x", "Patient/1", "2020-01-01", "urn:uuid:1"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["resourceType", "id", "extension", "url", "value", "coding",
                         "reference", "contained", "entry", "resource", "text", "div",
                         "start", "end", "code", "system", "_given", "given", "x"]),
        inner, max_size=4),
    max_leaves=12,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.extend(_paths(v, (*prefix, i)))
    return out


def _mutated(example: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    """A copy of ``example`` with one to three of its values replaced by any JSON."""
    resource = copy.deepcopy(example)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(resource)[1:] or [("x",)]))
        target: Any = resource
        for step in path[:-1]:
            target = target[step]
        if isinstance(target, dict | list):
            target[path[-1]] = data.draw(json_values)
    return resource


_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]


@settings(max_examples=400, deadline=None, suppress_health_check=_QUIET)
@given(st.data())
def test_mutated_examples_never_crash_the_validator(validator: FhirValidator,
                                                    data: st.DataObject) -> None:
    resource = _mutated(data.draw(st.sampled_from(EXAMPLES)), data)
    profile = data.draw(st.sampled_from([None, TEST_BASE + "test-patient",
                                         "http://hl7.org/fhir/StructureDefinition/bp"]))
    issues = validator.validate(resource, profile=profile)
    assert all(i.severity in ("error", "warning", "information") for i in issues)


@settings(max_examples=200, deadline=None, suppress_health_check=_QUIET)
@given(json_values)
def test_arbitrary_json_never_crashes_the_validator(validator: FhirValidator,
                                                    value: Any) -> None:
    validator.validate(value)
    validator.validate({"resourceType": "Bundle", "type": "collection",
                        "entry": [{"resource": value}]})


def _profiled_examples(validator: FhirValidator) -> list[tuple[dict[str, Any], str]]:
    """(example, URL of a resource profile the validator holds for its type)."""
    urls: dict[str, list[str]] = {}
    for url, sd in validator.profiles.raw.items():
        if sd.get("kind") == "resource":
            urls.setdefault(str(sd.get("type")), []).append(url)
    return [(e, url) for e in EXAMPLES for url in urls.get(e["resourceType"], [])]


@settings(max_examples=1500, deadline=None, derandomize=True, suppress_health_check=_QUIET)
@given(st.data())
def test_mutated_examples_never_crash_any_profile(validator: FhirValidator,
                                                 data: st.DataObject) -> None:
    """A profile's checks run on the whole resource, the parts the base refuses too (an
    object where a bound code belongs, a resourceType that is an array): they report,
    and never raise. Every resource profile the validator holds (R4's vital signs, the
    gateway's own, the test profiles), on mutated examples of its type."""
    example, url = data.draw(st.sampled_from(_profiled_examples(validator)))
    resource = _mutated(example, data)
    issues = validator.validate(resource, profile=url)
    assert all(i.severity in ("error", "warning", "information") for i in issues)
