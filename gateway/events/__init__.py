"""Durable events: the outbox relay and the bus it publishes into.

May import: ``gateway.storage`` (outbox reading and positions; ADR 0003),
``gateway.settings``. Never ``gateway.interactions`` or anything above.
"""

from gateway.events.bus import Bus, BusConsumer, BusEntry
from gateway.events.consumer import ConsumerService
from gateway.events.memory_bus import InProcessBus
from gateway.events.redis_bus import RedisStreamBus
from gateway.events.relay import GROUP_PREFIX, Relay
from gateway.events.runtime import EventRuntime, build_bus

__all__ = [
    "GROUP_PREFIX",
    "Bus",
    "BusConsumer",
    "BusEntry",
    "ConsumerService",
    "EventRuntime",
    "InProcessBus",
    "RedisStreamBus",
    "Relay",
    "build_bus",
]
