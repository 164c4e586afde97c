"""Profile validation with small test profiles (tests/fhir/validation/fixtures)."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.fhir import json as fjson
from gateway.fhir.validation import FhirValidator
from gateway.fhir.validation.profiles import matches_pattern
from tests.fhir.validation.conftest import TEST_BASE, codes, errors, patient, where

TP = TEST_BASE + "test-patient"
TO = TEST_BASE + "test-observation"
NICKNAME = TEST_BASE + "test-nickname"
DATA = Path(__file__).resolve().parents[2] / "data"


def profiled(**extra: Any) -> dict[str, Any]:
    resource = patient(**extra)
    resource["meta"] = {"profile": [TP]}
    return resource


def diagnostics(issues: list[Any]) -> str:
    return " | ".join(i.diagnostics or "" for i in errors(issues))


def test_a_conformant_resource_passes(validator: FhirValidator) -> None:
    assert validator.validate(profiled()) == [
        i for i in validator.validate(profiled()) if i.severity == "warning"]
    assert errors(validator.validate(profiled())) == []


def test_profile_parameter_overrides_meta_profile(validator: FhirValidator) -> None:
    plain = patient(gender=None)
    del plain["gender"]
    assert errors(validator.validate(plain)) == []
    issues = validator.validate(plain, profile=TP)
    assert codes(issues) == {"GW-4204"}
    assert "Patient.gender" in diagnostics(issues)
    assert TP in diagnostics(issues)  # issues name the profile and its element


def test_tightened_cardinality(validator: FhirValidator) -> None:
    issues = validator.validate(profiled(name=[{"family": "A"}, {"family": "B"}]))
    assert codes(issues) == {"GW-4205"}
    assert where(issues) == {"Patient.name[1]"}
    issues = validator.validate(profiled(name=[{"given": ["A"]}]))
    assert where(issues) == {"Patient.name[0]"}
    assert "element Patient.name.family" in diagnostics(issues)


def test_slicing_by_value_counts_each_slice(validator: FhirValidator) -> None:
    other = {"system": "urn:other", "value": "x"}
    assert errors(validator.validate(profiled(identifier=[other,
                                                          {"system": "urn:test:mrn",
                                                           "value": "1"}]))) == []
    issues = validator.validate(profiled(identifier=[other]))  # open slicing, mrn missing
    assert codes(issues) == {"GW-4204"}
    assert "slice 'mrn'" in diagnostics(issues)
    two = [{"system": "urn:test:mrn", "value": "1"}, {"system": "urn:test:mrn", "value": "2"}]
    issues = validator.validate(profiled(identifier=two))
    assert codes(issues) == {"GW-4205"}
    assert where(issues) == {"Patient.identifier[1]"}
    long = [{"system": "urn:test:mrn", "value": "123456789"}]
    issues = validator.validate(profiled(identifier=long))
    assert codes(issues) == {"GW-4218"}
    assert where(issues) == {"Patient.identifier[0].value"}


def test_a_slice_that_cannot_be_told_is_not_counted(validator: FhirValidator) -> None:
    """A slice whose discriminator cannot be evaluated here (the element it names is not
    in the slice; a value set not held) matches nothing: its minimum is not judged, nor
    is the closed rule, where it used to fail every resource (as mCODE's and US Core's
    category slices did)."""
    sd = json.loads((Path(__file__).parent / "fixtures"
                     / "StructureDefinition-test-patient.json").read_text())
    sd["url"] = TEST_BASE + "undecidable"
    for element in sd["snapshot"]["element"]:
        if element["id"] == "Patient.identifier":
            element["slicing"] = {"discriminator": [{"type": "value", "path": "type"}],
                                  "rules": "closed"}
    profiles = validator.with_stored([sd], {})
    other = {"system": "urn:other", "value": "x"}
    found = validator.validate(profiled(identifier=[other]), profile=sd["url"],
                               profiles=profiles)
    assert errors(found) == []
    # a slice by a required binding to a value set that is not known here
    sd["url"] = TEST_BASE + "unknown-value-set"
    for element in sd["snapshot"]["element"]:
        if element["id"] == "Patient.identifier":
            element["slicing"] = {"discriminator": [{"type": "value", "path": "type"}],
                                  "rules": "open"}
        if element["id"] == "Patient.identifier:mrn.system":
            element["id"], element["path"] = "Patient.identifier:mrn.type", \
                "Patient.identifier.type"
            element["type"] = [{"code": "CodeableConcept"}]
            element["binding"] = {"strength": "required", "valueSet": "urn:test:nowhere"}
            for key in [k for k in element if k.startswith(("fixed", "pattern"))]:
                del element[key]
    profiles = validator.with_stored([sd], {})
    assert errors(validator.validate(profiled(identifier=[other]), profile=sd["url"],
                                     profiles=profiles)) == []
    # the same slice, with the value set known: counted
    profiles = validator.with_stored([sd], {"urn:test:nowhere": frozenset(
        {("http://terminology.hl7.org/CodeSystem/v2-0203", "MR")})})
    issues = validator.validate(profiled(identifier=[other]), profile=sd["url"],
                                profiles=profiles)
    assert "slice 'mrn' of Patient.identifier needs at least 1" in diagnostics(issues)


def test_closed_slicing_by_pattern(validator: FhirValidator) -> None:
    emergency = {"relationship": [{"coding": [
        {"system": "http://terminology.hl7.org/CodeSystem/v2-0131", "code": "C",
         "display": "Emergency Contact"}]}], "telecom": [{"system": "phone", "value": "1"}]}
    assert errors(validator.validate(profiled(contact=[emergency]))) == []
    friend = copy.deepcopy(emergency)
    friend["relationship"][0]["coding"][0]["code"] = "F"
    issues = validator.validate(profiled(contact=[emergency, friend]))
    assert codes(issues) == {"GW-4213"}
    assert where(issues) == {"Patient.contact[1]"}
    no_phone = {"relationship": emergency["relationship"], "name": {"family": "X"}}
    issues = validator.validate(profiled(contact=[no_phone]))
    assert codes(issues) == {"GW-4204"}
    assert "Patient.contact:emergency.telecom" in diagnostics(issues)
    issues = validator.validate(profiled(contact=[emergency] * 3))
    assert "slice 'emergency'" in diagnostics(issues)


def test_pattern_on_codeable_concept(validator: FhirValidator) -> None:
    de = {"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "de"}]}}
    assert errors(validator.validate(profiled(communication=[de]))) == []
    other = {"language": {"coding": [{"system": "urn:iso:639", "code": "de"}]}}
    issues = validator.validate(profiled(communication=[other]))
    assert codes(issues) == {"GW-4212"}
    assert where(issues) == {"Patient.communication[0].language"}


def test_required_binding_to_an_own_value_set(validator: FhirValidator) -> None:
    cs = "https://carepath-gateway.org/fhir/test/CodeSystem/test-marital"
    for code in ("married", "civil", "single"):  # is-a married, plus a concept list
        ok = profiled(maritalStatus={"coding": [{"system": cs, "code": code}]})
        assert errors(validator.validate(ok)) == [], code
    for bad in ({"coding": [{"system": cs, "code": "unknown"}]},
                {"coding": [{"system": "urn:x", "code": "married"}]}, {"text": "married"}):
        issues = validator.validate(profiled(maritalStatus=bad))
        assert codes(issues) == {"GW-4207"}, bad
        assert "ValueSet/test-marital" in diagnostics(issues)


def test_profile_invariants_with_severity(validator: FhirValidator) -> None:
    resource = profiled()
    del resource["birthDate"]
    issues = validator.validate(resource)
    assert codes(issues) == {"GW-4208"}
    assert "tp-1" in diagnostics(issues)
    assert any("tp-2" in (i.diagnostics or "") and i.severity == "warning" for i in issues)


def test_extension_slices_use_the_extension_profile(validator: FhirValidator) -> None:
    nick = {"url": NICKNAME, "valueString": "Eri"}
    assert errors(validator.validate(profiled(extension=[nick]))) == []
    long = {"url": NICKNAME, "valueString": "Erikaaa"}
    issues = validator.validate(profiled(extension=[long]))
    assert codes(issues) == {"GW-4218"}
    assert where(issues) == {"Patient.extension[0].valueString"}
    coded = {"url": NICKNAME, "valueCode": "eri"}
    issues = validator.validate(profiled(extension=[coded]))
    assert "GW-4217" in codes(issues)
    issues = validator.validate(profiled(extension=[nick, dict(nick)]))
    assert codes(issues) == {"GW-4205"}


def _observation(**extra: Any) -> dict[str, Any]:
    obs: dict[str, Any] = {
        "resourceType": "Observation", "meta": {"profile": [TO + "|1.0.0"]},
        "text": {"status": "generated",
                 "div": '<div xmlns="http://www.w3.org/1999/xhtml">72 kg</div>'},
        "status": "final",
        "category": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7",
                             "display": "Body weight"}], "text": "weight"},
        "subject": {"reference": "Patient/1"},
        "valueQuantity": {"value": 72.5, "unit": "kg", "system": "http://unitsofmeasure.org",
                          "code": "kg"},
    }
    obs.update(extra)
    return obs


def test_fixed_values_choice_types_and_nested_bindings(validator: FhirValidator) -> None:
    assert errors(validator.validate(_observation())) == []
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"status": "preliminary"}, "GW-4212", "Observation.status"),
        ({"code": {"coding": [{"system": "http://loinc.org", "code": "8302-2"}]}},
         "GW-4212", "Observation.code"),
        ({"valueQuantity": {"value": 72, "system": "http://unitsofmeasure.org",
                            "code": "cm"}}, "GW-4207", "Observation.valueQuantity.code"),
        ({"valueQuantity": {"value": 72, "system": "urn:x", "code": "kg"}},
         "GW-4212", "Observation.valueQuantity.system"),
        ({"valueQuantity": {"value": 720, "system": "http://unitsofmeasure.org",
                            "code": "kg"}}, "GW-4206", "Observation.valueQuantity.value"),
    ]
    for change, code, expression in cases:
        issues = validator.validate(_observation(**change))
        assert codes(issues) == {code}, change
        assert where(issues) == {expression}, change
    obs = _observation(valueString="72 kg")
    del obs["valueQuantity"]
    issues = validator.validate(obs)
    assert codes(issues) == {"GW-4217", "GW-4204"}
    obs = _observation(category=[{"text": "other"}])
    assert "slice 'vs'" in diagnostics(validator.validate(obs))


def test_a_binding_on_a_choice_applies_to_its_coded_types(validator: FhirValidator) -> None:
    """``value[x]`` of boolean or CodeableConcept bound to a value set: a boolean is not
    bound (as SDC's observationExtract extension has it), a CodeableConcept is."""
    sd = json.loads((Path(__file__).parent / "fixtures"
                     / "StructureDefinition-test-observation.json").read_text())
    sd["url"] = TEST_BASE + "choice-binding"
    elements = []
    for element in sd["snapshot"]["element"]:
        if element["id"].startswith("Observation.value[x]."):
            continue
        if element["id"] == "Observation.value[x]":
            element["type"] = [{"code": "boolean"}, {"code": "CodeableConcept"}]
            element["binding"] = {"strength": "required",
                                  "valueSet": TEST_BASE.replace("StructureDefinition",
                                                                "ValueSet") + "test-units"}
        elements.append(element)
    sd["snapshot"]["element"] = elements
    profiles = validator.with_stored([sd], {TEST_BASE.replace(
        "StructureDefinition", "ValueSet") + "test-units": frozenset(
        {("http://unitsofmeasure.org", "kg")})})

    def check(**value: Any) -> list[Any]:
        obs = _observation(**value)
        del obs["valueQuantity"]
        return errors(validator.validate(obs, profile=sd["url"], profiles=profiles))

    assert check(valueBoolean=True) == []
    kg = {"coding": [{"system": "http://unitsofmeasure.org", "code": "kg"}]}
    assert check(valueCodeableConcept=kg) == []
    lb = {"coding": [{"system": "http://unitsofmeasure.org", "code": "[lb_av]"}]}
    assert codes(check(valueCodeableConcept=lb)) == {"GW-4207"}


def test_unknown_profile_is_a_warning(validator: FhirValidator) -> None:
    resource = patient(meta={"profile": ["http://example.org/StructureDefinition/nope"]})
    issues = validator.validate(resource)
    assert [(i.severity, i.code.gw) for i in issues] == [("warning", "GW-4211")]
    assert issues[0].expression == ("Patient.meta",)


def test_profile_of_another_type_is_an_error(validator: FhirValidator) -> None:
    issues = validator.validate(patient(), profile=TO)
    assert codes(issues) == {"GW-4211"}


def test_warn_only_profiles_report_warnings(validator: FhirValidator) -> None:
    lenient = FhirValidator(validator.definitions, warn_only=f"http://x.org/a, {TP}",
                            _compiled=(validator.model, validator.profiles))
    bad = profiled(name=[{"family": "A"}, {"family": "B"}], gender="xyz")
    issues = lenient.validate(bad)
    # the base error stays an error; the profile's becomes a warning
    assert codes(issues) == {"GW-4207"}
    assert any(i.code.gw == "GW-4205" and i.severity == "warning" for i in issues)
    assert codes(validator.validate(bad)) == {"GW-4207", "GW-4205"}


def test_a_profile_lists_the_first_hundred_errors(validator: FhirValidator) -> None:
    names = [{"given": ["A"]}] * 300  # the profile: one name, with a family
    issues = validator.validate(profiled(name=names))
    assert len(errors(issues)) == 101 and issues[-1].code.gw == "GW-4220"
    assert issues[-1].severity == "error"
    lenient = FhirValidator(validator.definitions, warn_only=TP,
                            _compiled=(validator.model, validator.profiles))
    warned = lenient.validate(profiled(name=names))
    assert errors(warned) == [] and len(warned) == 101
    assert warned[-1].code.gw == "GW-4220" and warned[-1].severity == "warning"


def test_profiles_of_bundle_entries_are_checked(validator: FhirValidator) -> None:
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:5d2b7c3a-5f34-4b2a-9d1e-2a3b4c5d6e7f",
         "resource": _observation(status="amended")}]}
    issues = validator.validate(bundle)
    assert where(issues) == {"Bundle.entry[0].resource.status"}


BP_PROFILE = "http://hl7.org/fhir/StructureDefinition/bp"


def _blood_pressure() -> dict[str, Any]:
    """R4's blood pressure example (it claims the vital signs profiles)."""
    with gzip.open(DATA / "r4-examples.ndjson.gz", "rt", encoding="utf-8") as f:
        rows = {row["file"]: row["text"] for row in map(json.loads, f)}
    return dict(fjson.loads(rows["Observation-blood-pressure.json"]))


def test_core_vital_signs_profiles(validator: FhirValidator) -> None:
    bp, profile = _blood_pressure(), BP_PROFILE
    assert errors(validator.validate(bp, profile=profile)) == []
    no_systolic = copy.deepcopy(bp)
    del no_systolic["component"][0]
    assert "slice 'SystolicBP'" in diagnostics(validator.validate(no_systolic,
                                                                   profile=profile))
    kpa = copy.deepcopy(bp)
    kpa["component"][0]["valueQuantity"]["code"] = "kPa"
    issues = validator.validate(kpa, profile=profile)
    assert where(issues) == {"Observation.component[0].valueQuantity",
                             "Observation.component[0].valueQuantity.code"}
    # effective[x] (dateTime or Period) is 1..1: a dateTime given only as its
    # extension (a data-absent-reason) is there; nothing at all is not
    absent = copy.deepcopy(bp)
    del absent["effectiveDateTime"]
    assert "effective[x] needs at least 1" in diagnostics(validator.validate(
        absent, profile=profile))
    absent["_effectiveDateTime"] = {"extension": [{
        "url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
        "valueCode": "unknown"}]}
    assert errors(validator.validate(absent, profile=profile)) == []


def test_a_profile_narrows_the_types_a_reference_may_name(validator: FhirValidator) -> None:
    """R4's vital signs profiles allow only a Patient as subject (the base allows a
    Group, Device or Location too); a stored profile's ``targetProfile`` naming another
    stored profile narrows to the type that one constrains."""
    bp, profile = _blood_pressure(), BP_PROFILE
    assert errors(validator.validate(bp, profile=profile)) == []
    group = copy.deepcopy(bp)
    group["subject"] = {"reference": "Group/102"}
    issues = validator.validate(group, profile=profile)
    assert codes(issues) == {"GW-4215"}, diagnostics(issues)
    assert where(issues) == {"Observation.subject.reference"}
    unclaimed = {k: v for k, v in group.items() if k != "meta"}
    assert errors(validator.validate(unclaimed)) == []  # the base allows it
    absolute = copy.deepcopy(bp)
    absolute["subject"] = {"reference": "http://example.org/fhir/Device/d1/_history/2"}
    assert codes(validator.validate(absolute, profile=profile)) == {"GW-4215"}
    typed = copy.deepcopy(bp)
    typed["subject"] = {"type": "Location", "identifier": {"value": "ward-3"}}
    assert where(validator.validate(typed, profile=profile)) == {"Observation.subject.type"}
    for fine in ({"reference": "urn:uuid:0b5f6a2e-53cc-4e49-a9a0-22aa4ed0a0ad"},
                 {"reference": "Patient/example"}, {"display": "someone"}):
        assert errors(validator.validate({**bp, "subject": fine}, profile=profile)) == [], fine
    # a stored profile naming a stored (patient) profile as the target
    stored = {
        "resourceType": "StructureDefinition", "url": TEST_BASE + "ward-observation",
        "name": "WardObservation", "status": "active", "kind": "resource",
        "abstract": False, "type": "Observation", "derivation": "constraint",
        "baseDefinition": "http://hl7.org/fhir/StructureDefinition/Observation",
        "differential": {"element": [{"id": "Observation.subject", "path":
                                      "Observation.subject", "type": [{
                                          "code": "Reference", "targetProfile": [TP]}]}]}}
    patient_profile = json.loads((Path(__file__).parent / "fixtures"
                                  / "StructureDefinition-test-patient.json").read_text())
    profiles = validator.with_stored([patient_profile, stored], {})
    ward = {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "subject": {"reference": "Group/1"}}
    found = validator.validate(ward, profile=stored["url"], profiles=profiles)
    assert "may refer to Patient in this profile, not Group" in diagnostics(found)
    ward["subject"] = {"reference": "Patient/1"}
    assert errors(validator.validate(ward, profile=stored["url"], profiles=profiles)) == []


@pytest.mark.parametrize(("value", "pattern", "expected"), [
    ({"coding": [{"system": "a", "code": "1", "display": "x"}], "text": "t"},
     {"coding": [{"system": "a", "code": "1"}]}, True),
    ({"coding": [{"system": "b", "code": "2"}, {"system": "a", "code": "1"}]},
     {"coding": [{"system": "a", "code": "1"}]}, True),
    ({"coding": [{"system": "a", "code": "2"}]}, {"coding": [{"system": "a", "code": "1"}]},
     False),
    ({"value": 1.50}, {"value": fjson.loads(b'{"v":1.5}')["v"]}, True),
    ("a", "a", True),
    (True, 1, False),
])
def test_pattern_matching(value: Any, pattern: Any, expected: bool) -> None:
    assert matches_pattern(value, pattern) is expected
