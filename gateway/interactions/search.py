"""search (type and system level): https://hl7.org/fhir/R4/search.html.

Paging is stable under concurrent writes: when a search has more than one
page, the ordered list of matching ids is kept as a snapshot and the paging
links (``_getpages`` / ``_getpagesoffset``, as HAPI names them) walk that
list; later writes neither shift nor duplicate entries.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl, urlencode

from gateway.fhir import json as fjson
from gateway.fhir.bundles import bundle, raw
from gateway.fhir.geo import LOCATION_DISTANCE, distance_km, position_of
from gateway.fhir.outcome import Code, FhirError, Issue, operation_outcome
from gateway.fhir.search import Criterion, SearchQuery, near_origins, parse_search
from gateway.fhir.summary import element_tree, subset, summarize
from gateway.interactions.base import Context, FhirResponse, Prefer, check_id, check_type
from gateway.interactions.lists import with_list_members
from gateway.interactions.terminology import with_value_set_members
from gateway.security import guard
from gateway.security.policy import load_rules
from gateway.storage.interface import Restriction, Snapshot, StoredResource

PAGING_PARAMS = frozenset({"_getpages", "_getpagesoffset", "_format", "_pretty"})


def _page_size(ctx: Context, query: SearchQuery) -> int:
    if query.count is None:
        return ctx.settings.default_page_size
    return min(query.count, ctx.settings.max_page_size)


def shape(ctx: Context, query: SearchQuery, stored: StoredResource, *,
          included: bool = False) -> Any:
    """The resource as ``_elements``/``_summary`` ask (tagged SUBSETTED), or the stored
    bytes as they are. ``included`` (an ``_include``/``_revinclude`` entry): "the list
    of elements does not apply to included resources" (search.html#elements), save
    the elements named with its type (``Patient.name``)."""
    assert stored.content is not None
    if included and query.elements:
        query = replace(query, elements=tuple(e for e in query.elements if e[:1].isupper()))
    if query.elements or query.summary in ("true", "text", "data"):
        return shaped(ctx, query, stored.resource_type, fjson.loads_stored(stored.content))
    return raw(stored.content)


def shaped(ctx: Context, query: SearchQuery, resource_type: str,
           resource: dict[str, Any]) -> dict[str, Any]:
    """``resource`` as ``_elements``/``_summary`` ask (a new dict, tagged SUBSETTED
    when cut), or ``resource`` itself."""
    info = ctx.registry.types[resource_type]
    if query.elements:
        tree = element_tree(query.elements, resource_type)
        if tree is None:  # only other types' elements: this one whole
            return resource
        # "Servers SHOULD always return mandatory elements whether they are requested
        # or not" (search.html#elements): whole, unless the request names parts of one
        tree = {**{m: {} for m in info.mandatory}, **tree}
        return subset(resource, set(tree), info.choices, tree, ctx.registry.indexer.model)
    if query.summary in ("true", "text", "data"):
        return summarize(resource, query.summary, summary=info.summary,
                         mandatory=info.mandatory, choices=info.choices, nested=info.nested,
                         aliases=info.aliases)
    return resource


async def _page(
    ctx: Context,
    query: SearchQuery,
    keys: list[tuple[str, str]],
    base: str,
    *,
    total: int | None,
    links: list[tuple[str, str]],
    warnings: Warnings,
    matches: list[StoredResource] | None = None,
) -> FhirResponse:
    """A searchset page of ``keys`` (with their resources when the search read them:
    ``matches``) and what they include."""
    restriction = guard.restriction(ctx.access)
    most = ctx.settings.max_page_size * 10
    included: list[tuple[str, str]] = []
    if (query.includes or query.revincludes) and keys:
        # what an include finds beyond the types it names (checked before the search):
        # only what the scopes let the caller search, and only that is iterated from
        allowed = guard.allowed_types(ctx.registry.types, "search")
        included = await ctx.store.includes(query, keys, most + 1, restriction, allowed)
    if len(included) > most:  # said, as HAPI FHIR does, not left for the client to guess
        included = included[:most]
        warnings = (*warnings, Issue(
            Code.RESULT_TRUNCATED, f"only the first {most} resources that _include or"
            " _revinclude name are included in a page; a smaller _count includes all"
            " of each page's", severity="warning"))
    if matches is None:
        stored = await ctx.store.read_many([*keys, *included])
    else:
        stored = [*matches, *await ctx.store.read_many(included)]
    matched = set(keys)
    origins = near_origins(query.criteria)
    entries: list[dict[str, Any]] = []
    for s in stored:
        guard.note_stored(ctx.access, s)
        search: dict[str, Any] = {
            "mode": "match" if (s.resource_type, s.id) in matched else "include"}
        if origins and search["mode"] == "match":
            search = {**_distance(origins, s), **search}
        entries.append({
            "fullUrl": f"{base}/{s.resource_type}/{s.id}",
            "resource": shape(ctx, query, s, included=search["mode"] == "include"),
            "search": search,
        })
    if warnings:
        entries.append({
            "resource": operation_outcome(
                w if isinstance(w, Issue) else
                Issue(Code.UNKNOWN_SEARCH_PARAM, w, severity="warning") for w in warnings),
            "search": {"mode": "outcome"},
        })
    return FhirResponse(200, bundle("searchset", entries, total=total, links=links,
                                    id=str(uuid.uuid4())))


#: a searchset's warnings: of a parameter that was ignored (a text), or any other
Warnings = tuple[str | Issue, ...]


def truncated_to(cap: int, what: str) -> Issue:
    """The warning of a result cut off at ``cap``."""
    return Issue(Code.RESULT_TRUNCATED, f"only the first {cap} {what} can be paged through",
                 severity="warning")


def _distance(origins: tuple[tuple[float, float], ...], stored: StoredResource) -> dict[str, Any]:
    """A ``near`` match's distance from the nearest position searched for, in metres
    (the location-distance extension on ``Bundle.entry.search``, location.html#positional)."""
    position = position_of(fjson.loads_stored(stored.content or b"{}").get("position"))
    if position is None:
        return {}
    metres = min(distance_km(a, b, *position) for a, b in origins) * 1000
    return {"extension": [{"url": LOCATION_DISTANCE, "valueDistance": {
        "value": round(metres), "unit": "m", "system": "http://unitsofmeasure.org",
        "code": "m"}}]}


def _within_scopes(ctx: Context, query: SearchQuery) -> SearchQuery:
    """``query`` as the caller's scopes allow it: every type it names or looks into
    must be searchable (403), and a system-level search without ``_type`` covers
    the searchable types only."""
    for t in query.types:
        guard.require(t, "search")
    guard.require_related(query)
    if query.resource_type is None and not query.types:
        allowed = guard.allowed_types(ctx.registry.types, "search")
        if allowed is not None:
            query = replace(query, types=allowed)
    return query


def _self_link(base: str, resource_type: str | None, pairs: list[tuple[str, str]],
               ignored: tuple[tuple[str, str], ...] = ()) -> str:
    """The search as it was run: the parameters it used, not those it ignored
    (search.html#errors: a client checks the self link to learn which were applied)."""
    path = f"{base}/{resource_type}" if resource_type else base
    kept = [(k, v) for k, v in pairs if k not in PAGING_PARAMS and (k, v) not in ignored]
    return f"{path}?{urlencode(kept)}" if kept else path


def _pages_link(base: str, search_id: str, offset: int, count: int) -> str:
    query = urlencode({"_getpages": search_id, "_getpagesoffset": offset, "_count": count})
    return f"{base}?{query}"


@lru_cache(maxsize=4)
def _compartment_of(jurisdiction: str) -> dict[str, tuple[str, ...]]:
    return dict(load_rules(jurisdiction).compartment)


def patient_compartment(ctx: Context) -> dict[str, tuple[str, ...]]:
    """Type -> the search parameters that put its resources in a Patient's compartment
    (R4's CompartmentDefinition, as the access policy holds it)."""
    if ctx.access is not None:
        return dict(ctx.access.rules.compartment)
    return _compartment_of(ctx.settings.jurisdiction)


def compartment_definition(ctx: Context, kind: str) -> dict[str, tuple[str, ...]]:
    """Type -> the parameters that put a resource of it in a ``kind`` compartment: R4's
    five CompartmentDefinitions, the Patient's as the access policy holds it."""
    definition = (patient_compartment(ctx) if kind == "Patient"
                  else ctx.registry.compartments.get(kind))
    if definition is None:
        raise FhirError(Code.UNSUPPORTED_SEARCH,
                        f"{kind[:64]} is not a compartment: FHIR R4 defines "
                        f"{', '.join(sorted(ctx.registry.compartments))}")
    return definition


def _in_compartment(ctx: Context, resource_type: str, compartment: tuple[str, str]
                    ) -> Criterion:
    """The criterion of a search in a compartment (search.html#compartments):
    ``Patient/[id]/Observation`` finds the Observations any of whose patient
    compartment parameters names that patient; ``Patient/[id]/Patient`` the patient,
    ``Encounter/[id]/Encounter`` the encounter (``{def}``). The compartments are
    R4's five CompartmentDefinitions; the Patient's is the access policy's."""
    kind, id = compartment
    definition = compartment_definition(ctx, kind)
    check_id(id)
    params = definition.get(resource_type)
    if resource_type == kind and (kind == "Patient" or params == ("{def}",)):
        return parse_search(kind, [("_id", id)], ctx.registry.search_params).criteria[0]
    if not params:
        raise FhirError(Code.UNSUPPORTED_SEARCH,
                        f"{resource_type} is not in the {kind} compartment")
    link = parse_search(resource_type, [(params[0], f"{kind}/{id}")],
                        ctx.registry.search_params, strict=True).criteria[0]
    # any of the parameters: their rows read together (as Criterion.stored does)
    return replace(link, stored=tuple(params))


async def reject_ambiguous_ids(ctx: Context, query: SearchQuery) -> None:
    """search.html#reference: "multiple resources may have the same logical
    identifier. Servers SHOULD reject a search where the logical id refers to more
    than one matching resource across different types." A bare id given to a
    reference parameter of several target types (``Observation?subject=123``) is
    looked up once among the current resources of those types (those the caller may
    search and see: the answer reveals nothing else); 400 when it names resources of
    more than one, telling the client to name the type."""
    if not query.untyped_ids:
        return
    allowed = guard.allowed_types(ctx.registry.types, "search")
    wanted = {(code, id): [t for t in targets if t in ctx.registry.types
                           and (allowed is None or t in allowed)]
              for code, id, targets in query.untyped_ids}
    wanted = {key: types for key, types in wanted.items() if len(types) > 1}
    if not wanted:
        return
    types = sorted({t for ts in wanted.values() for t in ts})
    ids = sorted({id for _, id in wanted})
    probe = parse_search(None, [("_type", ",".join(types)), ("_id", ",".join(ids))],
                         ctx.registry.search_params)
    found = set(await ctx.store.search_keys(probe, len(types) * len(ids),
                                            guard.restriction(ctx.access)))
    for (code, id), targets in wanted.items():
        named = [t for t in targets if (t, id) in found]
        if len(named) > 1:
            raise FhirError(Code.INVALID_SEARCH_VALUE, (
                f"{code}={id}: the id {id} names resources of more than one type"
                f" ({', '.join(named)}); name the type: " + "; ".join(
                    f"{code}={t}/{id} or {code}:{t}={id}" for t in named)))


async def search(
    ctx: Context,
    resource_type: str | None,
    pairs: list[tuple[str, str]],
    *,
    base: str,
    prefer: Prefer,
    compartment: tuple[str, str] | None = None,
) -> FhirResponse:
    """A search: of one type, of the system, or (``compartment``: its type and id) of
    one type within a compartment. A page link's ``_getpages`` is honoured wherever it
    is sent: clients that rebuild a next link on the type's URL (``Observation?
    _getpages=…``) get that page, not a new search that ignores it."""
    paging = dict(pairs)
    if "_getpages" in paging:
        path = resource_type
        if compartment is not None:
            path = f"{compartment[0]}/{compartment[1]}/{resource_type}"
        return await search_page(ctx, paging["_getpages"], paging.get("_getpagesoffset", "0"),
                                 paging.get("_count"), base=base, asked=path)
    if resource_type is not None:
        check_type(ctx, resource_type)
    guard.require(resource_type, "search")
    query = await with_list_members(ctx, await with_value_set_members(ctx, parse_search(
        resource_type, pairs, ctx.registry.search_params, strict=prefer.strict,
        base_url=base)))
    path = resource_type
    if compartment is not None and resource_type is not None:
        query = replace(query, criteria=(_in_compartment(ctx, resource_type, compartment),
                                         *query.criteria))
        path = f"{compartment[0]}/{compartment[1]}/{resource_type}"
        if compartment[0] == "Patient":
            guard.note_patients([compartment[1]])
    query = _within_scopes(ctx, query)
    await reject_ambiguous_ids(ctx, query)
    links = [("self", _self_link(base, path, pairs, query.ignored))]
    guard.note(resource_type or "*", None, None, links[0][1])
    restriction = guard.restriction(ctx.access)
    total: int | None
    if query.summary == "count" or query.count == 0:
        total = await ctx.store.count(query, restriction)
        return await _page(ctx, query, [], base, total=total, links=links,
                           warnings=query.warnings)
    size = _page_size(ctx, query)
    if query.offset is not None or query.page is not None:
        return await _offset_page(ctx, query, base, path, pairs, size, restriction)
    cap = ctx.settings.max_search_results
    # the snapshot of a long result keeps its head; the rest is read when needed
    head = min(max(ctx.settings.search_read_ahead, 2 * size), cap)
    found: list[StoredResource] | None = None
    if query.sort or not _streams(query):
        # a sort orders every match before it yields the first (and a reverse chain
        # or a display's text gathers every match first): do that once
        everything = await ctx.store.search_keys(query, head + 1, restriction)
    else:
        # the first page's resources come with the search: one round trip, not two
        found = await ctx.store.search_resources(query, size + 1, restriction)
        if len(found) <= size:
            total = None if query.total == "none" else len(found)
            return await _page(ctx, query, [(s.resource_type, s.id) for s in found], base,
                               total=total, links=links, warnings=query.warnings,
                               matches=found)
        everything = await ctx.store.search_keys(query, head + 1, restriction)
    if len(everything) <= size:
        total = None if query.total == "none" else len(everything)
        return await _page(ctx, query, everything, base, total=total, links=links,
                           warnings=query.warnings)
    # more than one page: keep the ordered result as a snapshot for stable paging
    complete = len(everything) <= head or head == cap
    truncated = len(everything) > cap
    everything = everything[:head]
    total = len(everything)
    # the rest of a long result, read later, holds only what exists now
    bound = None if complete else await ctx.store.last_version()
    if truncated or not complete:
        wanted = query.total == "accurate" or (not truncated and query.total == "estimate")
        total = await ctx.store.count(query, restriction) if wanted else None
    if query.total == "none":
        total = None
    warnings: Warnings = query.warnings
    if truncated:
        warnings = (*warnings, truncated_to(cap, "matches"))
    # what was read with the first search is the first page, unless a write since
    # then changed which resources lead the result
    first = found[:size] if found is not None else []
    same = found is not None and [(s.resource_type, s.id) for s in first] == everything[:size]
    return await first_page(ctx, query, everything, base, size=size, links=links,
                            warnings=warnings, total=total, truncated=truncated,
                            complete=complete, bound=bound,
                            replay=f"{path or ''}?{urlencode(pairs)}",
                            matches=first if same else None)


async def _offset_page(
    ctx: Context, query: SearchQuery, base: str, path: str | None,
    pairs: list[tuple[str, str]], size: int, restriction: Restriction | None,
) -> FhirResponse:
    """A page addressed by its position (``_offset``, or ``_page`` of ``_count``), found
    afresh each time, as HAPI FHIR does for ``_offset``: no snapshot is kept, so a
    write between two pages can shift what they show (``_getpages`` links, which
    the search gives without these, do not). Its links move by the same means."""
    cap = ctx.settings.max_search_results
    start = query.offset if query.offset is not None else (query.page or 1) * size - size
    warnings: Warnings = query.warnings
    if start + size > cap:
        warnings = (*warnings, truncated_to(cap, "matches"))
    end = min(start + size, cap)
    keys = await ctx.store.search_keys(query, end + 1, restriction) if start < end else []
    more = len(keys) > end
    if not more and start < end:
        total: int | None = len(keys)  # every match was read
    elif query.total in ("accurate", "estimate"):
        total = await ctx.store.count(query, restriction)
    else:
        total = None
    if query.total == "none":
        total = None

    def link(to: int) -> str:
        kept = [(k, v) for k, v in pairs if k not in ("_offset", "_page", "_count")]
        moved = [("_offset", str(to))] if query.offset is not None else [
            ("_page", str(to // size + 1))]
        return _self_link(base, path, [*kept, *moved, ("_count", str(size))], query.ignored)

    links = [("self", link(start))]
    if start > 0:
        links.append(("previous", link(max(start - size, 0))))
    if more:
        links.append(("next", link(end)))
    return await _page(ctx, query, keys[start:end], base, total=total, links=links,
                       warnings=warnings)


def _streams(query: SearchQuery) -> bool:
    """Whether the database can yield the first matches before it has found every
    one: not through a reverse chain (``_has``, the set of referring resources is
    gathered first) nor a token's ``:text`` (every display is read)."""
    return not any(c.has is not None or (c.modifier == "text" and c.type == "token")
                   for c in query.criteria)


async def first_page(
    ctx: Context, query: SearchQuery, keys: list[tuple[str, str]], base: str, *, size: int,
    links: list[tuple[str, str]], warnings: Warnings, total: int | None,
    truncated: bool, replay: str, matches: list[StoredResource] | None = None,
    complete: bool = True, bound: int | None = None,
) -> FhirResponse:
    """The first page of a result held in ``keys`` (whole, or its head: not
    ``complete``). A longer one is kept as a snapshot for stable paging (``next``);
    ``replay`` is the ``Type?query`` its pages read ``_include``/``_elements``/
    ``_summary`` from, and the rest of an incomplete result."""
    if len(keys) > size:
        restriction = guard.restriction(ctx.access)
        owner = restriction.organization if restriction else ""
        snapshot = Snapshot(str(uuid.uuid4()), f"{owner}|{replay}", keys,
                            total if total is not None else -1, truncated, complete, bound)
        await ctx.store.save_snapshot(snapshot)
        links = [*links, ("next", _pages_link(base, snapshot.search_id, size, size))]
    return await _page(ctx, query, keys[:size], base, total=total, links=links,
                       warnings=warnings, matches=matches)


async def _read_on(ctx: Context, snapshot: Snapshot, query: SearchQuery,
                   want: int) -> Snapshot:
    """``snapshot`` read on to hold at least ``want`` keys, or all: the search run
    again over what existed when it began, for twice the matches kept (or ``want``),
    and what it finds besides those kept appended in the search's order. What is
    kept stays as it was, so that the pages read already do not shift; a match
    created since is not among the rest, nor is one deleted since. Reading twice as
    far each time, a client paging to the end reads the result about twice in all;
    one reading a few pages past the first search's does not read the whole result.
    The snapshot returned holds every key kept."""
    cap = ctx.settings.max_search_results
    if snapshot.bound is not None:
        query = replace(query, created_by=snapshot.bound)
    restriction = guard.restriction(ctx.access)
    held = -1
    for _ in range(8):  # each round, this request or another reads on
        whole = await ctx.store.load_snapshot(snapshot.search_id)
        if whole is None or whole.held == held:  # gone, or kept as it cannot be read on
            break
        if whole.complete or whole.held >= want:
            return whole
        limit = min(max(2 * whole.held, want), cap)
        found = await ctx.store.search_keys(query, limit + 1, restriction)
        kept = set(whole.keys)
        fresh = [k for k in found[:limit] if k not in kept]
        more = fresh[: cap - whole.held]
        # the whole rest read, or all that may be paged through
        complete = len(found) <= limit or limit == cap or whole.held + len(more) >= cap
        truncated = complete and (len(more) < len(fresh) or len(found) > limit)
        if await ctx.store.extend_snapshot(whole, more, complete=complete,
                                           truncated=truncated):
            return replace(whole, keys=[*whole.keys, *more], complete=complete,
                           truncated=truncated, held=whole.held + len(more))
        held = whole.held
    raise FhirError(Code.SEARCH_EXPIRED, f"search '{snapshot.search_id[:64]}' is unknown"
                                         " or expired")


async def search_page(
    ctx: Context, search_id: str, offset: str, count: str | None, *, base: str,
    asked: str | None = None,
) -> FhirResponse:
    """A page of a kept result set. ``asked``: the search's path the page was
    asked on (``Observation``, ``Patient/1/Observation``), if not the base; it
    must search the type the result set was kept for (a page of
    ``Patient/1/Observation`` may be asked on ``Observation``)."""
    try:
        start = max(int(offset), 0)
        size = min(max(int(count), 1), ctx.settings.max_page_size) if count else (
            ctx.settings.default_page_size)
    except ValueError:
        raise FhirError(Code.INVALID_SEARCH_VALUE, "_getpagesoffset and _count are integers")\
            from None
    snapshot = await ctx.store.load_snapshot(search_id, start, start + size)
    if snapshot is None:
        raise FhirError(Code.SEARCH_EXPIRED, f"search '{search_id[:64]}' is unknown or expired")
    owner, _, rest = snapshot.query.partition("|")
    restriction = guard.restriction(ctx.access)
    if owner != (restriction.organization if restriction else ""):
        # another organisation's result set: as unknown as a missing one
        raise FhirError(Code.SEARCH_EXPIRED, f"search '{search_id[:64]}' is unknown or expired")
    # the search as it was asked: ``Type?query``, ``?query`` (the system) or
    # ``Patient/[id]/Type?query`` (a compartment)
    target, _, qs = rest.partition("?")
    if asked is not None and asked.rpartition("/")[2] != target.rpartition("/")[2]:
        raise FhirError(Code.INVALID_SEARCH_VALUE,
                        f"search '{search_id[:64]}' is a search of '{target or '[base]'}',"
                        f" not of '{asked[:100]}'")
    parts = target.split("/") if target else []
    rt = parts[-1] if parts else None
    guard.require(rt, "search")
    pairs = parse_qsl(qs, keep_blank_values=True)
    query = parse_search(rt, pairs, ctx.registry.search_params, base_url=base)
    if len(parts) == 3 and rt is not None:
        query = replace(query, criteria=(_in_compartment(ctx, rt, (parts[0], parts[1])),
                                         *query.criteria))
        if parts[0] == "Patient":
            guard.note_patients([parts[1]])
    query = _within_scopes(ctx, query)
    if not snapshot.complete and start + size > snapshot.held:
        snapshot = await _read_on(ctx, snapshot, await with_list_members(
            ctx, await with_value_set_members(ctx, query)), start + size)
    links = [("self", _pages_link(base, search_id, start, size)),
             ("first", _pages_link(base, search_id, 0, size))]
    if start > 0:
        links.append(("previous", _pages_link(base, search_id, max(start - size, 0), size)))
    if start + size < snapshot.held or not snapshot.complete:
        links.append(("next", _pages_link(base, search_id, start + size, size)))
    total = snapshot.total if snapshot.total >= 0 else None
    # the compartment may have changed since the first page
    at = start - snapshot.start
    keys = await guard.filter_visible(ctx.access, ctx.store, snapshot.keys[at : at + size])
    guard.note(rt or "*", None, None, links[0][1])
    return await _page(ctx, query, keys, base, total=total, links=links, warnings=())


