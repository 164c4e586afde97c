"""Validating a Bundle is linear in its entries (no per-entry scan of the others)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from gateway.fhir.validation import FhirValidator
from tests.fhir.validation.conftest import errors, patient


def _document(entries: int) -> dict[str, Any]:
    """A document Bundle whose Composition refers to every other entry by fullUrl."""
    urls = [f"urn:uuid:{uuid.UUID(int=i + 1)}" for i in range(entries)]
    composition = {
        "resourceType": "Composition", "status": "final",
        "type": {"coding": [{"system": "http://loinc.org", "code": "18842-5"}]},
        "subject": {"reference": urls[1]}, "date": "2020-01-01T00:00:00Z",
        "author": [{"reference": "Practitioner/1"}], "title": "Discharge",
        "section": [{"title": "all", "text": {
            "status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">x</div>'},
            "entry": [{"reference": u} for u in urls[1:]]}],
        "text": {"status": "generated",
                 "div": '<div xmlns="http://www.w3.org/1999/xhtml">letter</div>'},
    }
    entry = [{"fullUrl": urls[0], "resource": composition}]
    for u in urls[1:]:
        resource = patient(contact=[{"name": {"family": "X"}}],
                           name=[{"family": "M", "period": {"start": "2020"}}])
        entry.append({"fullUrl": u, "resource": resource})
    return {"resourceType": "Bundle", "type": "document",
            "identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{uuid.uuid4()}"},
            "timestamp": "2020-01-01T00:00:00Z", "entry": entry}


def test_bundle_validation_is_linear_in_entries(validator: FhirValidator) -> None:
    small, large = _document(1_000), _document(10_000)
    assert errors(validator.validate(small)) == []
    small_count = validator.last_evaluations
    started = time.perf_counter()
    assert errors(validator.validate(large)) == []
    large_time = time.perf_counter() - started
    large_count = validator.last_evaluations
    # invariant evaluations grow with the entries: ten times the entries, ten times the work
    assert 9.5 <= large_count / small_count <= 10.5
    started = time.perf_counter()
    validator.validate(small)
    small_time = time.perf_counter() - started
    # time: loosely (shared machines), quadratic growth would be ~100x
    assert large_time / small_time < 40


def test_duplicate_full_urls_are_found_among_many_entries(validator: FhirValidator) -> None:
    bundle = _document(2_000)
    bundle["entry"].append(dict(bundle["entry"][1500]))
    issues = errors(validator.validate(bundle))
    assert [i.diagnostics[:5] for i in issues] == ["bdl-7"]  # type: ignore[index]
