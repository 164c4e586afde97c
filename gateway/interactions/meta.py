"""``$meta``, ``$meta-add``, ``$meta-delete``:
https://hl7.org/fhir/R4/resource-operation-meta.html, -meta-add.html, -meta-delete.html.

* ``$meta`` (GET or POST) at instance level answers the resource's ``meta``;
  at type and system level, the profiles, tags and security labels that current
  resources carry (those the caller may see, of the types its scopes let it
  search; at most :data:`SUMMARY_LIMIT` of each).
* ``$meta-add`` and ``$meta-delete`` (POST, instance level) take a ``meta``
  parameter and add or remove its profiles (by URL), tags and security labels
  (by system and code; version and display are ignored) in place: as the
  specification requires, no new version is made, so ``versionId``,
  ``lastUpdated`` and the ETag stay, no history entry and no subscription event
  follow. The result is validated as any write is (a profile added must hold),
  and the search index follows when the current version changed.
* All three also work on a version: ``Type/id/_history/vid/$meta-add``.

The answer is a ``Parameters`` with the ``Meta`` as ``return``.
"""

from __future__ import annotations

from typing import Any

from gateway.fhir import json as fjson
from gateway.fhir.outcome import Code, FhirError
from gateway.interactions.base import Context, FhirResponse, admit, run_write, version_number
from gateway.interactions.operations import Operation, OperationRequest
from gateway.security import guard
from gateway.storage.interface import StoredResource, StoreTransaction

#: at most this many profiles, tags and security labels each in a type or system summary
SUMMARY_LIMIT = 1000
_LISTS = ("profile", "tag", "security")


def _returned(meta: dict[str, Any]) -> FhirResponse:
    return FhirResponse(200, {"resourceType": "Parameters",
                              "parameter": [{"name": "return", "valueMeta": meta}]})


def _version(req: OperationRequest) -> int | None:
    return None if req.version is None else version_number(req.version)


def _content(stored: StoredResource | None, req: OperationRequest,
             version: int | None) -> dict[str, Any]:
    where = f"{req.resource_type}/{req.id}"
    if stored is None:
        if version is None:
            raise FhirError(Code.NOT_FOUND, f"{where} is not known")
        raise FhirError(Code.VERSION_NOT_FOUND, f"{where} has no version {version}")
    if stored.deleted or stored.content is None:
        raise FhirError(Code.GONE, f"{where} was deleted" if version is None
                        else f"{where} version {version} is a deletion")
    value = fjson.loads_stored(stored.content)
    assert isinstance(value, dict)
    return value


def _meta_of(resource: dict[str, Any]) -> dict[str, Any]:
    meta = resource.get("meta")
    return dict(meta) if isinstance(meta, dict) else {}


async def meta(ctx: Context, req: OperationRequest) -> FhirResponse:
    if req.id is None:
        return await _summary(ctx, req)
    assert req.resource_type is not None
    version = _version(req)
    # invoke() checked the read scope and that the caller may see the resource
    stored = (await ctx.store.read(req.resource_type, req.id) if version is None
              else await ctx.store.vread(req.resource_type, req.id, version))
    return _returned(_meta_of(_content(stored, req, version)))


async def _summary(ctx: Context, req: OperationRequest) -> FhirResponse:
    if req.resource_type is not None:
        types: tuple[str, ...] | None = (req.resource_type,)
    else:
        types = guard.allowed_types(ctx.registry.resource_types, "search")
    profiles, tags, labels = await ctx.store.meta_summary(
        types, SUMMARY_LIMIT, guard.restriction(ctx.access))
    guard.note(req.resource_type or "*", None, query=f"${req.name}")
    out: dict[str, Any] = {}
    if profiles:
        out["profile"] = profiles
    if tags:
        out["tag"] = [_coding(s, c) for s, c in tags]
    if labels:
        out["security"] = [_coding(s, c) for s, c in labels]
    return _returned(out)


def _coding(system: str | None, code: str) -> dict[str, str]:
    return {"system": system, "code": code} if system is not None else {"code": code}


def _given_meta(req: OperationRequest) -> dict[str, Any]:
    """The ``meta`` parameter, checked: profiles are canonical URLs, tags and security
    labels Codings with a code."""
    body = req.body
    if not (isinstance(body, dict) and body.get("resourceType") == "Parameters"):
        raise FhirError(Code.INVALID_OPERATION, f"${req.name} takes a Parameters body")
    values = req.parameters().get("meta") or []
    if len(values) != 1 or not isinstance(values[0], dict):
        raise FhirError(Code.INVALID_OPERATION,
                        f"${req.name} takes one 'meta' parameter (valueMeta)")
    given: dict[str, Any] = values[0]
    for key in _LISTS:
        items = given.get(key, [])
        if not isinstance(items, list):
            raise FhirError(Code.INVALID_OPERATION, f"meta.{key} must be an array")
        for item in items:
            if key == "profile":
                if not isinstance(item, str) or not item or item != item.strip():
                    raise FhirError(Code.INVALID_OPERATION,
                                    "meta.profile holds canonical URLs")
            elif not (isinstance(item, dict) and isinstance(item.get("code"), str)
                      and isinstance(item.get("system", ""), str)):
                raise FhirError(Code.INVALID_OPERATION,
                                f"meta.{key} holds Codings with a code")
    return given


def _key(key: str, item: Any) -> Any:
    """What makes two entries of ``meta.<key>`` the same: the URL of a profile, the
    system and code of a tag or security label."""
    if key == "profile":
        return item
    if isinstance(item, dict):
        return (item.get("system"), item.get("code"))
    return None


def changed_meta(current: dict[str, Any], given: dict[str, Any], *, add: bool) -> dict[str, Any]:
    """``current`` with ``given``'s profiles, tags and security labels added (each once)
    or removed."""
    out = dict(current)
    for key in _LISTS:
        items = list(current.get(key) or [])
        change = given.get(key) or []
        if add:
            seen = {_key(key, i) for i in items}
            for item in change:
                if _key(key, item) not in seen:
                    seen.add(_key(key, item))
                    items.append(item)
        else:
            drop = {_key(key, i) for i in change}
            items = [i for i in items if _key(key, i) not in drop]
        if items:
            out[key] = items
        else:
            out.pop(key, None)
    return out


async def _change(ctx: Context, req: OperationRequest, *, add: bool) -> FhirResponse:
    rt, id = req.resource_type, req.id
    assert rt is not None and id is not None
    version = _version(req)
    given = _given_meta(req)

    async def work(tx: StoreTransaction) -> dict[str, Any]:
        await tx.lock(f"{rt}/{id}")
        current = await tx.current(rt, id)
        if current is None:
            raise FhirError(Code.NOT_FOUND, f"{rt}/{id} is not known")
        about = await guard.check_write(ctx.access, tx, None, current)
        target: StoredResource | None = current
        if version is not None and version != current.version:
            target = await tx.version(rt, id, version)
        resource = _content(target, req, version)
        assert target is not None
        before = _meta_of(resource)
        after = changed_meta(before, given, add=add)
        if after != before:
            resource["meta"] = after
            await admit(ctx, resource, tx)  # validated as any write (a profile added must hold)
            await tx.rewrite(target, resource, current=target is current)
        guard.note(rt, id, target.version, patients=about)
        return after

    return _returned(await run_write(ctx, work))


async def meta_add(ctx: Context, req: OperationRequest) -> FhirResponse:
    return await _change(ctx, req, add=True)


async def meta_delete(ctx: Context, req: OperationRequest) -> FhirResponse:
    return await _change(ctx, req, add=False)


OPERATIONS = (
    Operation(name="meta", handler=meta, system=True, type_level=True, instance=True,
              version_level=True, definition="http://hl7.org/fhir/OperationDefinition/Resource-meta"),
    Operation(name="meta-add", handler=meta_add, instance=True, version_level=True,
              affects_state=True,
              definition="http://hl7.org/fhir/OperationDefinition/Resource-meta-add"),
    Operation(name="meta-delete", handler=meta_delete, instance=True, version_level=True,
              affects_state=True,
              definition="http://hl7.org/fhir/OperationDefinition/Resource-meta-delete"),
)
