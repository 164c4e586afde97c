"""delete and conditional delete: https://hl7.org/fhir/R4/http.html#delete.

Deletion is logical: a new version marks the resource deleted; history keeps
the earlier versions and later reads answer 410 Gone. Deleting what does not
exist, or is already deleted, succeeds (204) without writing.
"""

from __future__ import annotations

from gateway.fhir.outcome import Code, FhirError
from gateway.interactions.base import (
    Context,
    FhirResponse,
    check_id,
    check_type,
    check_version,
    parse_criteria,
    run_write,
)
from gateway.interactions.conditional import single_match
from gateway.security import guard
from gateway.storage.interface import StoredResource, StoreTransaction


async def delete_in(
    ctx: Context,
    tx: StoreTransaction,
    resource_type: str,
    id: str,
    *,
    if_match: str | None = None,
) -> StoredResource | None:
    await tx.lock(f"{resource_type}/{id}")
    if resource_type == "SearchParameter" and ctx.search_parameters is not None:
        ctx.search_parameters.written(None)
    current = await tx.current(resource_type, id)
    about: frozenset[str] = frozenset()
    if current is not None and not current.deleted:
        try:
            about = await guard.check_write(ctx.access, tx, None, current)
        except FhirError as exc:
            if exc.code is not Code.NOT_FOUND:
                raise
            current = None  # not the caller's to see: as if absent
    check_version(current, if_match, f"{resource_type}/{id}")
    if current is None or current.deleted:
        return None
    guard.note(resource_type, id, current.version + 1, patients=about)
    return await tx.delete(current)


async def delete(
    ctx: Context,
    resource_type: str,
    id: str | None,
    *,
    if_match: str | None = None,
    criteria: str | None = None,
) -> FhirResponse:
    check_type(ctx, resource_type)
    guard.require(resource_type, "delete")
    if id is not None:
        check_id(id)

    async def work(tx: StoreTransaction) -> StoredResource | None:
        target = id
        if target is None:
            assert criteria is not None
            target = await single_match(ctx, tx, resource_type, parse_criteria(criteria))
            if target is None:
                return None
        return await delete_in(ctx, tx, resource_type, target, if_match=if_match)

    deleted = await run_write(ctx, work)
    if deleted is None:
        return FhirResponse(204)
    return FhirResponse(204, None, {"ETag": deleted.etag}, deleted.last_updated)
