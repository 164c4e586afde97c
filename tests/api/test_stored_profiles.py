"""Profiles stored on the server take part in validation (gateway.interactions.stored_profiles).

The profiles are the IPS package's own (``tests/data/ig-profiles.ndjson.gz``, with the
IG Publisher's snapshots; ``scripts/build_ig_examples.py``), and the resources its
examples (``ig-examples.ndjson.gz``). Each test runs on a gateway of its own: what
it stores changes how every write that claims those profiles is judged.
"""

from __future__ import annotations

import copy
import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.helpers import FHIR, gw_code, post, put
from tests.conftest import BACKENDS, RunningServer, backend_settings, unique

DATA = Path(__file__).resolve().parent.parent / "data"
IPS = "http://hl7.org/fhir/uv/ips/StructureDefinition/"
PATIENT = IPS + "Patient-uv-ips"


def _rows(name: str) -> list[dict[str, Any]]:
    with gzip.open(DATA / name, "rt", encoding="utf-8") as f:
        return [json.loads(row["text"]) for row in map(json.loads, f)
                if row["package"].startswith("hl7.fhir.uv.ips@")]


PROFILES = {sd["id"]: sd for sd in _rows("ig-profiles.ndjson.gz")}
#: the IPS examples of the profiled types that claim an IPS profile
EXAMPLES = [r for r in _rows("ig-examples.ndjson.gz")
            if r["resourceType"] in ("Patient", "Procedure", "AllergyIntolerance")
            and any(p.startswith(IPS) for p in r.get("meta", {}).get("profile", []))]


@pytest.fixture(params=BACKENDS)
def client(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           new_schema: Any) -> Iterator[httpx.Client]:
    settings = backend_settings(request.param, tmp_path_factory.mktemp("profiles"),
                                new_schema)
    with RunningServer(settings) as running, httpx.Client(
            base_url=running.url, timeout=60, headers={"Accept": FHIR}) as c:
        yield c


def _store_profiles(client: httpx.Client) -> None:
    for sd in PROFILES.values():
        assert put(client, sd).status_code == 201, sd["id"]


def _ips_patient(**changes: Any) -> dict[str, Any]:
    body = {"resourceType": "Patient", "meta": {"profile": [PATIENT]},
            "name": [{"family": unique("Ips")}], "birthDate": "1970-01-01", **changes}
    return {k: v for k, v in body.items() if v is not None}


def _diagnostics(response: httpx.Response) -> str:
    return " | ".join(i.get("diagnostics", "") for i in response.json()["issue"])


def test_writes_are_held_to_the_stored_profiles_they_claim(client: httpx.Client) -> None:
    assert len(EXAMPLES) >= 8
    nameless = _ips_patient(birthDate=None)
    # not stored yet: a warning, and the write goes through
    before = post(client, nameless)
    assert before.status_code == 201, before.text
    checked = client.post("/Patient/$validate", json=nameless)
    assert "is not known here" in _diagnostics(checked)
    _store_profiles(client)
    for example in EXAMPLES:  # the package's examples hold to its profiles
        stored = put(client, example)
        assert stored.status_code in (200, 201), (example["id"], stored.text)
        verdict = client.post(f"/{example['resourceType']}/$validate", json=example)
        assert "is not known here" not in _diagnostics(verdict), example["id"]
    refused = post(client, nameless)
    assert (refused.status_code, gw_code(refused)) == (422, "GW-4002")
    assert f"Patient.birthDate needs at least 1, found 0 (profile {PATIENT}" in \
        _diagnostics(refused)
    # a data-absent-reason in place of the procedure's date is a date (performed[x] 1..1)
    procedure = next(e for e in EXAMPLES if e["id"] == "procedure-missing-performed")
    assert "_performedDateTime" in procedure
    bare = copy.deepcopy(procedure)
    del bare["_performedDateTime"]
    assert post(client, bare).status_code == 422
    # $validate with the profile named, for a resource that does not claim it
    named = client.post("/Patient/$validate", params={"profile": PATIENT},
                        json={"resourceType": "Patient", "name": [{"family": "x"}]})
    assert named.status_code == 200 and "Patient.birthDate needs at least 1" in \
        _diagnostics(named)


def test_every_way_of_writing_is_held_to_them(client: httpx.Client) -> None:
    _store_profiles(client)
    pid = post(client, _ips_patient()).json()["id"]
    # a patch that takes the birth date away (validated inside its transaction)
    patched = client.patch(f"/Patient/{pid}", json=[{"op": "remove", "path": "/birthDate"}],
                           headers={"Content-Type": "application/json-patch+json"})
    assert patched.status_code == 422, patched.text
    # an update, and a transaction entry
    assert put(client, {**_ips_patient(birthDate=None), "id": pid}).status_code == 422
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Observation", "status": "final",
                      "code": {"text": "x"}}, "request": {"method": "POST", "url": "Observation"}},
        {"resource": _ips_patient(birthDate=None),
         "request": {"method": "POST", "url": "Patient"}}]}
    sent = client.post("", json=bundle, headers={"Content-Type": FHIR})
    assert sent.status_code == 422 and "Patient.birthDate" in _diagnostics(sent), sent.text
    # $meta-add of the profile to a patient without a birth date
    plain = post(client, {"resourceType": "Patient", "name": [{"family": "x"}]}).json()["id"]
    added = client.post(f"/Patient/{plain}/$meta-add", json={
        "resourceType": "Parameters", "parameter": [
            {"name": "meta", "valueMeta": {"profile": [PATIENT]}}]})
    assert added.status_code == 422, added.text
    assert client.get(f"/Patient/{pid}").json()["birthDate"] == "1970-01-01"


def test_a_profile_in_the_same_transaction_holds_its_resources(client: httpx.Client) -> None:
    """A Bundle that stores a profile has the resources that claim it held to it, in
    whichever order its entries come (the profile's PUT is processed after the
    Patient's POST); nothing of a Bundle with a resource that fails is kept."""
    profile = PROFILES["Patient-uv-ips"]
    store = {"resource": profile,
             "request": {"method": "PUT", "url": f"StructureDefinition/{profile['id']}"}}
    nameless = {"resource": _ips_patient(name=None),
                "request": {"method": "POST", "url": "Patient"}}
    failed = client.post("", json={"resourceType": "Bundle", "type": "transaction",
                                   "entry": [nameless, store]}, headers={"Content-Type": FHIR})
    assert failed.status_code == 422, failed.text
    assert "Patient.name needs at least 1" in _diagnostics(failed)
    assert client.get(f"/StructureDefinition/{profile['id']}").status_code == 404
    named = {"resource": _ips_patient(), "request": {"method": "POST", "url": "Patient"}}
    sent = client.post("", json={"resourceType": "Bundle", "type": "transaction",
                                 "entry": [store, named]}, headers={"Content-Type": FHIR})
    assert sent.status_code == 200, sent.text
    assert post(client, _ips_patient(name=None)).status_code == 422  # and from now on


def test_a_profile_of_a_transaction_rolled_back_is_not_used_after_it(
        client: httpx.Client) -> None:
    """What a transaction read of the profiles it wrote stays its own. A Bundle that
    rolled back had written a relaxed profile; a later one writes the strict one with
    the same number of versions and, on SQLite, at the same sequence number (a
    rolled-back transaction's numbers are drawn again): the strict one holds."""
    relaxed = copy.deepcopy(PROFILES["Patient-uv-ips"])
    for element in relaxed["snapshot"]["element"]:
        if element["path"] == "Patient.birthDate":
            element["min"] = 0

    def bundle(profile: dict[str, Any], resource: dict[str, Any]) -> httpx.Response:
        return client.post("", headers={"Content-Type": FHIR}, json={
            "resourceType": "Bundle", "type": "transaction", "entry": [
                {"resource": resource,
                 "request": {"method": "POST", "url": resource["resourceType"]}},
                {"resource": profile,
                 "request": {"method": "PUT", "url": f"StructureDefinition/{profile['id']}"}}]})

    # the relaxed profile, read inside its transaction, which then rolls back
    assert bundle(relaxed, _ips_patient(name=None)).status_code == 422
    # the strict one, with as many writes before it
    written = bundle(PROFILES["Patient-uv-ips"], {"resourceType": "Observation",
                                                  "status": "final", "code": {"text": "x"}})
    assert written.status_code == 200, written.text
    undated = post(client, _ips_patient(birthDate=None))
    assert undated.status_code == 422, undated.text
    assert "Patient.birthDate" in _diagnostics(undated)


def _supported(client: httpx.Client, resource_type: str) -> list[str]:
    """The CapabilityStatement's ``supportedProfile`` of ``resource_type``."""
    statement = client.get("/metadata").json()
    return next(r for r in statement["rest"][0]["resource"]
                if r["type"] == resource_type).get("supportedProfile", [])


def test_a_changed_or_deleted_profile_is_used_as_it_is_now(client: httpx.Client) -> None:
    assert PATIENT not in _supported(client, "Patient")
    _store_profiles(client)
    assert post(client, _ips_patient(birthDate=None)).status_code == 422
    # listed where clients look for what the server holds writes to
    assert PATIENT in _supported(client, "Patient")
    assert IPS + "AllergyIntolerance-uv-ips" in _supported(client, "AllergyIntolerance")
    assert IPS + "AllergyIntolerance-uv-ips" not in _supported(client, "Patient")
    relaxed = copy.deepcopy(PROFILES["Patient-uv-ips"])
    for element in relaxed["snapshot"]["element"]:
        if element["path"] == "Patient.birthDate":
            element["min"] = 0
    assert put(client, relaxed).status_code == 200
    assert post(client, _ips_patient(birthDate=None)).status_code == 201
    assert post(client, _ips_patient(name=None)).status_code == 422  # the rest holds
    assert client.delete("/StructureDefinition/Patient-uv-ips").status_code == 204
    gone = post(client, _ips_patient(name=None))
    assert gone.status_code == 201, gone.text
    assert PATIENT not in _supported(client, "Patient")
    # one stored without a snapshot (as SUSHI writes them) gets one from its differential
    differential = {k: v for k, v in PROFILES["Patient-uv-ips"].items() if k != "snapshot"}
    assert put(client, differential).status_code in (200, 201)
    made = post(client, _ips_patient(name=None))
    assert made.status_code == 422 and "Patient.name needs at least 1" in _diagnostics(made)
    assert PATIENT in _supported(client, "Patient")
    # unless its base is not known here: then it is not used, and the write is warned
    # that and why (an IG's profiles stored without the profiles they build on)
    orphan = {**differential, "baseDefinition": "http://example.org/StructureDefinition/x"}
    assert put(client, orphan).status_code == 200
    warned = client.post("/Patient/$validate", json=_ips_patient(name=None))
    said = _diagnostics(warned)
    assert "is stored here but cannot be used" in said, said
    assert "unknown StructureDefinition http://example.org/StructureDefinition/x" in said
    assert post(client, _ips_patient(name=None)).status_code == 201
    assert PATIENT not in _supported(client, "Patient")


def test_stored_value_sets_bind_and_own_profiles_keep_their_definition(
        client: httpx.Client) -> None:
    # a profile of the deployment's own: gender required, from a value set stored here
    url = f"urn:test:profile:{unique()}"
    value_set = f"urn:test:vs:{unique()}"
    profile = copy.deepcopy(PROFILES["Patient-uv-ips"])
    profile.update(id=unique("sd"), url=url, name="OnlyFemale")
    for element in profile["snapshot"]["element"]:
        if element["path"] == "Patient.gender":
            element["min"] = 1
            element["binding"] = {"strength": "required", "valueSet": value_set}
    assert post(client, profile).status_code == 201
    assert post(client, {"resourceType": "ValueSet", "url": value_set, "status": "active",
                         "compose": {"include": [{
                             "system": "http://hl7.org/fhir/administrative-gender",
                             "concept": [{"code": "female"}]}]}}).status_code == 201
    claims = {"meta": {"profile": [url]}}
    assert post(client, _ips_patient(gender="female", **claims)).status_code == 201
    male = post(client, _ips_patient(gender="male", **claims))
    assert male.status_code == 422 and value_set in _diagnostics(male), male.text
    # a value set over the whole of one of R4's code systems, but a code (as IPS
    # restricts statuses): R4's code systems are held, so it binds too
    but_male = f"urn:test:vs:{unique()}"
    assert post(client, {"resourceType": "ValueSet", "url": but_male, "status": "active",
                         "compose": {
                             "include": [{"system": "http://hl7.org/fhir/administrative-gender"}],
                             "exclude": [{"system": "http://hl7.org/fhir/administrative-gender",
                                          "concept": [{"code": "male"}]}]}}).status_code == 201
    for element in profile["snapshot"]["element"]:
        if element["path"] == "Patient.gender":
            element["binding"]["valueSet"] = but_male
    profile.update(id=unique("sd"), url=f"{url}-2")
    assert post(client, profile).status_code == 201
    claims_2 = {"meta": {"profile": [f"{url}-2"]}}
    assert post(client, _ips_patient(gender="other", **claims_2)).status_code == 201
    male = post(client, _ips_patient(gender="male", **claims_2))
    assert male.status_code == 422 and but_male in _diagnostics(male), male.text
    # the gateway's own profile, stored again with less in it, keeps its definition
    own = "https://carepath-gateway.org/fhir/StructureDefinition/handoff-task"
    loose = {"resourceType": "StructureDefinition", "url": own, "name": "LooseTask",
             "status": "active", "kind": "resource", "abstract": False, "type": "Task",
             "baseDefinition": "http://hl7.org/fhir/StructureDefinition/Task",
             "derivation": "constraint",
             "snapshot": {"element": [{"id": "Task", "path": "Task", "min": 0, "max": "*",
                                       "definition": "Any task",
                                       "base": {"path": "Task", "min": 0, "max": "*"}}]}}
    stored = post(client, loose)
    assert stored.status_code == 201, stored.text
    task = {"resourceType": "Task", "meta": {"profile": [own]}, "status": "requested",
            "intent": "order"}
    assert post(client, task).status_code == 422


def test_a_stored_profile_that_makes_no_sense_fails_no_write(client: httpx.Client) -> None:
    """A StructureDefinition can pass R4's rules and still make no sense (a maximum of
    'x'; a differential that names no element): it is not used, and writes that claim
    it are validated against R4 as for an unknown profile, never answered 500."""
    broken = copy.deepcopy(PROFILES["Patient-uv-ips"])
    broken.update(id=unique("sd"), url=f"urn:test:broken:{unique()}")
    for element in broken["snapshot"]["element"]:
        if element["path"] == "Patient.name":
            element["max"] = "x"
    no_snapshot = {k: v for k, v in copy.deepcopy(broken).items() if k != "snapshot"}
    no_snapshot.update(id=unique("sd"), url=f"urn:test:broken:{unique()}", differential={
        "element": [{"id": "Patient.nothing.here", "path": "Patient.nothing.here",
                     "max": "x"}]})
    for sd in (broken, no_snapshot):
        stored = post(client, sd)
        assert stored.status_code == 201, stored.text
        claiming = _ips_patient(name=None, meta={"profile": [sd["url"]]})
        written = post(client, claiming)
        assert written.status_code == 201, written.text
        checked = client.post("/Patient/$validate", json=claiming)
        assert checked.status_code == 200
        assert "is stored here but cannot be used" in _diagnostics(checked)
        # nor does it break the CapabilityStatement, which lists what is used
        assert client.get("/metadata").status_code == 200
        assert sd["url"] not in _supported(client, "Patient")


def test_snapshot_makes_a_snapshot_from_a_differential(client: httpx.Client) -> None:
    """StructureDefinition/$snapshot: the IPS Patient profile without its snapshot gets
    one with the cardinalities the IG Publisher gave it."""
    published = PROFILES["Patient-uv-ips"]
    differential = {k: v for k, v in published.items() if k != "snapshot"}

    def cards(sd: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        return {e["id"]: (e.get("min"), e.get("max")) for e in sd["snapshot"]["element"]}

    for body in (differential, {"resourceType": "Parameters", "parameter": [
            {"name": "definition", "resource": differential}]}):
        made = client.post("/StructureDefinition/$snapshot", json=body)
        assert made.status_code == 200, made.text
        got = cards(made.json())
        assert got["Patient.name"] == (1, "*") and got["Patient.birthDate"] == (1, "1")
        assert {k: v for k, v in cards(published).items() if k in got} == \
            {k: got[k] for k in cards(published) if k in got}
    # of one stored here: by its url, or at instance level
    assert put(client, differential).status_code == 201
    by_url = client.get("/StructureDefinition/$snapshot", params={"url": published["url"]})
    assert by_url.status_code == 200 and cards(by_url.json())["Patient.name"] == (1, "*")
    instance = client.get(f"/StructureDefinition/{published['id']}/$snapshot")
    assert instance.status_code == 200 and "snapshot" in instance.json()
    # nothing to make it from, a base not known here, a url not known here
    for body, status, code in (
            ({k: v for k, v in published.items() if k != "differential"}, 422, "GW-4219"),
            ({**differential, "baseDefinition": "http://example.org/sd/x"}, 422, "GW-4219"),
            ({"resourceType": "Parameters", "parameter": [
                {"name": "url", "valueString": "http://example.org/sd/none"}]}, 404, "GW-2001"),
            ({"resourceType": "Parameters"}, 400, "GW-1028")):
        refused = client.post("/StructureDefinition/$snapshot", json=body)
        assert (refused.status_code, gw_code(refused)) == (status, code), refused.text
