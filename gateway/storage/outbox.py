"""Reading the outbox in commit-safe order, and the positions of its readers.

Every committed write appends an ``outbox`` row in its own transaction
(:mod:`gateway.storage.sql`). Readers walk the outbox by **position**
``(tx_id, seq)`` and remember how far they got in ``event_position``.

Why not ``seq`` alone: on PostgreSQL, ``seq`` comes from a sequence, drawn
when the row is inserted, not when it commits. A transaction that drew
``seq = 10`` may commit after one that drew ``seq = 11``; a reader that had
already moved past 11 would never see 10. So each row also records the id of
the transaction that wrote it (``tx_id``, a column default of
``pg_current_xact_id()``), rows are read in ``(tx_id, seq)`` order, and
:func:`read_after` returns only rows below a **frontier** no new row can
appear under:

1. First it notes the next transaction id to be assigned (``xmax`` of the
   current snapshot) and the ids of the running transactions that hold a lock
   on any table of this schema (``pg_locks``). A transaction takes its table
   lock *before* its first write draws its id, so every running writer of
   this schema that already has an id is in that list.
2. Then, in a new statement (a new snapshot), it reads the committed rows
   whose ``tx_id`` is below the least of those ids. A transaction with a
   smaller id that has not committed yet would have to be in the list.

Reading ``pg_locks`` is costly when many transactions run, so readers first
use a cheaper bound, the snapshot's ``xmin`` (no transaction older than it
is still running, in any database), and fall back to the frontier above only
when that bound stops moving (:func:`read_after`).

Long transactions of other schemas, databases or applications on the same
PostgreSQL do not hold that frontier back (the cheap bound, briefly); a long
write transaction of the gateway itself does (events wait, none are lost). On SQLite there is one
writer at a time, so ``seq`` order is commit order and ``tx_id`` is 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from gateway.storage.db import Connection, Row


@dataclass(frozen=True, slots=True, order=True)
class Position:
    """A point in the outbox: everything at or before it has been handled."""

    tx_id: int
    seq: int

    def __str__(self) -> str:
        return f"{self.tx_id}:{self.seq}"

    @classmethod
    def parse(cls, text: str) -> Position:
        tx, _, seq = text.partition(":")
        return cls(int(tx), int(seq))


START = Position(0, 0)


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """One committed write: what changed, which version, how."""

    position: Position
    event_id: str
    resource_type: str
    id: str
    version: int
    interaction: str  # create | update | delete
    ts: int  # epoch microseconds (the version's meta.lastUpdated)


@dataclass(frozen=True, slots=True)
class SavedPosition:
    position: Position
    epoch: str | None  # relay: the Redis generation it published into


_COLS = "tx_id, seq, event_id, res_type, res_id, version, interaction, ts"


def _event(row: Row) -> OutboxEvent:
    return OutboxEvent(Position(int(row[0]), int(row[1])), row[2], row[3], row[4], int(row[5]),
                       row[6], int(row[7]))


_FRONTIER = (
    "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint,"
    " ARRAY(SELECT DISTINCT t.transactionid::text::bigint"
    " FROM pg_locks r JOIN pg_locks t ON t.virtualtransaction = r.virtualtransaction"
    " AND t.locktype = 'transactionid'"
    " WHERE r.locktype = 'relation' AND r.pid <> pg_backend_pid()"
    " AND r.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND r.relation IN (SELECT oid FROM pg_class"
    " WHERE relnamespace = current_schema()::regnamespace))"
)


def _widen(xid32: int, reference: int) -> int:
    """A 32-bit xid from ``pg_locks`` as the 64-bit id just below ``reference``."""
    value = (reference & ~0xFFFFFFFF) | xid32
    return value - (1 << 32) if value > reference else value


async def frontier(conn: Connection) -> int:
    """Outbox rows with a smaller ``tx_id`` are final (PostgreSQL; see the module doc)."""
    row = await conn.fetchrow(_FRONTIER)
    assert row is not None
    xmax = int(row[0])
    return min([xmax, *(_widen(int(x), xmax) for x in row[1] or ())])


_XMIN = "pg_snapshot_xmin(pg_current_snapshot())::text::bigint"


async def read_after(
    conn: Connection, after: Position, limit: int, *, precise: bool = False
) -> tuple[list[OutboxEvent], bool]:
    """Final outbox events after ``after`` in position order (at most ``limit``).

    The flag says whether committed rows beyond them are held back because an
    older transaction is still running (PostgreSQL): read again shortly.
    ``conn`` must be in a READ COMMITTED transaction (each statement sees the
    latest commits).

    By default the bound is the statement snapshot's ``xmin``, the oldest
    transaction still running anywhere on the server: one cheap statement.
    A long transaction of another application holds that back; ``precise``
    uses :func:`frontier` instead, which only waits for this schema's writers
    but reads ``pg_locks`` (costly under load). Callers use it when the cheap
    bound has not moved for a while.
    """
    rows, held = await read_final(conn, "outbox", _COLS, after, limit, precise=precise)
    return [_event(r) for r in rows], held


async def read_final(
    conn: Connection, table: str, cols: str, after: Position, limit: int, *,
    precise: bool = False,
) -> tuple[list[Row], bool]:
    """:func:`read_after` for any table written like the outbox (``tx_id``, ``seq``):
    rows of ``cols`` (which must start with ``tx_id, seq``)."""
    if conn.dialect != "postgresql":
        rows = await conn.fetch(
            f"SELECT {cols} FROM {table} WHERE (tx_id, seq) > (?, ?) ORDER BY tx_id, seq LIMIT ?",
            (after.tx_id, after.seq, limit),
        )
        return list(rows), False
    bound: list[Any] = [await frontier(conn)] if precise else []
    # rows of older transactions sort first (tx_id order): the final ones are a prefix;
    # one row past the bound is enough to know that something is held back
    rows = await conn.fetch(
        f"WITH f AS (SELECT {'?::bigint' if precise else _XMIN} AS x)"
        f" (SELECT {cols}, true FROM {table}, f WHERE (tx_id, seq) > (?, ?) AND tx_id < f.x"
        " ORDER BY tx_id, seq LIMIT ?)"
        f" UNION ALL (SELECT {cols}, false FROM {table}, f WHERE (tx_id, seq) > (?, ?)"
        " AND tx_id >= f.x ORDER BY tx_id, seq LIMIT 1)",
        (*bound, after.tx_id, after.seq, limit, after.tx_id, after.seq),
    )
    final = [r for r in rows if r[-1]]
    return final, len(final) < len(rows)


async def read_range(
    conn: Connection, after: Position, upto: Position, limit: int
) -> list[OutboxEvent]:
    """Events in ``(after, upto]`` — a range a relay has already found final."""
    rows = await conn.fetch(
        f"SELECT {_COLS} FROM outbox WHERE (tx_id, seq) > (?, ?) AND (tx_id, seq) <= (?, ?)"
        " ORDER BY tx_id, seq LIMIT ?",
        (after.tx_id, after.seq, upto.tx_id, upto.seq, limit),
    )
    return [_event(r) for r in rows]


async def load_position(conn: Connection, name: str) -> SavedPosition | None:
    row = await conn.fetchrow(
        "SELECT tx_id, seq, epoch FROM event_position WHERE name = ?", (name,)
    )
    if row is None:
        return None
    return SavedPosition(Position(int(row[0]), int(row[1])), row[2])


async def load_positions(conn: Connection, *names: str) -> dict[str, SavedPosition]:
    """Several saved positions in one round trip (absent names are left out)."""
    marks = ", ".join("?" for _ in names)
    rows = await conn.fetch(
        f"SELECT name, tx_id, seq, epoch FROM event_position WHERE name IN ({marks})", names
    )
    return {r[0]: SavedPosition(Position(int(r[1]), int(r[2])), r[3]) for r in rows}


async def save_position(
    conn: Connection, name: str, position: Position, epoch: str | None = None
) -> None:
    await conn.execute(
        "INSERT INTO event_position (name, tx_id, seq, epoch, updated) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (name) DO UPDATE SET tx_id = excluded.tx_id, seq = excluded.seq,"
        " epoch = excluded.epoch, updated = excluded.updated",
        (name, position.tx_id, position.seq, epoch, int(time.time() * 1_000_000)),
    )


async def lowest_position(conn: Connection, prefix: str) -> Position | None:
    """The least position among readers named ``prefix…`` (consumer groups)."""
    rows = await conn.fetch(
        "SELECT tx_id, seq FROM event_position WHERE name LIKE ?", (prefix + "%",)
    )
    positions = [Position(int(r[0]), int(r[1])) for r in rows]
    return min(positions) if positions else None


async def versions(
    conn: Connection, keys: list[tuple[str, str, int]]
) -> dict[tuple[str, str, int], bytes | None]:
    """Stored JSON of the given resource versions (``None`` for a deletion)."""
    out: dict[tuple[str, str, int], bytes | None] = {}
    for start in range(0, len(keys), 300):
        chunk = keys[start : start + 300]
        cond = " OR ".join("(res_type = ? AND res_id = ? AND version = ?)" for _ in chunk)
        params: list[Any] = [v for k in chunk for v in k]
        for row in await conn.fetch(
            f"SELECT res_type, res_id, version, content FROM resource_history WHERE {cond}",
            params,
        ):
            out[(row[0], row[1], int(row[2]))] = bytes(row[3]) if row[3] is not None else None
    return out
