"""``Composition/$document`` (composition-operation-document.html): a document Bundle
made from a stored Composition and everything it refers to."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx

from tests.api.helpers import gw_code
from tests.profiles.helpers import EXAMPLES

DISCHARGE_BUNDLE = "https://carepath-gateway.org/fhir/StructureDefinition/discharge-bundle"


def _store_letter(client: httpx.Client) -> tuple[str, dict[str, Any]]:
    """The discharge letter example, its resources stored one by one (a transaction);
    the Composition's id and the letter."""
    letter = json.loads((EXAMPLES / "valid" / "Bundle-discharge-letter.json").read_text())
    entries = []
    for entry in letter["entry"]:
        resource = {k: v for k, v in entry["resource"].items() if k != "id"}
        entries.append({"fullUrl": entry["fullUrl"], "resource": resource,
                        "request": {"method": "POST", "url": resource["resourceType"]}})
    stored = client.post("/", json={"resourceType": "Bundle", "type": "transaction",
                                    "entry": entries})
    assert stored.status_code == 200, stored.text
    location = stored.json()["entry"][0]["response"]["location"]
    return location.split("/")[-3], letter


def _unresolved(document: dict[str, Any], base: str) -> list[str]:
    """References in the document that name no entry of it (bundle.html#references)."""
    held = {e["fullUrl"] for e in document["entry"]}
    out = []
    for ref in re.findall(r'"reference": "([^"]+)"', json.dumps(document)):
        absolute = ref if ref.startswith("http") else f"{base}/{ref.split('/_history')[0]}"
        if absolute not in held:
            out.append(ref)
    return out


def test_a_stored_discharge_letter_comes_back_as_a_valid_document(
        client: httpx.Client) -> None:
    cid, letter = _store_letter(client)
    answer = client.get(f"/Composition/{cid}/$document")
    assert answer.status_code == 200, answer.text
    document = answer.json()
    assert document["type"] == "document"
    assert document["identifier"]["system"] == "urn:ietf:rfc:3986"
    assert document["identifier"]["value"].startswith("urn:uuid:")
    assert document["timestamp"]
    kinds = [e["resource"]["resourceType"] for e in document["entry"]]
    assert kinds[0] == "Composition" and document["entry"][0]["resource"]["id"] == cid
    # every resource of the letter, once, each under its URL on this server
    assert sorted(kinds) == sorted(e["resource"]["resourceType"] for e in letter["entry"])
    base = str(client.base_url).rstrip("/")
    for entry in document["entry"]:
        resource = entry["resource"]
        assert entry["fullUrl"] == f"{base}/{resource['resourceType']}/{resource['id']}"
        assert set(entry) == {"fullUrl", "resource"}  # no search or request (bdl-3, bdl-4)
    assert _unresolved(document, base) == []
    # the gateway's own profile of a discharge letter holds
    checked = client.post("/Bundle/$validate", json=document,
                          params={"profile": DISCHARGE_BUNDLE})
    errors = [i for i in checked.json()["issue"] if i["severity"] in ("error", "fatal")]
    assert errors == []
    # each call is a new document
    again = client.get(f"/Composition/{cid}/$document").json()
    assert again["identifier"] != document["identifier"]
    # by POST, and at type level by id or by the Composition's URL here
    for answer in (client.post(f"/Composition/{cid}/$document",
                               json={"resourceType": "Parameters"}),
                   client.get("/Composition/$document", params={"id": cid}),
                   client.post("/Composition/$document", json={
                       "resourceType": "Parameters",
                       "parameter": [{"name": "id", "valueUri": f"{base}/Composition/{cid}"}]})):
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["entry"]) == len(document["entry"])


def test_references_are_followed_to_their_end_and_versions_kept(client: httpx.Client) -> None:
    def create(body: dict[str, Any]) -> str:
        made = client.post(f"/{body['resourceType']}", json=body)
        assert made.status_code == 201, made.text
        return str(made.json()["id"])

    parent = create({"resourceType": "Organization", "name": "Klinikverbund"})
    clinic = create({"resourceType": "Organization", "name": "Herzklinik",
                     "partOf": {"reference": f"Organization/{parent}"}})
    doctor = create({"resourceType": "Practitioner", "name": [{"family": "Hansen"}]})
    patient = create({"resourceType": "Patient", "name": [{"family": "Muster"}],
                      "managingOrganization": {"reference": f"Organization/{clinic}"}})
    seen = create({"resourceType": "Observation", "status": "final", "code": {"text": "BP"},
                   "subject": {"reference": f"Patient/{patient}"},
                   "performer": [{"reference": f"Practitioner/{doctor}"}]})
    gone = create({"resourceType": "Condition", "subject": {"reference": f"Patient/{patient}"},
                   "code": {"text": "old"}})
    assert client.delete(f"/Condition/{gone}").status_code in (200, 204)
    # the Observation as first written, then changed
    changed = client.get(f"/Observation/{seen}").json()
    changed["status"] = "amended"
    assert client.put(f"/Observation/{seen}", json=changed).status_code == 200
    cid = create({
        "resourceType": "Composition", "status": "final", "type": {"text": "letter"},
        "date": "2026-11-24", "title": "Brief",
        "subject": {"reference": f"Patient/{patient}"},
        "author": [{"reference": f"Practitioner/{doctor}"}],
        "custodian": {"reference": f"Organization/{clinic}"},
        "section": [{"title": "Befunde", "entry": [
            {"reference": f"Observation/{seen}/_history/1"},
            {"reference": f"Condition/{gone}"},
            {"reference": "http://elsewhere.example/fhir/Observation/1"},
            {"reference": "Observation/never-written"}]}],
    })
    document = client.get(f"/Composition/{cid}/$document").json()
    held = [(e["resource"]["resourceType"], e["resource"]["id"]) for e in document["entry"]]
    # breadth first: what the Composition names, then what those name (the parent
    # organisation only through the clinic)
    assert held == [("Composition", cid), ("Patient", patient), ("Practitioner", doctor),
                    ("Organization", clinic), ("Observation", seen), ("Organization", parent)]
    observation = document["entry"][4]["resource"]
    assert observation["meta"]["versionId"] == "1" and observation["status"] == "final"
    # deleted, unknown and other servers' resources are not in it
    assert _unresolved(document, str(client.base_url).rstrip("/")) == [
        f"Condition/{gone}", "http://elsewhere.example/fhir/Observation/1",
        "Observation/never-written"]


def test_persist_stores_the_document(client: httpx.Client) -> None:
    cid, _ = _store_letter(client)
    made = client.post(f"/Composition/{cid}/$document", params={"persist": "true"})
    assert made.status_code == 201, made.text
    location = made.headers["Location"]
    bundle_id = made.json()["id"]
    assert f"/Bundle/{bundle_id}/_history/1" in location
    stored = client.get(f"/Bundle/{bundle_id}").json()
    assert stored["type"] == "document" and stored["entry"][0]["resource"]["id"] == cid
    found = client.get("/Bundle", params={"composition": f"Composition/{cid}"}).json()
    assert [e["resource"]["id"] for e in found["entry"]] == [bundle_id]
    # not persisted unless asked
    client.get(f"/Composition/{cid}/$document", params={"persist": "false"})
    again = client.get("/Bundle", params={"composition": f"Composition/{cid}"}).json()
    assert again["total"] == 1


def test_what_cannot_be_made_into_a_document_says_why(client: httpx.Client) -> None:
    cid, _ = _store_letter(client)
    cases: list[tuple[str, dict[str, str], int, str]] = [
        ("/Composition/$document", {}, 400, "GW-1028"),
        ("/Composition/$document", {"id": "no-such-letter"}, 404, "GW-2001"),
        ("/Composition/$document", {"id": "http://elsewhere.example/fhir/Composition/1"},
         400, "GW-1028"),
        ("/Composition/$document", {"id": "Patient/1"}, 400, "GW-1028"),
        (f"/Composition/{cid}/$document", {"graph": "http://x.org/GraphDefinition/g"},
         400, "GW-1032"),
        (f"/Composition/{cid}/$document", {"persist": "maybe"}, 400, "GW-1028"),
        (f"/Composition/{cid}/$document", {"id": cid}, 400, "GW-1028"),
        ("/Patient/$document", {}, 404, "GW-1023"),
    ]
    for path, params, status, code in cases:
        answer = client.get(path, params=params)
        assert (answer.status_code, gw_code(answer)) == (status, code), (path, params)
    gone = client.delete(f"/Composition/{cid}")
    assert gone.status_code in (200, 204)
    assert client.get(f"/Composition/{cid}/$document").status_code == 410
