"""The outbox relay: committed outbox events → the bus, from a position kept in the DB.

Every gateway process runs a relay; one relays at a time. Each round is one
database transaction that takes the lock ``{namespace}:relay``, reads the
relay's position (``event_position`` row ``relay``), publishes the final
outbox events after it (:func:`gateway.storage.outbox.read_after`) and stores
the new position. A crash between publishing and committing publishes those
events again: delivery to the bus is at least once and consumers are
idempotent on the event id.

Redis loss: the position row also records the Redis generation
(:meth:`~gateway.events.bus.Bus.epoch`) it published into. When Redis comes
back empty, the relay rewinds to the lowest consumer position
(``event_position`` rows ``group:*``) and publishes from there again.

The relay runs when a local commit wakes it (:meth:`wake`, wired to the
store's commit hook) and otherwise every ``poll_ms`` (commits made by other
processes). Work that must follow the published events closely can run in the
round's own transaction (:attr:`Relay.in_round`; the subscription matcher):
it then costs no transaction and no trip through the bus of its own.

A publication names the generation it expects and the bus appends only into
that one (same round trip); a relay with nothing to publish looks at the
generation every ``epoch_check_s`` (1 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from gateway import tasks
from gateway.events.bus import Bus
from gateway.storage.db import Connection, Database, RetryableError
from gateway.storage.outbox import (
    START,
    OutboxEvent,
    Position,
    load_position,
    lowest_position,
    read_after,
    save_position,
)

log = logging.getLogger("carepath.events")

RELAY = "relay"
GROUP_PREFIX = "group:"
BATCH = 500
#: how soon to look again when an older transaction holds committed events back
HELD_RETRY_S = 0.005
#: how long events may be held back before the relay looks at pg_locks for the reason
PRECISE_AFTER_S = 0.25
PRECISE_FOR_S = 2.0
TRIM_EVERY_S = 10.0
#: how often an idle relay checks that the bus still has what it published
EPOCH_CHECK_S = 1.0


#: ``in_round(conn, after, events)``: ``events`` follow position ``after``; returns
#: a callback told after the round whether its transaction committed
InRound = Callable[[Connection, Position, list[OutboxEvent]], Awaitable[Callable[[bool], None]]]
#: after ``in_round`` failed, rounds go without it this long (the bus path covers it)
IN_ROUND_OFF_S = 30.0


class Relay:
    def __init__(self, db: Database, bus: Bus, *, namespace: str = "carepath",
                 poll_ms: int = 500, precise: bool = False,
                 epoch_check_s: float = EPOCH_CHECK_S) -> None:
        self.db = db
        self.bus = bus
        self.lock_key = f"{namespace}:relay"
        self.poll = poll_ms / 1000
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._last_trim = 0.0
        self.published = 0  # events published by this process (for tests and metrics)
        self._stalled_since: float | None = None  # held back and nothing published
        #: always bound reads by this schema's writers (pg_locks): one round then
        #: publishes everything committed, whatever else runs on the server
        self._always_precise = precise
        self._precise_until = 0.0
        self._epoch_checked = 0.0
        self._epoch_check_s = epoch_check_s
        #: work done inside the round's transaction with the events just published
        #: (the subscription matcher numbers them there); see :data:`InRound`
        self.in_round: InRound | None = None
        self._in_round_off_until = 0.0

    def wake(self) -> None:
        self._wake.set()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        await self.bus.open()
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="outbox-relay")

    async def stop(self) -> None:
        # the flag too: a client library may turn our cancellation into its own error
        self._stopping = True
        await tasks.cancel(self._task)
        self._task = None

    async def _run(self) -> None:
        backoff = 0.05
        while not self._stopping:
            self._wake.clear()
            try:
                published, held = await self.relay_once()
                backoff = 0.05
            except Exception as exc:
                if self._stopping:
                    return
                log.warning("outbox relay: %s; retrying in %.2fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if published == BATCH:
                continue
            if time.monotonic() - self._last_trim > TRIM_EVERY_S:
                await self._trim()
            if held:
                await asyncio.sleep(HELD_RETRY_S)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll)

    async def _trim(self) -> None:
        self._last_trim = time.monotonic()
        try:
            await self.bus.trim()
        except Exception as exc:
            log.warning("trimming the event stream failed: %s", exc)

    async def relay_once(self) -> tuple[int, bool]:
        """One round; returns (events published, whether final events were held back)."""
        told: Callable[[bool], None] | None = None
        try:
            async with self.db.transaction() as conn:
                events, held, told = await self._round(conn)
        except BaseException:
            if told is not None:
                told(False)
            raise
        if told is not None:
            told(True)
        self.published += len(events)
        return len(events), held

    async def _round(
        self, conn: Connection
    ) -> tuple[list[OutboxEvent], bool, Callable[[bool], None] | None]:
        await conn.lock(self.lock_key)
        saved = await load_position(conn, RELAY)
        position = saved.position if saved else START
        now = time.monotonic()
        precise = self._always_precise or now < self._precise_until
        events, held = await read_after(conn, position, BATCH, precise=precise)
        if events or not held:
            self._stalled_since = None
        elif self._stalled_since is None:
            self._stalled_since = now
        elif not precise and now - self._stalled_since > PRECISE_AFTER_S:
            # perhaps a long transaction elsewhere on the server: look closer for a while
            self._precise_until = now + PRECISE_FOR_S
        expected = saved.epoch if saved else None
        if events and expected is None:  # the first round ever
            expected = await self.bus.new_epoch()
        if events:
            assert expected is not None
            # appended only into the generation we published into before; the
            # generation found comes back in the same round trip
            epoch = await self.bus.publish(events, expected)
            self._epoch_checked = now
        elif saved is None or now - self._epoch_checked >= self._epoch_check_s:
            epoch = await self.bus.epoch()
            self._epoch_checked = now
        else:
            epoch = expected  # looked at a moment ago
        after = position
        if epoch is not None and epoch == expected:
            if not events and saved is not None:
                return [], held, None
            position = events[-1].position if events else position
        elif saved is None:  # the first round ever, nothing to publish
            epoch = await self.bus.new_epoch()
        else:
            # the transport lost (or never had) what we published: go back to where
            # the slowest consumer group stands and publish from there again
            floor = await lowest_position(conn, GROUP_PREFIX)
            after = min(position, floor) if floor is not None else position
            log.warning("event bus generation changed (%s -> %s): re-publishing after %s",
                        saved.epoch, epoch, after)
            if epoch is None:
                epoch = await self.bus.new_epoch()
            events, held = await read_after(conn, after, BATCH, precise=precise)
            if events and await self.bus.publish(events, epoch) != epoch:
                raise RuntimeError("the event bus changed generation again; retrying")
            position = events[-1].position if events else after
        told = None
        if events and self.in_round is not None and now >= self._in_round_off_until:
            try:
                told = await self.in_round(conn, after, events)
            except RetryableError:
                raise  # a deadlock, say: the next round goes again
            except Exception as exc:
                # keep the bus going: for a while, leave that work to the bus consumers
                log.warning("work in the relay round failed (%s); relaying without it for"
                            " %.0f s", exc, IN_ROUND_OFF_S)
                self._in_round_off_until = now + IN_ROUND_OFF_S
                raise
        await save_position(conn, RELAY, position, epoch)
        return events, held, told
