"""``StructureDefinition/$snapshot``:
https://hl7.org/fhir/R4/structuredefinition-operation-snapshot.html.

A StructureDefinition with a snapshot made from its differential, as the
gateway makes the snapshots of its own profiles and of those stored on it
without one (``gateway.fhir.validation.snapshot``). Type level: the
``definition`` (a Parameters body, or the StructureDefinition itself as the
body) or the ``url`` of one stored here; instance level: the stored one. Its
base is looked for among the profiles stored here, the gateway's own and R4's
definitions. Nothing is stored. What the generator does not take (re-slicing, a
base not known here, ...) answers 422 GW-4219 saying what. The snapshot is made
on a thread (``gateway.interactions.offload``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.fhir.outcome import Code, FhirError
from gateway.fhir.validation.snapshot import ProfileError
from gateway.interactions.base import Context, FhirResponse
from gateway.interactions.operations import (
    Operation,
    OperationRequest,
    one_parameter,
    stored_content,
)
from gateway.interactions.stored_profiles import stored_definitions


async def snapshot(ctx: Context, req: OperationRequest) -> FhirResponse:
    if ctx.validator is None:
        raise FhirError(Code.UNKNOWN_ENDPOINT, "validation is not configured on this server")
    stored = {sd["url"]: sd for sd in await stored_definitions(ctx)}
    definition: Any
    if req.id is not None:
        definition = await stored_content(ctx, "StructureDefinition", req.id)
    elif isinstance(req.body, dict) and req.body.get("resourceType") == "StructureDefinition":
        definition = req.body
    else:
        params = req.parameters()
        definition, url = one_parameter(params, "definition"), one_parameter(params, "url")
        if definition is None and isinstance(url, str):
            definition = stored.get(url.split("|", 1)[0]) or ctx.registry.canonical(
                url, "StructureDefinition")
            if definition is None:
                raise FhirError(Code.NOT_FOUND, f"StructureDefinition {url[:200]} is not known")
        if definition is None:
            raise FhirError(Code.INVALID_OPERATION,
                            "$snapshot needs a 'definition' (a StructureDefinition) or a 'url'")
    if not isinstance(definition, dict) or \
            definition.get("resourceType") != "StructureDefinition":
        raise FhirError(Code.INVALID_OPERATION, "'definition' must be a StructureDefinition")
    if not (definition.get("differential") or {}).get("element"):
        raise FhirError(Code.SNAPSHOT_FAILED,
                        "the StructureDefinition has no differential to make a snapshot from")
    try:
        made = await asyncio.to_thread(ctx.validator.snapshot, definition, stored)
    except ProfileError as exc:
        raise FhirError(Code.SNAPSHOT_FAILED, str(exc)) from None
    return FhirResponse(200, made)


OPERATION = Operation(
    "snapshot", snapshot, type_level=True, instance=True,
    types=frozenset({"StructureDefinition"}),
    definition="http://hl7.org/fhir/OperationDefinition/StructureDefinition-snapshot",
    takes_resource=True,  # the differential to make a snapshot of
)
