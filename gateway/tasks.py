"""Background tasks of the gateway's services (relay, consumers, audit, deliveries)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel ``tasks`` (all at once) and wait until each has stopped."""
    running = [t for t in tasks if t is not None]
    for task in running:
        task.cancel()
    for task in running:
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Loop:
    """A service whose work is one background task running :meth:`_run`, named
    ``task_name``: started by :meth:`start`, cancelled and awaited by :meth:`stop`."""

    task_name = "loop"
    _task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.task_name)

    async def stop(self) -> None:
        await cancel(self._task)
        self._task = None

    async def _run(self) -> None:
        raise NotImplementedError
