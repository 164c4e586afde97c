"""Base validation against the R4 StructureDefinitions (gateway.fhir.validation.walker)."""

from __future__ import annotations

import copy
from decimal import Decimal
from typing import Any

import pytest

from gateway.fhir import json as fjson
from gateway.fhir.validation import FhirValidator
from tests.fhir.validation.conftest import codes, errors, patient, where


def test_a_valid_patient_has_no_issues(validator: FhirValidator) -> None:
    assert validator.validate(patient()) == []


def test_validation_never_changes_the_resource(validator: FhirValidator) -> None:
    resource = patient(contained=[{"resourceType": "Organization", "id": "o", "name": "x"}],
                       managingOrganization={"reference": "#o"}, active="true")
    before = copy.deepcopy(resource)
    validator.validate(resource)
    assert resource == before


# -- the rejects of issue 3 --------------------------------------------------------


@pytest.mark.parametrize(("change", "code", "expression"), [
    ({"active": "true"}, "GW-4202", "Patient.active"),  # a string where a boolean belongs
    ({"active": 1}, "GW-4202", "Patient.active"),
    ({"gender": 1}, "GW-4202", "Patient.gender"),
    ({"name": {"family": "x"}}, "GW-4202", "Patient.name"),  # object where an array belongs
    ({"birthDate": ["1970-01-01"]}, "GW-4202", "Patient.birthDate"),
    ({"name": ["Muster"]}, "GW-4202", "Patient.name[0]"),
    ({"multipleBirthInteger": 1.0}, "GW-4202", "Patient.multipleBirthInteger"),
    ({"multipleBirthInteger": "2"}, "GW-4202", "Patient.multipleBirthInteger"),
    ({"multipleBirthInteger": True}, "GW-4202", "Patient.multipleBirthInteger"),
])
def test_wrong_json_types_are_rejected(validator: FhirValidator, change: dict[str, Any],
                                       code: str, expression: str) -> None:
    issues = validator.validate(patient(**change))
    assert code in codes(issues)
    assert expression in where(issues)


def test_decimal_must_be_a_json_number(validator: FhirValidator) -> None:
    obs = _observation(valueQuantity={"value": "1.5"})
    assert where(validator.validate(obs)) == {"Observation.valueQuantity.value"}
    for good in (1, 1.5, fjson.loads(b'{"v":1.50}')["v"], Decimal("1e3")):
        assert errors(validator.validate(_observation(valueQuantity={"value": good}))) == []


def test_missing_required_elements_are_rejected(validator: FhirValidator) -> None:
    obs = _observation()
    del obs["code"]
    issues = validator.validate(obs)
    assert codes(issues) == {"GW-4204"}
    assert any("Observation.code is required" in (i.diagnostics or "") for i in issues)
    # required inside a backbone element and a data type
    issues = validator.validate(patient(link=[{"type": "seealso"}],
                                        extension=[{"valueString": "x"}]))
    assert {"Patient.link[0]", "Patient.extension[0]"} <= where(issues)


def test_unknown_elements_are_rejected(validator: FhirValidator) -> None:
    issues = validator.validate(patient(nickname="Eri", name=[{"family": "M", "surname": "x"}]))
    assert codes(issues) == {"GW-4201"}
    assert where(issues) == {"Patient.nickname", "Patient.name[0].surname"}
    # resourceType belongs on resources only
    issues = validator.validate(patient(name=[{"family": "M", "resourceType": "HumanName"}]))
    assert where(issues) == {"Patient.name[0].resourceType"}


@pytest.mark.parametrize("value", [
    "1970-13-01", "1970-02-30", "70-01-01", "1970/01/01", "0000-01-01", "1970-1-1",
    "1970-01-01T10:00:00Z",  # a date has no time
])
def test_bad_dates_are_rejected(validator: FhirValidator, value: str) -> None:
    issues = validator.validate(patient(birthDate=value))
    assert codes(issues) == {"GW-4206"}
    assert where(issues) == {"Patient.birthDate"}


@pytest.mark.parametrize("value", [
    "2020-01-01T10:00:00", "2020-01-01T25:00:00Z", "2020-01-01T10:00Z", "2020-01-01 10:00:00Z",
    "2020-01-01T10:00:00+15:00",
])
def test_bad_date_times_are_rejected(validator: FhirValidator, value: str) -> None:
    issues = validator.validate(patient(deceasedDateTime=value))
    assert codes(issues) == {"GW-4206"}


@pytest.mark.parametrize("value", ["2020", "2020-02", "2020-02-29", "2020-01-01T10:00:00Z",
                                   "2020-01-01T10:00:00.123+02:00", "2016-12-31T23:59:60Z"])
def test_good_date_times_pass(validator: FhirValidator, value: str) -> None:
    assert errors(validator.validate(patient(deceasedDateTime=value))) == []


@pytest.mark.parametrize("rid", ["a b", "x" * 65, "ä", "a/b", ""])
def test_bad_ids_are_rejected(validator: FhirValidator, rid: str) -> None:
    issues = validator.validate(patient(id=rid))
    assert "Patient.id" in where(issues)
    issues = validator.validate(patient(contained=[{"resourceType": "Organization", "id": rid,
                                                     "name": "x"}]))
    assert "Patient.contained[0].id" in where(issues)


@pytest.mark.parametrize(("gender", "code"), [
    ("xyz", "GW-4207"),  # not in the required value set
    ("Female", "GW-4207"),
    (" female", "GW-4206"),  # codes have no leading whitespace
    ("", "GW-4206"),
])
def test_bad_codes_are_rejected(validator: FhirValidator, gender: str, code: str) -> None:
    issues = validator.validate(patient(gender=gender))
    assert code in codes(issues)
    assert where(issues) == {"Patient.gender"}


def test_required_bindings_of_coding_and_codeable_concept(validator: FhirValidator) -> None:
    cs = "http://terminology.hl7.org/CodeSystem/condition-clinical"
    good = {"resourceType": "Condition", "subject": {"reference": "Patient/1"},
            "clinicalStatus": {"coding": [{"system": cs, "code": "active"}]}}
    assert errors(validator.validate(good)) == []
    for bad in ({"coding": [{"system": cs, "code": "dormant"}]},
                {"coding": [{"system": "urn:other", "code": "active"}]},
                {"text": "active"}):
        issues = validator.validate({**good, "clinicalStatus": bad})
        assert codes(issues) == {"GW-4207"}, bad
        assert where(issues) == {"Condition.clinicalStatus"}
    # another coding beside one from the value set is fine
    both = {"coding": [{"system": "urn:other", "code": "x"}, {"system": cs, "code": "active"}]}
    assert errors(validator.validate({**good, "clinicalStatus": both})) == []


def test_null_and_empty_values_are_rejected(validator: FhirValidator) -> None:
    for change, expression in (
        ({"gender": None}, "Patient.gender"),
        ({"name": []}, "Patient.name"),
        ({"name": [{}]}, "Patient.name[0]"),
        ({"maritalStatus": {}}, "Patient.maritalStatus"),
        ({"name": [{"family": ""}]}, "Patient.name[0].family"),
        ({"name": [{"given": ["a", None]}]}, "Patient.name[0].given[1]"),
    ):
        issues = validator.validate(patient(**change))
        assert expression in where(issues), change
        assert codes(issues) <= {"GW-4203", "GW-4206", "GW-4208"}


def test_primitive_extensions(validator: FhirValidator) -> None:
    ext = {"extension": [{"url": "http://example.org/x", "valueString": "y"}]}
    assert errors(validator.validate(patient(_birthDate=ext))) == []
    # aligned arrays: a null opposite an extension is how a value-less repeat is sent
    name = {"given": ["a", None], "_given": [None, ext]}
    assert errors(validator.validate(patient(name=[name]))) == []
    for bad, expression in (
        ({"given": ["a"], "_given": [None, ext]}, "Patient.name[0]._given"),
        ({"given": [None], "_given": [None]}, "Patient.name[0].given[0]"),
        ({"_given": ext}, "Patient.name[0]._given"),
        ({"given": ["a"], "_given": [{"id": "x"}]}, "Patient.name[0]._given[0]"),
        ({"given": ["a"], "_given": [{"url": "x"}]}, "Patient.name[0]._given[0].url"),
    ):
        assert expression in where(validator.validate(patient(name=[bad]))), bad
    # the only value of a required primitive may be an extension (data-absent-reason)
    obs = _observation(status=None)
    obs["_status"] = ext
    assert errors(validator.validate(obs)) == []


def test_choice_elements(validator: FhirValidator) -> None:
    assert errors(validator.validate(patient(deceasedBoolean=False))) == []
    issues = validator.validate(patient(deceasedBoolean=False, deceasedDateTime="2020"))
    assert codes(issues) == {"GW-4205"}
    assert where(validator.validate(patient(deceasedString="x"))) == {"Patient.deceasedString"}


def test_cardinality_maximum(validator: FhirValidator) -> None:
    obs = _observation(specimen=[{"reference": "Specimen/1"}])
    issues = validator.validate(obs)
    assert codes(issues) == {"GW-4202"}
    assert where(issues) == {"Observation.specimen"}


def test_reference_target_types(validator: FhirValidator) -> None:
    assert errors(validator.validate(_observation(subject={"reference": "Group/1"}))) == []
    for ref in ("Organization/1", "http://x.org/fhir/Organization/1/_history/2"):
        issues = validator.validate(_observation(subject={"reference": ref}))
        assert codes(issues) == {"GW-4215"}
        assert where(issues) == {"Observation.subject.reference"}
    for ref in ("urn:uuid:5d2b7c3a-5f34-4b2a-9d1e-2a3b4c5d6e7f", "http://x.org/thing",
                "Foo/1"):
        assert errors(validator.validate(_observation(subject={"reference": ref}))) == []


def test_invariants_compiled_from_fhirpath(validator: FhirValidator) -> None:
    issues = validator.validate(patient(contact=[{"gender": "male"}]))
    assert codes(issues) == {"GW-4208"}
    assert where(issues) == {"Patient.contact[0]"}
    assert "pat-1" in errors(issues)[0].diagnostics  # type: ignore[operator]
    period = {"start": "2020-02-01", "end": "2020-01-01"}
    issues = validator.validate(patient(name=[{"family": "M", "period": period}]))
    assert where(issues) == {"Patient.name[0].period"}
    assert "per-1" in errors(issues)[0].diagnostics  # type: ignore[operator]
    # different precision: not decidable, so not an error
    ok = {"start": "2020-01", "end": "2020-01-15"}
    assert errors(validator.validate(patient(name=[{"family": "M", "period": ok}]))) == []
    ext = {"url": "http://example.org/x", "valueString": "y",
           "extension": [{"url": "a", "valueString": "b"}]}
    issues = validator.validate(patient(extension=[ext]))
    assert "ext-1" in errors(issues)[0].diagnostics  # type: ignore[operator]
    quantity = {"value": 1, "code": "kg"}
    issues = validator.validate(_observation(valueQuantity=quantity))
    assert "qty-3" in errors(issues)[0].diagnostics  # type: ignore[operator]


def test_simple_quantity_has_no_comparator(validator: FhirValidator) -> None:
    rng = {"low": {"value": 1, "comparator": "<"}}
    issues = validator.validate(_observation(valueRange=rng))
    assert where(issues) == {"Observation.valueRange.low.comparator"}


def test_ele_1_an_element_needs_more_than_an_id(validator: FhirValidator) -> None:
    issues = validator.validate(patient(maritalStatus={"id": "a"}))
    assert where(issues) == {"Patient.maritalStatus"}


# -- contained resources: dom-2..dom-6, ref-1 -----------------------------------------


def test_contained_resources(validator: FhirValidator) -> None:
    org = {"resourceType": "Organization", "id": "o", "name": "x"}
    assert errors(validator.validate(
        patient(contained=[org], managingOrganization={"reference": "#o"}))) == []
    issues = validator.validate(patient(contained=[org]))  # never referenced
    assert "dom-3" in errors(issues)[0].diagnostics  # type: ignore[operator]
    assert where(issues) == {"Patient.contained[0]"}
    issues = validator.validate(patient(managingOrganization={"reference": "#nothing"}))
    assert "ref-1" in errors(issues)[0].diagnostics  # type: ignore[operator]
    nested = {**org, "contained": [{"resourceType": "Organization", "id": "p", "name": "y"}]}
    meta = {**org, "meta": {"versionId": "1", "security": [{"code": "R"}]}}
    for bad, key in ((nested, "dom-2"), (meta, "dom-4"), (meta, "dom-5")):
        issues = validator.validate(patient(contained=[bad],
                                            managingOrganization={"reference": "#o"}))
        assert any(key in (i.diagnostics or "") for i in errors(issues)), key
    # a contained resource may refer to its container with '#'
    prov = {"resourceType": "Provenance", "id": "pv", "recorded": "2020-01-01T00:00:00Z",
            "target": [{"reference": "#"}], "agent": [{"who": {"reference": "Practitioner/1"}}]}
    assert errors(validator.validate(patient(contained=[prov]))) == []


def test_unknown_or_missing_resource_type_inside(validator: FhirValidator) -> None:
    issues = validator.validate(patient(contained=[{"resourceType": "Nonsense", "id": "x"}],
                                        managingOrganization={"reference": "#x"}))
    assert codes(issues) == {"GW-4216"}
    assert codes(validator.validate({"name": "x"})) == {"GW-4216"}  # type: ignore[arg-type]


def test_narrative_missing_is_a_warning(validator: FhirValidator) -> None:
    resource = patient()
    del resource["text"]
    issues = validator.validate(resource)
    assert [(i.severity, i.code.gw) for i in issues] == [("warning", "GW-4208")]
    assert "dom-6" in (issues[0].diagnostics or "")


def test_unsafe_narrative_is_rejected(validator: FhirValidator) -> None:
    div = '<div xmlns="http://www.w3.org/1999/xhtml"><script>alert(1)</script>x</div>'
    issues = validator.validate(patient(text={"status": "generated", "div": div}))
    assert codes(issues) == {"GW-4209"}
    assert where(issues) == {"Patient.text.div"}


# -- nesting ----------------------------------------------------------------------------


def _nested_bundle(depth: int) -> dict[str, Any]:
    resource: dict[str, Any] = patient()
    for _ in range(depth - 1):
        resource = {"resourceType": "Bundle", "type": "collection",
                    "entry": [{"fullUrl": "urn:uuid:5d2b7c3a-5f34-4b2a-9d1e-2a3b4c5d6e7f",
                               "resource": resource}]}
    return resource


def test_resources_nested_deeper_than_the_limit_are_rejected(validator: FhirValidator) -> None:
    assert errors(validator.validate(_nested_bundle(6))) == []
    issues = validator.validate(_nested_bundle(7))
    assert codes(issues) == {"GW-4210"}
    assert where(issues) == {"Bundle" + ".entry[0].resource" * 6}
    strict = FhirValidator(validator.definitions, max_nesting=2,
                           _compiled=(validator.model, validator.profiles))
    assert codes(strict.validate(_nested_bundle(3))) == {"GW-4210"}


def test_elements_nested_deeper_than_the_limit_are_rejected(validator: FhirValidator) -> None:
    ext: dict[str, Any] = {"url": "http://example.org/x", "valueString": "leaf"}
    for _ in range(40):
        ext = {"url": "http://example.org/x", "extension": [ext]}
    shallow = FhirValidator(validator.definitions, max_depth=30,
                            _compiled=(validator.model, validator.profiles))
    assert codes(shallow.validate(patient(extension=[ext]))) == {"GW-4210"}
    assert errors(validator.validate(patient(extension=[ext]))) == []


# -- Bundle (bdl-*) ----------------------------------------------------------------------


def _entry(i: int, **extra: Any) -> dict[str, Any]:
    return {"fullUrl": f"http://x.org/fhir/Patient/{i}", "resource": patient(id=str(i)),
            **extra}


@pytest.mark.parametrize(("bundle", "key"), [
    ({"type": "collection", "total": 1, "entry": [_entry(1)]}, "bdl-1"),
    ({"type": "collection", "entry": [_entry(1, search={"mode": "match"})]}, "bdl-2"),
    ({"type": "transaction", "entry": [_entry(1)]}, "bdl-3"),
    ({"type": "collection", "entry": [_entry(1, request={"method": "GET", "url": "x"})]},
     "bdl-3"),
    ({"type": "batch-response", "entry": [_entry(1)]}, "bdl-4"),
    ({"type": "collection", "entry": [{"fullUrl": "urn:uuid:1"}]}, "bdl-5"),
    ({"type": "collection", "entry": [_entry(1), _entry(1)]}, "bdl-7"),
    ({"type": "collection",
      "entry": [{"fullUrl": "http://x.org/fhir/Patient/1/_history/1",
                 "resource": patient(id="1")}]}, "bdl-8"),
    ({"type": "document", "timestamp": "2020-01-01T00:00:00Z", "entry": [_entry(1)]},
     "bdl-9"),
    ({"type": "document", "identifier": {"system": "urn:x", "value": "1"},
      "entry": [_entry(1)]}, "bdl-10"),
    ({"type": "document", "identifier": {"system": "urn:x", "value": "1"},
      "timestamp": "2020-01-01T00:00:00Z", "entry": [_entry(1)]}, "bdl-11"),
    ({"type": "message", "entry": [_entry(1)]}, "bdl-12"),
])
def test_bundle_invariants(validator: FhirValidator, bundle: dict[str, Any], key: str) -> None:
    issues = validator.validate({"resourceType": "Bundle", **bundle})
    assert any(i.diagnostics and i.diagnostics.startswith(key) for i in errors(issues)), issues


def test_bundle_fullurl_may_repeat_with_another_version(validator: FhirValidator) -> None:
    one, two = _entry(1), _entry(1)
    one["resource"]["meta"] = {"versionId": "1"}
    two["resource"]["meta"] = {"versionId": "2"}
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [one, two]}
    assert errors(validator.validate(bundle)) == []
    history = {"resourceType": "Bundle", "type": "history",
               "entry": [{**_entry(1), "request": {"method": "PUT", "url": "Patient/1"},
                          "response": {"status": "200"}}] * 2}
    assert errors(validator.validate(history)) == []


def test_bundle_fullurl_agrees_with_the_resource_id(validator: FhirValidator) -> None:
    """Bundle.entry.fullUrl: "The fullUrl SHALL NOT disagree with the id in the
    resource": judged when it is an http(s) URL ending in Type/id and the resource
    has an id; a warning (R4's Bundle-lri-example disagrees)."""
    def bundle(full_url: str, resource: dict[str, Any]) -> dict[str, Any]:
        return {"resourceType": "Bundle", "type": "collection",
                "entry": [{"fullUrl": full_url, "resource": resource}]}

    for wrong in ("http://x.org/fhir/Patient/1", "https://x.org/fhir/Group/2"):
        found = validator.validate(bundle(wrong, patient(id="2")))
        assert [(i.severity, i.expression) for i in found] == [
            ("warning", ("Bundle.entry[0].fullUrl",))], found
    for fine, resource in (("http://x.org/fhir/Patient/2", patient(id="2")),
                           ("http://x.org/fhir/Patient/1", patient()),
                           ("urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0", patient(id="2")),
                           ("http://x.org/patients?id=1", patient(id="2"))):
        assert validator.validate(bundle(fine, resource)) == [], fine


def test_bundle_entries_are_validated_with_their_location(validator: FhirValidator) -> None:
    bad = _entry(2)
    bad["resource"]["gender"] = "xyz"
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [_entry(1), bad]}
    assert where(validator.validate(bundle)) == {"Bundle.entry[1].resource.gender"}


def test_parameters_resources_are_validated(validator: FhirValidator) -> None:
    params = {"resourceType": "Parameters",
              "parameter": [{"name": "p", "resource": patient(gender="xyz")}]}
    assert where(validator.validate(params)) == {"Parameters.parameter[0].resource.gender"}


def _observation(**extra: Any) -> dict[str, Any]:
    obs: dict[str, Any] = {
        "resourceType": "Observation", "status": "final",
        "text": {"status": "generated",
                 "div": '<div xmlns="http://www.w3.org/1999/xhtml">weight</div>'},
        "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
        "subject": {"reference": "Patient/1"},
    }
    obs.update(extra)
    return {k: v for k, v in obs.items() if v is not None}


def test_the_first_hundred_errors_are_listed_and_the_rest_counted(
        validator: FhirValidator) -> None:
    """A million faulty elements make no million issues (hundreds of megabytes of
    OperationOutcome): the first 100 errors are listed, then one error counting the
    others, so that the resource still fails."""
    issues = validator.validate(patient(identifier=[{}] * 100_000))
    assert [i.code.gw for i in issues] == ["GW-4203"] * 100 + ["GW-4220"]
    assert issues[99].expression == ("Patient.identifier[99]",)
    assert issues[-1].severity == "error"
    assert "99900 more errors" in (issues[-1].diagnostics or "")


def test_an_error_after_a_hundred_warnings_is_listed(validator: FhirValidator) -> None:
    """Errors and other issues are counted apart: warnings found first do not keep an
    error from being listed."""
    bare = patient()
    del bare["text"]  # dom-6: a warning for each
    entries = [{"fullUrl": f"urn:uuid:00000000-0000-4000-8000-{i:012d}", "resource": bare}
               for i in range(150)]
    entries.append({"fullUrl": "urn:uuid:00000000-0000-4000-8000-999999999999",
                    "resource": patient(gender="robot")})
    issues = validator.validate({"resourceType": "Bundle", "type": "collection",
                                 "entry": entries})
    assert where(issues) == {"Bundle.entry[150].resource.gender"}
    assert [i.severity for i in issues].count("warning") == 101  # and one counting 50
    assert issues[-1].code.gw == "GW-4220" and "50 more warnings" in (
        issues[-1].diagnostics or "")
