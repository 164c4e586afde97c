"""Query planner statistics, kept in step with the data's growth.

Without statistics the planners guess, and their guesses about the search
index tables are wrong in the way that hurts: a sort looks up every row of the
parameter for every resource, an ``IN`` subquery walks every resource of the
type. SQLite has none until ``ANALYZE`` runs; PostgreSQL's autovacuum analyzes
a table only after a delay and a share of changed rows, so a freshly loaded
database was planned blind (``Observation?code=…&_sort=-date`` over 9,000
Observations: 10 s, 69 ms once analyzed). :class:`PlannerStatistics` runs the
database's ``analyze`` for the tables searches read (:data:`TABLES`), from
:data:`MIN_VERSIONS` stored versions on. On SQLite that is a sampled
``ANALYZE`` (a few milliseconds), run once at start when there is data and
whenever the stored versions have doubled since: about twenty times in a
database's first million versions. On PostgreSQL it looks after commits (at
most once a :data:`CHECK_INTERVAL`) which tables have no statistics or stale
ones, and analyzes those (:meth:`~gateway.storage.db.PostgresDatabase.analyze`;
autovacuum, where it runs, usually comes first). The sort subqueries are
written so that statistics from a smaller database still plan them right
(``gateway/storage/search_sql.py``).
"""

from __future__ import annotations

import asyncio
import logging

from gateway import tasks
from gateway.storage.db import Database
from gateway.storage.schema import INDEX_TABLES

log = logging.getLogger("carepath.storage")

#: below this many stored versions the planner's guesses cost little
MIN_VERSIONS = 200
#: what searches read: the resources, their index rows, who created them
TABLES = ("resource", *INDEX_TABLES, "resource_creator")
#: seconds between two looks at the data's size (however many commits came between)
CHECK_INTERVAL = 1.0


class PlannerStatistics(tasks.Loop):
    """Keeps the planner's statistics in step with the data's growth. ``wake`` is a
    commit listener (``HookedSqlStore.after_commit``)."""

    task_name = "planner-statistics"

    def __init__(self, db: Database) -> None:
        self.db = db
        self.analyzed_at = 0  # stored versions when ANALYZE last ran
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def versions(self) -> int:
        async with self.db.read() as conn:
            row = await conn.fetchrow("SELECT MAX(seq) FROM resource_history")
        return int(row[0]) if row and row[0] is not None else 0

    async def refresh(self, *, force: bool = False) -> bool:
        """Ask the database to analyze if there is data and, on SQLite, if it has
        doubled since the last time (or ``force``); whether it asked. (PostgreSQL
        knows which of its tables changed, and analyzes only those.)"""
        n = await self.versions()
        doubled = force or n >= 2 * self.analyzed_at or self.db.dialect == "postgresql"
        if n < MIN_VERSIONS or not doubled:
            return False
        analyzed = await self.db.analyze(TABLES)
        self.analyzed_at = n
        if analyzed:
            log.info("planner statistics of %d tables refreshed at %d stored versions",
                     analyzed, n)
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
