"""Small helpers for the HTTP tests."""

from __future__ import annotations

from typing import Any

import httpx

FHIR = "application/fhir+json"


def gw_code(response: httpx.Response) -> str:
    """The GW-NNNN code of an OperationOutcome response."""
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    return str(body["issue"][0]["details"]["coding"][0]["code"])


def patient(identifier: str, family: str = "Muster", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:test:mrn", "value": identifier}],
        "name": [{"family": family, "given": ["Erika"]}],
        "gender": "female",
        "birthDate": "1970-01-01",
        **extra,
    }


def post(client: httpx.Client, resource: dict[str, Any], **headers: str) -> httpx.Response:
    return client.post(f"/{resource['resourceType']}", json=resource,
                       headers={"Content-Type": FHIR, **headers})


def put(client: httpx.Client, resource: dict[str, Any], **headers: str) -> httpx.Response:
    return client.put(f"/{resource['resourceType']}/{resource['id']}", json=resource,
                      headers={"Content-Type": FHIR, **headers})


def search_ids(client: httpx.Client, path: str, **params: Any) -> list[str]:
    response = client.get(path, params=params)
    assert response.status_code == 200, response.text
    return [e["resource"]["id"] for e in response.json().get("entry", [])
            if e.get("search", {}).get("mode") == "match"]


def paged_ids(client: httpx.Client, first: dict[str, Any]) -> list[str]:
    """The ids of the matches of a searchset and of every page its ``next`` links lead to."""
    ids: list[str] = []
    page: dict[str, Any] | None = first
    while page is not None:
        ids += [e["resource"]["id"] for e in page.get("entry", [])
                if e.get("search", {}).get("mode") == "match"]
        link = next((x["url"] for x in page.get("link", []) if x["relation"] == "next"), None)
        page = client.get(link).json() if link else None
    return ids
