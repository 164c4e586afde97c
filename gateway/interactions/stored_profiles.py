"""Profiles stored on this server take part in validation.

A StructureDefinition of derivation ``constraint`` with a snapshot, created or
updated here (an implementation guide's package carries them so: KBV, ISiK,
nl-core, US Core), is used as the gateway's own profiles are: a write that
claims it in ``meta.profile`` is checked against it and refused with 422 on
errors, and ``$validate`` checks against it (claimed, or named by ``profile``).
Its required bindings are checked against the ValueSets stored here, expanded
over the code systems held or stored here; a binding to a value set that
cannot be expanded completely here is not checked, as in the gateway's own
profiles. A URL the gateway defines itself keeps the gateway's definition.

A StructureDefinition stored without a snapshot (as SUSHI writes them) gets one
made from its differential and its base (another stored profile, the gateway's
own, or R4's: ``gateway.fhir.validation.snapshot``); one whose snapshot cannot
be made (a base not stored here, a differential beyond what the generator
takes) is not used, and the writer is warned that it cannot be used, and why. A
transaction Bundle that writes a StructureDefinition, ValueSet or CodeSystem
has its other resources validated after its writes, inside its database
transaction, so that a profile it stores holds the resources it stores with it.

Each worker process keeps what it compiled, and notices a change by the number
of StructureDefinition, ValueSet and CodeSystem versions in the history log and
the position of the newest: one indexed lookup, asked only when a resource
claims a profile the gateway does not define. What the server reads for this is its
own business: it is neither limited by the caller's access nor audited as the
caller's.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.fhir import json as fjson
from gateway.fhir.outcome import Code, FhirError, Issue
from gateway.fhir.search import parse_search
from gateway.fhir.validation.profiles import ProfileSet
from gateway.interactions.offload import in_thread

if TYPE_CHECKING:  # (base validates with this module)
    from gateway.interactions.base import Context, Validator
    from gateway.storage.interface import Store, StoreTransaction

log = logging.getLogger(__name__)

#: the types whose resources stored here take part in validation
CONFORMANCE_TYPES = ("StructureDefinition", "ValueSet", "CodeSystem")
#: the most conformance resources of one type read for validation
MAX_STORED = 5_000
#: the most codes of a stored value set that a required binding is checked against
MAX_BOUND_CODES = 100_000
_CHUNK = 200


@dataclass(frozen=True, slots=True)
class _Loaded:
    mark: tuple[int, int]  # the history it was read at (Store.versions_mark)
    profiles: ProfileSet | None  # None: no stored profile to use


_LOADED: weakref.WeakKeyDictionary[Validator, _Loaded] = weakref.WeakKeyDictionary()
#: the stored profiles a transaction read with its own writes, while it runs
_IN_TX: weakref.WeakKeyDictionary[Any, _Loaded] = weakref.WeakKeyDictionary()


async def validation_issues(ctx: Context, resource: dict[str, Any],
                            profile: str | None = None,
                            tx: StoreTransaction | None = None) -> list[Issue]:
    """The issues of ``resource`` against R4 and the profiles it claims (or
    ``profile``): the gateway's own, and those stored here (read in ``tx`` when the
    write runs in one: it holds a connection, and must not wait for a second)."""
    validator = ctx.validator
    assert validator is not None
    threaded = in_thread(resource)
    if threaded:
        issues = await asyncio.to_thread(validator.validate, resource, profile=profile)
    else:
        issues = validator.validate(resource, profile=profile)
    if not any(i.code is Code.UNKNOWN_PROFILE for i in issues):
        return issues
    stored = await _stored(ctx, validator, ctx.store.within(tx) if tx else ctx.store, tx)
    claims = _claims(resource, profile)
    if stored is None or not any(url.split("|", 1)[0] in stored.raw
                                 or url.split("|", 1)[0] in stored.unusable
                                 for url in claims):
        return issues
    try:
        # a stored profile is compiled on first use: a thread's work too (0.65 s for
        # one of 1,000 slices)
        if threaded or not all(stored.compiled(url) for url in claims):
            return await asyncio.to_thread(validator.validate, resource, profile=profile,
                                           profiles=stored)
        return validator.validate(resource, profile=profile, profiles=stored)
    except Exception:  # a stored definition that makes no sense: not applied
        log.warning("a profile stored here could not be applied", exc_info=True)
        return [*issues, Issue(Code.UNKNOWN_PROFILE,
                               "a profile stored here could not be applied; the resource "
                               "was validated against the base definition", (),
                               "warning")]


def _claims(resource: Any, profile: str | None) -> list[str]:
    """``profile``, else every profile the resource and the resources in it claim."""
    if profile is not None:
        return [profile]
    out: list[str] = []
    stack = [resource]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            meta = node.get("meta")
            if isinstance(meta, dict) and isinstance(meta.get("profile"), list):
                out += [u for u in meta["profile"] if isinstance(u, str)]
            stack += [v for v in node.values() if isinstance(v, dict | list)]
        elif isinstance(node, list):
            stack += [v for v in node if isinstance(v, dict | list)]
    return out


async def _stored(ctx: Context, validator: Validator, reader: Store,
                  tx: StoreTransaction | None = None) -> ProfileSet | None:
    """The stored profiles as ``reader`` sees them. What a transaction reads of its
    own writes is kept for it alone (:data:`_IN_TX`): it may roll back, and on SQLite
    a later transaction can then reach the same mark with other content."""
    mark = await reader.versions_mark(CONFORMANCE_TYPES)
    loaded = _LOADED.get(validator)
    if loaded is not None and loaded.mark == mark:
        return loaded.profiles
    if tx is not None:
        mine = _IN_TX.get(tx)
        if mine is None or mine.mark != mark:
            mine = _Loaded(mark, await _read(ctx, validator, reader, mark))
            _IN_TX[tx] = mine
        return mine.profiles
    loaded = _Loaded(mark, await _read(ctx, validator, reader, mark))
    _LOADED[validator] = loaded
    return loaded.profiles


async def _read(ctx: Context, validator: Validator, reader: Store,
                mark: tuple[int, int]) -> ProfileSet | None:
    """:func:`_load`; None when nothing is stored, or what is stored cannot be read
    (then not read again until it changes)."""
    if not mark[0]:
        return None
    try:
        return await _load(ctx, validator, reader)
    except FhirError:  # the database: the request fails as it would have anyway
        raise
    except Exception:  # stored definitions that make no sense: none used
        log.warning("the profiles stored here cannot be read; none is used", exc_info=True)
        return None


async def in_use(ctx: Context) -> tuple[tuple[int, int], dict[str, list[str]]]:
    """The URLs of the resource profiles stored here that writes are held to, by the
    type they constrain, and the mark of the history they were read at (it changes
    with every write of a StructureDefinition, ValueSet or CodeSystem): for the
    CapabilityStatement's ``supportedProfile``: those that compile (a definition
    that makes no sense is not used). One indexed lookup while nothing changed."""
    if ctx.validator is None:
        return (0, 0), {}
    profiles = await _stored(ctx, ctx.validator, ctx.store)
    mark = _LOADED[ctx.validator].mark
    by_type: dict[str, list[str]] = {}
    for url, sd in (profiles.raw.items() if profiles is not None else ()):
        rt = sd.get("type")
        if sd.get("derivation") != "constraint" or sd.get("kind") != "resource" \
                or not isinstance(rt, str) or url in ctx.registry.supported_profiles(rt):
            continue  # (the gateway's own are listed as they are)
        if profiles is not None and profiles.get(url) is not None:  # compiles: in use
            by_type.setdefault(rt, []).append(url)
    return mark, {rt: sorted(urls) for rt, urls in by_type.items()}


async def _current(ctx: Context, reader: Store, resource_type: str,
                   pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return await current_resources(reader, ctx.registry.search_params, resource_type, pairs)


async def current_resources(reader: Store, search_params: Callable[[str], Any],
                            resource_type: str, pairs: list[tuple[str, str]],
                            limit: int = MAX_STORED) -> list[dict[str, Any]]:
    """The current resources of a type that ``pairs`` find (at most ``limit``), least
    recently changed first: what the server reads for itself (the stored profiles,
    search parameters), neither limited by a caller's access nor audited."""
    query = parse_search(resource_type, pairs, search_params, strict=True)
    keys = await reader.search_keys(query, limit + 1, None)
    if len(keys) > limit:
        log.warning("more than %d %s resources stored: only %d are read", limit,
                    resource_type, limit)
        keys = keys[:limit]
    found = []
    for start in range(0, len(keys), _CHUNK):
        for stored in await reader.read_many(keys[start : start + _CHUNK]):
            if stored.content is not None and not stored.deleted:
                found.append((stored.last_updated, fjson.loads_fast(stored.content)))
    found.sort(key=lambda item: item[0])
    return [r for _, r in found if isinstance(r, dict)]


def _required_bindings(sds: list[dict[str, Any]]) -> set[str]:
    """(a snapshot made from a differential binds only what the differential or its
    bases bind: the bases' bindings are the gateway's, or another stored profile's)"""
    return {b["valueSet"].split("|", 1)[0]
            for sd in sds for part in ("snapshot", "differential")
            for el in (sd.get(part) or {}).get("element") or ()
            if isinstance(b := el.get("binding"), dict) and b.get("strength") == "required"
            and isinstance(b.get("valueSet"), str)}


async def stored_definitions(ctx: Context, reader: Store | None = None
                             ) -> list[dict[str, Any]]:
    """The constraint StructureDefinitions stored here (with a snapshot or a
    differential), oldest change first."""
    return [sd for sd in await _current(ctx, reader or ctx.store, "StructureDefinition",
                                        [("derivation", "constraint")])
            if isinstance(sd.get("url"), str) and any(
                isinstance(sd.get(part), dict) and isinstance(sd[part].get("element"), list)
                for part in ("snapshot", "differential"))]


async def _load(ctx: Context, validator: Validator,
                reader: Store) -> ProfileSet | None:
    sds = await stored_definitions(ctx, reader)
    if not sds:
        return None
    # the value sets the profiles bind as required, over what is held and stored here
    stored = [*await _current(ctx, reader, "CodeSystem", []),
              *await _current(ctx, reader, "ValueSet", [])]
    # expanding them and making the snapshots of profiles stored without one is a
    # thread's work (1 s for a profile of 1,000 slices), the loop meanwhile serving
    # the others; the reads above stay on the loop
    return await asyncio.to_thread(_compile, ctx, validator, sds, stored)


def _compile(ctx: Context, validator: Validator, sds: list[dict[str, Any]],
             stored: list[dict[str, Any]]) -> ProfileSet | None:
    """The stored profiles ``sds`` compiled, their required bindings checked against
    the value sets held here and ``stored`` (CodeSystems and ValueSets)."""
    value_sets: dict[str, frozenset[tuple[str, str]]] = {}
    try:
        term = ctx.registry.terminology.with_resources(stored)
    except Exception:  # stored terminology that makes no sense: bindings not checked
        log.warning("the terminology stored here cannot be read", exc_info=True)
        return validator.with_stored(sds, {})
    for url in sorted(_required_bindings(sds)):
        try:
            value_set = term.value_set(url)
            if value_set is None:
                continue
            codes, closed = term.members(value_set)
        except Exception as exc:  # not expandable here (FhirError), or makes no sense
            log.info("value set %s is not expanded here (%s): its bindings are not checked",
                     url[:200], exc)
            continue
        if closed and len(codes) <= MAX_BOUND_CODES:
            value_sets[url] = frozenset(codes)
    return validator.with_stored(sds, value_sets)
