"""The outbox relay: in order, from a DB position, once per event, across Redis loss."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from gateway.events import InProcessBus, RedisStreamBus, Relay
from gateway.events.consumer import ConsumerService
from gateway.storage.commit_hooks import HookedSqlStore
from gateway.storage.interface import StoreTransaction
from gateway.storage.outbox import Position, load_position, save_position
from tests.conftest import REDIS_URL
from tests.events.conftest import PrivateRedis, eventually


async def write(store: HookedSqlStore, n: int, prefix: str = "p") -> list[str]:
    ids = []
    for i in range(n):
        rid = f"{prefix}{i}"

        async def work(tx: StoreTransaction, rid: str = rid) -> Any:
            return await tx.put("Patient", rid, {"resourceType": "Patient"}, "POST", None)

        await store.run(work)
        ids.append(rid)
    return ids


async def stream_ids(bus: RedisStreamBus) -> list[str]:
    entries = await bus.redis.xrange(bus.stream)
    return [fields["i"] for _id, fields in entries]


async def test_relay_publishes_every_event_in_order_into_the_in_process_bus(
    store: HookedSqlStore,
) -> None:
    bus = InProcessBus()
    member = bus.consumer("g", "one")
    relay = Relay(store.db, bus, precise=True)
    ids = await write(store, 5)
    assert await relay.relay_once() == (5, False)
    got = await member.read(100, 100)
    assert [e.id for e in got] == ids
    assert [e.version for e in got] == [1] * 5
    assert got[0].position < got[-1].position
    assert await relay.relay_once() == (0, False)  # nothing new


async def test_relay_resumes_from_its_stored_position_after_a_restart(
    store: HookedSqlStore, prefix: str,
) -> None:
    bus = RedisStreamBus(REDIS_URL, prefix)
    try:
        await write(store, 3, "a")
        await Relay(store.db, bus, precise=True).relay_once()
        await write(store, 2, "b")
        again = Relay(store.db, bus, precise=True)  # a new process
        assert await again.relay_once() == (2, False)
        assert await stream_ids(bus) == ["a0", "a1", "a2", "b0", "b1"]
    finally:
        await bus.close()


async def test_concurrent_relays_publish_each_event_once(
    store: HookedSqlStore, prefix: str,
) -> None:
    bus = RedisStreamBus(REDIS_URL, prefix)
    relays = [Relay(store.db, bus, poll_ms=20) for _ in range(3)]
    try:
        for relay in relays:
            await relay.start()
        ids = await write(store, 30)
        await eventually(lambda: sum(r.published for r in relays) >= 30)
        await asyncio.sleep(0.1)
        assert await stream_ids(bus) == ids
    finally:
        for relay in relays:
            await relay.stop()
        await bus.close()


async def test_a_commit_wakes_the_relay_at_once(store: HookedSqlStore, prefix: str) -> None:
    bus = RedisStreamBus(REDIS_URL, prefix)
    relay = Relay(store.db, bus, poll_ms=60_000)  # polling alone would take a minute
    store.after_commit.append(relay.wake)
    await relay.start()
    try:
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await write(store, 1)
        while relay.published < 1:
            assert time.monotonic() - started < 2
            await asyncio.sleep(0.002)
    finally:
        await relay.stop()
        await bus.close()


async def test_redis_flushed_relay_republishes_from_the_lowest_consumer_position(
    store: HookedSqlStore, private_redis: PrivateRedis,
) -> None:
    bus = RedisStreamBus(private_redis.url, "c")
    # an idle relay looks at the bus's generation every epoch_check_s
    relay = Relay(store.db, bus, precise=True, epoch_check_s=0)
    try:
        await write(store, 6)
        await relay.relay_once()
        async with store.db.read() as conn:
            relayed = await load_position(conn, "relay")
        assert relayed is not None
        # a consumer group has handled the first two events (its own DB position)
        second = await _position_of(store, "p1")
        async with store.db.transaction() as conn:
            await save_position(conn, "group:test", second)
        private_redis.flush()
        assert await stream_ids(bus) == []
        published, _ = await relay.relay_once()
        assert published == 4
        assert await stream_ids(bus) == ["p2", "p3", "p4", "p5"]
        # Redis restarted empty (no persistence): the same again
        await bus.redis.connection_pool.disconnect()
        private_redis.stop()
        private_redis.start()
        assert (await relay.relay_once())[0] == 4
        assert await stream_ids(bus) == ["p2", "p3", "p4", "p5"]
    finally:
        await bus.close()


async def test_a_flush_noticed_by_the_next_publication_rewinds_at_once(
    store: HookedSqlStore, private_redis: PrivateRedis,
) -> None:
    bus = RedisStreamBus(private_redis.url, "c")
    relay = Relay(store.db, bus, precise=True)  # idle checks a second apart
    try:
        await write(store, 3)
        assert (await relay.relay_once())[0] == 3
        first = await _position_of(store, "p0")
        async with store.db.transaction() as conn:
            await save_position(conn, "group:test", first)
        private_redis.flush()
        assert (await relay.relay_once())[0] == 0  # idle: not looked at yet
        await write(store, 1, prefix="q")
        # the publication of q0 finds the generation changed (and appends nothing), so
        # the round publishes again after the slowest consumer
        assert (await relay.relay_once())[0] == 3
        assert await stream_ids(bus) == ["p1", "p2", "q0"]
    finally:
        await bus.close()


async def _position_of(store: HookedSqlStore, rid: str) -> Position:
    async with store.db.read() as conn:
        row = await conn.fetchrow("SELECT tx_id, seq FROM outbox WHERE res_id = ?", (rid,))
    assert row is not None
    return Position(int(row[0]), int(row[1]))


async def test_entries_of_a_crashed_consumer_are_reclaimed(
    store: HookedSqlStore, prefix: str,
) -> None:
    bus = RedisStreamBus(REDIS_URL, prefix)
    try:
        crashed = bus.consumer("g", "crashed")
        await crashed.read(10, 10)  # creates the group
        ids = await write(store, 3)
        await Relay(store.db, bus, precise=True).relay_once()
        taken = await crashed.read(10, 100)
        assert [e.id for e in taken] == ids  # ... and never acknowledged
        survivor = bus.consumer("g", "survivor")
        assert await survivor.read(10, 10) == []
        reclaimed = await survivor.claim_stale(0, 10)
        assert [e.id for e in reclaimed] == ids
        await survivor.ack(reclaimed)
        pending = await bus.redis.xpending(bus.stream, "g")
        assert pending["pending"] == 0
    finally:
        await bus.close()


async def test_trimming_never_drops_pending_or_unread_entries(
    store: HookedSqlStore, prefix: str,
) -> None:
    bus = RedisStreamBus(REDIS_URL, prefix)
    try:
        fast, slow = bus.consumer("fast", "f"), bus.consumer("slow", "s")
        await fast.read(1, 1)
        await slow.read(1, 1)
        ids = await write(store, 6)
        await Relay(store.db, bus, precise=True).relay_once()
        await fast.ack(await fast.read(10, 100))  # fast is done with all six
        slow_got = await slow.read(2, 100)  # slow took two, acknowledged one
        await slow.ack(slow_got[:1])
        await bus.trim()
        # p0 is gone; p1 is pending for "slow", p2.. are unread by "slow"
        assert await stream_ids(bus) == ids[1:]
        await slow.ack(slow_got[1:])
        await slow.ack(await slow.read(10, 100))
        await bus.trim()
        remaining = await stream_ids(bus)
        assert len(remaining) <= 1  # MINID keeps the last-delivered entry itself
    finally:
        await bus.close()


async def test_consumer_service_handles_and_acknowledges(
    store: HookedSqlStore, prefix: str,
) -> None:
    bus = RedisStreamBus(REDIS_URL, prefix)
    seen: list[str] = []
    idles = 0

    async def handle(entries: Any) -> None:
        seen.extend(e.id for e in entries)

    async def idle() -> None:
        nonlocal idles
        idles += 1

    service = ConsumerService(bus, "svc", handle, idle=idle, block_ms=50)
    await service.start()
    try:
        ids = await write(store, 4)
        await Relay(store.db, bus, precise=True).relay_once()
        await eventually(lambda: len(seen) >= 4)
        assert seen == ids
        await asyncio.sleep(0.2)
        assert idles > 0
        pending = await bus.redis.xpending(bus.stream, "svc")
        assert pending["pending"] == 0
    finally:
        await service.stop()
        await bus.close()


async def test_redis_down_relay_retries_without_losing_its_position(
    store: HookedSqlStore, private_redis: PrivateRedis,
) -> None:
    bus = RedisStreamBus(private_redis.url, "d")
    relay = Relay(store.db, bus, poll_ms=20)
    try:
        await write(store, 2, "x")
        # (a transaction elsewhere on the server, another test's, may hold the first
        # round back: the cheap bound waits for it)
        deadline = time.monotonic() + 10
        while await stream_ids(bus) != ["x0", "x1"] and time.monotonic() < deadline:
            await relay.relay_once()
            await asyncio.sleep(0.02)
        assert await stream_ids(bus) == ["x0", "x1"]
        async with store.db.transaction() as conn:  # a consumer group has handled x0
            await save_position(conn, "group:test", await _position_of(store, "x0"))
        private_redis.stop()
        await write(store, 2, "y")
        await relay.start()  # keeps failing, keeps its position
        await asyncio.sleep(0.3)
        private_redis.start()
        expected = ["x1", "y0", "y1"]  # Redis came back empty: from the group's position
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if await stream_ids(bus) == expected:
                    break
            except Exception:
                pass
            await asyncio.sleep(0.05)
        assert await stream_ids(bus) == expected
    finally:
        await relay.stop()
        await bus.close()


async def test_a_long_transaction_elsewhere_delays_the_relay_only_briefly(
    store: HookedSqlStore,
) -> None:
    if store.dialect != "postgresql":
        return
    import asyncpg

    from tests.conftest import PG_URL

    bus = InProcessBus()
    member = bus.consumer("g", "one")
    relay = Relay(store.db, bus, poll_ms=20)
    other = await asyncpg.connect(PG_URL)
    outside = other.transaction()
    await outside.start()
    await other.fetchval("SELECT pg_current_xact_id()")
    await relay.start()
    try:
        ids = await write(store, 3)
        started = time.monotonic()
        got: list[Any] = []
        while len(got) < 3:
            assert time.monotonic() - started < 3, "events stayed behind the open transaction"
            got += await member.read(10, 50)
        assert [e.id for e in got] == ids
    finally:
        await relay.stop()
        await outside.rollback()
        await other.close()
