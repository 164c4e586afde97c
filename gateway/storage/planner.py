"""Query planner statistics for the embedded database (SQLite).

PostgreSQL keeps its statistics itself (autovacuum's ``ANALYZE``). SQLite has
none until ``ANALYZE`` runs, and its guesses about the search index tables are
wrong in the way that hurts: a sort or an ``IN`` subquery walks every row of
the parameter or every resource of the type instead of the few that match.
:class:`PlannerStatistics` runs :meth:`SqliteDatabase.analyze` when the stored
versions have doubled since the last time (from :data:`MIN_VERSIONS` on), and
once at start when there is data: a few milliseconds each time, since
``ANALYZE`` samples a bounded number of rows per index.
"""

from __future__ import annotations

import asyncio
import logging

from gateway import tasks
from gateway.storage.db import SqliteDatabase

log = logging.getLogger("carepath.storage")

#: below this many stored versions the planner's guesses cost little
MIN_VERSIONS = 200
#: seconds between two looks at the data's size (however many commits came between)
CHECK_INTERVAL = 1.0


class PlannerStatistics:
    """Keeps SQLite's planner statistics in step with the data's growth. ``wake``
    is a commit listener (``HookedSqlStore.after_commit``)."""

    def __init__(self, db: SqliteDatabase) -> None:
        self.db = db
        self.analyzed_at = 0  # stored versions when ANALYZE last ran
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="planner-statistics")

    async def stop(self) -> None:
        await tasks.cancel(self._task)
        self._task = None

    async def versions(self) -> int:
        async with self.db.read() as conn:
            row = await conn.fetchrow("SELECT MAX(seq) FROM resource_history")
        return int(row[0]) if row and row[0] is not None else 0

    async def refresh(self, *, force: bool = False) -> bool:
        """Run ``ANALYZE`` if the data has doubled since the last run (or ``force``
        and there is data); whether it ran."""
        n = await self.versions()
        if n < MIN_VERSIONS or (not force and n < 2 * self.analyzed_at):
            return False
        await self.db.analyze()
        self.analyzed_at = n
        log.info("planner statistics refreshed at %d stored versions", n)
        return True

    async def _run(self) -> None:
        await self._guarded(force=True)
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._guarded()
            await asyncio.sleep(CHECK_INTERVAL)  # the commits meanwhile: one look

    async def _guarded(self, *, force: bool = False) -> None:
        try:
            await self.refresh(force=force)
        except Exception:  # statistics are an optimisation: never stop serving for them
            log.exception("refreshing the planner statistics failed")
