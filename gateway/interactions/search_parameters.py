"""SearchParameters stored on this server are searched by, as R4's are
(searchparameter.html; an implementation guide's package carries them: US Core's
``race``, ISiK's, nl-core's).

A SearchParameter created or updated here is indexed on every write of its base
types from then on, listed in the CapabilityStatement, and answered by searches;
the resources stored before it are indexed in the background (``carepath reindex``
does the same by hand). Its types: token, string, date, number, quantity,
reference, uri, over an ``expression`` in FHIRPath.

A SearchParameter is refused (422 GW-4005) when it could never be used: no
``expression``, an expression FHIRPath cannot read (or the gateway cannot evaluate
on its base types), or a ``base`` that is no R4 resource type; one stored before it
would have been refused is left out, with a warning, when they are read. It is
stored but not used when it is ``retired`` or of type composite or special; and
not on a base type that has a parameter of its code already (R4's, the gateway's
own, or a stored one last changed before it): what is there keeps answering, as an
IG that republishes R4's ``name`` under its own URL expects.

Each worker process reads the stored SearchParameters when it starts, after a
write of one in that process (before that write is answered), and otherwise every
``CAREPATH_SEARCH_PARAMETER_REFRESH_S`` seconds (one indexed lookup of their
history). The worker that wrote one indexes the resources of its base types
again once every worker has had time to notice it, so that what another worker
wrote meanwhile is indexed too. What the server reads for this is its own
business: not limited by a caller's access, not audited as a caller's.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import re
from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from gateway.fhir.indexer import Indexer
from gateway.fhir.outcome import Code, FhirError
from gateway.interactions.stored_profiles import current_resources

if TYPE_CHECKING:
    from gateway.registry import Registry
    from gateway.storage.sql import SqlStore

log = logging.getLogger(__name__)

#: longest pause between attempts to index a type again while the database is out of
#: reach (from 1 s, doubling)
REINDEX_RETRY_MAX_S = 60.0

#: the parameter types a stored SearchParameter can have here
TYPES = frozenset({"token", "string", "date", "number", "quantity", "reference", "uri"})
#: (no '.' or ':': they chain and modify parameters)
_CODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-_]{0,63}")
#: the most SearchParameters read (R4 defines 1,400)
MAX_STORED = 10_000
#: after a write here, how long to wait for the next before reading them all again
_SETTLE_S = 0.3
#: the code a SearchParameter is checked under (no base type has a parameter of it)
_CHECK = "gw-check"


def _bases(sp: dict[str, Any]) -> list[str]:
    return [b for b in sp.get("base") or () if isinstance(b, str)]


def _compiles(base: Registry, sp: dict[str, Any]) -> str | None:
    """Why ``sp`` cannot be evaluated on its base types; None when it can."""
    expression = sp.get("expression")
    if not isinstance(expression, str) or not expression.strip():
        return "a SearchParameter searched by needs an expression"
    return _problem(base, expression, tuple(_bases(sp)), str(sp.get("type")))


@lru_cache(maxsize=4096)  # (an IG's parameters are checked again at every refresh)
def _problem(base: Registry, expression: str, bases: tuple[str, ...], type: str) -> str | None:
    from fhirpathpy import compile as fp_compile
    from fhirpathpy.models import models

    try:  # (read on an empty resource of each base: fhirpathpy checks some things then)
        fn = fp_compile(expression, models["r4"], {"userInvocationTable": {
            "resolve": {"fn": lambda inputs: [], "arity": {0: []}}}})
        for rtype in bases:
            fn({"resourceType": rtype}, None)
    except Exception as exc:
        return f"the expression is not FHIRPath: {str(exc)[:200]}"
    indexer = base.indexer.with_params([{"url": "urn:check", "code": _CHECK, "base": list(bases),
                                         "type": type, "expression": expression}])
    try:
        for rtype in bases:
            indexer.extract({"resourceType": rtype, "id": "x"})
            why = indexer.left_out(rtype).get(_CHECK)
            if why is not None:  # what the indexer could not compile is never indexed
                return f"the expression cannot be evaluated: {why}"
    except Exception as exc:
        return f"the expression cannot be evaluated: {str(exc)[:200]}"
    return None


def _kept_aside(sp: dict[str, Any]) -> bool:
    """Stored but not searched by, whatever else it says."""
    return sp.get("status") == "retired" or sp.get("type") not in TYPES


def check(base: Registry, sp: dict[str, Any]) -> None:
    """Refuse (422 GW-4005) a SearchParameter that could never be used."""
    if _kept_aside(sp):
        return
    bases = _bases(sp)
    unknown = [b for b in bases if not base.is_resource_type(b)]
    if not bases or unknown:
        raise FhirError(Code.INVALID_SEARCH_PARAMETER,
                        f"base must name R4 resource types, not {unknown[:3] or 'nothing'}",
                        ("SearchParameter.base",))
    code = sp.get("code")
    if not isinstance(code, str) or not _CODE.fullmatch(code):
        raise FhirError(Code.INVALID_SEARCH_PARAMETER,
                        "code must be letters, digits, '-' or '_', not starting with '_'",
                        ("SearchParameter.code",))
    problem = _compiles(base, sp)
    if problem is not None:
        raise FhirError(Code.INVALID_SEARCH_PARAMETER, problem, ("SearchParameter.expression",))


def usable(base: Registry, stored: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Of the stored SearchParameters (oldest first), those to search by."""
    out: list[dict[str, Any]] = []
    taken: set[tuple[str, str]] = set()
    for sp in stored:
        code, bases = sp.get("code"), _bases(sp)
        if _kept_aside(sp) or not isinstance(code, str) or not _CODE.fullmatch(code) \
                or not bases or not all(base.is_resource_type(b) for b in bases):
            continue
        # on a base that has the code already, what is there keeps answering
        free = [b for b in bases if code not in base.search_params(b) and (b, code) not in taken]
        if not free:
            continue
        if _compiles(base, sp) is not None:
            log.warning("stored SearchParameter %s cannot be used", str(sp.get("url"))[:200])
            continue
        taken.update((b, code) for b in free)
        out.append(sp)  # (Indexer.with_params keeps the first of a code on each base)
    return out


class StoredSearchParameters:
    """One app's view of the search parameters: R4's, the gateway's own and those
    stored in its database. ``registry`` is the app's registry (a copy of the
    process's, whose indexer it swaps when the stored ones change)."""

    def __init__(self, base: Registry, store: SqlStore, install: Callable[[Indexer], None], *,
                 refresh_s: float, reindex_delay_s: float | None = None,
                 local_bases: tuple[str, ...] = ()) -> None:
        """``install``: gives the store the indexer to write its index rows with;
        ``local_bases``: this server's public base URLs, for the reindex (as
        ``carepath reindex`` takes them)."""
        self.local_bases = local_bases
        self.base = base
        self.registry = copy.copy(base)
        self.store = store
        self.install = install
        self.refresh_s = refresh_s
        self.reindex_delay_s = 2 * refresh_s + 1 if reindex_delay_s is None else reindex_delay_s
        self.in_use: list[dict[str, Any]] = []
        self.on_change: list[Callable[[], None]] = []  # the CapabilityStatement's cache
        self._mark: tuple[int, int] = (0, 0)
        self._pending: set[str] = set()  # base types written here, not yet reindexed
        self._waiting: set[str] = set()  # base types whose reindex waits to begin
        self._written = False
        self._wake = asyncio.Event()
        self._refreshing = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._reindexing: set[asyncio.Task[None]] = set()

    def written(self, sp: dict[str, Any] | None) -> None:
        """A SearchParameter is being written here (``None``: deleted): look again
        once it commits."""
        self._written = True
        if sp is not None:
            self._pending.update(_bases(sp))

    def committed(self) -> None:
        """After every commit of this process (cheap unless a SearchParameter was
        written)."""
        if self._written:
            self._written = False
            self._wake.set()

    async def caught_up(self) -> None:
        """After a request's commit: a SearchParameter written is in use before the
        answer leaves, so that the writer's next request (an implementation guide's
        examples after its parameters) is indexed and searched by it."""
        if self._wake.is_set():
            self._wake.clear()
            await self.refresh()

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._run(), name="search-parameters")

    async def stop(self) -> None:
        for task in [self._task, *self._reindexing]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = None

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.refresh_s)
            if self._wake.is_set():  # (an IG's parameters come one after another: once)
                await asyncio.sleep(min(_SETTLE_S, self.refresh_s))
            self._wake.clear()
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:  # the database away: the next round tries again
                log.warning("stored SearchParameters not read", exc_info=True)

    async def refresh(self) -> bool:
        """Read the stored SearchParameters if their history changed; whether it did."""
        async with self._refreshing:
            return await self._refresh()

    async def _refresh(self) -> bool:
        mark = await self.store.versions_mark(("SearchParameter",))
        if mark == self._mark:
            return False
        stored = await self._read() if mark[0] else []
        in_use = usable(self.base, stored)
        indexer = self.base.indexer.with_params(in_use) if in_use else self.base.indexer
        self.registry.indexer = indexer
        self.registry.__dict__.pop("common_search_params", None)
        self.install(indexer)
        self._mark, self.in_use = mark, in_use
        for listener in self.on_change:
            listener()
        # (several written one after another: each type is indexed again once)
        types = sorted(self._pending & {b for sp in in_use for b in _bases(sp)} - self._waiting)
        self._pending.clear()
        if types:
            self._waiting.update(types)
            task = asyncio.create_task(self._reindex(types), name="search-parameter-reindex")
            self._reindexing.add(task)
            task.add_done_callback(self._reindexing.discard)
        return True

    async def _read(self) -> list[dict[str, Any]]:
        """The current SearchParameters stored here, least recently changed first."""
        return await current_resources(self.store, self.base.search_params, "SearchParameter",
                                       [], MAX_STORED)

    async def _reindex(self, types: list[str]) -> None:
        await asyncio.sleep(self.reindex_delay_s)  # every worker has noticed it by then
        for rtype in types:
            self._waiting.discard(rtype)  # (one written from now on needs another)
            pause = 1.0
            while True:
                try:
                    count = await self.store.reindex(rtype, bases=self.local_bases)
                    log.info("indexed %d %s resources for the SearchParameters stored here",
                             count, rtype)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if isinstance(exc, FhirError) and exc.code is Code.UNAVAILABLE:
                        # the database out of reach for a while: begun again once it is
                        # back (what was indexed stays; it is indexed again, as it was)
                        log.warning("%s not indexed again yet, the database is out of reach;"
                                    " trying again in %.0f s", rtype, pause)
                        await asyncio.sleep(pause)
                        pause = min(pause * 2, REINDEX_RETRY_MAX_S)
                        continue
                    log.warning("%s not indexed again; run carepath reindex %s", rtype, rtype,
                                exc_info=True)
                break
