"""Conditional create/update/delete/patch matching, written once (http.html#ccreate).

Matching runs inside the write transaction, under a lock on the normalised
criteria, so that concurrent conditional creates with the same criteria
create exactly one resource.
"""

from __future__ import annotations

from dataclasses import replace
from urllib.parse import urlencode

from gateway.fhir.outcome import Code, FhirError
from gateway.fhir.search import parse_search
from gateway.interactions.base import Context
from gateway.interactions.lists import with_list_members
from gateway.interactions.terminology import with_value_set_members
from gateway.security import guard
from gateway.storage.interface import StoreTransaction


def criteria_key(resource_type: str, pairs: list[tuple[str, str]]) -> str:
    return f"{resource_type}?{urlencode(sorted(pairs))}"


async def matches(
    ctx: Context, tx: StoreTransaction, resource_type: str, pairs: list[tuple[str, str]]
) -> list[str]:
    """Ids of the resources of ``resource_type`` matching ``pairs`` (at most 2)."""
    # stored value sets and Lists are read through the transaction (on a one-connection
    # SQLite database that connection is the transaction's)
    seen = replace(ctx, store=ctx.store.within(tx))
    query = await with_list_members(seen, await with_value_set_members(
        seen, parse_search(resource_type, pairs, ctx.registry.search_params, strict=True)))
    if not query.criteria:
        raise FhirError(Code.INVALID_CONDITION, "conditional criteria select nothing")
    guard.require_related(query)  # whether a match exists is an answer too
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
