"""A database that cannot be used now answers GW-5002 (503, ``transient``), not a
fault: a PostgreSQL connection the server ended (a restart, a failover,
``pg_terminate_backend``), a server out of reach, a SQLite file on a full disk.
The next request after the cause is gone is served as usual."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from gateway.fhir.outcome import Code, FhirError
from gateway.storage.db import open_database
from tests.conftest import PG_URL, backend_database
from tests.tcp_proxy import TcpProxy


def _unavailable(exc: pytest.ExceptionInfo[FhirError]) -> None:
    assert exc.value.code is Code.UNAVAILABLE
    assert (exc.value.status, exc.value.outcome()["issue"][0]["code"]) == (503, "transient")


async def _terminate(pid: int) -> None:
    admin = await asyncpg.connect(PG_URL)
    try:
        await admin.execute("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()


@pytest.mark.parametrize("statement", ["read", "transaction"])
async def test_a_connection_the_server_ended(statement: str, tmp_path: Path) -> None:
    async with backend_database("postgresql", tmp_path) as db:
        await db.open()
        try:
            open_conn = db.read if statement == "read" else db.transaction
            with pytest.raises(FhirError) as exc:
                async with open_conn() as conn:
                    row = await conn.fetchrow("SELECT pg_backend_pid()")
                    assert row is not None
                    await _terminate(row[0])
                    await conn.fetchrow("SELECT 1")
            _unavailable(exc)
            for _ in range(3):  # the pool has let the ended connection go
                async with open_conn() as conn:
                    assert await conn.fetchrow("SELECT 1 + 1") == (2,)
        finally:
            await db.close()


async def test_a_server_out_of_reach() -> None:
    async with TcpProxy.of(PG_URL) as proxy:
        db = open_database(proxy.url(PG_URL), pool_size=2)
        await db.open()
        try:
            async with db.read() as conn:
                assert await conn.fetchrow("SELECT 1") == (1,)
            await proxy.stop()  # every connection cut, no new one accepted
            await asyncio.sleep(0.1)
            for open_conn in (db.read, db.transaction, db.read):
                with pytest.raises(FhirError) as exc:
                    async with open_conn() as conn:
                        await conn.fetchrow("SELECT 1")
                _unavailable(exc)
            await proxy.start()
            async with db.transaction() as conn:
                assert await conn.fetchrow("SELECT 1 + 1") == (2,)
        finally:
            await db.close()


async def test_a_full_disk(tmp_path: Path) -> None:
    async with backend_database("sqlite", tmp_path) as db:
        await db.open()
        try:
            async with db.transaction() as conn:
                await conn.execute("CREATE TABLE filler (data BLOB)")
                pages = await conn.fetchrow("PRAGMA page_count")
                assert pages is not None
                # the file may not grow: as if its disk were full
                await conn.execute(f"PRAGMA max_page_count = {pages[0] + 2}")
            with pytest.raises(FhirError) as exc:
                async with db.transaction() as conn:
                    await conn.execute("INSERT INTO filler VALUES (zeroblob(1000000))")
            _unavailable(exc)
            async with db.transaction() as conn:  # rolled back; room again
                await conn.execute("PRAGMA max_page_count = 1073741823")
                await conn.execute("INSERT INTO filler VALUES (zeroblob(1000000))")
            async with db.read() as conn:
                assert await conn.fetchrow("SELECT count(*) FROM filler") == (1,)
        finally:
            await db.close()


async def test_a_connection_ended_while_it_waited_in_the_pool() -> None:
    """The pool can hand out a connection whose end the server has sent but asyncpg
    has not read: the transaction's first statement (its ``BEGIN``) fails, and
    that is the database out of reach too, not a fault."""
    db = open_database(PG_URL, pool_size=1)
    await db.open()
    try:
        outcomes = []
        for _ in range(5):
            async with db.read() as conn:
                row = await conn.fetchrow("SELECT pg_backend_pid()")
                assert row is not None
            await _terminate(row[0])
            try:
                async with db.transaction() as conn:
                    await conn.fetchrow("SELECT 1")
                outcomes.append("served")
            except FhirError as exc:
                assert exc.code is Code.UNAVAILABLE, exc
                outcomes.append("unavailable")
        assert "unavailable" in outcomes, outcomes
        async with db.transaction() as conn:  # and the pool has let it go
            assert await conn.fetchrow("SELECT 1 + 1") == (2,)
    finally:
        await db.close()
