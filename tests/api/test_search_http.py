"""Search over HTTP: parameters, includes, paging, totals, summaries (search.html)."""

from __future__ import annotations

import asyncio
import random
import string
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import pytest

from gateway.settings import Settings
from gateway.storage.db import open_database
from tests.api.helpers import FHIR, gw_code, paged_ids, patient, post, put, search_ids
from tests.conftest import BACKENDS, RunningServer, backend_settings, unique


def _family_patients(client: httpx.Client, family: str, n: int) -> list[str]:
    return [post(client, patient(unique("mrn"), family=family,
                                 birthDate=f"19{50 + i}-03-0{1 + i % 9}")).json()["id"]
            for i in range(n)]


def test_a_date_without_a_zone_is_the_servers_local_day(client: httpx.Client) -> None:
    """search.html#date: the server's local time zone (Europe/Berlin, jurisdiction DE)
    decides the day of a search value without one: 00:30 CET on 24 November is
    23:30Z on the 23rd, and is found on the 24th."""
    rid = unique("tz-probe")
    assert put(client, {"resourceType": "Observation", "id": rid, "status": "final",
                        "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
                        "effectiveDateTime": "2017-11-24T00:30:00+01:00"}).status_code == 201
    response = client.get("/Observation", params={"_id": rid, "date": "2017-11-24"})
    assert response.status_code == 200 and response.json()["total"] == 1
    assert search_ids(client, "/Observation", _id=rid, date="2017-11-23") == []
    assert search_ids(client, "/Observation", _id=rid, date="2017-11") == [rid]
    assert search_ids(client, "/Observation", _id=rid, date="lt2017-11-24") == []
    assert search_ids(client, "/Observation", _id=rid, date="ge2017-11-24T00:30") == [rid]
    assert search_ids(client, "/Observation", _id=rid, date="2017-11-23T23:30Z") == [rid]


def test_search_by_identifier_name_and_date(client: httpx.Client) -> None:
    family = unique("Fam")
    mrn = unique("mrn")
    rid = post(client, patient(mrn, family=family, birthDate="1980-05-17")).json()["id"]
    assert search_ids(client, "/Patient", identifier=f"urn:test:mrn|{mrn}") == [rid]
    assert search_ids(client, "/Patient", identifier=mrn) == [rid]
    assert search_ids(client, "/Patient", family=family[:6].lower()) != []
    assert search_ids(client, "/Patient", **{"family:exact": family}) == [rid]
    assert search_ids(client, "/Patient", **{"family:exact": family.lower()}) == []
    assert search_ids(client, "/Patient", **{"name:contains": family[4:]}) == [rid]
    both = {"family": family}
    assert search_ids(client, "/Patient", **both, birthdate="1980") == [rid]
    assert search_ids(client, "/Patient", **both, birthdate="ge1980-05-17") == [rid]
    assert search_ids(client, "/Patient", **both, birthdate="gt1980-05-17") == []
    assert search_ids(client, "/Patient", **both, birthdate="lt1980-06") == [rid]
    assert search_ids(client, "/Patient", _id=rid) == [rid]


def test_reference_chain_include_revinclude_and_has(client: httpx.Client) -> None:
    mrn = unique("mrn")
    pid = post(client, patient(mrn)).json()["id"]
    code = unique("code")
    obs_ids = [post(client, {
        "resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": "urn:test:code", "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
    }).json()["id"] for _ in range(2)]
    assert sorted(search_ids(client, "/Observation", subject=f"Patient/{pid}")) == sorted(obs_ids)
    assert sorted(search_ids(client, "/Observation",
                             **{"subject:Patient.identifier": f"urn:test:mrn|{mrn}"})
                  ) == sorted(obs_ids)
    assert sorted(search_ids(client, "/Observation", patient=pid)) == sorted(obs_ids)
    bundle = client.get("/Observation", params={"code": f"urn:test:code|{code}",
                                                "_include": "Observation:subject"}).json()
    modes = sorted((e["resource"]["resourceType"], e["search"]["mode"]) for e in bundle["entry"])
    assert modes == [("Observation", "match"), ("Observation", "match"), ("Patient", "include")]
    rev = client.get("/Patient", params={"_id": pid,
                                         "_revinclude": "Observation:subject"}).json()
    assert sorted(e["resource"]["resourceType"] for e in rev["entry"]) == [
        "Observation", "Observation", "Patient"]
    assert search_ids(client, "/Patient",
                      **{"_has:Observation:subject:code": f"urn:test:code|{code}"}) == [pid]


def test_a_bare_id_naming_resources_of_several_types_is_refused(client: httpx.Client) -> None:
    """search.html#reference: "Servers SHOULD reject a search where the logical id
    refers to more than one matching resource across different types"; a bare id
    that names one type's resource only is searched as before."""
    rid, lone = unique("amb"), unique("lone")
    assert put(client, {**patient(unique("mrn")), "id": rid}).status_code == 201
    assert put(client, {"resourceType": "Group", "id": rid, "type": "person",
                        "actual": True}).status_code == 201
    assert put(client, {**patient(unique("mrn")), "id": lone}).status_code == 201

    def observation(subject: str) -> str:
        return str(post(client, {
            "resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
            "subject": {"reference": subject}}).json()["id"])

    of_patient, of_group = observation(f"Patient/{rid}"), observation(f"Group/{rid}")
    of_lone = observation(f"Patient/{lone}")
    for headers in ({}, {"Prefer": "handling=strict"}):
        refused = client.get("/Observation", params={"subject": rid}, headers=headers)
        assert refused.status_code == 400, refused.text
        assert gw_code(refused) == "GW-1013"
        said = refused.json()["issue"][0]["diagnostics"]
        assert f"subject=Patient/{rid}" in said and f"subject:Patient={rid}" in said
    # with another value, in a _has, as conditional criteria: as refused
    assert client.get("/Observation", params={"subject": f"{lone},{rid}"}).status_code == 400
    assert client.get("/Patient", params={
        "_has:Observation:patient:subject": rid}).status_code == 400
    conditional = client.post("/Observation", json={
        "resourceType": "Observation", "status": "final", "code": {"text": "x"}},
        headers={"Content-Type": FHIR, "If-None-Exist": f"subject={rid}"})
    assert conditional.status_code == 400, conditional.text
    # named with its type, or of one type only, or of a parameter of one target type
    assert search_ids(client, "/Observation", subject=f"Patient/{rid}") == [of_patient]
    assert search_ids(client, "/Observation", **{"subject:Group": rid}) == [of_group]
    assert search_ids(client, "/Observation", subject=lone) == [of_lone]
    assert search_ids(client, "/Observation", patient=rid) == [of_patient]
    # a deleted resource names nothing
    assert client.delete(f"/Group/{rid}").status_code in (200, 204)
    assert sorted(search_ids(client, "/Observation", subject=rid)) == sorted(
        [of_patient, of_group])


def test_references_to_this_server_are_local_and_to_others_are_not(
        client: httpx.Client) -> None:
    """``[base]/Patient/1`` is this server's Patient/1 (stored relative); the same
    path on another server is another patient."""
    pid = post(client, patient(unique("mrn"))).json()["id"]
    code = unique("code")
    base = str(client.base_url).rstrip("/")

    def observation(subject: str) -> dict[str, Any]:
        return {"resourceType": "Observation", "status": "final",
                "code": {"coding": [{"system": "urn:test:code", "code": code}]},
                "subject": {"reference": subject}}

    here = post(client, observation(f"{base}/Patient/{pid}"))
    assert here.status_code == 201, here.text
    assert here.json()["subject"]["reference"] == f"Patient/{pid}"
    foreign = f"http://other.example/fhir/Patient/{pid}"
    there = post(client, observation(foreign)).json()
    assert there["subject"]["reference"] == foreign
    assert search_ids(client, "/Observation", subject=f"Patient/{pid}") == [here.json()["id"]]
    assert search_ids(client, "/Observation", patient=pid) == [here.json()["id"]]
    assert search_ids(client, "/Observation",
                      subject=f"{base}/Patient/{pid}") == [here.json()["id"]]
    assert search_ids(client, "/Observation", subject=foreign) == [there["id"]]
    bundle = client.get("/Observation", params={"code": f"urn:test:code|{code}",
                                                "_include": "Observation:subject"}).json()
    included = [e["resource"]["id"] for e in bundle["entry"] if e["search"]["mode"] == "include"]
    assert included == [pid]  # once, for the local reference only


def test_sort_and_paging_are_stable_under_concurrent_writes(client: httpx.Client) -> None:
    family = unique("Page")
    ids = _family_patients(client, family, 7)
    first = client.get("/Patient", params={"family": family, "_count": 3,
                                           "_sort": "birthdate"}).json()
    assert first["total"] == 7
    seen = [e["resource"]["id"] for e in first["entry"]]
    link = next(x["url"] for x in first["link"] if x["relation"] == "next")
    # writes while paging: a new match and a deletion must not shift pages
    _family_patients(client, family, 1)
    while link:
        page = httpx.get(link, timeout=30).json()
        seen += [e["resource"]["id"] for e in page["entry"] if e["search"]["mode"] == "match"]
        link = next((x["url"] for x in page.get("link", []) if x["relation"] == "next"), None)
    assert seen == ids  # birth dates ascend with creation order
    descending = search_ids(client, "/Patient", family=family, _sort="-birthdate", _count=100)
    assert descending[:6] == list(reversed(ids))[:6]


def test_total_summary_count_and_elements(client: httpx.Client) -> None:
    family = unique("Sum")
    _family_patients(client, family, 3)
    counted = client.get("/Patient", params={"family": family, "_summary": "count"}).json()
    assert counted["total"] == 3
    assert "entry" not in counted
    none = client.get("/Patient", params={"family": family, "_total": "none",
                                          "_count": 1}).json()
    assert "total" not in none
    accurate = client.get("/Patient", params={"family": family, "_total": "accurate",
                                              "_count": 1}).json()
    assert accurate["total"] == 3
    elements = client.get("/Patient", params={"family": family, "_elements": "birthDate"}
                          ).json()["entry"][0]["resource"]
    assert set(elements) == {"resourceType", "id", "meta", "birthDate"}
    assert any(t["code"] == "SUBSETTED" for t in elements["meta"]["tag"])
    summary = client.get("/Patient", params={"family": family, "_summary": "true"}
                         ).json()["entry"][0]["resource"]
    assert "name" in summary and "birthDate" in summary


def test_unknown_parameters_lenient_and_strict(client: httpx.Client) -> None:
    lenient = client.get("/Patient", params={"foo": "bar", "_count": 1})
    assert lenient.status_code == 200
    outcome = [e for e in lenient.json().get("entry", []) if e["search"]["mode"] == "outcome"]
    assert outcome and "foo" in outcome[0]["resource"]["issue"][0]["diagnostics"]
    strict = client.get("/Patient", params={"foo": "bar"}, headers={"Prefer": "handling=strict"})
    assert strict.status_code == 400
    assert gw_code(strict) == "GW-1014"
    # a header field sent twice counts as one list (RFC 9110 5.3)
    twice = client.get("/Patient", params={"foo": "bar"},
                       headers=[("Prefer", "return=representation"),
                                ("Prefer", "handling=strict")])
    assert twice.status_code == 400


def test_self_link_names_only_the_parameters_used(client: httpx.Client) -> None:
    # search.html#errors: the self link says which parameters the search applied
    family = unique("Selflink")
    client.post("/Patient", json={"resourceType": "Patient", "name": [{"family": family}]})
    response = client.get("/Patient", params=[
        ("family", family), ("foo", "bar"), ("_text", "fever"), ("_contained", "true"),
        ("gender", ""), ("_type", "Observation"), ("_sort", "birthdate"), ("_count", "5")])
    assert response.status_code == 200
    result = response.json()
    self_link = next(link["url"] for link in result["link"] if link["relation"] == "self")
    query = parse_qsl(urlsplit(self_link).query, keep_blank_values=True)
    assert query == [("family", family), ("_sort", "birthdate"), ("_count", "5")]
    assert result["total"] == 1
    outcome = next(e["resource"] for e in result["entry"] if e["search"]["mode"] == "outcome")
    assert len(outcome["issue"]) == 5


def test_searching_contained_resources_is_declined_not_ignored(client: httpx.Client) -> None:
    asked = client.get("/Patient", params={"_contained": "true", "_count": 1})
    assert asked.status_code == 200
    outcome = [e["resource"] for e in asked.json().get("entry", [])
               if e["search"]["mode"] == "outcome"]
    assert outcome and "_contained=true" in outcome[0]["issue"][0]["diagnostics"]
    strict = client.get("/Patient", params={"_contained": "both"},
                        headers={"Prefer": "handling=strict"})
    assert strict.status_code == 400
    # false is what every search does anyway
    plain = client.get("/Patient", params={"_contained": "false", "_count": 1},
                       headers={"Prefer": "handling=strict"})
    assert plain.status_code == 200


def test_invalid_search_values_are_400(client: httpx.Client) -> None:
    for params in ({"birthdate": "not-a-date"}, {"_count": "many"},
                   {"_sort": "nonexistent"}, {"birthdate": "xx2020"}):
        response = client.get("/Patient", params=params)
        assert response.status_code == 400, (params, response.text)
        assert response.json()["resourceType"] == "OperationOutcome"


def test_post_search_with_form_body(client: httpx.Client) -> None:
    mrn = unique("mrn")
    rid = post(client, patient(mrn)).json()["id"]
    response = client.post("/Patient/_search", content=f"identifier={mrn}",
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200
    assert [e["resource"]["id"] for e in response.json()["entry"]] == [rid]
    # any other body would be read as no criteria at all, matching everything
    for ctype, body in [("application/json", '{"identifier": "x"}'),
                        (FHIR, '{"resourceType": "Parameters"}'),
                        ("text/plain", f"identifier={mrn}")]:
        response = client.post("/Patient/_search", content=body,
                               headers={"Content-Type": ctype, "Prefer": "handling=strict"})
        assert response.status_code == 415, (ctype, response.text)
        assert gw_code(response) == "GW-1008"
    # no body: the URL's parameters
    response = client.post(f"/Patient/_search?identifier={mrn}")
    assert [e["resource"]["id"] for e in response.json()["entry"]] == [rid]


def test_expired_page_is_410(client: httpx.Client) -> None:
    response = client.get("/", params={"_getpages": "no-such-search", "_getpagesoffset": 3})
    assert response.status_code == 410
    assert gw_code(response) == "GW-2004"


def test_a_page_link_rebuilt_on_the_types_url_gives_that_page(client: httpx.Client) -> None:
    # clients such as Medplum's take a next link's parameters and ask them on the
    # type's URL: that must be the next page, not a new search that ignores
    # _getpages (and so hands back the first page with yet another next link)
    family = unique("Rebuilt")
    ids = [post(client, patient(unique("mrn"), family=family)).json()["id"] for _ in range(5)]
    page = client.get("/Patient", params={"family": family, "_count": 2}).json()
    seen: list[str] = []
    while True:
        seen += [e["resource"]["id"] for e in page["entry"]]
        following = [x["url"] for x in page["link"] if x["relation"] == "next"]
        if not following:
            break
        rebuilt = client.get("/Patient", params=parse_qsl(urlsplit(following[0]).query))
        assert rebuilt.status_code == 200, rebuilt.text
        page = rebuilt.json()
        assert len(seen) <= 5
    assert sorted(seen) == sorted(ids)
    # the same by POST _search; but not on another type's URL
    search_id = dict(parse_qsl(urlsplit(following_link(client, family)).query))
    posted = client.post("/Patient/_search", data=search_id)
    assert posted.status_code == 200 and len(posted.json()["entry"]) == 2
    elsewhere = client.get("/Observation", params=search_id)
    assert elsewhere.status_code == 400 and gw_code(elsewhere) == "GW-1013"
    assert "a search of 'Patient'" in elsewhere.json()["issue"][0]["diagnostics"]
    # a compartment's pages, asked on the compartment's URL or on the type's
    for _ in range(3):
        post(client, {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                      "subject": {"reference": f"Patient/{ids[0]}"}})
    first = client.get(f"/Patient/{ids[0]}/Observation", params={"_count": 2}).json()
    following = dict(parse_qsl(urlsplit(next(
        x["url"] for x in first["link"] if x["relation"] == "next")).query))
    for path in (f"/Patient/{ids[0]}/Observation", "/Observation"):
        rest = client.get(path, params=following)
        assert rest.status_code == 200 and len(rest.json()["entry"]) == 1, path


def following_link(client: httpx.Client, family: str) -> str:
    first = client.get("/Patient", params={"family": family, "_count": 2}).json()
    return next(x["url"] for x in first["link"] if x["relation"] == "next")


def test_token_quantity_and_search_on_task(client: httpx.Client) -> None:
    owner = post(client, {"resourceType": "Organization", "name": unique("org")}).json()["id"]
    focus = unique("sr")
    body: dict[str, Any] = {
        "resourceType": "Task", "status": "requested", "intent": "order",
        "focus": {"reference": f"ServiceRequest/{focus}"},
        "owner": {"reference": f"Organization/{owner}"},
        "businessStatus": {"coding": [{"system": "urn:test:bs", "code": "created"}]},
    }
    tid = post(client, body).json()["id"]
    assert search_ids(client, "/Task", owner=f"Organization/{owner}", status="requested") == [tid]
    assert search_ids(client, "/Task", owner=f"Organization/{owner}",
                      **{"status:not": "requested"}) == []
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": unique()},
           "valueQuantity": {"value": 72.5, "system": "http://unitsofmeasure.org",
                             "code": "kg", "unit": "kg"},
           "subject": {"reference": f"Group/{owner}"}}  # Observation.subject: no Organization
    oid = post(client, obs).json()["id"]
    subject = f"Group/{owner}"
    assert search_ids(client, "/Observation", subject=subject,
                      **{"value-quantity": "gt70|http://unitsofmeasure.org|kg"}) == [oid]
    assert search_ids(client, "/Observation", subject=subject,
                      **{"value-quantity": "lt70"}) == []



def test_composite_search_pairs_values_on_one_element(client: httpx.Client) -> None:
    """A write through the store (PostgreSQL's one-statement write, SQLite's rows) indexes
    the composite parameters; an update replaces those rows."""
    loinc, ucum = "http://loinc.org", "http://unitsofmeasure.org"
    subject = {"reference": f"Group/{unique('g')}"}

    def bp(systolic: float, diastolic: float) -> dict[str, Any]:
        return {"resourceType": "Observation", "status": "final", "subject": subject,
                "code": {"coding": [{"system": loinc, "code": "85354-9"}]},
                "component": [
                    {"code": {"coding": [{"system": loinc, "code": code}]},
                     "valueQuantity": {"value": value, "system": ucum, "code": "mm[Hg]"}}
                    for code, value in (("8480-6", systolic), ("8462-4", diastolic))]}

    high = post(client, bp(150, 80)).json()["id"]
    low = post(client, bp(120, 95)).json()["id"]
    param = "component-code-value-quantity"
    assert search_ids(client, "/Observation", subject=subject["reference"],
                      **{param: f"{loinc}|8462-4$gt90"}) == [low]
    assert search_ids(client, "/Observation", subject=subject["reference"],
                      **{param: "8480-6$gt140"}) == [high]
    updated = client.put(f"/Observation/{high}", json={**bp(130, 92), "id": high})
    assert updated.status_code == 200, updated.text
    assert search_ids(client, "/Observation", subject=subject["reference"],
                      **{param: "8480-6$gt140"}) == []
    assert sorted(search_ids(client, "/Observation", subject=subject["reference"],
                             **{param: f"8462-4$gt90|{ucum}|mm[Hg]"})) == sorted([high, low])
    bad = client.get("/Observation", params={param: "8480-6"})
    assert bad.status_code == 400 and gw_code(bad)
    statement = client.get("/metadata").json()
    obs = next(r for r in statement["rest"][0]["resource"] if r["type"] == "Observation")
    composite = {p["name"] for p in obs["searchParam"] if p["type"] == "composite"}
    assert {param, "code-value-quantity", "combo-code-value-concept"} <= composite


def test_token_in_and_not_in_expand_value_sets(client: httpx.Client) -> None:
    """``:in``/``:not-in`` against a ValueSet the gateway holds and one stored here."""
    icd = "http://fhir.de/CodeSystem/bfarm/icd-10-gm"
    subject = {"reference": f"Group/{unique('g')}"}

    def condition(system: str, code: str) -> str:
        return post(client, {"resourceType": "Condition", "subject": subject,
                             "code": {"coding": [{"system": system, "code": code}]}}
                    ).json()["id"]

    infarct, hypertension = condition(icd, "I21"), condition(icd, "I10")
    elsewhere = condition("urn:test:other", "I21")  # the code, in another system
    held = "https://carepath-gateway.org/fhir/ValueSet/chd-diagnosis"
    by_subject = {"subject": subject["reference"]}
    assert search_ids(client, "/Condition", **by_subject, **{"code:in": held}) == [infarct]
    assert sorted(search_ids(client, "/Condition", **by_subject, **{"code:not-in": held})
                  ) == sorted([hypertension, elsewhere])
    stored_url = f"urn:test:vs:{unique()}"
    post(client, {"resourceType": "ValueSet", "url": stored_url, "status": "active",
                  "compose": {"include": [{"system": icd, "concept": [{"code": "I10"}]}]}})
    assert search_ids(client, "/Condition", **by_subject,
                      **{"code:in": f"{held},{stored_url}"}) == [infarct, hypertension]
    unknown = client.get("/Condition", params={"code:in": "urn:test:vs:nowhere"})
    assert unknown.status_code == 400 and gw_code(unknown) == "GW-1013"
    # I21.4 is not listed, but matches the value set's regex over ICD-10-GM (not held):
    # membership is decided for the codes in use
    sub_code = condition(icd, "I21.4")
    assert search_ids(client, "/Condition", **by_subject, **{"code:in": held}) == [
        infarct, sub_code]
    snomed = "http://snomed.info/sct"
    condition(snomed, "22298006")
    undecidable_url = f"urn:test:vs:{unique()}"
    post(client, {"resourceType": "ValueSet", "url": undecidable_url, "status": "active",
                  "compose": {"include": [{"system": snomed, "filter": [
                      {"property": "concept", "op": "is-a", "value": "414545008"}]}]}})
    undecidable = client.get("/Condition", params={"code:in": undecidable_url})
    assert undecidable.status_code == 400 and "cannot be expanded" in undecidable.text
    not_a_url = client.get("/Condition", params={"code:in": "chd"})
    assert not_a_url.status_code == 400


def test_identifier_of_type(client: httpx.Client) -> None:
    v2 = "http://terminology.hl7.org/CodeSystem/v2-0203"
    mrn, kvnr = unique("mrn"), unique("kvnr")
    body = patient(mrn)
    body["identifier"] = [
        {"type": {"coding": [{"system": v2, "code": "MR"}]}, "system": "urn:test:mrn",
         "value": mrn},
        {"type": {"coding": [{"system": "http://fhir.de/CodeSystem/identifier-type-de-basis",
                              "code": "KVZ10"}]},
         "system": "http://fhir.de/sid/gkv/kvid-10", "value": kvnr},
    ]
    rid = post(client, body).json()["id"]
    of_type = "identifier:of-type"
    assert search_ids(client, "/Patient", **{of_type: f"{v2}|MR|{mrn}"}) == [rid]
    assert search_ids(client, "/Patient", **{of_type: f"{v2}|MR|{kvnr}"}) == []  # other type
    assert search_ids(client, "/Patient", **{of_type: f"urn:other|MR|{mrn}"}) == []
    assert search_ids(client, "/Patient", **{
        of_type: f"http://fhir.de/CodeSystem/identifier-type-de-basis|KVZ10|{kvnr}"}) == [rid]
    body["identifier"] = body["identifier"][1:]  # the MR identifier removed
    assert client.put(f"/Patient/{rid}", json={**body, "id": rid}).status_code == 200
    assert search_ids(client, "/Patient", **{of_type: f"{v2}|MR|{mrn}"}) == []
    bad = client.get("/Patient", params={of_type: f"MR|{mrn}"})
    assert bad.status_code == 400 and gw_code(bad) == "GW-1013"


def test_token_below_and_above_follow_a_code_system_held_here(client: httpx.Client) -> None:
    system = f"urn:test:cs:{unique()}"
    post(client, {"resourceType": "CodeSystem", "url": system, "status": "active",
                  "content": "complete", "hierarchyMeaning": "is-a", "concept": [
                      {"code": "heart", "concept": [
                          {"code": "ischaemic", "concept": [{"code": "infarct"}]},
                          {"code": "valve"}]},
                      {"code": "lung"}]})
    subject = {"reference": f"Group/{unique('g')}"}
    ids = {code: post(client, {"resourceType": "Condition", "subject": subject,
                               "code": {"coding": [{"system": system, "code": code}]}}
                      ).json()["id"] for code in ("heart", "ischaemic", "infarct", "valve",
                                                   "lung")}
    by_subject = {"subject": subject["reference"]}

    def found(**params: str) -> set[str]:
        got = search_ids(client, "/Condition", **by_subject, **params)
        return {code for code, rid in ids.items() if rid in got}

    assert found(**{"code:below": f"{system}|ischaemic"}) == {"ischaemic", "infarct"}
    assert found(**{"code:below": f"{system}|heart"}) == {"heart", "ischaemic", "infarct",
                                                          "valve"}
    assert found(**{"code:above": f"{system}|infarct"}) == {"heart", "ischaemic", "infarct"}
    unheld = f"urn:test:cs:{unique()}"
    post(client, {"resourceType": "Condition", "subject": subject,
                  "code": {"coding": [{"system": unheld, "code": "x"}]}})
    response = client.get("/Condition", params={"code:below": f"{unheld}|x"})
    assert response.status_code == 400 and "cannot be expanded" in response.text


def test_token_below_and_above_over_parent_links_in_a_chain_and_a_cycle(
        client: httpx.Client) -> None:
    """A stored code system whose 2,000 codes form a chain by their ``parent`` property,
    and two codes that are each other's parent: ``:below``/``:above`` follow the links
    (one walk through the hierarchy, not one a code) and end on the cycle."""
    system = f"urn:test:cs:{unique()}"
    chain = [{"code": "c0"}] + [
        {"code": f"c{i}", "property": [{"code": "parent", "valueCode": f"c{i - 1}"}]}
        for i in range(1, 2000)]
    cycle = [{"code": "p", "property": [{"code": "parent", "valueCode": "q"}]},
             {"code": "q", "property": [{"code": "parent", "valueCode": "p"}]}]
    created = post(client, {"resourceType": "CodeSystem", "url": system, "status": "active",
                            "content": "complete", "concept": chain + cycle})
    assert created.status_code == 201, created.text
    subject = {"reference": f"Group/{unique('g')}"}
    ids = {code: post(client, {"resourceType": "Condition", "subject": subject,
                               "code": {"coding": [{"system": system, "code": code}]}}
                      ).json()["id"] for code in ("c0", "c1", "c1999", "p")}

    def found(**params: str) -> set[str]:
        got = search_ids(client, "/Condition", subject=subject["reference"], **params)
        return {code for code, rid in ids.items() if rid in got}

    assert found(**{"code:below": f"{system}|c0"}) == {"c0", "c1", "c1999"}
    assert found(**{"code:below": f"{system}|c2"}) == {"c1999"}
    assert found(**{"code:above": f"{system}|c1"}) == {"c0", "c1"}
    assert found(**{"code:above": f"{system}|c1999"}) == {"c0", "c1", "c1999"}
    assert found(**{"code:below": f"{system}|q"}) == {"p"}
    assert found(**{"code:above": f"{system}|q"}) == {"p"}


def test_patient_everything(client: httpx.Client) -> None:
    pid = post(client, patient(unique("mrn"))).json()["id"]
    other = post(client, patient(unique("mrn"))).json()["id"]
    ref = {"reference": f"Patient/{pid}"}
    made = [post(client, body).json() for body in (
        {"resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"},
         "subject": ref},
        {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
         "subject": ref},
        {"resourceType": "Condition", "subject": ref, "code": {"text": "y"}},
        {"resourceType": "Observation", "status": "final", "code": {"text": "z"},
         "subject": {"reference": f"Patient/{other}"}},
        # by another compartment parameter of a type: in (Observation performer)
        {"resourceType": "Observation", "status": "final", "code": {"text": "p"},
         "subject": {"reference": f"Patient/{other}"}, "performer": [ref]},
        # by a reference that is not one of the compartment's: out (Observation focus)
        {"resourceType": "Observation", "status": "final", "code": {"text": "f"},
         "focus": [ref]},
    )]
    mine = {f"{m['resourceType']}/{m['id']}" for m in (*made[:3], made[4])}

    def keys(bundle: dict[str, Any]) -> list[str]:
        return [f"{e['resource']['resourceType']}/{e['resource']['id']}"
                for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]

    whole = client.get(f"/Patient/{pid}/$everything").json()
    assert whole["type"] == "searchset" and whole["total"] == 5
    assert keys(whole)[0] == f"Patient/{pid}" and set(keys(whole)[1:]) == mine
    only = client.get(f"/Patient/{pid}/$everything", params={"_type": "Observation"}).json()
    assert keys(only) == [f"Observation/{made[1]['id']}", f"Observation/{made[4]['id']}"]
    # POSTed, the parameters come as a Parameters resource: anything else would be read
    # as none at all (fhir-kit-client sends {"_count": 3} by default)
    for body in ({"_count": 3}, {"resourceType": "Patient"}):
        refused = client.post(f"/Patient/{pid}/$everything", json=body,
                              headers={"Content-Type": "application/fhir+json"})
        assert (refused.status_code, gw_code(refused)) == (400, "GW-1028"), body
    posted = client.post(f"/Patient/{pid}/$everything", json={
        "resourceType": "Parameters", "parameter": [{"name": "_count", "valueInteger": 3}]},
        headers={"Content-Type": "application/fhir+json"}).json()
    assert len(keys(posted)) == 3
    # _type 0..*: given twice, the types of both
    both = client.get(f"/Patient/{pid}/$everything",
                      params=[("_type", "Observation"), ("_type", "Patient")]).json()
    assert set(keys(both)) == {f"Patient/{pid}", *keys(only)}
    paged, seen = client.get(f"/Patient/{pid}/$everything", params={"_count": 3}).json(), []
    while True:
        seen += keys(paged)
        following = [link["url"] for link in paged["link"] if link["relation"] == "next"]
        if not following:
            break
        paged = client.get(following[0]).json()
    assert seen == keys(whole)
    later_pages = client.get(f"/Patient/{pid}/$everything", params={"_count": 2, "_offset": 2})
    assert keys(later_pages.json()) == keys(whole)[2:4]
    assert paged_ids(client, later_pages.json()) == [k.split("/")[1] for k in keys(whole)[2:]]
    bad_offset = client.get(f"/Patient/{pid}/$everything", params={"_offset": "-2"})
    assert (bad_offset.status_code, gw_code(bad_offset)) == (400, "GW-1013")
    counted = client.get(f"/Patient/{pid}/$everything", params={"_count": 0}).json()
    assert counted["total"] == 5 and "entry" not in counted
    assert not [link for link in counted["link"] if link["relation"] == "next"]
    bad_since = client.get(f"/Patient/{pid}/$everything", params={"_since": "yesterday"})
    assert bad_since.status_code == 400 and gw_code(bad_since) == "GW-1013"
    assert "_since: 'yesterday'" in bad_since.json()["issue"][0]["diagnostics"]
    later = client.get(f"/Patient/{pid}/$everything", params={"_since": "2999-01-01"}).json()
    assert later["total"] == 0
    warned = client.get(f"/Patient/{pid}/$everything", params={"start": "2020"}).json()
    outcome = [e for e in warned["entry"] if e["search"]["mode"] == "outcome"]
    assert "start" in outcome[0]["resource"]["issue"][0]["diagnostics"]
    assert client.get(f"/Patient/{unique('none')}/$everything").status_code == 404
    assert client.get(f"/Patient/{pid}/$everything",
                      params={"_type": "Nonsense"}).status_code == 400


def test_patient_everything_brings_what_the_record_refers_to(client: httpx.Client) -> None:
    """"any resource referenced from those" (patient-operation-everything): the
    practitioners, organisations, locations and medications of the record, once each,
    and none of another patient's record."""
    pid = post(client, patient(unique("mrn"))).json()["id"]
    other = post(client, patient(unique("mrn"))).json()["id"]
    practitioner = post(client, {"resourceType": "Practitioner",
                                 "name": [{"family": unique("Doc")}]}).json()["id"]
    org = post(client, {"resourceType": "Organization", "name": unique("Org")}).json()["id"]
    location = post(client, {"resourceType": "Location", "name": unique("Loc")}).json()["id"]
    medication = post(client, {"resourceType": "Medication",
                               "code": {"text": "lisinopril"}}).json()["id"]
    unrelated = post(client, {"resourceType": "Practitioner",
                              "name": [{"family": unique("Other")}]}).json()["id"]
    foreign = post(client, {"resourceType": "Observation", "status": "final",
                            "code": {"text": "theirs"},
                            "subject": {"reference": f"Patient/{other}"}}).json()["id"]
    client.put(f"/Patient/{pid}", json={**patient(unique("mrn")), "id": pid,
                                        "generalPractitioner": [
                                            {"reference": f"Organization/{org}"}],
                                        "link": [{"other": {"reference": f"Patient/{other}"},
                                                  "type": "seealso"}]})
    me = {"reference": f"Patient/{pid}"}
    encounter = post(client, {
        "resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"},
        "subject": me, "serviceProvider": {"reference": f"Organization/{org}"},
        "participant": [{"individual": {"reference": f"Practitioner/{practitioner}"}}],
        "location": [{"location": {"reference": f"Location/{location}"}}]}).json()["id"]
    order = post(client, {
        "resourceType": "MedicationRequest", "status": "active", "intent": "order",
        "subject": me, "encounter": {"reference": f"Encounter/{encounter}"},
        "medicationReference": {"reference": f"Medication/{medication}"},
        "requester": {"reference": f"Practitioner/{practitioner}"}}).json()["id"]
    derived = post(client, {
        "resourceType": "Observation", "status": "final", "code": {"text": "mine"},
        "subject": me, "performer": [{"reference": f"Practitioner/{practitioner}"}],
        "derivedFrom": [{"reference": f"Observation/{foreign}"}]}).json()["id"]

    def keys(**params: str) -> list[str]:
        bundle = client.get(f"/Patient/{pid}/$everything", params=params).json()
        return [f"{e['resource']['resourceType']}/{e['resource']['id']}"
                for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]

    record = {f"Patient/{pid}", f"Encounter/{encounter}", f"MedicationRequest/{order}",
              f"Observation/{derived}"}
    referenced = [f"Location/{location}", f"Medication/{medication}",
                  f"Organization/{org}", f"Practitioner/{practitioner}"]
    whole = keys()
    assert set(whole[:4]) == record and whole[4:] == referenced  # after the record
    assert f"Practitioner/{unrelated}" not in whole
    # neither the linked Patient nor the other patient's Observation
    assert f"Patient/{other}" not in whole and f"Observation/{foreign}" not in whole
    # _type chooses among them, and still follows the whole record
    assert keys(_type="Practitioner,Medication") == [f"Medication/{medication}",
                                                    f"Practitioner/{practitioner}"]
    assert keys(_type="Observation") == [f"Observation/{derived}"]
    assert keys(_since="2999-01-01") == []
    client.put(f"/Organization/{org}", json={"resourceType": "Organization", "id": org,
                                             "name": unique("Renamed")})
    changed = client.get(f"/Organization/{org}").json()["meta"]["lastUpdated"]
    assert keys(_since=changed) == [f"Organization/{org}"]
    total = client.get(f"/Patient/{pid}/$everything", params={"_count": 0}).json()["total"]
    assert total == len(record) + len(referenced)


def test_patient_everything_brings_the_documents(client: httpx.Client) -> None:
    """"including binaries and attachments": the Binary whose securityContext is part
    of the record, the Binary a DocumentReference's attachment names by URL, and the
    patient's document Bundles; not another patient's."""
    pid = post(client, patient(unique("mrn"))).json()["id"]
    other = post(client, patient(unique("mrn"))).json()["id"]

    def binary(**extra: Any) -> str:
        return str(post(client, {"resourceType": "Binary", "contentType": "application/pdf",
                                 "data": "JVBERi0xLjQK", **extra}).json()["id"])

    def document(subject: str, url: str) -> str:
        return str(post(client, {
            "resourceType": "DocumentReference", "status": "current",
            "subject": {"reference": f"Patient/{subject}"},
            "content": [{"attachment": {"contentType": "application/pdf", "url": url}}],
        }).json()["id"])

    base = str(client.base_url).rstrip("/")
    by_url = binary()
    letter = document(pid, f"{base}/Binary/{by_url}")
    guarded = binary(securityContext={"reference": f"DocumentReference/{letter}"})
    relative = binary()
    report = document(pid, f"Binary/{relative}")
    theirs = binary()
    document(other, f"Binary/{theirs}")
    elsewhere = document(pid, "https://example.org/Binary/x")  # not this server's
    bundle = post(client, {
        "resourceType": "Bundle", "type": "document", "timestamp": "2026-11-20T10:00:00Z",
        "identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{uuid.uuid4()}"},
        "entry": [{"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": {
            "resourceType": "Composition", "status": "final", "type": {"text": "letter"},
            "subject": {"reference": f"Patient/{pid}"}, "date": "2026-11-20",
            "author": [{"display": "Dr X"}], "title": "Entlassbrief"}}]}).json()["id"]

    def keys(**params: str) -> set[str]:
        found = client.get(f"/Patient/{pid}/$everything", params=params).json()
        return {f"{e['resource']['resourceType']}/{e['resource']['id']}"
                for e in found.get("entry", []) if e["search"]["mode"] == "match"}

    binaries = {f"Binary/{by_url}", f"Binary/{guarded}", f"Binary/{relative}"}
    assert keys() == {f"Patient/{pid}", f"DocumentReference/{letter}",
                      f"DocumentReference/{report}", f"DocumentReference/{elsewhere}",
                      f"Bundle/{bundle}", *binaries}
    assert keys(_type="Binary") == binaries
    put(client, {"resourceType": "Binary", "id": relative, "contentType": "text/plain",
                 "data": "aGk="})
    changed = client.get(f"/Binary/{relative}",
                         headers={"Accept": "application/fhir+json"}).json()
    assert keys(_since=changed["meta"]["lastUpdated"]) == {f"Binary/{relative}"}


def test_encounter_everything(client: httpx.Client) -> None:
    """encounter-operation-everything: the Encounter, what its Encounter compartment
    holds (what names it as encounter), and what those refer to, of any type (the
    patient, the diagnoses, the practitioner, the location, the letter's Binary);
    not another encounter's resources."""
    pid = post(client, patient(unique("mrn"))).json()["id"]
    me = {"reference": f"Patient/{pid}"}
    doctor = post(client, {"resourceType": "Practitioner"}).json()["id"]
    ward = post(client, {"resourceType": "Location", "name": unique("Ward")}).json()["id"]
    earlier = post(client, {"resourceType": "Condition", "subject": me,
                            "code": {"text": "heart failure"}}).json()["id"]
    stay = post(client, {
        "resourceType": "Encounter", "status": "finished", "class": {"code": "IMP"},
        "subject": me, "diagnosis": [{"condition": {"reference": f"Condition/{earlier}"}}],
        "location": [{"location": {"reference": f"Location/{ward}"}}]}).json()["id"]
    visit = post(client, {"resourceType": "Encounter", "status": "finished",
                          "class": {"code": "AMB"}, "subject": me}).json()["id"]
    at = {"reference": f"Encounter/{stay}"}
    letter_pdf = post(client, {"resourceType": "Binary", "contentType": "application/pdf",
                               "data": "JVBERi0xLjQK"}).json()["id"]
    observation = post(client, {
        "resourceType": "Observation", "status": "final", "code": {"text": "bnp"},
        "subject": me, "encounter": at,
        "performer": [{"reference": f"Practitioner/{doctor}"}]}).json()["id"]
    letter = post(client, {
        "resourceType": "DocumentReference", "status": "current", "subject": me,
        "context": {"encounter": [at]},
        "content": [{"attachment": {"contentType": "application/pdf",
                                    "url": f"Binary/{letter_pdf}"}}]}).json()["id"]
    elsewhere = post(client, {
        "resourceType": "Observation", "status": "final", "code": {"text": "later"},
        "subject": me, "encounter": {"reference": f"Encounter/{visit}"}}).json()["id"]

    def keys(**params: str) -> list[str]:
        bundle = client.get(f"/Encounter/{stay}/$everything", params=params).json()
        assert bundle["type"] == "searchset", bundle
        return [f"{e['resource']['resourceType']}/{e['resource']['id']}"
                for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]

    record = [f"Encounter/{stay}", f"DocumentReference/{letter}",
              f"Observation/{observation}"]
    referenced = [f"Binary/{letter_pdf}", f"Condition/{earlier}", f"Location/{ward}",
                  f"Patient/{pid}", f"Practitioner/{doctor}"]
    whole = keys()
    assert whole == record + referenced
    assert f"Observation/{elsewhere}" not in whole and f"Encounter/{visit}" not in whole
    assert keys(_type="Observation,Patient") == [f"Observation/{observation}",
                                                 f"Patient/{pid}"]
    assert keys(_since="2999-01-01") == []
    first = client.get(f"/Encounter/{stay}/$everything", params={"_count": 3}).json()
    assert first["total"] == len(whole)
    following = [link["url"] for link in first["link"] if link["relation"] == "next"]
    assert following and paged_ids(client, client.get(following[0]).json()) == [
        k.split("/")[1] for k in whole[3:]]
    assert client.get(f"/Encounter/{unique('none')}/$everything").status_code == 404
    assert client.get(f"/Observation/{observation}/$everything").status_code == 404
    definitions = {(r["type"], o["definition"])
                   for r in client.get("/metadata").json()["rest"][0]["resource"]
                   for o in r.get("operation", ()) if o["name"] == "everything"}
    assert definitions == {
        ("Patient", "http://hl7.org/fhir/OperationDefinition/Patient-everything"),
        ("Encounter", "http://hl7.org/fhir/OperationDefinition/Encounter-everything")}


def test_list_finds_what_a_list_names(client: httpx.Client) -> None:
    """search.html#list: ``_list=42`` finds the resources List/42 names in its entries
    (not those marked deleted); several Lists in one value are OR-ed, repeated
    ``_list`` parameters AND-ed."""
    family = unique("Listed")
    a, b, c, d = (post(client, patient(unique("mrn"), family=family)).json()["id"]
                  for _ in range(4))
    obs = post(client, {"resourceType": "Observation", "status": "final",
                        "code": {"text": "x"}}).json()["id"]

    def worklist(*entries: dict[str, Any], mode: str = "working") -> str:
        made = post(client, {"resourceType": "List", "status": "current", "mode": mode,
                             "entry": list(entries)})
        assert made.status_code == 201, made.text
        return str(made.json()["id"])

    def item(ref: str, **more: Any) -> dict[str, Any]:
        return {"item": {"reference": ref}, **more}

    first = worklist(item(f"Patient/{a}"), item(f"Patient/{b}/_history/1"),
                     item(f"Patient/{c}", deleted=True), item(f"Observation/{obs}"),
                     item(f"{str(client.base_url).rstrip('/')}/Patient/{d}"),
                     mode="changes")  # (lst-2: only a list of changes marks deletions)
    second = worklist(item(f"Patient/{b}"), item(f"Patient/{d}"))
    empty = worklist(item(f"Observation/{obs}"))  # no patient

    def found(**params: str) -> list[str]:
        return sorted(search_ids(client, "/Patient", **params))

    assert found(_list=first) == sorted([a, b, d])  # the absolute one is this server's
    assert search_ids(client, "/Observation", _list=first) == [obs]
    assert found(_list=f"{first},{second}") == sorted([a, b, d])
    assert found(_list=second, family=family) == sorted([b, d])
    both = client.get("/Patient", params=[("_list", first), ("_list", second)])
    assert sorted(e["resource"]["id"] for e in both.json()["entry"]) == sorted([b, d])
    assert found(_list=empty) == [] and found(_list=unique("none")) == []
    # the List as it is now
    client.put(f"/List/{first}", json={"resourceType": "List", "id": first,
                                       "status": "current", "mode": "working",
                                       "entry": [item(f"Patient/{c}")]},
               headers={"Content-Type": FHIR})
    assert found(_list=first) == [c]
    # paging keeps the list's members
    page = client.get("/Patient", params={"_list": second, "_count": 1}).json()
    assert page["total"] == 2
    assert len(paged_ids(client, page)) == 2
    for bad, code in (("$current-problems", "GW-1024"), ("a b", "GW-1013")):
        refused = client.get("/Patient", params={"_list": bad},
                             headers={"Prefer": "handling=strict"})
        assert (refused.status_code, gw_code(refused)) == (400, code), bad
    # of the whole system: not supported, ignored with a warning
    system = client.get("/", params={"_list": first, "_type": "Patient"}).json()
    assert any(e["search"]["mode"] == "outcome" for e in system.get("entry", []))
    # conditional create by list membership
    made = post(client, patient(unique("mrn"), family=family),
                **{"If-None-Exist": f"_list={second}&family={family}"})
    assert made.status_code == 412  # two match


def test_search_in_the_patient_compartment(client: httpx.Client) -> None:
    # GET [base]/Patient/[id]/[type]?... (search.html#compartments)
    pid = post(client, patient(unique("mrn"))).json()["id"]
    other = post(client, patient(unique("mrn"))).json()["id"]
    ref = {"reference": f"Patient/{pid}"}
    made = [post(client, body).json()["id"] for body in (
        {"resourceType": "Observation", "status": "final", "code": {"text": "a"},
         "subject": ref},
        {"resourceType": "Observation", "status": "preliminary", "code": {"text": "b"},
         "subject": {"reference": f"Patient/{other}"}, "performer": [ref]},
        {"resourceType": "Observation", "status": "final", "code": {"text": "c"},
         "subject": {"reference": f"Patient/{other}"}},
        {"resourceType": "Observation", "status": "final", "code": {"text": "d"},
         "focus": [ref]},  # focus is not a compartment parameter
    )]
    assert sorted(search_ids(client, f"/Patient/{pid}/Observation")) == sorted(made[:2])
    assert search_ids(client, f"/Patient/{pid}/Observation", status="final") == [made[0]]
    assert search_ids(client, f"/Patient/{other}/Observation", _sort="_lastUpdated") == \
        made[1:3]
    assert search_ids(client, f"/Patient/{pid}/Patient") == [pid]
    assert search_ids(client, f"/Patient/{unique('none')}/Observation") == []
    posted = client.post(f"/Patient/{pid}/Observation/_search", data={"status": "final"})
    assert posted.status_code == 200, posted.text
    assert [e["resource"]["id"] for e in posted.json()["entry"]] == [made[0]]
    bundle = client.get(f"/Patient/{pid}/Observation", params={"_count": 1}).json()
    assert bundle["total"] == 2
    links = {link["relation"]: link["url"] for link in bundle["link"]}
    assert links["self"].endswith(f"/Patient/{pid}/Observation?_count=1")
    assert client.get(links["next"]).json()["entry"][0]["resource"]["id"] in made[:2]
    for path in (f"/Patient/{pid}/Organization", f"/Organization/{pid}/Observation",
                 f"/Organization/{pid}/*"):
        response = client.get(path)
        assert response.status_code == 400 and gw_code(response) == "GW-1024", path
    metadata = client.get("/metadata").json()
    assert "http://hl7.org/fhir/CompartmentDefinition/patient" in \
        metadata["rest"][0]["compartment"]


def test_search_of_every_type_in_a_compartment(client: httpx.Client) -> None:
    """``Patient/[id]/*`` (search.html#compartments): the patient and everything in its
    compartment, of every type; ``_type``, ``_count`` and the parameters every type has
    apply; others are ignored with a warning."""
    pid = post(client, patient(unique("mrn"))).json()["id"]
    other = post(client, patient(unique("mrn"))).json()["id"]
    me = {"reference": f"Patient/{pid}"}
    tag = {"system": "urn:test:tag", "code": unique("t")}
    made = [f"{r['resourceType']}/{r['id']}" for r in (post(client, body).json() for body in (
        {"resourceType": "Observation", "status": "final", "code": {"text": "a"},
         "subject": me, "meta": {"tag": [tag]}},
        {"resourceType": "Condition", "subject": me, "code": {"text": "b"}},
        {"resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"},
         "subject": me, "meta": {"tag": [tag]}},
        {"resourceType": "Observation", "status": "final", "code": {"text": "c"},
         "subject": {"reference": f"Patient/{other}"}},
    ))]

    def keys(path: str = f"/Patient/{pid}/*", **params: Any) -> list[str]:
        response = client.get(path, params=params)
        assert response.status_code == 200, response.text
        return [f"{e['resource']['resourceType']}/{e['resource']['id']}"
                for e in response.json().get("entry", []) if e["search"]["mode"] == "match"]

    whole = keys()
    assert whole[0] == f"Patient/{pid}" and sorted(whole[1:]) == sorted(made[:3])
    assert keys(_type="Observation,Condition") == sorted(made[:2], key=whole.index)
    assert sorted(keys(_tag=f"{tag['system']}|{tag['code']}")) == sorted([made[0], made[2]])
    assert keys(_lastUpdated="gt2999") == []
    paged = client.get(f"/Patient/{pid}/*", params={"_count": 2}).json()
    assert paged["total"] == 4 and paged_ids(client, paged) == [k.split("/")[1] for k in whole]
    posted = client.post(f"/Patient/{pid}/*/_search", data={"_type": "Condition"})
    assert [e["resource"]["id"] for e in posted.json()["entry"]] == [made[1].split("/")[1]]
    warned = client.get(f"/Patient/{pid}/*", params={"status": "final", "_count": 5}).json()
    assert [e for e in warned["entry"] if e["search"]["mode"] == "outcome"]
    # the self link names what was used, not what was ignored (search.html#selflink)
    self_link = next(x["url"] for x in warned["link"] if x["relation"] == "self")
    assert "_count=5" in self_link and "status" not in self_link
    strict = client.get(f"/Patient/{pid}/*", params={"status": "final"},
                        headers={"Prefer": "handling=strict"})
    assert (strict.status_code, gw_code(strict)) == (400, "GW-1014")
    # another compartment: what names the encounter
    stay = made[2].split("/")[1]
    assert keys(f"/Encounter/{stay}/*") == [made[2]]
    assert keys(f"/Patient/{unique('none')}/*") == []


def test_search_in_the_other_compartments(client: httpx.Client) -> None:
    """R4 defines four more compartments (Encounter, Practitioner, RelatedPerson,
    Device): ``Encounter/[id]/Observation`` finds what any of the Encounter
    compartment's parameters of Observation names that encounter."""
    pid = post(client, patient(unique("mrn"))).json()["id"]
    subject = {"reference": f"Patient/{pid}"}
    doctor = post(client, {"resourceType": "Practitioner", "name": [{"family": "Arzt"}]}
                  ).json()["id"]
    nurse = post(client, {"resourceType": "Practitioner"}).json()["id"]
    device = post(client, {"resourceType": "Device"}).json()["id"]
    mother = post(client, {"resourceType": "RelatedPerson", "patient": subject}).json()["id"]
    stay = post(client, {"resourceType": "Encounter", "status": "finished",
                         "class": {"code": "IMP"}, "subject": subject}).json()["id"]
    visit = post(client, {"resourceType": "Encounter", "status": "finished",
                          "class": {"code": "AMB"}, "subject": subject}).json()["id"]

    def observation(status: str, **more: Any) -> str:
        return post(client, {"resourceType": "Observation", "status": status,
                             "code": {"text": "x"}, "subject": subject, **more}).json()["id"]

    in_stay = observation("final", encounter={"reference": f"Encounter/{stay}"},
                          performer=[{"reference": f"Practitioner/{doctor}"}])
    in_visit = observation("preliminary", encounter={"reference": f"Encounter/{visit}"},
                           performer=[{"reference": f"RelatedPerson/{mother}"}])
    measured = observation("final", device={"reference": f"Device/{device}"})
    by_device = post(client, {"resourceType": "Observation", "status": "final",
                              "code": {"text": "x"},
                              "subject": {"reference": f"Device/{device}"}}).json()["id"]
    asked = post(client, {"resourceType": "ServiceRequest", "status": "active",
                          "intent": "order", "subject": subject,
                          "requester": {"reference": f"Practitioner/{nurse}"},
                          "performer": [{"reference": f"Practitioner/{doctor}"}]}
                 ).json()["id"]
    cared = post(client, patient(unique("mrn"), generalPractitioner=[
        {"reference": f"Practitioner/{doctor}"}])).json()["id"]

    def found(path: str, **params: str) -> list[str]:
        return sorted(search_ids(client, path, **params))

    assert found(f"/Encounter/{stay}/Observation") == [in_stay]
    assert found(f"/Encounter/{visit}/Observation") == [in_visit]
    assert found(f"/Encounter/{visit}/Observation", status="final") == []
    assert found(f"/Encounter/{stay}/Encounter") == [stay]  # {def}: the encounter itself
    assert found(f"/Practitioner/{doctor}/Observation") == [in_stay]
    # ServiceRequest is in a practitioner's compartment as performer or requester
    assert found(f"/Practitioner/{doctor}/ServiceRequest") == [asked]
    assert found(f"/Practitioner/{nurse}/ServiceRequest") == [asked]
    assert found(f"/Practitioner/{nurse}/Observation") == []
    assert found(f"/Practitioner/{doctor}/Patient") == [cared]
    assert found(f"/Practitioner/{doctor}/Practitioner") == [doctor]
    assert found(f"/RelatedPerson/{mother}/Observation") == [in_visit]
    assert found(f"/Device/{device}/Observation") == sorted([measured, by_device])
    # the patient's compartment is not the device's: its subject is the device
    assert by_device not in search_ids(client, f"/Patient/{pid}/Observation")
    posted = client.post(f"/Encounter/{stay}/Observation/_search", data={"status": "final"})
    assert [e["resource"]["id"] for e in posted.json()["entry"]] == [in_stay]
    # paging keeps the compartment
    page = client.get(f"/Device/{device}/Observation", params={"_count": 1}).json()
    links = {link["relation"]: link["url"] for link in page["link"]}
    assert links["self"].endswith(f"/Device/{device}/Observation?_count=1")
    second = client.get(links["next"]).json()
    assert {page["entry"][0]["resource"]["id"], second["entry"][0]["resource"]["id"]} == \
        {measured, by_device}
    # not in the compartment, or no compartment at all
    for path in (f"/Device/{device}/Device", f"/Encounter/{stay}/Practitioner",
                 f"/Location/{stay}/Observation"):
        response = client.get(path)
        assert (response.status_code, gw_code(response)) == (400, "GW-1024"), path
    assert "Device, Encounter, Patient, Practitioner, RelatedPerson" in \
        client.get(f"/Location/{stay}/Observation").json()["issue"][0]["diagnostics"]
    resources = {r["type"]: r for r in client.get("/metadata").json()["rest"][0]["resource"]}
    # the profiles a write is validated against when it claims them
    assert resources["Task"]["supportedProfile"] == [
        "https://carepath-gateway.org/fhir/StructureDefinition/handoff-task"]
    assert "http://hl7.org/fhir/StructureDefinition/bp" in \
        resources["Observation"]["supportedProfile"]
    assert "supportedProfile" not in resources["Patient"]
    assert client.get("/metadata").json()["rest"][0]["compartment"] == [
        f"http://hl7.org/fhir/CompartmentDefinition/{c}"
        for c in ("device", "encounter", "patient", "practitioner", "relatedPerson")]


def test_every_type_of_every_compartment_can_be_searched(client: httpx.Client) -> None:
    """Each (compartment, type) pair of R4's definitions makes a search (its first
    parameter and the others read together): none is refused or fails."""
    from gateway.registry.registry import Registry

    for kind, members in Registry.load().compartments.items():
        for rt in members:
            response = client.get(f"/{kind}/{unique('x')}/{rt}")
            assert response.status_code == 200, (kind, rt, response.text)
            assert response.json().get("total") in (0, None), (kind, rt)


def test_a_code_searches_with_the_system_its_binding_implies(client: httpx.Client) -> None:
    family = unique("Fam")
    rid = post(client, patient(unique("mrn"), family=family)).json()["id"]
    gender = patient(unique("mrn"))["gender"]
    system = "http://hl7.org/fhir/administrative-gender"
    assert search_ids(client, "/Patient", family=family, gender=f"{system}|{gender}") == [rid]
    assert search_ids(client, "/Patient", family=family, gender=gender) == [rid]
    assert search_ids(client, "/Patient", family=family, gender=f"urn:other|{gender}") == []
    # R4's required-binding value sets are held: :in works with them
    assert search_ids(client, "/Patient", family=family, **{
        "gender:in": "http://hl7.org/fhir/ValueSet/administrative-gender"}) == [rid]
    assert search_ids(client, "/Patient", family=family, **{
        "gender:not-in": "http://hl7.org/fhir/ValueSet/administrative-gender"}) == []


def test_values_longer_than_an_index_entry_are_stored_and_found(client: httpx.Client) -> None:
    """PostgreSQL's B-tree takes at most 2,704 bytes an entry: long values are clipped in
    the index (and in searches), never a 500."""
    rnd = random.Random(7)
    family = "".join(chr(rnd.randint(0x4E00, 0x9FFF)) for _ in range(1500))  # 4,500 bytes
    system = "urn:" + "".join(rnd.choice(string.ascii_letters) for _ in range(1900))
    value = "".join(rnd.choice(string.ascii_letters) for _ in range(1900))
    body = {"resourceType": "Patient", "name": [{"family": family}],
            "identifier": [{"system": system, "value": value}],
            "meta": {"profile": ["http://example.org/" + value]}}
    created = client.post("/Patient", json=body, headers={"Content-Type": FHIR})
    assert created.status_code == 201, created.text
    pid = created.json()["id"]
    assert search_ids(client, "/Patient", identifier=f"{system}|{value}") == [pid]
    assert search_ids(client, "/Patient", family=family) == [pid]
    assert search_ids(client, "/Patient", _profile="http://example.org/" + value) == [pid]
    # read back whole: only the index is clipped
    assert client.get(f"/Patient/{pid}").json()["name"][0]["family"] == family


@pytest.fixture(scope="module", params=BACKENDS)
def reading_ahead(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                  new_schema: Any) -> Iterator[httpx.Client]:
    """A gateway whose searches read four matches ahead (1,000 by default)."""
    settings = backend_settings(request.param, tmp_path_factory.mktemp("ahead"), new_schema,
                                search_read_ahead=4)
    with RunningServer(settings) as running, httpx.Client(
            base_url=running.url, timeout=30, headers={"Accept": FHIR}) as c:
        yield c


def test_a_long_result_is_read_on_when_paged_beyond_its_head(
        reading_ahead: httpx.Client) -> None:
    client = reading_ahead
    family = unique("Ahead")
    ids = _family_patients(client, family, 9)
    first = client.get("/Patient", params={"family": family, "_count": 2,
                                           "_sort": "birthdate"}).json()
    # the first page read four ahead: no total unless asked for one
    assert "total" not in first and len(first["entry"]) == 2
    for asked in ("accurate", "estimate"):
        counted = client.get("/Patient", params={"family": family, "_count": 2,
                                                 "_total": asked}).json()
        assert counted["total"] == 9
    # writes before the pages beyond the head are read: a match deleted beyond it
    # goes, one deleted in it leaves its page short (nothing shifts), and matches
    # created since are not in a result that began before them
    assert client.delete(f"/Patient/{ids[7]}").status_code in (200, 204)
    assert client.delete(f"/Patient/{ids[2]}").status_code in (200, 204)
    early = _family_patients(client, family, 1)[0]  # born 1950, as ids[0]
    late = post(client, patient(unique("mrn"), family=family, birthDate="1999-01-01")
                ).json()["id"]
    seen = paged_ids(client, first)
    # the head (ids[0:4]) as first read, less what was deleted since; then the rest
    assert seen == [ids[0], ids[1], ids[3], *ids[4:7], ids[8]]
    assert early not in seen and late not in seen
    # a search begun now finds them, the 1950 one among the first
    now = search_ids(client, "/Patient", family=family, _sort="birthdate", _count=20)
    assert now[:2] == [ids[0], early] and now[-1] == late
    # paging the same search again reads the same completed result
    following = dict(parse_qsl(urlsplit(next(
        x["url"] for x in first["link"] if x["relation"] == "next")).query))
    again = client.get("", params={**following, "_getpagesoffset": "4"}).json()
    assert [e["resource"]["id"] for e in again["entry"]] == [ids[4], ids[5]]
    # a compartment's search reads on within the compartment
    pid, other = ids[0], ids[3]
    mine = [post(client, {"resourceType": "Observation", "status": "final",
                          "code": {"text": str(n)}, "subject": {"reference": f"Patient/{pid}"}}
                 ).json()["id"] for n in range(6)]
    for _ in range(3):
        post(client, {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                      "subject": {"reference": f"Patient/{other}"}})
    page = client.get(f"/Patient/{pid}/Observation", params={"_count": 2}).json()
    assert "total" not in page
    assert paged_ids(client, page) == mine


async def _held(settings: Settings) -> list[int]:
    """How many keys each kept result set of the gateway's database holds."""
    db = open_database(settings.database_url, schema=settings.database_schema)
    await db.open()
    try:
        async with db.read() as conn:
            return [int(r[0]) for r in await conn.fetch(
                "SELECT held FROM search_snapshot ORDER BY created")]
    finally:
        await db.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_long_result_is_read_on_as_far_as_its_pages_go(
        backend: str, tmp_path: Path, new_schema: Any) -> None:
    """Paging past what the first search read ahead reads on twice as far as was
    kept, not the whole result: a client reading a few pages does not pay for all
    of them. Every match is still shown once, in order, across several readings
    on, with writes between them."""
    settings = backend_settings(backend, tmp_path, new_schema, search_read_ahead=4)
    with RunningServer(settings) as running, httpx.Client(
            base_url=running.url, timeout=30, headers={"Accept": FHIR}) as client:
        family = unique("Far")
        ids = _family_patients(client, family, 30)
        page = client.get("/Patient", params={"family": family, "_count": 3,
                                              "_sort": "birthdate"}).json()
        seen: list[str] = []
        # the first search kept two pages' worth (6); the page at 6 reads on to 12,
        # the page at 9 reads what is kept
        for _ in range(3):
            seen += [e["resource"]["id"] for e in page["entry"]]
            page = client.get(next(x["url"] for x in page["link"]
                                   if x["relation"] == "next")).json()
        assert asyncio.run(_held(settings)) == [12]
        # beyond what is kept: one deleted goes, one created since is not shown
        assert client.delete(f"/Patient/{ids[20]}").status_code in (200, 204)
        post(client, patient(unique("mrn"), family=family, birthDate="1972-06-01"))
        seen += paged_ids(client, page)
        assert seen == [*ids[:20], *ids[21:]]
        assert asyncio.run(_held(settings)) == [29]


def test_has_and_display_text_results_page_through(client: httpx.Client) -> None:
    """A reverse chain and a display's text gather every match before the first:
    their results page like any other, each match once, with a total."""
    code, word = unique("code"), unique("wort").lower()
    referred = _family_patients(client, unique("Fam"), 5)
    _family_patients(client, unique("Fam"), 2)  # nothing refers to these
    observations = [post(client, {
        "resourceType": "Observation", "status": "final",
        "subject": {"reference": f"Patient/{pid}"},
        "code": {"coding": [{"system": "urn:test:code", "code": code,
                             "display": f"Messung {word}"}]}}).json()["id"]
        for pid in referred]
    first = client.get("/Patient", params={
        "_has:Observation:subject:code": f"urn:test:code|{code}", "_count": 2}).json()
    assert first["total"] == 5
    assert sorted(paged_ids(client, first)) == sorted(referred)
    first = client.get("/Observation", params={"code:text": word, "_count": 2}).json()
    assert first["total"] == 5
    assert sorted(paged_ids(client, first)) == sorted(observations)


def test_location_near_a_position(client: httpx.Client) -> None:
    """location.html#positional: great-circle distance, units, the antimeridian."""
    run = unique("near")
    places = {"Leipzig": (51.3397, 12.3731), "Berlin": (52.5200, 13.4050),
              "Muenchen": (48.1351, 11.5820), "Suva": (-18.1248, 178.4501),
              "Apia": (-13.8333, -171.7500), "Nowhere": None}
    for name, position in places.items():
        body: dict[str, Any] = {"resourceType": "Location", "name": name,
                                "identifier": [{"system": "urn:test:near", "value": run}]}
        if position:
            body["position"] = {"latitude": position[0], "longitude": position[1]}
        assert post(client, body).status_code == 201

    def near(value: str, **more: str) -> list[str]:
        response = client.get("/Location", params={
            "identifier": f"urn:test:near|{run}", "near": value, **more})
        assert response.status_code == 200, response.text
        return sorted(e["resource"]["name"] for e in response.json().get("entry", [])
                      if e["search"]["mode"] == "match")

    # Leipzig to Berlin is 149 km, to Munich 360 km
    assert near("51.3397|12.3731|10|km") == ["Leipzig"]
    assert near("51.3397|12.3731|160") == ["Berlin", "Leipzig"]
    assert near("51.3397|12.3731|140000|m") == ["Leipzig"]
    assert near("51.3397|12.3731|100|[mi_i]") == ["Berlin", "Leipzig"]
    assert near("51.3397|12.3731|400|km") == ["Berlin", "Leipzig", "Muenchen"]
    assert near("51.3397|12.3731") == ["Leipzig"]  # no distance: that position
    assert near("51.3397|12.3731|5|km,48.1351|11.582|5|km") == ["Leipzig", "Muenchen"]
    # Suva and Apia lie on either side of the antimeridian, 1,150 km apart
    assert near("-14|-179|1300|km") == ["Apia", "Suva"]
    assert near("-18.1248|178.4501|1200|km") == ["Apia", "Suva"]
    assert near("-18.1248|178.4501|1100|km") == ["Suva"]
    missing = client.get("/Location", params={"identifier": f"urn:test:near|{run}",
                                              "near:missing": "true"}).json()
    assert [e["resource"]["name"] for e in missing["entry"]] == ["Nowhere"]
    bad = client.get("/Location", params={"near": "51.3|12.3|1|furlong"})
    assert bad.status_code == 400 and gw_code(bad) == "GW-1013"
    # nearest first, each match with its distance (the location-distance extension)
    found = client.get("/Location", params={
        "identifier": f"urn:test:near|{run}", "near": "51.3397|12.3731|1000|km",
        "_sort": "near"}).json()["entry"]
    assert [e["resource"]["name"] for e in found] == ["Leipzig", "Berlin", "Muenchen"]
    distances = [e["search"]["extension"][0] for e in found]
    assert all(d["url"] == "http://hl7.org/fhir/StructureDefinition/location-distance"
               and d["valueDistance"]["code"] == "m" for d in distances)
    assert [round(d["valueDistance"]["value"] / 1000) for d in distances] == [0, 149, 361]
    farthest = client.get("/Location", params={
        "identifier": f"urn:test:near|{run}", "near": "51.3397|12.3731|1000|km",
        "_sort": "-near"}).json()["entry"]
    assert [e["resource"]["name"] for e in farthest] == ["Muenchen", "Berlin", "Leipzig"]
    # from the nearest of two positions (ties in the order of creation)
    two = client.get("/Location", params={
        "identifier": f"urn:test:near|{run}", "near": "48.1351|11.582|1000,52.52|13.405|1000",
        "_sort": "near"}).json()["entry"]
    assert [e["resource"]["name"] for e in two] == ["Berlin", "Muenchen", "Leipzig"]
    assert two[2]["search"]["extension"][0]["valueDistance"]["value"] == pytest.approx(
        149_096, abs=2)
    unmeasured = client.get("/Location", params={"_sort": "near"})
    assert unmeasured.status_code == 400 and gw_code(unmeasured) == "GW-1013"
    capability = client.get("/metadata").json()["rest"][0]["resource"]
    location = next(r for r in capability if r["type"] == "Location")
    assert {"name": "near", "type": "special",
            "definition": "http://hl7.org/fhir/SearchParameter/Location-near"} in \
        location["searchParam"]


def _form_search(client: httpx.Client, resource_type: str,
                 pairs: list[tuple[str, str]]) -> httpx.Response:
    return client.post(f"/{resource_type}/_search", content=urlencode(pairs),
                       headers={"Content-Type": "application/x-www-form-urlencoded"})


def test_long_value_lists_are_answered_and_costlier_searches_refused(
        client: httpx.Client) -> None:
    """A search of up to 1,000 values is answered on either database (SQLite refuses
    expressions deeper than 1,000: the values' conditions nest); beyond that, or beyond
    32 parameters, the search is refused as too costly, never an internal error."""
    family = unique("fam")
    ids = _family_patients(client, family, 2)
    mrns = [client.get(f"/Patient/{i}").json()["identifier"][0]["value"] for i in ids]
    fillers = [f"x{i}" for i in range(998)]
    for name, values in (("family", [*fillers, family]),
                         ("identifier", [*fillers, *mrns]),
                         ("general-practitioner", [f"Practitioner/{v}" for v in fillers])):
        response = _form_search(client, "Patient", [(name, ",".join(values))])
        assert response.status_code == 200, (name, response.text[:300])
        found = {e["resource"]["id"] for e in response.json().get("entry", [])}
        assert found == (set() if name == "general-practitioner" else set(ids)), name
    # in a chain the values are tested for every type the reference may point to
    chained = _form_search(client, "Observation", [("subject.name", ",".join(fillers[:501]))])
    assert (chained.status_code, gw_code(chained)) == (400, "GW-1029"), chained.text[:300]
    assert chained.json()["issue"][0]["code"] == "too-costly"
    for pairs in ([("family", ",".join([*fillers, "a", "b", "c"]))],
                  [("family", ",".join(fillers[:500])), ("given", ",".join(fillers[:501]))],
                  [("family", f"f{i}") for i in range(33)]):
        response = _form_search(client, "Patient", pairs)
        assert (response.status_code, gw_code(response)) == (400, "GW-1029"), response.text
    allowed = _form_search(client, "Patient", [("family", family)] * 32)
    assert {e["resource"]["id"] for e in allowed.json()["entry"]} == set(ids)


def test_offset_and_page_paging(client: httpx.Client) -> None:
    """``_offset`` (HAPI FHIR, Medplum) and ``_page`` (Aidbox) address a page by its
    position; the links keep the client's way of paging."""
    family = unique("Off")
    ids = _family_patients(client, family, 7)  # birth dates ascend with creation order

    def get(**params: Any) -> dict[str, Any]:
        response = client.get("/Patient", params={"family": family, "_sort": "birthdate",
                                                  **params})
        assert response.status_code == 200, response.text
        return dict(response.json())

    def rel(bundle: dict[str, Any], relation: str) -> dict[str, str] | None:
        url = next((x["url"] for x in bundle["link"] if x["relation"] == relation), None)
        return dict(parse_qsl(urlsplit(url).query)) if url else None

    def matches(bundle: dict[str, Any]) -> list[str]:
        return [e["resource"]["id"] for e in bundle.get("entry", [])]

    page = get(_offset=2, _count=3)
    assert matches(page) == ids[2:5]
    assert "total" not in page  # more follow: counted only when asked
    assert rel(page, "next") == {"family": family, "_sort": "birthdate", "_offset": "5",
                                 "_count": "3"}
    assert rel(page, "previous") == {"family": family, "_sort": "birthdate", "_offset": "0",
                                     "_count": "3"}
    assert get(_offset=2, _count=3, _total="accurate")["total"] == 7
    assert paged_ids(client, get(_offset=0, _count=3)) == ids
    last = get(_offset=5, _count=3)
    assert (matches(last), last["total"], rel(last, "next")) == (ids[5:], 7, None)
    beyond = get(_offset=50)
    assert (matches(beyond), beyond["total"]) == ([], 7)
    second = get(_page=2, _count=3)
    assert matches(second) == ids[3:6]
    assert rel(second, "next") == {"family": family, "_sort": "birthdate", "_page": "3",
                                   "_count": "3"}
    assert rel(second, "previous")["_page"] == "1"  # type: ignore[index]
    assert paged_ids(client, get(_page=1, _count=2)) == ids
    for bad in ({"_offset": "-1"}, {"_page": "0"}):
        response = client.get("/Patient", params=bad)
        assert (response.status_code, gw_code(response)) == (400, "GW-1013")



def test_canonical_references_are_followed_by_includes_chains_and_has(
        client: httpx.Client) -> None:
    """search.html#reference: a reference may name a resource "by its canonical URL";
    includes, chains and ``_has`` follow such a reference as they follow a literal
    one (HAPI FHIR does since 5.7)."""
    run = unique("q")
    url = f"http://example.org/Questionnaire/{run}"
    q = put(client, {"resourceType": "Questionnaire", "id": run, "url": url,
                     "version": "2.0", "name": f"Q{run.replace('-', '')}", "status": "active"}
            ).json()
    other = post(client, {"resourceType": "Questionnaire", "status": "active",
                          "url": f"{url}-other"}).json()
    answers = {}
    for name, ref in (("versioned", f"{url}|2.0"), ("plain", url),
                      ("literal", f"Questionnaire/{run}"), ("elsewhere", f"{url}-other")):
        answers[name] = post(client, {"resourceType": "QuestionnaireResponse",
                                      "status": "completed", "questionnaire": ref,
                                      "identifier": {"system": "urn:test:qr",
                                                     "value": f"{run}-{name}"}}).json()["id"]
    ours = {answers[n] for n in ("versioned", "plain", "literal")}

    def entries(path: str, **params: str) -> dict[str, set[str]]:
        response = client.get(path, params=params)
        assert response.status_code == 200, response.text
        out: dict[str, set[str]] = {}
        for e in response.json().get("entry", []):
            out.setdefault(e["search"]["mode"], set()).add(
                f"{e['resource']['resourceType']}/{e['resource']['id']}")
        return out

    for name in ("versioned", "plain"):
        found = entries("/QuestionnaireResponse", _id=answers[name],
                        _include="QuestionnaireResponse:questionnaire")
        assert found["include"] == {f"Questionnaire/{q['id']}"}, (name, found)
    found = entries("/Questionnaire", _id=q["id"],
                    _revinclude="QuestionnaireResponse:questionnaire")
    assert found["include"] == {f"QuestionnaireResponse/{i}" for i in ours}
    # chained, by the Questionnaire's url or any other of its parameters
    for params in ({"questionnaire.url": url}, {"questionnaire.name": q["name"]},
                   {"questionnaire:Questionnaire.version": "2.0"},
                   {"questionnaire.url": url, "status": "completed",
                    "identifier:missing": "false"}):
        found = entries("/QuestionnaireResponse", **params)
        assert found["match"] == {f"QuestionnaireResponse/{i}" for i in ours}, params
    # reverse chained: the Questionnaires answered
    found = entries("/Questionnaire", **{
        "_has:QuestionnaireResponse:questionnaire:identifier": f"urn:test:qr|{run}-plain"})
    assert found["match"] == {f"Questionnaire/{q['id']}"}
    found = entries("/Questionnaire", _id=f"{q['id']},{other['id']}", **{
        "_has:QuestionnaireResponse:questionnaire:status": "completed"})
    assert found["match"] == {f"Questionnaire/{q['id']}", f"Questionnaire/{other['id']}"}
    # iterated from what was included by url
    found = entries("/QuestionnaireResponse", _id=answers["plain"],
                    _include="QuestionnaireResponse:questionnaire",
                    **{"_revinclude:iterate": "QuestionnaireResponse:questionnaire"})
    assert found["include"] == {f"Questionnaire/{q['id']}",
                                *(f"QuestionnaireResponse/{i}" for i in ours - {
                                    answers["plain"]})}
