"""SqlStore on SQLite and PostgreSQL: one write = one transaction of four parts."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.fhir.indexer import Indexer
from gateway.fhir.search import parse_search
from gateway.storage.db import open_database
from gateway.storage.interface import Snapshot, StoreTransaction
from gateway.storage.schema import INDEX_TABLES
from gateway.storage.snapshots import KEPT_MICROS, PART
from gateway.storage.sql import SqlStore, now_micros
from tests.conftest import PG_URL, sql_store

INDEXER = Indexer.from_profiles()


class ExplodingIndexer:
    """Indexes like the real one, then fails: the write must leave no trace."""

    def extract(self, resource: dict[str, Any]) -> dict[str, list[tuple[Any, ...]]]:
        INDEXER.extract(resource)
        raise RuntimeError("index failure")


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqlStore]:
    async with sql_store(request.param, tmp_path, INDEXER) as s:
        yield s


async def counts(store: SqlStore, rid: str) -> dict[str, int]:
    out = {}
    async with store.db.read() as conn:
        for table in ("resource", "resource_history", "outbox", "sp_string", "sp_token"):
            row = await conn.fetchrow(f"SELECT count(*) FROM {table} WHERE res_id = ?", (rid,))
            assert row is not None
            out[table] = int(row[0])
    return out


PATIENT = {"resourceType": "Patient", "name": [{"family": "Muster"}],
           "identifier": [{"system": "urn:x", "value": "1"}]}


async def test_put_writes_resource_history_index_and_outbox(store: SqlStore) -> None:
    async def work(tx: StoreTransaction) -> Any:
        return await tx.put("Patient", "p1", dict(PATIENT), "POST", None)

    stored = await store.run(work)
    assert stored.version == 1
    c = await counts(store, "p1")
    assert (c["resource"], c["resource_history"], c["outbox"]) == (1, 1, 1)
    assert c["sp_string"] > 0 and c["sp_token"] > 0
    async with store.db.read() as conn:
        event = await conn.fetchrow(
            "SELECT res_type, version, interaction FROM outbox WHERE res_id = ?", ("p1",))
    assert event == ("Patient", 1, "create")


async def test_failed_write_leaves_nothing_behind(store: SqlStore) -> None:
    failing = SqlStore(store.db, ExplodingIndexer())

    async def work(tx: StoreTransaction) -> Any:
        return await tx.put("Patient", "p2", dict(PATIENT), "POST", None)

    with pytest.raises(RuntimeError):
        await failing.run(work)
    assert await counts(store, "p2") == {"resource": 0, "resource_history": 0, "outbox": 0,
                                         "sp_string": 0, "sp_token": 0}


async def test_update_replaces_index_rows_and_delete_clears_them(store: SqlStore) -> None:
    async def create(tx: StoreTransaction) -> Any:
        return await tx.put("Patient", "p3", dict(PATIENT), "POST", None)

    first = await store.run(create)
    strings_before = (await counts(store, "p3"))["sp_string"]

    async def update(tx: StoreTransaction) -> Any:
        current = await tx.current("Patient", "p3")
        body = {**PATIENT, "name": [{"family": "Neu"}, {"family": "Zweit"}]}
        return await tx.put("Patient", "p3", body, "PUT", current)

    second = await store.run(update)
    assert second.version == first.version + 1
    strings_after = (await counts(store, "p3"))["sp_string"]
    assert strings_after > strings_before  # two names now, and no stale rows of the first
    async with store.db.read() as conn:
        values = {r[0] for r in await conn.fetch(
            "SELECT value FROM sp_string WHERE res_id = ? AND param = 'family'", ("p3",))}
    assert values == {"neu", "zweit"}

    async def delete(tx: StoreTransaction) -> Any:
        current = await tx.current("Patient", "p3")
        assert current is not None
        return await tx.delete(current)

    gone = await store.run(delete)
    assert gone.deleted and gone.version == 3
    c = await counts(store, "p3")
    assert c["sp_string"] == 0 and c["sp_token"] == 0
    assert c["resource_history"] == 3 and c["outbox"] == 3
    current = await store.read("Patient", "p3")
    assert current is not None and current.deleted and current.content is None
    v1 = await store.vread("Patient", "p3", 1)
    assert v1 is not None and b"Muster" in (v1.content or b"")


async def test_stored_bytes_carry_meta_and_are_served_as_is(store: SqlStore) -> None:
    async def work(tx: StoreTransaction) -> Any:
        return await tx.put("Patient", "p4", {**PATIENT, "meta": {"tag": [{"code": "t"}]}},
                            "POST", None)

    stored = await store.run(work)
    read = await store.read("Patient", "p4")
    assert read is not None and read.content == stored.content
    assert stored.content is not None
    assert stored.content.startswith(b'{"resourceType":"Patient"')
    assert b'"meta":{"versionId":"1","lastUpdated":"' in stored.content
    assert b'"tag":[{"code":"t"}]' in stored.content


async def _index_of(store: SqlStore, rt: str, rid: str) -> dict[str, Counter[tuple[Any, ...]]]:
    out = {}
    async with store.db.read() as conn:
        for table, cols in INDEX_TABLES.items():
            rows = await conn.fetch(f"SELECT param, {', '.join(cols)} FROM {table}"
                                    " WHERE res_type = ? AND res_id = ?", (rt, rid))
            out[table] = Counter(tuple(r) for r in rows)
    return out


def _expected_index(resource: dict[str, Any]) -> dict[str, Counter[tuple[Any, ...]]]:
    rows = INDEXER.extract(resource)
    return {table: Counter(rows.get(table, ())) for table in INDEX_TABLES}


def _observation(rid: str, codes: list[str], subject: str | None, value: float | None,
                 note: str = "") -> dict[str, Any]:
    obs: dict[str, Any] = {"resourceType": "Observation", "id": rid, "status": "final",
                           "code": {"coding": [{"system": "urn:c", "code": c} for c in codes],
                                    "text": f"codes {note}"}}
    if subject:
        obs["subject"] = {"reference": subject}
    if value is not None:
        obs["valueQuantity"] = {"value": value, "unit": "mg", "system": "http://unitsofmeasure.org",
                                "code": "mg"}
    return obs


async def test_updates_leave_the_index_equal_to_the_new_content(store: SqlStore) -> None:
    """An update replaces only the index rows that changed: whatever stays, goes or
    comes, the rows afterwards are exactly those of the new content."""
    versions = [
        _observation("o1", ["a", "b"], "Patient/p1", 1.5),
        _observation("o1", ["a", "c"], "Patient/p2", 1.5),           # some rows change
        _observation("o1", ["a", "c"], "Patient/p2", 1.5),           # nothing changes
        _observation("o1", ["c"], None, 2.25, note="x"),            # rows go
        _observation("o1", ["c", "d", "e"], "Patient/p1", None, note="x"),  # rows come
    ]
    for version in versions:
        async def work(tx: StoreTransaction, v: dict[str, Any] = version) -> None:
            await tx.put("Observation", "o1", dict(v), "PUT", await tx.current("Observation", "o1"))
        await store.run(work)
        assert await _index_of(store, "Observation", "o1") == _expected_index(version)

    # several resources written together (one statement on PostgreSQL)
    pairs = [(_observation("o1", ["z"], "Patient/p3", 3.0), _observation("o2", ["a"], None, 1.0)),
             (_observation("o1", ["z", "y"], "Patient/p3", 3.0),
              _observation("o2", ["a"], "Patient/p1", 1.0))]
    for first, second in pairs:
        async def both(tx: StoreTransaction, a: dict[str, Any] = first,
                       b: dict[str, Any] = second) -> None:
            for r in (a, b):
                await tx.put("Observation", r["id"], dict(r), "PUT",
                             await tx.current("Observation", r["id"]))
        await store.run(both)
        assert await _index_of(store, "Observation", "o1") == _expected_index(first)
        assert await _index_of(store, "Observation", "o2") == _expected_index(second)


@pytest.mark.parametrize("key", ["Patient/p1", "jti:it's \\ a 'key'; --", "Krankenhaus/Ärzte"])
async def test_a_first_lock_with_begin_excludes_like_any_other(key: str) -> None:
    """The transaction's first lock goes out with BEGIN (one round trip, the key as hex):
    it takes the same advisory lock the parameterised form takes."""
    db = open_database(PG_URL, pool_size=2)
    await db.open()
    try:
        async with db.transaction() as tx:
            await tx.lock(key)  # the first statement: BEGIN and the lock together
            async with db.read() as other:
                held = await other.fetchrow(
                    "SELECT pg_try_advisory_xact_lock(hashtextextended(?, 0))", (key,))
            assert held == (False,)
            row = await tx.fetchrow("SELECT 1")  # the transaction goes on
            assert row == (1,)
        async with db.transaction() as tx:  # released at commit
            await tx.execute("SELECT 1")
            await tx.lock(key)  # after BEGIN: the parameterised form
            async with db.read() as other:
                held = await other.fetchrow(
                    "SELECT pg_try_advisory_xact_lock(hashtextextended(?, 0))", (key,))
            assert held == (False,)
    finally:
        await db.close()


async def test_a_search_reads_its_matches_with_it(store: SqlStore) -> None:
    """``search_resources``: the matches in result order with their current versions,
    as ``search_keys`` and ``read_many`` give them one after the other."""
    family = f"Seite{uuid.uuid4().hex[:8]}"
    ids = [str(uuid.uuid4()) for _ in range(3)]

    async def write(tx: StoreTransaction) -> None:
        for n, rid in enumerate(ids):
            body = {**PATIENT, "name": [{"family": family, "given": [f"g{n}"]}]}
            await tx.put("Patient", rid, body, "POST", None)

    await store.run(write)

    async def update(tx: StoreTransaction) -> None:  # the middle one gets a version 2
        current = await tx.current("Patient", ids[1])
        await tx.put("Patient", ids[1], {**PATIENT, "name": [{"family": family}]}, "PUT",
                     current)

    await store.run(update)
    query = parse_search("Patient", [("family", family), ("_sort", "-given")],
                         INDEXER.params_for, strict=True)
    found = await store.search_resources(query, 10)
    keys = await store.search_keys(query, 10)
    assert [(s.resource_type, s.id) for s in found] == keys
    assert found == await store.read_many(keys)
    assert [s.version for s in found] == [1, 1, 2]  # g2, g0, then the one without given
    assert len(await store.search_resources(query, 2)) == 2


async def test_an_incomplete_snapshot_is_read_on_once_per_length(store: SqlStore) -> None:
    head = [("Patient", f"p{i}") for i in range(3)]
    await store.save_snapshot(Snapshot("s-head", "|Patient?", head, -1, False, complete=False))
    loaded = await store.load_snapshot("s-head")
    assert loaded is not None and not loaded.complete and loaded.keys == head
    assert loaded.held == 3
    assert await store.extend_snapshot(loaded, [("Patient", "p3")], complete=False,
                                       truncated=False)
    # a second request that read on from the same length finds it moved on, and
    # the first's keys stay
    assert not await store.extend_snapshot(loaded, [("Patient", "other")], complete=True,
                                           truncated=False)
    longer = await store.load_snapshot("s-head")
    assert longer is not None and not longer.complete and longer.held == 4
    assert longer.keys == [*head, ("Patient", "p3")]
    assert await store.extend_snapshot(longer, [("Patient", "p4")], complete=True,
                                       truncated=True)
    done = await store.load_snapshot("s-head")
    assert done is not None and done.complete and done.truncated
    assert done.keys == [*head, ("Patient", "p3"), ("Patient", "p4")]
    # a complete one is not read on
    assert not await store.extend_snapshot(done, [("Patient", "p5")], complete=True,
                                           truncated=False)
    await store.save_snapshot(Snapshot("s-whole", "|Patient?", head, 3, False))
    kept = await store.load_snapshot("s-whole")
    assert kept is not None and kept.complete


async def test_a_long_snapshot_is_read_a_page_at_a_time(store: SqlStore) -> None:
    """Kept in parts: a page's keys are those at its positions, across the border of
    two parts too, after the set was read on from the middle of a part."""
    keys = [("Observation", f"o{i:05d}") for i in range(PART * 2 + 350)]
    await store.save_snapshot(Snapshot("s-long", "|Observation?", keys[:PART + 10], -1, False,
                                       complete=False))
    head = await store.load_snapshot("s-long", PART - 5, PART + 5)
    assert head is not None and head.keys == keys[PART - 5 : PART + 5]
    assert head.start == PART - 5 and head.held == PART + 10
    whole = await store.load_snapshot("s-long")
    assert whole is not None
    assert await store.extend_snapshot(whole, keys[PART + 10:], complete=True, truncated=False)
    for start, stop in ((0, 20), (PART - 3, PART + 7), (PART + 5, PART + 15),
                        (2 * PART - 1, 2 * PART + 400), (2 * PART + 340, 2 * PART + 360),
                        (5 * PART, 5 * PART + 20)):
        page = await store.load_snapshot("s-long", start, stop)
        assert page is not None and page.keys == keys[start:stop], (start, stop)
        assert page.held == len(keys) and page.complete
    again = await store.load_snapshot("s-long")
    assert again is not None and again.keys == keys


async def test_a_snapshot_kept_whole_before_parts_reads_as_before(store: SqlStore) -> None:
    keys = [["Patient", f"p{i}"] for i in range(5)]
    async with store.db.transaction() as conn:
        await conn.execute(
            "INSERT INTO search_snapshot (search_id, created, query, total, truncated, ids,"
            " complete) VALUES (?, ?, ?, ?, ?, ?, ?)",
            ("s-old", now_micros(), "|Patient?", 5, 0, orjson.dumps(keys), 1))
    page = await store.load_snapshot("s-old", 1, 3)
    assert page is not None and page.keys == [("Patient", "p1"), ("Patient", "p2")]
    assert page.held == 5 and page.start == 1
    # one kept incomplete so is not read on (it has no parts to append to)
    async with store.db.transaction() as conn:
        await conn.execute("UPDATE search_snapshot SET complete = 0 WHERE search_id = ?",
                           ("s-old",))
    whole = await store.load_snapshot("s-old")
    assert whole is not None and not whole.complete
    assert not await store.extend_snapshot(whole, [("Patient", "p5")], complete=True,
                                           truncated=False)


async def test_expired_snapshots_are_dropped_with_their_parts(store: SqlStore) -> None:
    await store.save_snapshot(Snapshot("s-gone", "|Patient?", [("Patient", "a")] * 1500,
                                       -1, False))
    async with store.db.transaction() as conn:
        await conn.execute("UPDATE search_snapshot SET created = ? WHERE search_id = ?",
                           (now_micros() - KEPT_MICROS - 1, "s-gone"))
    await store.save_snapshot(Snapshot("s-new", "|Patient?", [("Patient", "b")], -1, False))
    assert await store.load_snapshot("s-gone") is None
    assert await store.load_snapshot("s-new") is not None
    async with store.db.read() as conn:
        left = await conn.fetch(
            "SELECT part FROM search_snapshot_part WHERE search_id = ?", ("s-gone",))
    assert left == []


async def test_a_search_can_keep_to_what_was_created_by_a_version(store: SqlStore) -> None:
    """``created_by``: resources created up to that stored version, updated since or
    not; not those created after it (a long result read on later)."""
    family = f"Bound{uuid.uuid4().hex[:8]}"

    async def make(tx: StoreTransaction, rid: str) -> None:
        await tx.put("Patient", rid, {**PATIENT, "name": [{"family": family}]}, "POST", None)

    before = [str(uuid.uuid4()) for _ in range(2)]
    for rid in before:
        await store.run(lambda tx, rid=rid: make(tx, rid))
    bound = await store.last_version()
    after = str(uuid.uuid4())
    await store.run(lambda tx: make(tx, after))

    async def update(tx: StoreTransaction) -> None:  # an old one changes after the bound
        current = await tx.current("Patient", before[0])
        await tx.put("Patient", before[0], {**PATIENT, "name": [{"family": family}],
                                            "active": False}, "PUT", current)

    await store.run(update)
    assert await store.last_version() > bound
    query = parse_search("Patient", [("family", family)], INDEXER.params_for, strict=True)
    assert {k[1] for k in await store.search_keys(query, 10)} == {*before, after}
    kept = replace(query, created_by=bound)
    assert [k[1] for k in await store.search_keys(kept, 10)] == before
    assert await store.count(kept) == 2
