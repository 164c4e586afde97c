"""The event machinery of one gateway process: bus, relay, consumer-group members."""

from __future__ import annotations

from gateway.events.bus import Bus
from gateway.events.consumer import ConsumerService
from gateway.events.memory_bus import InProcessBus
from gateway.events.redis_bus import RedisStreamBus
from gateway.events.relay import Relay
from gateway.settings import Settings
from gateway.storage.db import Database


def build_bus(redis_url: str | None, prefix: str = "carepath") -> Bus:
    """Redis Streams when a Redis URL is configured, else the in-process bus."""
    if redis_url:
        return RedisStreamBus(redis_url, prefix)
    return InProcessBus()


class EventRuntime:
    """Started and stopped with the app (a ``Service`` of ``gateway.main``)."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.settings = settings
        self.bus = build_bus(settings.redis_url, settings.redis_prefix)
        #: lock keys and names unique per deployment (prefix) and database schema
        self.namespace = f"{settings.redis_prefix}:{settings.database_schema or ''}"
        self.relay = Relay(db, self.bus, namespace=self.namespace,
                           poll_ms=settings.event_poll_ms)
        self.consumers: list[ConsumerService] = []

    def add_consumer(self, consumer: ConsumerService) -> None:
        self.consumers.append(consumer)

    async def start(self) -> None:
        await self.bus.open()
        await self.relay.start()
        for consumer in self.consumers:
            await consumer.start()

    async def stop(self) -> None:
        for consumer in reversed(self.consumers):
            await consumer.stop()
        await self.relay.stop()
        await self.bus.close()
