"""A sorted search over most of a type is bounded by a walk of its sort key's index
(``search_sql.plan``), and returns what the unbounded search returns: the same
resources in the same order, ties and resources without a value included."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from gateway.fhir.indexer import Indexer
from gateway.fhir.search import parse_search
from gateway.registry import Registry
from gateway.storage import search_sql
from gateway.storage.interface import StoreTransaction
from gateway.storage.sql import SqlStore
from tests.conftest import BACKENDS, sql_store

INDEXER = Indexer.from_profiles()
REGISTRY = Registry.load()
DAYS = [f"2024-{m:02d}-{d:02d}" for m in (1, 2, 3) for d in (1, 9, 17)]  # nine: many ties


def goal(i: int, rng: random.Random) -> dict[str, Any]:
    """A Goal, active nine times in ten, with up to three due dates (none: sorts last);
    one in seven due over a period of days (a ``lo`` and a ``hi`` apart)."""
    targets: list[dict[str, Any]] = [{"dueDate": rng.choice(DAYS)}
                                     for _ in range(rng.choice((0, 1, 1, 2, 3)))]
    if i % 7 == 0:
        targets.append({"dueDate": rng.choice(DAYS)[:7]})  # a month: lo and hi differ
    return {"resourceType": "Goal", "id": f"g{i:03d}",
            "lifecycleStatus": "completed" if i % 10 == 3 else "active",
            "description": {"text": f"goal {i}"}, "subject": {"reference": f"Patient/p{i % 4}"},
            **({"target": targets} if targets else {})}


FAMILIES = ["Müller", "Schmidt", "de Vries", "Jansen", "Öztürk", "Bakker", "Weber", " van Dijk"]


def patient(i: int, rng: random.Random) -> dict[str, Any]:
    """A Patient, female three times in four; a name or two of few families (none:
    sorts last), a birth date of few."""
    names = [{"family": rng.choice(FAMILIES), "given": ["A"]}
             for _ in range(rng.choice((0, 1, 1, 1, 2)))]
    return {"resourceType": "Patient", "id": f"p{i:03d}",
            "gender": "male" if i % 4 == 1 else "female",
            "birthDate": rng.choice(DAYS), **({"name": names} if names else {})}


def observation(i: int, rng: random.Random) -> dict[str, Any]:
    """A final Observation, with a quantity of few (none: sorts last)."""
    value = {"valueQuantity": {"value": rng.choice((1.5, 2, 2.25, 7, 10)), "unit": "mg",
                               "system": "http://unitsofmeasure.org", "code": "mg"}
             } if i % 9 else {}
    return {"resourceType": "Observation", "id": f"o{i:03d}",
            "status": "final" if i % 10 else "preliminary", "code": {"text": "x"}, **value}


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    rng = random.Random()
    async with sql_store(request.param, tmp_path, INDEXER) as s:
        async def work(tx: StoreTransaction) -> None:
            for i in rng.sample(range(400), 400):  # created in no particular order
                await tx.put("Goal", f"g{i:03d}", goal(i, rng), "PUT", None)
                await tx.put("Patient", f"p{i:03d}", patient(i, rng), "PUT", None)
                await tx.put("Observation", f"o{i:03d}", observation(i, rng), "PUT", None)

        await s.run(work)
        yield s


async def unbounded(store: SqlStore, query: Any, limit: int) -> list[tuple[str, str]]:
    sql, params = search_sql.select_ids(query, store.db.dialect, limit)
    async with store.db.read() as conn:
        return [(r[0], r[1]) for r in await conn.fetch(sql, params)]


@pytest.mark.parametrize(("rt", "pairs"), [
    ("Goal", [("lifecycle-status", "active"), ("_sort", "-target-date")]),
    ("Goal", [("lifecycle-status", "active"), ("_sort", "target-date")]),
    ("Goal", [("lifecycle-status", "active,completed"), ("_sort", "-target-date,-_id")]),
    ("Goal", [("_sort", "-target-date")]),
    ("Goal", [("_sort", "target-date,_lastUpdated")]),
    ("Goal", [("lifecycle-status", "active"), ("patient", "Patient/p1"),
              ("_sort", "-target-date")]),
    ("Patient", [("gender", "female"), ("_sort", "family")]),
    ("Patient", [("gender", "female"), ("_sort", "-family,birthdate")]),
    ("Patient", [("_sort", "-family")]),
    ("Patient", [("gender", "female"), ("_sort", "-birthdate,family")]),
    ("Observation", [("status", "final"), ("_sort", "value-quantity")]),
])
async def test_a_bounded_sort_returns_what_the_unbounded_one_does(
        store: SqlStore, rt: str, pairs: list[tuple[str, str]]) -> None:
    query = parse_search(rt, pairs, REGISTRY.search_params)
    names_few = any(k == "patient" for k, _ in pairs)
    for limit in (1, 5, 21, 60):
        async with store.db.read() as conn:
            driver, bound = await search_sql.plan(conn, query, limit)
        # bounded by a walk unless a criterion names a resource (a few match it)
        assert (bound is not None) is not names_few, limit
        if not names_few:
            assert driver == search_sql.WALK
        assert await store.search_keys(query, limit) == await unbounded(store, query, limit)
        found = await store.search_resources(query, limit)
        assert [(s.resource_type, s.id) for s in found] == await unbounded(store, query, limit)


async def test_a_walk_that_finds_too_few_values_runs_unbounded(store: SqlStore) -> None:
    # most Goals have no value for it: the walk does not reach the limit
    query = parse_search("Goal", [("lifecycle-status", "active"), ("_sort", "-start-date")],
                         REGISTRY.search_params)
    async with store.db.read() as conn:
        assert await search_sql.plan(conn, query, 21) == (None, None)
    assert await store.search_keys(query, 21) == await unbounded(store, query, 21)


async def test_a_walk_that_finds_too_few_values_leaves_the_fewest_to_drive(
        store: SqlStore) -> None:
    # no Patient has died: the walk finds no value; the search is listed from the
    # criterion with the fewest rows (the gender: a quarter are male)
    query = parse_search("Patient", [("gender", "female"), ("birthdate", "ge2024-01-01"),
                                     ("_sort", "-death-date")], REGISTRY.search_params)
    async with store.db.read() as conn:
        assert await search_sql.choose_driver(conn, query, 21) == search_sql.WALK
        assert await search_sql.plan(conn, query, 21) == (0, None)
    assert await store.search_keys(query, 21) == await unbounded(store, query, 21)
