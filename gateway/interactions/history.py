"""history at instance, type and system level: https://hl7.org/fhir/R4/http.html#history.

Newest first. Paging is by position in the history log (``_cursor``), so
versions written while a client pages do not shift the pages it has yet to
read. ``_offset`` (versions to skip, as search takes it and Medplum's client
sends it for a history too) places a page; its ``next`` link goes on by
position.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from gateway.fhir.bundles import bundle, raw
from gateway.fhir.indexer import date_bounds
from gateway.fhir.instants import instant
from gateway.fhir.outcome import Code, FhirError
from gateway.fhir.search import PREFIXES
from gateway.interactions.base import Context, FhirResponse, check_id, check_type
from gateway.interactions.lists import MAX_LIST_MEMBERS, listed_in
from gateway.security import guard
from gateway.storage.interface import Listed, StoredResource

_STATUS = {"POST": "201 Created", "PUT": "200 OK", "PATCH": "200 OK", "DELETE": "204 No Content"}


def _bound(name: str, value: str) -> tuple[int, int]:
    bounds = date_bounds(value)
    if bounds is None:
        raise FhirError(Code.INVALID_SEARCH_VALUE, f"{name}: '{value[:40]}' is not a FHIR instant")
    return bounds


#: what a history takes (http.html#history), and what every request may carry
_PARAMS = frozenset({"_since", "_at", "_list", "_count", "_cursor", "_offset", "_format",
                     "_pretty"})
#: an open end of an ``_at`` period (epoch microseconds, within a bigint)
_NEVER = 2**62


def _period(values: list[str]) -> tuple[int, int]:
    """The period ``_at`` names (http.html#history: "current at some point during
    the time period", a date searched as search.html#date says): ``_at=2020`` the
    year, ``ge2020`` from 2020 on, ``lt2020`` before it. Several ``_at`` are all
    true at once: the periods' overlap."""
    lo, hi = -_NEVER, _NEVER
    for value in values:
        prefixed = value[:2] in PREFIXES
        prefix = value[:2] if prefixed else "eq"
        if prefix in ("ne", "ap"):
            raise FhirError(Code.INVALID_SEARCH_VALUE,
                            f"_at: the prefix '{prefix}' names no one period")
        first, last = _bound("_at", value[2:] if prefixed else value)
        start, end = {"eq": (first, last), "ge": (first, _NEVER), "gt": (last + 1, _NEVER),
                      "sa": (last + 1, _NEVER), "le": (-_NEVER, last),
                      "lt": (-_NEVER, first - 1), "eb": (-_NEVER, first - 1)}[prefix]
        lo, hi = max(lo, start), min(hi, end)
    return lo, hi


def _entry(base: str, s: StoredResource) -> dict[str, Any]:
    url = f"{s.resource_type}/{s.id}"
    entry: dict[str, Any] = {"fullUrl": f"{base}/{url}"}
    if s.content is not None:
        entry["resource"] = raw(s.content)
    method = s.method or "PUT"
    entry["request"] = {"method": method, "url": s.resource_type if method == "POST" else url}
    # a PUT that made the resource exist created it (update as create, http.html#update)
    status = "201 Created" if method == "PUT" and s.created else _STATUS.get(method, "200 OK")
    entry["response"] = {
        "status": status,
        "etag": s.etag,
        "lastModified": instant(s.last_updated),
    }
    return entry


async def _listed(ctx: Context, values: list[str]) -> set[Listed]:
    """``_list``: "only include resource versions that are referenced in the specified
    list" (http.html#history), the List as the caller reads it now; ``_list=a,b``
    what either names, ``_list=a&_list=b`` what both name (as in a search)."""
    found: set[Listed] | None = None
    for value in values:
        named: set[Listed] = set()
        for list_id in value.split(","):
            if not list_id or list_id.startswith("$"):
                raise FhirError(Code.UNSUPPORTED_SEARCH,
                                f"_list: '{list_id[:64]}' is not the id of a List here")
            check_id(list_id)
            named.update(await listed_in(ctx, list_id))
        found = named if found is None else found & named
    if found is not None and len(found) > MAX_LIST_MEMBERS:
        raise FhirError(Code.SEARCH_TOO_COSTLY,
                        f"the Lists of _list name more than {MAX_LIST_MEMBERS:,} resources")
    return found or set()


async def history(
    ctx: Context,
    resource_type: str | None,
    id: str | None,
    pairs: list[tuple[str, str]],
    *,
    base: str,
    strict: bool = False,
) -> FhirResponse:
    """``strict`` (``Prefer: handling=strict``): an unknown parameter is refused (a
    history Bundle has no place for the warning a search gives, so it is otherwise
    ignored silently)."""
    if strict:
        unknown = sorted({k for k, _ in pairs} - _PARAMS)
        if unknown:
            raise FhirError(Code.UNKNOWN_SEARCH_PARAM,
                            f"history takes no parameter '{unknown[0][:64]}'")
    if resource_type is not None:
        check_type(ctx, resource_type)
    if id is not None:
        check_id(id)
    level = "history-instance" if id else "history-type" if resource_type else "history-system"
    guard.require(resource_type, level)
    restriction = guard.restriction(ctx.access)
    if id is not None and resource_type is not None:
        current = await ctx.store.read(resource_type, id)
        if current is None:
            raise FhirError(Code.NOT_FOUND, f"{resource_type}/{id} is not known")
        await guard.ensure_visible(ctx.access, ctx.store, current)
    params = dict(pairs)
    since = _bound("_since", params["_since"])[0] if "_since" in params else None
    at = _period([v for k, v in pairs if k == "_at"]) if "_at" in params else None
    try:
        count = int(params.get("_count", ctx.settings.default_page_size))
        before = int(params["_cursor"]) if "_cursor" in params else None
        offset = int(params.get("_offset", 0))
    except ValueError:
        raise FhirError(Code.INVALID_SEARCH_VALUE,
                        "_count, _cursor and _offset are integers") from None
    if before is not None and not 0 <= before < 2**63:  # a position the store can hold
        raise FhirError(Code.INVALID_SEARCH_VALUE, "_cursor is out of range")
    limit = ctx.settings.max_search_results
    if not 0 <= offset <= limit:  # (each version skipped is read)
        raise FhirError(Code.INVALID_SEARCH_VALUE,
                        f"_offset must be an integer from 0 to {limit:,}"
                        " (CAREPATH_MAX_SEARCH_RESULTS); page on by the next link")
    if count < 0:
        raise FhirError(Code.INVALID_SEARCH_VALUE, "_count must be a non-negative integer")
    # _count=0: no versions, only how many there are (as a search answers it)
    count = min(count, ctx.settings.max_page_size)
    # the system's history holds the types the scopes allow, not every type
    types = guard.allowed_types(ctx.registry.types, level) if resource_type is None else None
    listed = await _listed(ctx, [v for k, v in pairs if k == "_list"]) if "_list" in params \
        else None
    page = await ctx.store.history(resource_type, id, since=since, at=at, before=before,
                                   limit=count, restriction=restriction, types=types,
                                   listed=listed, offset=offset)
    guard.note(resource_type or "*", id, None, f"_history?{urlencode(pairs)}")
    if id is not None and before is None and since is None and at is None and count and (
            listed is None and not offset and not page.entries):
        # (filtered by time or List, the history of a resource that exists can be empty)
        raise FhirError(Code.NOT_FOUND, f"{resource_type}/{id} is not known")
    path = "/".join(p for p in (base, resource_type, id, "_history") if p)
    kept = [(k, v) for k, v in pairs if k not in ("_cursor", "_offset", "_format", "_pretty")]
    links = [("self", f"{path}?{urlencode(pairs)}" if pairs else path)]
    if page.next_cursor is not None:
        links.append(("next", f"{path}?{urlencode([*kept, ('_cursor', page.next_cursor)])}"))
    # a version about a patient the caller may not see (before the resource moved to
    # one it may) is left out; the count would tell of it, whether on this page or
    # another, so a restricted caller is given one only for a whole history it has seen
    entries = await guard.versions_visible(ctx.access, ctx.store, page.entries)
    whole = (count > 0 and before is None and not offset and page.next_cursor is None
             and len(entries) == len(page.entries))
    total = page.total if restriction is None or whole else None
    return FhirResponse(200, bundle("history", [_entry(base, s) for s in entries],
                                    total=total, links=links))
