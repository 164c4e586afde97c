"""Work that would hold the event loop for long: taken in turns, or on a thread.

A worker serves its requests on one event loop; CPU work that does not wait holds
every other request on that worker until it is done. Two kinds of work grow with a
request's body: validating a large resource (about 1-2 s per MB of a Questionnaire
or CodeSystem of nested items) and processing a Bundle's entries one after another
(about 1 ms each). The first runs on a thread once the resource is large
(:func:`in_thread`, :data:`REQUEST_BYTES`): the loop then gets the interpreter every
few milliseconds (``sys.getswitchinterval``) and answers the others meanwhile. The
second gives the loop a turn every 20 ms (:class:`Turns`).

The profiles stored on the server are compiled on a thread too, whatever the
request: after a write of a StructureDefinition, ValueSet or CodeSystem, the next
write that claims a stored profile reads them again (on the loop: the database) and
expands the stored value sets they bind and makes the snapshots of those stored
without one (``FhirValidator.with_stored``: about 1 s for a profile of 1,000 slices)
on a thread, and a resource that claims a
profile not compiled yet is validated on a thread (its first use compiles it,
``ProfileSet.get``: 0.65 s for that profile). ``StructureDefinition/$snapshot``
makes its snapshot on a thread. The compiled tables are shared with the loop:
``Model.type_node`` and ``ProfileSet.get`` compile under a lock and publish only
what is complete.
"""

from __future__ import annotations

import asyncio
import time
from contextvars import ContextVar
from typing import Any

from gateway.fhir import json as fjson

#: the size of the body the request being served sent (0: none, or not over HTTP)
REQUEST_BYTES: ContextVar[int] = ContextVar("carepath_request_bytes", default=0)
#: how long a run of work goes on before the loop gets a turn (:class:`Turns`)
SLICE_S = 0.02
#: a resource of this many bytes or more (as JSON) is validated on a thread (64 KiB:
#: up to about 0.1 s on the loop; a thread costs about 0.1 ms more)
THREAD_FROM = 64 * 1024


def in_thread(resource: Any) -> bool:
    """Whether work on ``resource`` (from the request's body) belongs on a thread."""
    return REQUEST_BYTES.get() >= THREAD_FROM and len(fjson.dumps(resource)) >= THREAD_FROM


class Turns:
    """Gives the event loop a turn during a long run of work that does not wait (a
    Bundle's entries validated and indexed one after another): :meth:`take` yields
    once :data:`SLICE_S` seconds have passed since the last turn. Without them, a
    4,000-entry transaction held its worker for 4 s, and every other request on it."""

    __slots__ = ("_due", "_slice")

    def __init__(self) -> None:
        self._slice = SLICE_S
        self._due = time.monotonic() + self._slice

    async def take(self) -> None:
        if time.monotonic() >= self._due:
            await asyncio.sleep(0)
            self._due = time.monotonic() + self._slice


__all__ = ["REQUEST_BYTES", "SLICE_S", "THREAD_FROM", "Turns", "in_thread"]
