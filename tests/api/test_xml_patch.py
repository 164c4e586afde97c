"""XML Patch (RFC 5261, ``application/xml-patch+xml``, RFC 7351): http.html#patch."""

from __future__ import annotations

import base64
import time
from typing import Any

import httpx

from tests.api.helpers import FHIR, gw_code, patient, post
from tests.conftest import unique

XML_PATCH = {"Content-Type": "application/xml-patch+xml"}
F = 'xmlns:f="http://hl7.org/fhir"'


def diff(*ops: str, root: str = f"<diff {F}>", end: str = "</diff>") -> bytes:
    return (root + "".join(ops) + end).encode()


def created(client: httpx.Client, **extra: Any) -> tuple[str, dict[str, Any]]:
    body = post(client, patient(unique("mrn"), **extra)).json()
    return f"/Patient/{body['id']}", body


def refused(response: httpx.Response, status: int, code: str, *words: str) -> None:
    assert (response.status_code, gw_code(response)) == (status, code), response.text
    diagnostics = response.json()["issue"][0]["diagnostics"]
    for word in words:
        assert word in diagnostics, diagnostics


def test_xml_patch_replaces_a_value(client: httpx.Client) -> None:
    path, _ = created(client)
    response = client.patch(path, content=diff(
        '<replace sel="/f:Patient/f:birthDate/@value">1980-01-01</replace>'),
        headers={**XML_PATCH, "If-Match": 'W/"1"'})
    assert response.status_code == 200, response.text
    assert response.json()["birthDate"] == "1980-01-01"
    assert response.json()["meta"]["versionId"] == "2"
    assert response.headers["ETag"] == 'W/"2"'
    history = client.get(f"{path}/_history").json()
    assert history["entry"][0]["request"]["method"] == "PATCH"
    # RFC 7351's own document, answered in FHIR XML
    rfc7351 = client.patch(path, content=diff(
        '<p:replace sel="f:Patient/f:gender/@value">male</p:replace>',
        root=f'<p:patch xmlns:p="urn:ietf:rfc:7351" {F}>', end="</p:patch>"),
        headers={**XML_PATCH, "Accept": "application/fhir+xml",
                 "Prefer": "return=representation"})
    assert rfc7351.status_code == 200, rfc7351.text
    assert rfc7351.headers["content-type"].startswith("application/fhir+xml")
    assert b'<gender value="male"/>' in rfc7351.content
    minimal = client.patch(path, content=diff(
        '<replace sel="f:Patient/f:gender/@value">female</replace>'),
        headers={**XML_PATCH, "Prefer": "return=minimal"})
    assert (minimal.status_code, minimal.content) == (200, b"")
    assert client.get(path).json()["gender"] == "female"


def test_xml_patch_adds_where_pos_says_and_removes(client: httpx.Client) -> None:
    path, before = created(client, telecom=[{"system": "phone", "value": "1"},
                                            {"system": "email", "value": "a@b.de"}])
    response = client.patch(path, content=diff(
        # before the first given name, after it, and as the first name
        '<add sel="/f:Patient/f:name/f:given[1]" pos="before"><f:given value="Anna"/></add>',
        '<add sel="/f:Patient/f:name/f:given[2]" pos="after"><f:given value="Maria"/></add>',
        '<add sel="f:Patient/f:name[1]" pos="before">'
        '<name xmlns="http://hl7.org/fhir"><text value="Frau A. Muster"/></name></add>',
        # into an element: its last child, or with pos="prepend" its first
        '<add sel="f:Patient/f:name[2]"><f:suffix value="MSc"/></add>',
        '<add sel="f:Patient/f:name[2]" pos="prepend"><f:use value="official"/></add>',
        # an attribute, and an element by the value of one
        '<add sel="f:Patient/f:name[2]" type="@id">n1</add>',
        '<remove sel="f:Patient/f:telecom[1]"/>',
        "<remove sel=\"f:Patient/f:telecom/f:system[@value='email']/@value\"/>",
        "<add sel=\"f:Patient/f:telecom/f:system\" type=\"@value\">url</add>",
        '<remove sel="/f:Patient/f:birthDate"/>'),
        headers=XML_PATCH)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["name"] == [
        {"text": "Frau A. Muster"},
        {"id": "n1", "use": "official", "family": "Muster",
         "given": ["Anna", "Erika", "Maria"], "suffix": ["MSc"]}]
    assert result["telecom"] == [{"system": "url", "value": "a@b.de"}]
    assert "birthDate" not in result
    assert result["identifier"] == before["identifier"]


def test_xml_patch_of_the_narrative(client: httpx.Client) -> None:
    div = '<div xmlns="http://www.w3.org/1999/xhtml">Frau <b>Muster</b>, geboren 1970</div>'
    path, _ = created(client, text={"status": "generated", "div": div})
    response = client.patch(path, content=diff(
        '<replace sel="f:Patient/f:text/x:div/text()[2]" xmlns:x="http://www.w3.org/1999/xhtml"'
        '>, geboren 1980</replace>',
        # (a default namespace names the narrative's elements in the selector too)
        '<add sel="f:Patient/f:text/div/b" pos="after" xmlns="http://www.w3.org/1999/xhtml"'
        '> <i>Erika</i></add>'), headers=XML_PATCH)
    assert response.status_code == 200, response.text
    assert response.json()["text"]["div"] == ('<div xmlns="http://www.w3.org/1999/xhtml">Frau'
                                              ' <b>Muster</b> <i>Erika</i>, geboren 1980</div>')
    # the narrative is checked as any other (txt-1)
    unsafe = client.patch(path, content=diff(
        '<add sel="f:Patient/f:text/x:div" xmlns:x="http://www.w3.org/1999/xhtml">'
        '<x:script>alert(1)</x:script></add>'), headers=XML_PATCH)
    assert unsafe.status_code == 422, unsafe.text


def test_conditional_xml_patch_and_if_match(client: httpx.Client) -> None:
    mrn = unique("mrn")
    rid = post(client, patient(mrn)).json()["id"]
    ops = diff('<replace sel="f:Patient/f:gender/@value">other</replace>')
    response = client.patch("/Patient", params={"identifier": f"urn:test:mrn|{mrn}"},
                            content=ops, headers=XML_PATCH)
    assert response.status_code == 200, response.text
    assert response.json()["id"] == rid and response.json()["gender"] == "other"
    none = client.patch("/Patient", params={"identifier": f"urn:test:mrn|{unique()}"},
                        content=ops, headers=XML_PATCH)
    assert none.status_code == 404, none.text
    stale = client.patch(f"/Patient/{rid}", content=ops,
                         headers={**XML_PATCH, "If-Match": 'W/"1"'})
    refused(stale, 412, "GW-3001")
    assert client.get(f"/Patient/{rid}").json()["meta"]["versionId"] == "2"


def _binary(document: bytes) -> dict[str, Any]:
    return {"resourceType": "Binary", "contentType": "application/xml-patch+xml",
            "data": base64.b64encode(document).decode()}


def test_xml_patch_in_a_transaction_and_a_batch(client: httpx.Client) -> None:
    path, _ = created(client)
    entry = {"resource": _binary(diff(
        '<replace sel="f:Patient/f:birthDate/@value">1990-12-31</replace>')),
             "request": {"method": "PATCH", "url": path.lstrip("/")}}
    response = client.post("", json={"resourceType": "Bundle", "type": "transaction",
                                      "entry": [entry]}, headers={"Content-Type": FHIR})
    assert response.status_code == 200, response.text
    assert response.json()["entry"][0]["response"]["status"].startswith("200")
    assert client.get(path).json()["birthDate"] == "1990-12-31"
    # one that fails fails the transaction; in a batch only its own entry
    other, _ = created(client)
    failing = {"resource": _binary(diff('<remove sel="f:Patient/f:deceasedBoolean"/>')),
               "request": {"method": "PATCH", "url": other.lstrip("/")}}
    again = {**entry, "resource": _binary(diff(
        '<replace sel="f:Patient/f:birthDate/@value">1991-01-01</replace>'))}
    response = client.post("", json={"resourceType": "Bundle", "type": "transaction",
                                      "entry": [again, failing]}, headers={"Content-Type": FHIR})
    refused(response, 400, "GW-1016", "unlocated-node")
    assert client.get(path).json()["birthDate"] == "1990-12-31"
    batch = client.post("", json={"resourceType": "Bundle", "type": "batch",
                                  "entry": [again, failing]}, headers={"Content-Type": FHIR})
    assert batch.status_code == 200, batch.text
    statuses = [e["response"]["status"] for e in batch.json()["entry"]]
    assert statuses[0].startswith("200") and statuses[1].startswith("400"), statuses
    assert client.get(path).json()["birthDate"] == "1991-01-01"
    not_xml = {**entry, "resource": _binary(b"<diff")}
    response = client.post("", json={"resourceType": "Bundle", "type": "transaction",
                                      "entry": [not_xml]}, headers={"Content-Type": FHIR})
    assert response.status_code == 400, response.text


def test_a_selector_selects_exactly_one_node(client: httpx.Client) -> None:
    path, _ = created(client, name=[{"family": "A"}, {"family": "B"}])
    cases = [
        ('<remove sel="f:Patient/f:name"/>', "matches 2 nodes"),
        ('<remove sel="f:Patient/f:name[3]"/>', "matches 0 nodes"),
        ('<replace sel="f:Patient/f:active/@value">true</replace>', "matches 0 nodes"),
        ("<replace sel=\"f:Patient/f:name[@id='x']/f:family/@value\">C</replace>",
         "matches 0 nodes"),
        # without a prefix a name is in no namespace (RFC 5261 4.2.2): the outcome says so
        ('<remove sel="Patient/birthDate"/>', "FHIR's elements are in http://hl7.org/fhir"),
    ]
    for op, words in cases:
        response = client.patch(path, content=diff('<remove sel="f:Patient/f:gender"/>', op),
                                headers=XML_PATCH)
        refused(response, 400, "GW-1016", "operation 1", "unlocated-node", words)
        assert client.get(path).json()["meta"]["versionId"] == "1"
    not_an_operation = client.patch(path, content=diff("<f:move sel='f:Patient'/>"),
                                    headers=XML_PATCH)
    refused(not_an_operation, 400, "GW-1016", "invalid-patch-directive")
    assert client.get(path).json()["meta"]["versionId"] == "1"
    # a default namespace declared for the patch names FHIR's elements without prefixes
    fhir_default = client.patch(path, content=(
        b'<diff xmlns="http://hl7.org/fhir"><replace sel="Patient/name[2]/family/@value">C'
        b'</replace><add sel="Patient/name[1]"><given value="D"/></add></diff>'),
        headers=XML_PATCH)
    assert fhir_default.status_code == 200, fhir_default.text
    assert fhir_default.json()["name"] == [{"family": "A", "given": ["D"]}, {"family": "C"}]


def test_only_the_xpath_rfc_5261_allows(client: httpx.Client) -> None:
    path, _ = created(client)
    for sel in ["//f:name", "count(/f:Patient)", "/f:Patient/descendant::f:given",
                "/f:Patient/f:name[position()=1]", "/f:Patient/f:name/..",
                "/f:Patient/f:name[1]/f:given[string-length(.)>0]", "/f:Patient | /f:Bundle",
                "/f:Patient/f:name[1 or 1]", "/f:Patient/f:name/@*", "/f:Patient//@value",
                "/f:Patient/f:name/f:given[last()]", "", "/", "f:Patient/"]:
        response = client.patch(path, content=diff(f'<remove sel="{sel}"/>'), headers=XML_PATCH)
        refused(response, 400, "GW-1016", "operation 0", "invalid-xpath")
    cases = [
        ('<remove sel="id(\'x\')"/>', "unsupported-id-function"),
        ('<remove sel="/g:Patient"/>', "invalid-namespace-prefix"),
        ('<remove sel="/f:Patient/namespace::f"/>', "namespace nodes are not patched"),
        ('<add sel="/f:Patient" type="namespace::g">urn:g</add>', "namespace declarations"),
        ('<add sel="/f:Patient/@id">x</add>', "not an attribute"),
        ('<remove sel="/f:Patient/f:gender" ws="sideways"/>', "invalid-whitespace-directive"),
        ('<add sel="/f:Patient" pos="inside"/>', "pos is before, after or prepend"),
        ('<replace sel="/f:Patient/f:gender"><f:a/><f:b/></replace>', "invalid-node-types"),
        ('<replace sel="/f:Patient/f:gender/@value"><f:a/></replace>', "invalid-node-types"),
        ('<remove/>', "sel) is missing"),
        ('<remove sel="/f:Patient/f:gender" pos="before"/>', "no attribute 'pos'"),
    ]
    for op, words in cases:
        response = client.patch(path, content=diff(op), headers=XML_PATCH)
        refused(response, 400, "GW-1016", "operation 0", words)
    assert client.get(path).json()["meta"]["versionId"] == "1"


def test_a_patch_document_is_well_formed_xml_without_a_dtd(client: httpx.Client) -> None:
    path, _ = created(client)
    refused(client.patch(path, content=b"<diff><remove sel='/x'></diff>", headers=XML_PATCH),
            400, "GW-1027")
    refused(client.patch(path, content=b'{"op": "remove"}', headers=XML_PATCH), 400, "GW-1027")
    refused(client.patch(path, content=diff("", root="<patch>", end="</patch>"),
                         headers=XML_PATCH), 400, "GW-1016", "not <diff>")
    entities = ('<?xml version="1.0"?><!DOCTYPE diff [<!ENTITY a "aaaaaaaaaa">'
                + "".join(f'<!ENTITY a{i} "{f"&a{i - 1};" * 10 if i else "&a;" * 10}">'
                          for i in range(9)) + ']>'
                f'<diff {F}><replace sel="f:Patient/f:gender/@value">&a8;</replace></diff>')
    started = time.monotonic()
    refused(client.patch(path, content=entities.encode(), headers=XML_PATCH),
            400, "GW-1016", "DOCTYPE")
    assert time.monotonic() - started < 5
    external = (f'<!DOCTYPE diff [<!ENTITY x SYSTEM "file:///etc/passwd">]><diff {F}>'
                '<replace sel="f:Patient/f:gender/@value">&x;</replace></diff>')
    refused(client.patch(path, content=external.encode(), headers=XML_PATCH),
            400, "GW-1016", "DOCTYPE")
    refused(client.patch(path, content=diff(
        '<replace sel="f:Patient/f:gender/@value">&x;</replace>'), headers=XML_PATCH),
        400, "GW-1027")
    # the media type is a PATCH's only
    assert client.post("/Patient", content=diff(), headers=XML_PATCH).status_code == 415
    assert client.get(path).json()["meta"]["versionId"] == "1"


def test_a_patched_resource_must_be_fhir(client: httpx.Client) -> None:
    secret = unique("Geheimname")
    path, _ = created(client, name=[{"family": secret}])
    cases = [
        ('<add sel="f:Patient"><f:colour value="blue"/></add>', 422, "GW-4003",
         "element <colour> is not defined here"),
        # an element in no namespace (none declared for it) is not FHIR's
        ('<add sel="f:Patient"><active value="true"/></add>', 422, "GW-4003",
         "is not in the FHIR namespace"),
        ('<add sel="f:Patient/f:gender" type="@colour">blue</add>', 422, "GW-4003",
         "attribute 'colour' is not defined here"),
        ('<add sel="f:Patient/f:gender">text</add>', 422, "GW-4003", "value attribute"),
        ('<replace sel="f:Patient/f:id/@value">other</replace>', 422, "GW-4003",
         "resourceType or id"),
        ('<replace sel="f:Patient"><f:Observation><f:id value="x"/></f:Observation></replace>',
         422, "GW-4003", "resourceType or id"),
        ('<remove sel="f:Patient/f:gender/@value"/>', 422, "GW-4003", "never empty"),
        ('<replace sel="f:Patient/f:gender/@value">unknown-gender</replace>', 422, "GW-4002",
         ""),
        ('<remove sel="f:Patient"/>', 400, "GW-1016", "invalid-root-element-operation"),
        ('<add sel="f:Patient" pos="after"><f:Patient/></add>', 400, "GW-1016",
         "invalid-root-element-operation"),
    ]
    for op, status, code, words in cases:
        response = client.patch(path, content=diff(op), headers=XML_PATCH)
        refused(response, status, code, words)
        assert secret not in response.text
    assert client.get(path).json()["meta"]["versionId"] == "1"


def test_an_xml_patch_has_at_most_a_thousand_operations(client: httpx.Client) -> None:
    path, _ = created(client)
    op = '<replace sel="f:Patient/f:gender/@value">male</replace>'
    assert client.patch(path, content=diff(*[op] * 1000), headers=XML_PATCH).status_code == 200
    many = client.patch(path, content=diff(*[op] * 1001), headers=XML_PATCH)
    refused(many, 413, "GW-1011", "1001 operations")


def test_the_selectors_of_a_patch_examine_a_bounded_number_of_nodes(
        client: httpx.Client) -> None:
    """A selector is walked over the tree, each step over the children of the nodes
    before: ``[.='']`` holds for every FHIR element (their values are attributes), so
    each of these operations looks at every identifier and all that is in it; a
    thousand of them are refused (413) rather than run for long."""
    identifiers = [{"system": "urn:test:x", "value": str(i)} for i in range(2000)]
    body = {"resourceType": "Patient", "identifier": identifiers}
    path = f"/Patient/{post(client, body).json()['id']}"
    op = "<replace sel=\"f:Patient/f:identifier[.=''][.=''][1]/f:value/@value\">0</replace>"
    assert client.patch(path, content=diff(op), headers=XML_PATCH).status_code == 200
    started = time.monotonic()
    response = client.patch(path, content=diff(*[op] * 1000), headers=XML_PATCH)
    refused(response, 413, "GW-1011", "examine more than")
    assert time.monotonic() - started < 10


def test_the_capability_statement_lists_xml_patch(client: httpx.Client) -> None:
    assert "application/xml-patch+xml" in client.get("/metadata").json()["patchFormat"]
