"""FHIR XML <-> the JSON form (gateway.fhir.xml), against every vendored example."""

from __future__ import annotations

import gzip
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from lxml import etree  # type: ignore[import-untyped]

from gateway.fhir import json as fjson
from gateway.fhir import xml as fhir_xml
from gateway.fhir.outcome import FhirError
from gateway.fhir.validation import FhirValidator
from gateway.fhir.validation.model import Model
from gateway.main import profiles_dir, registry
from gateway.settings import Settings

DATA = Path(__file__).resolve().parent.parent / "data"
F = "{http://hl7.org/fhir}"


@pytest.fixture(scope="module")
def model() -> Model:
    reg = registry()
    return FhirValidator.load(profiles_dir(), reg.structure_definitions,
                              Settings.from_env()).model


def _examples() -> list[tuple[str, str]]:
    rows = []
    for name in ("r4-examples.ndjson.gz", "ig-examples.ndjson.gz"):
        with gzip.open(DATA / name, "rt", encoding="utf-8") as f:
            rows += [(row["file"], row["text"]) for row in map(json.loads, f)]
    return rows


def _same(value: Any) -> Any:
    """Decimals as written; narratives compared as XML (canonical form), not as text."""
    if isinstance(value, dict):
        return {k: etree.tostring(etree.fromstring(v.encode()), method="c14n")
                if k == "div" and isinstance(v, str) else _same(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_same(v) for v in value]
    return value


def test_every_example_survives_json_to_xml_and_back(model: Model) -> None:
    examples = _examples()
    assert len(examples) > 1100
    failures = []
    for name, text in examples:
        back = fhir_xml.loads(fhir_xml.dumps(text.encode(), model), model)
        if _same(json.loads(fjson.dumps(back), parse_float=Decimal)) != \
                _same(json.loads(text, parse_float=Decimal)):
            failures.append(name)
    assert not failures, failures[:10]


def test_xml_follows_the_definitions(model: Model) -> None:
    patient = {"gender": "female", "name": [{"given": ["Anna", None, "Eva"], "id": "n1",
                                            "_given": [None, {"extension": [{
                                                "url": "http://x/e", "valueBoolean": True}]},
                                                       None],
                                            "family": "Müller"}],
               "birthDate": "1970-05-01", "_birthDate": {"id": "b"}, "active": True,
               "resourceType": "Patient", "id": "p1",
               "extension": [{"url": "http://x/w", "valueDecimal": fjson.Number("1.50")}],
               "text": {"status": "generated",
                        "div": '<div xmlns="http://www.w3.org/1999/xhtml"><p>Anna</p></div>'},
               "contained": [{"resourceType": "Organization", "id": "o", "name": "X"}]}
    root = etree.fromstring(fhir_xml.dumps(patient, model))
    assert root.tag == F + "Patient"
    # the definitions' order, whatever the JSON's
    assert [c.tag.split("}")[1] for c in root] == [
        "id", "text", "contained", "extension", "active", "name", "gender", "birthDate"]
    assert root.find(F + "id").get("value") == "p1"
    assert root.find(F + "text/{http://www.w3.org/1999/xhtml}div/"
                          "{http://www.w3.org/1999/xhtml}p").text == "Anna"
    assert root.find(F + "contained/" + F + "Organization/" + F + "name").get("value") == "X"
    assert root.find(F + "extension").get("url") == "http://x/w"
    assert root.find(F + "extension/" + F + "valueDecimal").get("value") == "1.50"
    assert root.find(F + "active").get("value") == "true"
    name = root.find(F + "name")
    assert name.get("id") == "n1" and [c.tag.split("}")[1] for c in name] == [
        "family", "given", "given", "given"]
    given = name.findall(F + "given")
    assert [g.get("value") for g in given] == ["Anna", None, "Eva"]
    assert given[1].find(F + "extension").get("url") == "http://x/e"
    assert root.find(F + "birthDate").get("id") == "b"
    back = fhir_xml.loads(fhir_xml.dumps(patient, model), model)
    assert back["extension"][0]["valueDecimal"].text == "1.50"
    assert back["active"] is True and back["name"][0]["_given"][1]["extension"]
    assert back["name"][0]["given"] == ["Anna", None, "Eva"]


@pytest.mark.parametrize("body", [
    b'<Patient xmlns="http://hl7.org/fhir"><foo value="1"/></Patient>',
    b'<Patient xmlns="http://hl7.org/fhir"><active value="true" extra="1"/></Patient>',
    b'<Patient xmlns="http://hl7.org/fhir"><active value="true"/><active value="false"/>'
    b'</Patient>',
    b'<Patient xmlns="http://hl7.org/fhir" id="x"/>',
    b'<Patient xmlns="http://hl7.org/fhir">text</Patient>',
    b'<Patient><active value="true"/></Patient>',
    b'<Nonsense xmlns="http://hl7.org/fhir"/>',
    b'<Patient xmlns="http://hl7.org/fhir"><contained/></Patient>',
    b'<Patient xmlns="http://hl7.org/fhir"><name><url value="x"/></name></Patient>',
    b'<!DOCTYPE Patient [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
    b'<Patient xmlns="http://hl7.org/fhir"><id value="&x;"/></Patient>',
    b'<!DOCTYPE Patient SYSTEM "http://evil.example/x.dtd"><Patient xmlns="http://hl7.org/fhir"/>',
    b'<Patient xmlns="http://hl7.org/fhir"><id value="a"></Patient>',
    b'<Patient xmlns="http://hl7.org/fhir"><id value="&undeclared;"/></Patient>',
    # "FHIR elements are never empty", "attributes cannot be empty" (xml.html)
    b'<Patient xmlns="http://hl7.org/fhir"><birthDate/></Patient>',
    b'<Patient xmlns="http://hl7.org/fhir"><birthDate>  </birthDate></Patient>',
    b'<Patient xmlns="http://hl7.org/fhir"><birthDate id="x"/></Patient>',
    b'<Patient xmlns="http://hl7.org/fhir"><name><family value="   "/></name></Patient>',
    b'<Patient xmlns="http://hl7.org/fhir"><name id=" "><family value="X"/></name></Patient>',
    # more attributes than any element has (lxml reads them in quadratic time)
    b'<Patient xmlns="http://hl7.org/fhir"><active value="true" '
    + b" ".join(b'a%d="x"' % i for i in range(40)) + b"/></Patient>",
    # xsi: only a resource's schemaLocation is let pass
    b'<Patient xmlns="http://hl7.org/fhir" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
    b'<name xsi:type="HumanName"><family value="X"/></name></Patient>',
    # the same declarations in UTF-16, where a scan of the bytes would not see them
    '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE Patient [<!ENTITY a "aaaa">'
    '<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]><Patient xmlns="http://hl7.org/fhir">'
    '<id value="&b;"/></Patient>'.encode("utf-16"),
])
def test_what_is_not_fhir_xml_is_refused(model: Model, body: bytes) -> None:
    with pytest.raises(FhirError) as caught:
        fhir_xml.loads(body, model)
    assert caught.value.status == 400


XSI = 'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"'


def test_a_schema_location_is_not_data(model: Model) -> None:
    # as test fixtures and older tools write FHIR XML
    body = (f'<?xml version="1.0" encoding="UTF-8"?><Patient xmlns="http://hl7.org/fhir" {XSI}'
            ' xsi:schemaLocation="http://hl7.org/fhir ../../schema/fhir-single.xsd">'
            '<text><status value="generated"/><div xmlns="http://www.w3.org/1999/xhtml">'
            '<p>Erika <b>Mustermann</b><!-- note --></p>tail</div></text>'
            '<active value="true"/></Patient>').encode()
    assert fhir_xml.loads(body, model) == {
        "resourceType": "Patient",
        # none of the namespaces declared around the narrative is declared on it
        "text": {"status": "generated",
                 "div": '<div xmlns="http://www.w3.org/1999/xhtml"><p>Erika <b>Mustermann</b>'
                        "<!-- note --></p>tail</div>"},
        "active": True,
    }


def test_a_narrative_with_a_prefix_is_held_in_the_default_namespace(model: Model) -> None:
    body = (b'<Patient xmlns="http://hl7.org/fhir"><text><status value="generated"/>'
            b'<h:div xmlns:h="http://www.w3.org/1999/xhtml"><h:p xml:lang="de">Hallo</h:p>'
            b'<h:a href="#x">mehr</h:a></h:div></text></Patient>')
    div = fhir_xml.loads(body, model)["text"]["div"]
    assert div == ('<div xmlns="http://www.w3.org/1999/xhtml"><p xml:lang="de">Hallo</p>'
                   '<a href="#x">mehr</a></div>')


def test_what_xml_carries_beside_the_content_is_not_content(model: Model) -> None:
    """xml.html: "XML comments, processing instructions and formatting are not part of
    the contents of a resource"; a comment or CDATA that mentions a DOCTYPE declares
    none; attribute values are trimmed, but for text (a string keeps its spaces, as
    in JSON)."""
    body = (b'<?xml version="1.0"?><Patient xmlns="http://hl7.org/fhir">'
            b'<!-- a Patient, not <!DOCTYPE x> --><?app keep?>'
            b'<text><status value="generated"/><div xmlns="http://www.w3.org/1999/xhtml">'
            b'<p><![CDATA[<!DOCTYPE is text here]]></p></div></text>'
            b'<active value=" true "><?app keep?></active><name><family value=" Muster "/>'
            b'</name><gender value=" female "/></Patient>')
    resource = fhir_xml.loads(body, model)
    assert resource["active"] is True and resource["gender"] == "female"
    assert resource["name"] == [{"family": " Muster "}]
    assert "&lt;!DOCTYPE is text here" in resource["text"]["div"]


def test_many_attributes_are_refused_before_they_are_read(model: Model) -> None:
    """lxml hands over the attributes of an element in time that grows with the square
    of their number (4.6 s for 40,000, on the event loop): they are counted first."""
    body = (b'<Patient xmlns="http://hl7.org/fhir"><active value="true" '
            + b" ".join(b'a%d="x"' % i for i in range(40_000)) + b"/></Patient>")
    with pytest.raises(FhirError) as caught:
        fhir_xml.loads(body, model)
    assert "more than 32 attributes" in str(caught.value.diagnostics)
    div = ('<div xmlns="http://www.w3.org/1999/xhtml"><p '
           + " ".join(f'a{i}="x"' for i in range(40_000)) + '>x</p></div>')
    from gateway.fhir.validation.xhtml import check_narrative
    assert any("more than 32 attributes" in m for _, m in check_narrative(div))


def test_characters_xml_cannot_carry_are_refused_or_said(model: Model) -> None:
    """U+FFFE and U+FFFF are not XML characters: refused in JSON as the control
    characters are (a resource is as writable in XML as in JSON); one stored before
    is answered 406 in XML, not a 500."""
    for raw in ('{"resourceType":"Patient","id":"\uffff"}'.encode(),
                '{"resourceType":"Patient","id":"￿"}'.encode(),
                '{"resourceType":"Patient","id":"\ufffe"}'.encode()):
        with pytest.raises(FhirError) as caught:
            fjson.loads(raw)
        assert caught.value.status == 400, raw
    with pytest.raises(FhirError) as caught:
        fhir_xml.dumps({"resourceType": "Patient", "name": [{"family": "a\uffff"}]}, model)
    assert caught.value.status == 406


def test_pretty_xml_leaves_the_narrative_as_it_is(model: Model) -> None:
    div = ('<div xmlns="http://www.w3.org/1999/xhtml"><pre><b>x</b><i>y</i></pre>'
           '<span>a</span><span>b</span></div>')
    written = fhir_xml.dumps({"resourceType": "Patient", "text": {"status": "generated",
                                                                  "div": div}},
                             model, pretty=True)
    assert b"\n  <text>" in written  # pretty outside the narrative
    assert div.encode() in written
    assert fhir_xml.loads(written, model)["text"]["div"] == div
