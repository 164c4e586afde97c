"""An update rewrites only the search-index rows of the parameters it changes (both backends).

Whatever the path (one write, several in one transaction, a deletion between),
the index rows of a resource are exactly what the indexer extracts from its
current JSON; the rows of parameters an update leaves alone stay where they are.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.main import registry
from gateway.security.policy import AccessPolicy, PolicyIndexer, load_rules
from gateway.storage.interface import StoreTransaction
from gateway.storage.schema import INDEX_TABLES
from gateway.storage.sql import SqlStore
from tests.conftest import BACKENDS, sql_store, unique

INDEXER = PolicyIndexer(registry().indexer, AccessPolicy(load_rules("DE"), registry().indexer))
EXAMPLES = Path(__file__).parents[1] / "data" / "r4-examples.ndjson.gz"
#: types whose examples differ in many parameters, including composite, quantity,
#: consent (derived by the access policy) and access-proxy rows
TYPES = ("Patient", "Observation", "Consent", "Binary", "Bundle", "ServiceRequest", "CarePlan",
         "Condition", "Encounter", "Task", "Composition")


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqlStore]:
    async with sql_store(request.param, tmp_path, INDEXER) as s:
        yield s


def examples() -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {t: [] for t in TYPES}
    with gzip.open(EXAMPLES, "rt") as f:
        for line in f:
            resource = json.loads(json.loads(line)["text"])
            kind = resource.get("resourceType")
            if kind in out and len(out[kind]) < 3:
                out[kind].append(resource)
    return out


def _norm(row: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(float(x) if isinstance(x, float) else x for x in row)


async def stored_rows(store: SqlStore, rt: str, rid: str) -> list[tuple[Any, ...]]:
    rows = []
    async with store.db.read() as conn:
        for table, columns in INDEX_TABLES.items():
            for row in await conn.fetch(
                    f"SELECT param, {', '.join(columns)} FROM {table}"
                    " WHERE res_type = ? AND res_id = ?", (rt, rid)):
                rows.append((table, *_norm(tuple(row))))
    return sorted(rows, key=repr)


async def expected_rows(store: SqlStore, rt: str, rid: str) -> list[tuple[Any, ...]]:
    current = await store.read(rt, rid)
    if current is None or current.deleted or current.content is None:
        return []
    extracted = INDEXER.extract(json.loads(current.content))
    return sorted(((t, *_norm(r)) for t, rows in extracted.items() for r in rows), key=repr)


async def put(store: SqlStore, *writes: tuple[str, str, dict[str, Any]]) -> None:
    async def work(tx: StoreTransaction) -> None:
        for rt, rid, body in writes:
            await tx.put(rt, rid, {**body, "id": rid}, "PUT", await tx.current(rt, rid))

    await store.run(work)


async def delete(store: SqlStore, rt: str, rid: str) -> None:
    async def work(tx: StoreTransaction) -> None:
        current = await tx.current(rt, rid)
        assert current is not None
        await tx.delete(current)

    await store.run(work)


async def check(store: SqlStore, rt: str, rid: str, step: str) -> None:
    assert await stored_rows(store, rt, rid) == await expected_rows(store, rt, rid), (
        rt, rid, step)


async def test_index_rows_follow_every_version(store: SqlStore) -> None:
    for rt, versions in examples().items():
        assert len(versions) >= 2, rt
        a, b = versions[0], versions[1]
        rid = unique(rt.lower())
        steps: list[tuple[str, dict[str, Any] | None]] = [
            ("a", a), ("b", b), ("a again", a), ("a unchanged", a),
            ("minimal", {"resourceType": rt}), ("b after minimal", b), ("deleted", None),
            ("a after deletion", a)]
        for step, body in steps:
            if body is None:
                await delete(store, rt, rid)
            else:
                await put(store, (rt, rid, body))
            await check(store, rt, rid, step)


async def test_index_rows_follow_updates_in_one_transaction(store: SqlStore) -> None:
    """Several updates go out together (on PostgreSQL as one statement)."""
    found = examples()
    ids = {rt: unique(rt.lower()) for rt in found}
    await put(store, *((rt, ids[rt], versions[0]) for rt, versions in found.items()))
    await put(store, *((rt, ids[rt], versions[1]) for rt, versions in found.items()))
    for rt in found:
        await check(store, rt, ids[rt], "second version")
    await put(store, *((rt, ids[rt], {"resourceType": rt}) for rt in found))
    for rt in found:
        await check(store, rt, ids[rt], "minimal")


async def row_marks(store: SqlStore, rid: str, param: str) -> set[Any]:
    """What identifies the physical rows of a parameter: a row rewritten gets a new one."""
    mark = "xmin::text" if store.db.dialect == "postgresql" else "rowid"
    async with store.db.read() as conn:
        return {r[0] for table in ("sp_string", "sp_token") for r in await conn.fetch(
            f"SELECT {mark} FROM {table} WHERE res_type = 'Patient' AND res_id = ?"
            " AND param = ?", (rid, param))}


async def test_an_update_leaves_the_rows_of_unchanged_parameters_alone(store: SqlStore) -> None:
    rid = unique("p")
    body = {"resourceType": "Patient", "name": [{"family": "Alt", "given": ["Anna"]}],
            "identifier": [{"system": "urn:x", "value": rid}],
            "telecom": [{"system": "phone", "value": "+49 30 1"}]}
    await put(store, ("Patient", rid, body))
    family, phone = await row_marks(store, rid, "family"), await row_marks(store, rid, "phone")
    assert family and phone
    # rows written after these (SQLite gives a new row the highest rowid plus one)
    await put(store, ("Patient", unique("q"), body))
    await put(store, ("Patient", rid, {**body, "telecom": [{"system": "phone",
                                                             "value": "+49 30 2"}]}))
    await check(store, "Patient", rid, "new phone")
    assert await row_marks(store, rid, "family") == family
    assert (await row_marks(store, rid, "phone")).isdisjoint(phone)


async def test_damaged_stored_json_is_replaced_with_all_its_rows(store: SqlStore) -> None:
    rid = unique("p")
    await put(store, ("Patient", rid, {"resourceType": "Patient", "name": [{"family": "Alt"}],
                                       "gender": "female"}))
    async with store.db.transaction() as conn:
        await conn.execute("UPDATE resource SET content = ? WHERE res_type = 'Patient'"
                           " AND res_id = ?", (b"{not json", rid))
    await put(store, ("Patient", rid, {"resourceType": "Patient", "name": [{"family": "Neu"}]}))
    await check(store, "Patient", rid, "after damaged")
    assert not [r for r in await stored_rows(store, "Patient", rid) if r[1] == "gender"]
