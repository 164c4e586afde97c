"""$validate over HTTP, and every write refusing invalid content (422, store unchanged).

Spec: https://hl7.org/fhir/R4/resource-operation-validate.html
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api import helpers
from tests.api.helpers import FHIR, gw_code, post, put, search_ids
from tests.conftest import RunningServer, backend_settings, unique

BP = "http://hl7.org/fhir/StructureDefinition/bp"
SCRIPT = '<div xmlns="http://www.w3.org/1999/xhtml">x<script>alert(1)</script></div>'


def patient(identifier: str, **extra: Any) -> dict[str, Any]:
    """helpers.patient with narrative (without, dom-6 adds a warning)."""
    text = {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">x</div>'}
    return helpers.patient(identifier, **{"text": text, **extra})


def issues(response: httpx.Response) -> list[dict[str, Any]]:
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    return list(body["issue"])


def gw_codes(response: httpx.Response) -> set[str]:
    return {i["details"]["coding"][0]["code"] for i in issues(response)
            if i["severity"] in ("error", "fatal")}


def expressions(response: httpx.Response) -> set[str]:
    return {e for i in issues(response) if i["severity"] in ("error", "fatal")
            for e in i.get("expression", [])}


def blood_pressure(**extra: Any) -> dict[str, Any]:
    """An Observation claiming the R4 blood pressure profile, without its components."""
    return {
        "resourceType": "Observation", "meta": {"profile": [BP]}, "status": "final",
        "category": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
        "subject": {"reference": "Patient/x"}, "effectiveDateTime": "2020-01-01",
        **extra,
    }


def validate(client: httpx.Client, path: str, body: Any, **params: str) -> httpx.Response:
    return client.post(path, json=body, params=params, headers={"Content-Type": FHIR})


# -- $validate ------------------------------------------------------------------------


def test_validate_a_valid_resource_says_so(client: httpx.Client) -> None:
    response = validate(client, "/Patient/$validate", patient(unique("mrn")))
    assert response.status_code == 200
    [issue] = issues(response)
    assert issue["severity"] == "information"
    assert issue["details"]["coding"][0]["code"] == "GW-4200"


def test_validate_lists_every_problem_with_its_location(client: httpx.Client) -> None:
    body = patient(unique("mrn"), gender="xyz", active="true", nickname="x",
                   birthDate="1970-02-30")
    response = validate(client, "/Patient/$validate", body)
    assert response.status_code == 200
    assert gw_codes(response) == {"GW-4207", "GW-4202", "GW-4201", "GW-4206"}
    assert expressions(response) == {"Patient.gender", "Patient.active", "Patient.nickname",
                                     "Patient.birthDate"}
    assert search_ids(client, "/Patient", identifier=body["identifier"][0]["value"]) == []


def test_validate_takes_a_parameters_body_with_a_profile(client: httpx.Client) -> None:
    obs = blood_pressure()
    del obs["meta"]
    params = {"resourceType": "Parameters", "parameter": [
        {"name": "resource", "resource": obs}, {"name": "profile", "valueCanonical": BP}]}
    response = validate(client, "/Observation/$validate", params)
    assert response.status_code == 200
    assert gw_codes(response) == {"GW-4204", "GW-4208"}  # SystolicBP missing, vs-2
    text = " ".join(i.get("diagnostics", "") for i in issues(response))
    assert "slice 'SystolicBP'" in text and BP in text
    # the same resource without the profile is valid R4 (a warning: no narrative)
    response = validate(client, "/Observation/$validate", obs)
    assert gw_codes(response) == set()
    assert {i["severity"] for i in issues(response)} == {"warning"}


def test_validate_profile_as_query_parameter(client: httpx.Client) -> None:
    obs = blood_pressure()
    del obs["meta"]
    response = validate(client, "/Observation/$validate", obs, profile=BP)
    assert "GW-4204" in gw_codes(response)


def test_validate_in_a_batch_answers_in_the_entry_resource(client: httpx.Client) -> None:
    """An operation's answer is the entry's resource; ``$validate``'s answer is an
    OperationOutcome, which is its result and not a hint about processing the entry
    (bundle.html: ``response.outcome`` holds the hints and warnings of processing)."""
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": patient(unique("mrn")),
         "request": {"method": "POST", "url": "Patient/$validate"}},
        {"resource": blood_pressure(),
         "request": {"method": "POST", "url": "Observation/$validate"}},
    ]}
    response = client.post("/", json=bundle, headers={"Content-Type": FHIR})
    assert response.status_code == 200, response.text
    valid, invalid = response.json()["entry"]
    assert valid["response"]["status"].startswith("200")
    assert "outcome" not in valid["response"]
    assert valid["resource"]["resourceType"] == "OperationOutcome"
    assert valid["resource"]["issue"][0]["severity"] == "information"
    assert invalid["response"]["status"].startswith("200")
    assert any(i["severity"] == "error" for i in invalid["resource"]["issue"])


def test_validate_checks_extensions_r4_defines(client: httpx.Client) -> None:
    """An extension whose url is one of R4's own definitions must conform to it
    (extension-patient-birthplace.html: value[x] is an Address): refused by
    ``$validate`` and by a write; one on an element its context does not name too.
    An extension the gateway does not know is not judged."""
    birth_place = "http://hl7.org/fhir/StructureDefinition/patient-birthPlace"
    bad = patient(unique("mrn"), extension=[{"url": birth_place, "valueBoolean": True}])
    response = validate(client, "/Patient/$validate", bad)
    assert response.status_code == 200
    assert "GW-4217" in gw_codes(response)
    assert "Patient.extension[0].valueBoolean" in expressions(response)
    assert post(client, bad).status_code == 422
    good = patient(unique("mrn"), extension=[{"url": birth_place,
                                              "valueAddress": {"city": "Utrecht"}}])
    assert gw_codes(validate(client, "/Patient/$validate", good)) == set()
    elsewhere = {**blood_pressure(), "extension": good["extension"]}
    del elsewhere["meta"]
    response = validate(client, "/Observation/$validate", elsewhere)
    assert gw_codes(response) == {"GW-4221"}
    unknown = patient(unique("mrn"), extension=[{"url": "https://example.org/x",
                                                 "valueBoolean": True}])
    assert gw_codes(validate(client, "/Patient/$validate", unknown)) == set()


def test_validate_against_an_unknown_profile_is_an_error(client: httpx.Client) -> None:
    """"If a profile is nominated, and the server cannot validate against the
    nominated profile, it SHALL return an error" (Resource-validate); a profile a
    resource claims is only warned about, as on a write."""
    response = validate(client, "/Patient/$validate", patient(unique("mrn")),
                        profile="http://example.org/StructureDefinition/unknown")
    assert response.status_code == 200
    assert [(i["severity"], i["details"]["coding"][0]["code"]) for i in issues(response)] == [
        ("error", "GW-4211")]
    claimed = {**patient(unique("mrn")),
               "meta": {"profile": ["http://example.org/StructureDefinition/unknown"]}}
    response = validate(client, "/Patient/$validate", claimed)
    assert [(i["severity"], i["details"]["coding"][0]["code"]) for i in issues(response)] == [
        ("warning", "GW-4211")]


def test_validate_a_stored_resource(client: httpx.Client) -> None:
    created = post(client, patient(unique("mrn"))).json()
    response = client.get(f"/Patient/{created['id']}/$validate")
    assert response.status_code == 200
    assert [i["severity"] for i in issues(response)] == ["information"]
    response = client.get(f"/Patient/{created['id']}/$validate",
                          params={"profile": "http://example.org/nope"})
    assert [i["severity"] for i in issues(response)] == ["error"]
    # instance level with a body validates the body
    response = validate(client, f"/Patient/{created['id']}/$validate",
                        {**created, "gender": "xyz"})
    assert gw_codes(response) == {"GW-4207"}
    assert client.get(f"/Patient/{unique('nope')}/$validate").status_code == 404


def test_validate_refuses_a_resource_of_another_type(client: httpx.Client) -> None:
    response = validate(client, "/Observation/$validate", patient(unique("mrn")))
    assert response.status_code == 400
    assert gw_code(response) == "GW-1004"
    response = client.post("/Patient/$validate", json={"resourceType": "Parameters"},
                           headers={"Content-Type": FHIR})
    assert response.status_code == 400


def test_validate_mode_delete_has_nothing_to_check(client: httpx.Client) -> None:
    created = post(client, patient(unique("mrn"))).json()
    response = client.post(f"/Patient/{created['id']}/$validate", params={"mode": "delete"},
                           headers={"Content-Type": FHIR})
    assert response.status_code == 200
    assert [i["severity"] for i in issues(response)] == ["information"]


def test_capability_statement_offers_validate(client: httpx.Client) -> None:
    statement = client.get("/metadata").json()
    patient_entry = next(r for r in statement["rest"][0]["resource"] if r["type"] == "Patient")
    assert "validate" in {op["name"] for op in patient_entry.get("operation", [])}


# -- every write validates ------------------------------------------------------------


def test_create_of_invalid_content_is_422_and_nothing_is_stored(client: httpx.Client) -> None:
    mrn = unique("mrn")
    for bad in (patient(mrn, gender="xyz"), patient(mrn, active="true"),
                patient(mrn, photo=[]), patient(mrn, birthDate="1970-13-01"),
                patient(mrn, text={"status": "generated", "div": SCRIPT})):
        response = post(client, bad)
        assert response.status_code == 422, bad
        outcome = issues(response)
        assert outcome[0]["details"]["coding"][0]["code"] == "GW-4002"
        assert outcome[1]["expression"]
    assert search_ids(client, "/Patient", identifier=mrn) == []


def test_update_of_invalid_content_leaves_the_stored_version(client: httpx.Client) -> None:
    created = post(client, patient(unique("mrn"))).json()
    response = put(client, {**created, "gender": "xyz"})
    assert response.status_code == 422
    assert expressions(response) == {"Patient.gender"}
    read = client.get(f"/Patient/{created['id']}")
    assert read.json()["meta"]["versionId"] == "1"
    assert read.json()["gender"] == "female"


def test_patch_to_invalid_content_is_refused(client: httpx.Client) -> None:
    created = post(client, patient(unique("mrn"))).json()
    ops = [{"op": "replace", "path": "/birthDate", "value": "1970-02-30"}]
    response = client.patch(f"/Patient/{created['id']}", json=ops,
                            headers={"Content-Type": "application/json-patch+json"})
    assert response.status_code == 422
    assert expressions(response) == {"Patient.birthDate"}
    assert client.get(f"/Patient/{created['id']}").json()["birthDate"] == "1970-01-01"


def test_transaction_with_an_invalid_entry_stores_nothing(client: httpx.Client) -> None:
    mrn = unique("mrn")
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": patient(mrn), "request": {"method": "POST", "url": "Patient"}},
        {"resource": patient(mrn, unknownThing=1), "request": {"method": "POST",
                                                                "url": "Patient"}},
    ]}
    response = client.post("/", json=bundle, headers={"Content-Type": FHIR})
    assert response.status_code == 422
    assert "Patient.unknownThing" in expressions(response)
    assert search_ids(client, "/Patient", identifier=mrn) == []


def test_claimed_profile_is_enforced_on_write(client: httpx.Client) -> None:
    response = post(client, blood_pressure())
    assert response.status_code == 422
    assert "GW-4204" in gw_codes(response)


def test_a_resource_of_many_faults_is_answered_with_the_first(client: httpx.Client) -> None:
    """An OperationOutcome lists the first 100 errors and one more issue counting the
    others (GW-4220), whether the write refuses the resource, in JSON or in XML, or
    $validate judges it: 50,000 faults make no answer of megabytes."""
    mrn = unique("mrn")
    faulty = patient(mrn)
    faulty["identifier"] += [{}] * 50_000
    xml = ('<Patient xmlns="http://hl7.org/fhir">'
           + '<identifier><use value="bogus"/></identifier>' * 50_000 + "</Patient>")
    for response, status, fault in (
            (post(client, faulty), 422, "GW-4203"),  # an empty object
            (client.post("/Patient", content=xml, headers={
                "Content-Type": "application/fhir+xml", "Accept": FHIR}), 422, "GW-4207"),
            (validate(client, "/Patient/$validate", faulty), 200, "GW-4203")):
        assert response.status_code == status, response.text[:500]
        assert len(response.content) < 100_000, len(response.content)
        found = [i for i in issues(response) if i["severity"] == "error"]
        codes = [i["details"]["coding"][0]["code"] for i in found]
        assert codes[-101:] == [fault] * 100 + ["GW-4220"]
        assert "49900 more errors" in found[-1]["diagnostics"]
        if status == 422:
            assert codes[0] == "GW-4002"
            assert "more than 100 validation error(s)" in found[0]["diagnostics"]
    assert search_ids(client, "/Patient", identifier=mrn) == []


def test_nesting_deeper_than_the_limit_is_refused(client: httpx.Client) -> None:
    resource: dict[str, Any] = {"resourceType": "Basic", "code": {"text": "leaf"}}
    for _ in range(7):
        resource = {"resourceType": "Bundle", "type": "collection",
                    "entry": [{"fullUrl": f"urn:uuid:{unique('x')}", "resource": resource}]}
    response = post(client, resource)
    assert response.status_code == 422
    assert "GW-4210" in gw_codes(response)


def test_a_bundle_whose_full_url_disagrees_with_its_resource_is_warned_of(
        client: httpx.Client) -> None:
    """Bundle.entry.fullUrl: "The fullUrl SHALL NOT disagree with the id in the
    resource"; a urn:uuid, or a URL that does not end in Type/id, is not judged. A
    warning, not an error: three of R4's own examples disagree (Bundle-lri-example)."""
    def collection(full_url: str, rid: str = "2") -> dict[str, Any]:
        return {"resourceType": "Bundle", "type": "collection", "entry": [
            {"fullUrl": full_url, "resource": {"resourceType": "Patient", "id": rid}}]}

    def disagreeing(response: httpx.Response) -> list[dict[str, Any]]:
        assert response.status_code == 200, response.text
        return [i for i in issues(response) if "SHALL NOT disagree" in i.get("diagnostics", "")]

    for wrong in ("http://example.org/fhir/Patient/1",
                  "https://example.org/fhir/Organization/2"):
        found = disagreeing(validate(client, "/Bundle/$validate", collection(wrong)))
        assert [(i["severity"], i["expression"]) for i in found] == [
            ("warning", ["Bundle.entry[0].fullUrl"])]
        assert post(client, collection(wrong)).status_code == 201
    for fine in ("http://example.org/fhir/Patient/2", f"urn:uuid:{uuid.uuid4()}",
                 "urn:oid:1.2.3", "http://example.org/patients?id=1"):
        assert disagreeing(validate(client, "/Bundle/$validate", collection(fine))) == [], fine


# -- warn-only profiles ---------------------------------------------------------------


@pytest.fixture(scope="module")
def lenient(tmp_path_factory: pytest.TempPathFactory, new_schema: Any
            ) -> Iterator[httpx.Client]:
    tmp: Path = tmp_path_factory.mktemp("lenient")
    settings = backend_settings("sqlite", tmp, new_schema, validation_warn_only=BP)
    with RunningServer(settings) as running, httpx.Client(base_url=running.url,
                                                          timeout=30) as c:
        yield c


def test_warn_only_profile_accepts_what_it_would_refuse(lenient: httpx.Client) -> None:
    response = post(lenient, blood_pressure())
    assert response.status_code == 201, response.text
    response = validate(lenient, "/Observation/$validate", blood_pressure())
    assert {i["severity"] for i in issues(response)} == {"warning"}
    # base R4 rules stay enforced
    assert post(lenient, blood_pressure(status="xyz")).status_code == 422


def test_validate_modes_say_what_the_interaction_would(client: httpx.Client) -> None:
    """"Modes update and delete can only be used when the operation is invoked at the
    resource instance level", and an update whose id is not the instance's would be
    refused (400 GW-1005): not "valid"."""
    created = post(client, patient(unique("mrn"))).json()
    for mode in ("update", "delete"):
        response = validate(client, "/Patient/$validate", created, mode=mode)
        assert (response.status_code, gw_code(response)) == (400, "GW-1028"), mode
    other = validate(client, f"/Patient/{created['id']}/$validate",
                     {**created, "id": "other"}, mode="update")
    assert other.status_code == 200
    assert [(i["severity"], i["details"]["coding"][0]["code"]) for i in issues(other)] == [
        ("error", "GW-1005")]
    same = validate(client, f"/Patient/{created['id']}/$validate", created, mode="update")
    assert [i["severity"] for i in issues(same)] == ["information"]


BODY_HEIGHT = "http://hl7.org/fhir/StructureDefinition/bodyheight"
DISCHARGE_BUNDLE = "https://carepath-gateway.org/fhir/StructureDefinition/discharge-bundle"


def test_an_object_where_a_profile_binds_a_code_is_a_wrong_json_type(
        client: httpx.Client) -> None:
    """A profile's checks run with the base's on the whole resource (every problem is
    listed at once), so they meet what the base refuses: an object where the body
    height profile binds ``valueQuantity.code`` is reported as the wrong JSON type
    (422 on write, listed by $validate), not judged against the value set."""
    obs = {"resourceType": "Observation", "meta": {"profile": [BODY_HEIGHT]},
           "status": "final", "code": {"text": "x"},
           "valueQuantity": {"value": 1, "code": {"resourceType": "Task"}}}
    for body in (obs, {**obs, "valueQuantity": {"value": 1, "code": ["cm"]}}):
        written = post(client, body)
        assert (written.status_code, gw_code(written)) == (422, "GW-4002"), written.text
        assert "Observation.valueQuantity.code" in expressions(written)
        assert "GW-4202" in gw_codes(written)
        checked = validate(client, "/Observation/$validate", body)
        assert checked.status_code == 200, checked.text
        assert "GW-4202" in gw_codes(checked)
        assert "Observation.valueQuantity.code" in expressions(checked)


def test_an_entry_resource_whose_resource_type_is_no_string_in_a_profiled_bundle(
        client: httpx.Client) -> None:
    """The discharge Bundle slices its entries by the type of their resource: an entry
    whose ``resourceType`` is an object or array is in no slice, and the base reports
    it (422 GW-4216), on write and by $validate."""
    for resource_type in ({}, ["Composition"]):
        bundle = {"resourceType": "Bundle", "meta": {"profile": [DISCHARGE_BUNDLE]},
                  "type": "document",
                  "entry": [{"fullUrl": "urn:uuid:1",
                             "resource": {"resourceType": resource_type}}]}
        written = post(client, bundle)
        assert (written.status_code, gw_code(written)) == (422, "GW-4002"), written.text
        assert "GW-4216" in gw_codes(written)
        checked = validate(client, "/Bundle/$validate", bundle)
        assert checked.status_code == 200, checked.text
        assert "GW-4216" in gw_codes(checked)
