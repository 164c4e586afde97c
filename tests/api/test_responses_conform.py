"""What the server answers is itself valid R4: Bundles of every kind, outcomes and the
CapabilityStatement pass the gateway's own base validation (the same walk incoming
resources get), so a client's strict parser accepts them."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from gateway.fhir.validation import FhirValidator
from gateway.main import registry
from gateway.registry import profiles_dir
from gateway.settings import Settings
from tests.api.helpers import FHIR, patient, post
from tests.conftest import unique


@pytest.fixture(scope="module")
def validator() -> FhirValidator:
    return FhirValidator.load(profiles_dir(), registry().structure_definitions,
                              Settings.from_env())


def errors(validator: FhirValidator, resource: dict[str, Any]) -> list[str]:
    return [f"{i.expression}: {i.diagnostics}" for i in validator.validate(resource)
            if i.severity in ("error", "fatal")]


def test_every_kind_of_answer_is_valid_r4(client: httpx.Client,
                                          validator: FhirValidator) -> None:
    mrn = unique("mrn")
    p, e = f"urn:uuid:{uuid.uuid4()}", f"urn:uuid:{uuid.uuid4()}"
    written = client.post("/", headers={"Content-Type": FHIR}, json={
        "resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": p, "resource": patient(mrn), "request": {"method": "POST",
                                                                 "url": "Patient"}},
            {"fullUrl": e, "resource": {"resourceType": "Encounter", "status": "finished",
                                        "class": {"code": "AMB"}, "subject": {"reference": p}},
             "request": {"method": "POST", "url": "Encounter"}},
        ]})
    assert written.status_code == 200, written.text
    pid = written.json()["entry"][0]["response"]["location"].split("/")[1]
    other = post(client, patient(unique("mrn"))).json()
    other["active"] = False
    client.put(f"/Patient/{other['id']}", json=other, headers={"Content-Type": FHIR})
    client.delete(f"/Patient/{other['id']}")
    answers = {
        "transaction-response": written,
        "batch-response": client.post("/", headers={"Content-Type": FHIR}, json={
            "resourceType": "Bundle", "type": "batch", "entry": [
                {"request": {"method": "GET", "url": f"Patient/{pid}"}},
                {"request": {"method": "GET", "url": "Patient/does-not-exist"}},
                {"request": {"method": "GET", "url": f"Encounter?subject=Patient/{pid}"}},
            ]}),
        "searchset with _include and a warning": client.get(
            "/Encounter", params={"subject": f"Patient/{pid}", "_include": "Encounter:subject",
                                  "no-such-param": "x"}),
        "searchset _summary=count": client.get("/Patient", params={"_summary": "count"}),
        "instance history with a delete": client.get(f"/Patient/{other['id']}/_history"),
        "type history": client.get("/Patient/_history", params={"_count": 5}),
        "$everything": client.get(f"/Patient/{pid}/$everything"),
        "OperationOutcome 404": client.get("/Patient/does-not-exist"),
        "OperationOutcome 410": client.get(f"/Patient/{other['id']}"),
        "OperationOutcome 400": client.get("/Patient", params={"birthdate": "not-a-date"}),
        "CapabilityStatement": client.get("/metadata"),
    }
    found = {name: errors(validator, r.json()) for name, r in answers.items()}
    assert found == {name: [] for name in answers}


def test_capability_statement_lists_only_parameters_a_search_answers(
        client: httpx.Client) -> None:
    rest = client.get("/metadata").json()["rest"][0]
    system = {p["name"] for p in rest["searchParam"]}
    assert {"_id", "_lastUpdated", "_tag", "_profile", "_security"} <= system
    patient_params = {p["name"] for r in rest["resource"] if r["type"] == "Patient"
                      for p in r["searchParam"]}
    assert {"identifier", "name", "_id", "_lastUpdated"} <= patient_params
    # SMART: where tokens come from
    security = rest["security"]
    assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    assert "/.well-known/smart-configuration" in security["description"]
    smart = client.get("/.well-known/smart-configuration").json()
    assert smart["token_endpoint"].endswith("/auth/token")
    assert any(p["name"] == "versions" for p in rest["operation"])
    # no expression to index: a search on them only warns (search.html#errors)
    assert not {"_text", "_content", "_query", "_filter"} & (system | patient_params)
    # "Resource" names the parameters' base, not a type one can search
    assert client.get("/", params={"_type": "Resource"}).status_code == 400
    for name in ("_id", "_lastUpdated"):
        found = client.get("/", params={name: "gt2000-01-01" if name == "_lastUpdated"
                                        else "no-such-id", "_type": "Patient"})
        assert found.status_code == 200, found.text


def test_operation_answers_are_valid_r4(client: httpx.Client, validator: FhirValidator) -> None:
    b = "https://carepath-gateway.org/fhir"
    pid = post(client, patient(unique("mrn"))).json()["id"]
    answers = {
        "$lookup": client.get("/CodeSystem/$lookup", params={
            "system": f"{b}/CodeSystem/handoff-obligation", "code": "H7"}),
        "$expand": client.get("/ValueSet/$expand", params={
            "url": f"{b}/ValueSet/follow-up-care-level", "count": 2}),
        "$validate-code": client.get("/ValueSet/$validate-code", params={
            "url": f"{b}/ValueSet/follow-up-care-level",
            "system": f"{b}/CodeSystem/care-level", "code": "level-3"}),
        "$translate": client.get("/ConceptMap/$translate", params={
            "system": f"{b}/CodeSystem/dutch-care-line", "code": "first-line",
            "source": f"{b}/ValueSet/dutch-care-line"}),
        "$validate with issues": client.post(
            "/Patient/$validate", headers={"Content-Type": FHIR},
            json={"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": {
                "resourceType": "Patient", "gender": "none", "birthDate": "1990-13-01"}}]}),
        "$validate of a good one": client.post("/Patient/$validate",
                                               headers={"Content-Type": FHIR},
                                               json=patient(unique("mrn"))),
        "$audit-log": client.get("/$audit-log", params={"patient": pid, "_count": 5}),
    }
    for name, r in answers.items():
        assert r.status_code == 200, (name, r.text)
    # creating a Patient is an event about that patient (BALP: the patient entity)
    logged = [e["resource"] for e in answers["$audit-log"].json()["entry"]]
    assert any(e["subtype"][0]["code"] == "create" for e in logged), logged
    found = {name: errors(validator, r.json()) for name, r in answers.items()}
    assert found == {name: [] for name in answers}
