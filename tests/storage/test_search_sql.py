"""gateway.storage.search_sql against real databases: SQLite in memory and PostgreSQL.

One small data set is loaded per backend (index rows made by the real
:class:`gateway.fhir.indexer.Indexer`); each test runs a search through
``parse_search`` -> ``select_ids``/``count``/``resolve_includes`` and checks the
ids. Insertion order (``created_seq``) is the default result order, so the
expected lists below are in that order unless the test sorts.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.fhir.indexer import Indexer
from gateway.fhir.outcome import FhirError
from gateway.fhir.search import SearchQuery, parse_search
from gateway.storage.db import Database, open_database
from gateway.storage.migrate import migrate
from gateway.storage.schema import INDEX_TABLES
from gateway.storage.search_sql import (
    WALK,
    _probe,
    _sort_walk,
    bound_by_sort,
    bounds_by_sort,
    choose_driver,
    count,
    like_escape,
    resolve_includes,
    select_ids,
)

PG_URL = os.environ.get("CAREPATH_TEST_POSTGRES", "postgresql://127.0.0.1:5432/test")
_INDEXER = Indexer.from_profiles()


def micros(text: str) -> int:
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp()) * 1_000_000


#: ``ap`` on dates is relative to now; the tests pin it.
NOW = micros("2020-01-15T00:00:00")
#: resource number n (1-based, insertion order) was last updated at BASE + n seconds
BASE = micros("2023-01-01T00:00:00")

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"


def _ref(r: str) -> dict[str, str]:
    return {"reference": r}


def _obs(id: str, status: str, coding: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": id, "status": status,
            "code": {"coding": [coding]}, **extra}


def _risk(id: str, prediction: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "RiskAssessment", "id": id, "status": "final",
            "subject": _ref("Patient/p1"), "prediction": [prediction]}


#: (resource, deleted). The deleted patient p5 keeps (stale) index rows on purpose:
#: the queries must still leave it out.
DATA: list[tuple[dict[str, Any], bool]] = [
    ({"resourceType": "Organization", "id": "org3", "name": "Root Holding"}, False),
    ({"resourceType": "Organization", "id": "org1", "name": "Acme Health",
      "partOf": _ref("Organization/org3")}, False),
    ({"resourceType": "Organization", "id": "org2", "name": "Beta Care"}, False),
    ({"resourceType": "Practitioner", "id": "pr1",
      "name": [{"family": "Who", "given": ["Doctor"]}]}, False),
    ({"resourceType": "Practitioner", "id": "pr2", "name": [{"family": "Nobody"}]}, False),
    ({"resourceType": "Patient", "id": "p1", "meta": {"tag": [{"system": "s", "code": "t1"}]},
      "name": [{"family": "Müller", "given": ["Peter"]}], "birthDate": "1980-02-10",
      "gender": "male", "identifier": [{"system": "urn:mrn", "value": "111"}], "active": True,
      "generalPractitioner": [_ref("Practitioner/pr1")],
      "managingOrganization": _ref("Organization/org1")}, False),
    ({"resourceType": "Patient", "id": "p2", "name": [{"family": "Smith", "given": ["Paula"]}],
      "birthDate": "1990", "gender": "female",
      "identifier": [{"system": "urn:mrn", "value": "222"}],
      "telecom": [{"system": "phone", "value": "555"}],
      "generalPractitioner": [{"identifier": {"system": "urn:npi", "value": "9"}}],
      "managingOrganization": _ref("Organization/org2")}, False),
    ({"resourceType": "Patient", "id": "p3", "name": [{"family": "50%_off", "given": ["Per"]}],
      "birthDate": "1970-05-05", "gender": "other"}, False),
    ({"resourceType": "Patient", "id": "p4", "name": [{"family": "50xoff"}],
      "birthDate": "1975", "gender": "unknown"}, False),
    ({"resourceType": "Patient", "id": "p5", "name": [{"family": "Deleted", "given": ["Peter"]}],
      "birthDate": "1980-02-10", "gender": "male"}, True),
    ({"resourceType": "Patient", "id": "p6", "active": False}, False),
    ({"resourceType": "Patient", "id": "p7", "name": [{"family": "O'Brien"}],
      "birthDate": "2000-01-01", "gender": "female"}, False),
    (_obs("o1", "final", {"system": LOINC, "code": "1234-5", "display": "Glucose in blood"},
          subject=_ref("Patient/p1"), effectiveDateTime="2020-01-05",
          valueQuantity={"value": 5.4, "system": UCUM, "code": "mg/dL", "unit": "mg/dL"},
          performer=[_ref("Practitioner/pr1")]), False),
    (_obs("o2", "preliminary", {"system": LOINC, "code": "999", "display": "Other"},
          subject=_ref("Patient/p2"),
          effectivePeriod={"start": "2019-12-25", "end": "2020-01-10"},
          valueQuantity={"value": 100, "system": UCUM, "code": "mg/dL"},
          hasMember=[_ref("Observation/o1")]), False),
    (_obs("o3", "amended", {"system": "http://snomed.info/sct", "code": "1234-5"},
          subject=_ref("Patient/p1"), effectiveDateTime="2021-06-01T10:00:00Z",
          valueQuantity={"value": 100.4, "unit": "kg"}), False),
    (_obs("o4", "final", {"code": "local"}), False),
    (_obs("o5", "final", {"system": LOINC, "code": "5555-5"},
          subject=_ref("http://other.org/fhir/Patient/p9")), False),
    (_obs("o6", "final", {"system": LOINC, "code": "6666-6"}, subject=_ref("Patient/p5")),
     False),
    ({"resourceType": "Provenance", "id": "prov1", "target": [_ref("Observation/o1")],
      "recorded": "2020-01-06T00:00:00Z", "agent": [{"who": _ref("Practitioner/pr1")}]}, False),
    (_risk("ra1", {"probabilityDecimal": 100}), False),
    (_risk("ra2", {"probabilityDecimal": 100.4}), False),
    (_risk("ra3", {"probabilityDecimal": 99.4}), False),
    (_risk("ra4", {"probabilityRange": {"low": {"value": 99}, "high": {"value": 101}}}), False),
    ({"resourceType": "ValueSet", "id": "vs1", "status": "active",
      "url": "http://acme.org/fhir/ValueSet/123"}, False),
    ({"resourceType": "ValueSet", "id": "vs2", "status": "active",
      "url": "http://acme.org/fhir/ValueSet/124"}, False),
    ({"resourceType": "ValueSet", "id": "vs3", "status": "active",
      "url": "http://other.org/ValueSet/1"}, False),
]

_INSERT = {
    table: f"INSERT INTO {table} (res_type, res_id, param, {', '.join(cols)}) "
    f"VALUES (?, ?, ?, {', '.join('?' for _ in cols)})"
    for table, cols in INDEX_TABLES.items()
}


async def _load(db: Database, data: list[tuple[dict[str, Any], bool]]) -> None:
    async with db.transaction() as conn:
        for seq, (res, deleted) in enumerate(data, start=1):
            rt, rid = res["resourceType"], res["id"]
            await conn.execute(
                "INSERT INTO resource (res_type, res_id, version, last_updated, deleted, content,"
                " created_seq) VALUES (?, ?, 1, ?, ?, ?, ?)",
                (rt, rid, BASE + seq * 1_000_000, int(deleted), orjson.dumps(res), seq),
            )
            for table, rows in _INDEXER.extract(res).items():
                if rows:
                    await conn.executemany(_INSERT[table], [(rt, rid, *r) for r in rows])


async def _pg(sql: str) -> None:
    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@asynccontextmanager
async def loaded(backend: str, data: list[tuple[dict[str, Any], bool]]
                 ) -> AsyncIterator[Database]:
    """A fresh database of ``backend`` (sqlite, postgresql) holding ``data``."""
    schema = None
    if backend == "sqlite":
        database = open_database("sqlite:///:memory:")
    else:
        schema = f"t_{uuid.uuid4().hex[:12]}"
        await _pg(f"CREATE SCHEMA {schema}")
        database = open_database(PG_URL, pool_size=2, schema=schema)
    try:
        await database.open()
        await migrate(database)
        await _load(database, data)
        yield database
    finally:
        await database.close()
        if schema:
            await _pg(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
async def db(request: pytest.FixtureRequest) -> AsyncIterator[Database]:
    async with loaded(request.param, DATA) as database:
        yield database


def _pairs(query: str) -> list[tuple[str, str]]:
    return [(k, v) for k, _, v in (p.partition("=") for p in query.split("&") if p)]


def _parse(rt: str | None, query: str | list[tuple[str, str]]) -> SearchQuery:
    pairs = _pairs(query) if isinstance(query, str) else query
    return parse_search(rt, pairs, _INDEXER.params_for, strict=True, now=NOW)


async def keys(
    db: Database, rt: str | None, query: str | list[tuple[str, str]], limit: int | None = None
) -> list[tuple[str, str]]:
    q = _parse(rt, query)
    sql, params = select_ids(q, db.dialect, limit)
    assert sql.count("?") == len(params)  # every value bound, none spliced into the text
    assert all(p is not None for p in params)
    async with db.read() as conn:
        rows = [(str(r[0]), str(r[1])) for r in await conn.fetch(sql, params)]
        csql, cparams = count(q, db.dialect)
        total = await conn.fetchrow(csql, cparams)
    assert total is not None
    if limit is None:
        assert int(total[0]) == len(rows), "count() disagrees with select_ids()"
    async with db.read() as conn:
        chosen = await choose_driver(conn, q)
        # whichever criterion drives (the others tested per row), the answer is the same
        # (or none: the type's resources walked in result order, each tested)
        walk = [WALK] if q.criteria and q.resource_type else []
        for driver in [*range(len(q.criteria) if len(q.criteria) > 1 else 0), *walk]:
            dsql, dparams = select_ids(q, db.dialect, limit, driver=driver)
            driven = [(str(r[0]), str(r[1])) for r in await conn.fetch(dsql, dparams)]
            assert driven == rows, f"driven by criterion {driver}"
            csql, cparams = count(q, db.dialect, driver=driver)
            driven_total = await conn.fetchrow(csql, cparams)
            assert driven_total is not None and int(driven_total[0]) == int(total[0])
    assert chosen is None or 0 <= chosen < len(q.criteria) or chosen == WALK
    if limit is not None and q.resource_type and bounds_by_sort(q):
        # bounded by a walk of the sort key's index: the same head, or no bound
        async with db.read() as conn:
            bound = await bound_by_sort(conn, q, limit)
            if bound is not None:
                bsql, bparams = select_ids(q, db.dialect, limit, bound=bound)
                assert [(str(r[0]), str(r[1])) for r in await conn.fetch(bsql, bparams)] \
                    == rows, "bounded by the sort"
    return rows


async def ids(
    db: Database, rt: str, query: str | list[tuple[str, str]], limit: int | None = None
) -> list[str]:
    rows = await keys(db, rt, query, limit)
    assert {t for t, _ in rows} <= {rt}
    return [i for _, i in rows]


async def includes(db: Database, rt: str | None, query: str, limit: int = 100) -> list[str]:
    q = _parse(rt, query)
    matches = await keys(db, rt, query)
    async with db.read() as conn:
        found = await resolve_includes(conn, q, matches, limit)
    return [f"{t}/{i}" for t, i in found]


async def check(db: Database, rt: str, query: str | list[tuple[str, str]],
                expected: list[str]) -> None:
    assert await ids(db, rt, query) == expected, query


# -- token ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rt", "query", "expected"),
    [
        ("Observation", "code=1234-5", ["o1", "o3"]),
        ("Observation", f"code={LOINC}|1234-5", ["o1"]),
        ("Observation", "code=|local", ["o4"]),
        ("Observation", "code=|1234-5", []),
        ("Observation", f"code={LOINC}|", ["o1", "o2", "o5", "o6"]),
        ("Observation", "code=1234-5,999", ["o1", "o2", "o3"]),
        ("Observation", f"code={LOINC}|&status=final", ["o1", "o5", "o6"]),
        ("Observation", "code:text=glucose", ["o1"]),
        ("Observation", "code:text=BLOOD", ["o1"]),  # start of a word
        ("Observation", "code:text=lood", []),
        ("Patient", "identifier=urn:mrn|111", ["p1"]),
        ("Patient", "identifier=222", ["p2"]),
        ("Patient", "identifier=urn:other|222", []),
        ("Patient", "active=true", ["p1"]),
        ("Patient", "active=false", ["p6"]),
        ("Patient", "phone=555", ["p2"]),
        ("Patient", "telecom=phone|555", ["p2"]),
        ("Patient", "gender=female", ["p2", "p7"]),
        ("Patient", "_tag=s|t1", ["p1"]),
        ("Patient", "_tag=t1", ["p1"]),
        ("Patient", "_tag=x|t1", []),
    ],
)
async def test_token(db: Database, rt: str, query: str, expected: list[str]) -> None:
    await check(db, rt, query, expected)


# -- string ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("name=pet", ["p1"]),  # the deleted p5 has stale index rows: still not found
        ("name=PETER", ["p1"]),
        ("name=muller", ["p1"]),
        ("name=Müller", ["p1"]),
        ("name=mü", ["p1"]),
        ("name:exact=Müller", ["p1"]),
        ("name:exact=muller", []),
        ("family:exact=Müller", ["p1"]),
        ("name:contains=ULL", ["p1"]),
        ("name=peter,paula", ["p1", "p2"]),
        ("name=peter&name=müller", ["p1"]),
        ("name=peter&name=smith", []),
        ("given=pe", ["p1", "p3"]),
        ("family=o'brien", ["p7"]),
    ],
)
async def test_string(db: Database, query: str, expected: list[str]) -> None:
    await check(db, "Patient", query, expected)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("family=50", ["p3", "p4"]),
        ("family=50%", ["p3"]),  # not a wildcard
        ("family=50x", ["p4"]),
        ("family=5_", []),  # not a wildcard either
        ("family=50%_", ["p3"]),
        ("family:contains=%_", ["p3"]),
        ("family:contains=_", ["p3"]),
        ("family:contains=%", ["p3"]),
        ("family:contains=x", ["p4"]),
        ("family:contains=!", []),  # the escape character itself
    ],
)
async def test_like_metacharacters_are_literal(
    db: Database, query: str, expected: list[str]
) -> None:
    await check(db, "Patient", [tuple(query.split("=", 1))], expected)  # type: ignore[list-item]


def test_like_escape() -> None:
    assert like_escape("a%b_c!d") == "a!%b!_c!!d"


# -- date -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        # o1 2020-01-05 (a day), o2 2019-12-25..2020-01-10, o3 2021-06-01T10:00:00Z
        ("date=2020-01", ["o1"]),
        ("date=eq2020-01-05", ["o1"]),
        ("date=ne2020-01", ["o2", "o3"]),
        ("date=gt2020-01", ["o3"]),
        ("date=lt2020-01", ["o2"]),
        ("date=ge2020-01", ["o1", "o3"]),
        ("date=le2020-01", ["o1", "o2"]),
        ("date=ge2020-01-07", ["o2", "o3"]),
        ("date=sa2020-01-05", ["o3"]),
        ("date=eb2020-01-06", ["o1"]),
        ("date=eb2020-01-05", []),
        ("date=ap2020-01-05", ["o1", "o2"]),  # ±1 day (10 days before NOW)
        ("date=ap2019-12-01", []),
        ("date=2021-06-01T10:00:00Z", ["o3"]),
        ("date=2021-06-01T12:00:00+02:00", ["o3"]),
        ("date=2021-06-01T12:00", ["o3"]),  # no zone: the local time, Berlin's (+02:00)
        ("date=2021-06-01T10:00", []),
        ("date=2020-01-05,2021", ["o1", "o3"]),
        ("date=ge2020&date=lt2021", ["o1"]),
    ],
)
async def test_date(db: Database, query: str, expected: list[str]) -> None:
    await check(db, "Observation", query, expected)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("birthdate=1980", ["p1"]),
        ("birthdate=1980-02", ["p1"]),
        ("birthdate=lt1980", ["p3", "p4"]),
        ("birthdate=1990", ["p2"]),
        ("birthdate=1990-06", []),  # a year-precision birthDate is not within June
        ("birthdate=le1990-06", ["p1", "p2", "p3", "p4"]),
        ("_lastUpdated=2023-01-01T00:00:06Z", ["p1"]),  # resource #6
        ("_lastUpdated=gt2023-01-01T00:00:08Z", ["p4", "p6", "p7"]),
        ("_lastUpdated=lt2023-01-01T00:00:07Z", ["p1"]),
        ("_lastUpdated=2023-01-01", ["p1", "p2", "p3", "p4", "p6", "p7"]),
        ("_lastUpdated=ne2023-01-01T00:00:06Z", ["p2", "p3", "p4", "p6", "p7"]),
    ],
)
async def test_patient_dates(db: Database, query: str, expected: list[str]) -> None:
    await check(db, "Patient", query, expected)


# -- number and quantity ----------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        # ra1 100, ra2 100.4, ra3 99.4, ra4 the range [99, 101]
        ("probability=100", ["ra1", "ra2"]),
        ("probability=100.0", ["ra1"]),
        ("probability=1e2", ["ra1", "ra2", "ra3", "ra4"]),
        ("probability=99.4", ["ra3"]),
        ("probability=gt100", ["ra2", "ra4"]),
        ("probability=lt100", ["ra3", "ra4"]),
        ("probability=ge100", ["ra1", "ra2", "ra4"]),
        ("probability=le100", ["ra1", "ra3", "ra4"]),
        ("probability=ne100", ["ra3", "ra4"]),
        ("probability=sa100", ["ra2"]),
        ("probability=eb100", ["ra3"]),
        ("probability=ap100", ["ra1", "ra2", "ra3", "ra4"]),
        ("probability=ap200", []),
        ("probability=100.4,99.4", ["ra2", "ra3"]),
    ],
)
async def test_number(db: Database, query: str, expected: list[str]) -> None:
    await check(db, "RiskAssessment", query, expected)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("value-quantity=5.4", ["o1"]),
        (f"value-quantity=5.4|{UCUM}|mg/dL", ["o1"]),
        ("value-quantity=5.4||mg/dL", ["o1"]),
        (f"value-quantity=5.4|{UCUM}|kg", []),
        ("value-quantity=gt50", ["o2", "o3"]),
        ("value-quantity=100", ["o2", "o3"]),
        ("value-quantity=100||kg", ["o3"]),
        (f"value-quantity=100|{UCUM}|mg/dL", ["o2"]),
        ("value-quantity=le5.4", ["o1"]),
        ("value-quantity=lt5.4", []),
    ],
)
async def test_quantity(db: Database, query: str, expected: list[str]) -> None:
    await check(db, "Observation", query, expected)


# -- reference and uri ------------------------------------------------------------


@pytest.mark.parametrize(
    ("rt", "query", "expected"),
    [
        ("Observation", "subject=Patient/p1", ["o1", "o3"]),
        ("Observation", "subject=p1", ["o1", "o3"]),
        ("Observation", "subject:Patient=p2", ["o2"]),
        ("Observation", "subject=Group/p1", []),
        ("Observation", "subject=http://other.org/fhir/Patient/p9", ["o5"]),
        # o5's subject is a Patient p9 on another server, not this server's p9
        ("Observation", "subject=Patient/p9", []),
        ("Observation", "patient=p9", []),
        ("Observation", "patient=Patient/p1", ["o1", "o3"]),
        ("Observation", "subject=Patient/p1,Patient/p2", ["o1", "o2", "o3"]),
        ("Patient", "general-practitioner:identifier=urn:npi|9", ["p2"]),
        ("Patient", "general-practitioner:identifier=9", ["p2"]),
        ("Patient", "organization=org1", ["p1"]),
        ("Patient", "general-practitioner=Practitioner/pr1", ["p1"]),
        ("ValueSet", "url=http://acme.org/fhir/ValueSet/123", ["vs1"]),
        ("ValueSet", "url:below=http://acme.org/fhir/", ["vs1", "vs2"]),
        ("ValueSet", "url:below=HTTP://ACME.ORG/", []),  # uris are case-sensitive
        ("ValueSet", "url:below=http://acme.org/fhir/ValueSet/12_", []),
        ("ValueSet", "url:above=http://acme.org/fhir/ValueSet/123/_history/5", ["vs1"]),
        ("ValueSet", "url:above=http://acme.org/fhir/ValueSet/12", []),
    ],
)
async def test_reference_and_uri(db: Database, rt: str, query: str, expected: list[str]) -> None:
    await check(db, rt, query, expected)


# -- chains and _has -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("rt", "query", "expected"),
    [
        ("Observation", "subject.name=peter", ["o1", "o3"]),  # not o6: its patient is deleted
        ("Observation", "subject:Patient.name=paula", ["o2"]),
        ("Observation", "subject:Patient.name=paula,peter", ["o1", "o2", "o3"]),
        ("Observation", "subject:Patient.organization.name=acme", ["o1", "o3"]),
        ("Observation", "subject:Patient.organization.partof.name=root", ["o1", "o3"]),
        ("Observation", "subject:Patient.birthdate=lt1985", ["o1", "o3"]),
        ("Observation", "subject:Patient._id=p2", ["o2"]),
        ("Observation", "subject:Patient.gender:missing=true", []),
        ("Observation", "performer:Practitioner.name=who&subject.name=peter", ["o1"]),
        ("RiskAssessment", "subject:Patient.general-practitioner.name=doctor",
         ["ra1", "ra2", "ra3", "ra4"]),
        ("Patient", "_has:Observation:patient:code=999", ["p2"]),
        ("Patient", "_has:Observation:subject:code=1234-5", ["p1"]),
        ("Patient", "_has:Observation:patient:_has:Provenance:target:agent=Practitioner/pr1",
         ["p1"]),
        ("Patient", "_has:Observation:patient:code=6666-6", []),  # p5 is deleted
        ("Observation", "_has:Provenance:target:agent=Practitioner/pr1", ["o1"]),
        ("Practitioner", "_has:Observation:performer:status=final", ["pr1"]),
        ("Practitioner", "_has:Observation:performer:status=amended", []),
    ],
)
async def test_chain_and_has(db: Database, rt: str, query: str, expected: list[str]) -> None:
    await check(db, rt, query, expected)


# -- :missing, :not, _id -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rt", "query", "expected"),
    [
        ("Patient", "birthdate:missing=true", ["p6"]),
        ("Patient", "gender:missing=false", ["p1", "p2", "p3", "p4", "p7"]),
        ("Patient", "name:missing=true", ["p6"]),
        ("Observation", "subject:missing=true", ["o4"]),
        ("Observation", "value-quantity:missing=true", ["o4", "o5", "o6"]),
        ("ValueSet", "url:missing=true", []),
        ("Patient", "_id:missing=false", ["p1", "p2", "p3", "p4", "p6", "p7"]),
        ("Patient", "_id:missing=true", []),
        ("Observation", f"code:not={LOINC}|1234-5", ["o2", "o3", "o4", "o5", "o6"]),
        ("Observation", "status:not=final", ["o2", "o3"]),
        ("Patient", "gender:not=male", ["p2", "p3", "p4", "p6", "p7"]),  # p6: no gender
        ("Patient", "gender:not=male,female", ["p3", "p4", "p6"]),
        ("Patient", "_id=p1,p7,p5,nope", ["p1", "p7"]),
        ("Patient", "_id:not=p1", ["p2", "p3", "p4", "p6", "p7"]),
    ],
)
async def test_missing_not_id(db: Database, rt: str, query: str, expected: list[str]) -> None:
    await check(db, rt, query, expected)


# -- sorting and limits ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("rt", "query", "expected"),
    [
        ("Patient", "", ["p1", "p2", "p3", "p4", "p6", "p7"]),
        ("Patient", "_sort=birthdate", ["p3", "p4", "p1", "p2", "p7", "p6"]),
        ("Patient", "_sort=-birthdate", ["p7", "p2", "p1", "p4", "p3", "p6"]),
        ("Patient", "_sort=family", ["p3", "p4", "p1", "p7", "p2", "p6"]),
        ("Patient", "_sort=-family", ["p2", "p7", "p1", "p4", "p3", "p6"]),
        ("Patient", "_sort=gender,-birthdate", ["p7", "p2", "p1", "p3", "p4", "p6"]),
        ("Patient", "_sort=-_id", ["p7", "p6", "p4", "p3", "p2", "p1"]),
        ("Patient", "_sort=-_lastUpdated", ["p7", "p6", "p4", "p3", "p2", "p1"]),
        ("RiskAssessment", "_sort=probability", ["ra4", "ra3", "ra1", "ra2"]),
        ("RiskAssessment", "_sort=-probability", ["ra4", "ra2", "ra1", "ra3"]),
        ("Observation", "_sort=subject", ["o1", "o3", "o2", "o6", "o4", "o5"]),
        ("Observation", "_sort=-date", ["o3", "o2", "o1", "o4", "o5", "o6"]),
        ("Observation", "_sort=date", ["o2", "o1", "o3", "o4", "o5", "o6"]),
        ("Observation", "status=final&_sort=code", ["o1", "o5", "o6", "o4"]),
        ("ValueSet", "_sort=-url", ["vs3", "vs2", "vs1"]),
    ],
)
async def test_sort(db: Database, rt: str, query: str, expected: list[str]) -> None:
    await check(db, rt, query, expected)


async def test_limit(db: Database) -> None:
    assert await ids(db, "Patient", "_sort=birthdate", limit=2) == ["p3", "p4"]
    # (a date's head also read bounded by a walk of its index: ``keys``)
    assert await ids(db, "Patient", "_sort=-birthdate,family", limit=3) == ["p7", "p2", "p1"]
    assert await ids(db, "Observation", "_sort=-date", limit=2) == ["o3", "o2"]
    assert await ids(db, "Observation", "_sort=date", limit=4) == ["o2", "o1", "o3", "o4"]
    assert await ids(db, "Patient", "_sort=family", limit=2) == ["p3", "p4"]
    assert await ids(db, "Patient", "_sort=-family", limit=3) == ["p2", "p7", "p1"]
    assert await ids(db, "RiskAssessment", "_sort=probability", limit=2) == ["ra4", "ra3"]
    assert await ids(db, "Patient", "", limit=0) == []


# -- system search ------------------------------------------------------------------


async def test_system_search(db: Database) -> None:
    assert await keys(db, None, "_id=p1") == [("Patient", "p1")]
    assert await keys(db, None, "_id=p5") == []
    assert await keys(db, None, "_tag=s|t1") == [("Patient", "p1")]
    assert await keys(db, None, "_lastUpdated=le2023-01-01T00:00:02Z") == [
        ("Organization", "org3"), ("Organization", "org1")]
    assert await keys(db, None, "_type=Organization,Practitioner&name=acme,who") == [
        ("Organization", "org1"), ("Practitioner", "pr1")]
    assert await keys(db, None, "_type=Practitioner,Organization&_sort=_id") == [
        ("Organization", "org1"), ("Organization", "org2"), ("Organization", "org3"),
        ("Practitioner", "pr1"), ("Practitioner", "pr2")]


# -- _include / _revinclude -------------------------------------------------------------


@pytest.mark.parametrize(
    ("rt", "query", "expected"),
    [
        ("Observation", "_id=o1&_include=Observation:subject", ["Patient/p1"]),
        ("Observation", "_id=o1&_include=Observation:subject:Patient", ["Patient/p1"]),
        ("Observation", "_id=o1&_include=Observation:subject:Group", []),
        ("Observation", "_id=o1&_include=Observation:*", ["Patient/p1", "Practitioner/pr1"]),
        ("Observation", "_id=o1&_include=*", ["Patient/p1", "Practitioner/pr1"]),
        ("Observation", "_id=o1&_revinclude=Provenance:target", ["Provenance/prov1"]),
        ("Observation", "_id=o1&_include=Observation:subject&_include=Patient:organization",
         ["Patient/p1"]),  # not iterated
        ("Observation", "_id=o1&_include=Observation:subject"
         "&_include:iterate=Patient:organization&_include:iterate=Organization:partof",
         ["Patient/p1", "Organization/org1", "Organization/org3"]),
        ("Observation", "_id=o6&_include=Observation:subject", []),  # deleted target
        ("Observation", "_id=o5&_include=Observation:subject", []),  # no such target
        ("Observation", "_id=o2&_include=Observation:has-member", ["Observation/o1"]),
        ("Observation", "_id=o1,o2&_include=Observation:has-member", []),  # already a match
        ("Patient", "_id=p1&_revinclude=Observation:subject"
         "&_revinclude:iterate=Provenance:target",
         ["Observation/o1", "Observation/o3", "Provenance/prov1"]),
        ("Patient", "_id=p1&_revinclude=*",
         ["Observation/o1", "Observation/o3", "RiskAssessment/ra1", "RiskAssessment/ra2",
          "RiskAssessment/ra3", "RiskAssessment/ra4"]),
        ("Patient", "_id=p5&_revinclude=Observation:subject", []),
        ("Patient", "_id=p1,p2&_include=Patient:general-practitioner",
         ["Practitioner/pr1"]),  # p2's is an identifier-only reference
        ("Organization", "_id=org3&_revinclude:iterate=Organization:partof"
         "&_revinclude:iterate=Patient:organization",
         ["Organization/org1", "Patient/p1"]),
    ],
)
async def test_includes(db: Database, rt: str, query: str, expected: list[str]) -> None:
    assert await includes(db, rt, query) == expected


async def test_includes_system_search_and_limit(db: Database) -> None:
    assert await includes(db, None, "_id=o1&_include=*") == ["Patient/p1", "Practitioner/pr1"]
    assert await includes(db, "Observation", "_id=o1&_include=*", limit=1) == ["Patient/p1"]
    assert await includes(db, "Observation", "_id=o1&_include=*", limit=0) == []
    assert await includes(db, "Observation", "_id=o1") == []


# -- hostile input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rt", "name", "value"),
    [
        ("Patient", "name", "' OR '1'='1"),
        ("Patient", "name:exact", "x' OR 1=1 --"),
        ("Patient", "family", "'); DROP TABLE resource; --"),
        ("Observation", "code", "x'); DROP TABLE resource; --"),
        ("Observation", "code", "http://loinc.org'--|1234-5"),
        ("Observation", "code:text", "' OR ''='"),
        ("Patient", "name", "what?"),
        ("Patient", "name:contains", "$1"),
        ("Observation", "subject", "http://x.org/a'b"),
        ("ValueSet", "url:above", "' OR 1=1"),
        ("ValueSet", "url:below", "?"),
        ("Patient", "_has:Observation:patient:code", "1' OR '1'='1"),
        ("Observation", "subject:Patient.name", "\"; SELECT 1; --"),
    ],
)
async def test_injection_attempts_match_nothing(
    db: Database, rt: str, name: str, value: str
) -> None:
    assert await ids(db, rt, [(name, value)]) == []
    assert await ids(db, "Patient", "_id=p1") == ["p1"]  # the tables are still there


# -- several criteria: an intersection, whichever drives ---------------------------------

_SINGLE = {
    "Observation": [
        "code=1234-5", f"code={LOINC}|", "status=final", "status:not=final",
        f"code:not={LOINC}|1234-5", "subject=Patient/p1", "patient=p1,p2",
        "subject:missing=true", "value-quantity:missing=true", "subject.name=peter",
        "date=ge2020", "_id=o1,o2,o5", "_lastUpdated=gt2000", "code:text=glucose",
    ],
    "Patient": [
        "gender=female", "gender:not=male", "name=p", "birthdate=lt1990", "active=true",
        "_tag=t1", "identifier=111", "organization=org1", "name:missing=false",
        "_has:Observation:subject:code=1234-5", "_id=p1,p2,p7", "family:exact=Müller",
    ],
}


@pytest.mark.parametrize("rt", sorted(_SINGLE))
async def test_criteria_combine_as_an_intersection(db: Database, rt: str) -> None:
    alone = {q: await ids(db, rt, q) for q in _SINGLE[rt]}
    queries = list(alone)
    for i, a in enumerate(queries):
        for b in queries[i + 1:]:
            expected = [x for x in alone[a] if x in alone[b]]
            # keys() runs every criterion as the driver too
            assert await ids(db, rt, f"{a}&{b}") == expected, (a, b)
            assert await ids(db, rt, f"{b}&{a}") == expected, (b, a)


async def test_the_fewest_rows_drive_a_search(db: Database) -> None:
    async with db.read() as conn:
        driver = [await choose_driver(conn, _parse(rt, query)) for rt, query in [
            ("Observation", "status=final&subject=Patient/p1"),
            ("Observation", "subject=Patient/p1&status=final"),
            ("Observation", "status:not=final&code=999"),  # the one positive criterion
            ("Observation", "status:not=final&subject:missing=true"),  # nothing positive
            ("Observation", "subject.name=peter&status=final"),  # a chain: SQLite decides
            ("Observation", "status=final"),
        ]]
    if db.dialect == "postgresql":  # a patient's rows are few: its planner chooses
        assert driver == [None, None, 1, None, None, None]
    else:
        assert driver == [1, 0, 1, None, None, None]


# -- property: any input parses to an error or to SQL with every value bound ----------------

_NAMES = [
    "name", "name:exact", "name:contains", "family", "code", "code:not", "code:text",
    "code:missing", "date", "value-quantity", "subject", "subject:Patient", "subject:identifier",
    "subject.name", "subject:Patient.organization.name", "_id", "_lastUpdated", "_tag",
    "_profile", "_has:Observation:patient:code", "_sort", "_count", "_include",
    "_revinclude:iterate", "performer", "status", "combo-code", "nope", "_elements",
]
_VALUE = st.text(
    alphabet=st.sampled_from(list("abcXYZ019.-+|,\\$%_'\"?:/ ()eEgtlpsaq")), max_size=24
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.sampled_from(_NAMES), _VALUE),
    st.tuples(st.just("_sort"), st.sampled_from(["date", "-date", "-date,_id", "-date,code",
                                                 "value-quantity", "-code"]))),
    max_size=5))
def test_any_query_compiles_with_bound_values(pairs: list[tuple[str, str]]) -> None:
    try:
        q = parse_search("Observation", pairs, _INDEXER.params_for, now=NOW)
    except FhirError:
        return
    drivers = [None, *range(len(q.criteria))]
    probes = [probe for c in q.criteria if (probe := _probe(c, "Observation")) is not None]
    for dialect in ("sqlite", "postgresql"):
        walks = [_sort_walk(q, dialect, 20, None), select_ids(
            q, dialect, 10, bound=(q.sort[0], 1))] if bounds_by_sort(q) else []
        for sql, params in (*(select_ids(q, dialect, 10, driver=d) for d in drivers),
                            *(count(q, dialect, driver=d) for d in drivers), *probes,
                            *walks):
            assert sql.count("?") == len(params)
            # (quotes only in constants: the escape, an empty string, a text sort key's)
            assert "'" not in sql.replace("ESCAPE '!'", "").replace("= ''", "").replace(
                "|| ''", "")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_a_sorted_result_cut_short_is_its_head(backend: str) -> None:
    """The first n matches of a sorted search are the first n of all of them, at every
    n, whatever order the ids have. SQLite 3.40 dropped rows from such a head (with the
    ids in these orders, at several n) when its statistics said what ANALYZE, sampling
    1,000 rows an index, had written on a running server of 3,956 resources: few
    resources to a type, so an IN of ids is read through the primary key."""
    orders = [(6, 0, 4, 1, 2, 3, 5), (5, 0, 2, 6, 3, 1, 4), (0, 3, 5, 6, 2, 1, 4)]
    data: list[tuple[dict[str, Any], bool]] = [
        ({"resourceType": "Patient", "id": f"filler-{i:03d}", "name": [{"family": f"F{i}"}],
          "birthDate": f"19{i % 100:02d}-01-01"}, False) for i in range(200)]
    for n, order in enumerate(orders):
        data += [({"resourceType": "Patient", "id": f"c{n}-{rank}",
                   "name": [{"family": f"Cut{n}"}], "birthDate": f"19{50 + i}-03-01"}, False)
                 for i, rank in enumerate(order)]
    async with loaded(backend, data) as database:
        await database.analyze(["resource", "sp_string", "sp_date"])
        if backend == "sqlite":
            async with database.transaction() as conn:
                await conn.execute("UPDATE sqlite_stat1 SET stat = '5175 12 1'"
                                   " WHERE idx = 'sqlite_autoindex_resource_1'")
                await conn.execute("ANALYZE sqlite_schema")  # the planner reads them again
        for n, order in enumerate(orders):
            whole = [f"c{n}-{rank}" for rank in order]
            for sort, expected in (("birthdate", whole), ("-birthdate", whole[::-1])):
                query = f"family=Cut{n}&_sort={sort}"
                assert await ids(database, "Patient", query) == expected
                for limit in range(1, len(whole)):
                    assert await ids(database, "Patient", query, limit) == expected[:limit], (
                        query, limit)
