"""Retention: the bookkeeping rows that only grow, pruned once nothing needs them.

* ``outbox``: an event row is needed until every reader (the relay, each
  consumer group, the subscription matcher: every saved position in
  ``event_position``) has passed it; the relay re-publishes from the slowest
  consumer group if the bus loses its stream. Rows older than
  ``outbox_retention_hours`` that all readers have passed are deleted.
* ``subscription_event``: a subscription's numbered events serve ``$events``
  and resends. Rows older than ``subscription_event_retention_hours`` that were
  delivered (``event_number <= delivered_number``) are deleted; the event
  counters of the status bundles are kept in ``subscription_state``.

Resources, their history and the audit trail are records, not bookkeeping:
they are never pruned here. Each process runs a :class:`Retention`; one lock
makes the processes take turns, and each pass deletes in batches.
"""

from __future__ import annotations

import asyncio
import logging
import time

from gateway import tasks
from gateway.storage.db import Connection, Database

log = logging.getLogger("carepath.retention")

LOCK = "carepath:retention"
HOUR_US = 3_600 * 1_000_000


def _now_us() -> int:
    return int(time.time() * 1_000_000)


async def _deleted(conn: Connection, sql: str, params: tuple[object, ...]) -> int:
    rows = await conn.fetch(sql, params)
    return len(rows)


async def prune_outbox(conn: Connection, older_than: int, limit: int) -> int:
    """Delete up to ``limit`` outbox rows written before ``older_than`` (epoch µs)
    that every saved reader position has passed; how many."""
    low = await conn.fetchrow(
        "SELECT tx_id, seq FROM event_position ORDER BY tx_id, seq LIMIT 1")
    if low is None:
        return 0  # nobody has read anything: keep everything
    tx_id, seq = int(low[0]), int(low[1])
    return await _deleted(conn, (
        "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox"
        " WHERE (tx_id < ? OR (tx_id = ? AND seq <= ?)) AND ts < ? ORDER BY tx_id, seq"
        " LIMIT ?) RETURNING seq"), (tx_id, tx_id, seq, older_than, limit))


async def prune_subscription_events(conn: Connection, older_than: int, limit: int) -> int:
    """Delete up to ``limit`` delivered subscription events numbered before
    ``older_than`` (epoch µs); how many."""
    return await _deleted(conn, (
        "DELETE FROM subscription_event WHERE (subscription_id, event_number) IN ("
        " SELECT e.subscription_id, e.event_number FROM subscription_event e"
        " JOIN subscription_state s ON s.id = e.subscription_id"
        " WHERE e.ts < ? AND e.event_number <= s.delivered_number LIMIT ?)"
        " RETURNING event_number"), (older_than, limit))


class Retention(tasks.Loop):
    """Prunes every ``interval`` seconds (a ``Service`` of ``gateway.main``).
    A retention of 0 hours keeps that table's rows for ever."""

    task_name = "retention"

    def __init__(self, db: Database, *, outbox_hours: int, subscription_event_hours: int,
                 interval: float = 600.0, batch: int = 5_000) -> None:
        self.db = db
        self.outbox_hours = outbox_hours
        self.subscription_event_hours = subscription_event_hours
        self.interval = interval
        self.batch = batch
        self.pruned = {"outbox": 0, "subscription_event": 0}

    async def _run(self) -> None:
        while True:
            try:
                await self.prune_once()
            except Exception as exc:
                log.warning("pruning old bookkeeping rows failed: %s", exc)
            await asyncio.sleep(self.interval)

    async def prune_once(self) -> dict[str, int]:
        """One pass over both tables; rows deleted per table."""
        now = _now_us()
        jobs = (("outbox", self.outbox_hours, prune_outbox),
                ("subscription_event", self.subscription_event_hours,
                 prune_subscription_events))
        done = dict.fromkeys(self.pruned, 0)
        for table, hours, prune in jobs:
            if hours <= 0:
                continue
            while True:
                async with self.db.transaction() as conn:
                    await conn.lock(LOCK)
                    n = await prune(conn, now - hours * HOUR_US, self.batch)
                done[table] += n
                if n < self.batch:
                    break
        for table, n in done.items():
            self.pruned[table] += n
            if n:
                log.info("retention: %d %s rows pruned", n, table)
        return done
