"""SQL of the subscription tables (migration 2): state, numbered events, ws tokens.

``subscription_state`` — one row per Subscription resource: its parsed
configuration, its status as the dispatcher sees it, the last event number
assigned (``events_since_start``) and delivered (``delivered_number``), the
retry schedule and a lease (``lease_owner``/``lease_until``) that lets one
process at a time deliver for it.

``subscription_event`` — one row per (subscription, event number): which
resource version the event is about. Notifications and ``$events`` are built
from these rows and the stored versions, so a replay equals the delivery.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.storage.db import Connection, Row

STATE_COLS = (
    "id, resource_version, resource_status, topic, channel, status, config, heartbeat, end_at,"
    " events_since_start, delivered_number, handshake_pending, resend_from, resend_to,"
    " next_attempt, attempts, failing_since, last_error, last_sent, lease_owner, lease_until,"
    " created, updated"
)
MATCHABLE = ("requested", "active", "error")


@dataclass(frozen=True, slots=True)
class StateRow:
    id: str
    resource_version: int
    resource_status: str
    topic: str
    channel: str
    status: str
    config: bytes
    heartbeat: int
    end_at: int
    events_since_start: int
    delivered_number: int
    handshake_pending: bool
    resend_from: int | None
    resend_to: int | None
    next_attempt: int
    attempts: int
    failing_since: int | None
    last_error: str | None
    last_sent: int
    lease_owner: str | None
    lease_until: int
    created: int
    updated: int


def _state(row: Row) -> StateRow:
    values = list(row)
    values[6] = bytes(values[6])
    values[11] = bool(values[11])
    return StateRow(*values)


@dataclass(frozen=True, slots=True)
class EventRow:
    number: int
    event_id: str
    resource_type: str
    id: str
    version: int
    interaction: str
    ts: int


async def get_state(conn: Connection, id: str) -> StateRow | None:
    row = await conn.fetchrow(f"SELECT {STATE_COLS} FROM subscription_state WHERE id = ?", (id,))
    return _state(row) if row else None


async def all_states(conn: Connection, ids: list[str] | None = None,
                     statuses: list[str] | None = None) -> list[StateRow]:
    where: list[str] = []
    params: list[Any] = []
    if ids:
        where.append(f"id IN ({', '.join('?' for _ in ids)})")
        params += ids
    if statuses:
        where.append(f"status IN ({', '.join('?' for _ in statuses)})")
        params += statuses
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    rows = await conn.fetch(f"SELECT {STATE_COLS} FROM subscription_state{clause} ORDER BY id",
                            params)
    return [_state(r) for r in rows]


async def matchable(conn: Connection) -> list[StateRow]:
    """Subscriptions that get new events numbered (not ``off``)."""
    return await all_states(conn, statuses=list(MATCHABLE))


async def upsert_state(
    conn: Connection, *, id: str, resource_version: int, resource_status: str, topic: str,
    channel: str, status: str, config: bytes, heartbeat: int, end_at: int,
    handshake_pending: bool, now: int, reset_retry: bool,
) -> None:
    """Create the row, or apply a new version of the resource to it."""
    await conn.execute(
        "INSERT INTO subscription_state (id, resource_version, resource_status, topic, channel,"
        " status, config, heartbeat, end_at, handshake_pending, created, updated)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (id) DO UPDATE SET resource_version = excluded.resource_version,"
        " resource_status = excluded.resource_status, topic = excluded.topic,"
        " channel = excluded.channel, status = excluded.status, config = excluded.config,"
        " heartbeat = excluded.heartbeat, end_at = excluded.end_at,"
        " handshake_pending = excluded.handshake_pending, updated = excluded.updated",
        (id, resource_version, resource_status, topic, channel, status, config, heartbeat,
         end_at, int(handshake_pending), now, now),
    )
    if reset_retry:
        await conn.execute(
            "UPDATE subscription_state SET attempts = 0, next_attempt = 0, failing_since = NULL,"
            " last_error = NULL WHERE id = ?", (id,))


async def note_resource_version(conn: Connection, id: str, version: int, status: str) -> None:
    await conn.execute(
        "UPDATE subscription_state SET resource_version = ?, resource_status = ? WHERE id = ?",
        (version, status, id))


async def delete_state(conn: Connection, id: str) -> None:
    await conn.execute("DELETE FROM subscription_event WHERE subscription_id = ?", (id,))
    await conn.execute("DELETE FROM subscription_state WHERE id = ?", (id,))


async def add_events(conn: Connection, rows: list[tuple[Any, ...]]) -> None:
    """Rows of (subscription_id, number, event_id, type, id, version, interaction, ts)."""
    await conn.executemany(
        "INSERT INTO subscription_event (subscription_id, event_number, event_id, res_type,"
        " res_id, version, interaction, ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)


async def set_event_counts(conn: Connection, counts: dict[str, int]) -> None:
    # rows are always locked in id order (here and in record_progress): no deadlocks
    await conn.executemany(
        "UPDATE subscription_state SET events_since_start = ? WHERE id = ?",
        [(counts[sid], sid) for sid in sorted(counts)])


_EVENT_COLS = "event_number, event_id, res_type, res_id, version, interaction, ts"


def _events(rows: list[Row]) -> list[EventRow]:
    return [EventRow(int(r[0]), r[1], r[2], r[3], int(r[4]), r[5], int(r[6])) for r in rows]


async def events_between(conn: Connection, id: str, first: int, last: int,
                         limit: int) -> list[EventRow]:
    rows = await conn.fetch(
        f"SELECT {_EVENT_COLS} FROM subscription_event WHERE subscription_id = ?"
        " AND event_number >= ? AND event_number <= ? ORDER BY event_number LIMIT ?",
        (id, first, last, limit))
    return _events(rows)


async def due(conn: Connection, now: int, limit: int) -> list[tuple[str, str]]:
    """(id, channel) of subscriptions with due work whose lease is free."""
    rows = await conn.fetch(
        "SELECT id, channel FROM subscription_state WHERE lease_until < ? AND ("
        " (status IN ('requested', 'active') AND next_attempt <= ? AND ("
        "   events_since_start > delivered_number OR handshake_pending = 1"
        "   OR resend_from IS NOT NULL"
        # (heartbeat is an INTEGER of seconds: in microseconds it needs 64 bits from
        # 2,148 s on, and PostgreSQL multiplies in the column's type)
        "   OR (status = 'active' AND heartbeat > 0"
        "       AND last_sent + CAST(heartbeat AS BIGINT) * 1000000 <= ?)))"
        " OR (status <> resource_status AND status <> 'requested')"
        " OR (end_at > 0 AND end_at <= ? AND status <> 'off'))"
        " ORDER BY next_attempt LIMIT ?",
        (now, now, now, now, limit))
    return [(r[0], r[1]) for r in rows]


async def acquire(conn: Connection, id: str, owner: str, until: int, now: int) -> StateRow | None:
    row = await conn.fetchrow(
        "UPDATE subscription_state SET lease_owner = ?, lease_until = ? WHERE id = ?"
        " AND (lease_owner IS NULL OR lease_until < ? OR lease_owner = ?)"
        f" RETURNING {STATE_COLS}",
        (owner, until, id, now, owner))
    return _state(row) if row else None


async def release(conn: Connection, id: str, owner: str) -> StateRow | None:
    row = await conn.fetchrow(
        "UPDATE subscription_state SET lease_owner = NULL, lease_until = 0"
        f" WHERE id = ? AND lease_owner = ? RETURNING {STATE_COLS}", (id, owner))
    return _state(row) if row else None


async def renew(conn: Connection, id: str, owner: str, until: int) -> bool:
    row = await conn.fetchrow(
        "UPDATE subscription_state SET lease_until = ? WHERE id = ? AND lease_owner = ?"
        " RETURNING id", (until, id, owner))
    return row is not None


async def delivered(conn: Connection, id: str, owner: str, *, number: int | None,
                    sent: int, until: int, handshake_done: bool = False,
                    resend_done: bool = False, status: str | None = None) -> StateRow | None:
    """Record a successful delivery (we must still hold the lease); the new state."""
    sets = ["last_sent = ?", "lease_until = ?", "attempts = 0", "next_attempt = 0",
            "failing_since = NULL", "last_error = NULL"]
    params: list[Any] = [sent, until]
    if number is not None:
        sets.append("delivered_number = ?")
        params.append(number)
    if handshake_done:
        sets.append("handshake_pending = 0")
    if resend_done:
        sets += ["resend_from = NULL", "resend_to = NULL"]
    if status is not None:
        sets.append("status = ?")
        params.append(status)
    row = await conn.fetchrow(
        f"UPDATE subscription_state SET {', '.join(sets)} WHERE id = ? AND lease_owner = ?"
        f" RETURNING {STATE_COLS}", (*params, id, owner))
    return _state(row) if row else None


def _progress_row(sid: str, owner: str, number: int, sent: int,
                  until: int) -> tuple[Any, ...]:
    return (number, number, sent, sent, until, sid, owner)


async def record_progress(conn: Connection, owner: str,
                          progress: dict[str, tuple[int, int, int]]) -> set[str]:
    """Write delivery progress (sid -> (delivered number, last sent, lease until)) and
    extend the leases; returns the subscriptions whose lease this owner still holds."""
    if not progress:
        return set()
    await conn.executemany(
        "UPDATE subscription_state SET"
        " delivered_number = CASE WHEN ? > delivered_number THEN ? ELSE delivered_number END,"
        " last_sent = CASE WHEN ? > last_sent THEN ? ELSE last_sent END, lease_until = ?"
        " WHERE id = ? AND lease_owner = ?",
        [_progress_row(sid, owner, *progress[sid]) for sid in sorted(progress)])
    ids = list(progress)
    rows = await conn.fetch(
        f"SELECT id FROM subscription_state WHERE lease_owner = ? AND id IN"
        f" ({', '.join('?' for _ in ids)})", (owner, *ids))
    return {r[0] for r in rows}


async def resend_progress(conn: Connection, id: str, owner: str, next_from: int) -> None:
    await conn.execute(
        "UPDATE subscription_state SET resend_from = ? WHERE id = ? AND lease_owner = ?",
        (next_from, id, owner))


async def failed(conn: Connection, id: str, owner: str, *, attempts: int, next_attempt: int,
                 failing_since: int, error: str, status: str | None = None) -> None:
    sets = "attempts = ?, next_attempt = ?, failing_since = ?, last_error = ?"
    params: list[Any] = [attempts, next_attempt, failing_since, error[:1000]]
    if status is not None:
        sets += ", status = ?, handshake_pending = 0"
        params.append(status)
    await conn.execute(
        f"UPDATE subscription_state SET {sets} WHERE id = ? AND lease_owner = ?",
        (*params, id, owner))


async def set_status(conn: Connection, id: str, status: str, error: str | None) -> None:
    await conn.execute(
        "UPDATE subscription_state SET status = ?, last_error = ? WHERE id = ?",
        (status, error, id))


async def request_resend(conn: Connection, id: str, first: int, last: int) -> None:
    """Queue events ``first..last`` for delivery again (merged with a pending request)."""
    row = await conn.fetchrow(
        "SELECT resend_from, resend_to FROM subscription_state WHERE id = ?", (id,))
    if row is not None and row[0] is not None:
        first, last = min(first, int(row[0])), max(last, int(row[1]))
    await conn.execute(
        "UPDATE subscription_state SET resend_from = ?, resend_to = ?, next_attempt = 0"
        " WHERE id = ?", (first, last, id))


async def save_ws_token(conn: Connection, token_hash: str, subscriptions: str,
                        expires: int, now: int) -> None:
    await conn.execute("DELETE FROM subscription_ws_token WHERE expires < ?", (now,))
    await conn.execute(
        "INSERT INTO subscription_ws_token (token_hash, subscriptions, expires) VALUES (?, ?, ?)",
        (token_hash, subscriptions, expires))


async def load_ws_token(conn: Connection, token_hash: str, now: int) -> str | None:
    row = await conn.fetchrow(
        "SELECT subscriptions FROM subscription_ws_token WHERE token_hash = ? AND expires >= ?",
        (token_hash, now))
    return str(row[0]) if row else None
