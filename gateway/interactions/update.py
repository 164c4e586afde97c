"""update and conditional update: https://hl7.org/fhir/R4/http.html#update, #cond-update.

Create-on-update is allowed (the client chooses the id). ``If-Match`` with a
weak ETag makes the update conditional on the current version (412 when it
is not). ``If-None-Match: *`` makes it create-only (RFC 9110 13.1.2; 412 when the
resource exists).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

from gateway.fhir import json as fjson
from gateway.fhir.outcome import Code, FhirError
from gateway.interactions.base import (
    Context,
    FhirResponse,
    Prefer,
    admit,
    check_body,
    check_id,
    check_type,
    check_version,
    parse_criteria,
    run_write,
    write_response,
)
from gateway.interactions.conditional import check_satisfies, resolve_references, single_match
from gateway.interactions.create import as_client_creates, new_id
from gateway.security import guard
from gateway.storage.interface import StoredResource, StoreTransaction


def check_absent(current: StoredResource | None, if_none_match: str | None, what: str) -> None:
    """``If-None-Match`` on a write (RFC 9110 13.1.2): ``*`` lets it create only; a
    list of ETags refuses to replace a version it names. 412 when the condition fails."""
    if if_none_match is None or current is None or current.deleted:
        return
    tags = {t.strip() for t in if_none_match.split(",")}
    if "*" in tags or current.etag in tags or f'"{current.version}"' in tags:
        raise FhirError(Code.RESOURCE_EXISTS,
                        f"{what}: If-None-Match {if_none_match[:40]!r} and version "
                        f"{current.version} exists")


def unchanged(ctx: Context, current: StoredResource | None, resource: dict[str, Any]) -> bool:
    """Whether writing ``resource`` would store what ``current`` holds, but for
    ``meta.versionId`` and ``meta.lastUpdated``: such an update keeps the current
    version (``skip_unchanged_updates``), so a system that sends the same data
    again makes no new version and no notification."""
    return ctx.settings.skip_unchanged_updates and same_content(current, resource)


def same_content(current: StoredResource | None, resource: dict[str, Any]) -> bool:
    """Whether ``current`` holds ``resource``, but for ``meta.versionId`` and
    ``meta.lastUpdated`` (and is not deleted)."""
    if current is None or current.deleted or not current.content:
        return False
    try:
        stored = fjson.loads(current.content)
    except FhirError:
        return False
    return isinstance(stored, dict) and _same(_sans_version(stored), _sans_version(resource))


def _sans_version(resource: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in resource.items() if k != "meta"}
    meta = resource.get("meta")
    if isinstance(meta, dict):
        meta = {k: v for k, v in meta.items() if k not in ("versionId", "lastUpdated")}
    if meta:
        out["meta"] = meta
    return out


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON is written: ``1.0`` is not ``1.00``, nor ``1`` (FHIR decimals keep
    their precision), and ``true`` is not ``1``."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(v, b[k]) for k, v in a.items())
    if isinstance(a, list):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, Decimal):
        return str(a) == str(b)
    return bool(a == b)


async def update_in(
    ctx: Context,
    tx: StoreTransaction,
    resource_type: str,
    id: str,
    resource: dict[str, Any],
    *,
    if_match: str | None = None,
    if_none_match: str | None = None,
    method: str = "PUT",
    new_patients: frozenset[str] = frozenset(),
) -> tuple[StoredResource, bool]:
    """Write the next version of ``resource_type/id``; True when it did not exist before."""
    await tx.lock(f"{resource_type}/{id}")
    current = await tx.current(resource_type, id)
    if current is None or current.deleted:
        if current is None:
            guard.require(resource_type, "create")
        as_client_creates(resource_type, resource)
    about = await guard.check_write(ctx.access, tx, resource, current, new_patients)
    check_version(current, if_match, f"{resource_type}/{id}")
    check_absent(current, if_none_match, f"{resource_type}/{id}")
    if ctx.settings.skip_unchanged_updates and current is not None \
            and unchanged(ctx, current, {**resource, "id": id}):
        guard.note(resource_type, id, current.version, patients=about)
        return current, False
    stored = await tx.put(resource_type, id, resource, method, current, creator=guard.creator())
    guard.note(resource_type, id, stored.version, patients=about)
    return stored, current is None or current.deleted


async def resolve_conditional_id(
    ctx: Context, tx: StoreTransaction, resource_type: str, criteria: list[tuple[str, str]],
    body_id: Any,
) -> str:
    """The id a conditional update writes to (http.html#cond-update): the one
    resource the criteria match, else the body's id for a new resource (409 when a
    resource the criteria do not match has it), else a new one."""
    found = await single_match(ctx, tx, resource_type, criteria)
    if found is None:
        if not isinstance(body_id, str):
            return new_id()
        taken = await tx.current(resource_type, body_id)
        if taken is not None and not taken.deleted:
            raise FhirError(Code.CONDITIONAL_ID_TAKEN,
                            f"{resource_type}/{body_id} exists and does not match "
                            f"'{urlencode(criteria)[:200]}'", ("id",))
        return body_id
    if body_id is not None and body_id != found:
        raise FhirError(Code.ID_MISMATCH,
                        f"Resource.id '{body_id}' differs from the matching resource '{found}'",
                        ("id",))
    return found


async def update(
    ctx: Context,
    resource_type: str,
    id: str | None,
    body: Any,
    *,
    base: str,
    prefer: Prefer,
    if_match: str | None = None,
    if_none_match: str | None = None,
    criteria: str | None = None,
) -> FhirResponse:
    check_type(ctx, resource_type)
    guard.require(resource_type, "update")
    resource = check_body(ctx, body, resource_type)
    if id is not None:
        check_id(id)
        if "id" not in resource:
            raise FhirError(Code.ID_MISSING, "Resource.id is required for update", ("id",))
        if resource["id"] != id:
            raise FhirError(Code.ID_MISMATCH,
                            f"Resource.id '{resource['id']}' differs from the URL's '{id}'",
                            ("id",))
    await admit(ctx, resource)

    async def work(tx: StoreTransaction) -> tuple[StoredResource, bool]:
        target = id
        pairs = parse_criteria(criteria) if criteria is not None else None
        if target is None:
            assert pairs is not None
            target = await resolve_conditional_id(ctx, tx, resource_type, pairs,
                                                  resource.get("id"))
        body = await resolve_references(ctx, tx, resource)
        written = await update_in(ctx, tx, resource_type, target, dict(body),
                                  if_match=if_match, if_none_match=if_none_match)
        if pairs is not None and written[1]:  # (one that matched may change what it matched)
            await check_satisfies(ctx, tx, written[0], pairs, "conditional update")
        return written

    stored, created = await run_write(ctx, work)
    return write_response(201 if created else 200, stored, base, prefer, located=created)
