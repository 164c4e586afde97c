"""A :class:`SqlStore` that tells listeners when a write transaction committed.

The outbox relay listens, so an event leaves for the bus right after its
commit instead of at the relay's next poll. Listeners run on the event loop
after the commit and must not block (setting an ``asyncio.Event`` is typical).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from gateway.storage.sql import SqlStore

T = TypeVar("T")


class HookedSqlStore(SqlStore):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.after_commit: list[Callable[[], None]] = []

    async def run(self, work: Callable[[Any], Awaitable[T]]) -> T:
        result = await super().run(work)
        for listener in self.after_commit:
            listener()
        return result
