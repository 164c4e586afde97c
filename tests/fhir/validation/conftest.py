"""A validator over the R4 definitions, the gateway's profiles and small test profiles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway.fhir.outcome import Issue
from gateway.fhir.validation import Definitions, FhirValidator, load_definitions, with_own
from gateway.registry import profiles_dir

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TEST_BASE = "https://carepath-gateway.org/fhir/test/StructureDefinition/"


def _read(pattern: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(FIXTURES.glob(pattern))]


@pytest.fixture(scope="session")
def definitions() -> Definitions:
    return with_own(load_definitions(profiles_dir()), _read("StructureDefinition-*.json"),
                    _read("ValueSet-*.json"), _read("CodeSystem-*.json"))


@pytest.fixture(scope="session")
def validator(definitions: Definitions) -> FhirValidator:
    return FhirValidator(definitions, max_depth=64, max_nesting=6)


def errors(issues: list[Issue]) -> list[Issue]:
    return [i for i in issues if i.severity in ("error", "fatal")]


def codes(issues: list[Issue]) -> set[str]:
    return {i.code.gw for i in errors(issues)}


def where(issues: list[Issue]) -> set[str]:
    return {e for i in errors(issues) for e in i.expression}


def patient(**extra: Any) -> dict[str, Any]:
    """A valid Patient with narrative."""
    return {
        "resourceType": "Patient",
        "text": {"status": "generated",
                 "div": '<div xmlns="http://www.w3.org/1999/xhtml">Erika Muster</div>'},
        "identifier": [{"system": "urn:test:mrn", "value": "12345"}],
        "name": [{"family": "Muster", "given": ["Erika"]}],
        "gender": "female",
        "birthDate": "1970-01-01",
        **extra,
    }
