"""What PostgreSQL's planner is given for searches (real PostgreSQL).

A search's speed depends on the planner's guess of how many index rows a
criterion matches: ``Observation?code=8302-2`` (body height) matches most
Observations, another code a handful, and the best plan for the one is slow for
the other. Two things keep the guesses close: statistics over an index table's
columns together (migration 28), and statements planned for their values, never
by a plan cached for any values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from gateway.fhir.indexer import Indexer
from gateway.fhir.search import parse_search
from gateway.registry import Registry
from gateway.storage.interface import StoreTransaction
from gateway.storage.sql import SqlStore
from tests.conftest import sql_store

INDEXER = Indexer.from_profiles()
REGISTRY = Registry.load()
LOINC = "http://loinc.org"
COMMON, RARE = "8302-2", "2339-0"


def observation(i: int, code: str) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": f"o{i}", "status": "final",
            "category": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": "vital-signs"}]}],
            "code": {"coding": [{"system": LOINC, "code": code}]},
            "subject": {"reference": f"Patient/p{i % 40}"},
            "effectiveDateTime": f"2024-01-{1 + i % 28:02d}",
            "valueQuantity": {"value": 170 + i % 30, "unit": "cm",
                              "system": "http://unitsofmeasure.org", "code": "cm"}}


async def load(store: SqlStore, common: int, rare: int, others: int) -> None:
    async def work(tx: StoreTransaction) -> None:
        codes = [COMMON] * common + [RARE] * rare + [f"{9000 + i}-{i % 10}" for i in range(others)]
        for i, code in enumerate(codes):
            await tx.put("Observation", f"o{i}", observation(i, code), "PUT", None)

    await store.run(work)


async def test_the_rows_of_a_common_code_are_estimated_as_many(tmp_path: Path) -> None:
    async with sql_store("postgresql", tmp_path, INDEXER) as store:
        await load(store, common=1500, rare=5, others=300)
        async with store.db.read() as conn:
            await conn.execute("ANALYZE")
            estimates = {}
            for code in (COMMON, RARE):
                row = await conn.fetchrow(
                    "EXPLAIN (FORMAT JSON) SELECT res_id FROM sp_token WHERE res_type = ?"
                    " AND param = ? AND system = ? AND code = ?",
                    ("Observation", "code", LOINC, code))
                assert row is not None
                plan = row[0] if isinstance(row[0], list) else orjson.loads(row[0])
                estimates[code] = plan[0]["Plan"]["Plan Rows"]
    # each column alone says little (most rows are Observations, a tenth of theirs
    # are `code`, the code is one of 300): taken as independent, 1,500 rows were
    # guessed at about 150
    assert 750 <= estimates[COMMON] <= 3000, estimates
    assert estimates[RARE] <= 50, estimates


async def test_searches_are_not_run_by_plans_cached_for_any_value(tmp_path: Path) -> None:
    async with sql_store("postgresql", tmp_path, INDEXER, pool_size=1) as store:
        await load(store, common=30, rare=2, others=5)
        for code in [RARE] * 4 + [COMMON] * 4:
            query = parse_search("Observation", [("code", f"{LOINC}|{code}")],
                                 REGISTRY.search_params)
            keys = await store.search_keys(query, 101)
            assert len(keys) == (2 if code == RARE else 30)
            resources = await store.search_resources(query, 11)
            assert len(resources) == (2 if code == RARE else 11)
            assert await store.count(query) == len(keys)
        async with store.db.read() as conn:  # the pool's one connection
            cached = [str(r[0]) for r in await conn.fetch(
                "SELECT statement FROM pg_prepared_statements")]
        # a named statement would be planned generically after its fifth run
        searches = [s for s in cached if "FROM resource r WHERE" in s]
        assert searches == [], searches
        assert cached, "the store's other statements are still prepared once and kept"

        # a resource's id or an identifier matches a few rows whatever it is: one
        # plan serves them all, and the planning is saved
        for i in range(6):
            for pairs in ([("_id", f"o{i}")], [("subject", f"Patient/p{i}"), ("code", RARE)]):
                query = parse_search("Observation", pairs, REGISTRY.search_params)
                assert len(await store.search_keys(query, 11)) <= 1
        async with store.db.read() as conn:
            cached = [str(r[0]) for r in await conn.fetch(
                "SELECT statement FROM pg_prepared_statements")]
        assert len([s for s in cached if "FROM resource r WHERE" in s]) == 2, cached
