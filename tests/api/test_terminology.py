"""Terminology operations over HTTP, on SQLite and PostgreSQL: $lookup, $expand,
$validate-code, $translate -- type and instance level, GET and POST, own and stored content."""

from __future__ import annotations

import time
from typing import Any

import httpx

from tests.api.helpers import FHIR, gw_code, post
from tests.conftest import unique

B = "https://carepath-gateway.org/fhir"
CARE_LEVEL = f"{B}/CodeSystem/care-level"
LINE = f"{B}/CodeSystem/dutch-care-line"


def values(body: dict[str, Any]) -> dict[str, Any]:
    assert body["resourceType"] == "Parameters", body
    out: dict[str, Any] = {}
    for p in body["parameter"]:
        value = p.get("part") or next(v for k, v in p.items() if k.startswith("value"))
        out.setdefault(p["name"], []).append(value)
    return {k: v[0] if len(v) == 1 and k not in ("match", "property", "designation") else v
            for k, v in out.items()}


def parameters(*parts: tuple[str, str, Any]) -> dict[str, Any]:
    return {"resourceType": "Parameters",
            "parameter": [{"name": n, k: v} for n, k, v in parts]}


def codes(body: dict[str, Any]) -> list[str]:
    return [c["code"] for c in body["expansion"].get("contains", [])]


def test_lookup_by_get_and_post(client: httpx.Client) -> None:
    r = client.get("/CodeSystem/$lookup", params={
        "system": f"{B}/CodeSystem/handoff-obligation", "code": "H7"})
    assert r.status_code == 200, r.text
    got = values(r.json())
    assert got["display"] == "Second-opinion referral before admission"
    assert got["name"] == "HandoffObligation"
    r = client.post("/CodeSystem/$lookup", headers={"Content-Type": FHIR}, json=parameters(
        ("coding", "valueCoding", {"system": "http://loinc.org", "code": "72514-3"}),
        ("property", "valueCode", "designation")))
    assert r.status_code == 200, r.text
    assert values(r.json())["display"].startswith("Pain severity - 0-10")


def test_lookup_errors(client: httpx.Client) -> None:
    r = client.get("/CodeSystem/$lookup", params={"system": "urn:nowhere", "code": "x"})
    assert (r.status_code, gw_code(r)) == (404, "GW-4301")
    r = client.get("/CodeSystem/$lookup", params={"system": CARE_LEVEL, "code": "level-7"})
    assert (r.status_code, gw_code(r)) == (404, "GW-4304")
    r = client.get("/CodeSystem/$lookup", params={"code": "level-1"})
    assert (r.status_code, gw_code(r)) == (400, "GW-4305")
    r = client.get("/CodeSystem/care-level/$lookup", params={"code": "level-1"})
    assert r.status_code == 404  # R4 defines $lookup at type level only


def test_expand_by_url_with_filter_and_paging(client: httpx.Client) -> None:
    r = client.get("/ValueSet/$expand", params={
        "url": f"{B}/ValueSet/pathway-care-level", "offset": "1", "count": "2"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["resourceType"] == "ValueSet" and codes(body) == ["level-2", "level-3"]
    assert body["expansion"]["total"] == 7 and body["expansion"]["offset"] == 1
    r = client.get("/ValueSet/$expand", params={
        "url": f"{B}/ValueSet/handoff-obligation", "filter": "DMP"})
    assert codes(r.json()) == ["H11", "H12"]


def test_expand_instance_of_the_gateways_own_value_set(client: httpx.Client) -> None:
    r = client.get("/ValueSet/escalation-criterion/$expand")
    assert r.status_code == 200, r.text
    assert "escalate-complexity" in codes(r.json()) and "escalate" not in codes(r.json())
    r = client.get("/ValueSet/no-such-value-set/$expand")
    assert (r.status_code, gw_code(r)) == (404, "GW-4302")


def test_expand_a_value_set_given_in_the_request(client: httpx.Client) -> None:
    value_set = {"resourceType": "ValueSet", "status": "active", "url": "urn:test:inline",
                 "compose": {"include": [{"system": CARE_LEVEL, "filter": [
                     {"property": "level", "op": "in", "value": "3,4"}]}]}}
    r = client.post("/ValueSet/$expand", headers={"Content-Type": FHIR}, json=parameters(
        ("valueSet", "resource", value_set), ("includeDesignations", "valueBoolean", True)))
    assert r.status_code == 200, r.text
    assert codes(r.json()) == ["level-3", "level-4"]
    assert r.json()["expansion"]["contains"][0]["designation"][0]["language"] == "de"


def test_expand_bad_parameters_are_400(client: httpx.Client) -> None:
    r = client.get("/ValueSet/$expand", params={"url": f"{B}/ValueSet/care-level",
                                                "count": "many"})
    assert (r.status_code, gw_code(r)) == (400, "GW-4305")
    r = client.get("/ValueSet/$expand")
    assert (r.status_code, gw_code(r)) == (400, "GW-4305")


def test_validate_code_type_and_instance_level(client: httpx.Client) -> None:
    r = client.get("/ValueSet/$validate-code", params={
        "url": f"{B}/ValueSet/follow-up-care-level", "system": CARE_LEVEL, "code": "level-1"})
    assert r.status_code == 200, r.text
    assert values(r.json()) == {"result": True, "display": "Level 1: general practitioner"}
    r = client.get("/ValueSet/follow-up-care-level/$validate-code", params={
        "system": CARE_LEVEL, "code": "level-3"})
    got = values(r.json())
    assert got["result"] is False and "level-3" in got["message"]
    r = client.get("/ValueSet/pathway-condition/$validate-code", params={
        "coding": "http://fhir.de/CodeSystem/bfarm/icd-10-gm|I25.11"})
    assert values(r.json())["result"] is True


def test_validate_code_with_a_codeable_concept(client: httpx.Client) -> None:
    concept = {"coding": [{"system": "urn:local", "code": "III"},
                          {"system": "http://snomed.info/sct", "code": "420913000",
                           "display": "New York Heart Association Classification - Class III"}]}
    r = client.post("/ValueSet/nyha-class/$validate-code", headers={"Content-Type": FHIR},
                    json=parameters(("codeableConcept", "valueCodeableConcept", concept)))
    assert r.status_code == 200, r.text
    assert values(r.json())["result"] is True


def test_validate_code_against_a_code_system(client: httpx.Client) -> None:
    r = client.get("/CodeSystem/$validate-code", params={"url": LINE, "code": "third-line",
                                                         "display": "derde lijn"})
    assert values(r.json())["result"] is True
    r = client.get("/CodeSystem/dutch-care-line/$validate-code", params={"code": "fourth-line"})
    assert values(r.json())["result"] is False


def test_translate_type_and_instance_level(client: httpx.Client) -> None:
    r = client.get("/ConceptMap/$translate", params={
        "system": LINE, "code": "first-line", "source": f"{B}/ValueSet/dutch-care-line"})
    assert r.status_code == 200, r.text
    got = values(r.json())
    assert got["result"] is True
    assert [(m[0]["valueCode"], m[1]["valueCoding"]["code"]) for m in got["match"]] == [
        ("narrower", "level-1")]
    r = client.get("/ConceptMap/care-level-to-dutch-line/$translate", params={
        "system": CARE_LEVEL, "code": "level-4"})
    match = values(r.json())["match"][0]
    assert match[1]["valueCoding"] == {"system": LINE, "code": "second-line",
                                       "display": "Second line"}
    r = client.get("/ConceptMap/dutch-line-to-care-level/$translate", params={
        "system": CARE_LEVEL, "code": "level-1", "reverse": "true"})
    assert values(r.json())["match"][0][0] == {"name": "equivalence", "valueCode": "wider"}
    r = client.get("/ConceptMap/nope/$translate", params={"system": LINE, "code": "first-line"})
    assert (r.status_code, gw_code(r)) == (404, "GW-4303")


def test_stored_terminology_is_used_too(client: httpx.Client) -> None:
    tag = unique("term")
    cs_url, vs_url = f"urn:test:{tag}:cs", f"urn:test:{tag}:vs"
    cs = {"resourceType": "CodeSystem", "url": cs_url, "version": "1", "name": "Stored",
          "status": "active", "content": "complete",
          "concept": [{"code": "a", "display": "Alpha"}, {"code": "b", "display": "Beta"}]}
    vs = {"resourceType": "ValueSet", "url": vs_url, "status": "active",
          "compose": {"include": [{"system": cs_url, "concept": [{"code": "b"}]}]}}
    assert post(client, cs).status_code == 201
    created = post(client, vs)
    assert created.status_code == 201, created.text
    vs_id = created.json()["id"]
    r = client.get("/ValueSet/$expand", params={"url": vs_url})
    assert r.status_code == 200, r.text
    assert r.json()["expansion"]["contains"] == [
        {"system": cs_url, "version": "1", "code": "b", "display": "Beta"}]
    r = client.get(f"/ValueSet/{vs_id}/$validate-code", params={"system": cs_url, "code": "a"})
    assert values(r.json())["result"] is False
    r = client.get("/CodeSystem/$lookup", params={"system": cs_url, "code": "a"})
    assert values(r.json())["display"] == "Alpha"


def test_r4s_code_systems_are_held(client: httpx.Client) -> None:
    """R4's code systems, and the HL7 terminology its package carries, answer $lookup
    and are there for the value sets an implementation guide defines over them (IPS:
    every observation status but entered-in-error)."""
    r = client.get("/CodeSystem/$lookup", params={
        "system": "http://hl7.org/fhir/observation-status", "code": "final"})
    assert r.status_code == 200, r.text
    assert values(r.json())["display"] == "Final"
    r = client.get("/CodeSystem/$lookup", params={
        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
        "code": "laboratory"})
    assert values(r.json())["display"] == "Laboratory"
    vs_url = f"urn:test:{unique('status')}:vs"
    vs = {"resourceType": "ValueSet", "url": vs_url, "status": "active", "compose": {
        "include": [{"system": "http://hl7.org/fhir/observation-status"}],
        "exclude": [{"system": "http://hl7.org/fhir/observation-status",
                     "concept": [{"code": "entered-in-error"}]}]}}
    assert post(client, vs).status_code == 201
    expanded = client.get("/ValueSet/$expand", params={"url": vs_url})
    assert expanded.status_code == 200, expanded.text
    assert sorted(codes(expanded.json())) == ["amended", "cancelled", "corrected", "final",
                                              "preliminary", "registered", "unknown"]
    r = client.get("/ValueSet/$validate-code", params={
        "url": vs_url, "system": "http://hl7.org/fhir/observation-status",
        "code": "entered-in-error"})
    assert values(r.json())["result"] is False


def test_capability_statement_advertises_the_operations(client: httpx.Client) -> None:
    statement = client.get("/metadata").json()
    ops = {r["type"]: {o["name"] for o in r.get("operation", [])}
           for r in statement["rest"][0]["resource"]}
    assert {"lookup", "validate-code"} <= ops["CodeSystem"]
    assert {"expand", "validate-code"} <= ops["ValueSet"]
    assert "translate" in ops["ConceptMap"]
    assert "expand" not in ops["Patient"]
    # each type's $validate-code is its own definition (their parameters differ)
    definitions = {r["type"]: {o["name"]: o["definition"] for o in r.get("operation", [])}
                   for r in statement["rest"][0]["resource"]}
    for rt in ("CodeSystem", "ValueSet"):
        assert definitions[rt]["validate-code"] == (
            f"http://hl7.org/fhir/OperationDefinition/{rt}-validate-code")


def test_a_backtracking_regex_filter_does_not_hold_the_server(client: httpx.Client) -> None:
    """``(a+)+b`` takes Python's ``re`` 2^n steps on n ``a``; the gateway matches client
    patterns with RE2, linear in the text, so each answer comes at once, decided."""
    system, vs_url = f"urn:test:{unique('cs')}:not-held", f"urn:test:vs:{unique()}"
    assert post(client, {"resourceType": "ValueSet", "url": vs_url, "status": "active",
                         "compose": {"include": [{"system": system, "filter": [
                             {"property": "code", "op": "regex", "value": "(a+)+b"}]}]}}
                ).status_code == 201
    hostile = "a" * 28  # ~10 s in a backtracking engine, twice that for each a more
    started = time.monotonic()
    r = client.get("/ValueSet/$validate-code", params={"url": vs_url, "system": system,
                                                       "code": hostile})
    assert r.status_code == 200, r.text
    assert values(r.json())["result"] is False
    r = client.get("/ValueSet/$validate-code", params={"url": vs_url, "system": system,
                                                       "code": "a" * 40 + "b"})
    assert values(r.json())["result"] is True
    # codes in use are decided the same way by :in
    member = {"resourceType": "Condition", "subject": {"reference": f"Group/{unique('g')}"},
              "code": {"coding": [{"system": system, "code": "a" * 40 + "b"}]}}
    assert post(client, member).status_code == 201
    member["code"]["coding"][0]["code"] = hostile
    assert post(client, member).status_code == 201
    r = client.get("/Condition", params={"code:in": vs_url})
    assert r.status_code == 200, r.text
    assert [e["resource"]["code"]["coding"][0]["code"] for e in r.json().get("entry", [])
            ] == ["a" * 40 + "b"]
    # $expand of a held code system whose codes the filter runs over
    cs_url = f"urn:test:{unique('cs')}"
    assert post(client, {"resourceType": "CodeSystem", "url": cs_url, "status": "active",
                         "content": "complete", "concept": [{"code": hostile},
                                                            {"code": "aab"}]}
                ).status_code == 201
    r = client.post("/ValueSet/$expand", headers={"Content-Type": FHIR}, json=parameters((
        "valueSet", "resource", {"resourceType": "ValueSet", "status": "active",
                                 "compose": {"include": [{"system": cs_url, "filter": [
                                     {"property": "code", "op": "regex",
                                      "value": "(a+)+b"}]}]}})))
    assert r.status_code == 200, r.text
    assert codes(r.json()) == ["aab"]
    assert time.monotonic() - started < 5
    # look-around and backreferences cannot be matched in linear time: refused as invalid
    r = client.post("/ValueSet/$expand", headers={"Content-Type": FHIR}, json=parameters((
        "valueSet", "resource", {"resourceType": "ValueSet", "status": "active",
                                 "compose": {"include": [{"system": cs_url, "filter": [
                                     {"property": "code", "op": "regex",
                                      "value": "(a)\\1b"}]}]}})))
    assert (r.status_code, gw_code(r)) == (400, "GW-4305")
    assert "backreferences" in r.text
