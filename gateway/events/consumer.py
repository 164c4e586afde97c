"""A consumer-group member as a background service.

The loop reads new entries for its group, hands them to ``handle`` and
acknowledges them once ``handle`` returned. Every ``claim_every_s`` it first
reclaims entries other members took but never acknowledged (a crashed
process; ``XAUTOCLAIM``). When nothing arrived for ``block_ms`` it calls
``idle``: consumers that keep their own position in the database catch up
there, so an event whose bus entry was lost (Redis flushed) is still handled.

``handle`` must be idempotent on the event id: an entry can arrive twice
(relay re-publishing after a crash or a Redis loss, a reclaimed entry).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

from gateway import tasks
from gateway.events.bus import Bus, BusEntry

log = logging.getLogger("carepath.events")

Handler = Callable[[Sequence[BusEntry]], Awaitable[None]]
Idle = Callable[[], Awaitable[None]]


class ConsumerService:
    def __init__(
        self,
        bus: Bus,
        group: str,
        handle: Handler,
        *,
        idle: Idle | None = None,
        block_ms: int = 1000,
        claim_idle_ms: int = 30_000,
        claim_every_s: float = 10.0,
        count: int = 200,
        settle_ms: int = 0,
    ) -> None:
        self.bus = bus
        self.group = group
        self.name = f"{group}-{uuid.uuid4().hex[:12]}"
        self.handle = handle
        self.idle = idle
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.claim_every_s = claim_every_s
        self.count = count
        #: after a batch, wait this long before reading again (entries then come in
        #: batches): for consumers the bus only wakes, whose work is mostly done already
        self.settle_s = settle_ms / 1000
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"consumer-{self.group}")

    async def stop(self) -> None:
        # the flag too: a client library may turn our cancellation into its own error
        self._stopping = True
        await tasks.cancel(self._task)
        self._task = None

    async def _run(self) -> None:
        member = self.bus.consumer(self.group, self.name)
        next_claim = 0.0
        backoff = 0.05
        while not self._stopping:
            try:
                if time.monotonic() >= next_claim:
                    next_claim = time.monotonic() + self.claim_every_s
                    stale = await member.claim_stale(self.claim_idle_ms, self.count)
                    if stale:
                        log.info("%s reclaimed %d pending entries", self.name, len(stale))
                        await self.handle(stale)
                        await member.ack(stale)
                entries = await member.read(self.count, self.block_ms)
                if entries:
                    await self.handle(entries)
                    await member.ack(entries)
                    if self.settle_s:
                        await asyncio.sleep(self.settle_s)
                elif self.idle is not None:
                    await self.idle()
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._stopping:
                    return
                log.warning("consumer %s: %s; retrying in %.2fs", self.name, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
