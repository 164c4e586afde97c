"""The FHIR REST route table, free of any web framework.

``route`` maps a :class:`FhirRequest` (method, path below the FHIR base,
query pairs, headers, parsed body) to an interaction. The HTTP layer and the
batch/transaction processor both call it, so a Bundle entry behaves exactly
like the same request sent alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.fhir.outcome import Code, FhirError
from gateway.interactions import (
    capabilities,
    create,
    delete,
    everything,
    history,
    patch,
    read,
    search,
)
from gateway.interactions import update as update_mod
from gateway.interactions.base import Context, FhirResponse, Prefer
from gateway.interactions.operations import OperationRequest, invoke


@dataclass(slots=True)
class FhirRequest:
    method: str
    path: str  # below the base, without leading slash: "Patient/1/_history/2"
    query: list[tuple[str, str]] = field(default_factory=list)
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    body: Any = None
    base: str = ""

    @property
    def prefer(self) -> Prefer:
        return Prefer.parse(self.headers.get("prefer"))

    def criteria(self) -> str:
        from urllib.parse import urlencode

        kept = [(k, v) for k, v in self.query if k not in ("_format", "_pretty")]
        return urlencode(kept)


async def _operation(
    ctx: Context, req: FhirRequest, method: str, name: str, rt: str | None, id: str | None,
    version: str | None = None,
) -> FhirResponse:
    op_req = OperationRequest(name, method, rt, id, req.query, req.body, req.base, req.headers,
                              version)
    return await invoke(ctx, ctx.operations, op_req)


_READ = ("GET", "HEAD")


def _not_allowed(req: FhirRequest, *allowed: str) -> FhirError:
    """405, with the methods the URL takes (RFC 9110 15.5.6: the ``Allow`` header)."""
    return FhirError(Code.METHOD_NOT_ALLOWED, f"{req.method} is not supported on"
                     f" '{req.path[:100]}'; it takes {', '.join(allowed)}",
                     headers={"Allow": ", ".join(allowed)})


async def route(ctx: Context, req: FhirRequest) -> FhirResponse:
    parts = [p for p in req.path.split("/") if p]
    method = req.method.upper()
    h = req.headers
    if method == "HEAD":
        method = "GET"
    n = len(parts)
    if n == 0:
        if method == "GET":
            return await search.search(ctx, None, req.query, base=req.base, prefer=req.prefer)
        if method == "POST":
            from gateway.interactions.transaction import process_bundle

            return await process_bundle(ctx, req.body, base=req.base, prefer=req.prefer)
        raise _not_allowed(req, *_READ, "POST")
    head = parts[0]
    if n == 1 and head.startswith("$"):
        return await _operation(ctx, req, method, head[1:], None, None)
    if n == 1 and head == "metadata":
        if method != "GET":
            raise _not_allowed(req, *_READ)
        return await capabilities.capabilities(ctx, base=req.base, query=req.query,
                                               if_none_match=h.get("if-none-match"))
    if n == 1 and head == "_history":
        if method != "GET":
            raise _not_allowed(req, *_READ)
        return await history.history(ctx, None, None, req.query, base=req.base,
                                     strict=req.prefer.strict)
    if n == 1 and head == "_search":
        if method != "POST":
            raise _not_allowed(req, "POST")
        return await search.search(ctx, None, req.query, base=req.base, prefer=req.prefer)
    if not head[:1].isupper():
        raise FhirError(Code.UNKNOWN_ENDPOINT, f"'{head[:64]}' is not a known endpoint")
    rt = head
    if not ctx.registry.is_resource_type(rt):
        raise FhirError(Code.UNKNOWN_ENDPOINT, f"Unknown resource type '{rt[:64]}'")
    if n == 1:
        if method == "GET":
            return await search.search(ctx, rt, req.query, base=req.base, prefer=req.prefer)
        if method == "POST":
            return await create.create(ctx, rt, req.body, base=req.base, prefer=req.prefer,
                                       if_none_exist=h.get("if-none-exist"))
        conditional = req.criteria()
        if not conditional:  # (PUT, PATCH and DELETE on a type need criteria)
            raise _not_allowed(req, *_READ, "POST")
        if method == "PUT":
            return await update_mod.update(ctx, rt, None, req.body, base=req.base,
                                           prefer=req.prefer, if_match=h.get("if-match"),
                                           if_none_match=h.get("if-none-match"),
                                           criteria=conditional)
        if method == "DELETE":
            return await delete.delete(ctx, rt, None, if_match=h.get("if-match"),
                                       criteria=conditional)
        if method == "PATCH":
            return await patch.patch(ctx, rt, None, req.body, base=req.base, prefer=req.prefer,
                                     if_match=h.get("if-match"), criteria=conditional)
        raise _not_allowed(req, *_READ, "POST", "PUT", "PATCH", "DELETE")
    second = parts[1]
    if n == 2 and second == "_search":
        if method != "POST":
            raise _not_allowed(req, "POST")
        return await search.search(ctx, rt, req.query, base=req.base, prefer=req.prefer)
    if n == 2 and second == "_history":
        if method != "GET":
            raise _not_allowed(req, *_READ)
        return await history.history(ctx, rt, None, req.query, base=req.base,
                                     strict=req.prefer.strict)
    if n == 2 and second.startswith("$"):
        return await _operation(ctx, req, method, second[1:], rt, None)
    id = second
    if n == 3 and parts[2].startswith("$"):
        return await _operation(ctx, req, method, parts[2][1:], rt, id)
    if n == 2:
        if method == "GET":
            return await read.read(ctx, rt, id, if_none_match=h.get("if-none-match"),
                                   if_modified_since=h.get("if-modified-since"),
                                   query=req.query)
        if method == "PUT":
            return await update_mod.update(ctx, rt, id, req.body, base=req.base,
                                           prefer=req.prefer, if_match=h.get("if-match"),
                                           if_none_match=h.get("if-none-match"))
        if method == "DELETE":
            return await delete.delete(ctx, rt, id, if_match=h.get("if-match"))
        if method == "PATCH":
            return await patch.patch(ctx, rt, id, req.body, base=req.base, prefer=req.prefer,
                                     if_match=h.get("if-match"))
        raise _not_allowed(req, *_READ, "PUT", "PATCH", "DELETE")
    if ((n == 3 and method == "GET") or (n == 4 and parts[3] == "_search" and method == "POST")) \
            and ctx.registry.is_resource_type(parts[2]):
        # search in a compartment: Patient/[id]/Observation (search.html#compartments)
        return await search.search(ctx, parts[2], req.query, base=req.base,
                                   prefer=req.prefer, compartment=(rt, id))
    if ((n == 3 and method == "GET") or (n == 4 and parts[3] == "_search"
                                           and method == "POST")) and parts[2] == "*":
        # every type of a compartment: Patient/[id]/* (search.html#compartments)
        return await everything.every_type(ctx, rt, id, req.query, base=req.base,
                                           strict=req.prefer.strict)
    if n == 5 and parts[2] == "_history" and parts[4].startswith("$"):
        return await _operation(ctx, req, method, parts[4][1:], rt, id, parts[3])
    if parts[2] == "_history" and n in (3, 4):
        if method != "GET":
            raise _not_allowed(req, *_READ)
        if n == 3:
            return await history.history(ctx, rt, id, req.query, base=req.base,
                                         strict=req.prefer.strict)
        return await read.vread(ctx, rt, id, parts[3], req.query,
                                if_none_match=h.get("if-none-match"),
                                if_modified_since=h.get("if-modified-since"))
    raise FhirError(Code.UNKNOWN_ENDPOINT, f"'{req.path[:100]}' is not a known endpoint")
