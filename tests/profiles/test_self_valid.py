"""Every conformance resource the gateway ships in ``profiles/`` is itself valid R4."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

from gateway.fhir import json as fjson
from gateway.fhir.validation import FhirValidator, load_definitions
from tests.profiles.helpers import PROFILES

FILES = sorted(Path(PROFILES).glob("*.json"))


@cache
def validator() -> FhirValidator:
    return FhirValidator(load_definitions(PROFILES))


def test_there_is_something_to_check() -> None:
    kinds = {f.name.split("-")[0] for f in FILES}
    assert {"StructureDefinition", "ValueSet", "CodeSystem", "ConceptMap"} <= kinds


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_conformance_resource_is_valid_r4(path: Path) -> None:
    resource = fjson.loads(path.read_bytes())
    problems = [i for i in validator().validate(resource) if i.severity in ("error", "fatal")]
    assert not problems, "\n".join(f"{i.expression}: {i.diagnostics}" for i in problems)
