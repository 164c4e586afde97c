"""R4's own extensions are checked against their definitions wherever they occur.

Spec: https://hl7.org/fhir/R4/extensibility.html#Extension,
https://hl7.org/fhir/R4/defining-extensions.html#context and the definitions
(https://hl7.org/fhir/R4/extension-patient-birthplace.html, ...).
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from gateway.fhir.validation import FhirValidator, load_definitions
from gateway.registry import profiles_dir
from tests.fhir.validation.conftest import codes, errors, patient, where

SD = "http://hl7.org/fhir/StructureDefinition/"
BIRTH_PLACE = SD + "patient-birthPlace"
OAUTH = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"


def _diagnostics(issues: list[Any]) -> str:
    return " ".join(i.diagnostics or "" for i in errors(issues))


def test_value_of_a_type_the_definition_does_not_allow(validator: FhirValidator) -> None:
    bad = patient(extension=[{"url": BIRTH_PLACE, "valueBoolean": True}])
    issues = validator.validate(bad)
    assert "GW-4217" in codes(issues)
    assert "Patient.extension[0].valueBoolean" in where(issues)
    assert BIRTH_PLACE in _diagnostics(issues)
    good = patient(extension=[{"url": BIRTH_PLACE, "valueAddress": {"city": "Utrecht"}}])
    assert errors(validator.validate(good)) == []


def test_value_is_required_by_the_definition(validator: FhirValidator) -> None:
    bad = patient(extension=[{"url": BIRTH_PLACE, "extension": [
        {"url": "city", "valueString": "Utrecht"}]}])
    issues = validator.validate(bad)
    assert "GW-4204" in codes(issues)  # value[x] 1..1
    assert "GW-4205" in codes(issues)  # extension 0..0


def test_required_binding_of_the_value(validator: FhirValidator) -> None:
    dar = SD + "data-absent-reason"
    bad = patient(birthDate="1970-01-01", _birthDate={"extension": [
        {"url": dar, "valueCode": "forgotten"}]})
    issues = validator.validate(bad)
    assert codes(issues) == {"GW-4207"}
    assert where(issues) == {"Patient._birthDate.extension[0].valueCode"}
    ok = patient(_birthDate={"extension": [{"url": dar, "valueCode": "unknown"}]})
    del ok["birthDate"]
    assert errors(validator.validate(ok)) == []
    use = SD + "iso21090-EN-use"
    bad = patient(name=[{"family": "Muster", "extension": [{"url": use, "valueCode": "XX"}]}])
    assert codes(validator.validate(bad)) == {"GW-4207"}
    ok = patient(name=[{"family": "Muster", "extension": [{"url": use, "valueCode": "I"}]}])
    assert errors(validator.validate(ok)) == []


def _capability(*sub: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "CapabilityStatement", "status": "active", "date": "2020-01-01",
        "kind": "instance", "fhirVersion": "4.0.1", "format": ["json"],
        "text": {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">'
                                               "x</div>"},
        "implementation": {"description": "x"},
        "rest": [{"mode": "server", "security": {"extension": [
            {"url": OAUTH, "extension": list(sub)}]}}],
    }


def test_complex_extension_needs_its_required_parts(validator: FhirValidator) -> None:
    token = {"url": "token", "valueUri": "https://example.org/token"}
    authorize = {"url": "authorize", "valueUri": "https://example.org/authorize"}
    issues = validator.validate(_capability(token))
    assert codes(issues) == {"GW-4204"}
    assert "slice 'authorize'" in _diagnostics(issues)
    assert where(issues) == {"CapabilityStatement.rest[0].security.extension[0]"}
    assert errors(validator.validate(_capability(token, authorize))) == []
    # a part of the wrong type, and a part given twice
    issues = validator.validate(_capability(
        {"url": "token", "valueString": "x"}, authorize, authorize))
    assert {"GW-4217", "GW-4205"} <= codes(issues)


def test_an_extension_where_its_context_does_not_allow_it(validator: FhirValidator) -> None:
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
           "extension": [{"url": BIRTH_PLACE, "valueAddress": {"city": "Utrecht"}}]}
    issues = validator.validate(obs)
    assert codes(issues) == {"GW-4221"}
    assert where(issues) == {"Observation.extension[0]"}
    assert "allows it on Patient" in _diagnostics(issues)
    # on an element by its path, from a data type (HumanName.family), by the type it
    # is on, and in a resource nested in another
    own_prefix = SD + "humanname-own-prefix"
    fine = patient(name=[{"family": "Vries", "_family": {"extension": [
        {"url": own_prefix, "valueString": "de"}]}}])
    assert errors(validator.validate(fine)) == []
    misplaced = patient(name=[{"family": "Vries", "extension": [
        {"url": own_prefix, "valueString": "de"}]}])
    assert codes(validator.validate(misplaced)) == {"GW-4221"}
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:7c0b5a8e-3c44-4e0f-9d5e-0e4f5d7c1a11", "resource": obs}]}
    issues = validator.validate(bundle)
    assert where(issues) == {"Bundle.entry[0].resource.extension[0]"}


def test_context_by_type_and_by_ancestor_type(validator: FhirValidator) -> None:
    # iso21090-EN-use: context HumanName (any element of that type)
    use = SD + "iso21090-EN-use"
    contact = patient(contact=[{"name": {"family": "X", "extension": [
        {"url": use, "valueCode": "I"}]}}])
    assert errors(validator.validate(contact)) == []
    # data-absent-reason: context Element, allowed everywhere
    dar = SD + "data-absent-reason"
    anywhere = patient(extension=[{"url": dar, "valueCode": "unknown"}])
    assert errors(validator.validate(anywhere)) == []


def test_unknown_extensions_are_not_judged(validator: FhirValidator) -> None:
    other = patient(extension=[{"url": "https://example.org/ext", "valueBoolean": True}])
    assert errors(validator.validate(other)) == []


def test_r4_own_uses_beyond_the_declared_context_are_accepted(
        validator: FhirValidator) -> None:
    """R4's snapshots put structuredefinition-fhir-type on ElementDefinition.type
    (its definition says type.code); R4's own resources are not refused for it."""
    sd = {"resourceType": "StructureDefinition", "url": "https://example.org/sd/x",
          "name": "X", "status": "draft", "kind": "complex-type", "abstract": False,
          "type": "Extension", "derivation": "constraint",
          "text": {"status": "generated",
                   "div": '<div xmlns="http://www.w3.org/1999/xhtml">x</div>'},
          "baseDefinition": SD + "Extension",
          "differential": {"element": [{"id": "Extension.id", "path": "Extension.id",
                                        "type": [{"extension": [
                                            {"url": SD + "structuredefinition-fhir-type",
                                             "valueUrl": "string"}],
                                            "code": "http://hl7.org/fhirpath/System.String"}]}]}}
    assert [i for i in errors(validator.validate(sd)) if i.code.gw == "GW-4221"] == []


@pytest.mark.parametrize("url", [BIRTH_PLACE, OAUTH, SD + "data-absent-reason"])
def test_the_definitions_are_held(validator: FhirValidator, url: str) -> None:
    assert url in validator.extensions.urls
    compiled = validator.extensions.profiles.get(url)
    assert compiled is not None and compiled.type == "Extension"


def test_every_definition_compiles_quickly(validator: FhirValidator) -> None:
    urls = sorted(validator.definitions.extensions)
    assert len(urls) > 380
    fresh = FhirValidator(load_definitions(profiles_dir()))
    fresh.model.type_node("Extension")
    started = time.perf_counter()
    compiled = [fresh.extensions.profiles.get(u) for u in urls]
    assert all(c is not None for c in compiled)
    assert time.perf_counter() - started < 2.0  # about 30 ms: compiled per URL on use
