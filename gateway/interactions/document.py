"""``Composition/[id]/$document`` and ``Composition/$document?id=…``:
https://hl7.org/fhir/R4/composition-operation-document.html.

A document made from a Composition held here (documents.html): a Bundle of type
``document`` with a fresh ``identifier`` (bdl-9) and ``timestamp`` (bdl-10), the
Composition first (bdl-11), then every resource it refers to, and every resource
those refer to, until nothing more is named: the subject, authors, attesters,
custodian, encounter, section entries, and the practitioners, organisations and
medications of those entries. Each entry has the resource's ``fullUrl`` on this
server; a version-specific reference brings that version. A document made this
way refers to nothing outside itself but to other servers, as the gateway's
DischargeBundle profile asks of a discharge letter.

Only what the caller may read is included: types its scopes do not let it read,
resources outside its organisation's compartment, and deleted or unknown ones are
left out (a document of what the caller may see, never an oracle for what it may
not). References to other servers and to contained resources stay as they are.

``persist=true`` also stores the document as a Bundle (the caller needs to be
allowed to create Bundles) and answers 201 with its ``Location``. ``graph`` (a
GraphDefinition choosing the resources) is not supported and says so.

The document is the answer's body, as HAPI FHIR and other servers return it, not
wrapped in a searchset.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from gateway.fhir import json as fjson
from gateway.fhir.outcome import Code, FhirError
from gateway.fhir.references import RELATIVE_REF
from gateway.interactions.base import Context, FhirResponse, Prefer
from gateway.interactions.create import create
from gateway.interactions.operations import (
    Operation,
    OperationRequest,
    one_parameter,
    stored_current,
)
from gateway.security import guard
from gateway.storage.interface import StoredResource

_READ_CHUNK = 100


def _flag(value: Any) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    if value in ("true", "false"):
        return bool(value == "true")
    raise FhirError(Code.INVALID_OPERATION, "'persist' is true or false")


def _composition_id(req: OperationRequest, params: dict[str, list[Any]]) -> str:
    if req.id is not None:
        if "id" in params:
            raise FhirError(Code.INVALID_OPERATION,
                            "'id' names the Composition of a type-level $document only")
        return req.id
    named = one_parameter(params, "id")
    if not isinstance(named, str) or not named:
        raise FhirError(Code.INVALID_OPERATION,
                        "Composition/$document needs the 'id' of a Composition")
    local = _local(named, req.base)
    if local is None:
        if "/" not in named:
            return named
        raise FhirError(Code.INVALID_OPERATION,
                        f"'{named[:200]}' is not a Composition on this server")
    rtype, id, version = local
    if rtype != "Composition" or version is not None:
        raise FhirError(Code.INVALID_OPERATION,
                        f"'{named[:200]}' is not a Composition on this server")
    return id


def _local(reference: str, base: str) -> tuple[str, str, str | None] | None:
    """``Type/id`` or ``Type/id/_history/v`` (relative, or absolute on this server) as
    (type, id, version); None for anything else."""
    if reference.startswith(f"{base}/"):
        reference = reference[len(base) + 1:]
    if not RELATIVE_REF.fullmatch(reference):
        return None
    rtype, id, *rest = reference.split("/")
    return rtype, id, rest[1] if rest else None


def _references(node: Any) -> Iterator[str]:
    """Every ``Reference.reference`` in a resource, in document order (contained
    resources included: what they name belongs to the document too)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                yield value
            elif isinstance(value, dict | list):
                yield from _references(value)
    elif isinstance(node, list):
        for item in node:
            yield from _references(item)


async def _gather(ctx: Context, composition: StoredResource, base: str
                  ) -> list[tuple[StoredResource, dict[str, Any]]]:
    """The Composition and, breadth first, what it names, as the caller may read it
    (each with its content)."""
    limit = ctx.settings.max_bundle_entries
    level = [(composition, _content(composition))]
    held = list(level)
    versions = {("Composition", composition.id, composition.version)}
    seen: set[tuple[str, str, str | None]] = {("Composition", composition.id, None)}
    while level:
        named: list[tuple[str, str, str | None]] = []
        for _stored, content in level:
            for reference in _references(content):
                key = _local(reference, base)
                if key is None or key in seen:
                    continue
                seen.add(key)
                if ctx.registry.is_resource_type(key[0]) and guard.allows(key[0], "read"):
                    named.append(key)
        level = []
        for stored in await _read(ctx, named):
            version = (stored.resource_type, stored.id, stored.version)
            if version not in versions:  # (named both by version and as it is now)
                versions.add(version)
                level.append((stored, _content(stored)))
        held += level
        if len(held) > limit:
            raise FhirError(Code.DOCUMENT_TOO_LARGE,
                            f"the document would hold more than {limit} resources")
    return held


def _content(stored: StoredResource) -> dict[str, Any]:
    assert stored.content is not None
    value = fjson.loads_stored(stored.content)
    assert isinstance(value, dict)
    return value


async def _read(ctx: Context, named: list[tuple[str, str, str | None]]
                ) -> list[StoredResource]:
    """The named resources (current, or the version named) that exist and the caller
    may see, in the order named."""
    latest = [(rt, id) for rt, id, version in named if version is None]
    found: dict[tuple[str, str, str | None], StoredResource] = {}
    for start in range(0, len(latest), _READ_CHUNK):
        for stored in await ctx.store.read_many(latest[start : start + _READ_CHUNK]):
            found[(stored.resource_type, stored.id, None)] = stored
    for rt, id, version in named:
        if version is not None and version.isdigit():
            old = await ctx.store.vread(rt, id, int(version))
            if old is not None:
                found[(rt, id, version)] = old
    kept = [k for k in named if k in found and not found[k].deleted
            and found[k].content is not None]
    visible = set(await guard.filter_visible(ctx.access, ctx.store,
                                             list(dict.fromkeys(k[:2] for k in kept))))
    out = []
    for key in kept:
        if key[:2] in visible:
            stored = found[key]
            guard.note_stored(ctx.access, stored)
            out.append(stored)
    return out


async def document(ctx: Context, req: OperationRequest) -> FhirResponse:
    params = req.parameters()
    if "graph" in params:
        raise FhirError(Code.UNSUPPORTED_OPERATION_PARAMETER,
                        "$document does not take a 'graph': it includes every resource the"
                        " Composition refers to")
    persist = _flag(one_parameter(params, "persist"))
    id = _composition_id(req, params)
    composition = await stored_current(ctx, "Composition", id)  # (404, 410)
    held = await _gather(ctx, composition, req.base)
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{uuid.uuid4()}"},
        "type": "document",
        "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "entry": [{"fullUrl": f"{req.base}/{s.resource_type}/{s.id}", "resource": content}
                  for s, content in held],
    }
    if not persist:
        return FhirResponse(200, bundle)
    return await create(ctx, "Bundle", bundle, base=req.base,
                        prefer=Prefer(return_="representation"))


OPERATION = Operation(
    "document", document, type_level=True, instance=True, types=frozenset({"Composition"}),
    definition="http://hl7.org/fhir/OperationDefinition/Composition-document",
)
