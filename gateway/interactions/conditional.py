"""Conditional create/update/delete/patch matching, written once (http.html#ccreate).

Matching runs inside the write transaction, under a lock on the normalised
criteria, so that concurrent conditional creates with the same criteria
create exactly one resource.
"""

from __future__ import annotations

import copy
import re
from dataclasses import replace
from typing import Any
from urllib.parse import urlencode

from gateway.fhir import json as fjson
from gateway.fhir.outcome import Code, FhirError
from gateway.fhir.references import conditional_references, rewrite
from gateway.fhir.search import SearchQuery, parse_search
from gateway.interactions.base import Context, check_type, parse_criteria
from gateway.interactions.lists import with_list_members
from gateway.interactions.search import reject_ambiguous_ids
from gateway.interactions.terminology import with_value_set_members
from gateway.security import guard
from gateway.storage.interface import StoredResource, StoreTransaction


def criteria_key(resource_type: str, pairs: list[tuple[str, str]]) -> str:
    return f"{resource_type}?{urlencode(sorted(pairs))}"


async def _query(ctx: Context, tx: StoreTransaction, resource_type: str,
                 pairs: list[tuple[str, str]]) -> SearchQuery:
    # stored value sets and Lists are read through the transaction (on a one-connection
    # SQLite database that connection is the transaction's)
    seen = replace(ctx, store=ctx.store.within(tx))
    return await with_list_members(seen, await with_value_set_members(
        seen, parse_search(resource_type, pairs, ctx.registry.search_params, strict=True)))


async def matches(
    ctx: Context, tx: StoreTransaction, resource_type: str, pairs: list[tuple[str, str]]
) -> list[str]:
    """Ids of the resources of ``resource_type`` matching ``pairs`` (at most 2)."""
    query = await _query(ctx, tx, resource_type, pairs)
    if not query.criteria:
        raise FhirError(Code.INVALID_CONDITION, "conditional criteria select nothing")
    guard.require_related(query)  # whether a match exists is an answer too
    await reject_ambiguous_ids(replace(ctx, store=ctx.store.within(tx)), query)
    await tx.lock(criteria_key(resource_type, pairs))
    restriction = guard.restriction(ctx.access)
    return [rid for _, rid in await tx.search_keys(query, 2, restriction)]


async def single_match(
    ctx: Context, tx: StoreTransaction, resource_type: str, pairs: list[tuple[str, str]]
) -> str | None:
    found = await matches(ctx, tx, resource_type, pairs)
    if len(found) > 1:
        raise FhirError(Code.MULTIPLE_MATCHES,
                        f"{criteria_key(resource_type, pairs)} matches more than one resource")
    return found[0] if found else None


#: criteria about other resources than the one written (what refers to it, the
#: Lists naming it): a resource just created cannot meet them, and is not held to them
_NOT_ITS_OWN = ("_has:", "_list")


async def reference_to_match(ctx: Context, tx: StoreTransaction, ref: str,
                             criteria: list[tuple[str, str]]) -> str:
    """``Type/id`` of the one resource a conditional reference ``ref``
    (``Type?criteria``, http.html#trules) matches; 412 for none or several."""
    rt = ref.partition("?")[0]
    found = await single_match(ctx, tx, rt, criteria)
    if found is None:
        raise FhirError(Code.UNRESOLVED_REFERENCE,
                        f"conditional reference '{ref[:200]}' matches nothing")
    return f"{rt}/{found}"


async def check_satisfies(ctx: Context, tx: StoreTransaction, stored: StoredResource,
                          pairs: list[tuple[str, str]], what: str) -> None:
    """400 unless ``stored``, just created by a conditional create or update, matches
    its own criteria (as HAPI FHIR checks, HAPI-0929): one that does not would be
    created anew by the same request sent again, a duplicate each time."""
    own = [(k, v) for k, v in pairs if not k.startswith(_NOT_ITS_OWN)]
    if not own:
        return
    rt, rid = stored.resource_type, stored.id
    query = await _query(ctx, tx, rt, [*own, ("_id", rid)])
    if not any(found == rid for _, found in await tx.search_keys(query, 2, None)):
        raise FhirError(Code.INVALID_CONDITION,
                        f"the resource of the {what} does not match its criteria "
                        f"'{urlencode(pairs)[:200]}': sent again, it would be written again")


#: a conditional reference in serialised JSON (a quick test before the walk)
_CONDITIONAL_IN_JSON = re.compile(rb'"reference":"[A-Z][A-Za-z]+\?')


async def resolve_references(ctx: Context, tx: StoreTransaction,
                             resource: dict[str, Any]) -> dict[str, Any]:
    """``resource`` (written alone or in a batch) with its conditional references
    replaced by the one resource each matches (412 for none or several), as a
    transaction resolves them (http.html#trules) and HAPI FHIR does by default:
    stored as sent, such a reference could never be searched by or followed.
    ``resource`` itself when it has none."""
    if not _CONDITIONAL_IN_JSON.search(fjson.dumps(resource)):
        return resource
    refs = conditional_references(resource)
    if not refs:
        return resource
    resolved: dict[str, str] = {}
    for ref in refs:
        if ref not in resolved:
            rt, _, query = ref.partition("?")
            check_type(ctx, rt)
            guard.require(rt, "search")
            resolved[ref] = await reference_to_match(ctx, tx, ref, parse_criteria(query))
    return rewrite(copy.deepcopy(resource), {}, resolved.__getitem__)  # type: ignore[no-any-return]
