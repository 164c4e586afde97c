"""Extended operations (``$name``): https://hl7.org/fhir/R4/operations.html.

Each operation is a module in this package exposing an :class:`Operation`;
``operation_table.OPERATIONS`` lists them. The router dispatches ``$name`` at
system (``/$name``), type (``/Type/$name``) and instance
(``/Type/id/$name``) level; the CapabilityStatement advertises the same table.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.fhir import json as fjson
from gateway.fhir.outcome import Code, FhirError
from gateway.interactions.base import Context, FhirResponse, check_id
from gateway.security import guard
from gateway.storage.interface import StoredResource


@dataclass(frozen=True, slots=True)
class OperationRequest:
    name: str
    method: str
    resource_type: str | None
    id: str | None
    query: list[tuple[str, str]]
    body: Any
    base: str
    headers: Mapping[str, str] = field(default_factory=dict)
    version: str | None = None  # Type/id/_history/vid/$name

    def parameters(self) -> dict[str, list[Any]]:
        """Inputs by name: query pairs (GET) and/or a ``Parameters`` body (POST).

        A ``Parameters`` part gives its ``value[x]`` (or ``resource``, or the
        part itself when it has ``part``); query pairs give strings.
        """
        out: dict[str, list[Any]] = {}
        for k, v in self.query:
            if k not in ("_format", "_pretty"):
                out.setdefault(k, []).append(v)
        body = self.body
        if isinstance(body, dict) and body.get("resourceType") == "Parameters":
            for part in body.get("parameter", []) or []:
                if not isinstance(part, dict) or not isinstance(part.get("name"), str):
                    raise FhirError(Code.INVALID_RESOURCE, "Parameters.parameter needs a name")
                out.setdefault(part["name"], []).append(parameter_value(part))
        return out


def one_parameter(params: dict[str, list[Any]], name: str) -> Any:
    """The value of an operation parameter given at most once (None: not given)."""
    values = params.get(name) or []
    if len(values) > 1:
        raise FhirError(Code.INVALID_OPERATION, f"give '{name}' once")
    return values[0] if values else None


def parameter_value(part: dict[str, Any]) -> Any:
    if "resource" in part:
        return part["resource"]
    if "part" in part:
        return part
    for key, value in part.items():
        if key.startswith("value"):
            return value
    return None


async def stored_current(ctx: Context, resource_type: str, id: str) -> StoredResource:
    """The current version of a stored resource an instance operation works on, as
    the caller may read it (404 unknown or not visible, 410 deleted)."""
    guard.require(resource_type, "read")
    check_id(id)
    stored = await ctx.store.read(resource_type, id)
    if stored is None:
        raise FhirError(Code.NOT_FOUND, f"{resource_type}/{id} is not known")
    await guard.ensure_visible(ctx.access, ctx.store, stored)
    if stored.deleted or stored.content is None:
        raise FhirError(Code.GONE, f"{resource_type}/{id} was deleted")
    return stored


async def stored_content(ctx: Context, resource_type: str, id: str) -> dict[str, Any]:
    """The content of :func:`stored_current`."""
    stored = await stored_current(ctx, resource_type, id)
    assert stored.content is not None
    value = fjson.loads_stored(stored.content)
    assert isinstance(value, dict)
    return value


Handler = Callable[[Context, OperationRequest], Awaitable[FhirResponse]]


@dataclass(frozen=True, slots=True)
class Operation:
    name: str  # without the "$"
    handler: Handler
    system: bool = False
    type_level: bool = False
    instance: bool = False
    types: frozenset[str] | None = None  # None: every resource type
    affects_state: bool = False  # True: POST only
    version_level: bool = False  # also on a version: Type/id/_history/vid/$name
    #: canonical URL of the OperationDefinition (``{type}``: of the resource type's own)
    definition: str | None = None
    #: a POST may carry the resource itself instead of a Parameters body ($validate)
    takes_resource: bool = False

    def allows(self, resource_type: str | None, id: str | None) -> bool:
        if resource_type is None:
            return self.system
        if self.types is not None and resource_type not in self.types:
            return False
        return self.instance if id is not None else self.type_level


async def invoke(
    ctx: Context, operations: Mapping[str, Operation], req: OperationRequest
) -> FhirResponse:
    op = operations.get(req.name)
    where = "/".join(p for p in (req.resource_type, req.id) if p) or "the system"
    if req.version is not None:
        where += f"/_history/{req.version[:20]}"
    if op is None or not op.allows(req.resource_type, req.id) or (
            req.version is not None and not op.version_level):
        raise FhirError(Code.UNKNOWN_ENDPOINT, f"operation ${req.name[:64]} is not supported "
                                               f"on {where}")
    if req.method == "POST" and req.body is not None and not op.takes_resource and not (
            isinstance(req.body, dict) and req.body.get("resourceType") == "Parameters"):
        # (read as no parameters at all, a body of another kind would be a silent no)
        raise FhirError(Code.INVALID_OPERATION,
                        f"POST ${op.name} takes its parameters as a Parameters resource")
    if req.method not in ("GET", "POST") or (req.method == "GET" and op.affects_state):
        allowed = "POST" if op.affects_state else "GET, HEAD, POST"
        raise FhirError(Code.METHOD_NOT_ALLOWED, f"${op.name} takes {allowed}",
                        headers={"Allow": allowed})
    if req.resource_type is not None and req.id is not None:
        # an instance operation acts on a resource: the caller must be able to see it
        guard.require(req.resource_type, "update" if op.affects_state else "read")
        check_id(req.id)
        stored = await ctx.store.read(req.resource_type, req.id)
        if stored is not None:  # (the gateway's own conformance resources are not stored)
            await guard.ensure_visible(ctx.access, ctx.store, stored)
    elif req.resource_type is not None:
        guard.require(req.resource_type, "update" if op.affects_state else "search")
    return await op.handler(ctx, req)
