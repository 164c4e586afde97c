"""The embedded bus: asyncio queues in one process (no Redis).

Every consumer group gets each published event; the members of a group share
one queue. Nothing survives the process — which loses nothing, because
positions live in the database and the relay and consumers resume from there.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence

from gateway.events.bus import BusConsumer, BusEntry, entry_fields, entry_from_fields
from gateway.storage.outbox import OutboxEvent

#: entries a group may queue before the oldest are dropped (consumers that
#: read the outbox themselves catch up from their position anyway)
MAX_QUEUED = 100_000


class InProcessBus:
    kind = "in-process"

    def __init__(self) -> None:
        self._groups: dict[str, asyncio.Queue[BusEntry]] = {}
        self._ids = itertools.count(1)

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        self._groups.clear()

    async def ping(self) -> None:
        return None  # in this process: reachable while the process runs

    async def epoch(self) -> str | None:
        # each process has its own queues: there is no shared data to lose
        return self.kind

    async def new_epoch(self) -> str:
        return self.kind

    async def publish(self, events: Sequence[OutboxEvent], epoch: str) -> str | None:
        for event in events:
            entry = entry_from_fields(str(next(self._ids)), entry_fields(event))
            for queue in self._groups.values():
                if queue.qsize() >= MAX_QUEUED:
                    queue.get_nowait()
                queue.put_nowait(entry)
        return self.kind

    async def trim(self) -> None:
        return None

    def consumer(self, group: str, name: str) -> BusConsumer:
        queue = self._groups.setdefault(group, asyncio.Queue())
        return _MemoryConsumer(queue)


class _MemoryConsumer:
    def __init__(self, queue: asyncio.Queue[BusEntry]) -> None:
        self._queue = queue

    async def read(self, count: int, block_ms: int) -> list[BusEntry]:
        try:
            first = await asyncio.wait_for(self._queue.get(), block_ms / 1000)
        except TimeoutError:
            return []
        out = [first]
        while len(out) < count and not self._queue.empty():
            out.append(self._queue.get_nowait())
        return out

    async def claim_stale(self, min_idle_ms: int, count: int) -> list[BusEntry]:
        return []  # a crash takes the whole process (and its queue) with it

    async def ack(self, entries: Sequence[BusEntry]) -> None:
        return None
