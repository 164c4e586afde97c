"""Batched writes: the puts of one store transaction go out together, before
anything else touches the database and before COMMIT: on PostgreSQL as one
statement, on SQLite as one call to the database's thread (BEGIN and COMMIT in
the same call when nothing went before).

Every behaviour below holds on both backends; the statement counts are
PostgreSQL's, the calls SQLite's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from gateway.fhir.indexer import Indexer
from gateway.fhir.search import parse_search
from gateway.storage.db import Connection, Database, RetryableError, Row
from gateway.storage.interface import StoredResource, StoreTransaction
from gateway.storage.schema import INDEX_TABLES
from gateway.storage.security import AuditRecord
from gateway.storage.sql import SqlStore
from tests.conftest import BACKENDS, sql_store, unique

INDEXER = Indexer.from_profiles()
#: what a PostgreSQL put statement is: one resource, several, each perhaps with audit records
ONE, MANY = "one", "many"
ONE_AUDIT = "one+audit"


def put_kind(sql: str) -> str | None:
    if sql.startswith("WITH h AS (INSERT INTO resource_history"):
        kind = ONE
    elif sql.startswith("WITH p AS (SELECT * FROM unnest("):
        kind = MANY
    else:
        return None
    return kind + "+audit" if "INSERT INTO audit_log" in sql else kind


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqlStore]:
    async with sql_store(request.param, tmp_path, INDEXER) as s:
        yield s


@pytest.fixture
async def pg_store(tmp_path: Path) -> AsyncIterator[SqlStore]:
    async with sql_store("postgresql", tmp_path, INDEXER) as s:
        yield s


class SpyConnection:
    """Records the statements of a transaction; ``fail`` may raise instead of one."""

    def __init__(self, conn: Connection, spy: SpyDatabase) -> None:
        self._conn = conn
        self._spy = spy
        self.dialect = conn.dialect

    def _note(self, sql: str, params: Sequence[Any]) -> None:
        self._spy.statements.append((sql, list(params)))
        if self._spy.fail is not None and self._spy.fail(sql):
            self._spy.fail = None
            raise RetryableError("simulated serialization failure")

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self._note(sql, params)
        await self._conn.execute(sql, params)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._note(sql, ())
        await self._conn.executemany(sql, rows)

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        self._note(sql, params)
        return await self._conn.fetch(sql, params)

    async def fetchrow(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        self._note(sql, params)
        return await self._conn.fetchrow(sql, params)

    async def lock(self, *keys: str) -> None:
        self._note("lock", keys)
        await self._conn.lock(*keys)

    async def batch(self, steps: Sequence[tuple[str, Any, bool]], *, last: bool = False) -> None:
        # SQLite only: the pending writes in one call
        for sql, params, many in steps:
            self._note(sql, () if many else params)
        conn: Any = self._conn  # a SQLite transaction
        self._spy.batches.append((len(steps), not conn.begun, last))
        await conn.batch(steps, last=last)

    async def execute_last(self, sql: str, params: Sequence[Any] = ()) -> None:
        # PostgreSQL only: the final statement, sent alone when nothing preceded it
        self._note(sql, params)
        conn: Any = self._conn  # a PostgreSQL transaction
        self._spy.alone.append(not conn.begun)
        await conn.execute_last(sql, params)


class SpyDatabase:
    def __init__(self, db: Database) -> None:
        self._db = db
        self.dialect = db.dialect
        self.statements: list[tuple[str, list[Any]]] = []
        self.fail: Any = None  # (sql) -> bool: raise RetryableError once, at that statement
        #: per final statement: whether it went alone (no BEGIN/COMMIT around it)
        self.alone: list[bool] = []
        #: per SQLite batch: its statements, whether it began the transaction, whether
        #: it committed it
        self.batches: list[tuple[int, bool, bool]] = []

    async def open(self) -> None: ...
    async def close(self) -> None: ...

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SpyConnection]:
        async with self._db.transaction() as conn:
            yield SpyConnection(conn, self)

    def read(self) -> Any:
        return self._db.read()

    def puts(self) -> list[tuple[str, list[Any]]]:
        return [s for s in self.statements if put_kind(s[0])]


def spied(store: SqlStore) -> tuple[SqlStore, SpyDatabase]:
    spy = SpyDatabase(store.db)
    return SqlStore(spy, INDEXER), spy


def patient(family: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "name": [{"family": family}],
            "identifier": [{"system": "urn:batch", "value": family}]}


async def family_ids(store: SqlStore, family: str) -> set[str]:
    q = parse_search("Patient", [("family", family)], INDEXER.params_for)
    return {rid for _, rid in await store.search_keys(q, 100)}


async def fetch(store: SqlStore, sql: str, params: Sequence[Any]) -> list[Row]:
    async with store.db.read() as conn:
        return await conn.fetch(sql, params)


async def test_reads_in_the_transaction_see_earlier_puts(store: SqlStore) -> None:
    ids = [unique("p") for _ in range(3)]
    family = unique("F")

    async def work(tx: StoreTransaction) -> tuple[StoredResource | None, list[Any]]:
        for i, rid in enumerate(ids):
            await tx.put("Patient", rid, patient(f"{family}{i}"), "POST", None)
        seen = await tx.current("Patient", ids[1])
        q = parse_search("Patient", [("family", f"{family}2")], INDEXER.params_for)
        return seen, await tx.search_keys(q, 10)

    seen, found = await store.run(work)
    assert seen is not None and seen.version == 1 and not seen.deleted
    assert seen.content is not None and f"{family}1".encode() in seen.content
    assert found == [("Patient", ids[2])]
    for rid in ids:
        stored = await store.read("Patient", rid)
        assert stored is not None and stored.version == 1


async def test_outbox_and_history_follow_put_order(store: SqlStore) -> None:
    old = unique("old")

    async def first(tx: StoreTransaction) -> None:
        await tx.put("Patient", old, patient(unique("F")), "POST", None)

    await store.run(first)
    gone, a, b, c = unique("gone"), unique("a"), unique("b"), unique("c")

    async def seed(tx: StoreTransaction) -> None:
        await tx.put("Patient", gone, patient(unique("F")), "POST", None)

    await store.run(seed)
    order = [(a, 1), (old, 2), (b, 1), (gone, 2), (c, 1)]

    async def work(tx: StoreTransaction) -> None:
        current_old = await tx.current("Patient", old)
        current_gone = await tx.current("Patient", gone)
        assert current_gone is not None
        await tx.put("Patient", a, patient(unique("F")), "POST", None)
        await tx.put("Patient", old, patient(unique("F")), "PUT", current_old)
        await tx.put("Observation", b, {"resourceType": "Observation", "status": "final",
                                        "code": {"text": "x"}}, "POST", None)
        await tx.delete(current_gone)
        await tx.put("Patient", c, patient(unique("F")), "POST", None)

    await store.run(work)
    keys = [k for k, _ in order]
    marks = ", ".join("?" for _ in keys)
    events = await fetch(store, "SELECT res_id, version, interaction, history_seq, seq FROM outbox"
                         f" WHERE res_id IN ({marks}) AND NOT (res_id IN (?, ?) AND version = 1)"
                         " ORDER BY seq", [*keys, old, gone])
    assert [(e[0], e[1]) for e in events] == order
    assert [e[2] for e in events] == ["create", "update", "create", "delete", "create"]
    history = {(r[0], r[1]): r[2] for r in await fetch(
        store, f"SELECT res_id, version, seq FROM resource_history WHERE res_id IN ({marks})",
        keys)}
    assert [e[3] for e in events] == [history[(rid, v)] for rid, v in order]
    assert [e[3] for e in events] == sorted(e[3] for e in events)
    created = {r[0]: r[1] for r in await fetch(
        store, f"SELECT res_id, created_seq FROM resource WHERE res_id IN ({marks})", keys)}
    assert created == {rid: history[(rid, 1)] for rid in keys}


async def test_update_in_a_batch_clears_only_the_old_index_rows(store: SqlStore) -> None:
    a, b, c, d = (unique(x) for x in "abcd")
    old_a, old_b, new, other = (unique(x) for x in ("Alt", "Bleibt", "Neu", "Andere"))

    async def seed(tx: StoreTransaction) -> None:
        await tx.put("Patient", a, patient(old_a), "POST", None)
        await tx.put("Patient", b, patient(old_b), "POST", None)

    await store.run(seed)

    final = {c: patient(new), a: patient(new), d: patient(other), b: patient(old_b)}

    async def work(tx: StoreTransaction) -> None:
        cur_a, cur_b = await tx.current("Patient", a), await tx.current("Patient", b)
        # d: created earlier in this transaction, its rows written by an earlier statement
        await tx.put("Patient", d, patient(unique("Zuvor")), "POST", None)
        cur_d = await tx.current("Patient", d)
        await tx.put("Patient", c, dict(final[c]), "POST", None)
        await tx.put("Patient", a, dict(final[a]), "PUT", cur_a)
        await tx.put("Patient", d, dict(final[d]), "PUT", cur_d)
        await tx.put("Patient", b, dict(final[b]), "PUT", cur_b)

    await store.run(work)
    assert await family_ids(store, old_a) == set()
    assert await family_ids(store, "Zuvor") == set()
    assert await family_ids(store, new) == {a, c}
    assert await family_ids(store, other) == {d}
    assert await family_ids(store, old_b) == {b}
    for rid, body in final.items():
        stored = await store.read("Patient", rid)
        assert stored is not None
        expected = {t: len(r) for t, r in INDEXER.extract(
            {**body, "id": rid, "meta": {"versionId": str(stored.version)}}).items() if r}
        found = {}
        for table in INDEX_TABLES:
            n = int((await fetch(store, f"SELECT count(*) FROM {table} WHERE res_id = ?",
                                 [rid]))[0][0])
            if n:
                found[table] = n
        assert found == expected, rid


async def test_failure_at_flush_rolls_back_everything(store: SqlStore) -> None:
    taken, p1, p2 = unique("taken"), unique("p1"), unique("p2")

    async def seed(tx: StoreTransaction) -> None:
        await tx.put("Patient", taken, patient("Erst"), "POST", None)

    await store.run(seed)
    reached_end = False

    async def work(tx: StoreTransaction) -> None:
        nonlocal reached_end
        await tx.put("Patient", p1, patient(unique("F")), "POST", None)
        await tx.put("Patient", p2, patient(unique("F")), "POST", None)
        # version 1 again: resource_history's unique key refuses it
        await tx.put("Patient", taken, patient("Zweit"), "POST", None)
        reached_end = True

    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        await store.run(work)
    assert reached_end  # the puts fail when they go out together
    for rid in (p1, p2):
        assert await store.read("Patient", rid) is None
        assert await fetch(store, "SELECT seq FROM outbox WHERE res_id = ?", [rid]) == []
        assert await fetch(store, "SELECT 1 FROM sp_string WHERE res_id = ?", [rid]) == []
    kept = await store.read("Patient", taken)
    assert kept is not None and kept.version == 1 and b"Erst" in (kept.content or b"")
    assert await family_ids(store, "Zweit") == set()


async def test_lost_race_at_flush_retries_with_a_fresh_batch(store: SqlStore) -> None:
    spied_store, spy = spied(store)
    # lost at the flush
    spy.fail = lambda sql: put_kind(sql) == MANY or sql.startswith("INSERT INTO outbox")
    ids = [unique("r") for _ in range(3)]
    attempts = 0

    async def work(tx: StoreTransaction) -> None:
        nonlocal attempts
        attempts += 1
        for rid in ids:
            await tx.put("Patient", rid, patient(unique("F")), "POST", None)

    await spied_store.run(work)
    assert attempts == 2
    if store.dialect == "postgresql":
        assert [len(params[1]) for _, params in spy.puts()] == [3, 3]
    for rid in ids:
        stored = await store.read("Patient", rid)
        assert stored is not None and stored.version == 1
        assert len(await fetch(store, "SELECT seq FROM outbox WHERE res_id = ?", [rid])) == 1


async def test_one_statement_per_batch_on_postgresql(pg_store: SqlStore) -> None:
    store = pg_store
    spied_store, spy = spied(store)
    ids = [unique("s") for _ in range(5)]

    async def bundle(tx: StoreTransaction) -> None:
        for rid in ids:
            await tx.put("Patient", rid, patient(unique("F")), "POST", None)

    await spied_store.run(bundle)
    # nothing read: the writes are the transaction's only statement, without BEGIN/COMMIT
    assert [put_kind(sql) for sql, _ in spy.statements] == [MANY]
    # all new: plain inserts of the current rows, no speculative upsert
    assert "ON CONFLICT (res_type, res_id) DO UPDATE" not in spy.statements[0][0]
    for rid in ids:
        assert await store.read("Patient", rid) is not None
    assert spy.alone == [True]
    spy.statements.clear()
    single = unique("s")

    async def create(tx: StoreTransaction) -> None:
        await tx.put("Patient", single, patient(unique("F")), "POST", None)
        await tx.append_audit([AuditRecord(b"{}", None, None, "0")])

    await spied_store.run(create)
    assert [put_kind(sql) for sql, _ in spy.statements] == [ONE_AUDIT]  # the audit record too
    assert spy.alone == [True, True]
    assert len(await fetch(store, "SELECT seq FROM audit_log WHERE record = ?", [b"{}"])) >= 1
    spy.statements.clear()

    async def read_then_write(tx: StoreTransaction) -> None:
        current = await tx.current("Patient", single)
        await tx.put("Patient", single, patient(unique("F")), "PUT", current)
        await tx.append_audit([AuditRecord(b"{}", None, None, "0")])

    await spied_store.run(read_then_write)
    assert [put_kind(sql) for sql, _ in spy.puts()] == [ONE_AUDIT]
    assert spy.alone == [True, True, False]  # within BEGIN ... COMMIT
    stored = await store.read("Patient", single)
    assert stored is not None and stored.version == 2
    spy.statements.clear()

    async def twice(tx: StoreTransaction) -> None:
        # the same resource twice without a read between: two statements
        first = await tx.put("Patient", single, patient(unique("F")), "PUT",
                             await tx.current("Patient", single))
        await tx.put("Patient", single, patient(unique("F")), "PUT", first)

    await spied_store.run(twice)
    assert [put_kind(sql) for sql, _ in spy.puts()] == [ONE, ONE]
    stored = await store.read("Patient", single)
    assert stored is not None and stored.version == 4
    spy.statements.clear()

    async def mixed(tx: StoreTransaction) -> None:
        # an update among new resources: the current rows are upserted
        await tx.put("Patient", single, patient(unique("F")), "PUT",
                     await tx.current("Patient", single))
        await tx.put("Patient", unique("s"), patient(unique("F")), "POST", None)

    await spied_store.run(mixed)
    (sql, _), = spy.puts()
    assert put_kind(sql) == MANY and "ON CONFLICT (res_type, res_id) DO UPDATE" in sql
    stored = await store.read("Patient", single)
    assert stored is not None and stored.version == 5


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqlStore]:
    async with sql_store("sqlite", tmp_path, INDEXER) as s:
        yield s


async def test_one_call_per_batch_on_sqlite(sqlite_store: SqlStore) -> None:
    """Each call's answer waits for the event loop to take it up while SQLite's one
    write lock is held: a write is one call, begun and committed in it."""
    store = sqlite_store
    spied_store, spy = spied(store)
    ids = [unique("s") for _ in range(3)]

    async def create(tx: StoreTransaction) -> None:
        for rid in ids:
            await tx.put("Patient", rid, patient(unique("F")), "POST", None)
        await tx.append_audit([AuditRecord(b"{}", None, None, "0")])

    await spied_store.run(create)
    assert [b[1:] for b in spy.batches] == [(True, True)]  # BEGIN ... COMMIT in one call
    assert len(spy.statements) == spy.batches[0][0]  # and nothing else
    assert sum(s.startswith("INSERT INTO resource_history") for s, _ in spy.statements) == 3
    assert spy.statements[-1][0].startswith("INSERT INTO audit_log")
    for rid in ids:
        stored = await store.read("Patient", rid)
        assert stored is not None and stored.version == 1
        (seq,), = await fetch(store, "SELECT created_seq FROM resource WHERE res_id = ?", [rid])
        assert await fetch(store, "SELECT history_seq FROM outbox WHERE res_id = ?",
                           [rid]) == [(seq,)]
        assert await fetch(store, "SELECT version FROM resource_history WHERE seq = ?",
                           [seq]) == [(1,)]
    spy.batches.clear()

    async def read_then_write(tx: StoreTransaction) -> None:
        current = await tx.current("Patient", ids[0])
        await tx.put("Patient", ids[0], patient("Zweit"), "PUT", current)

    await spied_store.run(read_then_write)
    assert [b[1:] for b in spy.batches] == [(False, True)]  # begun by the read
    stored = await store.read("Patient", ids[0])
    assert stored is not None and stored.version == 2
    assert await family_ids(store, "Zweit") == {ids[0]}
    (created,), = await fetch(store, "SELECT created_seq FROM resource WHERE res_id = ?",
                              [ids[0]])
    assert await fetch(store, "SELECT version FROM resource_history WHERE seq = ?",
                       [created]) == [(1,)]  # still the first version's


async def test_an_update_clears_tables_the_new_version_has_no_rows_in(store: SqlStore) -> None:
    """Only tables with rows get an insert; an update still clears every table."""
    rid, other = unique("c"), unique("c")

    async def write(rid: str, resource: dict[str, Any]) -> None:
        async def work(tx: StoreTransaction) -> None:
            await tx.put("Patient", rid, resource, "PUT", await tx.current("Patient", rid))

        await store.run(work)

    full = {"resourceType": "Patient", "birthDate": "1970-01-01", "gender": "female",
            "identifier": [{"system": "urn:x", "value": rid}], "name": [{"family": "Alt"}]}
    await write(rid, full)
    await write(other, full)
    await write(rid, {"resourceType": "Patient", "name": [{"family": "Neu"}]})
    assert await fetch(store, "SELECT 1 FROM sp_date WHERE res_id = ?", [rid]) == []
    assert await fetch(store, "SELECT 1 FROM sp_date WHERE res_id = ?", [other]) != []
    tokens = "SELECT param FROM sp_token WHERE res_id = ? ORDER BY param"
    assert [r[0] for r in await fetch(store, tokens, [rid])] == ["deceased"]
    assert [r[0] for r in await fetch(store, tokens, [other])] == [
        "deceased", "gender", "identifier"]
    names = await fetch(store, "SELECT value FROM sp_string WHERE res_id = ? AND param = ?",
                        [rid, "family"])
    assert [r[0] for r in names] == ["neu"]


async def test_a_deletion_goes_out_at_once(store: SqlStore) -> None:
    """History version, current row, every index row and the event: one statement on
    PostgreSQL, one call on SQLite."""
    rid = unique("d")

    async def create(tx: StoreTransaction) -> None:
        await tx.put("Patient", rid, patient(unique("F")), "POST", None)

    await store.run(create)
    spied_store, spy = spied(store)

    async def delete(tx: StoreTransaction) -> None:
        current = await tx.current("Patient", rid)
        assert current is not None
        await tx.delete(current)

    await spied_store.run(delete)
    writes = [sql for sql, _ in spy.statements if not sql.startswith("SELECT")]
    if store.dialect == "postgresql":
        assert len(writes) == 1 and writes[0].startswith("WITH h AS (INSERT INTO")
    else:
        assert [b[1:] for b in spy.batches] == [(False, False)]  # begun by the read
    stored = await store.read("Patient", rid)
    assert stored is not None and stored.deleted and stored.version == 2
    for table in INDEX_TABLES:
        assert await fetch(store, f"SELECT 1 FROM {table} WHERE res_id = ?", [rid]) == []
    (seq,), = await fetch(store, "SELECT seq FROM resource_history WHERE res_id = ?"
                          " AND version = 2 AND method = 'DELETE' AND content IS NULL", [rid])
    assert await fetch(store, "SELECT interaction, version FROM outbox WHERE history_seq = ?",
                       [seq]) == [("delete", 2)]
    assert await fetch(store, "SELECT version, deleted FROM resource WHERE res_id = ?",
                       [rid]) == [(2, 1)]


async def test_a_large_transaction_goes_out_in_parts_and_still_as_one(
        store: SqlStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """At most ``MAX_PENDING`` writes wait in memory (a 5,600-entry Bundle's rows held
    all at once cost a worker 22 MB more at its peak): the rest go out in parts, and a
    failure in a later part still undoes the earlier ones."""
    from gateway.storage import sql

    monkeypatch.setattr(sql, "MAX_PENDING", 4)
    spied_store, spy = spied(store)
    taken = unique("taken")

    async def seed(tx: StoreTransaction) -> None:
        await tx.put("Patient", taken, patient("Erst"), "POST", None)

    await store.run(seed)
    ids = [unique("part") for _ in range(10)]

    async def work(tx: StoreTransaction) -> None:
        for rid in ids:
            await tx.put("Patient", rid, patient(unique("F")), "POST", None)
        await tx.put("Patient", taken, patient("Zweit"), "POST", None)  # refused at the end

    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        await spied_store.run(work)
    # parts of 4, 4 and 3: as many statements on PostgreSQL, calls on SQLite
    parts = len(spy.batches) if store.db.dialect != "postgresql" else sum(
        put_kind(s) is not None for s, _ in spy.statements)
    assert parts == 3
    for rid in ids:
        assert await store.read("Patient", rid) is None
    kept = await store.read("Patient", taken)
    assert kept is not None and kept.version == 1
