"""Base validation of the official R4 examples: at least 99 % validate clean.

The rest break R4 rules; they are listed with the reason in
``tests/data/r4-examples-validation-exceptions.json`` and must fail exactly so.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from gateway.fhir import json as fjson
from gateway.fhir.validation import FhirValidator
from tests.fhir.validation.conftest import errors

DATA = Path(__file__).resolve().parents[2] / "data"


def test_the_official_r4_examples_validate_clean(validator: FhirValidator) -> None:
    with gzip.open(DATA / "r4-examples.ndjson.gz", "rt", encoding="utf-8") as f:
        rows = [(row["file"], row["text"]) for row in map(json.loads, f)]
    listed = {e["file"]: e for e in json.loads(
        (DATA / "r4-examples-validation-exceptions.json").read_text())["exceptions"]}
    failing: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    for name, text in rows:
        found = errors(validator.validate(fjson.loads(text)))
        if found:
            failing[name] = [(i.code.gw, i.expression) for i in found]
    assert set(failing) == set(listed), failing
    for name, entry in listed.items():
        assert (entry["code"], (entry["expression"],)) in failing[name], failing[name]
        assert entry["reason"]
    assert (len(rows) - len(failing)) / len(rows) >= 0.99
