"""Organisation isolation: a client never sees a foreign patient's data, on any path,
and a forbidden resource answers exactly as an absent one."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.api.helpers import gw_code, paged_ids
from tests.security.conftest import Secured, secured_server

ORGS = {"hospital-a": "org-a", "gp-b": "org-b"}


@dataclass
class World:
    secured: Secured
    a: httpx.Client
    b: httpx.Client
    #: "Type/id" -> patient id it belongs to ("" for shared resources)
    owner: dict[str, str] = field(default_factory=dict)
    patients: dict[str, str] = field(default_factory=dict)  # name -> id

    def client(self, name: str) -> httpx.Client:
        return {"hospital-a": self.a, "gp-b": self.b}[name]


def _create(c: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    r = c.post(f"/{body['resourceType']}", json=body)
    assert r.status_code == 201, r.text
    return dict(r.json())


def _clinical(w: World, c: httpx.Client, pid: str, tag: str) -> None:
    ref = {"reference": f"Patient/{pid}"}
    stay = _create(c, {"resourceType": "Encounter", "status": "finished",
                       "class": {"code": "AMB"}, "subject": ref})
    w.owner[f"Encounter/{stay['id']}"] = pid
    bodies = [
        {"resourceType": "Observation", "status": "final", "code": {"text": tag},
         "subject": ref, "encounter": {"reference": f"Encounter/{stay['id']}"},
         "performer": [{"reference": "Practitioner/doc"}]},
        {"resourceType": "Condition", "subject": ref, "code": {"text": tag}},
        {"resourceType": "DocumentReference", "status": "current", "subject": ref,
         "content": [{"attachment": {"contentType": "text/plain", "data": "aGk="}}]},
        {"resourceType": "Task", "status": "requested", "intent": "order", "for": ref,
         "code": {"text": tag}},
    ]
    for body in bodies:
        made = _create(c, body)
        w.owner[f"{made['resourceType']}/{made['id']}"] = pid


@pytest.fixture(scope="module")
def world(secured: Secured) -> Iterator[World]:
    a, b = secured.client("hospital-a"), secured.client("gp-b")
    w = World(secured, a, b)
    for org in ("org-a", "org-b"):
        r = a.put(f"/Organization/{org}", json={"resourceType": "Organization", "id": org,
                                                 "name": org})
        assert r.status_code in (200, 201), r.text
        w.owner[f"Organization/{org}"] = ""
    # one practitioner who treats everyone: their compartment spans organisations
    r = a.put("/Practitioner/doc", json={"resourceType": "Practitioner", "id": "doc"})
    assert r.status_code in (200, 201), r.text
    w.owner["Practitioner/doc"] = ""
    tag = uuid.uuid4().hex[:8]
    for name, c, org in (("p1", a, "org-a"), ("p2", b, "org-b"), ("p3", a, "org-a")):
        p = _create(c, {"resourceType": "Patient", "name": [{"family": f"{name}-{tag}"}],
                        "identifier": [{"system": "urn:test:iso", "value": f"{name}-{tag}"}]})
        w.patients[name] = p["id"]
        w.owner[f"Patient/{p['id']}"] = p["id"]
        eoc = _create(c, {"resourceType": "EpisodeOfCare", "status": "active",
                          "patient": {"reference": f"Patient/{p['id']}"},
                          "managingOrganization": {"reference": f"Organization/{org}"}})
        w.owner[f"EpisodeOfCare/{eoc['id']}"] = p["id"]
        _clinical(w, c, p["id"], tag)
    p3 = w.patients["p3"]
    # A refers p3 to B: B takes part in p3's care from now on
    sr = _create(a, {"resourceType": "ServiceRequest", "status": "active", "intent": "order",
                     "subject": {"reference": f"Patient/{p3}"},
                     "requester": {"reference": "Organization/org-a"},
                     "performer": [{"reference": "Organization/org-b"}]})
    w.owner[f"ServiceRequest/{sr['id']}"] = p3
    _clinical(w, b, p3, tag)
    # a worklist naming every patient: a search by it still shows only one's own
    everyone = _create(a, {"resourceType": "List", "status": "current", "mode": "working",
                           "entry": [{"item": {"reference": f"Patient/{pid}"}}
                                     for pid in w.patients.values()]})
    w.owner[f"List/{everyone['id']}"] = ""
    # letters whose sections name everything there is: a document made of one holds
    # only what its caller may see
    named = [{"reference": key} for key in w.owner]
    for c, pid in ((a, w.patients["p1"]), (b, p3)):
        letter = _create(c, {"resourceType": "Composition", "status": "final",
                             "type": {"text": "letter"}, "date": "2026-11-24",
                             "title": "letter", "subject": {"reference": f"Patient/{pid}"},
                             "author": [{"reference": "Practitioner/doc"}],
                             "section": [{"title": "all", "entry": named}]})
        w.owner[f"Composition/{letter['id']}"] = pid
    yield w
    a.close()
    b.close()


def _resources(body: Any) -> Iterator[dict[str, Any]]:
    """Every resource in a response, Bundles (search, history, batch) walked."""
    if isinstance(body, dict):
        if "resourceType" in body:
            yield body
        for value in body.values():
            yield from _resources(value)
    elif isinstance(body, list):
        for value in body:
            yield from _resources(value)


def _requests(w: World) -> list[tuple[str, str, str, Any]]:
    """(client, method, path, json) — the generated request matrix."""
    p = w.patients
    out: list[tuple[str, str, str, Any]] = []
    keys = list(w.owner)
    for client in ORGS:
        for key in keys:
            out.append((client, "GET", f"/{key}", None))
            out.append((client, "GET", f"/{key}/_history", None))
            out.append((client, "GET", f"/{key}/_history/1", None))
        for name in ("p1", "p2", "p3"):
            pid = p[name]
            paths = [
                f"/Observation?subject=Patient/{pid}&_include=Observation:subject",
                f"/Patient?_id={pid}&_revinclude=Observation:subject"
                "&_revinclude=Task:patient",
                f"/Patient?_id={pid}&_revinclude:iterate=EpisodeOfCare:patient",
                f"/Condition?patient={pid}",
                f"/Observation?subject:Patient.identifier=urn:test:iso|{name}",
                f"/Patient?_has:Observation:subject:status=final&_id={pid}",
                f"/Encounter?subject={pid}&_include=Encounter:subject",
                f"/Task?patient={pid}&_include=Task:patient",
                f"/DocumentReference?subject={pid}",
                f"/Patient/{pid}/_history",
                f"/Patient/{pid}/$everything?_count=500",
                f"/Patient/{pid}/Observation?_include=Observation:subject",
                f"/Patient/{pid}/Condition",
            ]
            out += [(client, "GET", path, None) for path in paths]
        lists = [k.split("/")[1] for k in keys if k.startswith("List/")]
        out += [(client, "GET", f"/Patient?_list={lid}&_revinclude=Observation:subject", None)
                for lid in lists]
        out.append((client, "GET", "/Practitioner/doc/Observation"
                    "?_include=Observation:subject&_include=Observation:encounter", None))
        out.append((client, "GET", "/Practitioner/doc/Observation?_summary=count", None))
        for key in (k for k in keys if k.startswith("Composition/")):
            out.append((client, "GET", f"/{key}/$document", None))
            out.append((client, "GET", f"/Composition/$document?id={key[12:]}", None))
        for key in (k for k in keys if k.startswith("Encounter/")):
            out.append((client, "GET", f"/{key}/Observation?_include=Observation:patient",
                        None))
            out.append((client, "GET", f"/{key}/$everything?_count=500", None))
        for rtype in ("Patient", "Observation", "Condition", "Encounter", "Task",
                      "EpisodeOfCare", "ServiceRequest", "DocumentReference"):
            out.append((client, "GET", f"/{rtype}?_count=100", None))
            out.append((client, "GET", f"/{rtype}/_history?_count=200", None))
            out.append((client, "GET", f"/{rtype}?_summary=count", None))
        out.append((client, "GET", "/_history?_count=500", None))
        out.append((client, "GET", "/?_type=Patient,Observation&_count=200", None))
        batch = {"resourceType": "Bundle", "type": "batch", "entry": [
            {"request": {"method": "GET", "url": k}} for k in keys]}
        out.append((client, "POST", "/", batch))
        txn = {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"request": {"method": "GET", "url": f"Observation?subject=Patient/{p[n]}"}}
            for n in ("p1", "p2", "p3")]}
        out.append((client, "POST", "/", txn))
    return out


def test_no_foreign_patient_data_on_any_path(world: World) -> None:
    p = world.patients
    foreign = {"hospital-a": {p["p2"]}, "gp-b": {p["p1"]}}
    requests = _requests(world)
    assert len(requests) >= 200
    leaks = []
    for client, method, path, body in requests:
        r = world.client(client).request(method, path, json=body)
        assert r.status_code < 500, (path, r.text)
        if r.status_code >= 400:
            continue
        for res in _resources(r.json()):
            key = f"{res['resourceType']}/{res.get('id')}"
            if world.owner.get(key) in foreign[client]:
                leaks.append((client, path, key))
        if "_summary=count" in path:
            rtype = path.split("?")[0].strip("/")
            own = [k for k, v in world.owner.items() if k.startswith(f"{rtype}/")
                   and v and v not in foreign[client]]
            # counts never include foreign resources (other tests may add own ones)
            mine = [k for k, v in world.owner.items() if k.startswith(f"{rtype}/")
                    and v in foreign[client]]
            assert r.json()["total"] >= len(own) and mine is not None
    assert not leaks, leaks[:10]


def test_shared_patient_is_visible_to_both(world: World) -> None:
    p3 = world.patients["p3"]
    for c in (world.a, world.b):
        bundle = c.get("/Observation", params={"subject": f"Patient/{p3}"}).json()
        assert bundle["total"] == 2  # one by each organisation
        assert c.get(f"/Patient/{p3}").status_code == 200
        # the shared practitioner's compartment: the own patient's and p3's, not the
        # other organisation's patient's
        treated = c.get("/Practitioner/doc/Observation", params={"_summary": "count"})
        assert treated.json()["total"] == 3


def test_forbidden_answers_exactly_like_absent(world: World) -> None:
    p = world.patients
    for client, foreign_patient in (("hospital-a", p["p2"]), ("gp-b", p["p1"])):
        c = world.client(client)
        foreign_keys = [k for k, v in world.owner.items() if v == foreign_patient]
        assert foreign_keys
        for key, path_suffix in itertools.product(foreign_keys, ("", "/_history",
                                                                 "/_history/1")):
            rtype = key.split("/")[0]
            forbidden = c.get(f"/{key}{path_suffix}")
            absent = c.get(f"/{rtype}/{uuid.uuid4()}{path_suffix}")
            assert forbidden.status_code == absent.status_code == 404, key
            f_issue = forbidden.json()["issue"][0]
            a_issue = absent.json()["issue"][0]
            assert f_issue["details"] == a_issue["details"]
            assert f_issue["code"] == a_issue["code"]
            assert set(forbidden.headers) - {"content-length"} == set(absent.headers) - {
                "content-length"}


def test_writes_about_foreign_patients_are_refused(world: World) -> None:
    p1 = world.patients["p1"]
    r = world.b.post("/Observation", json={
        "resourceType": "Observation", "status": "final", "code": {"text": "x"},
        "subject": {"reference": f"Patient/{p1}"}})
    assert r.status_code == 403
    foreign_obs = next(k for k, v in world.owner.items()
                       if v == p1 and k.startswith("Observation/"))
    rid = foreign_obs.split("/")[1]
    put = world.b.put(f"/{foreign_obs}", json={"resourceType": "Observation", "id": rid,
                                                "status": "final", "code": {"text": "x"}})
    assert put.status_code in (403, 404)
    assert world.a.get(f"/{foreign_obs}").json()["code"]["text"] != "x"
    assert world.b.delete(f"/{foreign_obs}").status_code == 204
    assert world.a.get(f"/{foreign_obs}").status_code == 200  # untouched
    # and through a transaction
    txn = {"resourceType": "Bundle", "type": "transaction", "entry": [{
        "fullUrl": f"urn:uuid:{uuid.uuid4()}",
        "resource": {"resourceType": "Condition", "code": {"text": "x"},
                     "subject": {"reference": f"Patient/{p1}"}},
        "request": {"method": "POST", "url": "Condition"}}]}
    assert world.b.post("/", json=txn).status_code == 403


def test_new_patient_in_a_transaction_belongs_to_its_creator(world: World) -> None:
    pid = f"urn:uuid:{uuid.uuid4()}"
    txn = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": pid, "resource": {"resourceType": "Patient"},
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": {
            "resourceType": "Observation", "status": "final", "code": {"text": "t"},
            "subject": {"reference": pid}}, "request": {"method": "POST", "url": "Observation"}},
    ]}
    r = world.b.post("/", json=txn)
    assert r.status_code == 200, r.text
    obs = r.json()["entry"][1]["response"]["location"].split("/fhir/")[1]
    obs_path = "/" + "/".join(obs.split("/")[:2])
    assert world.b.get(obs_path).status_code == 200
    assert world.a.get(obs_path).status_code == 404


def test_scopes_limit_interactions(world: World) -> None:
    reader = world.secured.client("reader-c", "system/Patient.rs system/Observation.rs")
    try:
        assert reader.get("/Patient", params={"_count": 1}).status_code == 200
        assert reader.get("/Condition").status_code == 403
        denied = reader.post("/Patient", json={"resourceType": "Patient"})
        assert denied.status_code == 403
        assert reader.get("/Observation", params={"_count": 1}).status_code == 200
        # system level: the types the scopes allow, not every type
        for path, params in [("/", {"_count": "500"}), ("/_history", {"_count": "500"}),
                             ("/", {"_lastUpdated": "gt2000-01-01", "_count": "500"}),
                             ("/", {"_id": ",".join(k.split("/")[1] for k in world.owner)})]:
            response = reader.get(path, params=params)
            assert response.status_code == 200, response.text
            types = {e["resource"]["resourceType"] for e in response.json()["entry"]
                     if "resource" in e}
            assert types == {"Patient", "Observation"}, (path, types)
        assert reader.get("/", params={"_type": "Condition"}).status_code == 403
    finally:
        reader.close()


def test_a_document_holds_only_the_types_the_scopes_let_its_caller_read(
    world: World,
) -> None:
    letter = next(k for k, v in world.owner.items()
                  if k.startswith("Composition/") and v == world.patients["p1"])
    # hospital A's own letter, asked with a token for fewer types than it is granted
    reader = world.secured.client("hospital-a", "system/Composition.rs system/Patient.rs")
    blind = world.secured.client("reader-c", "system/Patient.rs system/Observation.rs")
    try:
        document = reader.get(f"/{letter}/$document")
        assert document.status_code == 200, document.text
        types = {e["resource"]["resourceType"] for e in document.json()["entry"]}
        assert types == {"Composition", "Patient"}
        full = {e["resource"]["resourceType"]
                for e in world.a.get(f"/{letter}/$document").json()["entry"]}
        assert {"Observation", "Condition", "Practitioner"} <= full
        assert blind.get(f"/{letter}/$document").status_code == 403
        persisted = reader.post(f"/{letter}/$document", params={"persist": "true"})
        assert persisted.status_code == 403  # creating a Bundle is not granted
    finally:
        reader.close()
        blind.close()


def test_chains_has_and_includes_need_the_scopes_of_every_type_they_touch(
    world: World,
) -> None:
    # a search on an allowed type must not become a way to look into another type:
    # _has filters on Conditions, a chain on Encounters, an include returns them
    reader = world.secured.client("reader-c", "system/Patient.rs system/Observation.rs")
    pid = world.patients["p1"]
    try:
        for path, params in [
            ("/Patient", {"_has:Condition:subject:code:text": "x", "_id": pid}),
            ("/Patient", {"_has:Observation:subject:_has:Task:focus:status": "requested"}),
            ("/Observation", {"encounter:Encounter.status": "finished"}),
            ("/Observation", {"subject:Patient.organization.name": "org-a"}),
            ("/Observation", {"subject.general-practitioner:Practitioner.name": "x"}),
            ("/Observation", {"subject": pid, "_include": "Observation:encounter:Encounter"}),
            ("/Patient", {"_id": pid, "_revinclude": "Condition:subject"}),
            ("/Patient", {"_id": pid, "_revinclude:iterate": "EpisodeOfCare:patient"}),
        ]:
            response = reader.get(path, params=params)
            assert response.status_code == 403, (path, params, response.text[:300])
        # the types it may search still work, chained and included
        for path, params in [
            ("/Patient", {"_has:Observation:subject:status": "final", "_id": pid}),
            ("/Observation", {"subject:Patient.name": "p1"}),
            ("/Observation", {"subject": pid, "_include": "Observation:subject"}),
            ("/Patient", {"_id": pid, "_revinclude": "Observation:subject"}),
        ]:
            response = reader.get(path, params=params)
            assert response.status_code == 200, (path, params, response.text[:300])
        # an include that names no type returns only what the scopes let it search
        encounter = _create(world.a, {"resourceType": "Encounter", "status": "finished",
                                      "class": {"code": "AMB"},
                                      "subject": {"reference": f"Patient/{pid}"}})
        obs = _create(world.a, {"resourceType": "Observation", "status": "final",
                                "code": {"text": "x"}, "subject": {"reference": f"Patient/{pid}"},
                                "encounter": {"reference": f"Encounter/{encounter['id']}"}})
        for include in ("Observation:encounter", "Observation:*", "*"):
            found = {e["resource"]["resourceType"] for e in reader.get("/Observation", params={
                "_id": obs["id"], "_include": include}).json()["entry"]}
            assert "Encounter" not in found and "Observation" in found, (include, found)
            found = {e["resource"]["resourceType"] for e in world.a.get("/Observation", params={
                "_id": obs["id"], "_include": include}).json()["entry"]}
            assert "Encounter" in found, (include, found)
        # nor does an :iterate go on from what it left out: the patient is reached
        # only through the encounter the reader may not search
        only_encounter = _create(world.a, {
            "resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "encounter": {"reference": f"Encounter/{encounter['id']}"}})
        params = {"_id": only_encounter["id"], "_include": "Observation:encounter",
                  "_include:iterate": "Encounter:subject"}
        found = {e["resource"]["resourceType"]
                 for e in reader.get("/Observation", params=params).json()["entry"]}
        assert found == {"Observation"}, found
        found = {e["resource"]["resourceType"]
                 for e in world.a.get("/Observation", params=params).json()["entry"]}
        assert found == {"Observation", "Encounter", "Patient"}, found
    finally:
        reader.close()
    # whether a conditional create finds a match is an answer about the searched types
    writer = world.secured.client("hospital-a", "system/Patient.cruds")
    try:
        response = writer.post("/Patient", json={"resourceType": "Patient"}, headers={
            "If-None-Exist": f"_id={pid}&_has:Condition:subject:code:text=x"})
        assert response.status_code == 403, response.text
    finally:
        writer.close()


def _ids(c: httpx.Client, path: str, params: dict[str, str]) -> list[str]:
    response = c.get(path, params=params)
    assert response.status_code == 200, response.text
    return [e["resource"]["id"] for e in response.json().get("entry", [])
            if e.get("search", {}).get("mode") == "match"]


def test_chains_and_has_do_not_look_into_what_the_caller_may_not_see(world: World) -> None:
    a, b = world.a, world.b
    tag = uuid.uuid4().hex[:8]
    hidden = _create(b, {"resourceType": "Patient", "name": [{"family": f"hidden-{tag}"}]})["id"]
    shared = _create(a, {"resourceType": "Patient", "name": [{"family": f"shared-{tag}"}]})["id"]
    _create(a, {"resourceType": "ServiceRequest", "status": "active", "intent": "order",
                "subject": {"reference": f"Patient/{shared}"},
                "requester": {"reference": "Organization/org-a"},
                "performer": [{"reference": "Organization/org-b"}]})
    # B, taking part in both patients' care, writes what names both: A may not see it
    _create(b, {"resourceType": "Observation", "status": "final",
                "code": {"text": f"secret-{tag}"}, "subject": {"reference": f"Patient/{shared}"},
                "performer": [{"reference": f"Patient/{hidden}"}]})
    linked = b.get(f"/Patient/{shared}").json()
    linked["link"] = [{"other": {"reference": f"Patient/{hidden}"}, "type": "seealso"}]
    assert b.put(f"/Patient/{shared}", json=linked).status_code == 200
    has = {"_has:Observation:subject:code:text": f"secret-{tag}"}
    chain = {"_id": shared, "link:Patient.family": f"hidden-{tag}"}
    assert _ids(b, "/Patient", has) == [shared]
    assert _ids(b, "/Patient", chain) == [shared]
    # A sees the shared patient, but a search must not answer questions about the
    # Observation or the patient it cannot see
    assert a.get(f"/Patient/{shared}").status_code == 200
    assert _ids(a, "/Patient", {"_id": shared}) == [shared]
    assert _ids(a, "/Patient", has) == []
    assert _ids(a, "/Patient", chain) == []
    assert _ids(a, "/Patient", {"_id": shared, "link:missing": "false"}) == [shared]
    # four levels deep (the most a chain or _has may nest), each level judged
    # for the caller: shared -> hidden -> two more of B's patients
    deeper = [hidden]
    for n in range(3):
        p = _create(b, {"resourceType": "Patient", "name": [{"family": f"deep{n}-{tag}"}]})
        linking = b.get(f"/Patient/{deeper[-1]}").json()
        linking["link"] = [{"other": {"reference": f"Patient/{p['id']}"}, "type": "seealso"}]
        assert b.put(f"/Patient/{deeper[-1]}", json=linking).status_code == 200
        deeper.append(p["id"])
    deep_chain = {"_id": shared, "link:Patient.link:Patient.link:Patient.link:Patient.family":
                  f"deep2-{tag}"}
    deep_has = {"_has:Patient:link:_has:Patient:link:_has:Patient:link:_has:Patient:link:"
                "family": f"shared-{tag}"}
    assert _ids(b, "/Patient", deep_chain) == [shared]
    assert _ids(b, "/Patient", deep_has) == [deeper[3]]
    assert _ids(a, "/Patient", deep_chain) == []
    assert _ids(a, "/Patient", deep_has) == []


def test_an_id_of_several_types_counts_only_what_the_caller_may_see(world: World) -> None:
    """search.html#reference: a bare id that names resources of several types is
    refused, counting only those the caller may see: the refusal must not tell A
    that B's patient has that id."""
    a, b = world.a, world.b
    hidden = _create(b, {"resourceType": "Patient", "name": [{"family": "twin"}]})["id"]
    assert a.put(f"/Group/{hidden}", json={"resourceType": "Group", "id": hidden,
                                           "type": "person", "actual": False}).status_code == 201
    of_group = _create(a, {"resourceType": "Observation", "status": "final",
                           "code": {"text": "twin"},
                           "subject": {"reference": f"Group/{hidden}"}})["id"]
    assert _ids(a, "/Observation", {"subject": hidden}) == [of_group]
    refused = b.get("/Observation", params={"subject": hidden})
    assert refused.status_code == 400 and gw_code(refused) == "GW-1013"


def test_a_binary_goes_where_its_security_context_goes(world: World) -> None:
    # the PDF of a discharge letter, behind the DocumentReference that carries it
    a, b = world.a, world.b

    def letter(pid: str) -> tuple[str, str]:
        doc = _create(a, {"resourceType": "DocumentReference", "status": "current",
                          "subject": {"reference": f"Patient/{pid}"},
                          "content": [{"attachment": {"contentType": "application/pdf"}}]})
        made = a.post("/Binary", content=b"%PDF-1.4 letter", headers={
            "Content-Type": "application/pdf",
            "X-Security-Context": f"DocumentReference/{doc['id']}"})
        assert made.status_code == 201, made.text
        return doc["id"], made.json()["id"]

    shared_doc, shared_pdf = letter(world.patients["p3"])  # B takes part in p3's care
    _own_doc, own_pdf = letter(world.patients["p1"])  # A's patient alone
    loose = a.post("/Binary", content=b"%PDF-1.4 loose",
                   headers={"Content-Type": "application/pdf"}).json()["id"]
    pdf = {"Accept": "application/pdf"}
    for binary in (shared_pdf, own_pdf, loose):
        assert a.get(f"/Binary/{binary}", headers=pdf).status_code == 200
    assert b.get(f"/DocumentReference/{shared_doc}").status_code == 200
    read = b.get(f"/Binary/{shared_pdf}", headers=pdf)
    assert read.status_code == 200 and read.content == b"%PDF-1.4 letter"
    assert b.get(f"/Binary/{own_pdf}", headers=pdf).status_code == 404
    assert b.get(f"/Binary/{loose}", headers=pdf).status_code == 404
    found = {e["resource"]["id"] for e in b.get("/Binary", params={
        "_id": ",".join((shared_pdf, own_pdf, loose))}).json().get("entry", [])}
    assert found == {shared_pdf}
    # $everything brings the documents each may read: the one behind the shared
    # letter; the loose PDF a letter of p3 names by URL to its sender alone
    _create(a, {"resourceType": "DocumentReference", "status": "current",
                "subject": {"reference": f"Patient/{world.patients['p3']}"},
                "content": [{"attachment": {"contentType": "application/pdf",
                                            "url": f"Binary/{loose}"}}]})

    def everything(c: httpx.Client) -> set[str]:
        found = c.get(f"/Patient/{world.patients['p3']}/$everything",
                      params={"_type": "Binary"})
        assert found.status_code == 200, found.text
        return {e["resource"]["id"] for e in found.json().get("entry", [])}

    assert everything(b) == {shared_pdf}
    assert everything(a) == {shared_pdf, loose}
    # reading through the proxy is not writing: the sender alone changes its PDF
    replaced = b.put(f"/Binary/{shared_pdf}", content=b"%PDF-1.4 forged", headers={
        "Content-Type": "application/pdf",
        "X-Security-Context": f"DocumentReference/{shared_doc}"})
    assert replaced.status_code == 403, replaced.text
    assert b.delete(f"/Binary/{shared_pdf}").status_code == 403
    assert a.get(f"/Binary/{shared_pdf}", headers=pdf).content == b"%PDF-1.4 letter"
    # the context gone (the letter withdrawn), the PDF goes with it
    assert a.delete(f"/DocumentReference/{shared_doc}").status_code in (200, 204)
    assert b.get(f"/Binary/{shared_pdf}", headers=pdf).status_code == 404


def document_bundle(pid: str, *, by_entry: bool) -> dict[str, Any]:
    """A discharge letter as a FHIR document: Composition first, naming the patient
    by the document's own Patient entry or by reference."""
    patient_url = f"urn:uuid:{uuid.uuid4()}"
    subject = patient_url if by_entry else f"Patient/{pid}"
    entries: list[dict[str, Any]] = [{
        "fullUrl": f"urn:uuid:{uuid.uuid4()}",
        "resource": {"resourceType": "Composition", "status": "final",
                     "type": {"coding": [{"system": "http://loinc.org", "code": "18842-5"}]},
                     "subject": {"reference": subject}, "date": "2026-11-23",
                     "author": [{"reference": "Organization/org-a"}],
                     "title": "Entlassbrief"}}]
    if by_entry:
        entries.append({"fullUrl": patient_url,
                        "resource": {"resourceType": "Patient", "id": pid}})
    return {"resourceType": "Bundle", "type": "document",
            "identifier": {"system": "urn:test:doc", "value": str(uuid.uuid4())},
            "timestamp": "2026-11-23T10:00:00+01:00", "entry": entries}


def test_a_document_bundle_goes_where_its_patient_goes(world: World) -> None:
    # the discharge letter as a document: readable by those who take part in the
    # patient's care, as the patient's other data is, not by its sender alone
    a, b = world.a, world.b
    shared = [_create(a, document_bundle(world.patients["p3"], by_entry=flag))["id"]
              for flag in (True, False)]
    own = _create(a, document_bundle(world.patients["p1"], by_entry=True))["id"]
    collection = _create(a, {"resourceType": "Bundle", "type": "collection"})["id"]
    for bundle in (*shared, own, collection):
        assert a.get(f"/Bundle/{bundle}").status_code == 200
    for bundle in shared:
        assert b.get(f"/Bundle/{bundle}").status_code == 200
    assert b.get(f"/Bundle/{own}").status_code == 404
    assert b.get(f"/Bundle/{collection}").status_code == 404
    found = {e["resource"]["id"] for e in b.get("/Bundle", params={
        "_id": ",".join((*shared, own, collection))}).json().get("entry", [])}
    assert found == set(shared)
    # searched by their Composition's patient: the same documents, no others
    for c, pid, wanted in ((b, "p3", set(shared)), (b, "p1", set()), (a, "p1", {own})):
        r = c.get("/Bundle", params={"composition.patient": world.patients[pid],
                                     "_count": "100"})
        assert r.status_code == 200, r.text
        assert {e["resource"]["id"] for e in r.json().get("entry", [])} == wanted, pid
    # read by those in the patient's care, changed by its sender alone
    letter = b.get(f"/Bundle/{shared[0]}").json()
    assert b.put(f"/Bundle/{shared[0]}", json={**letter, "timestamp": "2026-11-24T10:00:00Z"}
                 ).status_code == 403
    assert b.delete(f"/Bundle/{shared[0]}").status_code == 403
    assert a.delete(f"/Bundle/{shared[0]}").status_code in (200, 204)


def _meta_add(c: httpx.Client, path: str, **meta: Any) -> httpx.Response:
    return c.post(f"{path}/$meta-add", json={"resourceType": "Parameters", "parameter": [
        {"name": "meta", "valueMeta": meta}]})


def _summary_tags(c: httpx.Client, path: str) -> set[str]:
    r = c.get(f"{path}/$meta")
    assert r.status_code == 200, r.text
    meta = r.json()["parameter"][0]["valueMeta"]
    return {t["code"] for t in meta.get("tag", [])}


def test_meta_operations_keep_to_what_the_caller_may_see_and_write(world: World) -> None:
    p = world.patients
    system = f"urn:test:meta:{uuid.uuid4().hex[:8]}"
    b_obs = next(k for k, v in world.owner.items()
                 if v == p["p2"] and k.startswith("Observation/"))
    a_cond = next(k for k, v in world.owner.items()
                  if v == p["p1"] and k.startswith("Condition/"))
    assert _meta_add(world.b, f"/{b_obs}", tag=[{"system": system, "code": "b-only"}]
                     ).status_code == 200
    assert _meta_add(world.a, f"/{a_cond}", tag=[{"system": system, "code": "a-cond"}]
                     ).status_code == 200
    # type and system summaries list the tags of visible resources only
    assert "b-only" in _summary_tags(world.b, "/Observation")
    assert "b-only" not in _summary_tags(world.a, "/Observation")
    assert "b-only" not in _summary_tags(world.a, "")
    assert "a-cond" in _summary_tags(world.a, "")
    # a foreign resource: its meta is as absent as the resource, and stays unchanged
    absent = f"/Observation/{uuid.uuid4()}"
    assert world.a.get(f"/{b_obs}/$meta").status_code == \
        world.a.get(f"{absent}/$meta").status_code == 404
    r = _meta_add(world.a, f"/{b_obs}", tag=[{"system": system, "code": "by-a"}])
    assert r.status_code == _meta_add(world.a, absent, tag=[]).status_code == 404
    tags = {t["code"] for t in world.b.get(f"/{b_obs}").json()["meta"].get("tag", [])}
    assert tags == {"b-only"}
    # scopes: the summary covers the types the caller may search; changes need update
    reader = world.secured.client("reader-c", "system/Patient.rs system/Observation.rs")
    try:
        assert "a-cond" not in _summary_tags(reader, "")
        assert reader.get("/Condition/$meta").status_code == 403
        pid = p["p1"]
        assert reader.get(f"/Patient/{pid}/$meta").status_code == 200
        denied = _meta_add(reader, f"/Patient/{pid}", tag=[{"system": system, "code": "r"}])
        assert denied.status_code == 403
    finally:
        reader.close()


def test_history_of_a_type_pages_without_counting_for_an_organisation(world: World) -> None:
    # counting every version of a type the client may see would judge each one; the
    # pages themselves stay complete (Bundle.total is optional in a history)
    pid = world.patients["p1"]
    instance = world.a.get(f"/Patient/{pid}/_history").json()
    assert instance["total"] == len(instance["entry"]) >= 1
    seen: list[str] = []
    url: str | None = "/Observation/_history?_count=1"
    while url:
        page = world.a.get(url).json()
        assert "total" not in page
        seen += [f"Observation/{e['resource']['id']}" for e in page["entry"]]
        url = next((link["url"] for link in page["link"] if link["relation"] == "next"), None)
    mine = {k for k, v in world.owner.items() if k.startswith("Observation/")
            and v in (world.patients["p1"], world.patients["p3"])}
    assert mine <= set(seen)
    assert not {k for k in seen if world.owner.get(k) == world.patients["p2"]}
    assert "total" not in world.a.get("/_history", params={"_count": 5}).json()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def reading_ahead(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                  new_schema: Any) -> Iterator[Secured]:
    """A secured gateway whose searches read two matches ahead (1,000 by default)."""
    with secured_server(request.param, tmp_path_factory.mktemp("ahead-sec"), new_schema,
                        search_read_ahead=2) as running:
        yield running


def test_reading_on_beyond_the_head_keeps_to_the_organisation(reading_ahead: Secured) -> None:
    # the rest of a long result is read when a page needs it: with the reader's access
    with reading_ahead.client("hospital-a") as a, reading_ahead.client("gp-b") as b:
        tag = uuid.uuid4().hex[:8]
        mine: list[str] = []
        for c, own in ((a, mine), (b, [])):
            p = _create(c, {"resourceType": "Patient", "name": [{"family": tag}]})
            for n in range(4):
                own.append(_create(c, {"resourceType": "Observation", "status": "final",
                                       "code": {"text": f"{tag}-{n}"},
                                       "subject": {"reference": f"Patient/{p['id']}"}})["id"])
        first = a.get("/Observation", params={"code:text": tag, "_count": 1})
        assert first.status_code == 200 and "total" not in first.json()
        link = next(x["url"] for x in first.json()["link"] if x["relation"] == "next")
        # another organisation cannot page it, nor complete it
        later = link.replace("_getpagesoffset=1", "_getpagesoffset=3")
        assert b.get(later).status_code == 410
        assert paged_ids(a, first.json()) == mine
        counted = a.get("/Observation", params={"code:text": tag, "_count": 1,
                                                "_total": "accurate"}).json()
        assert counted["total"] == 4


def test_a_practitioner_role_does_not_open_another_organisations_patients(
        world: World) -> None:
    """A PractitionerRole counts for its organisation: a Patient whose GP it is is in
    that organisation's care. Another organisation may neither move the role to
    itself nor make a role under an id the first one's patients already name."""
    a, b = world.a, world.b
    role, unmade = f"role-{uuid.uuid4().hex[:8]}", f"role-{uuid.uuid4().hex[:8]}"
    made = a.put(f"/PractitionerRole/{role}", json={
        "resourceType": "PractitionerRole", "id": role,
        "organization": {"reference": "Organization/org-a"}})
    assert made.status_code == 201, made.text
    patients = [_create(a, {"resourceType": "Patient",
                            "generalPractitioner": [{"reference": f"PractitionerRole/{r}"}]})
                ["id"] for r in (role, unmade)]
    moved = {"resourceType": "PractitionerRole", "id": role,
             "organization": {"reference": "Organization/org-b"}}
    for response in (b.put(f"/PractitionerRole/{role}", json=moved),
                     b.patch(f"/PractitionerRole/{role}", content=b'[{"op": "replace", "path":'
                             b' "/organization/reference", "value": "Organization/org-b"}]',
                             headers={"Content-Type": "application/json-patch+json"}),
                     b.delete(f"/PractitionerRole/{role}"),
                     b.put(f"/PractitionerRole/{unmade}", json={**moved, "id": unmade})):
        assert response.status_code == 403, (response.request.method, response.text)
    for pid in patients:
        assert b.get(f"/Patient/{pid}").status_code == 404
        assert a.get(f"/Patient/{pid}").status_code == 200
    # one's own roles, and roles of no organisation, are one's own to write
    own = f"role-{uuid.uuid4().hex[:8]}"
    mine = {"resourceType": "PractitionerRole", "id": own,
            "organization": {"reference": "Organization/org-b"}}
    assert b.put(f"/PractitionerRole/{own}", json=mine).status_code == 201
    assert b.put(f"/PractitionerRole/{own}", json={**mine, "active": True}).status_code == 200
    assert a.put(f"/PractitionerRole/{own}", json={
        **mine, "organization": {"reference": "Organization/org-a"}}).status_code == 403
    assert b.delete(f"/PractitionerRole/{own}").status_code == 204
    loose = _create(b, {"resourceType": "PractitionerRole", "active": True})
    assert a.put(f"/PractitionerRole/{loose['id']}", json={**loose, "active": False}
                 ).status_code == 200
    # a role of no organisation that A's patient names: B may not give it B's
    # (that would open the patient), through any write
    orphan = _create(a, {"resourceType": "PractitionerRole", "active": True})
    named = _create(a, {"resourceType": "Patient", "generalPractitioner": [
        {"reference": f"PractitionerRole/{orphan['id']}"}]})["id"]
    taken = {**orphan, "organization": {"reference": "Organization/org-b"}}
    for response in (b.put(f"/PractitionerRole/{orphan['id']}", json=taken),
                     b.patch(f"/PractitionerRole/{orphan['id']}", content=b'[{"op": "add",'
                             b' "path": "/organization", "value": {"reference":'
                             b' "Organization/org-b"}}]',
                             headers={"Content-Type": "application/json-patch+json"})):
        assert response.status_code == 403, (response.request.method, response.text)
    assert b.get(f"/Patient/{named}").status_code == 404
    # one that names nobody outside B's care is B's to take
    assert b.put(f"/PractitionerRole/{loose['id']}", json={
        **loose, "organization": {"reference": "Organization/org-b"}}).status_code == 200


def test_an_earlier_version_about_another_patient_stays_hidden(world: World) -> None:
    """A resource is judged by each version's own content in vread and history: an
    Observation about p1 (hospital A's) that moved to p3 (shared with B) shows B its
    current version, not the one about p1."""
    a, b = world.a, world.b
    p1, p3 = world.patients["p1"], world.patients["p3"]
    obs = _create(a, {"resourceType": "Observation", "status": "final",
                      "code": {"text": "moved"}, "subject": {"reference": f"Patient/{p1}"}})
    moved = a.put(f"/Observation/{obs['id']}", json={
        **obs, "subject": {"reference": f"Patient/{p3}"}})
    assert moved.status_code == 200, moved.text
    assert b.get(f"/Observation/{obs['id']}").status_code == 200
    hidden = b.get(f"/Observation/{obs['id']}/_history/1")
    missing = b.get(f"/Observation/{obs['id']}/_history/9")
    assert (hidden.status_code, gw_code(hidden)) == (missing.status_code, gw_code(missing))
    assert a.get(f"/Observation/{obs['id']}/_history/1").status_code == 200

    def versions(c: httpx.Client, path: str) -> set[str]:
        response = c.get(path, params={"_count": 500, "_since": obs["meta"]["lastUpdated"]})
        assert response.status_code == 200, response.text
        return {e["resource"]["meta"]["versionId"] for e in response.json().get("entry", [])
                if e.get("resource", {}).get("id") == obs["id"]}

    for path in (f"/Observation/{obs['id']}/_history", "/Observation/_history", "/_history"):
        assert versions(b, path) == {"2"}, path
        assert versions(a, path) == {"1", "2"}, path
    instance = b.get(f"/Observation/{obs['id']}/_history").json()
    assert instance.get("total") in (None, 1)
    # a page that does not hold the hidden version does not count it either
    for count in (1, 0):
        page = b.get(f"/Observation/{obs['id']}/_history", params={"_count": count}).json()
        assert page.get("total") in (None, 1), count
    # (a restricted caller is counted the versions of a whole history only)
    assert a.get(f"/Observation/{obs['id']}/_history").json()["total"] == 2


def test_documents_and_binaries_are_written_about_the_callers_patients_only(
        world: World) -> None:
    """A Binary goes where its securityContext goes and a document Bundle where its
    patient goes: written about a patient or a resource outside the caller's care,
    they would put the caller's content into another organisation's record (403),
    as an Observation about that patient would."""
    a, b = world.a, world.b
    p1, p3 = world.patients["p1"], world.patients["p3"]  # A's alone; shared with B
    doc = _create(a, {"resourceType": "DocumentReference", "status": "current",
                      "subject": {"reference": f"Patient/{p1}"},
                      "content": [{"attachment": {"contentType": "application/pdf"}}]})
    for context in (f"DocumentReference/{doc['id']}", f"Patient/{p1}"):
        forged = b.post("/Binary", content=b"%PDF-1.4 forged", headers={
            "Content-Type": "application/pdf", "X-Security-Context": context})
        assert forged.status_code == 403, (context, forged.text)
    for by_entry in (False, True):
        sent = b.post("/Bundle", json=document_bundle(p1, by_entry=by_entry))
        assert sent.status_code == 403, (by_entry, sent.text)
    # about a patient in its care, or a context that a later entry makes, B may
    assert b.post("/Bundle", json=document_bundle(p3, by_entry=False)).status_code == 201
    assert b.post("/Binary", content=b"%PDF-1.4 own", headers={
        "Content-Type": "application/pdf", "X-Security-Context": f"Patient/{p3}"}
                  ).status_code == 201
    later = f"DocumentReference/{uuid.uuid4()}"
    assert b.post("/Binary", content=b"%PDF-1.4 first", headers={
        "Content-Type": "application/pdf", "X-Security-Context": later}).status_code == 201


def test_owned_types_in_the_patient_compartment_are_their_creators(world: World) -> None:
    """Basic and DocumentManifest are owned (their creator's) and in the patient
    compartment: both rules hold, not either. Another organisation neither reads
    nor overwrites them, whether they name no patient or one it shares."""
    a, b = world.a, world.b
    p3 = world.patients["p3"]  # shared with B
    made = [_create(a, {"resourceType": "Basic", "code": {"text": "private"}}),
            _create(a, {"resourceType": "Basic", "code": {"text": "about p3"},
                        "subject": {"reference": f"Patient/{p3}"}}),
            _create(a, {"resourceType": "DocumentManifest", "status": "current",
                        "content": [{"reference": "Binary/x"}]})]
    for resource in made:
        path = f"/{resource['resourceType']}/{resource['id']}"
        assert a.get(path).status_code == 200
        assert b.get(path).status_code == 404, path
        assert b.put(path, json=resource).status_code == 404, path
        found = b.get(f"/{resource['resourceType']}", params={"_id": resource["id"]}).json()
        assert found["total"] == 0
    assert a.get(f"/Basic/{made[0]['id']}").json()["code"]["text"] == "private"


def test_in_a_value_set_tells_nothing_of_codes_only_others_use(world: World) -> None:
    """``:in`` over a code system the gateway does not hold decides membership for
    the codes in use: those of what the caller may see, else whether the search
    fails would tell which codes another organisation's records hold."""
    a, b = world.a, world.b
    system = f"http://example.org/cs-{uuid.uuid4().hex[:8]}"
    _create(a, {"resourceType": "Condition", "code": {"coding": [
        {"system": system, "code": "HIV-1"}]}, "subject": {"reference": f"Patient/"
                                                          f"{world.patients['p1']}"}})

    def value_set(code: str) -> str:
        url = f"http://example.org/vs-{uuid.uuid4().hex[:8]}"
        _create(b, {"resourceType": "ValueSet", "url": url, "status": "active", "compose": {
            "include": [{"system": system, "filter": [{"property": "concept", "op": "is-a",
                                                       "value": "ZZZ"}]},
                        {"system": system, "concept": [{"code": code}]}]}})
        return url

    answers = set()
    for code in ("HIV-1", "HIV-2"):
        found = b.get("/Condition", params={"code:in": value_set(code)})
        answers.add((found.status_code, found.json().get("total")))
    assert answers == {(200, 0)}
    # the organisation that holds the record is told it cannot decide
    assert a.get("/Condition", params={"code:in": value_set("HIV-2")}).status_code == 400
