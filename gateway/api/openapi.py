"""An OpenAPI 3.0 description of the FHIR REST routes, generated from the registry.

FastAPI serves it at ``/openapi.json``. It describes the interactions per
resource type and their search parameters, so generic HTTP tooling (and
fuzzers such as schemathesis) can exercise the API; FHIR semantics stay in
the CapabilityStatement at ``/fhir/metadata``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import gateway
from gateway.registry import Registry

FHIR_JSON = "application/fhir+json"
_ID = {"name": "id", "in": "path", "required": True,
       "schema": {"type": "string", "pattern": "^[A-Za-z0-9\\-.]{1,64}$"}}
_OUTCOME = {"description": "OperationOutcome",
            "content": {FHIR_JSON: {"schema": {"$ref": "#/components/schemas/Resource"}}}}


def _resource_body(rtype: str) -> dict[str, Any]:
    return {"required": True, "content": {FHIR_JSON: {"schema": {
        "type": "object", "required": ["resourceType"],
        "properties": {"resourceType": {"type": "string", "enum": [rtype]},
                       "id": {"type": "string"}},
        "additionalProperties": True}}}}


def _responses(*codes: str) -> dict[str, Any]:
    out: dict[str, Any] = {c: {"description": "FHIR resource or Bundle", "content": {
        FHIR_JSON: {"schema": {"$ref": "#/components/schemas/Resource"}}}} for c in codes}
    out["default"] = _OUTCOME
    return out


def openapi(registry: Registry, base_path: str, types: Iterable[str] | None = None
            ) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    base = base_path.rstrip("/")
    for rt in sorted(types or registry.resource_types):
        params = [{"name": code, "in": "query", "required": False,
                   "schema": {"type": "string"}}
                  for code in sorted(registry.search_params(rt))]
        params += [{"name": "_count", "in": "query", "required": False,
                    "schema": {"type": "integer", "minimum": 0}}]
        paths[f"{base}/{rt}"] = {
            "get": {"operationId": f"search-{rt}", "parameters": params,
                    "responses": _responses("200")},
            "post": {"operationId": f"create-{rt}", "requestBody": _resource_body(rt),
                     "responses": _responses("201", "200")},
        }
        paths[f"{base}/{rt}/{{id}}"] = {
            "get": {"operationId": f"read-{rt}", "parameters": [_ID],
                    "responses": _responses("200")},
            "put": {"operationId": f"update-{rt}", "parameters": [_ID],
                    "requestBody": _resource_body(rt), "responses": _responses("200", "201")},
            "delete": {"operationId": f"delete-{rt}", "parameters": [_ID],
                       "responses": {"204": {"description": "deleted"}, "default": _OUTCOME}},
            "patch": {"operationId": f"patch-{rt}", "parameters": [_ID],
                      "requestBody": {"required": True, "content": {
                          "application/json-patch+json": {"schema": {
                              "type": "array", "items": {"type": "object"}}},
                          # RFC 5261 / RFC 7351: a <diff> of add, replace, remove
                          "application/xml-patch+xml": {"schema": {"type": "string"}}}},
                      "responses": _responses("200")},
        }
        paths[f"{base}/{rt}/{{id}}/_history"] = {"get": {
            "operationId": f"history-{rt}", "parameters": [_ID],
            "responses": _responses("200")}}
        paths[f"{base}/{rt}/{{id}}/_history/{{vid}}"] = {"get": {
            "operationId": f"vread-{rt}",
            "parameters": [_ID, {"name": "vid", "in": "path", "required": True,
                                 "schema": {"type": "string"}}],
            "responses": _responses("200")}}
    paths[f"{base}/metadata"] = {"get": {"operationId": "capabilities",
                                         "responses": _responses("200")}}
    paths[base] = {"post": {"operationId": "batch-transaction",
                            "requestBody": _resource_body("Bundle"),
                            "responses": _responses("200")}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "carepath-gateway FHIR R4 API", "version": gateway.__version__},
        "paths": paths,
        "components": {"schemas": {"Resource": {"type": "object",
                                                "additionalProperties": True}}},
    }
