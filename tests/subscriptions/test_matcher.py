"""The matcher numbering events in the relay's round (ADR 0004), and its safety net."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.events import InProcessBus, Relay
from gateway.events.bus import BusEntry
from gateway.settings import Settings
from gateway.storage import subscription_tables as tables
from gateway.storage.commit_hooks import HookedSqlStore
from gateway.storage.interface import StoreTransaction
from gateway.storage.outbox import Position
from gateway.subscriptions.endpoint import EndpointPolicy
from gateway.subscriptions.matcher import Matcher
from gateway.subscriptions.topics import TopicRegistry
from tests.subscriptions.conftest import TOPIC, subscription

DISCHARGE = TOPIC + "encounter-discharge"


class Heard:
    def __init__(self) -> None:
        self.rows: dict[str, list[tables.EventRow]] = {}

    def __call__(self, ids: set[str], rows: dict[str, list[tables.EventRow]]) -> None:
        for sid, new in rows.items():
            self.rows.setdefault(sid, []).extend(new)


async def put(store: HookedSqlStore, resource: dict[str, Any]) -> None:
    async def work(tx: StoreTransaction) -> Any:
        previous = await tx.current(resource["resourceType"], resource["id"])
        return await tx.put(resource["resourceType"], resource["id"], resource,
                            "PUT" if previous else "POST", previous)

    await store.run(work)


async def discharge(store: HookedSqlStore, n: int, prefix: str = "e") -> list[str]:
    ids = [f"{prefix}{i}" for i in range(n)]
    for rid in ids:
        await put(store, {"resourceType": "Encounter", "id": rid, "status": "finished",
                          "class": {"code": "IMP"}})
    return ids


async def numbered(store: HookedSqlStore, sid: str) -> list[tuple[int, str]]:
    async with store.db.read() as conn:
        rows = await tables.events_between(conn, sid, 1, 1000, 1000)
    return [(r.number, r.id) for r in rows]


class NoDatabase:
    """Any use of the database fails the test."""

    def transaction(self) -> Any:
        raise AssertionError("the database was used")

    read = transaction


async def subscribed(store: HookedSqlStore) -> tuple[Heard, Matcher, Relay]:
    """A matcher (telling ``Heard``), a relay without it, and Subscription s1 written."""
    heard = Heard()
    settings = Settings(dev_mode=True)
    matcher = Matcher(store.db, TopicRegistry.load(), settings,
                      EndpointPolicy.from_settings(settings), namespace="t", on_work=heard)
    relay = Relay(store.db, InProcessBus(), precise=True)
    await put(store, {**subscription(DISCHARGE, "http://127.0.0.1:9/hook"), "id": "s1"})
    return heard, matcher, relay


def entry(position: Position) -> BusEntry:
    return BusEntry("1-0", "x", position, "Encounter", "e", 1, "create", 0)


async def test_the_relay_round_numbers_the_events_and_bus_entries_then_cost_nothing(
    store: HookedSqlStore,
) -> None:
    heard, matcher, relay = await subscribed(store)
    relay.in_round = matcher.within_relay
    ids = await discharge(store, 3)
    assert (await relay.relay_once())[0] == 4  # the Subscription and three Encounters
    assert await numbered(store, "s1") == [(1, ids[0]), (2, ids[1]), (3, ids[2])]
    assert [r.number for r in heard.rows["s1"]] == [1, 2, 3]  # told after the commit
    async with store.db.read() as conn:
        last = await conn.fetchrow(
            "SELECT tx_id, seq FROM outbox WHERE res_id = ?", (ids[2],))
    assert last is not None
    db = matcher.db
    matcher.db = NoDatabase()  # type: ignore[assignment]
    await matcher.handle([entry(Position(int(last[0]), int(last[1])))])  # already done
    matcher.db = db
    await matcher.catch_up()  # a round of its own finds nothing more
    assert await numbered(store, "s1") == [(1, ids[0]), (2, ids[1]), (3, ids[2])]


async def test_a_matcher_behind_the_relay_reads_what_it_missed_in_order(
    store: HookedSqlStore,
) -> None:
    _heard, matcher, relay = await subscribed(store)
    first = await discharge(store, 2, "a")
    await relay.relay_once()  # relayed without matching (another process, say)
    relay.in_round = matcher.within_relay
    second = await discharge(store, 2, "b")
    assert (await relay.relay_once())[0] == 2
    assert [i for _n, i in await numbered(store, "s1")] == first + second
    assert [n for n, _i in await numbered(store, "s1")] == [1, 2, 3, 4]


async def test_a_failed_relay_round_numbers_nothing_and_the_bus_path_takes_over(
    store: HookedSqlStore,
) -> None:
    heard, matcher, relay = await subscribed(store)
    ids = await discharge(store, 2)
    calls = 0

    async def failing(conn: Any, after: Position, events: Any) -> Any:
        nonlocal calls
        calls += 1
        told = await matcher.within_relay(conn, after, events)
        raise RuntimeError("broken after numbering")
        return told  # pragma: no cover

    relay.in_round = failing
    with pytest.raises(RuntimeError):
        await relay.relay_once()
    assert await numbered(store, "s1") == []  # rolled back with the round
    assert heard.rows == {}
    assert (await relay.relay_once())[0] == 3  # published, without the failing work
    assert calls == 1
    await matcher.catch_up()  # what the bus entries and the idle catch-up do
    assert await numbered(store, "s1") == [(1, ids[0]), (2, ids[1])]
    assert [r.number for r in heard.rows["s1"]] == [1, 2]


async def test_a_waiter_cancelled_during_the_relay_round_does_not_break_it(
    store: HookedSqlStore,
) -> None:
    heard, matcher, relay = await subscribed(store)
    ids = await discharge(store, 2)
    waiters: list[asyncio.Task[None]] = []

    async def in_round(conn: Any, after: Position, events: Any) -> Any:
        told = await matcher.within_relay(conn, after, events)
        # a bus consumer waits for this round's numbering, and is stopped meanwhile
        waiter = asyncio.create_task(matcher.catch_up(events[-1].position))
        waiters.append(waiter)
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.sleep(0)
        return told

    relay.in_round = in_round
    assert (await relay.relay_once())[0] == 3
    assert waiters and waiters[0].cancelled()
    assert await numbered(store, "s1") == [(1, ids[0]), (2, ids[1])]
    assert [r.number for r in heard.rows["s1"]] == [1, 2]  # told after the commit


async def test_a_subscription_written_between_events_of_one_round_keeps_one_numbering(
    store: HookedSqlStore,
) -> None:
    """An event, a client's write to the Subscription, another event: one round numbers
    both events for it, 1 and 2, and saves the count 2."""
    heard, matcher, relay = await subscribed(store)
    relay.in_round = matcher.within_relay
    await relay.relay_once()  # s1 registered
    before = await discharge(store, 1, "a")
    await put(store, {**subscription(DISCHARGE, "http://127.0.0.1:9/hook", heartbeat=60),
                      "id": "s1"})
    after = await discharge(store, 1, "b")
    assert (await relay.relay_once())[0] == 3
    assert await numbered(store, "s1") == [(1, before[0]), (2, after[0])]
    assert [r.number for r in heard.rows["s1"]] == [1, 2]
    more = await discharge(store, 1, "c")
    await relay.relay_once()
    assert await numbered(store, "s1") == [(1, before[0]), (2, after[0]), (3, more[0])]


async def test_events_numbered_before_a_subscription_is_switched_off_are_counted(
    store: HookedSqlStore,
) -> None:
    """Switched off after an event in the same round, then on again: numbering goes on
    from the count, not over the numbers already given."""
    _heard, matcher, relay = await subscribed(store)
    relay.in_round = matcher.within_relay
    await relay.relay_once()
    first = await discharge(store, 1, "a")
    await put(store, {**subscription(DISCHARGE, "http://127.0.0.1:9/hook", status="off"),
                      "id": "s1"})
    await relay.relay_once()
    await put(store, {**subscription(DISCHARGE, "http://127.0.0.1:9/hook"), "id": "s1"})
    second = await discharge(store, 1, "b")
    await relay.relay_once()
    assert await numbered(store, "s1") == [(1, first[0]), (2, second[0])]


async def test_events_of_a_subscription_deleted_later_in_the_round_are_not_recorded(
    store: HookedSqlStore,
) -> None:
    _heard, matcher, relay = await subscribed(store)
    relay.in_round = matcher.within_relay
    await relay.relay_once()
    await discharge(store, 1, "a")

    async def gone(tx: StoreTransaction) -> Any:
        previous = await tx.current("Subscription", "s1")
        assert previous is not None
        return await tx.delete(previous)

    await store.run(gone)
    assert (await relay.relay_once())[0] == 2
    async with store.db.read() as conn:
        left = await conn.fetch("SELECT count(*) FROM subscription_event", ())
    assert int(left[0][0]) == 0
