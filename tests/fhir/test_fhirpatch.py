"""FHIRPath Patch (gateway.fhir.fhirpatch) on the R4 model, without HTTP."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.fhir import fhirpatch
from gateway.fhir.outcome import FhirError
from gateway.fhir.validation.model import Model, value_sets_index
from gateway.registry import Registry


@pytest.fixture(scope="module")
def model() -> Model:
    return Model(Registry.load().structure_definitions, value_sets_index({}))


def op(kind: str, path: str, **parts: Any) -> dict[str, Any]:
    out: list[dict[str, Any]] = [{"name": "type", "valueCode": kind},
                                 {"name": "path", "valueString": path}]
    for name, value in parts.items():
        if name == "name":
            out.append({"name": "name", "valueString": value})
        elif name in ("index", "source", "destination"):
            out.append({"name": name, "valueInteger": value})
        else:  # value=(key, value)
            out.append({"name": "value", value[0]: value[1]})
    return {"name": "operation", "part": out}


def patched(model: Model, resource: dict[str, Any], *ops: dict[str, Any]) -> dict[str, Any]:
    checked = fhirpatch.check({"resourceType": "Parameters", "parameter": list(ops)})
    return fhirpatch.apply(resource, checked, model)


PATIENT: dict[str, Any] = {
    "resourceType": "Patient", "id": "p",
    "name": [{"given": ["Anna", "Maria"], "_given": [None, {"extension": [
        {"url": "urn:x", "valueString": "second"}]}], "family": "Alt"}],
    "telecom": [{"system": "phone", "value": "1"}, {"system": "email", "value": "2"}],
}


def test_the_input_is_left_alone(model: Model) -> None:
    before = repr(PATIENT)
    out = patched(model, PATIENT, op("replace", "Patient.name.family", value=("valueString", "N")))
    assert out["name"][0]["family"] == "N" and repr(PATIENT) == before


def test_deleting_a_repeated_primitive_keeps_its_extensions_aligned(model: Model) -> None:
    out = patched(model, PATIENT, op("delete", "Patient.name.given[0]"))
    assert out["name"][0]["given"] == ["Maria"]
    assert out["name"][0]["_given"] == [{"extension": [{"url": "urn:x",
                                                        "valueString": "second"}]}]


def test_where_with_not_equal_and_or(model: Model) -> None:
    out = patched(model, PATIENT,
                  op("delete", "Patient.telecom.where(system != 'phone')"))
    assert out["telecom"] == [{"system": "phone", "value": "1"}]
    with pytest.raises(FhirError, match="takes one"):
        patched(model, PATIENT,
                op("delete", "Patient.telecom.where(system = 'phone' or system = 'email')"))


def test_delete_of_nothing_is_no_change_and_the_last_item_removes_the_list(
    model: Model,
) -> None:
    assert patched(model, PATIENT, op("delete", "Patient.telecom.where(system = 'fax')")
                   ) == PATIENT
    out = patched(model, PATIENT, op("delete", "Patient.telecom[0]"),
                  op("delete", "Patient.telecom[0]"))
    assert "telecom" not in out


def test_add_to_a_backbone_element_from_parts(model: Model) -> None:
    contact = {"name": "value", "part": [
        {"name": "relationship", "valueCodeableConcept": {"text": "Tochter"}},
        {"name": "name", "valueHumanName": {"family": "Alt"}}]}
    checked = fhirpatch.check({"resourceType": "Parameters", "parameter": [{
        "name": "operation", "part": [{"name": "type", "valueCode": "add"},
                                      {"name": "path", "valueString": "Patient"},
                                      {"name": "name", "valueString": "contact"}, contact]}]})
    out = fhirpatch.apply(PATIENT, checked, model)
    assert out["contact"] == [{"relationship": [{"text": "Tochter"}],
                               "name": {"family": "Alt"}}]


@pytest.mark.parametrize(("ops", "message"), [
    ([op("add", "Patient", name="nickname", value=("valueString", "x"))], "no element"),
    ([op("replace", "Patient.name.family.where(true)", value=("valueString", "x"))],
     "takes comparisons"),
    ([op("move", "Patient.telecom", source=0, destination=5)], "within"),
    ([op("insert", "Patient.gender", index=0, value=("valueCode", "x"))], "does not repeat"),
    ([op("add", "Patient", name="deceased", value=("valueQuantity", {"value": 1}))],
     "cannot take"),
    # paths that read but nest deeper than they can be followed: a 400, not a crash
    ([op("delete", "Patient" + ".where(name.exists())" * 3000)], "nests too deeply"),
    ([op("delete", "Patient.name" + "[0]" * 5000)], "nests too deeply"),
])
def test_errors_name_the_problem(model: Model, ops: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(FhirError, match=message):
        patched(model, PATIENT, *ops)


def test_the_patch_is_left_alone(model: Model) -> None:
    """A write that meets a concurrent one runs again, with the same patch: a value
    the patch added and a later operation changed must come out as it went in."""
    checked = fhirpatch.check({"resourceType": "Parameters", "parameter": [
        op("add", "Patient", name="name", value=("valueHumanName", {"family": "Neu"})),
        op("add", "Patient.name.where(family = 'Neu')", name="given",
           value=("valueString", "Eva")),
    ]})
    first = fhirpatch.apply(PATIENT, checked, model)
    again = fhirpatch.apply(PATIENT, checked, model)
    assert first["name"][-1] == {"family": "Neu", "given": ["Eva"]}
    assert again == first


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                  max_size=4),
    max_leaves=12)
_paths = st.sampled_from([
    "Patient", "Patient.name", "Patient.name[0]", "Patient.name.given", "Patient.telecom",
    "Patient.telecom.where(system = 'phone')", "Patient.name.first().family", "Patient.gender",
    "Patient.name[" + "1" * 5000 + "]", "Patient.telecom.last().value", "Patient.(", "x",
    "Patient.deceased", "Patient.name.where(family != 'Alt' and given = 'Anna')"])
_part = st.one_of(
    st.fixed_dictionaries({"name": st.just("type"), "valueCode": st.sampled_from(
        [*fhirpatch.OPERATIONS, "x"])}),
    st.fixed_dictionaries({"name": st.just("path"), "valueString": _paths}),
    st.fixed_dictionaries({"name": st.sampled_from(["name", "index", "source", "destination"]),
                           "valueString": st.sampled_from(["given", "telecom", "gender"])}),
    st.fixed_dictionaries({"name": st.sampled_from(["index", "source", "destination"]),
                           "valueInteger": st.integers(-2, 3)}),
    st.fixed_dictionaries({"name": st.just("value")}).flatmap(lambda base: st.one_of(
        st.builds(lambda k, v: {**base, k: v}, st.sampled_from(
            ["valueString", "valueCode", "valueHumanName", "valueBoolean", "valueX"]), _json),
        st.builds(lambda v: {**base, "part": v}, _json))),
    _json)
_operation = st.one_of(
    st.builds(lambda parts: {"name": "operation", "part": parts}, st.lists(_part, max_size=6)),
    st.builds(lambda v: {"name": "operation", "part": v}, _json),
    _json)
_patches = st.one_of(
    st.builds(lambda ops: {"resourceType": "Parameters", "parameter": ops},
              st.lists(_operation, max_size=4)),
    st.builds(lambda v: {"resourceType": "Parameters", "parameter": v}, _json),
    st.dictionaries(st.text(max_size=6), _json).map(
        lambda d: {**d, "resourceType": "Parameters"}))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_patches)
def test_any_parameters_is_a_patch_or_an_error_never_a_crash(
        model: Model, body: dict[str, Any]) -> None:
    """Whatever the JSON, check() and apply() raise nothing but FhirError (a 4xx)."""
    try:
        ops = fhirpatch.check(body)
        fhirpatch.apply(PATIENT, ops, model)
    except FhirError as exc:
        assert 400 <= exc.code.status < 500
