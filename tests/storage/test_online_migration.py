"""Upgrading a PostgreSQL schema in use: an index is built while writes go on, an index
left half-built is built again, processes starting at once apply each step once, and
the server's statement timeout does not cut a long build off."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from gateway.storage.db import PostgresDatabase
from gateway.storage.migrate import migrate
from gateway.storage.schema import MIGRATIONS
from tests.conftest import PG_URL, backend_database

LATEST = max(m[0] for m in MIGRATIONS)


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[PostgresDatabase]:
    async with backend_database("postgresql", tmp_path, pool_size=4) as database:
        assert isinstance(database, PostgresDatabase)
        await database.open()
        try:
            yield database
        finally:
            await database.close()


async def at_version_29(db: PostgresDatabase, versions: int = 0) -> None:
    """The schema as version 29 left it (no ``history_updated``), with ``versions``
    rows of history."""
    assert LATEST == 30, "name the index the latest step builds"
    await migrate(db)
    async with db.transaction() as conn:
        await conn.execute("DROP INDEX history_updated")
        await conn.execute("DELETE FROM schema_version WHERE version = 30")
        await conn.execute(
            "INSERT INTO resource_history (res_type, res_id, version, last_updated, method)"
            " SELECT 'Patient', 'p' || g, 1, g, 'create' FROM generate_series(1, ?::int) g",
            (versions,))


async def write_version(conn: object, res_id: str) -> None:
    await conn.execute(  # type: ignore[attr-defined]
        "INSERT INTO resource_history (res_type, res_id, version, last_updated, method)"
        " VALUES ('Patient', ?, 1, 0, 'create')", (res_id,))


async def index_state(db: PostgresDatabase, name: str) -> tuple[bool, str] | None:
    async with db.read() as conn:
        row = await conn.fetchrow(
            "SELECT i.indisvalid, pg_get_indexdef(i.indexrelid) FROM pg_index i"
            " JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = ?"
            " AND c.relnamespace = (SELECT oid FROM pg_namespace"
            " WHERE nspname = current_schema())", (name,))
    return None if row is None else (bool(row[0]), str(row[1]))


async def versions(db: PostgresDatabase) -> list[int]:
    async with db.read() as conn:
        return [r[0] for r in await conn.fetch("SELECT version FROM schema_version ORDER BY 1")]


async def waiting_build(schema: str) -> None:
    """Until a backend building ``history_updated`` waits for a lock."""
    conn = await asyncpg.connect(PG_URL)
    try:
        for _ in range(200):
            if await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query ILIKE 'CREATE INDEX%history_updated%'"):
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the index build never waited")
    finally:
        await conn.close()


async def test_writes_go_on_while_an_index_is_built(db: PostgresDatabase) -> None:
    """A plain ``CREATE INDEX`` behind an open write would hold off every later write
    to the table until both ended; built concurrently, it holds off none."""
    await at_version_29(db, 100)
    open_write, release = asyncio.Event(), asyncio.Event()

    async def long_write() -> None:
        async with db.transaction() as conn:
            await write_version(conn, "long")
            open_write.set()
            await release.wait()

    writer = asyncio.create_task(long_write())
    await open_write.wait()
    upgrade = asyncio.create_task(migrate(db))
    await waiting_build(db.schema or "")

    async def another_write() -> None:
        async with db.transaction() as conn:
            await write_version(conn, "short")

    try:
        await asyncio.wait_for(another_write(), timeout=5)
    finally:
        release.set()
        await writer
    assert await upgrade == [30]
    state = await index_state(db, "history_updated")
    assert state is not None and state[0]
    assert await versions(db) == sorted(m[0] for m in MIGRATIONS)


async def test_an_index_left_invalid_is_built_again(db: PostgresDatabase) -> None:
    """A concurrent build that failed (here: a unique index over duplicates) leaves an
    invalid index of that name behind, which ``IF NOT EXISTS`` alone would keep."""
    await at_version_29(db, 10)
    async with db.maintenance() as conn:
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute("CREATE UNIQUE INDEX CONCURRENTLY history_updated"
                               " ON resource_history (res_type)")
    assert await index_state(db, "history_updated") == (
        False, f"CREATE UNIQUE INDEX history_updated ON {db.schema}.resource_history"
               " USING btree (res_type)")
    assert await migrate(db) == [30]
    assert await index_state(db, "history_updated") == (
        True, f"CREATE INDEX history_updated ON {db.schema}.resource_history"
              " USING btree (last_updated, seq)")


@pytest.mark.parametrize("start", ["new", "upgrade"])
async def test_processes_starting_at_once_apply_each_step_once(
    db: PostgresDatabase, start: str,
) -> None:
    if start == "upgrade":
        await at_version_29(db, 1000)
    others = [PostgresDatabase(PG_URL, pool_size=1, schema=db.schema) for _ in range(3)]
    for other in others:
        await other.open()
    try:
        # a waiting process that held a snapshot would deadlock with the build
        results = await asyncio.wait_for(
            asyncio.gather(migrate(db), *(migrate(o) for o in others)), timeout=60)
    finally:
        for other in others:
            await other.close()
    expected = [30] if start == "upgrade" else sorted(m[0] for m in MIGRATIONS)
    assert sorted(results, key=len) == [[], [], [], expected]
    assert await versions(db) == sorted(m[0] for m in MIGRATIONS)
    state = await index_state(db, "history_updated")
    assert state is not None and state[0]


async def test_the_statement_timeout_does_not_cut_a_build_off(tmp_path: Path) -> None:
    """The server's databases have a statement timeout; a worker that finds a step
    pending builds it without one, and its connection keeps the timeout after."""
    async with backend_database("postgresql", tmp_path, pool_size=1) as plain:
        await plain.open()
        try:
            assert isinstance(plain, PostgresDatabase)
            await at_version_29(plain, 200_000)
        finally:
            await plain.close()
        timed = PostgresDatabase(PG_URL, pool_size=1, schema=plain.schema,
                                 statement_timeout_ms=1)
        await timed.open()
        try:
            assert await migrate(timed) == [30]
            async with timed.read() as conn:  # the pool's one connection again
                assert await conn.fetchrow("SHOW statement_timeout") == ("1ms",)
        finally:
            await timed.close()
