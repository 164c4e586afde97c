"""Composite search parameters (``sp_composite``) against SQLite and PostgreSQL.

Both components must hold on the same element: a blood pressure with systolic 150
and diastolic 80 is not found by "diastolic above 90", although one of its
components is above 90 and another is the diastolic one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.fhir.outcome import FhirError
from gateway.storage.db import Database
from tests.storage.test_search_sql import _INDEXER, _parse, ids, loaded

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
SYSTOLIC, DIASTOLIC, PANEL = "8480-6", "8462-4", "85354-9"


def _coded(code: str, system: str = LOINC) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code}]}


def _mmhg(value: float) -> dict[str, Any]:
    return {"value": value, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}


def _bp(id: str, systolic: float, diastolic: float) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": id, "status": "final", "code": _coded(PANEL),
            "component": [{"code": _coded(SYSTOLIC), "valueQuantity": _mmhg(systolic)},
                          {"code": _coded(DIASTOLIC), "valueQuantity": _mmhg(diastolic)}]}


def _obs(id: str, code: str, **value: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": id, "status": "final", "code": _coded(code),
            **value}


DATA: list[dict[str, Any]] = [
    _bp("bp1", 150, 80),
    _bp("bp2", 120, 95),
    _obs("sys1", SYSTOLIC, valueQuantity=_mmhg(145)),
    _obs("smoke", "72166-2", valueCodeableConcept=_coded("8517006", "http://snomed.info/sct")),
    _obs("lmp", "8665-2", valueDateTime="2020-03-01"),
    _obs("note", "8251-1", valueString="Feels dizzy in the morning"),
    _obs("plain", "29463-7"),
    {"resourceType": "Questionnaire", "id": "adults", "status": "active",
     "useContext": [{"code": {"system": "http://terminology.hl7.org/CodeSystem/"
                                        "usage-context-type", "code": "age"},
                     "valueRange": {"low": {"value": 18, "unit": "a"}}}]},
]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
async def db(request: pytest.FixtureRequest) -> AsyncIterator[Database]:
    async with loaded(request.param, [(r, False) for r in DATA]) as database:
        yield database


@pytest.mark.parametrize(
    ("rt", "query", "expected"),
    [
        # the component that carries the code carries the value
        ("Observation", f"component-code-value-quantity={LOINC}|{DIASTOLIC}$gt90", ["bp2"]),
        ("Observation", f"component-code-value-quantity={SYSTOLIC}$gt140", ["bp1"]),
        ("Observation", f"component-code-value-quantity={SYSTOLIC}$150", ["bp1"]),
        ("Observation",
         f"component-code-value-quantity={SYSTOLIC}$150|{UCUM}|mm[Hg]", ["bp1"]),
        ("Observation", f"component-code-value-quantity={SYSTOLIC}$150|{UCUM}|kg", []),
        ("Observation", f"component-code-value-quantity={SYSTOLIC}$150||mmHg", ["bp1"]),
        ("Observation", f"component-code-value-quantity=urn:other|{SYSTOLIC}$gt1", []),
        # OR over values, AND over parameters
        ("Observation",
         f"component-code-value-quantity={SYSTOLIC}$gt140,{DIASTOLIC}$gt90", ["bp1", "bp2"]),
        ("Observation", f"component-code-value-quantity={SYSTOLIC}$gt140"
                        f"&component-code-value-quantity={DIASTOLIC}$lt90", ["bp1"]),
        # the resource's own code and value; combo: either
        ("Observation", f"code-value-quantity={SYSTOLIC}$gt140", ["sys1"]),
        ("Observation", f"combo-code-value-quantity={SYSTOLIC}$gt140", ["bp1", "sys1"]),
        ("Observation", "code-value-concept=72166-2$http://snomed.info/sct|8517006",
         ["smoke"]),
        ("Observation", "code-value-concept=72166-2$1234", []),
        ("Observation", "code-value-date=8665-2$2020-03", ["lmp"]),
        ("Observation", "code-value-date=8665-2$gt2020-03-01", []),
        ("Observation", "code-value-string=8251-1$feels", ["note"]),
        ("Observation", "code-value-string=8251-1$dizzy", []),
        ("Observation", "component-code-value-quantity:missing=true", ["sys1", "smoke", "lmp",
                                                                       "note", "plain"]),
        ("Observation", "component-code-value-quantity:missing=false", ["bp1", "bp2"]),
        # a Range: open above
        ("Questionnaire", "context-type-quantity=age$gt60", ["adults"]),
        ("Questionnaire", "context-type-quantity=age$lt10", []),
    ],
)
async def test_composite(db: Database, rt: str, query: str, expected: list[str]) -> None:
    assert await ids(db, rt, query) == expected, query


@pytest.mark.parametrize("value", [SYSTOLIC, f"{SYSTOLIC}$", "$gt1", f"{SYSTOLIC}$gt1$2",
                                   f"{SYSTOLIC}$abc"])
def test_malformed_composite_values_are_rejected(value: str) -> None:
    with pytest.raises(FhirError) as info:
        _parse("Observation", [("component-code-value-quantity", value)])
    assert info.value.status == 400


def test_a_composite_whose_components_do_not_pair_stays_unsupported() -> None:
    # R4's DocumentReference.relationship defines its reference component on
    # relatesTo.code and its token on relatesTo.target: nothing to index
    with pytest.raises(FhirError) as info:
        _parse("DocumentReference", [("relationship", "replaces$DocumentReference/1")])
    assert "not supported" in str(info.value)
    assert _INDEXER.extract({"resourceType": "DocumentReference", "status": "current",
                             "relatesTo": [{"code": "replaces",
                                            "target": {"reference": "DocumentReference/1"}}],
                             "content": [{"attachment": {"url": "http://x"}}]}
                            )["sp_composite"] == []
