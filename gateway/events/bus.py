"""The event bus interface: what the relay publishes into and consumers read from.

Two implementations: :class:`~gateway.events.redis_bus.RedisStreamBus`
(production; several processes) and :class:`~gateway.events.memory_bus.InProcessBus`
(embedded; one process). The bus is transport, never the record: positions
live in the database (``event_position``), and a consumer that must not miss
anything reads the outbox itself and uses the bus to be woken up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.storage.outbox import OutboxEvent, Position


@dataclass(frozen=True, slots=True)
class BusEntry:
    """One event as carried by the bus; ``entry_id`` is the transport's id."""

    entry_id: str
    event_id: str
    position: Position
    resource_type: str
    id: str
    version: int
    interaction: str
    ts: int


#: the names of :func:`entry_fields`, in order
FIELDS = ("e", "p", "t", "i", "v", "o", "ts")


def entry_fields(event: OutboxEvent) -> dict[str, str]:
    """The fields an event travels with (Redis stream entry fields)."""
    return {
        "e": event.event_id,
        "p": str(event.position),
        "t": event.resource_type,
        "i": event.id,
        "v": str(event.version),
        "o": event.interaction,
        "ts": str(event.ts),
    }


def entry_from_fields(entry_id: str, fields: dict[str, str]) -> BusEntry:
    return BusEntry(
        entry_id, fields["e"], Position.parse(fields["p"]), fields["t"], fields["i"],
        int(fields["v"]), fields["o"], int(fields["ts"]),
    )


class BusConsumer(Protocol):
    """One member of a consumer group."""

    async def read(self, count: int, block_ms: int) -> list[BusEntry]:
        """New entries for this group (waits up to ``block_ms`` for some)."""

    async def claim_stale(self, min_idle_ms: int, count: int) -> list[BusEntry]:
        """Entries other members took but did not acknowledge for ``min_idle_ms``."""

    async def ack(self, entries: Sequence[BusEntry]) -> None: ...


class Bus(Protocol):
    kind: str

    async def open(self) -> None: ...
    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raises when the transport cannot be reached (readiness checks)."""

    async def epoch(self) -> str | None:
        """The transport's generation marker; ``None`` when it lost its data (or is new)."""

    async def new_epoch(self) -> str:
        """Start a generation (after a loss); returns the marker now in force."""

    async def publish(self, events: Sequence[OutboxEvent], epoch: str) -> str | None:
        """Append ``events`` if the generation is still ``epoch`` (atomically); returns the
        generation found (the events went in only when it equals ``epoch``)."""

    async def trim(self) -> None:
        """Drop entries every group has acknowledged; never pending ones."""

    def consumer(self, group: str, name: str) -> BusConsumer: ...
