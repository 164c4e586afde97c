"""Apply :data:`gateway.storage.schema.MIGRATIONS` once each, safely from many processes."""

from __future__ import annotations

import time

from gateway.storage.db import Database
from gateway.storage.schema import MIGRATIONS, statements


async def migrate(db: Database) -> list[int]:
    """Bring the schema up to date; return the versions applied by this call."""
    applied: list[int] = []
    async with db.transaction() as conn:
        await conn.lock("carepath:migrations")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            "version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at BIGINT NOT NULL)"
        )
        done = {r[0] for r in await conn.fetch("SELECT version FROM schema_version")}
        for version, description, ddl in sorted(MIGRATIONS):
            if version in done:
                continue
            for stmt in statements(ddl, db.dialect):
                await conn.execute(stmt)
            await conn.execute(
                "INSERT INTO schema_version (version, description, applied_at) VALUES (?, ?, ?)",
                (version, description, int(time.time() * 1_000_000)),
            )
            applied.append(version)
    return applied
