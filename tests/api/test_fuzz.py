"""Property-based fuzzing of the FHIR routes from their OpenAPI description (schemathesis):
whatever the input, the gateway answers without a server error."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings

from gateway.api.openapi import openapi
from gateway.main import registry
from tests.conftest import Server

PATHWAY_TYPES = ["Patient", "Observation", "Task", "EpisodeOfCare", "ServiceRequest",
                 "Composition", "Bundle"]

schema = schemathesis.openapi.from_dict(openapi(registry(), "/fhir", PATHWAY_TYPES))


@schema.parametrize()
@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case, server: Server) -> None:
    response = case.call(base_url=server.url.removesuffix("/fhir"), timeout=30)
    assert response.status_code < 500, (case.method, case.formatted_path, response.text[:500])
    if response.status_code >= 400 and response.content:
        assert response.json().get("resourceType") == "OperationOutcome", (
            case.method, case.formatted_path, case.query, response.status_code, response.text[:300])
