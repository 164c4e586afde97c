"""Property-based fuzzing of the FHIR routes from their OpenAPI description (schemathesis),
and of batch and transaction Bundles (hypothesis): whatever the input, the gateway answers
without a server error."""

from __future__ import annotations

import json
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


# -- Bundle entries of any shape --------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=6,
)
#: what a client may send where a string belongs, plausible or not
_urls = st.sampled_from([
    "Patient", "Patient/x1", "Patient?identifier=urn:x|1", "Patient/$validate",
    "Observation?subject=urn:uuid:a", "//[", "//]/Patient", "http://[::1/Patient",
    "https://elsewhere.example/fhir/Patient/1", "Patient/x1/_history/1", "[", "?",
    "Patient/x1#frag", "", "urn:uuid:a",
])
_strings = _urls | st.sampled_from(['W/"1"', "2020-01-01T00:00:00Z", "identifier=urn:x|1"])
_resources = st.fixed_dictionaries(
    {"resourceType": st.sampled_from(["Patient", "Observation", "Parameters", "Bundle"])
     | _json},
    optional={"id": st.sampled_from(["x1", "a"]) | _json,
              "gender": st.sampled_from(["female", "urn:uuid:a"]) | _json,
              "_gender": st.just("urn:uuid:a") | _json,
              "subject": st.fixed_dictionaries({"reference": _strings | _json}),
              "parameter": _json},
)
_requests = st.fixed_dictionaries(
    {"method": st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]) | _json,
     "url": _urls | _json},
    optional={key: _strings | _json
              for key in ("ifNoneExist", "ifMatch", "ifNoneMatch", "ifModifiedSince")},
)
_entries = st.fixed_dictionaries(
    {}, optional={"fullUrl": st.sampled_from(["urn:uuid:a", "urn:uuid:b",
                                              "http://h.example/fhir/Patient/x1"]) | _json,
                  "resource": _resources | _json, "request": _requests | _json},
) | _json


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(["batch", "transaction", "history"]),
       entries=st.lists(_entries, min_size=1, max_size=4))
def test_bundle_entries_of_any_shape_are_answered_without_a_server_error(
        server: Server, kind: str, entries: list[Any]) -> None:
    """Whatever an entry holds (a request element of another JSON type, a url urllib
    cannot read, a resource of the wrong shape), a batch, transaction or history Bundle
    is answered with 2xx or 4xx: a transaction's failure and each failing batch entry
    with an OperationOutcome."""
    bundle = {"resourceType": "Bundle", "type": kind, "entry": entries}
    response = httpx.post(server.url, content=json.dumps(bundle), timeout=30,
                          headers={"Content-Type": "application/fhir+json"})
    assert response.status_code < 500, (bundle, response.text[:500])
    body = response.json()
    if response.status_code >= 400:
        assert body["resourceType"] == "OperationOutcome", (bundle, body)
        return
    assert body["resourceType"] == "Bundle", (bundle, body)
    for entry in body.get("entry", []):
        status = int(entry["response"]["status"].split()[0])
        assert status < 500, (bundle, entry)
        if status >= 400:
            assert entry["response"]["outcome"]["resourceType"] == "OperationOutcome", entry
