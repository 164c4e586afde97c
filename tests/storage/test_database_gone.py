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


async def test_a_connection_gone_before_the_transaction_s_first_statement() -> None:
    """The pool can hand out a connection whose end the server has sent but asyncpg
    has not yet read (under load, after ``pg_terminate_backend``): the transaction's
    first statement, its ``BEGIN``, finds it gone. That is the database out of reach
    too (503), not a fault, and the pool lets the connection go. (Its end is made
    here by closing it from this side, between the pool and the ``BEGIN``: the
    moment a server's end is read cannot be chosen.)"""
    db = open_database(PG_URL, pool_size=1)
    await db.open()
    try:
        with pytest.raises(FhirError) as exc:
            async with db.transaction() as tx:
                tx._conn.terminate()  # type: ignore[attr-defined]
                await tx.fetchrow("SELECT 1")
        _unavailable(exc)
        async with db.transaction() as tx:
            assert await tx.fetchrow("SELECT 1 + 1") == (2,)
    finally:
        await db.close()
