"""A statement that runs past ``CAREPATH_DB_STATEMENT_TIMEOUT_MS`` is cancelled in the
database and answers GW-5003 (503), on both backends; the connection stays usable."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from gateway.fhir.outcome import Code, FhirError
from gateway.settings import Settings
from tests.conftest import BACKENDS, backend_database

#: seconds of work for either database: PostgreSQL sleeps, SQLite counts
SLOW = {
    "postgresql": "SELECT pg_sleep(5)",
    "sqlite": "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n"
              " WHERE i < 500000000) SELECT count(*) FROM n",
}


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_statement_past_the_limit_is_cancelled(backend: str, tmp_path: Path) -> None:
    async with backend_database(backend, tmp_path, statement_timeout_ms=300) as db:
        await db.open()
        try:
            for open_conn in (db.read, db.transaction):
                began = time.monotonic()
                with pytest.raises(FhirError) as exc:
                    async with open_conn() as conn:
                        await conn.fetch(SLOW[backend])
                assert exc.value.code is Code.DATABASE_TIMEOUT
                assert (exc.value.status, exc.value.outcome()["issue"][0]["code"]) == (
                    503, "timeout")
                assert time.monotonic() - began < 3  # cancelled, not run to its end
                async with open_conn() as conn:  # the next statement runs as usual
                    assert await conn.fetchrow("SELECT 1 + 1") == (2,)
        finally:
            await db.close()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_no_limit_unless_set(backend: str, tmp_path: Path) -> None:
    # the CLI's maintenance (migrations, reindexing) opens the database so
    quick = {"postgresql": "SELECT pg_sleep(0.4)",
             "sqlite": SLOW["sqlite"].replace("500000000", "3000000")}
    async with backend_database(backend, tmp_path) as db:
        await db.open()
        try:
            async with db.read() as conn:
                await conn.fetch(quick[backend])
        finally:
            await db.close()
    assert Settings().db_statement_timeout_ms == 60_000  # the server's default


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_read_whose_task_is_cancelled_stops_in_the_database(
        backend: str, tmp_path: Path) -> None:
    """A search's task cancelled (its client left, gateway.api.app._Departure) stops
    its statement: PostgreSQL's is cancelled by asyncpg, SQLite's interrupted at the
    progress handler's next look, instead of running on for nobody. The connection
    then serves the next read as ever, its limit as before."""
    async with backend_database(backend, tmp_path, statement_timeout_ms=60_000) as db:
        await db.open()
        try:
            for _ in range(5):  # each of SQLite's four readers, and one again
                began = time.monotonic()

                async def search() -> None:
                    async with db.read() as conn:
                        await conn.fetch(SLOW[backend].replace("500000000", "5000000000"))

                task = asyncio.ensure_future(search())
                await asyncio.sleep(0.3)
                task.cancel()
                await asyncio.wait({task}, timeout=5)
                assert task.done(), "the statement ran on after its task was cancelled"
                assert task.cancelled()
                assert time.monotonic() - began < 3  # stopped, not run to its end
                async with db.read() as conn:
                    assert await conn.fetchrow("SELECT 1 + 1") == (2,)
                    assert await conn.fetch("SELECT 2 UNION ALL SELECT 3") == [(2,), (3,)]
        finally:
            await db.close()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_tasks_cancelled_at_any_step_leave_every_connection_usable(
        backend: str, tmp_path: Path) -> None:
    """A client that goes away cancels its request's task wherever it waits: while
    ``BEGIN`` or ``COMMIT`` is on its way too. The statement runs all the same on
    SQLite's thread; a ``BEGIN`` that took effect after the connection went back to
    the pool left it in a transaction, and every later read on it failed ("cannot
    start a transaction within a transaction": 500s until a restart)."""
    async with backend_database(backend, tmp_path, statement_timeout_ms=60_000) as db:
        await db.open()
        try:
            async with db.transaction() as tx:
                await tx.execute("CREATE TABLE IF NOT EXISTS cancelled_probe (n INTEGER)")

            async def read() -> None:
                async with db.read() as conn:
                    await conn.fetch("SELECT 1")

            async def write() -> None:
                async with db.transaction() as tx:
                    await tx.execute("INSERT INTO cancelled_probe (n) VALUES (?)", [1])

            for step in range(12):  # cancelled after 0, 1, 2, … turns of the loop
                for work in (read, write):
                    tasks = [asyncio.ensure_future(work()) for _ in range(6)]
                    for _ in range(step):
                        await asyncio.sleep(0)
                    for task in tasks:
                        task.cancel()
                    await asyncio.wait(tasks, timeout=10)
            for _ in range(8):  # every reader, and the writer, as before
                async with db.read() as conn:
                    assert await conn.fetchrow("SELECT 1 + 1") == (2,)
            async with db.transaction() as tx:
                await tx.execute("INSERT INTO cancelled_probe (n) VALUES (?)", [-1])
            async with db.read() as conn:
                assert (-1,) in await conn.fetch("SELECT n FROM cancelled_probe")
        finally:
            await db.close()
