"""The delivery state's queries, on both backends."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.storage import subscription_tables as tables
from gateway.storage.migrate import migrate
from tests.conftest import BACKENDS, backend_database

HOUR_US = 3_600_000_000


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_heartbeat_of_an_hour_is_due_when_its_hour_has_passed(
        backend: str, tmp_path: Path) -> None:
    """The poll finds heartbeats due in microseconds: 3,600 s of them is beyond a
    32-bit integer, and PostgreSQL multiplied in the column's type (``integer out of
    range``: the whole poll failed, and with it every retry and heartbeat)."""
    async with backend_database(backend, tmp_path) as db:
        await db.open()
        try:
            await migrate(db)
            async with db.transaction() as conn:
                for sid, heartbeat in (("hourly", 3600), ("daily", 86_400)):
                    await tables.upsert_state(
                        conn, id=sid, resource_version=1, resource_status="active",
                        topic="t", channel="rest-hook", status="active", config=b"{}",
                        heartbeat=heartbeat, end_at=0, handshake_pending=False, now=1,
                        reset_retry=True)
                    await conn.execute("UPDATE subscription_state SET last_sent = ?,"
                                       " resource_status = status WHERE id = ?", (1, sid))
            async with db.read() as conn:
                assert await tables.due(conn, 1 + HOUR_US - 1, 10) == []
                assert await tables.due(conn, 1 + HOUR_US, 10) == [("hourly", "rest-hook")]
                assert sorted(await tables.due(conn, 1 + 24 * HOUR_US, 10)) == [
                    ("daily", "rest-hook"), ("hourly", "rest-hook")]
        finally:
            await db.close()
