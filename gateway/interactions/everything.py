"""``Patient/[id]/$everything`` and ``Encounter/[id]/$everything``:
https://hl7.org/fhir/R4/patient-operation-everything.html and
https://hl7.org/fhir/R4/encounter-operation-everything.html.

A patient's record: the Patient, every resource in its patient compartment (the
R4 CompartmentDefinition, as the access policy holds it) and what those refer to
outside any patient's compartment (the practitioners, organisations, locations,
medications and devices of the record: "any resource referenced from those",
"including binaries and attachments": the Binaries that hold its documents and
the patient's document Bundles). Other patients' resources are not followed.

An encounter's record: the Encounter, every resource in its Encounter compartment
(R4's CompartmentDefinition: what names it as its encounter or context) and
every resource those refer to, of any type (the patient, the conditions its
diagnoses name, the practitioners, locations and organisations), with the
Binaries that hold its documents. Resources that name the encounter only in the
``encounter-associatedEncounter`` extension are not found: no search parameter
indexes it.

Either is a searchset Bundle: the owner first, then type by type in creation
order, then the referenced resources type by type. References are followed one
step, as the search index holds them. Paged like a search (a snapshot, ``next``
links). ``_type`` limits the types, ``_since`` keeps what changed since then,
``_count`` sets the page size and ``_offset`` where the first page starts (as
HAPI FHIR offers it). Only what the caller may see is included: types the
granted scopes do not let it search are left out, and the organisation's
compartment and consent apply as in every search. ``start``/``end`` (care
dates, Patient only) are not supported and say so in the Bundle.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from urllib.parse import urlencode

from gateway.fhir import json as fjson
from gateway.fhir.indexer import date_bounds
from gateway.fhir.outcome import Code, FhirError
from gateway.fhir.search import Include, SearchQuery, parse_search
from gateway.interactions.base import Context, FhirResponse, check_id
from gateway.interactions.operations import Operation, OperationRequest
from gateway.interactions.search import Warnings, compartment_definition, first_page, truncated_to
from gateway.security import guard
from gateway.storage.access_sql import ACCESS_PROXY
from gateway.storage.interface import Restriction

#: every reference parameter of every type, one step (``_include=*``)
_REFERENCES = SearchQuery(None, includes=(Include("*", "*", wildcard=True),))
#: what no reference parameter names: the Binaries whose ``securityContext`` is a
#: resource of the record, and the document Bundles of the patient (the index
#: rows of their access proxy)
_PROXIED = SearchQuery(None, revincludes=(Include("Binary", ACCESS_PROXY),
                                          Include("Bundle", ACCESS_PROXY)))
_ID_CHUNK = 100
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def _one(values: list[object] | None, name: str) -> str | None:
    if not values:
        return None
    if len(values) > 1 or not isinstance(values[0], str | int):
        raise FhirError(Code.INVALID_SEARCH_VALUE, f"give {name} once")
    return str(values[0])


@dataclass(frozen=True, slots=True)
class _Kind:
    """What makes up the record of an owner of this type."""

    owner: str  # Patient, Encounter
    #: type -> the parameters that put a resource of it in the owner's compartment
    compartment: dict[str, tuple[str, ...]]
    #: whether resources of a type that the record refers to are part of it
    follows: Callable[[str], bool]


def _asked_types(ctx: Context, value: str) -> set[str]:
    """``_type``'s types, each one R4 defines."""
    asked = {t.strip() for t in value.split(",") if t.strip()}
    unknown = sorted(t for t in asked if not ctx.registry.is_resource_type(t))
    if unknown:
        raise FhirError(Code.INVALID_SEARCH_VALUE, f"_type: unknown type {unknown[0]}")
    return asked


def _natural(value: str | None, name: str) -> int | None:
    if value is not None and not (value.isascii() and value.isdigit()):
        raise FhirError(Code.INVALID_SEARCH_VALUE, f"{name} must be a non-negative integer")
    return None if value is None else int(value)


async def _pointing(ctx: Context, kind: _Kind, id: str) -> dict[str, list[str]]:
    """The types whose compartment parameters point at the owner anywhere, with those
    parameters (one index lookup)."""
    pointing: dict[str, list[str]] = {}
    for rt, param in sorted(await ctx.store.referrers(kind.owner, id)):
        if param in kind.compartment.get(rt, ()):
            pointing.setdefault(rt, []).append(param)
    return pointing


async def _answer(ctx: Context, owner: str, keys: list[tuple[str, str]], *, base: str,
                  size: int, offset: int = 0, self_link: str, warnings: Warnings
                  ) -> FhirResponse:
    """The first page of a record of ``keys`` (at most one more than the paging cap),
    from ``offset`` on (as HAPI FHIR's ``_offset``), the rest held for stable paging;
    ``_count=0``: how many, as in a search. Pages are read back as a plain search over
    the owner's type: no includes, no subsetting."""
    cap = ctx.settings.max_search_results
    truncated = len(keys) > cap
    found = len(keys)
    if truncated:
        keys = keys[:cap]
        warnings = (*warnings, truncated_to(cap, "resources"))
    keys = [] if size == 0 else keys[offset:]
    return await first_page(ctx, SearchQuery(owner), keys, base,
                            size=size, links=[("self", self_link)], warnings=warnings,
                            total=None if truncated else found, truncated=truncated,
                            replay=f"{owner}?")


def _kind(ctx: Context, owner: str) -> _Kind:
    # (the owner's own entry, "link" or "{def}", is not followed: the owner is read first)
    compartment = {t: p for t, p in compartment_definition(ctx, owner).items() if t != owner}
    if owner == "Patient":
        return _Kind(owner, compartment, lambda t: _outside(t, compartment))
    return _Kind(owner, compartment, lambda t: True)


async def everything(ctx: Context, req: OperationRequest) -> FhirResponse:
    assert req.id is not None and req.resource_type is not None
    check_id(req.id)
    kind = _kind(ctx, req.resource_type)
    owner = kind.owner
    guard.require(owner, "read")
    params = req.parameters()
    compartment = kind.compartment
    # the owner's record: the owner and its compartment's types
    types = [owner, *sorted(compartment)]
    # _type 0..*: "one or more parameters, each containing one or more comma-delimited
    # FHIR resource types"
    given = params.get("_type") or []
    if not all(isinstance(v, str) for v in given):
        raise FhirError(Code.INVALID_SEARCH_VALUE, "_type names resource types")
    joined = ",".join(str(v) for v in given)
    asked = _asked_types(ctx, joined) if joined.replace(",", "").strip() else None
    if asked is not None:
        types = [t for t in types if t in asked]
    since = _one(params.get("_since"), "_since")
    if since is not None and date_bounds(since) is None:
        raise FhirError(Code.INVALID_SEARCH_VALUE, f"_since: '{since[:40]}' is not a FHIR"
                                                   " instant")
    filters = [("_lastUpdated", f"ge{since}")] if since else []
    count = _natural(_one(params.get("_count"), "_count"), "_count")
    size = ctx.settings.default_page_size if count is None else min(
        count, ctx.settings.max_page_size)
    offset = _natural(_one(params.get("_offset"), "_offset"), "_offset")
    warnings = tuple(f"{p} is not supported by $everything and was ignored"
                     for p in ("start", "end") if p in params)

    stored = await ctx.store.read(owner, req.id)
    if stored is None:
        raise FhirError(Code.NOT_FOUND, f"{owner}/{req.id} is not known")
    await guard.ensure_visible(ctx.access, ctx.store, stored)
    if stored.deleted:
        raise FhirError(Code.GONE, f"{owner}/{req.id} was deleted")
    restriction = guard.restriction(ctx.access)
    cap = ctx.settings.max_search_results
    pointing = await _pointing(ctx, kind, req.id)
    keys = await _record(ctx, owner, req.id, types, pointing, filters, cap + 1, restriction)
    if asked is None or any(kind.follows(t) for t in asked):
        # what the record refers to, followed from all of it (also from what
        # _type or _since leave out)
        whole = keys if asked is None and not filters else await _record(
            ctx, owner, req.id, [owner, *sorted(compartment)], pointing, [], cap + 1,
            restriction)
        keys += await _referenced(ctx, whole, kind.follows, asked, filters,
                                  cap + 1 - len(keys), restriction, req.base, set(keys))
    pairs = [(k, v) for k, v in req.query if k not in ("_format", "_pretty")]
    self_link = f"{req.base}/{owner}/{req.id}/$everything"
    if pairs:
        self_link += "?" + urlencode(pairs)
    guard.note(owner, req.id, None, self_link)
    return await _answer(ctx, owner, keys, base=req.base, size=size, offset=offset or 0,
                         self_link=self_link, warnings=warnings)


async def every_type(ctx: Context, owner: str, id: str, pairs: list[tuple[str, str]], *,
                     base: str, strict: bool) -> FhirResponse:
    """``[base]/Patient/[id]/*`` (search.html#compartments): every resource in the
    compartment, of any of R4's five compartments, the owner first, then type by type
    in creation order, as ``$everything`` gathers its record (nothing it refers to is
    added). ``_type`` chooses the types; the parameters every type has (``_id``,
    ``_lastUpdated``, ``_tag``, ``_profile``, ``_security``, ``_source``) filter;
    ``_count`` sets the page size. Any other parameter is ignored with a warning (400
    under ``Prefer: handling=strict``): it means something else, or nothing, in each
    type."""
    check_id(id)
    kind = _kind(ctx, owner)
    types = [owner, *sorted(kind.compartment)]
    common = ctx.registry.common_search_params
    filters: list[tuple[str, str]] = []
    warnings: list[str] = []
    ignored: set[str] = set()
    size = ctx.settings.default_page_size
    for key, value in pairs:
        if key == "_type":
            asked = _asked_types(ctx, value)
            types = [t for t in types if t in asked]
        elif key == "_count":
            size = min(_natural(value, "_count") or 0, ctx.settings.max_page_size)
        elif key.partition(":")[0] in common:
            filters.append((key, value))
        elif key not in ("_format", "_pretty"):
            if strict:
                raise FhirError(Code.UNKNOWN_SEARCH_PARAM,
                                f"a search of every type in a compartment takes _type, _count"
                                f" and the parameters every type has, not '{key[:64]}'")
            warnings.append(f"'{key[:64]}' is not a parameter of every type and was ignored")
            ignored.add(key)
    if owner == "Patient":
        guard.note_patients([id])
    pointing = await _pointing(ctx, kind, id)
    if owner in types and not guard.allows(owner, "search"):
        types.remove(owner)  # (the others are left out by _record, as a search would)
    keys = await _record(ctx, owner, id, types, pointing, filters,
                         ctx.settings.max_search_results + 1, guard.restriction(ctx.access))
    # the self link names the parameters used, not those ignored (search.html#selflink)
    kept = [(k, v) for k, v in pairs if k not in ("_format", "_pretty") and k not in ignored]
    self_link = f"{base}/{owner}/{id}/*" + (f"?{urlencode(kept)}" if kept else "")
    guard.note("*", None, None, self_link)
    return await _answer(ctx, owner, keys, base=base, size=size, self_link=self_link,
                         warnings=tuple(warnings))


def _outside(resource_type: str, compartment: dict[str, tuple[str, ...]]) -> bool:
    """Whether resources of the type belong to no patient's record."""
    return resource_type != "Patient" and not compartment.get(resource_type)


async def _record(
    ctx: Context, owner: str, id: str, types: list[str], pointing: dict[str, list[str]],
    filters: list[tuple[str, str]], limit: int, restriction: Restriction | None,
) -> list[tuple[str, str]]:
    """The owner (when ``types`` holds its type) and its compartment resources of
    ``types``: only the types whose compartment parameters point at the owner
    anywhere (``pointing``: one index lookup), each with one search over those
    parameters together."""
    keys: list[tuple[str, str]] = []
    if owner in types:
        own = parse_search(owner, [("_id", id), *filters], ctx.registry.search_params,
                           strict=True)
        keys += await ctx.store.search_keys(own, 1, restriction)
    seen = set(keys)
    for rt in types:
        if rt not in pointing or not guard.allows(rt, "search"):
            continue  # not granted: left out, as a search would not show it
        linked = pointing[rt]
        query = parse_search(rt, [(linked[0], f"{owner}/{id}"), *filters],
                             ctx.registry.search_params, strict=True)
        link, *rest = query.criteria
        query = replace(query, criteria=(replace(link, stored=tuple(linked)), *rest))
        for key in await ctx.store.search_keys(query, limit - len(keys), restriction):
            if key not in seen:
                seen.add(key)
                keys.append(key)
        if len(keys) >= limit:
            break
    return keys


async def _referenced(
    ctx: Context, record: list[tuple[str, str]], follows: Callable[[str], bool],
    asked: set[str] | None, filters: list[tuple[str, str]], limit: int,
    restriction: Restriction | None, base: str, held: set[tuple[str, str]],
) -> list[tuple[str, str]]:
    """What ``record`` refers to, of the types it ``follows`` (the caller may search
    them, ``_type`` names them, ``_since`` holds) and not ``held`` already, type by
    type: by reference parameters; the Binaries whose ``securityContext`` is part of
    the record and the patient's documents (Bundles); the Binaries its
    DocumentReferences' attachments name by URL."""
    if limit <= 0 or not record:
        return []
    found = await ctx.store.includes(_REFERENCES, record, limit, restriction)
    found += await ctx.store.includes(_PROXIED, record, limit, restriction)
    checked: dict[str, list[str]] = {}  # found: they exist, and the caller may see them
    for rt, id in found:
        if follows(rt) and (asked is None or rt in asked) and (rt, id) not in held \
                and guard.allows(rt, "search"):
            checked.setdefault(rt, []).append(id)
    named: list[str] = []  # named: to be looked for
    if (asked is None or "Binary" in asked) and guard.allows("Binary", "search"):
        known = {*checked.get("Binary", ()), *(id for rt, id in held if rt == "Binary")}
        named = [id for id in await _attached(ctx, record, base) if id not in known]
    out: list[tuple[str, str]] = []
    for rt in sorted({*checked, *(["Binary"] if named else [])}):
        ids = list(dict.fromkeys(checked.get(rt, [])))
        if not filters:
            out += [(rt, id) for id in ids]
            ids = []
        if rt == "Binary":
            ids += named
        for start in range(0, len(ids), _ID_CHUNK):
            query = parse_search(rt, [("_id", ",".join(ids[start : start + _ID_CHUNK])),
                                      *filters], ctx.registry.search_params, strict=True)
            out += await ctx.store.search_keys(query, limit, restriction)
    return out[:limit]


async def _attached(ctx: Context, record: list[tuple[str, str]], base: str) -> list[str]:
    """Ids of the local Binaries the record's DocumentReferences hold their content in
    (``content.attachment.url``: ``Binary/[id]`` or an absolute URL on this server)."""
    documents = [k for k in record if k[0] == "DocumentReference"]
    ids: dict[str, None] = {}
    for start in range(0, len(documents), _ID_CHUNK):
        for stored in await ctx.store.read_many(documents[start : start + _ID_CHUNK]):
            if stored.content is None:
                continue
            for content in fjson.loads_stored(stored.content).get("content") or ():
                url = (content.get("attachment") or {}).get("url") \
                    if isinstance(content, dict) else None
                if not isinstance(url, str):
                    continue
                if url.startswith(f"{base}/"):
                    url = url[len(base) + 1:]
                rtype, _, id = url.partition("/")
                if rtype == "Binary" and _ID.fullmatch(id):
                    ids[id] = None
    return list(ids)


OPERATION = Operation(
    "everything", everything, instance=True, types=frozenset({"Patient", "Encounter"}),
    definition="http://hl7.org/fhir/OperationDefinition/{type}-everything",
)
