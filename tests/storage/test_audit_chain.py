"""The audit chain: records are appended without a lock and linked after commit, in an
order no later commit can slip into; an upgraded database keeps its old links."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.storage import security as tables
from gateway.storage.db import Database
from gateway.storage.migrate import migrate
from gateway.storage.schema import MIGRATIONS, statements
from tests.conftest import backend_database


def record(n: int) -> tables.AuditRecord:
    return tables.AuditRecord(b'{"n":%d}' % n, "client", None, "0")


@pytest.fixture(params=["sqlite", "postgresql"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    async with backend_database(request.param, tmp_path, pool_size=4) as database:
        await database.open()
        try:
            yield database
        finally:
            await database.close()


async def append(db: Database, *ns: int) -> None:
    async with db.transaction() as conn:
        await tables.append_audit(conn, [record(n) for n in ns])


async def chained_records(db: Database) -> list[bytes]:
    async with db.read() as conn:
        rows = await conn.fetch("SELECT a.record FROM audit_chain c JOIN audit_log a"
                                " ON a.seq = c.seq ORDER BY c.pos")
    return [bytes(r[0]) for r in rows]


async def test_records_are_linked_after_commit_and_verify(db: Database) -> None:
    await migrate(db)
    await append(db, 1)
    await append(db, 2, 3)
    assert await tables.chain_all(db) == 3
    assert await tables.chain_all(db) == 0  # nothing is linked twice
    report = await tables.verify_chain(db)
    assert report == tables.ChainReport(3, None)
    assert await chained_records(db) == [record(n).record for n in (1, 2, 3)]


async def test_a_record_committed_late_is_linked_after_the_ones_before_it(db: Database) -> None:
    """A transaction that drew its seq first but commits last is not skipped."""
    await migrate(db)
    if db.dialect != "postgresql":
        return  # one SQLite writer at a time: commit order is seq order
    entered, gate = asyncio.Event(), asyncio.Event()

    async def slow() -> None:
        async with db.transaction() as conn:
            await tables.append_audit(conn, [record(1)])
            entered.set()
            await gate.wait()

    task = asyncio.create_task(slow())
    await entered.wait()
    await append(db, 2)  # a later seq, committed first
    await tables.chain_pending(db, precise=True)
    assert await chained_records(db) == []  # held back behind the open transaction
    assert await tables.verify_chain(db) == tables.ChainReport(0, None, pending=1)
    gate.set()
    await task
    await tables.chain_all(db)
    assert await chained_records(db) == [record(1).record, record(2).record]
    assert (await tables.verify_chain(db)).broken_at is None


async def test_tampering_after_linking_is_found(db: Database) -> None:
    await migrate(db)
    await append(db, 1, 2, 3)
    await tables.chain_all(db)
    async with db.read() as conn:
        seqs = [int(r[0]) for r in await conn.fetch("SELECT seq FROM audit_log ORDER BY seq")]
    async with db.transaction() as conn:
        await conn.execute("DELETE FROM audit_log WHERE seq = ?", (seqs[1],))
    report = await tables.verify_chain(db)
    assert report.broken_at == seqs[1] and report.reason == "record is missing"


async def test_concurrent_appenders_and_chainers_make_one_intact_chain(db: Database) -> None:
    await migrate(db)

    async def appender(k: int) -> None:
        for i in range(20):
            await append(db, k * 100 + i)

    async def chainer(stop: asyncio.Event) -> None:
        while not stop.is_set():
            await tables.chain_pending(db)
            await asyncio.sleep(0.001)

    stop = asyncio.Event()
    chainers = [asyncio.create_task(chainer(stop)) for _ in range(2)]
    await asyncio.gather(*(appender(k) for k in range(4)))
    stop.set()
    await asyncio.gather(*chainers)
    report = await tables.verify_chain(db)
    assert report.records == 80 and report.broken_at is None and report.pending == 0
    assert sorted(await chained_records(db)) == sorted(
        record(k * 100 + i).record for k in range(4) for i in range(20))


async def test_an_upgraded_database_keeps_its_chain(db: Database) -> None:
    """Records chained in place before version 11 move to audit_chain unchanged."""
    async with db.transaction() as conn:
        await conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY,"
                           " description TEXT NOT NULL, applied_at BIGINT NOT NULL)")
        for version, description, ddl in MIGRATIONS:
            if version >= 11:
                continue
            for stmt in statements(ddl, db.dialect):
                await conn.execute(stmt)
            await conn.execute("INSERT INTO schema_version VALUES (?, ?, 0)",
                               (version, description))
        prev = tables.GENESIS
        for n in range(3):
            body = record(n).record
            digest = tables.chain_hash(prev, body)
            await conn.execute(
                "INSERT INTO audit_log (recorded, prev_hash, hash, client_id, patient, outcome,"
                " record) VALUES (0, ?, ?, NULL, NULL, '0', ?)", (prev, digest, body))
            prev = digest
    assert 11 in await migrate(db)
    await append(db, 3)
    report = await tables.verify_chain(db)
    assert report.records == 4 and report.broken_at is None
    assert await chained_records(db) == [record(n).record for n in range(4)]


@pytest.mark.parametrize("durable", [True, False])
async def test_the_grouped_writer_commits_every_record(db: Database, durable: bool) -> None:
    """Reads' records: grouped, committed (with or without waiting for the WAL flush)."""
    from gateway.security.audit import AuditWriter

    await migrate(db)
    writer = AuditWriter(db, durable=durable)
    await writer.start()
    try:
        await asyncio.gather(*(writer.write([record(n)]) for n in range(50)))
    finally:
        await writer.stop()
    async with db.read() as conn:
        rows = await conn.fetch("SELECT record FROM audit_log ORDER BY seq")
    assert sorted(bytes(r[0]) for r in rows) == sorted(record(n).record for n in range(50))


async def test_a_batch_that_skips_the_flush_wait_leaves_the_connection_as_it_was(
    tmp_path: Path,
) -> None:
    """``synchronous_commit`` is off for that batch's own transaction only."""
    async with backend_database("postgresql", tmp_path, pool_size=1) as db:
        await db.open()
        try:
            await migrate(db)
            await tables.append_audit_alone(db, [record(1), record(2)], durable=False)
            async with db.read() as conn:  # the pool's one connection again
                setting = await conn.fetchrow("SHOW synchronous_commit")
                rows = await conn.fetch("SELECT record FROM audit_log ORDER BY seq")
            assert setting == ("on",)
            assert [bytes(r[0]) for r in rows] == [record(1).record, record(2).record]
        finally:
            await db.close()
