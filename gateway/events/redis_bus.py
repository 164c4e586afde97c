"""The production bus: one Redis Stream, consumer groups per kind of consumer.

Key layout (``prefix`` = ``CAREPATH_REDIS_PREFIX``):

* ``{prefix}:events`` — the stream; one entry per outbox event (fields in
  :func:`gateway.events.bus.entry_fields`, event id in ``e``).
* ``{prefix}:epoch`` — a random marker the relay sets when it starts
  publishing into an empty Redis. When it is gone (``FLUSHALL``, a restart
  without persistence) the relay knows entries may be lost and re-publishes
  from the lowest consumer position in the database.

Consumers read with ``XREADGROUP`` and acknowledge with ``XACK``; entries a
crashed member left pending are reclaimed with ``XAUTOCLAIM``. :meth:`trim`
keeps the stream short but never drops an entry some group has pending or
has not read yet.

https://redis.io/docs/latest/develop/data-types/streams/
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from gateway.events.bus import FIELDS, BusConsumer, BusEntry, entry_fields, entry_from_fields
from gateway.storage.outbox import OutboxEvent

log = logging.getLogger("carepath.events")

#: entries kept when no consumer group exists yet
UNGROUPED_MAXLEN = 10_000
#: a consumer that has been idle this long with nothing pending is removed
DEAD_CONSUMER_MS = 3_600_000


#: XADD the entries (ARGV[2..]: name/value pairs, FIELDS per entry) only while the
#: generation (KEYS[1]) is still ARGV[1]; returns the generation found
_PUBLISH = f"""
local current = redis.call('GET', KEYS[1])
if current ~= ARGV[1] then return current end
for i = 2, #ARGV, {2 * len(FIELDS)} do
  redis.call('XADD', KEYS[2], '*', unpack(ARGV, i, i + {2 * len(FIELDS) - 1}))
end
return current
"""


def _stream_id(text: object) -> tuple[int, int] | None:
    if not isinstance(text, str | bytes) or not text:
        return None
    raw = text.decode() if isinstance(text, bytes) else text
    ms, _, seq = raw.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return None


class RedisStreamBus:
    kind = "redis"

    def __init__(self, url: str, prefix: str = "carepath") -> None:
        self.url = url
        self.stream = f"{prefix}:events"
        self.epoch_key = f"{prefix}:epoch"
        self.redis: aioredis.Redis = aioredis.Redis.from_url(url, decode_responses=True)
        self._publish = self.redis.register_script(_PUBLISH)

    async def open(self) -> None:
        return None  # connections are made on first use; Redis may start later

    async def close(self) -> None:
        await self.redis.aclose()

    async def ping(self) -> None:
        await self.redis.ping()

    async def epoch(self) -> str | None:
        value = await self.redis.get(self.epoch_key)
        return str(value) if value is not None else None

    async def new_epoch(self) -> str:
        await self.redis.set(self.epoch_key, secrets.token_hex(8), nx=True)
        value = await self.redis.get(self.epoch_key)
        assert value is not None
        return str(value)

    async def publish(self, events: Sequence[OutboxEvent], epoch: str) -> str | None:
        args: list[str] = [epoch]
        for event in events:
            for name, value in entry_fields(event).items():
                args += (name, value)
        current = await self._publish(keys=[self.epoch_key, self.stream], args=args)
        return str(current) if current is not None else None

    async def trim(self) -> None:
        try:
            groups: list[dict[str, Any]] = await self.redis.xinfo_groups(self.stream)
        except ResponseError:
            return  # no stream yet
        if not groups:
            await self.redis.xtrim(self.stream, maxlen=UNGROUPED_MAXLEN, approximate=True)
            return
        floor: tuple[int, int] | None = None
        for group in groups:
            name = str(group["name"])
            mark = _stream_id(group.get("last-delivered-id"))
            if int(group.get("pending") or 0) > 0:
                pending = await self.redis.xpending(self.stream, name)
                oldest = _stream_id(pending.get("min"))
                if oldest is None:
                    return  # the summary raced with acknowledgements: next time
                mark = oldest if mark is None else min(mark, oldest)
            if mark is None:
                return  # unknown: trim nothing rather than too much
            floor = mark if floor is None else min(floor, mark)
            await self._drop_dead_consumers(name)
        if floor is not None and floor > (0, 0):
            # MINID drops entries below the id: pending and unread ones stay
            await self.redis.xtrim(self.stream, minid=f"{floor[0]}-{floor[1]}",
                                   approximate=False)

    async def _drop_dead_consumers(self, group: str) -> None:
        for member in await self.redis.xinfo_consumers(self.stream, group):
            if int(member.get("pending") or 0) == 0 and int(member.get("idle") or 0) > \
                    DEAD_CONSUMER_MS:
                await self.redis.xgroup_delconsumer(self.stream, group, str(member["name"]))

    def consumer(self, group: str, name: str) -> BusConsumer:
        return _RedisConsumer(self, group, name)


class _RedisConsumer:
    def __init__(self, bus: RedisStreamBus, group: str, name: str) -> None:
        self.bus = bus
        self.group = group
        self.name = name

    async def _ensure_group(self) -> None:
        try:
            # from 0: after a flush the relay re-publishes before we re-create
            await self.bus.redis.xgroup_create(self.bus.stream, self.group, id="0",
                                               mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read(self, count: int, block_ms: int) -> list[BusEntry]:
        try:
            reply = await self.bus.redis.xreadgroup(
                self.group, self.name, {self.bus.stream: ">"}, count=count, block=block_ms
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc) and "no longer exists" not in str(exc):
                raise
            log.info("consumer group %s missing on %s: creating it", self.group, self.bus.stream)
            await self._ensure_group()
            return []
        streams: list[Any] = list(reply or [])
        return [_entry(eid, f) for _stream, items in streams for eid, f in items]

    async def claim_stale(self, min_idle_ms: int, count: int) -> list[BusEntry]:
        try:
            reply = await self.bus.redis.xautoclaim(
                self.bus.stream, self.group, self.name, min_idle_ms, start_id="0-0", count=count
            )
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                await self._ensure_group()
                return []
            raise
        claimed: list[Any] = list(reply[1])
        return [_entry(eid, f) for eid, f in claimed if f]

    async def ack(self, entries: Sequence[BusEntry]) -> None:
        if entries:
            await self.bus.redis.xack(self.bus.stream, self.group,
                                      *[e.entry_id for e in entries])


def _entry(entry_id: str, fields: dict[str, str]) -> BusEntry:
    return entry_from_fields(str(entry_id), fields)
