"""history (instance, type, system) and the CapabilityStatement."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import cast

import httpx

from tests.api.helpers import FHIR, gw_code, patient, post, put
from tests.conftest import unique


def test_instance_history_newest_first_with_paging(client: httpx.Client) -> None:
    created = post(client, patient(unique("mrn"))).json()
    for family in ("B", "C", "D"):
        created["name"][0]["family"] = family
        put(client, created)
    path = f"/Patient/{created['id']}/_history"
    page1 = client.get(path, params={"_count": 2}).json()
    assert page1["type"] == "history"
    assert page1["total"] == 4
    assert [e["resource"]["meta"]["versionId"] for e in page1["entry"]] == ["4", "3"]
    assert page1["entry"][0]["request"] == {"method": "PUT",
                                            "url": f"Patient/{created['id']}"}
    assert page1["entry"][0]["response"]["etag"] == 'W/"4"'
    # Bundle.entry.response.lastModified is an instant, the version's meta.lastUpdated
    for e in page1["entry"]:
        assert e["response"]["lastModified"] == e["resource"]["meta"]["lastUpdated"]
    next_url = next(link["url"] for link in page1["link"] if link["relation"] == "next")
    # a write between pages does not shift the next page
    created["name"][0]["family"] = "E"
    put(client, created)
    page2 = httpx.get(next_url, timeout=30).json()
    assert [e["resource"]["meta"]["versionId"] for e in page2["entry"]] == ["2", "1"]
    assert page2["entry"][-1]["request"] == {"method": "POST", "url": "Patient"}
    assert not any(link["relation"] == "next" for link in page2["link"])


def test_history_takes_an_offset_and_pages_on_from_it(client: httpx.Client) -> None:
    """``_offset`` skips versions, as a search's does (Medplum's client sends it for a
    history): the page starts there and its next link goes on by position."""
    created = post(client, patient(unique("mrn"))).json()
    for family in ("B", "C", "D", "E"):
        created["name"][0]["family"] = family
        put(client, created)
    path = f"/Patient/{created['id']}/_history"
    page = client.get(path, params={"_count": 2, "_offset": 2}).json()
    assert [e["resource"]["meta"]["versionId"] for e in page["entry"]] == ["3", "2"]
    assert page["total"] == 5
    next_url = next(link["url"] for link in page["link"] if link["relation"] == "next")
    assert "_offset" not in next_url
    last = httpx.get(next_url, timeout=30).json()
    assert [e["resource"]["meta"]["versionId"] for e in last["entry"]] == ["1"]
    beyond = client.get(path, params={"_offset": 9})
    assert beyond.status_code == 200 and "entry" not in beyond.json()
    typed = client.get("/Patient/_history", params={"_count": 1, "_offset": 1}).json()
    newest_two = client.get("/Patient/_history", params={"_count": 2}).json()
    assert [(e["fullUrl"], e["response"]["etag"]) for e in typed["entry"]] == [
        (e["fullUrl"], e["response"]["etag"]) for e in newest_two["entry"][1:]]
    for bad in ("-1", "x", "100000000"):
        refused = client.get(path, params={"_offset": bad})
        assert (refused.status_code, gw_code(refused)) == (400, "GW-1013"), refused.text


def test_history_of_update_as_create_answers_created(client: httpx.Client) -> None:
    rid = unique("pid")
    assert put(client, {"resourceType": "Patient", "id": rid}).status_code == 201
    assert put(client, {"resourceType": "Patient", "id": rid, "active": True}).status_code == 200
    assert client.delete(f"/Patient/{rid}").status_code in (200, 204)
    assert put(client, {"resourceType": "Patient", "id": rid}).status_code == 201
    entries = client.get(f"/Patient/{rid}/_history").json()["entry"]
    assert [(e["request"]["method"], e["response"]["status"]) for e in entries] == [
        ("PUT", "201 Created"), ("DELETE", "204 No Content"), ("PUT", "200 OK"),
        ("PUT", "201 Created")]


def test_type_and_system_history_and_since(client: httpx.Client) -> None:
    time.sleep(0.01)
    marker = client.get("/Patient", params={"_count": 0})  # any request
    assert marker.status_code == 200
    before = post(client, patient(unique("mrn"))).json()
    since = before["meta"]["lastUpdated"]
    time.sleep(0.005)
    org = post(client, {"resourceType": "Organization", "name": unique("org")}).json()
    typed = client.get("/Organization/_history", params={"_since": since}).json()
    assert org["id"] in [e["resource"]["id"] for e in typed["entry"]]
    assert all(e["resource"]["resourceType"] == "Organization" for e in typed["entry"])
    system = client.get("/_history", params={"_since": since, "_count": 1000}).json()
    ids = {(e["resource"]["resourceType"], e["resource"]["id"]) for e in system["entry"]}
    assert ("Organization", org["id"]) in ids
    assert ("Patient", before["id"]) in ids


def test_history_of_unknown_resource_is_404(client: httpx.Client) -> None:
    response = client.get(f"/Patient/{unique('none')}/_history")
    assert response.status_code == 404


def test_history_count_zero_answers_the_total_and_a_negative_count_is_refused(
        client: httpx.Client) -> None:
    created = post(client, patient(unique("mrn"))).json()
    put(client, created)
    path = f"/Patient/{created['id']}/_history"
    counted = client.get(path, params={"_count": 0})
    assert counted.status_code == 200
    assert counted.json()["total"] == 2 and not counted.json().get("entry")
    for bad in ("-1", "two"):
        refused = client.get(path, params={"_count": bad})
        assert refused.status_code == 400 and gw_code(refused) == "GW-1013"


def test_history_rejects_bad_since(client: httpx.Client) -> None:
    response = client.get("/_history", params={"_since": "yesterday"})
    assert response.status_code == 400
    assert gw_code(response) == "GW-1013"


def test_capability_statement_in_parts(client: httpx.Client) -> None:
    whole = client.get("/metadata").json()
    elements = client.get("/metadata", params={"_elements": "fhirVersion,software"})
    assert elements.status_code == 200
    cut = elements.json()
    assert "id" not in whole  # a statement of this server now, not a stored resource
    # and the mandatory elements (search.html#elements)
    assert set(cut) == {"resourceType", "meta", "fhirVersion", "software", "status", "date",
                        "kind", "format"}
    assert cut["fhirVersion"] == "4.0.1"
    assert cut["meta"]["tag"][-1]["code"] == "SUBSETTED"
    summary = client.get("/metadata", params={"_summary": "true"})
    resource = summary.json()["rest"][0]["resource"][0]
    assert "type" in resource and "searchParam" not in resource and "interaction" not in resource
    assert len(summary.content) * 10 < len(client.get("/metadata").content)
    text = client.get("/metadata", params={"_summary": "text"}).json()
    assert "rest" not in text and text["status"] == whole["status"]  # mandatory stays
    assert "SUBSETTED" not in str(client.get("/metadata").json().get("meta"))  # cached whole
    terminology = client.get("/metadata", params={"mode": "terminology",
                                                  "_elements": "codeSystem"}).json()
    assert terminology["resourceType"] == "TerminologyCapabilities"
    assert "codeSystem" in terminology and "expansion" not in terminology
    assert client.get("/metadata", params={"_summary": "count"}).status_code == 400


def test_capability_statement_reflects_the_registry(client: httpx.Client) -> None:
    response = client.get("/metadata")
    assert response.status_code == 200
    cs = response.json()
    assert cs["resourceType"] == "CapabilityStatement"
    assert cs["fhirVersion"] == "4.0.1"
    assert cs["kind"] == "instance"
    rest = cs["rest"][0]
    by_type = {r["type"]: r for r in rest["resource"]}
    for rt in ("Patient", "EpisodeOfCare", "CarePlan", "Task", "ServiceRequest",
               "Composition", "DocumentReference", "Subscription", "Consent", "AuditEvent"):
        assert rt in by_type
    patient_params = {p["name"]: p["type"] for p in by_type["Patient"]["searchParam"]}
    assert patient_params["identifier"] == "token"
    assert patient_params["birthdate"] == "date"
    assert patient_params["general-practitioner"] == "reference"
    codes = {i["code"] for i in by_type["Patient"]["interaction"]}
    assert {"read", "vread", "update", "patch", "delete", "create", "search-type",
            "history-instance", "history-type"} <= codes
    assert {"transaction", "batch"} <= {i["code"] for i in rest["interaction"]}
    # FHIRPath Patch is a Parameters resource, written in either format
    assert set(cs["patchFormat"]) == {"application/json-patch+json", "application/fhir+json",
                                      "application/fhir+xml", "application/xml-patch+xml"}
    # R4's oauth-uris extension needs an authorize endpoint a client-credentials server
    # has not: the endpoints are in .well-known/smart-configuration, as SMART says
    assert "extension" not in rest["security"]
    assert rest["security"]["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    assert "application/fhir+json" in cs["format"]
    # includes by name, as HAPI lists them: a type's own reference parameters, and
    # those of every type that can point at it
    patient = by_type["Patient"]
    assert patient["searchInclude"][0] == "*"
    assert {"Patient:general-practitioner", "Patient:organization", "Patient:link"} <= set(
        patient["searchInclude"])
    assert "Observation:subject" not in patient["searchInclude"]
    assert {"Observation:subject", "Observation:patient", "Encounter:subject",
            "Patient:link"} <= set(patient["searchRevInclude"])
    assert "Observation:performer" in by_type["Practitioner"]["searchRevInclude"]
    assert "Observation:encounter" not in by_type["Practitioner"]["searchRevInclude"]
    # every name listed is an include a search takes
    listed = [("_include", v) for v in patient["searchInclude"][1:]] + [
        ("_revinclude", v) for v in patient["searchRevInclude"][1:25]]
    for name, value in listed:
        taken = client.get("/Patient", params={name: value, "_count": 1},
                           headers={"Prefer": "handling=strict"})
        assert taken.status_code == 200, (name, value, taken.text)


def test_metadata_in_terminology_mode(client: httpx.Client) -> None:
    # capabilities: mode=terminology answers a TerminologyCapabilities
    tc = client.get("/metadata", params={"mode": "terminology"})
    assert tc.status_code == 200, tc.text
    body = tc.json()
    assert body["resourceType"] == "TerminologyCapabilities" and body["kind"] == "instance"
    systems = {c["uri"]: c for c in body["codeSystem"]}
    # a held, complete code system is claimed, and $lookup answers from it
    care_level = "https://carepath-gateway.org/fhir/CodeSystem/care-level"
    assert care_level in systems and systems[care_level]["version"][0]["isDefault"]
    held = json.loads((Path(__file__).parents[2] / "profiles/CodeSystem-care-level.json")
                      .read_text(encoding="utf-8"))
    code = held["concept"][0]["code"]
    looked_up = client.get("/CodeSystem/$lookup", params={"system": care_level, "code": code})
    assert looked_up.status_code == 200, looked_up.text
    # a fragment is not: the gateway holds only a few SNOMED CT concepts
    assert "http://snomed.info/sct" not in systems
    checked = client.post("/TerminologyCapabilities/$validate", content=tc.content,
                          headers={"Content-Type": FHIR})
    assert checked.status_code == 200, checked.text
    assert not [i for i in checked.json()["issue"] if i["severity"] in ("error", "fatal")]
    for mode in ("full", "normative", "normal"):
        statement = client.get("/metadata", params={"mode": mode}).json()
        assert statement["resourceType"] == "CapabilityStatement"
    wrong = client.get("/metadata", params={"mode": "everything"})
    assert wrong.status_code == 400 and gw_code(wrong) == "GW-1013"


def test_capability_statements_kept_are_bounded(client: httpx.Client) -> None:
    # without a configured public base the base comes from the Host header, which a
    # client can vary at will: statements kept for it must not grow without bound
    from gateway.interactions import capabilities

    for n in range(3 * capabilities._CACHE_SIZE):
        response = client.get("/metadata", headers={"Host": f"h{n}.example"})
        assert response.status_code == 200
    assert len(capabilities._CACHE) <= capabilities._CACHE_SIZE


def test_content_type_variants_are_accepted(client: httpx.Client) -> None:
    body = patient(unique("mrn"))
    for ctype in (FHIR, "application/json", "application/fhir+json; charset=utf-8",
                  "application/fhir+json;fhirVersion=4.0", "application/json+fhir"):
        response = client.post("/Patient", json=body, headers={"Content-Type": ctype})
        assert response.status_code == 201, (ctype, response.text)
    # the DSTU2 name in Accept (HAPI's client lists it), _format with an unescaped "+"
    accepted = client.get("/metadata", headers={
        "Accept": "application/xml+fhir;q=1.0, application/json+fhir;q=0.9"})
    assert accepted.status_code == 200
    base = str(client.base_url).rstrip("/")
    raw_plus = httpx.get(f"{base}/metadata?_format=application/fhir+json")
    assert raw_plus.status_code == 200, raw_plus.text
    xml = client.get("/metadata", params={"_format": "application/fhir+xml"})
    assert xml.status_code == 200 and xml.content.startswith(b"<?xml")
    assert accepted.headers["content-type"].startswith("application/fhir+xml")  # q=1.0
    # the fhirVersion parameter (http.html#version-parameter): 4.0 is served, others not
    for accept, status in (("application/fhir+json; fhirVersion=4.0", 200),
                           ("application/fhir+json; fhirVersion=4.0.1", 200),
                           ("application/fhir+json; fhirVersion=3.0", 406),
                           ("application/fhir+json; fhirVersion=3.0, */*;q=0.1", 200)):
        got = client.get("/metadata", headers={"Accept": accept})
        assert got.status_code == status, (accept, got.text)
    for fmt, status in (("application/fhir+json;fhirVersion=4.0", 200),
                        ("application/fhir+json;fhirVersion=3.0", 406),
                        ("application/fhir+xml; fhirVersion=5.0", 406)):
        got = client.get("/metadata", params={"_format": fmt})
        assert got.status_code == status, (fmt, got.text)
    stu3 = client.post("/Patient", json=body,
                       headers={"Content-Type": "application/fhir+json; fhirVersion=3.0"})
    assert stu3.status_code == 415 and gw_code(stu3) == "GW-1008"


def test_history_at_returns_the_version_current_then(client: httpx.Client) -> None:
    created = post(client, patient(unique("mrn"), family="Alt")).json()
    first_time = created["meta"]["lastUpdated"]
    time.sleep(0.01)
    created["name"][0]["family"] = "Neu"
    put(client, created)
    at = client.get(f"/Patient/{created['id']}/_history", params={"_at": first_time}).json()
    assert [e["resource"]["meta"]["versionId"] for e in at["entry"]] == ["1"]
    # before it existed, or since a time after its last change: no versions, not "unknown"
    for params in ({"_at": "2001-01-01"}, {"_since": "2999-01-01T00:00:00Z"}):
        empty = client.get(f"/Patient/{created['id']}/_history", params=params)
        assert empty.status_code == 200, (params, empty.text)
        assert (empty.json()["total"], empty.json().get("entry", [])) == (0, []), params
    unknown = client.get(f"/Patient/{unique('none')}/_history", params={"_at": "2001-01-01"})
    assert unknown.status_code == 404


def test_history_at_takes_date_prefixes(client: httpx.Client) -> None:
    """``_at`` is a date searched as search.html#date says: with a prefix it names an
    open period (``ge2020``: current at some moment from 2020 on); several ``_at``
    hold together."""
    created = post(client, patient(unique("mrn"), family="Alt")).json()
    first_time = created["meta"]["lastUpdated"]
    time.sleep(0.01)
    created["name"][0]["family"] = "Neu"
    second_time = put(client, created).json()["meta"]["lastUpdated"]
    path = f"/Patient/{created['id']}/_history"

    def versions(*at: str) -> list[str]:
        response = client.get(path, params=[("_at", v) for v in at])
        assert response.status_code == 200, (at, response.text)
        return [e["resource"]["meta"]["versionId"] for e in response.json().get("entry", [])]

    assert versions("ge2001") == ["2", "1"]
    assert versions("gt2001-01-01") == ["2", "1"]
    assert versions("lt2001") == versions("le2001-12-31") == versions("eb2001") == []
    assert versions("lt2999") == ["2", "1"]
    # (within the millisecond of the change both versions were current)
    assert versions(f"gt{second_time}") == versions(f"sa{second_time}") == ["2"]
    assert versions(f"le{first_time}") == ["1"]
    assert versions(f"eq{first_time}") == versions(first_time) == ["1"]
    # both at once: from the first change to before the second
    assert versions(f"ge{first_time}", f"lt{second_time}") == ["1"]
    assert versions("ge2999", "lt2001") == []
    for bad in ("ne2020", "ap2020", "gexyz", "2020-13"):
        refused = client.get(path, params={"_at": bad})
        assert (refused.status_code, gw_code(refused)) == (400, "GW-1013"), bad


def test_head_answers_headers_without_a_body(client: httpx.Client) -> None:
    created = post(client, patient(unique("mrn"))).json()
    response = client.head(f"/Patient/{created['id']}")
    assert response.status_code == 200
    assert response.headers["ETag"] == 'W/"1"'
    assert response.content == b""


def test_a_new_context_ignores_what_a_collected_one_left_under_its_id(
        server) -> None:  # type: ignore[no-untyped-def]
    # Python gives a new object the id of a collected one: whatever a gone context
    # contributed or had cached under that id must not reach the new one's statement
    from gateway.interactions import capabilities
    from gateway.interactions.base import Context
    from gateway.main import registry
    from gateway.storage.interface import Store

    ctx = Context(store=cast(Store, None), registry=registry(), settings=server.settings)
    stale = {"url": "urn:stale", "valueString": "left behind"}
    capabilities._CONTRIBUTIONS[id(ctx)] = [("Patient", lambda base: [stale])]
    capabilities._CACHE[(id(ctx), "http://x/fhir")] = ((0, 0), {"resourceType": "stale"},
                                                      b'{"resourceType":"stale"}', 'W/"x"')
    body = asyncio.run(capabilities.capabilities(ctx, base="http://x/fhir")).body
    assert isinstance(body, bytes)
    statement = json.loads(body)
    assert statement["resourceType"] == "CapabilityStatement"
    patient = next(r for r in statement["rest"][0]["resource"] if r["type"] == "Patient")
    assert "extension" not in patient
    fresh = {"url": "urn:fresh", "valueString": "mine"}
    capabilities.contribute(ctx, "Patient", lambda base: [fresh])
    body = asyncio.run(capabilities.capabilities(ctx, base="http://y/fhir")).body
    assert isinstance(body, bytes)
    statement = json.loads(body)
    patient = next(r for r in statement["rest"][0]["resource"] if r["type"] == "Patient")
    assert patient["extension"] == [fresh]


def test_history_refuses_unknown_parameters_when_asked_to_be_strict(
        client: httpx.Client) -> None:
    created = post(client, patient(unique("mrn"))).json()
    path = f"/Patient/{created['id']}/_history"
    for where in (path, "/Patient/_history", "/_history"):
        lenient = client.get(where, params={"_count": 1, "foo": "bar"})
        assert lenient.status_code == 200, where
        strict = client.get(where, params={"_count": 1, "foo": "bar"},
                            headers={"Prefer": "handling=strict"})
        assert (strict.status_code, gw_code(strict)) == (400, "GW-1014"), where
        assert "foo" in strict.json()["issue"][0]["diagnostics"]
        known = client.get(where, params={"_count": 1, "_since": "2001-01-01",
                                          "_format": "json"},
                           headers={"Prefer": "handling=strict"})
        assert known.status_code == 200, (where, known.text)


def test_the_capability_statement_carries_an_etag(client: httpx.Client) -> None:
    """http.html#capabilities: "An ETag header SHOULD be returned with the Response.
    The value of the ETag header SHALL change if the returned resource changes." """
    full = client.get("/metadata")
    etag = full.headers["ETag"]
    assert etag.startswith('W/"') and client.get("/metadata").headers["ETag"] == etag
    summary = client.get("/metadata", params={"_summary": "true"})
    assert summary.headers["ETag"] not in (etag, None)
    terminology = client.get("/metadata", params={"mode": "terminology"})
    assert terminology.headers["ETag"] not in (etag, summary.headers["ETag"])
    # a cache revalidates with it
    again = client.get("/metadata", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.headers["ETag"] == etag and not again.content
    assert client.get("/metadata", headers={"If-None-Match": 'W/"other"'}).status_code == 200
    assert client.get("/metadata", params={"_summary": "true"},
                      headers={"If-None-Match": etag}).status_code == 200
    # what is served changes, and so does the tag: a profile stored here is listed
    # (on Basic, which no other test reads the supported profiles of; and removed)
    profile = {"resourceType": "StructureDefinition", "id": f"etag-{unique('sd')}",
               "url": f"http://example.org/StructureDefinition/{unique('sd')}",
               "name": "EtagBasic", "status": "draft", "kind": "resource",
               "abstract": False, "type": "Basic",
               "baseDefinition": "http://hl7.org/fhir/StructureDefinition/Basic",
               "derivation": "constraint",
               "differential": {"element": [{"id": "Basic.subject", "path": "Basic.subject",
                                             "min": 1}]}}
    stored = client.put(f"/StructureDefinition/{profile['id']}", json=profile,
                        headers={"Content-Type": FHIR})
    assert stored.status_code == 201, stored.text
    try:
        changed = client.get("/metadata", headers={"If-None-Match": etag})
        assert changed.status_code == 200 and changed.headers["ETag"] != etag
        assert profile["url"] in changed.text
    finally:
        assert client.delete(f"/StructureDefinition/{profile['id']}").status_code == 204


def test_history_of_what_a_list_names(client: httpx.Client) -> None:
    """http.html#history, ``_list``: "only include resource versions that are
    referenced in the specified list"; a version-specific reference names that
    version."""
    mrn = unique("mrn")
    one, two, other = (post(client, patient(f"{mrn}-{n}")).json() for n in (1, 2, 3))
    for p in (one, two, other):
        assert put(client, {**p, "active": True}).status_code == 200
    obs = post(client, {"resourceType": "Observation", "status": "final",
                        "code": {"text": "x"}}).json()
    listed = post(client, {"resourceType": "List", "status": "current", "mode": "changes",
                           "entry": [{"item": {"reference": f"Patient/{one['id']}"}},
                                     {"item": {"reference": f"Patient/{two['id']}/_history/1"}},
                                     {"item": {"reference": f"Observation/{obs['id']}"}},
                                     {"item": {"reference": f"Patient/{other['id']}"},
                                      "deleted": True}]})
    assert listed.status_code == 201, listed.text
    listed = listed.json()
    since = {"_since": one["meta"]["lastUpdated"]}

    def versions(path: str, **params: str) -> list[tuple[str, str]]:
        response = client.get(path, params={**since, **params})
        assert response.status_code == 200, response.text
        return sorted((e["resource"]["id"], e["resource"]["meta"]["versionId"])
                      for e in response.json().get("entry", []))

    assert versions("/Patient/_history", _list=listed["id"]) == sorted(
        [(one["id"], "1"), (one["id"], "2"), (two["id"], "1")])
    assert (obs["id"], "1") in versions("/_history", _list=listed["id"])
    assert len(versions("/_history", _list=listed["id"])) == 4
    assert versions(f"/Patient/{one['id']}/_history", _list=listed["id"]) == [
        (one["id"], "1"), (one["id"], "2")]
    assert versions(f"/Patient/{other['id']}/_history", _list=listed["id"]) == []
    # a List that is not there names nothing; two Lists: what both name
    assert versions("/Patient/_history", _list="no-such-list") == []
    narrow = post(client, {"resourceType": "List", "status": "current", "mode": "working",
                           "entry": [{"item": {"reference": f"Patient/{one['id']}"}}]}).json()
    assert versions("/Patient/_history", _list=[listed["id"], narrow["id"]]) == [
        (one["id"], "1"), (one["id"], "2")]
    assert client.get("/Patient/_history", params={"_list": "$current-problems"}
                      ).status_code == 400
