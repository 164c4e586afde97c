"""References to this server made relative before storage (gateway.fhir.references)."""

from __future__ import annotations

import copy
from typing import Any

from gateway.fhir.references import localize, relative_names, rewrite, split_restful

BASES = ("https://gw.example/fhir/", "http://127.0.0.1:8080/fhir/")


def test_references_into_this_server_become_relative() -> None:
    plan: dict[str, Any] = {
        "resourceType": "CarePlan", "status": "active", "intent": "plan",
        "subject": {"reference": "https://gw.example/fhir/Patient/p1"},
        "careTeam": [{"reference": "http://127.0.0.1:8080/fhir/CareTeam/t1/_history/3"}],
        "activity": [{"reference": {"reference": "https://gw.example/fhir/Task/t9"}}],
        "contained": [{"resourceType": "Goal", "id": "g",
                       "subject": {"reference": "https://gw.example/fhir/Patient/p1"}}],
        "author": {"reference": "https://other.example/fhir/Practitioner/d1"},
        "instantiatesCanonical": ["https://gw.example/fhir/PlanDefinition/pd"],
        "note": [{"text": "see https://gw.example/fhir/Patient/p1"}],
        "supportingInfo": [{"reference": "https://gw.example/fhir/metadata"},
                           {"reference": "https://gw.example/fhirish/Patient/p1"}],
    }
    localize(plan, BASES)
    assert plan["subject"] == {"reference": "Patient/p1"}
    assert plan["careTeam"] == [{"reference": "CareTeam/t1/_history/3"}]
    assert plan["activity"][0]["reference"] == {"reference": "Task/t9"}
    assert plan["contained"][0]["subject"] == {"reference": "Patient/p1"}
    # elsewhere, canonicals, text and what is not Type/id stay as they are
    assert plan["author"] == {"reference": "https://other.example/fhir/Practitioner/d1"}
    assert plan["instantiatesCanonical"] == ["https://gw.example/fhir/PlanDefinition/pd"]
    assert plan["note"] == [{"text": "see https://gw.example/fhir/Patient/p1"}]
    assert plan["supportingInfo"] == [{"reference": "https://gw.example/fhir/metadata"},
                                      {"reference": "https://gw.example/fhirish/Patient/p1"}]


def test_bundles_and_unknown_bases_are_left_alone() -> None:
    document = {"resourceType": "Bundle", "type": "document", "entry": [
        {"fullUrl": "https://gw.example/fhir/Composition/c1",
         "resource": {"resourceType": "Composition",
                      "subject": {"reference": "https://gw.example/fhir/Patient/p1"}}}]}
    kept = copy.deepcopy(document)
    localize(document, BASES)
    assert document == kept
    obs = {"resourceType": "Observation",
           "subject": {"reference": "https://gw.example/fhir/Patient/p1"}}
    localize(obs, ())
    assert obs["subject"]["reference"] == "https://gw.example/fhir/Patient/p1"


def test_relative_references_resolve_against_the_entrys_full_url() -> None:
    names = {"http://x.org/fhir/Patient/abc": "Patient/new1",
             "urn:uuid:0c4a5e6e-1111-4c1e-9d2b-000000000001": "Encounter/new2",
             "https://y.org/Patient/abc": "Patient/new3"}
    assert split_restful("http://x.org/fhir/Patient/abc") == ("http://x.org/fhir/", "Patient/abc")
    assert split_restful("urn:uuid:0c4a5e6e-1111-4c1e-9d2b-000000000001") is None
    assert split_restful("http://x.org/fhir/metadata") is None
    by_base = relative_names(names)
    assert by_base == {"http://x.org/fhir/": {"Patient/abc": "Patient/new1"},
                       "https://y.org/": {"Patient/abc": "Patient/new3"}}
    relative = by_base["http://x.org/fhir/"]
    obs: dict[str, Any] = {
        "resourceType": "Observation", "subject": {"reference": "Patient/abc"},
        "performer": [{"reference": "Patient/abcd"}],
        "note": [{"text": "Patient/abc"}],  # text, not a reference
    }
    rewrite(obs, names, None, relative)
    assert obs["subject"] == {"reference": "Patient/new1"}
    assert obs["performer"] == [{"reference": "Patient/abcd"}]
    assert obs["note"] == [{"text": "Patient/abc"}]


def test_with_a_model_only_elements_that_name_resources_are_rewritten() -> None:
    from gateway.registry.registry import Registry

    model = Registry.load().indexer.model
    name = "urn:uuid:5e0b5a52-8f54-4f2b-9d7e-2a1b0c3d4e5f"
    target = "Patient/p1"
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "identifier": [{"system": name, "value": name}],  # uri, string
        "subject": {"reference": name},
        "valueString": name,
        "component": [{"valueString": name, "code": {"text": name}}],
        "note": [{"text": name, "authorReference": {"reference": name}}],
        "_status": {"extension": [{"url": "urn:x", "valueUuid": name}]},
        "contained": [{"resourceType": "Provenance", "policy": [name, f"{name}|2"],
                       "reason": [{"text": name}]}],
        "extension": [{"url": "urn:x", "valueCanonical": f"{name}|1.0"},
                      {"url": "urn:y", "valueMarkdown": name},
                      {"url": "urn:z", "valueUnknownType": name}],
    }
    out = rewrite(copy.deepcopy(obs), {name: target}, model=model)
    assert out["identifier"] == [{"system": target, "value": name}]
    assert out["subject"] == {"reference": target}
    assert out["valueString"] == name
    assert out["component"] == [{"valueString": name, "code": {"text": name}}]
    assert out["note"] == [{"text": name, "authorReference": {"reference": target}}]
    assert out["_status"]["extension"][0]["valueUuid"] == target
    assert out["contained"][0]["policy"] == [target, f"{target}|2"]  # uri, in a contained
    assert out["contained"][0]["reason"] == [{"text": name}]
    # "Elements of type canonical are not replaced" (http.html#trules); an element the
    # model does not know is taken for a uri
    assert [e.get("valueCanonical") or e.get("valueMarkdown") or e.get("valueUnknownType")
            for e in out["extension"]] == [f"{name}|1.0", name, target]
    # without a model every value is replaced, as before
    bare = rewrite(copy.deepcopy(obs), {name: target})
    assert bare["valueString"] == target and bare["identifier"][0]["value"] == target


def test_an_http_full_url_is_replaced_in_references_only() -> None:
    """A fullUrl that is not a placeholder is an identity where a uri holds it: an
    implementation guide's CodeSystem sent under its canonical URL keeps its ``url``,
    and codings keep their system; a reference to it becomes local."""
    from gateway.registry.registry import Registry

    model = Registry.load().indexer.model
    system = "http://example.org/fhir/CodeSystem/lab"
    names = {system: "CodeSystem/lab", "urn:oid:1.2.3": "Binary/b1"}
    code_system = {"resourceType": "CodeSystem", "url": system, "status": "active",
                   "content": "complete", "supplements": system}
    assert rewrite(copy.deepcopy(code_system), names, model=model) == code_system
    obs: dict[str, Any] = {
        "resourceType": "Observation", "code": {"coding": [{"system": system, "code": "a"}]},
        "focus": [{"reference": system}],
        "derivedFrom": [{"reference": "urn:oid:1.2.3"}],
        "extension": [{"url": "urn:x", "valueUrl": "urn:oid:1.2.3"}]}
    out = rewrite(copy.deepcopy(obs), names, model=model)
    assert out["code"] == obs["code"]
    assert out["focus"] == [{"reference": "CodeSystem/lab"}]
    assert out["derivedFrom"] == [{"reference": "Binary/b1"}]
    assert out["extension"][0]["valueUrl"] == "Binary/b1"
    # a placeholder is not a canonical resource's identity either
    library = {"resourceType": "Library", "url": "urn:oid:1.2.3", "status": "draft"}
    assert rewrite(copy.deepcopy(library), names, model=model) == library


def test_the_model_names_the_element_a_json_key_holds() -> None:
    from gateway.registry.registry import Registry

    model = Registry.load().indexer.model
    found = model.child("Patient", "multipleBirthBoolean")  # a choice with a camelCase name
    assert found is not None and (found[0], found[1].type) == ("multipleBirth", "boolean")
    found = model.child("Observation.component", "valueQuantity")
    assert found is not None and (found[0], found[1].ctx) == ("value", "Quantity")
    found = model.child("Patient", "birthDate")
    assert found is not None and (found[0], found[1].type) == ("birthDate", "date")
    assert model.child("Patient", "useContext") is None
    assert model.child("Patient", "nameFoo") is None
