"""What waits to be done, for monitoring (``/metrics``): events committed and not yet
published, audit records not yet chained, and the subscriptions by status with the
notifications they have not had yet."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.storage.db import Database
from gateway.storage.outbox import START, load_position


@dataclass
class Backlog:
    #: events in the outbox after the relay's position
    outbox_events: int = 0
    #: audit records committed and not yet in the hash chain
    audit_records: int = 0
    #: subscriptions by status (requested, active, error, off)
    subscriptions: dict[str, int] = field(default_factory=dict)
    #: events matched for active or failing subscriptions and not yet delivered
    undelivered_events: int = 0


async def backlog(db: Database, relay: str) -> Backlog:
    """``relay``: the name of the relay's saved position (``event_position``)."""
    out = Backlog()
    async with db.read() as conn:
        saved = await load_position(conn, relay)
        after = saved.position if saved else START
        # after a position as the relay reads (the (tx_id, seq) index serves it)
        row = await conn.fetchrow("SELECT COUNT(*) FROM outbox WHERE (tx_id, seq) > (?, ?)",
                                  (after.tx_id, after.seq))
        out.outbox_events = int(row[0]) if row else 0
        last = await conn.fetchrow("SELECT tx_id, seq FROM audit_chain ORDER BY pos DESC LIMIT 1")
        chained = (int(last[0]), int(last[1])) if last else (-1, -1)
        row = await conn.fetchrow("SELECT COUNT(*) FROM audit_log WHERE (tx_id, seq) > (?, ?)",
                                  chained)
        out.audit_records = int(row[0]) if row else 0
        for status, count, waiting in await conn.fetch(
                "SELECT status, COUNT(*), SUM(CASE WHEN status IN ('active', 'error')"
                " THEN events_since_start - delivered_number ELSE 0 END)"
                " FROM subscription_state GROUP BY status"):
            out.subscriptions[str(status)] = int(count)
            out.undelivered_events += max(int(waiting or 0), 0)
    return out
