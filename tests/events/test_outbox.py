"""Reading the outbox by (tx_id, seq): nothing is skipped when commits overtake each other."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.storage.commit_hooks import HookedSqlStore
from gateway.storage.interface import StoreTransaction
from gateway.storage.outbox import START, read_after


def put(rid: str, gate: asyncio.Event | None = None, entered: asyncio.Event | None = None) -> Any:
    async def work(tx: StoreTransaction) -> Any:
        stored = await tx.put("Patient", rid, {"resourceType": "Patient"}, "POST", None)
        await tx.current("Patient", rid)  # sends a batched write: its outbox row exists now
        if entered is not None:
            entered.set()
        if gate is not None:
            await gate.wait()
        return stored

    return work


async def test_events_come_in_commit_safe_order(store: HookedSqlStore) -> None:
    # precise: the cheap bound may also wait for other tests' transactions on the server
    for rid in ("a", "b", "c"):
        await store.run(put(rid))
    async with store.db.read() as conn:
        events, held = await read_after(conn, START, 10, precise=True)
    assert [e.id for e in events] == ["a", "b", "c"] and not held
    assert [e.interaction for e in events] == ["create"] * 3
    async with store.db.read() as conn:
        rest, _ = await read_after(conn, events[0].position, 10, precise=True)
    assert [e.id for e in rest] == ["b", "c"]


async def test_a_later_commit_does_not_overtake_an_earlier_transaction(
    store: HookedSqlStore,
) -> None:
    if store.dialect != "postgresql":
        return  # one SQLite writer at a time: commits cannot overtake
    gate, entered = asyncio.Event(), asyncio.Event()
    slow = asyncio.create_task(store.run(put("slow", gate, entered)))
    await entered.wait()  # "slow" holds its outbox row, uncommitted
    await store.run(put("fast"))  # drew a later seq, commits first
    async with store.db.read() as conn:
        events, held = await read_after(conn, START, 10, precise=True)
    # "fast" is committed but not final while the older transaction runs
    assert events == [] and held
    gate.set()
    await slow
    async with store.db.read() as conn:
        events, held = await read_after(conn, START, 10, precise=True)
    assert [e.id for e in events] == ["slow", "fast"] and not held


async def test_a_long_transaction_elsewhere_holds_back_only_the_cheap_bound(
    store: HookedSqlStore,
) -> None:
    """Another application's open transaction pins the snapshot's xmin; the precise
    frontier (this schema's writers only) lets the committed event through."""
    if store.dialect != "postgresql":
        return
    import asyncpg

    from tests.conftest import PG_URL

    other = await asyncpg.connect(PG_URL)
    try:
        outside = other.transaction()
        await outside.start()
        await other.fetchval("SELECT pg_current_xact_id()")  # now it holds a transaction id
        await store.run(put("after-the-long-one"))
        async with store.db.read() as conn:
            cheap, held = await read_after(conn, START, 10)
            assert cheap == [] and held
            precise, held = await read_after(conn, START, 10, precise=True)
        assert [e.id for e in precise] == ["after-the-long-one"] and not held
        await outside.rollback()
    finally:
        await other.close()
