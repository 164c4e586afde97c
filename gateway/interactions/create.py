"""create and conditional create: https://hl7.org/fhir/R4/http.html#create, #ccreate."""

from __future__ import annotations

import uuid
from typing import Any

from gateway.interactions.base import (
    Context,
    FhirResponse,
    Prefer,
    admit,
    check_body,
    check_type,
    if_none_exist_criteria,
    run_write,
    write_response,
)
from gateway.interactions.conditional import check_satisfies, resolve_references, single_match
from gateway.security import guard
from gateway.storage.interface import StoredResource, StoreTransaction


def new_id() -> str:
    return str(uuid.uuid4())


def as_client_creates(resource_type: str, resource: dict[str, Any]) -> None:
    """What a client may create: a Subscription "in the requested or off state" only
    ("only the server can move a subscription from requested to active",
    Subscription.status); one sent as ``active`` (or ``error``) is taken as
    ``requested``, and the server activates it once its handshake went through."""
    if resource_type == "Subscription" and resource.get("status") in ("active", "error"):
        resource["status"] = "requested"


async def create_in(
    ctx: Context,
    tx: StoreTransaction,
    resource_type: str,
    body: dict[str, Any],
    *,
    if_none_exist: str | None = None,
    id: str | None = None,
    new_patients: frozenset[str] = frozenset(),
) -> tuple[StoredResource, bool]:
    """Create (or find, under ``If-None-Exist``) in ``tx``; True when created.

    ``new_patients``: Patients this request creates (a transaction's entries
    may belong to them before they exist)."""
    criteria = if_none_exist_criteria(if_none_exist, resource_type) if if_none_exist else None
    if criteria is not None:
        existing = await single_match(ctx, tx, resource_type, criteria)
        if existing is not None:
            current = await tx.current(resource_type, existing)
            assert current is not None
            return current, False
    rid = id or new_id()
    body["id"] = rid  # known before the checks: a new Patient is its own compartment
    as_client_creates(resource_type, body)
    about = await guard.check_write(ctx.access, tx, body, None, new_patients)
    # no lock: the id is a fresh UUID nobody else can be writing to
    stored = await tx.put(resource_type, rid, body, "POST", None, creator=guard.creator())
    guard.note(resource_type, rid, stored.version, patients=about)
    if criteria is not None:
        await check_satisfies(ctx, tx, stored, criteria, "conditional create")
    return stored, True


async def create(
    ctx: Context,
    resource_type: str,
    body: Any,
    *,
    base: str,
    prefer: Prefer,
    if_none_exist: str | None = None,
) -> FhirResponse:
    check_type(ctx, resource_type)
    guard.require(resource_type, "create")
    resource = check_body(ctx, body, resource_type)
    resource.pop("id", None)  # the server assigns the id on create
    await admit(ctx, resource)

    async def work(tx: StoreTransaction) -> tuple[StoredResource, bool]:
        body = await resolve_references(ctx, tx, resource)
        return await create_in(ctx, tx, resource_type, dict(body), if_none_exist=if_none_exist)

    stored, created = await run_write(ctx, work)
    if not created:
        # ccreate found a match: 200 OK, nothing written; where it is, as HAPI FHIR says
        # (and a transaction's response.location)
        return write_response(200, stored, base, prefer, located=True)
    return write_response(201, stored, base, prefer)
