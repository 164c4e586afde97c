"""patch: https://hl7.org/fhir/R4/http.html#patch, with JSON Patch (RFC 6902,
``application/json-patch+json``), FHIRPath Patch (a ``Parameters`` resource,
``application/fhir+json``; :mod:`gateway.fhir.fhirpatch`) or XML Patch (RFC 5261,
``application/xml-patch+xml``; :mod:`gateway.fhir.xmlpatch`: applied to the FHIR
XML form of the resource, which is then read back as a FHIR XML body is).

The patch applies to the current version inside the write transaction; the
result must still be the same resource (type and id unchanged).

A patch has at most ``CAREPATH_MAX_PATCH_OPERATIONS`` operations, and its result
may weigh no more than a request may (``CAREPATH_MAX_REQUEST_BYTES``): 413 GW-1011
otherwise. Only JSON Patch's ``copy`` (RFC 6902 4.5) makes a document grow by more
than the patch carries (each copy of an array into itself doubles it), so the
weight is followed copy by copy and the patch refused before the copy that would
pass the limit is made. Nor may the result nest deeper than a body may
(``CAREPATH_MAX_JSON_DEPTH``; 400 GW-1010): operations whose paths lead into what
earlier ones added can nest without bound. The selectors of an XML Patch and the
paths of a FHIRPath Patch examine a bounded number of nodes (413 GW-1011 beyond;
``xmlpatch.MAX_VISITS``, ``fhirpatch.MAX_VISITS``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jsonpatch

from gateway.fhir import fhirpatch, xmlpatch
from gateway.fhir import json as fjson
from gateway.fhir import xml as fhir_xml
from gateway.fhir.outcome import Code, FhirError
from gateway.interactions.base import (
    Context,
    FhirResponse,
    Prefer,
    admit,
    check_id,
    check_type,
    check_version,
    parse_criteria,
    run_write,
    write_response,
)
from gateway.interactions.conditional import single_match
from gateway.interactions.update import unchanged
from gateway.security import guard
from gateway.storage.interface import StoredResource, StoreTransaction


@dataclass(frozen=True, slots=True)
class Patch:
    """A checked patch: JSON Patch, FHIRPath Patch or XML Patch operations."""

    fhirpath: bool
    ops: list[dict[str, Any]]
    xml: list[xmlpatch.Operation] | None = None


def check_patch(body: Any, max_operations: int) -> Patch:
    if isinstance(body, xmlpatch.Document):
        _count(len(body), max_operations)
        return Patch(False, [], xmlpatch.check(body))
    if fhirpatch.is_fhirpath_patch(body):
        ops = body.get("parameter")
        if isinstance(ops, list):
            _count(len(ops), max_operations)
        return Patch(True, fhirpatch.check(body))
    if not isinstance(body, list) or not all(isinstance(op, dict) for op in body):
        raise FhirError(Code.INVALID_PATCH, "a JSON Patch document is an array of operations;"
                                            " a FHIRPath Patch is a Parameters resource")
    _count(len(body), max_operations)
    return Patch(False, body)


def _count(operations: int, limit: int) -> None:
    if operations > limit:
        raise FhirError(Code.TOO_LARGE, f"the patch has {operations} operations; at most"
                                        f" {limit} are taken (CAREPATH_MAX_PATCH_OPERATIONS)")


def _copied_bytes(doc: Any, op: dict[str, Any], n: int) -> int:
    """What a JSON Patch ``copy`` adds to the document: the serialized length of the
    value at ``from`` (0 when there is none: applying the operation then fails)."""
    try:
        value = jsonpatch.JsonPointer(op["from"]).resolve(doc)
    except (jsonpatch.JsonPointerException, KeyError, TypeError):
        return 0
    try:
        return len(fjson.dumps(value))
    except TypeError:  # orjson's JSONEncodeError: nested deeper than JSON is written
        raise _too_deep(f"JSON Patch: operation {n} ({_named(op)}) copies a value that")\
            from None


def _too_deep(what: str) -> FhirError:
    return FhirError(Code.TOO_DEEP, f"{what} nests deeper than a resource may"
                                    " (CAREPATH_MAX_JSON_DEPTH)")


def _named(op: dict[str, Any]) -> str:
    """An operation as the client wrote it, shortened: its op and path."""
    return f"{str(op.get('op'))[:20]} {str(op.get('path'))[:200]}"


def _reason(exc: Exception) -> str:
    """What went wrong, in words of the patch, not of the document."""
    if isinstance(exc, (jsonpatch.InvalidJsonPatch, jsonpatch.JsonPatchConflict)):
        # about the operation (a missing member, an unknown op) or its path's last step
        return str(exc)[:200]
    if isinstance(exc, jsonpatch.JsonPointerException):
        return "the path does not lead to an element of the resource"
    return "the operation does not fit the resource"


def apply_patch(ctx: Context, current: StoredResource, patch: Patch) -> dict[str, Any]:
    assert current.content is not None
    if patch.xml is not None:
        return _xml_patch(ctx, current, patch.xml)
    doc = fjson.loads_stored(current.content)
    if patch.fhirpath:
        model = getattr(ctx.validator, "model", None)
        if model is None:
            raise FhirError(Code.UNSUPPORTED_MEDIA_TYPE,
                            "FHIRPath Patch needs the validator's model; use JSON Patch")
        return _shallow(ctx, _same_resource(current, fhirpatch.apply(doc, patch.ops, model)))
    result: Any = doc  # parsed for this patch alone: changed in place
    limit = ctx.settings.max_request_bytes
    # an upper bound of the document's serialized length: what is stored, and every
    # copy (other operations add no more than the patch body carries, whose length is
    # limited already; what they remove is not subtracted)
    weight = len(current.content)
    for n, op in enumerate(patch.ops):
        if op.get("op") == "copy":
            weight += _copied_bytes(result, op, n)
            if weight > limit:
                raise FhirError(Code.TOO_LARGE,
                                f"JSON Patch: operation {n} ({_named(op)}) would make the"
                                f" resource larger than the {limit} bytes a request may"
                                " carry (CAREPATH_MAX_REQUEST_BYTES)")
        try:
            result = jsonpatch.JsonPatch([op]).apply(result, in_place=True)
        except jsonpatch.JsonPatchTestFailed:
            raise FhirError(Code.PATCH_TEST_FAILED,
                            f"JSON Patch test failed: operation {n} ({_named(op)})") from None
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError,
                ValueError, KeyError, IndexError) as exc:
            # the library's messages quote the document (the value a test found, the
            # object a path missed in): a patch may be allowed where a read is not
            raise FhirError(Code.INVALID_PATCH, f"JSON Patch cannot be applied: operation {n}"
                                                f" ({_named(op)}): {_reason(exc)}") from None
    if not isinstance(result, dict):
        raise FhirError(Code.PATCH_RESULT_INVALID, "the patched document is not a resource")
    return _shallow(ctx, _same_resource(current, result))


def _xml_patch(ctx: Context, current: StoredResource,
               ops: list[xmlpatch.Operation]) -> dict[str, Any]:
    """XML Patch over the resource's FHIR XML; the patched tree read back as a FHIR
    XML body is (an element R4 does not define is an error), and weighed: the
    operations add no more than the patch carries, but XML is not what is stored."""
    model = getattr(ctx.validator, "model", None)
    if model is None:
        raise FhirError(Code.UNSUPPORTED_MEDIA_TYPE,
                        "XML Patch needs the validator's model; use JSON Patch")
    assert current.content is not None
    try:
        root = fhir_xml.to_element(current.content, model)
    except FhirError:  # characters XML cannot carry, stored before they were refused
        raise FhirError(Code.INVALID_PATCH, "XML Patch: the resource holds characters XML"
                                            " cannot carry; use JSON Patch") from None
    root = xmlpatch.apply(root, ops)
    try:
        result = fhir_xml.from_element(root, model)
    except FhirError as exc:
        if exc.code is not Code.INVALID_RESOURCE:
            raise
        raise FhirError(Code.PATCH_RESULT_INVALID,
                        f"XML Patch: the patched resource is not FHIR XML: {exc.diagnostics}",
                        exc.expression) from None
    result = _shallow(ctx, _same_resource(current, result))
    limit = ctx.settings.max_request_bytes
    if len(fjson.dumps(result)) > limit:
        raise FhirError(Code.TOO_LARGE, f"XML Patch: the patched resource is larger than the"
                                        f" {limit} bytes a request may carry"
                                        " (CAREPATH_MAX_REQUEST_BYTES)")
    return result


def _shallow(ctx: Context, result: dict[str, Any]) -> dict[str, Any]:
    """``result``, unless it nests deeper than a request body may (a walk over its
    objects and arrays: microseconds for a resource of a few kilobytes)."""
    if fjson.check_limits(result, ctx.settings.max_json_depth, None) is not None:
        raise _too_deep("the patched resource")
    return result


def _same_resource(current: StoredResource, result: dict[str, Any]) -> dict[str, Any]:
    if result.get("resourceType") != current.resource_type or result.get("id") != current.id:
        raise FhirError(Code.PATCH_RESULT_INVALID, "a patch may not change resourceType or id")
    return result


async def patch_in(
    ctx: Context,
    tx: StoreTransaction,
    resource_type: str,
    id: str,
    ops: Patch,
    *,
    if_match: str | None = None,
    new_patients: frozenset[str] = frozenset(),
) -> StoredResource:
    await tx.lock(f"{resource_type}/{id}")
    current = await tx.current(resource_type, id)
    if current is None:
        raise FhirError(Code.NOT_FOUND, f"{resource_type}/{id} is not known")
    await guard.check_write(ctx.access, tx, None, current)
    if current.deleted:
        raise FhirError(Code.GONE, f"{resource_type}/{id} was deleted")
    check_version(current, if_match, f"{resource_type}/{id}")
    result = apply_patch(ctx, current, ops)
    await admit(ctx, result, tx)
    about = await guard.check_write(ctx.access, tx, result, current, new_patients)
    if unchanged(ctx, current, result):
        guard.note(resource_type, id, current.version, patients=about)
        return current
    stored = await tx.put(resource_type, id, result, "PATCH", current)
    guard.note(resource_type, id, stored.version, patients=about)
    return stored


async def patch(
    ctx: Context,
    resource_type: str,
    id: str | None,
    body: Any,
    *,
    base: str,
    prefer: Prefer,
    if_match: str | None = None,
    criteria: str | None = None,
) -> FhirResponse:
    check_type(ctx, resource_type)
    guard.require(resource_type, "patch")
    if id is not None:
        check_id(id)
    ops = check_patch(body, ctx.settings.max_patch_operations)

    async def work(tx: StoreTransaction) -> StoredResource:
        target = id
        if target is None:
            assert criteria is not None
            target = await single_match(ctx, tx, resource_type, parse_criteria(criteria))
            if target is None:
                raise FhirError(Code.NOT_FOUND, "no resource matches the patch criteria")
        return await patch_in(ctx, tx, resource_type, target, ops, if_match=if_match)

    return write_response(200, await run_write(ctx, work), base, prefer)
