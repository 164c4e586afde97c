"""$meta, $meta-add and $meta-delete over HTTP, on both backends.

Spec: https://hl7.org/fhir/R4/resource-operation-meta.html (-meta-add, -meta-delete):
meta is changed in place, without a new version.
"""

from __future__ import annotations

from typing import Any

import httpx

from tests.api.helpers import FHIR, gw_code, patient, post, search_ids
from tests.conftest import unique

CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"


def parameters(**meta: Any) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": [{"name": "meta", "valueMeta": meta}]}


def op(client: httpx.Client, path: str, name: str, **meta: Any) -> httpx.Response:
    return client.post(f"{path}/${name}", json=parameters(**meta),
                       headers={"Content-Type": FHIR})


def returned(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["resourceType"] == "Parameters"
    assert [p["name"] for p in body["parameter"]] == ["return"]
    return dict(body["parameter"][0]["valueMeta"])


def codes(meta: dict[str, Any], key: str) -> list[tuple[str | None, str]]:
    return [(c.get("system"), c["code"]) for c in meta.get(key, [])]


def test_meta_add_and_delete_change_meta_in_place(client: httpx.Client) -> None:
    system = f"urn:test:tag:{unique()}"
    created = post(client, patient(unique(), meta={"tag": [{"system": system, "code": "a"}]}))
    assert created.status_code == 201, created.text
    pid, etag = created.json()["id"], created.headers["etag"]
    path = f"/Patient/{pid}"

    assert codes(returned(client.get(f"{path}/$meta")), "tag") == [(system, "a")]
    added = returned(op(client, path, "meta-add",
                        tag=[{"system": system, "code": "a", "display": "ignored"},
                             {"system": system, "code": "b", "display": "Bee"}],
                        security=[{"system": CONFIDENTIALITY, "code": "R"}]))
    # tags are a set by system and code: "a" is not added twice
    assert codes(added, "tag") == [(system, "a"), (system, "b")]
    assert codes(added, "security") == [(CONFIDENTIALITY, "R")]
    assert added["versionId"] == "1"

    read = client.get(path)
    assert read.headers["etag"] == etag  # no new version
    assert codes(read.json()["meta"], "tag") == [(system, "a"), (system, "b")]
    history = client.get(f"{path}/_history").json()
    assert history["total"] == 1
    assert codes(history["entry"][0]["resource"]["meta"], "tag") == [(system, "a"), (system, "b")]
    assert search_ids(client, "/Patient", _tag=f"{system}|b") == [pid]
    assert search_ids(client, "/Patient", _security=f"{CONFIDENTIALITY}|R", _id=pid) == [pid]

    deleted = returned(op(client, path, "meta-delete", tag=[{"system": system, "code": "a"}],
                          security=[{"system": CONFIDENTIALITY, "code": "R"}]))
    assert codes(deleted, "tag") == [(system, "b")]
    assert "security" not in deleted
    assert search_ids(client, "/Patient", _tag=f"{system}|a") == []
    assert search_ids(client, "/Patient", _tag=f"{system}|b") == [pid]
    assert client.get(path).headers["etag"] == etag


def test_meta_add_on_a_version_leaves_the_current_one(client: httpx.Client) -> None:
    system = f"urn:test:tag:{unique()}"
    created = post(client, patient(unique()))
    pid = created.json()["id"]
    body = {**created.json(), "gender": "male"}
    assert client.put(f"/Patient/{pid}", json=body, headers={"Content-Type": FHIR}
                      ).status_code == 200
    v1 = f"/Patient/{pid}/_history/1"
    assert codes(returned(op(client, v1, "meta-add", tag=[{"system": system, "code": "old"}])),
                 "tag") == [(system, "old")]
    assert codes(client.get(v1).json()["meta"], "tag") == [(system, "old")]
    assert codes(returned(client.get(f"{v1}/$meta")), "tag") == [(system, "old")]
    assert "tag" not in client.get(f"/Patient/{pid}").json()["meta"]
    # the search index holds the current version only
    assert search_ids(client, "/Patient", _tag=f"{system}|old") == []
    returned(op(client, v1, "meta-delete", tag=[{"system": system, "code": "old"}]))
    assert "tag" not in client.get(v1).json()["meta"]


def test_meta_at_type_and_system_level_summarises_what_is_in_use(client: httpx.Client) -> None:
    system = f"urn:test:tag:{unique()}"
    profile = "http://hl7.org/fhir/StructureDefinition/vitalsigns"
    post(client, patient(unique(), meta={"tag": [{"system": system, "code": "p"}]}))
    obs = {"resourceType": "Observation", "status": "final",
           "meta": {"tag": [{"system": system, "code": "o"}], "profile": [f"{profile}|4.0.1"]},
           "category": [{"coding": [{
               "system": "http://terminology.hl7.org/CodeSystem/observation-category",
               "code": "vital-signs"}]}],
           "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
           "subject": {"reference": "Patient/x"}, "effectiveDateTime": "2024-01-01",
           "valueQuantity": {"value": 60, "unit": "/min", "system": "http://unitsofmeasure.org",
                             "code": "/min"}}
    assert post(client, obs).status_code == 201
    for path, wanted in (("/Patient", {"p"}), ("/Observation", {"o"}), ("", {"p", "o"})):
        meta = returned(client.get(f"{path}/$meta"))
        assert {c for s, c in codes(meta, "tag") if s == system} == wanted, path
    observation = returned(client.post("/Observation/$meta"))  # POST works as GET
    # a versioned profile is listed as written, not also without its version
    assert f"{profile}|4.0.1" in observation["profile"]
    assert profile not in observation["profile"]


def test_meta_operations_refuse_what_they_cannot_do(client: httpx.Client) -> None:
    pid = post(client, patient(unique())).json()["id"]
    path = f"/Patient/{pid}"
    assert client.get(f"{path}/$meta-add").status_code == 405
    no_meta = client.post(f"{path}/$meta-add", json={"resourceType": "Parameters"},
                          headers={"Content-Type": FHIR})
    assert no_meta.status_code == 400 and gw_code(no_meta) == "GW-1028"
    bad = op(client, path, "meta-add", tag=[{"system": "urn:x"}])
    assert bad.status_code == 400 and gw_code(bad) == "GW-1028"
    bad_profile = op(client, path, "meta-add", profile=[{"url": "x"}])
    assert bad_profile.status_code == 400 and gw_code(bad_profile) == "GW-1028"
    # a claimed profile must hold, as on any write
    wrong = op(client, path, "meta-add",
               profile=["http://hl7.org/fhir/StructureDefinition/vitalsigns"])
    assert wrong.status_code == 422 and gw_code(wrong) == "GW-4002"
    assert "profile" not in client.get(path).json()["meta"]
    missing = client.get(f"{path}/_history/9/$meta")
    assert missing.status_code == 404 and gw_code(missing) == "GW-2003"
    elsewhere = client.get(f"{path}/_history/1/$everything")
    assert elsewhere.status_code == 404 and gw_code(elsewhere) == "GW-1023"
    assert client.post("/Patient/$meta-add", json=parameters()).status_code == 404
    assert client.delete(path).status_code == 204
    gone = op(client, path, "meta-add", tag=[{"system": "urn:x", "code": "y"}])
    assert gone.status_code == 410 and gw_code(gone) == "GW-2002"
    assert client.get(f"{path}/$meta").status_code == 410
    assert client.get(f"{path}/_history/2/$meta").status_code == 410
    assert returned(client.get(f"{path}/_history/1/$meta"))["versionId"] == "1"


def test_capability_statement_lists_the_meta_operations(client: httpx.Client) -> None:
    rest = client.get("/metadata").json()["rest"][0]
    patient_ops = {o["name"] for r in rest["resource"] if r["type"] == "Patient"
                   for o in r.get("operation", [])}
    assert {"meta", "meta-add", "meta-delete"} <= patient_ops
    assert "meta" in {o["name"] for o in rest.get("operation", [])}
