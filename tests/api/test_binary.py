"""Binary on the RESTful API (binary.html#rest): written and read as its content."""

from __future__ import annotations

import base64

import httpx

from tests.api.helpers import FHIR, gw_code

PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"


def test_content_written_as_is_becomes_a_binary(client: httpx.Client) -> None:
    created = client.post("/Binary", content=PDF, headers={
        "Content-Type": "application/pdf", "X-Security-Context": "DocumentReference/letter-1"})
    assert created.status_code == 201, created.text
    binary = created.json()
    assert binary["contentType"] == "application/pdf"
    assert base64.b64decode(binary["data"]) == PDF
    assert binary["securityContext"] == {"reference": "DocumentReference/letter-1"}
    path = f"/Binary/{binary['id']}"
    # asked for FHIR: the resource
    for headers, params in (({"Accept": FHIR}, {}), ({"Accept": "application/json"}, {}),
                            ({"Accept": "*/*"}, {"_format": "json"})):
        read = client.get(path, headers=headers, params=params)
        assert read.status_code == 200 and read.json() == binary, (headers, params)
    # not asked for FHIR: the content, with its type, unable to run in this origin
    for accept in ("application/pdf", "*/*", "text/html,application/xhtml+xml,*/*;q=0.8"):
        read = client.get(path, headers={"Accept": accept})
        assert read.status_code == 200, read.text
        assert read.content == PDF
        assert read.headers["content-type"] == "application/pdf"
        assert read.headers["etag"] == 'W/"1"'
        assert read.headers["content-security-policy"] == "sandbox"
        assert read.headers["x-content-type-options"] == "nosniff"
        assert read.headers["x-security-context"] == "DocumentReference/letter-1"
    assert client.get(f"{path}/_history/1", headers={"Accept": "application/pdf"}).content \
        == PDF
    head = client.head(path, headers={"Accept": "application/pdf"})
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(PDF))


def test_content_put_under_an_id_and_replaced(client: httpx.Client) -> None:
    first = client.put("/Binary/letter-text", content="Entlassbrief für v1".encode(),
                       headers={"Content-Type": "text/plain; charset=utf-8"})
    assert first.status_code in (200, 201), first.text
    second = client.put("/Binary/letter-text", content="Entlassbrief für v2".encode(),
                        headers={"Content-Type": "text/plain; charset=utf-8",
                                 "If-Match": first.headers["etag"]})
    assert second.status_code == 200, second.text
    read = client.get("/Binary/letter-text", headers={"Accept": "text/plain"})
    assert read.text == "Entlassbrief für v2"
    assert read.headers["content-type"] == "text/plain; charset=utf-8"
    assert read.headers["etag"] == 'W/"2"'
    # a Binary written as a FHIR resource reads back the same way
    resource = {"resourceType": "Binary", "contentType": "image/png",
                "data": base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()}
    made = client.post("/Binary", json=resource, headers={"Content-Type": FHIR}).json()
    assert client.get(f"/Binary/{made['id']}", headers={"Accept": "image/png"}).content == \
        b"\x89PNG\r\n\x1a\n"


def test_binary_content_errors(client: httpx.Client) -> None:
    # only Binary takes content as is; a missing one is a FHIR 404 either way
    pdf = {"Content-Type": "application/pdf"}
    refused = client.post("/DocumentReference", content=PDF, headers=pdf)
    assert refused.status_code == 415 and gw_code(refused) == "GW-1008"
    missing = client.get("/Binary/nothing-here", headers={"Accept": "application/pdf"})
    assert missing.status_code == 404 and gw_code(missing) == "GW-2001"
    xml = client.get("/Binary/nothing-here", headers={"Accept": "application/fhir+xml"})
    assert xml.status_code == 404 and xml.headers["content-type"].startswith(
        "application/fhir+xml")
    other = client.get("/Binary/nothing-here", headers={"Accept": "application/fhir+turtle"})
    assert other.status_code == 404  # a Binary is its content, whatever the type


def test_a_json_document_is_content_and_a_binary_resource_is_the_resource(
        client: httpx.Client) -> None:
    """binary.html#rest: only the FHIR media types ask for the resource. A JSON
    document written as application/json is kept as a Binary's content and read back
    as it with plain JSON in ``Accept``; a Binary resource written as application/json
    (as FHIR clients write resources) is the resource, as before."""
    document = b'{"befund": "unauffaellig", "werte": [1.50, 2]}'
    created = client.post("/Binary", content=document,
                          headers={"Content-Type": "application/json"})
    assert created.status_code == 201, created.text
    binary = created.json()
    assert binary["contentType"] == "application/json"
    assert base64.b64decode(binary["data"]) == document
    path = f"/Binary/{binary['id']}"
    for accept in ("application/json", "text/json", "application/json, */*;q=0.1"):
        read = client.get(path, headers={"Accept": accept})
        assert read.content == document, accept
        assert read.headers["content-type"] == "application/json"
    for headers, params in (({"Accept": FHIR}, {}), ({"Accept": "application/json"},
                                                      {"_format": "json"})):
        assert client.get(path, headers=headers, params=params).json() == binary
    resource = {"resourceType": "Binary", "contentType": "text/plain",
                "data": base64.b64encode(b"Arztbrief").decode()}
    made = client.post("/Binary", json=resource, headers={"Content-Type": "application/json"})
    assert made.status_code == 201 and made.json()["contentType"] == "text/plain", made.text
    # its content is not JSON: plain JSON still asks for the resource
    read = client.get(f"/Binary/{made.json()['id']}", headers={"Accept": "application/json"})
    assert read.json()["data"] == resource["data"]


def test_a_content_type_is_kept_whole_or_refused(client: httpx.Client) -> None:
    """A Content-Type is the Binary's contentType as sent, parameters and all; one too
    long to keep is refused rather than cut (cut, it named another type)."""
    long_ok = "text/plain; charset=utf-8; note=" + "x" * 400
    made = client.post("/Binary", content=b"Befund", headers={"Content-Type": long_ok})
    assert made.status_code == 201, made.text
    assert made.json()["contentType"] == long_ok
    too_long = client.post("/Binary", content=b"Befund",
                           headers={"Content-Type": "text/plain; note=" + "x" * 2000})
    assert (too_long.status_code, gw_code(too_long)) == (415, "GW-1008"), too_long.text
