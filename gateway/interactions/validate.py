"""$validate: https://hl7.org/fhir/R4/resource-operation-validate.html.

Type level (``POST /Type/$validate``) and instance level (``GET`` or ``POST
/Type/id/$validate``). The resource comes as the body, or as the ``resource``
parameter of a ``Parameters`` body; at instance level without one, the stored
resource is validated. ``profile`` (query or parameter) validates against that
profile instead of the ones the resource claims; ``mode=delete`` has nothing
to check. The answer is always 200 with an OperationOutcome: the issues found
(each located by ``expression``), or one information issue when there are
none. Nothing is stored.
"""

from __future__ import annotations

from typing import Any

from gateway.fhir.outcome import Code, FhirError, Issue, operation_outcome
from gateway.interactions.base import Context, FhirResponse, check_id
from gateway.interactions.operations import Operation, OperationRequest, stored_content
from gateway.interactions.stored_profiles import validation_issues
from gateway.security import guard

_MODES = ("create", "update", "delete")


def _single(values: list[Any] | None, name: str) -> Any:
    if not values:
        return None
    if len(values) > 1:
        raise FhirError(Code.INVALID_RESOURCE, f"parameter '{name}' is given more than once")
    return values[0]


def _inputs(req: OperationRequest) -> tuple[Any, str | None, str | None]:
    """(resource or None, profile, mode) from the query and the body."""
    body = req.body
    resource: Any = None
    params: dict[str, list[Any]] = {}
    wraps = isinstance(body, dict) and body.get("resourceType") == "Parameters" and (
        req.resource_type != "Parameters" or any(
            isinstance(p, dict) and p.get("name") == "resource"
            for p in body.get("parameter", []) or []))
    if wraps:
        params = req.parameters()
        resource = _single(params.get("resource"), "resource")
    else:
        params = OperationRequest(req.name, req.method, req.resource_type, req.id, req.query,
                                  None, req.base).parameters()
        resource = body
    profile = _single(params.get("profile"), "profile")
    mode = _single(params.get("mode"), "mode")
    if profile is not None and not isinstance(profile, str):
        raise FhirError(Code.INVALID_RESOURCE, "parameter 'profile' must be a canonical URL")
    if mode is not None and mode not in _MODES:
        raise FhirError(Code.INVALID_RESOURCE, f"mode must be one of {', '.join(_MODES)}")
    return resource, profile, mode


async def validate(ctx: Context, req: OperationRequest) -> FhirResponse:
    rt = req.resource_type
    assert rt is not None
    if ctx.validator is None:
        raise FhirError(Code.UNKNOWN_ENDPOINT, "validation is not configured on this server")
    resource, profile, mode = _inputs(req)
    if req.id is not None:
        check_id(req.id)
    elif mode in ("update", "delete"):
        # "Modes update and delete can only be used when the operation is invoked at
        # the resource instance level"
        raise FhirError(Code.INVALID_OPERATION, f"mode={mode} validates against a resource:"
                                                f" POST /{rt}/[id]/$validate")
    if mode == "delete":
        if req.id is not None:
            await stored_content(ctx, rt, req.id)
        return FhirResponse(200, operation_outcome([_all_ok("nothing to check for a delete")]))
    if resource is None:
        if req.id is None:
            raise FhirError(Code.INVALID_RESOURCE,
                            f"POST /{rt}/$validate needs the resource as the body or as the "
                            "'resource' parameter")
        resource = await stored_content(ctx, rt, req.id)
    else:
        guard.require(rt, "operation")
    if not isinstance(resource, dict):
        raise FhirError(Code.NOT_AN_OBJECT, "the resource to validate must be a JSON object")
    found = resource.get("resourceType")
    if isinstance(found, str) and found != rt:
        raise FhirError(Code.TYPE_MISMATCH,
                        f"resourceType '{found[:64]}' does not match the URL's '{rt}'",
                        ("resourceType",))
    if mode == "update" and resource.get("id") != req.id:
        # what the update itself would answer (400 GW-1005): not "valid"
        return FhirResponse(200, operation_outcome([Issue(
            Code.ID_MISMATCH, f"Resource.id must be {req.id} to update {rt}/{req.id}",
            ("id",))]))
    issues = await validation_issues(ctx, resource, profile)
    if profile is not None:
        # "If a profile is nominated, and the server cannot validate against the
        # nominated profile, it SHALL return an error"
        issues = [Issue(i.code, i.diagnostics, i.expression, "error")
                  if i.code is Code.UNKNOWN_PROFILE else i for i in issues]
    if not issues:
        issues = [_all_ok(f"{rt} is valid" + (f" against {profile}" if profile else ""))]
    return FhirResponse(200, operation_outcome(issues))


def _all_ok(text: str) -> Issue:
    return Issue(Code.VALIDATION_OK, text, severity="information")


OPERATION = Operation(
    name="validate",
    handler=validate,
    type_level=True,
    instance=True,
    definition="http://hl7.org/fhir/OperationDefinition/Resource-validate",
    takes_resource=True,
)
