"""Retention of the outbox and of subscription events (both backends)."""

from __future__ import annotations

import time

from gateway.storage import subscription_tables as tables
from gateway.storage.commit_hooks import HookedSqlStore
from gateway.storage.interface import StoreTransaction
from gateway.storage.outbox import Position, read_after, save_position
from gateway.storage.retention import HOUR_US, Retention

START = Position(0, 0)


async def _write(store: HookedSqlStore, n: int) -> None:
    for i in range(n):
        async def work(tx: StoreTransaction, i: int = i) -> None:
            await tx.put("Basic", f"b{i}-{time.monotonic_ns()}",
                         {"resourceType": "Basic", "code": {"text": str(i)}}, "POST", None)
        await store.run(work)


async def _outbox(store: HookedSqlStore) -> list[Position]:
    async with store.db.transaction() as conn:
        events, _held = await read_after(conn, START, 1000, precise=True)
    return [e.position for e in events]


async def _age_outbox(store: HookedSqlStore, hours: int) -> None:
    async with store.db.transaction() as conn:
        await conn.execute("UPDATE outbox SET ts = ts - ?", (hours * HOUR_US,))


async def test_outbox_rows_go_once_every_reader_passed_them_and_they_are_old(
        store: HookedSqlStore) -> None:
    await _write(store, 6)
    events = await _outbox(store)
    assert len(events) == 6
    retention = Retention(store.db, outbox_hours=24, subscription_event_hours=0, batch=2)
    # no reader has saved a position yet: nothing goes, however old
    await _age_outbox(store, 48)
    assert (await retention.prune_once())["outbox"] == 0
    # the relay passed five, a consumer group only two: two go (in batches of 2)
    async with store.db.transaction() as conn:
        await save_position(conn, "relay", events[4], "epoch-1")
        await save_position(conn, "group:subscriptions", events[1])
    assert (await retention.prune_once())["outbox"] == 2
    assert await _outbox(store) == events[2:]
    # the group catches up; rows younger than the retention stay
    async with store.db.transaction() as conn:
        await save_position(conn, "group:subscriptions", events[5])
        await conn.execute("UPDATE outbox SET ts = ? WHERE seq = ?",
                           (int(time.time() * 1_000_000), events[3].seq))
    assert (await retention.prune_once())["outbox"] == 2
    assert await _outbox(store) == [events[3], events[5]]
    assert retention.pruned["outbox"] == 4
    # a retention of 0 keeps everything
    keep = Retention(store.db, outbox_hours=0, subscription_event_hours=0)
    assert await keep.prune_once() == {"outbox": 0, "subscription_event": 0}
    assert len(await _outbox(store)) == 2


async def test_delivered_subscription_events_go_when_old(store: HookedSqlStore) -> None:
    now = int(time.time() * 1_000_000)
    old = now - 800 * HOUR_US
    async with store.db.transaction() as conn:
        for sid in ("s1", "s2"):
            await tables.upsert_state(
                conn, id=sid, resource_version=1, resource_status="active",
                topic="urn:topic", channel="rest-hook", status="active", config=b"{}",
                heartbeat=0, end_at=0, handshake_pending=False, now=now, reset_retry=False)
        await tables.add_events(conn, [
            (sid, n, f"{sid}-e{n}", "Encounter", "e1", n, "update", old if n < 4 else now)
            for sid in ("s1", "s2") for n in range(1, 6)])
        # s1 delivered up to 3, s2 only up to 1
        await conn.execute("UPDATE subscription_state SET delivered_number = 3 WHERE id = 's1'")
        await conn.execute("UPDATE subscription_state SET delivered_number = 1 WHERE id = 's2'")
    retention = Retention(store.db, outbox_hours=0, subscription_event_hours=720)
    assert await retention.prune_once() == {"outbox": 0, "subscription_event": 4}
    async with store.db.read() as conn:
        left = {sid: [e.number for e in await tables.events_between(conn, sid, 1, 10, 100)]
                for sid in ("s1", "s2")}
    # old and delivered went; undelivered (s2: 2, 3) and recent (4, 5) stay
    assert left == {"s1": [4, 5], "s2": [2, 3, 4, 5]}
