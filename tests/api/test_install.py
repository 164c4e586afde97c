"""The gateway's own conformance resources are resources of the server
(gateway.interactions.install): what the CapabilityStatement names can be read."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.api.helpers import FHIR
from tests.conftest import BACKENDS, RunningServer, backend_settings
from tests.profiles.helpers import PROFILES


def _shipped() -> list[dict[str, Any]]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(PROFILES.glob("*.json"))]


def _without_meta(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k != "meta"}


def test_the_shipped_resources_are_read_and_found_where_the_statement_points(
        client: httpx.Client) -> None:
    shipped = _shipped()
    assert len(shipped) > 40
    for resource in shipped:
        read = client.get(f"/{resource['resourceType']}/{resource['id']}")
        assert read.status_code == 200, resource["id"]
        assert _without_meta(read.json()) == _without_meta(resource), resource["id"]
    statement = client.get("/metadata").json()
    own = "https://carepath-gateway.org/fhir/"
    canonicals = {("StructureDefinition", url) for r in statement["rest"][0]["resource"]
                  for url in r.get("supportedProfile", []) if url.startswith(own)}
    canonicals |= {("SearchParameter", p["definition"]) for r in statement["rest"][0]["resource"]
                   for p in r.get("searchParam", []) if p.get("definition", "").startswith(own)}
    rest = statement["rest"][0]
    operations = [*rest.get("operation", []),
                  *(op for r in rest["resource"] for op in r.get("operation", []))]
    canonicals |= {("OperationDefinition", op["definition"]) for op in operations
                   if op["definition"].startswith(own)}
    assert ("OperationDefinition", f"{own}OperationDefinition/audit-log") in canonicals
    assert len(canonicals) >= 15
    for rtype, url in sorted(canonicals):
        found = client.get(f"/{rtype}", params={"url": url}).json()
        assert [e["resource"]["url"] for e in found.get("entry", [])] == [url], url


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_start_installs_what_is_missing_or_changed_and_nothing_else(
        backend: str, tmp_path_factory: pytest.TempPathFactory, new_schema: Any) -> None:
    settings = backend_settings(backend, tmp_path_factory.mktemp("install"), new_schema)
    path = "/StructureDefinition/pathway-episode-of-care"
    with RunningServer(settings) as running, httpx.Client(
            base_url=running.url, headers={"Accept": FHIR}) as c:
        first = c.get(path).json()
        assert first["meta"]["versionId"] == "1"
        changed = {**first, "description": "changed here"}
        assert c.put(path, json=changed).status_code == 200
        assert c.delete("/ValueSet/care-level").status_code in (200, 204)
        history = c.get("/_history", params={"_count": 500}).json()["total"]
    with RunningServer(settings) as running, httpx.Client(
            base_url=running.url, headers={"Accept": FHIR}) as c:
        # the shipped definition again (a new version), the deleted one back
        again = c.get(path).json()
        assert again["meta"]["versionId"] == "3"
        assert _without_meta(again) == _without_meta(first)
        assert c.get("/ValueSet/care-level").status_code == 200
        assert c.get("/_history", params={"_count": 500}).json()["total"] == history + 2
    with RunningServer(settings) as running, httpx.Client(
            base_url=running.url, headers={"Accept": FHIR}) as c:
        # as shipped: a start writes nothing
        assert c.get("/_history", params={"_count": 500}).json()["total"] == history + 2
