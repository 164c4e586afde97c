"""create, read, vread, update, delete, If-Match, Prefer: http.html of FHIR R4."""

from __future__ import annotations

import base64
import json
import time
from datetime import timedelta
from email.utils import format_datetime, parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx

from gateway.settings import Settings
from tests.api.helpers import FHIR, gw_code, patient, post, put, search_ids
from tests.conftest import RunningServer, unique


def test_create_assigns_id_version_and_headers(client: httpx.Client) -> None:
    body = patient(unique("mrn"), id="client-chosen")
    response = post(client, body)
    assert response.status_code == 201
    created = response.json()
    assert created["id"] != "client-chosen"
    assert created["meta"]["versionId"] == "1"
    assert created["meta"]["lastUpdated"].endswith("+00:00")
    assert response.headers["ETag"] == 'W/"1"'
    assert response.headers["Location"].endswith(f"/Patient/{created['id']}/_history/1")
    assert response.headers["content-type"].startswith("application/fhir+json")
    assert "Last-Modified" in response.headers


def test_read_serves_what_was_stored(client: httpx.Client) -> None:
    created = post(client, patient(unique("mrn"))).json()
    response = client.get(f"/Patient/{created['id']}")
    assert response.status_code == 200
    assert response.json() == created
    assert response.headers["ETag"] == 'W/"1"'


def test_stored_resources_begin_with_type_id_and_meta(client: httpx.Client) -> None:
    # members in the order clients and people expect to read them, whatever the sender's
    body = {"gender": "female", "meta": {"tag": [{"code": "t"}]}, "active": True,
            "resourceType": "Patient"}
    created = post(client, body)
    updated = put(client, {"active": False, "id": created.json()["id"], "resourceType": "Patient"})
    for response in (created, updated, client.get(f"/Patient/{created.json()['id']}")):
        resource = response.json()
        assert list(resource)[:3] == ["resourceType", "id", "meta"]
        assert list(resource["meta"])[:2] == ["versionId", "lastUpdated"]
    assert list(created.json()) == ["resourceType", "id", "meta", "gender", "active"]
    assert created.json()["meta"]["tag"] == [{"code": "t"}]


def test_decimal_precision_survives_the_round_trip(client: httpx.Client) -> None:
    obs = {
        "resourceType": "Observation", "status": "final",
        "code": {"text": "weight"},
        "valueQuantity": {"value": 1.50, "unit": "kg"},
        "component": [{"code": {"text": "x"}, "valueQuantity": {"value": 1e2}}],
    }
    raw = (
        b'{"resourceType":"Observation","status":"final","code":{"text":"weight"},'
        b'"valueQuantity":{"value":1.50,"unit":"kg"},'
        b'"component":[{"code":{"text":"x"},"valueQuantity":{"value":1.0e2}}]}'
    )
    del obs
    created = client.post("/Observation", content=raw, headers={"Content-Type": FHIR})
    assert created.status_code == 201, created.text
    read = client.get(f"/Observation/{created.json()['id']}")
    assert b'"value":1.50' in read.content
    assert b'"value":1.0e2' in read.content


def test_vread_returns_each_version(client: httpx.Client) -> None:
    created = post(client, patient(unique("mrn"), family="Eins")).json()
    created["name"][0]["family"] = "Zwei"
    assert put(client, created).status_code == 200
    v1 = client.get(f"/Patient/{created['id']}/_history/1")
    v2 = client.get(f"/Patient/{created['id']}/_history/2")
    assert v1.json()["name"][0]["family"] == "Eins"
    assert v2.json()["name"][0]["family"] == "Zwei"
    assert v2.headers["ETag"] == 'W/"2"'
    assert client.get(f"/Patient/{created['id']}/_history/3").status_code == 404
    # a version does not change: a cache holding it is told so (conditional read)
    cached = client.get(f"/Patient/{created['id']}/_history/1",
                        headers={"If-None-Match": v1.headers["ETag"]})
    assert cached.status_code == 304 and cached.content == b""
    assert cached.headers["ETag"] == 'W/"1"'
    other = client.get(f"/Patient/{created['id']}/_history/1",
                       headers={"If-None-Match": 'W/"2"'})
    assert other.status_code == 200 and other.json()["name"][0]["family"] == "Eins"


def test_update_and_create_on_update(client: httpx.Client) -> None:
    rid = unique("pat")
    body = patient(unique("mrn"), id=rid)
    first = put(client, body)
    assert first.status_code == 201
    assert first.json()["meta"]["versionId"] == "1"
    assert first.headers["Location"].endswith(f"/Patient/{rid}/_history/1")
    second = put(client, body)
    assert second.status_code == 200
    assert second.json()["meta"]["versionId"] == "2"


def test_if_match_accepts_current_and_rejects_stale_version(client: httpx.Client) -> None:
    created = post(client, patient(unique("mrn"))).json()
    ok = put(client, created, **{"If-Match": 'W/"1"'})
    assert ok.status_code == 200
    stale = put(client, created, **{"If-Match": 'W/"1"'})
    assert stale.status_code == 412
    assert gw_code(stale) == "GW-3001"
    bad = put(client, created, **{"If-Match": "nonsense"})
    assert bad.status_code == 400
    assert put(client, created, **{"If-Match": '"2'}).status_code == 400


def test_if_match_takes_a_list_of_etags_and_any(client: httpx.Client) -> None:
    """RFC 9110 13.1.1: ``If-Match = "*" / #entity-tag``: a list matches when any of
    its tags names the current version, ``*`` when there is one."""
    created = post(client, patient(unique("mrn"))).json()
    listed = put(client, created, **{"If-Match": 'W/"7", W/"1"'})
    assert listed.status_code == 200, listed.text
    assert put(client, created, **{"If-Match": 'W/"1", W/"3"'}).status_code == 412
    assert put(client, created, **{"If-Match": "*"}).status_code == 200
    path = f"/Patient/{created['id']}"
    assert client.delete(path, headers={"If-Match": 'W/"1", "3"'}).status_code == 204
    # a deleted resource has no current version for * to match
    assert put(client, created, **{"If-Match": "*"}).status_code == 412


def test_if_none_match_makes_a_put_create_only(client: httpx.Client) -> None:
    """RFC 9110 13.1.2: ``If-None-Match: *`` fails (412) when the resource exists; a
    list of ETags fails when it names the current version."""
    body = patient(unique("mrn"), id=unique("inm"))
    created = put(client, body, **{"If-None-Match": "*"})
    assert created.status_code == 201, created.text
    again = put(client, {**body, "gender": "male"}, **{"If-None-Match": "*"})
    assert again.status_code == 412 and gw_code(again) == "GW-3007"
    assert client.get(f"/Patient/{body['id']}").json()["gender"] == "female"
    named = put(client, body, **{"If-None-Match": 'W/"7", W/"1"'})
    assert named.status_code == 412 and gw_code(named) == "GW-3007"
    assert put(client, body, **{"If-None-Match": 'W/"7"'}).status_code == 200
    # a deleted resource may be created again
    assert client.delete(f"/Patient/{body['id']}").status_code == 204
    assert put(client, body, **{"If-None-Match": "*"}).status_code == 201
    # in a transaction (Bundle.entry.request.ifNoneMatch) the whole Bundle fails
    txn = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": f"urn:uuid:{unique()}", "resource": patient(unique("mrn")),
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": f"Patient/{body['id']}", "resource": body,
         "request": {"method": "PUT", "url": f"Patient/{body['id']}", "ifNoneMatch": "*"}}]}
    failed = client.post("/", json=txn, headers={"Content-Type": FHIR})
    assert failed.status_code == 412 and gw_code(failed) == "GW-3007"


def test_delete_is_logical_and_read_answers_gone(client: httpx.Client) -> None:
    created = post(client, patient(unique("mrn"))).json()
    path = f"/Patient/{created['id']}"
    assert client.delete(path).status_code == 204
    gone = client.get(path)
    assert gone.status_code == 410
    assert gw_code(gone) == "GW-2002"
    assert client.delete(path).status_code == 204  # idempotent
    assert client.get(f"{path}/_history/1").status_code == 200
    history = client.get(f"{path}/_history").json()
    assert [e["request"]["method"] for e in history["entry"]] == ["DELETE", "POST"]
    assert "resource" not in history["entry"][0]
    # a deleted resource can be brought back by update
    again = put(client, created)
    assert again.status_code == 201
    assert again.json()["meta"]["versionId"] == "3"


def test_read_of_unknown_resource_is_404(client: httpx.Client) -> None:
    response = client.get(f"/Patient/{unique('none')}")
    assert response.status_code == 404
    assert gw_code(response) == "GW-2001"


def test_conditional_create(client: httpx.Client) -> None:
    mrn = unique("mrn")
    criteria = f"identifier=urn:test:mrn|{mrn}"
    first = post(client, patient(mrn), **{"If-None-Exist": criteria})
    assert first.status_code == 201
    second = post(client, patient(mrn), **{"If-None-Exist": criteria})
    assert second.status_code == 200
    assert second.json()["id"] == first.json()["id"]
    # where the match is, as for a created one (HAPI FHIR; a client may read only that)
    assert second.headers["Location"] == first.headers["Location"]
    assert search_ids(client, "/Patient", identifier=f"urn:test:mrn|{mrn}") == [
        first.json()["id"]]
    # written as a whole search URL, as some clients do
    for written in (f"Patient?{criteria}", f"{client.base_url}Patient?{criteria}", f"?{criteria}"):
        again = post(client, patient(mrn), **{"If-None-Exist": written})
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"], written
    wrong = post(client, patient(mrn), **{"If-None-Exist": f"Observation?{criteria}"})
    assert wrong.status_code == 400 and gw_code(wrong) == "GW-1021", wrong.text
    post(client, patient(mrn))  # a second one, unconditionally
    third = post(client, patient(mrn), **{"If-None-Exist": criteria})
    assert third.status_code == 412
    assert gw_code(third) == "GW-3002"


def test_conditional_update(client: httpx.Client) -> None:
    mrn = unique("mrn")
    url = f"/Patient?identifier=urn:test:mrn|{mrn}"
    created = client.put(url, json=patient(mrn), headers={"Content-Type": FHIR})
    assert created.status_code == 201
    rid = created.json()["id"]
    updated = client.put(url, json=patient(mrn, family="Neu"), headers={"Content-Type": FHIR})
    assert updated.status_code == 200
    assert updated.json()["id"] == rid
    assert updated.json()["meta"]["versionId"] == "2"
    mismatch = client.put(url, json=patient(mrn, id="other"), headers={"Content-Type": FHIR})
    assert mismatch.status_code == 400
    post(client, patient(mrn))
    multiple = client.put(url, json=patient(mrn), headers={"Content-Type": FHIR})
    assert multiple.status_code == 412


def test_a_conditional_write_must_match_its_own_criteria(client: httpx.Client) -> None:
    """A conditional create or update whose resource does not match its criteria is
    refused (400, as HAPI FHIR refuses it, HAPI-0929): sent again, it would write a
    duplicate each time instead of finding what it wrote."""
    asked, carried = unique("mrn"), unique("mrn")
    criteria = f"identifier=urn:test:mrn|{asked}"
    created = post(client, patient(carried), **{"If-None-Exist": criteria})
    assert (created.status_code, gw_code(created)) == (400, "GW-1021"), created.text
    url = f"/Patient?identifier=urn:test:mrn|{asked}"
    updated = client.put(url, json=patient(carried), headers={"Content-Type": FHIR})
    assert (updated.status_code, gw_code(updated)) == (400, "GW-1021"), updated.text
    assert search_ids(client, "/Patient", identifier=f"urn:test:mrn|{carried}") == []
    # in a transaction too, whichever entry is refused naming it
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": patient(unique("mrn")), "request": {"method": "POST", "url": "Patient"}},
        {"resource": patient(carried), "request": {
            "method": "POST", "url": "Patient", "ifNoneExist": criteria}}]}
    refused = client.post("/", json=bundle, headers={"Content-Type": FHIR})
    assert (refused.status_code, gw_code(refused)) == (400, "GW-1021"), refused.text
    assert "Bundle.entry[1]" in refused.text
    # what does match is written, once
    for _ in range(2):
        assert client.put(url, json=patient(asked), headers={"Content-Type": FHIR}
                          ).status_code in (200, 201)
        assert post(client, patient(asked), **{"If-None-Exist": criteria}).status_code == 200
    assert len(search_ids(client, "/Patient", identifier=f"urn:test:mrn|{asked}")) == 1
    # an update of the resource the criteria found may change what they matched on
    # (a patient given a new number); criteria about other resources (what refers to
    # it) hold no new resource
    renumbered = client.put(url, json=patient(carried), headers={"Content-Type": FHIR})
    assert renumbered.status_code == 200, renumbered.text
    alone = unique("mrn")
    lonely = post(client, patient(alone), **{
        "If-None-Exist": f"identifier=urn:test:mrn|{alone}"
                         "&_has:Observation:patient:code=http://loinc.org|8867-4"})
    assert lonely.status_code == 201, lonely.text


def test_a_conditional_update_without_a_match_does_not_take_an_existing_id(
        client: httpx.Client) -> None:
    """http.html#cond-update, no match and an id given: the id names a new resource.
    One the criteria do not match keeps its content (409, as R5 says and HAPI FHIR
    answers); a deleted one's id may be taken."""
    other = post(client, patient(unique("mrn"))).json()
    mrn = unique("mrn")
    url = f"/Patient?identifier=urn:test:mrn|{mrn}"
    taken = client.put(url, json=patient(mrn, id=other["id"]), headers={"Content-Type": FHIR})
    assert (taken.status_code, gw_code(taken)) == (409, "GW-3008"), taken.text
    assert client.get(f"/Patient/{other['id']}").json()["meta"]["versionId"] == "1"
    assert client.delete(f"/Patient/{other['id']}").status_code == 204
    revived = client.put(url, json=patient(mrn, id=other["id"]), headers={"Content-Type": FHIR})
    assert revived.status_code in (200, 201), revived.text
    assert client.get(url).json()["entry"][0]["resource"]["id"] == other["id"]


def test_conditional_delete(client: httpx.Client) -> None:
    mrn = unique("mrn")
    rid = post(client, patient(mrn)).json()["id"]
    response = client.delete("/Patient", params={"identifier": f"urn:test:mrn|{mrn}"})
    assert response.status_code == 204
    assert client.get(f"/Patient/{rid}").status_code == 410
    # nothing matches any more: still fine
    assert client.delete("/Patient", params={"identifier": f"urn:test:mrn|{mrn}"}
                         ).status_code == 204


def test_prefer_return(client: httpx.Client) -> None:
    minimal = post(client, patient(unique("mrn")), Prefer="return=minimal")
    assert minimal.status_code == 201
    assert minimal.content == b""
    assert minimal.headers["Location"]
    outcome = post(client, patient(unique("mrn")), Prefer="return=OperationOutcome")
    assert outcome.status_code == 201
    assert outcome.json()["resourceType"] == "OperationOutcome"
    rep = post(client, patient(unique("mrn")), Prefer="return=representation")
    assert rep.json()["resourceType"] == "Patient"


def test_json_patch(client: httpx.Client) -> None:
    created = post(client, patient(unique("mrn"))).json()
    path = f"/Patient/{created['id']}"
    ops = [{"op": "replace", "path": "/name/0/family", "value": "Gepatcht"},
           {"op": "add", "path": "/active", "value": True}]
    response = client.patch(path, json=ops,
                            headers={"Content-Type": "application/json-patch+json",
                                     "If-Match": 'W/"1"'})
    assert response.status_code == 200, response.text
    assert response.json()["name"][0]["family"] == "Gepatcht"
    assert response.json()["active"] is True
    assert response.json()["meta"]["versionId"] == "2"
    history = client.get(f"{path}/_history").json()
    assert history["entry"][0]["request"]["method"] == "PATCH"


def test_json_patch_errors(client: httpx.Client) -> None:
    created = post(client, patient(unique("mrn"))).json()
    path = f"/Patient/{created['id']}"
    patch_type = {"Content-Type": "application/json-patch+json"}
    not_a_patch = client.patch(path, json={"op": "replace"}, headers=patch_type)
    assert not_a_patch.status_code == 400
    bad_path = client.patch(path, json=[{"op": "remove", "path": "/nothing/here"}],
                            headers=patch_type)
    assert bad_path.status_code == 400
    change_id = client.patch(path, json=[{"op": "replace", "path": "/id", "value": "x"}],
                             headers=patch_type)
    assert change_id.status_code == 422
    wrong_type = client.patch(path, json=[], headers={"Content-Type": FHIR})
    assert wrong_type.status_code == 415
    assert client.get(path).json()["meta"]["versionId"] == "1"


def test_json_patch_errors_name_the_operation_not_the_data(client: httpx.Client) -> None:
    # a client allowed to patch need not be allowed to read: the outcome of a failed
    # patch must not quote the resource (jsonpatch's own messages do)
    secret = unique("Geheimname")
    body = patient(unique("mrn"))
    body["name"][0]["family"] = secret
    path = f"/Patient/{post(client, body).json()['id']}"
    patch_type = {"Content-Type": "application/json-patch+json"}
    cases = [
        ([{"op": "add", "path": "/active", "value": True},
          {"op": "test", "path": "/name/0/family", "value": "Guess"}], 409, 1),
        ([{"op": "replace", "path": "/nothing/0", "value": 1}], 400, 0),
        ([{"op": "add", "path": "/name/0/family/x", "value": 1}], 400, 0),
        ([{"op": "remove", "path": "/nothing"}], 400, 0),
    ]
    for ops, status, failing in cases:
        response = client.patch(path, json=ops, headers=patch_type)
        assert response.status_code == status, response.text
        assert secret not in response.text and "Gepatcht" not in response.text
        diagnostics = response.json()["issue"][0]["diagnostics"]
        assert f"operation {failing} ({ops[failing]['op']} {ops[failing]['path']})" \
            in diagnostics, diagnostics
    assert client.get(path).json()["meta"]["versionId"] == "1"


def test_a_patch_grows_a_resource_no_larger_than_a_request(tmp_path: Path) -> None:
    """Each JSON Patch ``copy`` of an array into itself doubles it: 40 of them (a
    body of 2 KB) would make a resource of terabytes. The patch is refused (413) at
    the copy that would make the resource larger than a request may be, in a PATCH,
    a transaction's Binary and a batch's alike, and nothing is written."""
    limit = 64 * 1024
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'g.db'}",
                        max_request_bytes=limit)
    doubling = [{"op": "copy", "from": "/name", "path": "/name/-"}] * 16  # 2 MB
    patch_type = {"Content-Type": "application/json-patch+json"}
    with RunningServer(settings) as running, httpx.Client(
            base_url=running.url, timeout=30, headers={"Accept": FHIR}) as http:
        rid = post(http, {"resourceType": "Patient", "name": [{"family": "x"}]}).json()["id"]
        path = f"/Patient/{rid}"
        response = http.patch(path, json=doubling, headers=patch_type)
        assert (response.status_code, gw_code(response)) == (413, "GW-1011"), response.text
        # each copy nests the array in itself: 34 KB after operation 10, 69 KB after 11
        assert "operation 11 (copy /name/-)" in response.json()["issue"][0]["diagnostics"]
        within = http.patch(path, json=[{"op": "copy", "from": "/name/0", "path": "/name/-"}]
                            * 5, headers=patch_type)
        assert within.status_code == 200 and len(within.json()["name"]) == 6
        entry = {"resource": {"resourceType": "Binary",
                              "contentType": "application/json-patch+json",
                              "data": base64.b64encode(json.dumps(doubling).encode()).decode()},
                 "request": {"method": "PATCH", "url": f"Patient/{rid}"}}
        in_tx = http.post("", json={"resourceType": "Bundle", "type": "transaction",
                                    "entry": [entry]}, headers={"Content-Type": FHIR})
        assert (in_tx.status_code, gw_code(in_tx)) == (413, "GW-1011"), in_tx.text
        in_batch = http.post("", json={"resourceType": "Bundle", "type": "batch",
                                       "entry": [entry]}, headers={"Content-Type": FHIR})
        assert in_batch.status_code == 200, in_batch.text
        assert in_batch.json()["entry"][0]["response"]["status"].startswith("413")
        assert http.get(path).json()["meta"]["versionId"] == "2"


def test_a_patch_nests_a_resource_no_deeper_than_a_body(client: httpx.Client) -> None:
    """Each operation may reach into what the one before added: 300 of them nest the
    resource 300 deep, deeper than ``CAREPATH_MAX_JSON_DEPTH`` allows a body (and
    than JSON is written): 400 GW-1010, not an internal error."""
    path = f"/Patient/{post(client, patient(unique('mrn'))).json()['id']}"
    ops = [{"op": "add", "path": "/extension", "value": {}}]
    ops += [{"op": "add", "path": "/extension" + "/a" * (i + 1), "value": {}}
            for i in range(300)]
    deep = client.patch(path, json=ops, headers={"Content-Type": "application/json-patch+json"})
    assert (deep.status_code, gw_code(deep)) == (400, "GW-1010"), deep.text
    # and a copy of a value too deep to be measured is refused before it is made
    copied = client.patch(path, json=[*ops, {"op": "copy", "from": "/extension",
                                             "path": "/extension/b"}],
                          headers={"Content-Type": "application/json-patch+json"})
    assert (copied.status_code, gw_code(copied)) == (400, "GW-1010"), copied.text
    nested = [{"type": "add", "path": "Patient" + ".extension" * i, "name": "extension",
               "value": [{"name": "url", "valueUri": "urn:test:x"}]} for i in range(150)]
    fhirpath = client.patch(path, json=_fhirpath_patch(*nested), headers={"Content-Type": FHIR})
    assert (fhirpath.status_code, gw_code(fhirpath)) == (400, "GW-1010"), fhirpath.text
    assert client.get(path).json()["meta"]["versionId"] == "1"


def test_a_patch_has_at_most_a_thousand_operations(client: httpx.Client) -> None:
    """``CAREPATH_MAX_PATCH_OPERATIONS``: a patch of more operations is refused (413)
    before any is applied, a JSON Patch and a FHIRPath Patch alike."""
    path = f"/Patient/{post(client, patient(unique('mrn'))).json()['id']}"
    test_gender = {"op": "test", "path": "/resourceType", "value": "Patient"}
    patch_type = {"Content-Type": "application/json-patch+json"}
    assert client.patch(path, json=[test_gender] * 1000, headers=patch_type).status_code == 200
    many = client.patch(path, json=[test_gender] * 1001, headers=patch_type)
    assert (many.status_code, gw_code(many)) == (413, "GW-1011"), many.text
    assert "1001 operations" in many.json()["issue"][0]["diagnostics"]
    keep = {"type": "move", "path": "Patient.name", "source": 0, "destination": 0}
    fhirpath = client.patch(path, json=_fhirpath_patch(*[keep] * 1001),
                            headers={"Content-Type": FHIR})
    assert (fhirpath.status_code, gw_code(fhirpath)) == (413, "GW-1011"), fhirpath.text


def test_bad_input_is_an_operation_outcome_never_a_500(client: httpx.Client) -> None:
    cases = [
        (client.post("/Patient", content=b"{not json", headers={"Content-Type": FHIR}),
         400, "GW-1001"),
        (client.post("/Patient", content=b"[1,2]", headers={"Content-Type": FHIR}),
         400, "GW-1002"),
        (client.post("/Patient", content=b'{"resourceType": "Patient", "gender": "male",'
                     b' "gender": "female"}', headers={"Content-Type": FHIR}), 400, "GW-1034"),
        (client.post("", content=b'{"resourceType":"Bundle","type":"transaction","entry":['
                     b'{"resource":{"resourceType":"Patient","active":true,"active":false},'
                     b'"request":{"method":"POST","url":"Patient"}}]}',
                     headers={"Content-Type": FHIR}), 400, "GW-1034"),
        (client.post("/Patient", json={"resourceType": "Observation", "status": "final"},
                     headers={"Content-Type": FHIR}), 400, "GW-1004"),
        (client.post("/Patient", json={"name": []}, headers={"Content-Type": FHIR}),
         400, "GW-1022"),
        (client.post("/Foo", json={"resourceType": "Foo"}, headers={"Content-Type": FHIR}),
         404, "GW-1023"),
        (client.put("/Patient/abc", json={"resourceType": "Patient", "id": "xyz"},
                    headers={"Content-Type": FHIR}), 400, "GW-1005"),
        (client.put("/Patient/abc", json={"resourceType": "Patient"},
                    headers={"Content-Type": FHIR}), 400, "GW-1006"),
        (client.get("/Patient/bad$id"), 400, "GW-1007"),
        # an encoded '/' is part of what the client sent as one id, not a separator
        (client.get("/Patient/x%2F_history"), 400, "GW-1007"),
        (client.get("/Patient/%2f"), 400, "GW-1007"),
        (client.put("/Patient/" + "a" * 65, json={"resourceType": "Patient", "id": "a" * 65},
                    headers={"Content-Type": FHIR}), 400, "GW-1007"),
        (client.post("/Patient", content=b"<Patient/>",
                     headers={"Content-Type": "application/fhir+xml"}), 400, "GW-1022"),
        (client.post("/Patient", content=b"<Patient",
                     headers={"Content-Type": "application/fhir+xml"}), 400, "GW-1027"),
        (client.post("/Patient", content=b"%PDF-1.4",
                     headers={"Content-Type": "application/pdf"}), 415, "GW-1008"),
        (client.get("/metadata", params={"_format": "turtle"}), 406, "GW-1009"),
        (client.post("/Patient", content=b"[" * 100 + b"]" * 100,
                     headers={"Content-Type": FHIR}), 400, "GW-1010"),
        # deeper than orjson writes (255), with a decimal that keeps its text
        (client.post("/Patient", content=b'{"a":' * 300 + b"1.50" + b"}" * 300,
                     headers={"Content-Type": FHIR}), 400, "GW-1010"),
        (client.delete("/metadata"), 405, "GW-4001"),
        (client.post("/", json={"resourceType": "Bundle", "type": "collection"},
                     headers={"Content-Type": FHIR}), 400, "GW-1017"),
    ]
    for response, status, code in cases:
        assert response.status_code == status, (response.request.url, response.text)
        assert gw_code(response) == code, response.text


def test_a_method_not_allowed_names_those_that_are(client: httpx.Client) -> None:
    """RFC 9110 15.5.6: a 405 carries ``Allow``, the methods the URL takes."""
    pid = post(client, patient(unique("mrn"))).json()["id"]
    for method, path, allowed in [
        ("DELETE", "/metadata", "GET, HEAD"),
        ("PUT", "/", "GET, HEAD, POST"),
        ("PUT", "/Patient", "GET, HEAD, POST"),
        ("POST", f"/Patient/{pid}", "GET, HEAD, PUT, PATCH, DELETE"),
        ("OPTIONS", "/Patient?identifier=x", "GET, HEAD, POST, PUT, PATCH, DELETE"),
        ("DELETE", f"/Patient/{pid}/_history", "GET, HEAD"),
        ("GET", "/Patient/_search", "POST"),
        ("GET", f"/Patient/{pid}/$meta-add", "POST"),
    ]:
        response = client.request(method, path)
        assert response.status_code == 405, (method, path, response.text)
        assert gw_code(response) == "GW-4001"
        assert response.headers.get("Allow") == allowed, (method, path)


def test_numbers_beyond_what_the_store_holds_are_client_errors(client: httpx.Client) -> None:
    """Digits Python's int() refuses ("²"), or more than a version, cursor or FHIR
    integer holds: a 4xx with an OperationOutcome, never a 500."""
    pid = post(client, patient(unique("mrn"))).json()["id"]
    cases = [
        (client.get(f"/Patient/{pid}/_history/99999999999999999999"), 404, "GW-2003"),
        (client.get(f"/Patient/{pid}/_history/%C2%B2"), 404, "GW-2003"),
        (client.get("/Patient/_history", params={"_cursor": "9" * 30}), 400, "GW-1013"),
        (client.get("/$audit-log", params={"_cursor": "9" * 30}), 400, "GW-1013"),
        (client.get("/Patient", params={"_count": "\u00b2"}), 400, "GW-1013"),
        (client.get(f"/Patient/{pid}/$everything", params={"_count": "\u00b2"}), 400,
         "GW-1013"),
        (client.get("/ValueSet/$expand", params={
            "url": "http://hl7.org/fhir/ValueSet/administrative-gender",
            "offset": "9" * 30}), 400, None),
    ]
    for response, status, code in cases:
        assert response.status_code == status, (response.request.url, response.text)
        assert response.json()["resourceType"] == "OperationOutcome"
        if code is not None:
            assert gw_code(response) == code, response.text


def test_request_larger_than_the_limit_is_413(client: httpx.Client, server) -> None:  # type: ignore[no-untyped-def]
    limit = server.settings.max_request_bytes
    body = b'{"resourceType":"Basic","code":{"text":"' + b"x" * (limit + 10) + b'"}}'
    response = client.post("/Basic", content=body, headers={"Content-Type": FHIR})
    assert response.status_code == 413
    assert gw_code(response) == "GW-1011"


def test_format_parameter_and_pretty(client: httpx.Client) -> None:
    created = post(client, patient(unique("mrn"))).json()
    response = client.get(f"/Patient/{created['id']}", params={"_format": "json",
                                                             "_pretty": "true"})
    assert response.status_code == 200
    assert b"\n  " in response.content
    assert response.json() == created
    fhir_json = client.get(f"/Patient/{created['id']}",
                           params={"_format": "application/fhir+json"})
    assert fhir_json.status_code == 200


def test_conditional_read_with_if_none_match(client: httpx.Client) -> None:
    created = post(client, patient(unique("mrn"))).json()
    path = f"/Patient/{created['id']}"
    response = client.get(path, headers={"If-None-Match": 'W/"1"'})
    assert response.status_code == 304
    assert response.headers["ETag"] == 'W/"1"' and response.content == b""
    assert client.get(path, headers={"If-None-Match": 'W/"0", W/"1"'}).status_code == 304
    assert client.get(path, headers={"If-None-Match": "*"}).status_code == 304
    assert client.get(path, headers={"If-None-Match": 'W/"2"'}).status_code == 200


def test_conditional_read_with_if_modified_since(client: httpx.Client) -> None:
    created = post(client, patient(unique("mrn"))).json()
    path = f"/Patient/{created['id']}"
    last_modified = client.get(path).headers["Last-Modified"]
    since = parsedate_to_datetime(last_modified)
    assert client.get(path, headers={"If-Modified-Since": last_modified}).status_code == 304
    later = format_datetime(since + timedelta(hours=1), usegmt=True)
    assert client.get(path, headers={"If-Modified-Since": later}).status_code == 304
    earlier = format_datetime(since - timedelta(seconds=1), usegmt=True)
    assert client.get(path, headers={"If-Modified-Since": earlier}).status_code == 200
    assert client.get(path, headers={"If-Modified-Since": "yesterday"}).status_code == 200
    # RFC 9110 13.1.3: "A recipient MUST ignore If-Modified-Since if the field value is
    # not a valid HTTP-date", as one of a year no date holds is not
    for huge in ("Fri, 31 Dec 99999999999999999999 23:59:59 GMT",
                 "Fri, 31 Dec 99999 23:59:59 GMT"):
        for read in (path, f"{path}/_history/1"):
            assert client.get(read, headers={"If-Modified-Since": huge}).status_code == 200
    assert client.get(f"{path}/_history/1",
                      headers={"If-Modified-Since": later}).status_code == 304
    # If-None-Match decides when both are sent
    assert client.get(path, headers={"If-Modified-Since": later,
                                     "If-None-Match": 'W/"7"'}).status_code == 200
    caps = client.get("/metadata").json()["rest"][0]["resource"]
    assert {r["type"]: r["conditionalRead"] for r in caps}["Patient"] == "full-support"


def test_forbidden_characters_in_bodies_and_queries_are_400(client: httpx.Client) -> None:
    nul = client.post("/Patient",
                      content=b'{"resourceType":"Patient","name":[{"family":"a\\u0000"}]}',
                      headers={"Content-Type": FHIR})
    assert nul.status_code == 400
    assert gw_code(nul) == "GW-1022"
    surrogate = client.post(
        "/Patient", content=b'{"resourceType":"Patient","name":[{"family":"\\ud800"}],"x":1.50}',
        headers={"Content-Type": FHIR})
    assert surrogate.status_code == 400
    query = client.get("/Patient", params={"name": "a\x00b"})
    assert query.status_code == 400
    assert gw_code(query) == "GW-1013"


def test_string_length_limit(client: httpx.Client, server) -> None:  # type: ignore[no-untyped-def]
    limit = server.settings.max_string_length
    if limit >= server.settings.max_request_bytes:
        # the request limit is the tighter one: show that a long string under it passes
        body = {"resourceType": "Basic", "code": {"text": "x" * 100_000}}
        assert client.post("/Basic", json=body, headers={"Content-Type": FHIR}
                           ).status_code == 201
        return
    body = {"resourceType": "Basic", "code": {"text": "x" * (limit + 1)}}
    response = client.post("/Basic", json=body, headers={"Content-Type": FHIR})
    assert response.status_code == 413
    assert gw_code(response) == "GW-1025"


def test_read_and_vread_with_summary_and_elements(client: httpx.Client) -> None:
    body = patient(unique("mrn"), family="Teilmenge")
    body["text"] = {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">'
                                                  "Teilmenge</div>"}
    created = post(client, body).json()
    rid = created["id"]

    def tags(resource: dict[str, Any]) -> list[str]:
        return [t["code"] for t in resource["meta"].get("tag", [])]

    elements = client.get(f"/Patient/{rid}", params={"_elements": "name"})
    assert elements.status_code == 200 and elements.headers["etag"] == 'W/"1"'
    got = elements.json()
    assert set(got) == {"resourceType", "id", "meta", "name"} and "SUBSETTED" in tags(got)
    summary = client.get(f"/Patient/{rid}/_history/1", params={"_summary": "true"}).json()
    assert "name" in summary and "text" not in summary and "SUBSETTED" in tags(summary)
    text = client.get(f"/Patient/{rid}", params={"_summary": "text"}).json()
    assert "text" in text and "name" not in text
    whole = client.get(f"/Patient/{rid}", params={"_summary": "false", "_": "cachebuster"})
    assert whole.json() == created  # the stored resource, untouched
    bad = client.get(f"/Patient/{rid}", params={"_summary": "count"})
    assert bad.status_code == 400 and gw_code(bad) == "GW-1013"
    assert client.get(f"/Patient/{rid}", params={"_elements": "na me"}).status_code == 400


def test_elements_below_the_top_and_of_one_type(client: httpx.Client) -> None:
    """``_elements`` as HAPI FHIR takes it besides R4's top-level names: a path below the
    top keeps only those children (``name.family``), ``Type.element`` applies to that
    type alone (the others are whole), and the JSON name of a choice works too."""
    pid = post(client, {"resourceType": "Patient", "gender": "female", "name": [
        {"use": "official", "family": "Kurz", "given": ["Ada"]}, {"given": ["Addy"]}],
        "contact": [{"name": {"family": "Lang", "given": ["Bo"]}, "gender": "male"}]}
    ).json()["id"]
    obs = post(client, {"resourceType": "Observation", "status": "final",
                        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}],
                                 "text": "heart rate"},
                        "subject": {"reference": f"Patient/{pid}"},
                        "valueQuantity": {"value": 72, "unit": "/min"},
                        "component": [{"code": {"text": "a"},
                                       "valueQuantity": {"value": 1, "unit": "x"}}]}
               ).json()["id"]

    def read(path: str, elements: str) -> dict[str, Any]:
        response = client.get(path, params={"_elements": elements})
        assert response.status_code == 200, (elements, response.text)
        got = dict(response.json())
        got.pop("meta")
        return got

    me = {"resourceType": "Patient", "id": pid}
    assert read(f"/Patient/{pid}", "name.family,gender") == {
        **me, "name": [{"family": "Kurz"}], "gender": "female"}  # nothing left: left out
    assert read(f"/Patient/{pid}", "Patient.name.given,contact.name.family") == {
        **me, "name": [{"given": ["Ada"]}, {"given": ["Addy"]}],
        "contact": [{"name": {"family": "Lang"}}]}
    assert read(f"/Patient/{pid}", "name.family,name")["name"][1] == {"given": ["Addy"]}
    # an Observation's mandatory elements come along (search.html#elements), as asked
    obs_me = {"resourceType": "Observation", "id": obs, "status": "final"}
    assert read(f"/Observation/{obs}", "value.value,code.coding.code") == {
        **obs_me, "code": {"coding": [{"code": "8867-4"}]}, "valueQuantity": {"value": 72}}
    assert read(f"/Observation/{obs}", "valueQuantity.unit,component.value[x].value") == {
        **obs_me, "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}],
                           "text": "heart rate"},
        "valueQuantity": {"unit": "/min"}, "component": [{"valueQuantity": {"value": 1}}]}
    # elements of another type: this one whole (and not tagged SUBSETTED)
    whole = client.get(f"/Patient/{pid}", params={"_elements": "Observation.code"}).json()
    assert whole["contact"][0]["gender"] == "male" and "tag" not in whole["meta"]
    bundle = client.get("/Observation", params={
        "_id": obs, "_include": "Observation:subject",
        "_elements": "Observation.code.text,Patient.gender"}).json()
    shown = {e["resource"]["resourceType"]: e["resource"] for e in bundle["entry"]}
    assert shown["Observation"]["code"] == {"text": "heart rate"}
    assert "valueQuantity" not in shown["Observation"]
    assert shown["Patient"]["gender"] == "female" and "name" not in shown["Patient"]
    for bad in ("name..family", "name.", ".name", "name.Family"):
        refused = client.get(f"/Patient/{pid}", params={"_elements": bad})
        assert (refused.status_code, gw_code(refused)) == (400, "GW-1013"), bad


def test_summary_keeps_the_summary_elements_of_backbone_elements(client: httpx.Client) -> None:
    # Observation.component is a summary element; its interpretation and its
    # referenceRange are not (and a Questionnaire's nested items are its items)
    bp = {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]}
    created = post(client, {
        "resourceType": "Observation", "status": "final", "code": bp,
        "component": [{
            "code": bp, "valueQuantity": {"value": 120, "unit": "mm[Hg]"},
            "interpretation": [{"text": "normal"}],
            "referenceRange": [{"text": "90-140"}],
        }],
    }).json()
    summary = client.get(f"/Observation/{created['id']}", params={"_summary": "true"}).json()
    assert summary["component"] == [{"code": bp,
                                     "valueQuantity": {"value": 120, "unit": "mm[Hg]"}}]
    assert summary["code"] == bp  # a data type's value is kept whole
    asked = post(client, {
        "resourceType": "Questionnaire", "status": "active",
        "item": [{"linkId": "1", "type": "group", "text": "Anamnese",
                  "item": [{"linkId": "1.1", "type": "string", "text": "Beschwerden"}]}],
    }).json()
    summary = client.get(f"/Questionnaire/{asked['id']}", params={"_summary": "true"}).json()
    assert "item" not in summary  # not a summary element of Questionnaire
    data = client.get(f"/Questionnaire/{asked['id']}", params={"_summary": "data"}).json()
    assert data["item"][0]["item"][0]["linkId"] == "1.1"  # data keeps everything but text


def _fhirpath_patch(*operations: dict[str, Any]) -> dict[str, Any]:
    def part(name: str, value: Any) -> dict[str, Any]:
        if isinstance(value, list):
            return {"name": name, "part": value}
        key = {"type": "valueCode", "path": "valueString", "name": "valueString",
               "index": "valueInteger", "source": "valueInteger",
               "destination": "valueInteger"}.get(name)
        if key is None:  # value: (value[x] key, value)
            return {"name": name, value[0]: value[1]}
        return {"name": name, key: value}

    return {"resourceType": "Parameters", "parameter": [
        {"name": "operation", "part": [part(k, v) for k, v in op.items()]}
        for op in operations]}


def test_fhirpath_patch(client: httpx.Client) -> None:
    body = patient(unique("mrn"), family="Alt")
    body["name"].append({"family": "Zweit"})
    body["telecom"] = [{"system": "phone", "value": "030 1"},
                       {"system": "email", "value": "a@example.org"}]
    body["deceasedBoolean"] = False
    body.pop("birthDate", None)
    rid = post(client, body).json()["id"]
    patch = _fhirpath_patch(
        {"type": "replace", "path": "Patient.name[0].family", "value": ("valueString", "Neu")},
        {"type": "add", "path": "Patient", "name": "birthDate",
         "value": ("valueDate", "1970-01-01")},
        {"type": "add", "path": "Patient", "name": "telecom", "value": [
            {"name": "system", "valueCode": "fax"}, {"name": "value", "valueString": "030 9"}]},
        {"type": "delete", "path": "Patient.telecom.where(system = 'email')"},
        {"type": "insert", "path": "Patient.identifier", "index": 0,
         "value": ("valueIdentifier", {"system": "urn:test:other", "value": "1"})},
        {"type": "move", "path": "Patient.name", "source": 1, "destination": 0},
        {"type": "replace", "path": "Patient.deceased",
         "value": ("valueDateTime", "2020-02-02")},
    )
    response = client.patch(f"/Patient/{rid}", json=patch,
                            headers={"Content-Type": FHIR, "If-Match": 'W/"1"'})
    assert response.status_code == 200, response.text
    got = response.json()
    assert [n["family"] for n in got["name"]] == ["Zweit", "Neu"]
    assert got["birthDate"] == "1970-01-01"
    assert got["telecom"] == [{"system": "phone", "value": "030 1"},
                              {"system": "fax", "value": "030 9"}]
    assert got["identifier"][0] == {"system": "urn:test:other", "value": "1"}
    assert got["deceasedDateTime"] == "2020-02-02" and "deceasedBoolean" not in got
    assert got["meta"]["versionId"] == "2"
    assert client.get(f"/Patient/{rid}/_history").json()["entry"][0]["request"][
        "method"] == "PATCH"


def test_fhirpath_patch_errors(client: httpx.Client) -> None:
    rid = post(client, patient(unique("mrn"))).json()["id"]
    path = f"/Patient/{rid}"

    def send(*ops: dict[str, Any]) -> httpx.Response:
        return client.patch(path, json=_fhirpath_patch(*ops), headers={"Content-Type": FHIR})

    for ops in (
        [{"type": "replace", "path": "Patient.nickname", "value": ("valueString", "x")}],
        [{"type": "add", "path": "Patient", "name": "gender",
          "value": ("valueCode", "female")},
         {"type": "add", "path": "Patient", "name": "gender",
          "value": ("valueCode", "male")}],  # does not repeat
        [{"type": "frobnicate", "path": "Patient.name"}],
        [{"type": "replace", "path": "Patient.name.given.exists()",
          "value": ("valueBoolean", True)}],
        [{"type": "insert", "path": "Patient.name", "index": 7,
          "value": ("valueHumanName", {"family": "X"})}],
    ):
        response = send(*ops)
        assert response.status_code == 400 and gw_code(response) == "GW-1016", ops
    invalid = send({"type": "replace", "path": "Patient.gender",
                    "value": ("valueCode", "robot")})
    assert invalid.status_code == 422  # the patched resource fails validation
    not_parameters = client.patch(path, json=[], headers={"Content-Type": FHIR})
    assert not_parameters.status_code == 415
    assert client.get(path).json()["meta"]["versionId"] == "1"


def test_a_fhirpath_patch_of_any_shape_is_answered_400(client: httpx.Client) -> None:
    """A ``Parameters`` whose ``parameter`` or an operation's ``part`` is no list, or
    whose path holds an integer FHIRPath does not have (Python reads no more than
    4,300 digits as one): 400 GW-1016, nothing written."""
    path = f"/Patient/{post(client, patient(unique('mrn'))).json()['id']}"
    huge = "1" * 5000
    for body in (
        {"resourceType": "Parameters", "parameter": True},
        {"resourceType": "Parameters", "parameter": "operation"},
        {"resourceType": "Parameters", "parameter": [{"name": "operation", "part": -1}]},
        {"resourceType": "Parameters", "parameter": [{"name": "operation", "part": {
            "name": "type", "valueCode": "delete"}}]},
        _fhirpath_patch({"type": "delete", "path": f"Patient.name[{huge}]"}),
        _fhirpath_patch({"type": "delete", "path": "Patient.name[2147483648]"}),
        _fhirpath_patch({"type": "delete", "path": f"Patient.name.where(family = {huge})"}),
    ):
        response = client.patch(path, json=body, headers={"Content-Type": FHIR})
        assert (response.status_code, gw_code(response)) == (400, "GW-1016"), \
            (str(body)[:200], response.text[:500])
    assert client.get(path).json()["meta"]["versionId"] == "1"


def test_a_fhirpath_patch_examines_a_bounded_number_of_elements(client: httpx.Client) -> None:
    """Each operation's path walks the lists it names: 100 operations, each over the
    20,000 telecoms of a patient, took 11 s of the event loop, and 300 took 32 s (a
    PATCH is not cancelled when it takes longer than a search may). Together the paths
    of one patch examine at most a million elements (about a second): 413 GW-1011
    beyond, nothing written; an ordinary patch of the same resource is applied."""
    many = [{"system": "phone", "value": str(i)} for i in range(20_000)]
    made = post(client, {"resourceType": "Patient", "telecom": many})
    assert made.status_code == 201, made.text[:500]
    path = f"/Patient/{made.json()['id']}"
    where = "Patient.telecom.where(value = 'zz' or system = 'x' or value = 'y')"
    started = time.monotonic()
    costly = client.patch(path, json=_fhirpath_patch(*[{"type": "delete", "path": where}] * 100),
                          headers={"Content-Type": FHIR})
    took = time.monotonic() - started
    assert costly.status_code == 413, (took, costly.text[:300])
    assert gw_code(costly) == "GW-1011"
    assert "examine more than 1000000 elements" in costly.json()["issue"][0]["diagnostics"]
    assert took < 5, took
    assert client.get(path).json()["meta"]["versionId"] == "1"
    ordinary = client.patch(path, json=_fhirpath_patch(
        {"type": "delete", "path": "Patient.telecom.where(value = '19999')"},
        {"type": "replace", "path": "Patient.telecom[0].value", "value": ("valueString", "x")}),
        headers={"Content-Type": FHIR})
    assert ordinary.status_code == 200, ordinary.text[:500]
    telecom = ordinary.json()["telecom"]
    assert len(telecom) == 19_999 and telecom[0]["value"] == "x"


def test_fhirpath_patch_in_a_transaction(client: httpx.Client) -> None:
    rid = post(client, patient(unique("mrn"), family="Vorher")).json()["id"]
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": _fhirpath_patch({"type": "replace", "path": "Patient.name.first().family",
                                      "value": ("valueString", "Nachher")}),
         "request": {"method": "PATCH", "url": f"Patient/{rid}"}}]}
    response = client.post("", json=bundle, headers={"Content-Type": FHIR})
    assert response.status_code == 200, response.text
    assert client.get(f"/Patient/{rid}").json()["name"][0]["family"] == "Nachher"


def test_elements_do_not_cut_what_a_search_includes(client: httpx.Client) -> None:
    """search.html#elements: "The list of elements does not apply to included
    resources": an included Patient comes whole beside the cut matches, unless an
    element is named with its type (``Patient.gender``)."""
    patient = {"resourceType": "Patient", "gender": "female", "birthDate": "1950-01-02",
               "name": [{"family": unique("Inc")}]}
    pid = post(client, patient).json()["id"]
    post(client, {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                  "subject": {"reference": f"Patient/{pid}"}, "valueString": "v"})

    def entries(elements: str) -> dict[str, dict[str, Any]]:
        found = client.get("/Observation", params={
            "subject": f"Patient/{pid}", "_include": "Observation:subject",
            "_elements": elements})
        assert found.status_code == 200, found.text
        return {e["search"]["mode"]: e["resource"] for e in found.json()["entry"]}

    plain = entries("code")
    assert "valueString" not in plain["match"] and plain["match"]["code"] == {"text": "x"}
    included = plain["include"]
    assert {k: included[k] for k in patient} == patient
    assert "tag" not in included.get("meta", {})
    typed = entries("code,Patient.gender")["include"]
    assert typed["gender"] == "female" and "birthDate" not in typed
