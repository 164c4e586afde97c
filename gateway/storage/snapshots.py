"""Kept result sets (:class:`Snapshot`): the ordered keys of a search's matches, for
stable paging by ``_getpages`` links.

The keys are kept in parts of :data:`PART` (``search_snapshot_part``), so that a
page reads the one or two parts it shows, not the whole list: paging through a
result of 48,000 matches read 2.5 MB of JSON per page when the list was kept
whole. A set kept before schema 29 has no parts (``held`` is NULL): its keys are
in ``search_snapshot.ids``, whole, until it expires.
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from gateway.storage.db import Connection, Database
from gateway.storage.interface import Snapshot

#: keys per part
PART = 1000

#: how long a kept result set can be paged through
KEPT_MICROS = 24 * 3600 * 1_000_000


async def save(db: Database, snapshot: Snapshot, now: int) -> None:
    """Keep ``snapshot`` (its keys from the first); expired sets are dropped on the way."""
    async with db.transaction() as conn:
        await _expire(conn, now - KEPT_MICROS)
        await conn.execute(
            "INSERT INTO search_snapshot (search_id, created, query, total, truncated, ids,"
            " complete, bound, held) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (snapshot.search_id, now, snapshot.query, snapshot.total,
             int(snapshot.truncated), b"[]", int(snapshot.complete), snapshot.bound,
             len(snapshot.keys)))
        await _write_parts(conn, snapshot.search_id, 0, snapshot.keys)


async def load(db: Database, search_id: str, start: int = 0,
               stop: int | None = None) -> Snapshot | None:
    """The kept set, with its keys from position ``start`` up to ``stop`` (all: None)."""
    start = max(start, 0)
    async with db.read() as conn:
        row = await conn.fetchrow(
            "SELECT query, total, truncated, ids, complete, bound, held FROM search_snapshot"
            " WHERE search_id = ?", (search_id,))
        if row is None:
            return None
        if row[6] is None:  # kept whole, before schema 29
            keys = _keys(row[3])
            held, first = len(keys), 0
        else:
            held = int(row[6])
            first = min(start, held) // PART
            last = (min(stop, held) - 1 if stop is not None else held - 1) // PART
            parts = await conn.fetch(
                "SELECT ids FROM search_snapshot_part WHERE search_id = ? AND part >= ?"
                " AND part <= ? ORDER BY part", (search_id, first, max(last, first)))
            keys = [k for p in parts for k in _keys(p[0])]
        lo = start - first * PART
        hi = None if stop is None else max(stop - first * PART, lo)
    return Snapshot(search_id, row[0], keys[lo:hi], int(row[1]), bool(row[2]), bool(row[4]),
                    int(row[5]) if row[5] is not None else None, start=start, held=held)


async def extend(db: Database, snapshot: Snapshot, more: Sequence[tuple[str, str]], *,
                 complete: bool, truncated: bool) -> bool:
    """Append ``more`` to an incomplete set that holds ``snapshot.held`` keys; False
    when another request read on first (load it again)."""
    async with db.transaction() as conn:
        moved = await conn.fetch(
            "UPDATE search_snapshot SET held = ?, complete = ?, truncated = ?"
            " WHERE search_id = ? AND complete = 0 AND held = ? RETURNING search_id",
            (snapshot.held + len(more), int(complete), int(truncated), snapshot.search_id,
             snapshot.held))
        if not moved:
            return False
        part, kept = divmod(snapshot.held, PART)
        tail: list[tuple[str, str]] = []
        if kept:  # the last part, not full: rewritten with what follows it
            row = await conn.fetchrow(
                "SELECT ids FROM search_snapshot_part WHERE search_id = ? AND part = ?",
                (snapshot.search_id, part))
            tail = _keys(row[0]) if row else []
            await conn.execute(
                "DELETE FROM search_snapshot_part WHERE search_id = ? AND part = ?",
                (snapshot.search_id, part))
        await _write_parts(conn, snapshot.search_id, part, [*tail, *more])
    return True


def _keys(blob: bytes) -> list[tuple[str, str]]:
    """Keys as kept: a JSON array of ``[type, id]`` pairs."""
    return [(k[0], k[1]) for k in orjson.loads(bytes(blob))]


async def _write_parts(conn: Connection, search_id: str, part: int,
                       keys: Sequence[tuple[str, str]]) -> None:
    if not keys:
        return
    await conn.executemany(
        "INSERT INTO search_snapshot_part (search_id, part, ids) VALUES (?, ?, ?)",
        [(search_id, part + n, orjson.dumps(keys[at : at + PART]))
         for n, at in enumerate(range(0, len(keys), PART))])


async def _expire(conn: Connection, cutoff: int) -> None:
    """Drop the sets created before ``cutoff`` (by the index on ``created``). On
    PostgreSQL, sets another request is dropping or reading on are left to it:
    two requests dropping the same rows in different orders would deadlock."""
    if conn.dialect == "postgresql":
        await conn.execute(
            "WITH gone AS (DELETE FROM search_snapshot WHERE search_id IN (SELECT search_id"
            " FROM search_snapshot WHERE created < ? FOR UPDATE SKIP LOCKED)"
            " RETURNING search_id)"
            " DELETE FROM search_snapshot_part WHERE search_id IN (SELECT search_id FROM gone)",
            (cutoff,))
        return
    await conn.execute(
        "DELETE FROM search_snapshot_part WHERE search_id IN"
        " (SELECT search_id FROM search_snapshot WHERE created < ?)", (cutoff,))
    await conn.execute("DELETE FROM search_snapshot WHERE created < ?", (cutoff,))
