"""Parameters answered by other parameters' index rows (``SearchParam.stored_as``),
against SQLite and PostgreSQL.

Observation ``combo-code`` is ``code | component-code``, Patient ``phonetic`` has
the expression of ``name``: their rows would repeat rows already written, so they
have none, and a search on them looks at the rows of the parameters they repeat.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.fhir.search import value_sets
from gateway.storage.db import Database
from gateway.storage.schema import MIGRATIONS, statements
from tests.storage.test_search_composite import DIASTOLIC, PANEL, SYSTOLIC, _bp, _mmhg, _obs
from tests.storage.test_search_sql import _INDEXER, _parse, ids, keys, loaded


def _person(rt: str, id: str, family: str) -> dict[str, Any]:
    return {"resourceType": rt, "id": id, "name": [{"family": family, "given": ["Anna"]}]}


DATA: list[dict[str, Any]] = [
    {**_bp("bp1", 150, 80), "subject": {"reference": "Patient/p1"}},
    _obs("sys1", SYSTOLIC, valueQuantity=_mmhg(145)),
    _obs("plain", "29463-7"),
    _obs("none", "29463-7", component=[{"code": {"text": "free text"}}]),
    _person("Patient", "p1", "Vries"),
    _person("Patient", "p2", "Achterberg"),
    _person("Practitioner", "d1", "Vries"),
]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
async def db(request: pytest.FixtureRequest) -> AsyncIterator[Database]:
    async with loaded(request.param, [(r, False) for r in DATA]) as database:
        yield database


def test_the_repeating_parameters_write_no_rows() -> None:
    params = _INDEXER.params_for("Observation")
    assert params["combo-code"].stored_as == ("code", "component-code")
    assert _INDEXER.params_for("Patient")["phonetic"].stored_as == ("name",)
    assert params["code"].stored_as == ()  # the rows' owners keep theirs
    rows = _INDEXER.extract(_bp("x", 150, 80))
    assert {r[0] for r in rows["sp_token"]} >= {"code", "component-code"}
    assert not {r[0] for table in rows.values() for r in table} & {
        "combo-code", "combo-value-quantity", "combo-code-value-quantity"}
    assert "phonetic" not in {r[0] for r in _INDEXER.extract(DATA[4])["sp_string"]}


@pytest.mark.parametrize(
    ("rt", "query", "expected"),
    [
        # the resource's own code or a component's
        ("Observation", f"combo-code={SYSTOLIC}", ["bp1", "sys1"]),
        ("Observation", f"combo-code=http://loinc.org|{PANEL}", ["bp1"]),
        ("Observation", f"combo-code={DIASTOLIC},29463-7", ["bp1", "plain", "none"]),
        ("Observation", f"combo-code:not={SYSTOLIC}", ["plain", "none"]),
        ("Observation", "combo-code:text=free", ["none"]),
        ("Observation", "combo-value-quantity=gt140", ["bp1", "sys1"]),
        ("Observation", "combo-value-quantity=gt146", ["bp1"]),
        ("Observation", "combo-value-quantity:missing=true", ["plain", "none"]),
        ("Observation", f"combo-code-value-quantity={SYSTOLIC}$gt140", ["bp1", "sys1"]),
        ("Observation", "combo-code-value-quantity:missing=false", ["bp1", "sys1"]),
        ("Observation", "combo-code:missing=false", ["bp1", "sys1", "plain", "none"]),
        # the same expression as name
        ("Patient", "phonetic=vries", ["p1"]),
        ("Patient", "phonetic:exact=Achterberg", ["p2"]),
        ("Patient", "_sort=-phonetic", ["p1", "p2"]),
        ("Patient", "_sort=phonetic", ["p2", "p1"]),
        ("Practitioner", "phonetic=vri", ["d1"]),
        # in a chain and a reverse chain, too
        ("Patient", f"_has:Observation:subject:combo-code={SYSTOLIC}", ["p1"]),
        ("Patient", f"_has:Observation:subject:combo-code={DIASTOLIC}9", []),
        ("Observation", "subject:Patient.phonetic=vries", ["bp1"]),
        ("Observation", "subject:Patient.phonetic=achter", []),
    ],
)
async def test_searches_on_them_read_the_shared_rows(db: Database, rt: str, query: str,
                                                     expected: list[str]) -> None:
    assert await ids(db, rt, query) == expected, query


async def test_a_system_search_over_types_sharing_the_rows(db: Database) -> None:
    found = await keys(db, None, "_type=Patient,Practitioner&phonetic=vries")
    assert sorted(found) == [("Patient", "p1"), ("Practitioner", "d1")]


def test_a_value_set_search_asks_for_the_codes_of_the_owners() -> None:
    # :in over a value set decided for the codes in use looks those up by row owner
    query = _parse("Observation", [("combo-code:in", "http://example.org/fhir/ValueSet/vs")])
    assert value_sets(query)["http://example.org/fhir/ValueSet/vs"].used_by == {
        ("Observation", "code"), ("Observation", "component-code")}


def test_migration_24_clears_exactly_the_parameters_without_rows_of_their_own() -> None:
    # rows written before parameters shared rows; the migration names them by hand
    ddl = next(ddl for version, _, ddl in MIGRATIONS if version == 24)
    cleared = set()
    for stmt in statements(ddl, "sqlite"):
        table = re.search(r"DELETE FROM (\w+)", stmt)[1]  # type: ignore[index]
        types = re.findall(r"'([A-Z]\w+)'", stmt)
        params = re.findall(r"'([a-z][\w-]+)'", stmt)
        cleared |= {(table, t, p) for t in types for p in params}
    shared = {(sp.table, rt, code) for rt in _INDEXER.resource_types
              for code, sp in _INDEXER.params_for(rt).items() if sp.stored_as}
    assert cleared == shared
