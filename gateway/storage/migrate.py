"""Apply :data:`gateway.storage.schema.MIGRATIONS` once each, safely from many processes.

A new schema is made in one transaction. On PostgreSQL, an existing schema is
upgraded a step at a time, and a step that only creates or drops indexes runs
``CONCURRENTLY``, outside a transaction: a plain ``CREATE INDEX`` holds off every
write to its table until it is built (2.2 s for 3 million history versions,
``bench/RESULTS.md``), a concurrent one lets writes go on, as HAPI FHIR's
migrator builds indexes online. Every other step is a
transaction of its own. SQLite has one writer at a time anyway: there, every step
still runs in one transaction.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from contextlib import suppress

from gateway.storage.db import Connection, Database, PostgresDatabase
from gateway.storage.schema import MIGRATIONS, statements

log = logging.getLogger("carepath.storage")

LOCK_KEY = "carepath:migrations"
#: how often a process waiting for another's migrations asks again, in seconds
POLL_S = 0.2

_VERSION_TABLE = ("CREATE TABLE IF NOT EXISTS schema_version ("
                  "version INTEGER PRIMARY KEY, description TEXT NOT NULL,"
                  " applied_at BIGINT NOT NULL)")
_RECORD = "INSERT INTO schema_version (version, description, applied_at) VALUES (?, ?, ?)"
_INDEX_STEP = re.compile(r"(CREATE|DROP) INDEX IF (NOT )?EXISTS ", re.IGNORECASE)
_CREATED = re.compile(r"CREATE INDEX IF NOT EXISTS (\w+) ", re.IGNORECASE)


async def migrate(db: Database) -> list[int]:
    """Bring the schema up to date; return the versions applied by this call."""
    if isinstance(db, PostgresDatabase):
        return await _migrate_postgres(db)
    async with db.transaction() as conn:
        await conn.lock(LOCK_KEY)
        pending = await _pending(conn)
        await _apply(conn, pending, db.dialect)
    return [m[0] for m in pending]


class SchemaTooNew(RuntimeError):
    """The database's schema has versions this gateway does not know: a newer
    gateway upgraded it (one started now would write what the newer schema may no
    longer hold)."""


async def _pending(conn: Connection) -> list[tuple[int, str, str]]:
    await conn.execute(_VERSION_TABLE)
    done = {r[0] for r in await conn.fetch("SELECT version FROM schema_version")}
    known = {m[0] for m in MIGRATIONS}
    unknown = sorted(done - known)
    if unknown:
        raise SchemaTooNew(f"the database's schema is at version {unknown[-1]}, which this "
                           f"gateway (version {max(known)}) does not know: run the gateway "
                           "that upgraded it, or a newer one")
    return [m for m in sorted(MIGRATIONS) if m[0] not in done]


async def _apply(conn: Connection, steps: list[tuple[int, str, str]], dialect: str) -> None:
    for version, description, ddl in steps:
        for stmt in statements(ddl, dialect):
            await conn.execute(stmt)
        await _record(conn, version, description)


async def _record(conn: Connection, version: int, description: str) -> None:
    await conn.execute(_RECORD, (version, description, int(time.time() * 1_000_000)))


async def _migrate_postgres(db: PostgresDatabase) -> list[int]:
    async with db.maintenance() as conn:
        await _take_lock(conn)
        try:
            pending = await _pending(conn)
            if len(pending) == len(MIGRATIONS):  # a new schema
                await _in_transaction(conn, pending, db.dialect)
                return [m[0] for m in pending]
            for version, description, ddl in pending:
                steps = statements(ddl, db.dialect)
                if all(_INDEX_STEP.match(stmt) for stmt in steps):
                    for stmt in steps:
                        await _online(conn, stmt)
                    await _record(conn, version, description)
                else:
                    await _in_transaction(conn, [(version, description, ddl)], db.dialect)
            return [m[0] for m in pending]
        finally:
            # gone with the session if the connection broke
            with suppress(Exception):
                await conn.execute("SELECT pg_advisory_unlock(hashtextextended(?, 0))",
                                   (LOCK_KEY,))


async def _in_transaction(conn: Connection, steps: list[tuple[int, str, str]],
                          dialect: str) -> None:
    await conn.execute("BEGIN")
    try:
        await _apply(conn, steps, dialect)
    except BaseException:
        with suppress(Exception):
            await conn.execute("ROLLBACK")
        raise
    await conn.execute("COMMIT")


async def _take_lock(conn: Connection) -> None:
    """The migrations lock, for this connection's session. Asked for again and again,
    not waited for in a statement: a statement waiting holds a snapshot, and an index
    built concurrently by the process holding the lock would wait for that snapshot
    to end (a deadlock)."""
    waited = False
    while True:
        row = await conn.fetchrow("SELECT pg_try_advisory_lock(hashtextextended(?, 0))",
                                  (LOCK_KEY,))
        if row is not None and row[0]:
            return
        if not waited:
            log.info("waiting for another process to finish migrating the schema")
            waited = True
        await asyncio.sleep(POLL_S)


async def _online(conn: Connection, stmt: str) -> None:
    """``stmt`` (``CREATE``/``DROP INDEX IF [NOT] EXISTS``) run ``CONCURRENTLY``. An
    index left invalid by a concurrent build that did not finish (a crash, a
    cancelled start) has its name but no use: it is dropped and built again."""
    created = _CREATED.match(stmt)
    if created is not None:
        row = await conn.fetchrow(
            "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " WHERE c.relname = ? AND c.relnamespace ="
            " (SELECT oid FROM pg_namespace WHERE nspname = current_schema())",
            (created.group(1),))
        if row is not None and not row[0]:
            log.warning("index %s was left invalid by an earlier build: building it again",
                        created.group(1))
            await conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {created.group(1)}")
    await conn.execute(re.sub(r"^(CREATE|DROP) INDEX", r"\1 INDEX CONCURRENTLY", stmt,
                              count=1, flags=re.IGNORECASE))
