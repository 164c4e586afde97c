"""batch and transaction Bundles: http.html#transaction, bundle.html#transaction."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.fhir import references
from tests.api.helpers import FHIR, gw_code, patient, post, search_ids
from tests.conftest import unique


def urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def tx(entries: list[dict[str, Any]], kind: str = "transaction") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": entries}


def entry_locations(response: httpx.Response) -> list[str]:
    return [e["response"]["location"] for e in response.json()["entry"]]


def id_in(location: str, resource_type: str) -> str:
    """The id in ``…/[type]/[id]/_history/[vid]``."""
    return location.split(f"/{resource_type}/")[1].split("/")[0]


def send(client: httpx.Client, bundle: dict[str, Any], **headers: str) -> httpx.Response:
    return client.post("/", json=bundle, headers={"Content-Type": FHIR, **headers})


#: the R4 ``instant`` type (datatypes.html#instant)
INSTANT = re.compile(r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)-(0[1-9]|1[0-2])-"
                     r"(0[1-9]|[1-2][0-9]|3[0-1])T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)"
                     r"(\.[0-9]+)?(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))")


def test_response_entries_carry_last_modified_as_an_instant(client: httpx.Client) -> None:
    p = urn()
    written = send(client, tx([
        {"fullUrl": p, "resource": patient(unique("mrn")),
         "request": {"method": "POST", "url": "Patient"}},
    ])).json()["entry"][0]["response"]
    assert INSTANT.fullmatch(written["lastModified"]), written
    stored = client.get(written["location"]).json()
    assert written["lastModified"] == stored["meta"]["lastUpdated"]
    # batch entries run as requests of their own: their times are the versions' too,
    # to the millisecond (not the whole seconds of a Last-Modified header)
    batch = send(client, tx([
        {"request": {"method": "GET", "url": f"Patient/{stored['id']}"}},
        {"resource": patient(unique("mrn")), "request": {"method": "POST", "url": "Patient"}},
        {"resource": {**stored, "active": True},
         "request": {"method": "PUT", "url": f"Patient/{stored['id']}"}},
    ], "batch")).json()["entry"]
    assert batch[0]["response"]["lastModified"] == stored["meta"]["lastUpdated"]
    for entry in batch[1:]:
        response = entry["response"]
        assert INSTANT.fullmatch(response["lastModified"]), response
        assert response["lastModified"] == entry["resource"]["meta"]["lastUpdated"], entry


def test_relative_references_to_an_entry_named_by_its_full_url(client: httpx.Client) -> None:
    """bundle.html#references: a relative reference is read against the base of its
    entry's fullUrl; naming a created entry, it becomes that entry's new id."""
    base = "http://hospital.example.org/fhir"
    bundle = tx([
        {"fullUrl": f"{base}/Patient/tmp-1", "resource": {**patient(unique("mrn")), "id": "tmp-1"},
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": f"{base}/Observation/tmp-2",
         "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                      "subject": {"reference": "Patient/tmp-1"}},
         "request": {"method": "POST", "url": "Observation"}},
        {"fullUrl": urn(),  # a relative reference here means this server's Patient/tmp-1
         "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "y"},
                      "subject": {"reference": "Patient/tmp-1"}},
         "request": {"method": "POST", "url": "Observation"}},
    ])
    response = send(client, bundle)
    assert response.status_code == 200, response.text
    locations = entry_locations(response)
    pid = id_in(locations[0], "Patient")
    assert pid != "tmp-1"
    assert client.get(locations[1]).json()["subject"] == {"reference": f"Patient/{pid}"}
    assert client.get(locations[2]).json()["subject"] == {"reference": "Patient/tmp-1"}


def test_full_urls_of_many_bases_are_read_once(client: httpx.Client,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Each entry with a base of its own: the names by base are gathered in one pass
    (4,000 such entries took 72 s when every base looked at every name)."""
    calls = 0
    split = references.split_restful

    def counted(url: str) -> tuple[str, str] | None:
        nonlocal calls
        calls += 1
        return split(url)

    monkeypatch.setattr(references, "split_restful", counted)
    n = 200
    bundle = tx([
        {"fullUrl": f"http://h{i}.example.org/fhir/Patient/p{i}",
         "resource": {**patient(unique("mrn")), "id": f"p{i}",
                      "link": [{"type": "seealso",
                                "other": {"reference": f"Patient/p{(i + 1) % n}"}}]},
         "request": {"method": "POST", "url": "Patient"}} for i in range(n)])
    response = send(client, bundle)
    assert response.status_code == 200, response.text
    locations = entry_locations(response)
    # a relative reference is read against its own entry's base: p1 is under another
    assert client.get(locations[0]).json()["link"][0]["other"] == {"reference": "Patient/p1"}
    assert calls <= 3 * n


def test_transaction_rewrites_urn_uuid_references(client: httpx.Client) -> None:
    mrn = unique("mrn")
    p, e = urn(), urn()
    obs = [{
        "fullUrl": urn(),
        "resource": {"resourceType": "Observation", "status": "final",
                     "code": {"text": f"obs-{i}"}, "subject": {"reference": p},
                     "encounter": {"reference": e}},
        "request": {"method": "POST", "url": "Observation"},
    } for i in range(3)]
    bundle = tx([
        *obs,
        {"fullUrl": e, "resource": {"resourceType": "Encounter", "status": "finished",
                                    "class": {"code": "IMP"}, "subject": {"reference": p}},
         "request": {"method": "POST", "url": "Encounter"}},
        {"fullUrl": p, "resource": {**patient(mrn), "text": {
            "status": "generated",
            "div": f'<div xmlns="http://www.w3.org/1999/xhtml"><a href="{e}">stay</a></div>'}},
         "request": {"method": "POST", "url": "Patient"}},
    ])
    response = send(client, bundle)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["type"] == "transaction-response"
    assert [x["response"]["status"] for x in result["entry"]] == ["201 Created"] * 5
    locations = [x["response"]["location"] for x in result["entry"]]
    patient_id = id_in(locations[4], "Patient")
    encounter_id = id_in(locations[3], "Encounter")
    for loc in locations[:3]:
        o = client.get(loc).json()
        assert o["subject"]["reference"] == f"Patient/{patient_id}"
        assert o["encounter"]["reference"] == f"Encounter/{encounter_id}"
    stored = client.get(f"/Patient/{patient_id}").json()
    assert f'href="Encounter/{encounter_id}"' in stored["text"]["div"]
    assert search_ids(client, "/Observation", subject=f"Patient/{patient_id}").__len__() == 3


def test_transaction_is_all_or_nothing(client: httpx.Client) -> None:
    mrn = unique("mrn")
    bundle = tx([
        {"fullUrl": urn(), "resource": patient(mrn), "request": {"method": "POST",
                                                                 "url": "Patient"}},
        {"resource": {"resourceType": "Patient", "id": "a"},
         "request": {"method": "PUT", "url": "Patient/b"}},
    ])
    response = send(client, bundle)
    assert response.status_code == 400
    outcome = response.json()
    assert gw_code(response) == "GW-1005"
    assert "Bundle.entry[1]" in outcome["issue"][0]["diagnostics"]
    assert "Bundle.entry[1]" in outcome["issue"][0]["expression"]
    assert search_ids(client, "/Patient", identifier=f"urn:test:mrn|{mrn}") == []


def test_transaction_conditional_reference_and_identical_conditional_creates(
    client: httpx.Client,
) -> None:
    mrn = unique("mrn")
    existing = post(client, patient(mrn)).json()["id"]
    org_ident = unique("org")
    org_entry = {
        "fullUrl": urn(),
        "resource": {"resourceType": "Organization", "name": "Klinik",
                     "identifier": [{"system": "urn:test:org", "value": org_ident}]},
        "request": {"method": "POST", "url": "Organization",
                    "ifNoneExist": f"identifier=urn:test:org|{org_ident}"},
    }
    # the twin writes its criteria as a search URL: the same criteria, one resource
    twin = {**org_entry, "fullUrl": urn(), "request": {
        "method": "POST", "url": "Organization",
        "ifNoneExist": f"Organization?identifier=urn:test:org|{org_ident}"}}
    bundle = tx([
        org_entry, twin,
        {"fullUrl": urn(), "resource": {
            "resourceType": "EpisodeOfCare", "status": "active",
            "patient": {"reference": f"Patient?identifier=urn:test:mrn|{mrn}"},
            "managingOrganization": {"reference": twin["fullUrl"]}},
         "request": {"method": "POST", "url": "EpisodeOfCare"}},
    ])
    response = send(client, bundle)
    assert response.status_code == 200, response.text
    orgs = search_ids(client, "/Organization", identifier=f"urn:test:org|{org_ident}")
    assert len(orgs) == 1
    episode_loc = response.json()["entry"][2]["response"]["location"]
    episode = client.get(episode_loc).json()
    assert episode["patient"]["reference"] == f"Patient/{existing}"
    assert episode["managingOrganization"]["reference"] == f"Organization/{orgs[0]}"
    # sending the same Bundle again creates no second Organization
    again = send(client, bundle)
    assert again.status_code == 200
    assert again.json()["entry"][0]["response"]["status"] == "200 OK"
    assert len(search_ids(client, "/Organization", identifier=f"urn:test:org|{org_ident}")) == 1


def test_conditional_reference_to_a_conditional_create_in_the_same_bundle(
    client: httpx.Client,
) -> None:
    """Synthea's shape: the Bundle brings the Organization it refers to by identifier
    (``ifNoneExist``), and its entries name it by that search. The reference names
    the resource the conditional create found or made."""
    ident = f"https://github.com/synthetichealth/synthea|{unique('org')}"
    criteria = f"identifier={ident}"

    def bundle() -> dict[str, Any]:
        return tx([
            {"fullUrl": urn(), "resource": {"resourceType": "Encounter", "status": "finished",
                                            "class": {"code": "AMB"},
                                            "serviceProvider": {
                                                "reference": f"Organization?{criteria}"}},
             "request": {"method": "POST", "url": "Encounter"}},
            {"fullUrl": urn(), "resource": {
                "resourceType": "Organization", "name": "Klinikum",
                "identifier": [{"system": ident.split("|")[0], "value": ident.split("|")[1]}]},
             # the same criteria, written otherwise (encoded, as a search URL)
             "request": {"method": "POST", "url": "Organization",
                         "ifNoneExist": f"Organization?identifier={ident.replace('|', '%7C')}"}},
        ])

    first = send(client, bundle())
    assert first.status_code == 200, first.text
    enc, org = entry_locations(first)
    org_id = id_in(org, "Organization")
    assert first.json()["entry"][1]["response"]["status"].startswith("201")
    encounter = client.get(f"/Encounter/{id_in(enc, 'Encounter')}").json()
    assert encounter["serviceProvider"]["reference"] == f"Organization/{org_id}"
    # again: the Organization exists now; the reference names it, nothing new is made
    again = send(client, bundle())
    assert again.status_code == 200, again.text
    enc2, org2 = entry_locations(again)
    assert id_in(org2, "Organization") == org_id
    assert again.json()["entry"][1]["response"]["status"].startswith("200")
    encounter = client.get(f"/Encounter/{id_in(enc2, 'Encounter')}").json()
    assert encounter["serviceProvider"]["reference"] == f"Organization/{org_id}"
    assert search_ids(client, "/Organization", identifier=ident) == [org_id]


def test_unresolvable_conditional_reference_fails_the_transaction(client: httpx.Client) -> None:
    bundle = tx([{
        "fullUrl": urn(),
        "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                     "subject": {"reference": f"Patient?identifier=urn:test:mrn|{unique()}"}},
        "request": {"method": "POST", "url": "Observation"},
    }])
    response = send(client, bundle)
    assert response.status_code == 412
    assert gw_code(response) == "GW-3003"


def test_transaction_order_delete_post_put_get(client: httpx.Client) -> None:
    mrn = unique("mrn")
    doomed = post(client, patient(unique("mrn"))).json()["id"]
    rid = unique("pat")
    bundle = tx([
        {"request": {"method": "GET", "url": f"Patient?identifier=urn:test:mrn|{mrn}"}},
        {"resource": patient(mrn, id=rid), "request": {"method": "PUT",
                                                      "url": f"Patient/{rid}"}},
        {"request": {"method": "DELETE", "url": f"Patient/{doomed}"}},
    ])
    response = send(client, bundle)
    assert response.status_code == 200, response.text
    entries = response.json()["entry"]
    # the GET ran after the writes: it sees the PUT's resource
    assert entries[0]["response"]["status"] == "200 OK"
    assert entries[0]["resource"]["total"] == 1
    assert entries[1]["response"]["status"] == "201 Created"
    assert entries[2]["response"]["status"] == "204 No Content"
    assert client.get(f"/Patient/{doomed}").status_code == 410


def test_transaction_reads_run_inside_it(client: httpx.Client) -> None:
    """A GET entry sees what the Bundle wrote; a failing GET fails the Bundle and
    nothing is written."""
    mrn = unique("mrn")
    rid = unique("pat")
    bundle = tx([
        {"request": {"method": "GET", "url": f"Patient/{rid}"}},
        {"request": {"method": "GET", "url": f"Patient/{rid}/_history"}},
        {"resource": patient(mrn, id=rid), "request": {"method": "PUT",
                                                      "url": f"Patient/{rid}"}},
    ])
    response = send(client, bundle)
    assert response.status_code == 200, response.text
    read, history, _put = response.json()["entry"]
    assert read["resource"]["id"] == rid and read["response"]["etag"] == 'W/"1"'
    assert history["resource"]["total"] == 1

    other = unique("mrn")
    failing = tx([
        {"resource": patient(other), "request": {"method": "POST", "url": "Patient"}},
        {"request": {"method": "GET", "url": f"Patient/{unique('missing')}"}},
    ])
    response = send(client, failing)
    assert response.status_code == 404
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert "Bundle.entry[1]" in outcome["issue"][0]["expression"]
    assert search_ids(client, "/Patient", identifier=f"urn:test:mrn|{other}") == []


def test_transaction_entries_touching_one_resource_conflict(client: httpx.Client) -> None:
    rid = unique("pat")
    bundle = tx([
        {"resource": patient(unique(), id=rid), "request": {"method": "PUT",
                                                           "url": f"Patient/{rid}"}},
        {"request": {"method": "DELETE", "url": f"Patient/{rid}"}},
    ])
    response = send(client, bundle)
    assert response.status_code == 409
    assert gw_code(response) == "GW-3004"
    assert client.get(f"/Patient/{rid}").status_code == 404


def test_a_conditional_create_that_finds_may_name_what_another_entry_updates(
        client: httpx.Client) -> None:
    """A conditional create that finds its resource writes nothing, so it does not
    overlap an update or patch of that resource (http.html#trules names the
    identities of conditional updates and deletes); it answers with the version
    before them. Beside a deletion of it, it is still refused."""
    mrn = unique("mrn")
    found = post(client, patient(mrn)).json()
    rid = found["id"]
    changed = {**found, "gender": "female"}
    response = send(client, tx([
        {"resource": patient(mrn), "request": {
            "method": "POST", "url": "Patient", "ifNoneExist": f"identifier=urn:test:mrn|{mrn}"}},
        {"resource": changed, "request": {"method": "PUT", "url": f"Patient/{rid}"}},
    ]))
    assert response.status_code == 200, response.text
    first, second = response.json()["entry"]
    assert first["response"]["status"].startswith("200")
    assert first["response"]["location"].endswith(f"/Patient/{rid}/_history/1")
    assert second["response"]["etag"] == 'W/"2"'
    assert client.get(f"/Patient/{rid}").json()["gender"] == "female"
    assert search_ids(client, "/Patient", identifier=f"urn:test:mrn|{mrn}") == [rid]
    refused = send(client, tx([
        {"request": {"method": "DELETE", "url": f"Patient/{rid}"}},
        {"resource": patient(mrn), "request": {
            "method": "POST", "url": "Patient", "ifNoneExist": f"identifier=urn:test:mrn|{mrn}"}},
    ]))
    assert (refused.status_code, gw_code(refused)) == (409, "GW-3004"), refused.text
    assert client.get(f"/Patient/{rid}").status_code == 200


def test_transaction_prefer_representation_returns_resources(client: httpx.Client) -> None:
    bundle = tx([{"fullUrl": urn(), "resource": patient(unique()),
                  "request": {"method": "POST", "url": "Patient"}}])
    response = send(client, bundle, Prefer="return=representation")
    entry = response.json()["entry"][0]
    assert entry["resource"]["resourceType"] == "Patient"
    assert entry["resource"]["meta"]["versionId"] == "1"


def test_prefer_operation_outcome_gives_each_entry_its_outcome(client: httpx.Client) -> None:
    """bundle.html: with ``Prefer: return=OperationOutcome`` each entry's
    ``response.outcome`` tells what happened (the resource is not returned)."""
    rid = post(client, patient(unique("mrn"))).json()["id"]
    for kind in ("transaction", "batch"):
        bundle = tx([
            {"resource": patient(unique("mrn")), "request": {"method": "POST", "url": "Patient"}},
            {"request": {"method": "DELETE", "url": f"Patient/{rid}"}},
        ], kind)
        response = send(client, bundle, Prefer="return=OperationOutcome")
        assert response.status_code == 200, response.text
        entries = response.json()["entry"]
        for entry in entries:
            assert "resource" not in entry, (kind, entry)
        created = entries[0]["response"]
        assert created["status"].startswith("201")
        assert created["outcome"]["resourceType"] == "OperationOutcome"
        assert created["outcome"]["issue"][0]["severity"] == "information"


def test_batch_runs_entries_independently(client: httpx.Client) -> None:
    mrn = unique("mrn")
    bundle = tx([
        {"resource": patient(mrn), "request": {"method": "POST", "url": "Patient"}},
        {"request": {"method": "GET", "url": f"Patient/{unique('missing')}"}},
        {"resource": {"resourceType": "Patient", "id": "a"},
         "request": {"method": "PUT", "url": "Patient/b"}},
    ], kind="batch")
    response = send(client, bundle)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["type"] == "batch-response"
    statuses = [e["response"]["status"] for e in result["entry"]]
    # the code and its reason phrase, as HTTP writes them (and HAPI answers)
    assert statuses == ["201 Created", "404 Not Found", "400 Bad Request"]
    assert result["entry"][2]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert len(search_ids(client, "/Patient", identifier=f"urn:test:mrn|{mrn}")) == 1


def test_bundle_with_too_many_entries_is_413(client: httpx.Client, server) -> None:  # type: ignore[no-untyped-def]
    n = server.settings.max_bundle_entries + 1
    bundle = tx([{"request": {"method": "GET", "url": "metadata"}}] * n, kind="batch")
    response = send(client, bundle)
    assert response.status_code == 413
    assert gw_code(response) == "GW-1012"


def test_malformed_bundles_are_rejected_clearly(client: httpx.Client) -> None:
    cases = [
        tx([{"resource": patient(unique())}]),  # no request
        tx([{"request": {"method": "FETCH", "url": "Patient"}}]),
        tx([{"request": {"method": "POST", "url": "Patient/1"}, "resource": patient("x")}]),
        tx([{"request": {"method": "POST", "url": "http://elsewhere.example/fhir/Patient"},
             "resource": patient("x")}]),
        {"resourceType": "Bundle", "type": "transaction", "entry": {"not": "a list"}},
    ]
    for bundle in cases:
        response = send(client, bundle)
        assert response.status_code == 400, response.text
        assert response.json()["resourceType"] == "OperationOutcome"


def test_canonical_values_are_not_rewritten(client: httpx.Client) -> None:
    """http.html#trules: "Elements of type canonical are not replaced", and a fullUrl
    that is not a placeholder is an identity where a uri holds it: a ValueSet sent
    under its canonical URL keeps its ``url``, and what names it by that URL (a
    profile, a binding) still does; a reference to it is made local."""
    lib = urn()
    vs_url = f"http://example.org/fhir/ValueSet/{unique('vs')}"
    vs_id = vs_url.rsplit("/", 1)[1]
    bundle = tx([
        {"fullUrl": urn(), "resource": {
            "resourceType": "PlanDefinition", "status": "draft",
            "library": [lib, f"{lib}|1.0"]},
         "request": {"method": "POST", "url": "PlanDefinition"}},
        {"fullUrl": lib, "resource": {"resourceType": "Library", "status": "draft",
                                      "type": {"text": "logic-library"}},
         "request": {"method": "POST", "url": "Library"}},
        {"fullUrl": vs_url, "resource": {
            "resourceType": "ValueSet", "id": vs_id, "url": vs_url, "status": "active",
            "compose": {"include": [{"system": "urn:test:cs", "concept": [{"code": "y"}]}]}},
         "request": {"method": "PUT", "url": f"ValueSet/{vs_id}"}},
        {"fullUrl": urn(), "resource": {
            "resourceType": "Questionnaire", "status": "active", "url": vs_url + "-q",
            "item": [{"linkId": "1", "type": "choice", "answerValueSet": vs_url}]},
         "request": {"method": "POST", "url": "Questionnaire"}},
        {"fullUrl": urn(), "resource": {
            "resourceType": "List", "status": "current", "mode": "working",
            "entry": [{"item": {"reference": vs_url}}]},
         "request": {"method": "POST", "url": "List"}},
    ])
    response = send(client, bundle)
    assert response.status_code == 200, response.text
    locations = entry_locations(response)
    plan = client.get(locations[0]).json()
    assert plan["library"] == [lib, f"{lib}|1.0"]
    assert client.get(f"/ValueSet/{vs_id}").json()["url"] == vs_url
    assert client.get("/ValueSet", params={"url": vs_url}).json()["total"] == 1
    questionnaire = client.get(locations[3]).json()
    assert questionnaire["item"][0]["answerValueSet"] == vs_url
    assert client.get(locations[4]).json()["entry"][0]["item"] == {
        "reference": f"ValueSet/{vs_id}"}


def test_only_elements_that_name_resources_are_rewritten(client: httpx.Client) -> None:
    """http.html#trules: references, uri/url/oid/uuid values and narrative links are
    rewritten; a string that holds an entry's fullUrl (an identifier minted from it,
    a note) is data and stays as it was sent."""
    doc = urn()
    narrative = (f'<div xmlns="http://www.w3.org/1999/xhtml"><a href="{doc}">the letter</a>'
                 "</div>")
    bundle = tx([
        {"fullUrl": doc, "resource": {
            "resourceType": "DocumentReference", "status": "current",
            "masterIdentifier": {"system": "urn:ietf:rfc:3986", "value": doc},
            "identifier": [{"system": "urn:ietf:rfc:3986", "value": doc}],
            "description": doc,
            "content": [{"attachment": {"contentType": "text/plain", "url": doc,
                                        "title": doc}}]},
         "request": {"method": "POST", "url": "DocumentReference"}},
        {"fullUrl": urn(), "resource": {
            "resourceType": "Communication", "status": "completed",
            "text": {"status": "generated", "div": narrative},
            "payload": [{"contentString": doc}, {"contentReference": {"reference": doc}}],
            "instantiatesUri": [doc],
            "extension": [{"url": "urn:test:link", "valueUri": doc},
                          {"url": "urn:test:note", "valueString": doc}]},
         "request": {"method": "POST", "url": "Communication"}},
    ])
    response = send(client, bundle)
    assert response.status_code == 200, response.text
    locations = entry_locations(response)
    letter = f"DocumentReference/{id_in(locations[0], 'DocumentReference')}"
    stored = client.get(locations[0]).json()
    assert stored["masterIdentifier"]["value"] == doc
    assert stored["identifier"][0]["value"] == doc
    assert stored["description"] == doc
    assert stored["content"][0]["attachment"]["url"] == letter  # url
    assert stored["content"][0]["attachment"]["title"] == doc  # string
    sent = client.get(locations[1]).json()
    assert sent["payload"] == [{"contentString": doc}, {"contentReference": {"reference": letter}}]
    assert sent["instantiatesUri"] == [letter]
    assert sent["extension"] == [{"url": "urn:test:link", "valueUri": letter},
                                 {"url": "urn:test:note", "valueString": doc}]
    assert f'href="{letter}"' in sent["text"]["div"]
    # the identifier is still what a client searches by
    assert search_ids(client, "/DocumentReference", identifier=f"urn:ietf:rfc:3986|{doc}") == \
        [letter.split("/")[1]]


def test_transaction_json_patch_entry_as_binary(client: httpx.Client) -> None:
    import base64
    import json

    rid = post(client, patient(unique("mrn"))).json()["id"]
    ops = [{"op": "replace", "path": "/gender", "value": "male"}]
    bundle = tx([{
        "resource": {"resourceType": "Binary", "contentType": "application/json-patch+json",
                     "data": base64.b64encode(json.dumps(ops).encode()).decode()},
        "request": {"method": "PATCH", "url": f"Patient/{rid}"},
    }])
    response = send(client, bundle)
    assert response.status_code == 200, response.text
    assert client.get(f"/Patient/{rid}").json()["gender"] == "male"


def test_conditional_create_with_a_stored_value_set(client: httpx.Client) -> None:
    url, group = f"urn:test:vs:{unique()}", f"Group/{unique('g')}"
    post(client, {"resourceType": "ValueSet", "url": url, "status": "active",
                  "compose": {"include": [{"system": "urn:test:cs", "concept": [{"code": "a"}]}]}})
    condition = {"resourceType": "Condition", "subject": {"reference": group},
                 "code": {"coding": [{"system": "urn:test:cs", "code": "a"}]}}
    criteria = f"subject={group}&code:in={url}"
    first = post(client, condition, **{"If-None-Exist": criteria})
    assert first.status_code == 201, first.text
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": condition,
         "request": {"method": "POST", "url": "Condition", "ifNoneExist": criteria}}]}
    again = client.post("", json=bundle, headers={"Content-Type": FHIR})
    assert again.status_code == 200, again.text
    assert again.json()["entry"][0]["response"]["status"].startswith("200")
    assert search_ids(client, "/Condition", subject=group) == [first.json()["id"]]


def test_entry_urls_whose_search_values_are_urls(client: httpx.Client) -> None:
    """A system in a search value is a URL (``identifier=http://…|1``): the entry's URL is
    still a relative one of this server, in a conditional update, a conditional delete
    and a batch search alike; a leading slash is relative to the base as well."""
    system = f"http://hospital.example.org/{unique('mrn')}"
    criteria = f"identifier={system}|1"
    body = {"resourceType": "Patient", "identifier": [{"system": system, "value": "1"}]}
    made = send(client, tx([{"resource": body,
                             "request": {"method": "PUT", "url": f"Patient?{criteria}"}}]))
    assert made.status_code == 200, made.text
    assert made.json()["entry"][0]["response"]["status"] == "201 Created"
    found = send(client, tx([
        {"request": {"method": "GET", "url": f"Patient?{criteria}"}},
        {"request": {"method": "GET", "url": f"/Patient?{criteria}"}},
    ], kind="batch")).json()
    assert [e["resource"]["total"] for e in found["entry"]] == [1, 1]
    gone = send(client, tx([{"request": {"method": "DELETE", "url": f"Patient?{criteria}"}}]))
    assert gone.status_code == 200, gone.text
    assert search_ids(client, "/Patient", identifier=f"{system}|1") == []
    # an absolute URL of another server is still refused
    elsewhere = send(client, tx([{"request": {
        "method": "GET", "url": f"http://elsewhere.example/fhir/Patient?{criteria}"}}]))
    assert elsewhere.status_code == 400 and gw_code(elsewhere) == "GW-1018"


def test_an_operation_in_a_transaction(client: httpx.Client) -> None:
    """An operation invoked by POST with its Parameters (the R4 example transaction
    has ``POST ValueSet/$lookup``) is answered in its entry, after the writes, inside
    the transaction; in a batch too."""
    held = json.loads((Path(__file__).parents[2] / "profiles/CodeSystem-care-level.json")
                      .read_text(encoding="utf-8"))
    lookup = {"resource": {"resourceType": "Parameters", "parameter": [
        {"name": "system", "valueUri": held["url"]},
        {"name": "code", "valueCode": held["concept"][0]["code"]}]},
        "request": {"method": "POST", "url": "CodeSystem/$lookup"}}
    family = unique("Op")
    for kind in ("transaction", "batch"):
        response = send(client, tx([
            {"fullUrl": urn(), "resource": patient(unique("mrn"), family=family),
             "request": {"method": "POST", "url": "Patient"}},
            lookup,
            {"request": {"method": "GET", "url": f"Patient?family={family}"}},
        ], kind=kind))
        assert response.status_code == 200, response.text
        entries = response.json()["entry"]
        assert [e["response"]["status"] for e in entries] == [
            "201 Created", "200 OK", "200 OK"], kind
        answer = {p["name"]: p for p in entries[1]["resource"]["parameter"]}
        assert answer["display"]["valueString"] == held["concept"][0]["display"]
    # an operation that fails fails the transaction
    wrong = {**lookup, "resource": {"resourceType": "Parameters", "parameter": [
        {"name": "system", "valueUri": held["url"]}, {"name": "code", "valueCode": "nope"}]}}
    failed = send(client, tx([{"fullUrl": urn(), "resource": patient(unique("mrn"),
                                                                     family=family),
                               "request": {"method": "POST", "url": "Patient"}}, wrong]))
    assert failed.status_code >= 400 and failed.json()["resourceType"] == "OperationOutcome"
    assert len(search_ids(client, "/Patient", family=family)) == 2  # not a third


def test_a_batch_answers_a_malformed_entry_in_that_entry(client: httpx.Client) -> None:
    """A batch's entries stand alone (bundle.html#batch): an entry without a request,
    with an unknown method or with another server's URL is a 400 in its own entry; the
    others run. In a transaction such an entry fails the Bundle."""
    entries = [
        {"request": {"method": "GET", "url": "http://elsewhere.example/fhir/Patient"}},
        {"request": {"method": "GET", "url": "metadata"}},
        {"resource": patient(unique("mrn"))},
        {"request": {"method": "FETCH", "url": "Patient"}},
        {"resource": patient(unique("mrn")), "request": {"method": "POST", "url": "Patient"}},
    ]
    response = send(client, tx(entries, kind="batch"))
    assert response.status_code == 200, response.text
    answered = response.json()["entry"]
    assert [e["response"]["status"] for e in answered] == [
        "400 Bad Request", "200 OK", "400 Bad Request", "400 Bad Request", "201 Created"]
    for i in (0, 2, 3):
        outcome = answered[i]["response"]["outcome"]
        assert outcome["issue"][0]["details"]["coding"][0]["code"] == "GW-1018"
        assert outcome["issue"][0]["diagnostics"].startswith(f"Bundle.entry[{i}]")
    assert send(client, tx(entries)).status_code == 400


def test_a_version_specific_full_url_is_refused(client: httpx.Client) -> None:
    """bdl-8: "fullUrl cannot be a version specific reference": a transaction with
    such an entry is refused, naming the entry; in a batch that entry alone is."""
    base = str(client.base_url).rstrip("/")
    rid = unique("v8")
    versioned = {"fullUrl": f"{base}/Patient/{rid}/_history/5",
                 "resource": {**patient(unique("mrn")), "id": rid},
                 "request": {"method": "PUT", "url": f"Patient/{rid}"}}
    fine = {"fullUrl": urn(), "resource": patient(unique("mrn")),
            "request": {"method": "POST", "url": "Patient"}}
    refused = send(client, tx([fine, versioned]))
    assert refused.status_code == 400, refused.text
    assert gw_code(refused) == "GW-1018"
    issue = refused.json()["issue"][0]
    assert issue["diagnostics"].startswith("Bundle.entry[1]") and "bdl-8" in issue["diagnostics"]
    assert "Bundle.entry[1].fullUrl" in issue["expression"]
    assert client.get(f"/Patient/{rid}").status_code == 404
    response = send(client, tx([fine, versioned], kind="batch"))
    assert response.status_code == 200, response.text
    answered = response.json()["entry"]
    assert [e["response"]["status"] for e in answered] == ["201 Created", "400 Bad Request"]
    outcome = answered[1]["response"]["outcome"]
    assert outcome["issue"][0]["details"]["coding"][0]["code"] == "GW-1018"
    assert client.get(f"/Patient/{rid}").status_code == 404


def test_conditional_reads_in_a_batch(client: httpx.Client) -> None:
    """``request.ifNoneMatch`` and ``request.ifModifiedSince`` (an ``instant``,
    not an HTTP date) make a batch's read conditional, as the headers do."""
    stored = post(client, patient(unique("mrn"))).json()
    url = f"Patient/{stored['id']}"
    last = stored["meta"]["lastUpdated"]
    statuses = [e["response"]["status"] for e in send(client, tx([
        {"request": {"method": "GET", "url": url, "ifNoneMatch": 'W/"1"'}},
        {"request": {"method": "GET", "url": url, "ifNoneMatch": 'W/"2"'}},
        {"request": {"method": "GET", "url": url, "ifModifiedSince": last}},
        {"request": {"method": "GET", "url": url, "ifModifiedSince": "2999-01-01T00:00:00+01:00"}},
        {"request": {"method": "GET", "url": url, "ifModifiedSince": "2001-01-01T00:00:00Z"}},
        {"request": {"method": "GET", "url": url, "ifModifiedSince": "not a time"}},
        # instants beyond the last HTTP date (10000-01-01 in UTC) and before 1970
        {"request": {"method": "GET", "url": url,
                     "ifModifiedSince": "9999-12-31T23:59:59-12:00"}},
        {"request": {"method": "GET", "url": url,
                     "ifModifiedSince": "0001-01-01T00:00:00+14:00"}},
        {"request": {"method": "GET", "url": url,
                     "ifModifiedSince": "0050-01-01T00:00:00Z"}},
    ], "batch")).json()["entry"]]
    assert statuses == ["304 Not Modified", "200 OK", "304 Not Modified",
                        "304 Not Modified", "200 OK", "200 OK",
                        "304 Not Modified", "200 OK", "200 OK"]


def test_a_head_entry_answers_without_the_resource(client: httpx.Client) -> None:
    stored = post(client, patient(unique("mrn"))).json()
    url = f"Patient/{stored['id']}"
    for kind in ("batch", "transaction"):
        head, get = send(client, tx([{"request": {"method": "HEAD", "url": url}},
                                     {"request": {"method": "GET", "url": url}}],
                                    kind)).json()["entry"]
        assert head["response"]["status"] == "200 OK", kind
        assert head["response"]["etag"] == 'W/"1"'
        assert "resource" not in head
        assert get["resource"]["id"] == stored["id"]
    gone = f"Patient/{unique('no')}"
    (missing,) = send(client, tx([{"request": {"method": "HEAD", "url": gone}}],
                                 "batch")).json()["entry"]
    assert missing["response"]["status"] == "404 Not Found"
    assert missing["response"]["outcome"]["resourceType"] == "OperationOutcome"


def test_a_full_url_names_one_entry(client: httpx.Client) -> None:
    """http.html#trules: a resource appears in a transaction once; bdl-7: a fullUrl is
    unique in a Bundle. Otherwise a reference to it would be bound to one of the
    entries by chance (HAPI FHIR refuses such a Bundle, HAPI-0534)."""
    twice, mrn = urn(), unique("mrn")
    entries = [
        {"fullUrl": twice, "resource": patient(mrn, "First"),
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": twice, "resource": patient(mrn, "Second"),
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": urn(), "resource": {"resourceType": "Observation", "status": "final",
                                        "code": {"text": "x"}, "subject": {"reference": twice}},
         "request": {"method": "POST", "url": "Observation"}},
    ]
    for kind in ("transaction", "batch"):
        response = send(client, tx(entries, kind))
        assert response.status_code == 400, response.text
        assert gw_code(response) == "GW-1017"
        assert "Bundle.entry[0] and Bundle.entry[1]" in response.text
    assert search_ids(client, "/Patient", identifier=f"urn:test:mrn|{mrn}") == []
    # bdl-7 lets a batch carry two versions of one resource under one fullUrl
    pid = unique("p")
    versions = [{"fullUrl": f"http://example.org/fhir/Patient/{pid}",
                 "resource": {**patient(mrn), "id": pid, "meta": {"versionId": v}},
                 "request": {"method": "PUT", "url": f"Patient/{pid}"}} for v in ("1", "2")]
    response = send(client, tx(versions, "batch"))
    assert response.status_code == 200, response.text
    assert [e["response"]["status"][:3] for e in response.json()["entry"]] == ["201", "200"]


def test_a_full_url_is_a_uri_that_agrees_with_the_entry(client: httpx.Client) -> None:
    pid = unique("p")
    for full_url, status in [("not a uri", 400), ("", 400),
                             (f"http://example.org/fhir/Patient/other-{pid}", 400),
                             (f"http://example.org/fhir/Observation/{pid}", 400),
                             (f"http://example.org/fhir/Patient/{pid}", 200)]:
        response = send(client, tx([{"fullUrl": full_url,
                                     "resource": {**patient(unique("mrn")), "id": pid},
                                     "request": {"method": "PUT", "url": f"Patient/{pid}"}}]))
        assert response.status_code == status, (full_url, response.text)
        if status == 400:
            assert gw_code(response) == "GW-1018"
            assert response.json()["issue"][0]["expression"] == ["Bundle.entry[0].fullUrl"]
    # in a batch, only that entry is refused
    response = send(client, tx([
        {"fullUrl": "not a uri", "resource": patient(unique("mrn")),
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": patient(unique("mrn")), "request": {"method": "POST", "url": "Patient"}},
    ], "batch"))
    assert [e["response"]["status"][:3] for e in response.json()["entry"]] == ["400", "201"]


def test_a_placeholder_that_names_no_entry_fails_the_transaction(client: httpx.Client) -> None:
    """A ``urn:uuid:`` reference is a name the transaction gives one of its entries;
    one that names none would be stored pointing nowhere (HAPI FHIR: HAPI-0541,
    "Unable to satisfy placeholder ID")."""
    mrn = unique("mrn")
    response = send(client, tx([
        {"fullUrl": urn(), "resource": patient(mrn),
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": urn(), "resource": {
            "resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "subject": {"reference": urn()}},
         "request": {"method": "POST", "url": "Observation"}},
    ]))
    assert response.status_code == 400, response.text
    assert gw_code(response) == "GW-1018"
    assert response.json()["issue"][0]["expression"][:2] == ["Bundle.entry[1]",
                                                             "Observation.subject"]
    assert search_ids(client, "/Patient", identifier=f"urn:test:mrn|{mrn}") == []
    # a document Bundle stored by the transaction keeps its own entries' names
    comp, pat = urn(), urn()
    document = {"resourceType": "Bundle", "type": "document",
                "identifier": {"system": "urn:ietf:rfc:3986", "value": urn()},
                "timestamp": "2026-11-25T10:00:00Z", "entry": [
                    {"fullUrl": comp, "resource": {
                        "resourceType": "Composition", "status": "final",
                        "type": {"text": "letter"}, "date": "2026-11-25", "title": "letter",
                        "subject": {"reference": pat},
                        "author": [{"display": "Dr. Muster"}]}},
                    {"fullUrl": pat, "resource": patient(unique("mrn"))}]}
    response = send(client, tx([{"fullUrl": urn(), "resource": document,
                                 "request": {"method": "POST", "url": "Bundle"}}]))
    assert response.status_code == 200, response.text


def test_batch_entries_cannot_refer_to_what_another_creates(client: httpx.Client) -> None:
    """http.html#brules: references from one batch entry to a resource another one
    creates are "non-conformant": the entry is refused, the rest run."""
    p = urn()
    response = send(client, tx([
        {"fullUrl": p, "resource": patient(unique("mrn")),
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                      "subject": {"reference": p}},
         "request": {"method": "POST", "url": "Observation"}},
    ], "batch"))
    assert response.status_code == 200, response.text
    first, second = response.json()["entry"]
    assert first["response"]["status"].startswith("201")
    assert second["response"]["status"].startswith("400")
    outcome = second["response"]["outcome"]
    assert outcome["issue"][0]["details"]["coding"][0]["code"] == "GW-1018"
    assert "Bundle.entry[0]" in outcome["issue"][0]["diagnostics"]


def test_a_history_bundle_is_taken_as_the_latest_state_of_each_resource(
        client: httpx.Client) -> None:
    """http.html#other-bundles: "servers SHOULD accept a history Bundle", for copying
    from one server to another; each resource as the newest of its entries leaves it,
    under its own id, so that references keep their meaning."""
    run = unique("h")
    origin = "http://origin.example/fhir"
    kept, gone, obs = f"{run}-kept", f"{run}-gone", f"{run}-obs"

    def version(method: str, rtype: str, rid: str, n: int, **content: Any) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "fullUrl": f"{origin}/{rtype}/{rid}",
            "request": {"method": method, "url": rtype if method == "POST" else f"{rtype}/{rid}"},
            "response": {"status": "201 Created" if method == "POST" else "200 OK"}}
        if method != "DELETE":
            entry["resource"] = {"resourceType": rtype, "id": rid,
                                 "meta": {"versionId": str(n)}, **content}
        return entry

    history = {"resourceType": "Bundle", "type": "history", "entry": [  # newest first
        version("PUT", "Patient", kept, 2, name=[{"family": "Neu"}]),
        version("DELETE", "Patient", gone, 2),
        version("POST", "Observation", obs, 1, status="final", code={"text": "x"},
                subject={"reference": f"{origin}/Patient/{kept}"}),
        version("POST", "Patient", gone, 1, name=[{"family": "Weg"}]),
        version("POST", "Patient", kept, 1, name=[{"family": "Alt"}]),
    ]}
    response = send(client, history)
    assert response.status_code == 200, response.text
    assert response.json()["type"] == "transaction-response"
    assert client.get(f"/Patient/{kept}").json()["name"] == [{"family": "Neu"}]
    assert client.get(f"/Patient/{gone}").status_code in (404, 410)
    observation = client.get(f"/Observation/{obs}").json()
    assert observation["subject"] == {"reference": f"Patient/{kept}"}
    # this server's own history goes back in as it came out
    own = client.get(f"/Patient/{kept}/_history").json()
    again = send(client, own)
    assert again.status_code == 200, again.text
    assert client.get(f"/Patient/{kept}").json()["name"] == [{"family": "Neu"}]
    # an entry without what it wrote is refused, naming it
    broken = {"resourceType": "Bundle", "type": "history", "entry": [
        version("PUT", "Patient", kept, 3, name=[{"family": "X"}]),
        {"fullUrl": f"{origin}/Patient/x", "resource": {"resourceType": "Patient"},
         "request": {"method": "POST", "url": "Patient"}}]}
    refused = send(client, broken)
    assert refused.status_code == 400 and gw_code(refused) == "GW-1018"
    assert "Bundle.entry[1]" in refused.text


def test_an_operation_that_writes_is_part_of_the_transaction(client: httpx.Client) -> None:
    """``$meta-add`` in a transaction Bundle writes in the Bundle's transaction: it
    commits with the other entries, and a failing entry undoes it too (it used to
    commit the transaction itself: a 500, with its changes kept)."""
    pid = post(client, patient(unique("mrn"))).json()["id"]
    system = "urn:test:tx-meta"

    def meta_add(code: str) -> dict[str, Any]:
        return {"request": {"method": "POST", "url": f"Patient/{pid}/$meta-add"},
                "resource": {"resourceType": "Parameters", "parameter": [
                    {"name": "meta", "valueMeta": {"tag": [{"system": system,
                                                            "code": code}]}}]}}

    mrn = unique("mrn")
    done = send(client, tx([{"resource": patient(mrn), "request": {"method": "POST",
                                                                 "url": "Patient"}},
                            meta_add("kept")]))
    assert done.status_code == 200, done.text
    assert done.json()["entry"][1]["response"]["status"].startswith("200")
    tags = client.get(f"/Patient/{pid}").json()["meta"].get("tag", [])
    assert {"system": system, "code": "kept"} in tags
    assert len(search_ids(client, "/Patient", identifier=f"urn:test:mrn|{mrn}")) == 1
    # (reads and operations run after the writes, in the Bundle's order: the failing
    # read comes after the operation has written)
    failed = send(client, tx([meta_add("undone"), {
        "request": {"method": "GET", "url": f"Patient/{unique('missing')}"}}]))
    assert failed.status_code == 404, failed.text
    tags = client.get(f"/Patient/{pid}").json()["meta"].get("tag", [])
    assert {"system": system, "code": "undone"} not in tags


def test_conditional_writes_with_the_same_criteria_write_one_resource(
        client: httpx.Client) -> None:
    """Two conditional updates with the same criteria, or a conditional update and a
    conditional create, name one resource: written twice in one Bundle, a conflict
    (409, as any two entries writing one resource), not two resources that make every
    later conditional write on those criteria fail."""
    mrn = unique("mrn")
    url = f"Patient?identifier=urn:test:mrn|{mrn}"
    twice = [{"resource": patient(mrn), "request": {"method": "PUT", "url": url}}] * 2
    with_create = [twice[0], {"resource": patient(mrn), "request": {
        "method": "POST", "url": "Patient", "ifNoneExist": url.partition("?")[2]}}]
    for entries in (twice, with_create, with_create[::-1]):
        refused = send(client, tx(entries))
        assert (refused.status_code, gw_code(refused)) == (409, "GW-3004"), refused.text
        assert search_ids(client, "/Patient", identifier=f"urn:test:mrn|{mrn}") == []
    one = send(client, tx(twice[:1]))
    assert one.status_code == 200, one.text
    assert len(search_ids(client, "/Patient", identifier=f"urn:test:mrn|{mrn}")) == 1


def test_criteria_naming_an_entry_search_with_its_id(client: httpx.Client) -> None:
    """A fullUrl in an entry's criteria (``ifNoneExist``, a conditional update's URL,
    a conditional reference) is replaced by the id that entry was given, as HAPI
    FHIR does: the same Bundle sent twice finds what it wrote the first time."""
    mrn = unique("mrn")
    code = "http://loinc.org|8867-4"

    def bundle() -> dict[str, Any]:
        p, o = urn(), urn()

        def obs(loinc: str) -> dict[str, Any]:
            return {"resourceType": "Observation", "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": loinc}]},
                    "subject": {"reference": p}}

        return tx([
            # the entries that name the Patient come first: they wait for it
            {"fullUrl": o, "resource": obs("8867-4"), "request": {
                "method": "POST", "url": "Observation",
                "ifNoneExist": f"subject={p}&code={code}"}},
            {"resource": obs("8310-5"), "request": {
                "method": "PUT", "url": f"Observation?subject={p.replace(':', '%3A')}"
                                        "&code=http://loinc.org|8310-5"}},
            {"resource": {"resourceType": "Provenance", "recorded": "2026-01-01T00:00:00Z",
                          "target": [{"reference": f"Observation?code={code}&subject={p}"}],
                          "agent": [{"who": {"display": "loader"}}]},
             "request": {"method": "POST", "url": "Provenance"}},
            {"fullUrl": p, "resource": patient(mrn), "request": {
                "method": "POST", "url": "Patient",
                "ifNoneExist": f"identifier=urn:test:mrn|{mrn}"}},
        ])

    first = send(client, bundle())
    assert first.status_code == 200, first.text
    assert [e["response"]["status"][:3] for e in first.json()["entry"]] == ["201"] * 4
    again = send(client, bundle())
    assert again.status_code == 200, again.text
    assert [e["response"]["status"][:3] for e in again.json()["entry"]] == \
        ["200", "200", "201", "200"]
    pid = search_ids(client, "/Patient", identifier=f"urn:test:mrn|{mrn}")
    assert len(pid) == 1
    observations = client.get("/Observation", params={"subject": f"Patient/{pid[0]}"}).json()
    assert observations["total"] == 2
    target = id_in(first.json()["entry"][0]["response"]["location"], "Observation")
    provenances = client.get("/Provenance", params={"target": f"Observation/{target}"}).json()
    assert provenances["total"] == 2


def test_a_bundle_written_in_a_transaction_is_stored_as_sent(client: httpx.Client) -> None:
    """A document posted as an entry of a transaction keeps its own names: its
    fullUrls and references, even one equal to another entry's fullUrl, and a
    conditional reference in it, are not rewritten (as ``POST /Bundle`` keeps them)."""
    p = urn()
    document = {"resourceType": "Bundle", "type": "document",
                "identifier": {"system": "urn:test:doc", "value": unique("doc")},
                "timestamp": "2026-01-01T00:00:00Z", "entry": [
                    {"fullUrl": "urn:uuid:0c3b7f3e-0000-4000-8000-000000000001", "resource": {
                        "resourceType": "Composition", "status": "final",
                        "type": {"text": "letter"}, "date": "2026-01-01", "title": "t",
                        "subject": {"reference": p},
                        "author": [{"reference": "Practitioner?identifier=urn:test|none"}]}},
                    {"fullUrl": p, "resource": {"resourceType": "Patient", "id": "inner"}}]}
    sent = json.loads(json.dumps(document))
    written = send(client, tx([
        {"fullUrl": p, "resource": patient(unique("mrn")),
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": document, "request": {"method": "POST", "url": "Bundle"}}]))
    assert written.status_code == 200, written.text
    stored = client.get(written.json()["entry"][1]["response"]["location"]).json()
    assert stored["entry"] == sent["entry"]


def test_a_conditional_reference_outside_a_transaction_is_resolved(
        client: httpx.Client) -> None:
    """A conditional reference in a resource created or updated alone, or in a batch
    entry, names the one resource it matches, as in a transaction (and as HAPI FHIR
    resolves them by default); none or several: 412. Stored as sent it could never be
    searched by or followed."""
    npi = unique("npi")
    gp = post(client, {"resourceType": "Practitioner",
                       "identifier": [{"system": "urn:test:npi", "value": npi}]}).json()
    ref = {"reference": f"Practitioner?identifier=urn:test:npi|{npi}"}
    alone = post(client, patient(unique("mrn"), generalPractitioner=[ref]))
    assert alone.status_code == 201, alone.text
    assert alone.json()["generalPractitioner"] == [{"reference": f"Practitioner/{gp['id']}"}]
    updated = client.put(f"/Patient/{alone.json()['id']}", json={
        **alone.json(), "generalPractitioner": [ref, ref]}, headers={"Content-Type": FHIR})
    assert updated.status_code == 200, updated.text
    assert updated.json()["generalPractitioner"] == [
        {"reference": f"Practitioner/{gp['id']}"}] * 2
    batch = send(client, tx([{"resource": patient(unique("mrn"), generalPractitioner=[ref]),
                              "request": {"method": "POST", "url": "Patient"}}], "batch"))
    assert batch.status_code == 200, batch.text
    stored = client.get(batch.json()["entry"][0]["response"]["location"]).json()
    assert stored["generalPractitioner"] == [{"reference": f"Practitioner/{gp['id']}"}]
    nowhere = post(client, patient(unique("mrn"), generalPractitioner=[
        {"reference": "Practitioner?identifier=urn:test:npi|none"}]))
    assert (nowhere.status_code, gw_code(nowhere)) == (412, "GW-3003"), nowhere.text
    # no criteria at all is no reference to store, alone or in a transaction
    for empty in ("Practitioner?", "Practitioner?_count=1"):
        refused = post(client, patient(unique("mrn"), generalPractitioner=[
            {"reference": empty}]))
        assert (refused.status_code, gw_code(refused)) == (400, "GW-1021"), refused.text
        in_tx = send(client, tx([{"resource": patient(unique("mrn"), generalPractitioner=[
            {"reference": empty}]), "request": {"method": "POST", "url": "Patient"}}]))
        assert (in_tx.status_code, gw_code(in_tx)) == (400, "GW-1021"), in_tx.text


# -- entries of the wrong shape ---------------------------------------------------------

#: an entry's request elements of another JSON type than the string Bundle.entry.request
#: defines, urls urllib cannot read, a fullUrl that is no string: each with the element
#: the answer names
MALFORMED_ENTRIES: list[tuple[dict[str, Any], str]] = [
    ({"request": {"method": {}, "url": "Patient"}}, "request"),
    ({"request": {"method": [], "url": "Patient"}}, "request"),
    ({"request": {"method": ["GET"], "url": "Patient"}}, "request"),
    ({"request": {"method": "GET", "url": "//["}}, "request.url"),
    ({"request": {"method": "GET", "url": "//]/Patient"}}, "request.url"),
    ({"request": {"method": "DELETE", "url": "//[::1/Patient?identifier=x"}}, "request.url"),
    ({"resource": {"resourceType": "Patient"},
      "request": {"method": "POST", "url": "Patient", "ifNoneExist": {"identifier": "x"}}},
     "request.ifNoneExist"),
    ({"resource": {"resourceType": "Patient", "id": "x"},
      "request": {"method": "PUT", "url": "Patient/x", "ifMatch": ['W/"1"']}},
     "request.ifMatch"),
    ({"resource": {"resourceType": "Patient"},
      "request": {"method": "POST", "url": "Patient", "ifNoneMatch": 1}},
     "request.ifNoneMatch"),
    ({"request": {"method": "GET", "url": "Patient", "ifModifiedSince": {}}},
     "request.ifModifiedSince"),
    ({"fullUrl": {"urn": "uuid"}, "resource": {"resourceType": "Patient"},
      "request": {"method": "POST", "url": "Patient"}}, "fullUrl"),
    ({"fullUrl": 1, "resource": {"resourceType": "Patient"},
      "request": {"method": "POST", "url": "Patient"}}, "fullUrl"),
]


@pytest.mark.parametrize(("bad", "element"), MALFORMED_ENTRIES,
                         ids=[f"{i}-{e}" for i, (_, e) in enumerate(MALFORMED_ENTRIES)])
def test_a_malformed_entry_is_a_400_for_that_entry_of_a_batch(
        client: httpx.Client, bad: dict[str, Any], element: str) -> None:
    """A batch answers the entry with 400 GW-1018 naming it (not a server error); the
    other entries run. A conditional header of another type than a string is refused,
    not ignored: ignored, a conditional write would be a plain one."""
    mrn = unique("mrn")
    response = send(client, tx([
        {"resource": patient(mrn), "request": {"method": "POST", "url": "Patient"}},
        bad,
        {"request": {"method": "GET", "url": f"Patient?identifier={mrn}"}},
    ], "batch"))
    assert response.status_code == 200, response.text
    created, refused, found = response.json()["entry"]
    assert created["response"]["status"].startswith("201"), created
    assert refused["response"]["status"].startswith("400"), refused
    outcome = refused["response"]["outcome"]
    assert outcome["issue"][0]["details"]["coding"][0]["code"] == "GW-1018", outcome
    assert outcome["issue"][0]["expression"] == [f"Bundle.entry[1].{element}"], outcome
    assert found["resource"]["total"] == 1, found


@pytest.mark.parametrize(("bad", "element"), MALFORMED_ENTRIES,
                         ids=[f"{i}-{e}" for i, (_, e) in enumerate(MALFORMED_ENTRIES)])
def test_a_malformed_entry_fails_a_transaction_with_a_400_naming_it(
        client: httpx.Client, bad: dict[str, Any], element: str) -> None:
    mrn = unique("mrn")
    response = send(client, tx([
        {"resource": patient(mrn), "request": {"method": "POST", "url": "Patient"}}, bad]))
    assert (response.status_code, gw_code(response)) == (400, "GW-1018"), response.text
    issue = response.json()["issue"][0]
    assert issue["expression"] == [f"Bundle.entry[1].{element}"], issue
    assert issue["diagnostics"].startswith("Bundle.entry[1]: "), issue
    assert search_ids(client, "/Patient", identifier=mrn) == []


def test_a_placeholder_where_a_primitive_extension_object_belongs_is_refused_as_invalid(
        client: httpx.Client) -> None:
    """``_gender`` holds the id and extensions of ``gender``, an object: a string there
    naming an entry (``urn:uuid:…``) is no reference to rewrite; it stays as it is, and
    validation refuses it (422), as it refuses it sent alone."""
    p = urn()
    mrn = unique("mrn")
    response = send(client, tx([
        {"fullUrl": p, "resource": patient(mrn, _gender=p),
         "request": {"method": "POST", "url": "Patient"}}]))
    assert (response.status_code, gw_code(response)) == (422, "GW-4002"), response.text
    found = {(i["details"]["coding"][0]["code"], e) for i in response.json()["issue"]
             for e in i.get("expression", [])}
    assert ("GW-4202", "Patient._gender") in found, response.text
    assert search_ids(client, "/Patient", identifier=mrn) == []
    alone = post(client, patient(mrn, _gender=p))
    assert (alone.status_code, gw_code(alone)) == (422, "GW-4002"), alone.text


def test_a_fhirpath_patch_whose_parameter_is_no_array_is_a_400(client: httpx.Client) -> None:
    """``Parameters.parameter`` (and an operation's ``part``) is an array: anything else
    is an invalid patch document (400 GW-1016), alone or in a batch."""
    rid = post(client, patient(unique("mrn"))).json()["id"]
    bodies = [
        {"resourceType": "Parameters", "parameter": True},
        {"resourceType": "Parameters", "parameter": {"name": "operation"}},
        {"resourceType": "Parameters", "parameter": [{"name": "operation", "part": 1}]},
    ]
    for body in bodies:
        alone = client.patch(f"/Patient/{rid}", json=body, headers={"Content-Type": FHIR})
        assert (alone.status_code, gw_code(alone)) == (400, "GW-1016"), alone.text
        batch = send(client, tx([{"resource": body, "request": {
            "method": "PATCH", "url": f"Patient/{rid}"}}], "batch"))
        assert batch.status_code == 200, batch.text
        answer = batch.json()["entry"][0]["response"]
        assert answer["status"].startswith("400"), answer
        assert answer["outcome"]["issue"][0]["details"]["coding"][0]["code"] == "GW-1016"
