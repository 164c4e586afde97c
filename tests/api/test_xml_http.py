"""FHIR XML on the RESTful API (http.html#mime-type, xml.html): both backends."""

from __future__ import annotations

import httpx
from lxml import etree  # type: ignore[import-untyped]

from tests.api.helpers import FHIR, gw_code, patient, post
from tests.conftest import unique

XML = "application/fhir+xml"
F = "{http://hl7.org/fhir}"


def _xml(response: httpx.Response) -> etree._Element:
    assert response.headers["content-type"].startswith(XML), response.headers
    return etree.fromstring(response.content)


def test_write_and_read_in_xml(client: httpx.Client) -> None:
    mrn = unique("mrn")
    body = (f'<Patient xmlns="http://hl7.org/fhir"><identifier><system value="urn:test:mrn"/>'
            f'<value value="{mrn}"/></identifier><active value="true"/><name>'
            '<family value="Müller"/><given value="Anna"/></name><gender value="female"/>'
            '<birthDate value="1970-05-01"/></Patient>').encode()
    created = client.post("/Patient", content=body, headers={"Content-Type": XML,
                                                               "Accept": XML})
    assert created.status_code == 201, created.text
    root = _xml(created)
    pid = root.find(F + "id").get("value")
    assert root.find(F + "meta/" + F + "versionId").get("value") == "1"
    as_json = client.get(f"/Patient/{pid}", headers={"Accept": FHIR}).json()
    assert as_json["active"] is True and as_json["name"][0]["family"] == "Müller"
    assert as_json["identifier"][0]["value"] == mrn
    for headers, params in (({"Accept": XML}, {}), ({}, {"_format": "xml"}),
                            ({"Accept": "application/xml"}, {}),
                            ({"Accept": f"{FHIR};q=0.5, {XML}"}, {})):
        read = client.get(f"/Patient/{pid}", headers=headers, params=params)
        assert read.status_code == 200
        assert _xml(read).find(F + "birthDate").get("value") == "1970-05-01"
    # JSON where JSON is asked for, or both equally (as HAPI's client asks)
    for accept in (FHIR, "*/*", "application/fhir+xml;q=1.0, application/fhir+json;q=1.0"):
        assert client.get(f"/Patient/{pid}", headers={"Accept": accept}).json()["id"] == pid
    found = client.post("/Patient/_search", content=f"identifier={mrn}".encode(),
                        headers={"Content-Type": "application/x-www-form-urlencoded",
                                 "Accept": XML})
    entries = _xml(found).findall(F + "entry")
    assert [e.find(F + "resource/" + F + "Patient/" + F + "id").get("value")
            for e in entries] == [pid]
    updated = client.put(f"/Patient/{pid}", content=body.replace(
        b"<Patient xmlns=\"http://hl7.org/fhir\">",
        f'<Patient xmlns="http://hl7.org/fhir"><id value="{pid}"/>'.encode()).replace(
        b'value="true"', b'value="false"'), headers={"Content-Type": XML, "Accept": "*/*"})
    patched = client.patch(f"/Patient/{pid}", content=(
        b'<Parameters xmlns="http://hl7.org/fhir"><parameter><name value="operation"/>'
        b'<part><name value="type"/><valueCode value="replace"/></part>'
        b'<part><name value="path"/><valueString value="Patient.gender"/></part>'
        b'<part><name value="value"/><valueCode value="male"/></part></parameter>'
        b'</Parameters>'), headers={"Content-Type": XML, "Accept": XML})
    assert patched.status_code == 200, patched.text
    assert _xml(patched).find(F + "gender").get("value") == "male"
    not_a_patch = client.patch(f"/Patient/{pid}", content=body,
                               headers={"Content-Type": XML})
    assert not_a_patch.status_code == 415
    # no format asked for: the one the client wrote in
    assert updated.status_code == 200, updated.text
    assert _xml(updated).find(F + "active").get("value") == "false"


def test_transaction_and_errors_in_xml(client: httpx.Client) -> None:
    bundle = (
        b'<Bundle xmlns="http://hl7.org/fhir"><type value="transaction"/>'
        b'<entry><fullUrl value="urn:uuid:6b1a0c0e-0a4e-4d1e-9b1e-1f2a3b4c5d6e"/><resource>'
        b'<Patient><name><family value="Xml"/></name></Patient></resource>'
        b'<request><method value="POST"/><url value="Patient"/></request></entry>'
        b'<entry><resource><Observation><status value="final"/><code><text value="w"/></code>'
        b'<subject><reference value="urn:uuid:6b1a0c0e-0a4e-4d1e-9b1e-1f2a3b4c5d6e"/></subject>'
        b'<valueQuantity><value value="72.50"/><unit value="kg"/></valueQuantity>'
        b'</Observation></resource><request><method value="POST"/><url value="Observation"/>'
        b'</request></entry></Bundle>')
    response = client.post("/", content=bundle, headers={"Content-Type": XML, "Accept": XML})
    assert response.status_code == 200, response.text
    statuses = [e.find(F + "response/" + F + "status").get("value")
                for e in _xml(response).findall(F + "entry")]
    assert statuses == ["201 Created", "201 Created"]
    location = _xml(response).findall(F + "entry")[1].find(
        F + "response/" + F + "location").get("value")
    obs = client.get(location, headers={"Accept": FHIR}).json()
    assert obs["subject"]["reference"].startswith("Patient/")
    assert b'"value":72.50' in client.get(location, headers={"Accept": FHIR}).content
    assert _xml(client.get(location, headers={"Accept": XML})).find(
        F + "valueQuantity/" + F + "value").get("value") == "72.50"
    # errors: in XML when XML is asked for, with the gateway's codes
    missing = client.get(f"/Patient/{unique('none')}", headers={"Accept": XML})
    assert missing.status_code == 404
    assert _xml(missing).find(F + "issue/" + F + "details/" + F + "coding/" + F
                              + "code").get("value") == "GW-2001"
    for body, status, code in [
        (b"<Patient xmlns='http://hl7.org/fhir'><active value='true'>", 400, "GW-1027"),
        (b"<Patient xmlns='http://hl7.org/fhir'><nonsense/></Patient>", 400, "GW-1022"),
        (b"<!DOCTYPE p [<!ENTITY x SYSTEM 'file:///etc/passwd'>]>"
         b"<Patient xmlns='http://hl7.org/fhir'><id value='&x;'/></Patient>", 400, "GW-1022"),
        (b"<Patient xmlns='http://hl7.org/fhir'><active value='yes'/></Patient>", 422,
         "GW-4002"),
        (b"<Observation xmlns='http://hl7.org/fhir'/>", 400, "GW-1004"),
    ]:
        refused = client.post("/Patient", content=body, headers={"Content-Type": XML,
                                                                 "Accept": XML})
        assert refused.status_code == status, refused.text
        assert _xml(refused).find(F + "issue/" + F + "details/" + F + "coding/" + F
                                  + "code").get("value") == code
    assert gw_code(client.get("/Patient", params={"_format": "turtle"})) == "GW-1009"


def test_capabilities_and_binary_in_xml(client: httpx.Client) -> None:
    metadata = client.get("/metadata").json()
    assert XML in metadata["format"] and "xml" in metadata["format"]
    post(client, patient(unique("mrn")))
    made = client.post("/Binary", content=b"%PDF-1.4", headers={
        "Content-Type": "application/pdf"}).json()
    binary = _xml(client.get(f"/Binary/{made['id']}", headers={"Accept": XML}))
    assert binary.find(F + "contentType").get("value") == "application/pdf"
    assert binary.find(F + "data").get("value") == made["data"]
    # a CDA document in text/xml is content; a Binary in FHIR XML is the resource
    cda = b'<ClinicalDocument xmlns="urn:hl7-org:v3"><title>Entlassbrief</title></ClinicalDocument>'
    stored = client.post("/Binary", content=cda, headers={"Content-Type": "text/xml"}).json()
    assert stored["contentType"] == "text/xml"
    assert client.get(f"/Binary/{stored['id']}", headers={"Accept": "text/xml"}).content == cda
    resource = client.post("/Binary", content=(
        b'<Binary xmlns="http://hl7.org/fhir"><contentType value="text/plain"/>'
        b'<data value="aGFsbG8="/></Binary>'), headers={"Content-Type": XML}).json()
    assert resource["contentType"] == "text/plain" and resource["data"] == "aGFsbG8="


def test_page_links_keep_the_format_asked_for(client: httpx.Client) -> None:
    """A client that asks with ``_format`` (it cannot set ``Accept``: a browser, a
    tester following links) gets every page in that format, as from HAPI FHIR."""
    family = unique("Fmt")
    pids = [post(client, patient(unique("mrn"), name=[{"family": family}])).json()["id"]
            for _ in range(3)]
    first = httpx.get(f"{client.base_url}Patient", params={
        "family": family, "_count": 1, "_format": "xml", "_pretty": "true"})
    links = {link.find(F + "relation").get("value"): link.find(F + "url").get("value")
             for link in _xml(first).findall(F + "link")}
    assert "_format=xml" in links["self"] and "_pretty=true" in links["next"], links
    second = httpx.get(links["next"])  # no Accept: the link alone says XML
    assert _xml(second).find(F + "type").get("value") == "searchset"
    assert b"\n" in second.content  # pretty
    history = httpx.get(f"{client.base_url}Patient/{pids[0]}/_history",
                        params={"_format": "json"}, headers={"Accept": XML}).json()
    assert all("_format=json" in link["url"] for link in history["link"])


def test_decimals_beyond_a_double_are_refused_in_xml(client: httpx.Client) -> None:
    """As in JSON: a value no double holds could not be read back once stored."""
    def observation(value: str) -> bytes:
        return ('<Observation xmlns="http://hl7.org/fhir"><status value="final"/><code>'
                '<text value="x"/></code><valueQuantity>'
                f'<value value="{value}"/></valueQuantity></Observation>').encode()

    for value in ("1e400", "-1E309", "9" * 309, "1e99999999999999999999"):
        refused = client.post("/Observation", content=observation(value),
                              headers={"Content-Type": XML})
        assert (refused.status_code, gw_code(refused)) == (400, "GW-1022"), refused.text
        issue = refused.json()["issue"][0]
        assert issue["expression"] == ["Observation.valueQuantity.value"], issue
    bundle = ('<Bundle xmlns="http://hl7.org/fhir"><type value="transaction"/><entry>'
              '<resource>' + observation("1e400").decode().replace(
                  ' xmlns="http://hl7.org/fhir"', "") + '</resource><request>'
              '<method value="POST"/><url value="Observation"/></request></entry></Bundle>')
    refused = client.post("/", content=bundle.encode(), headers={"Content-Type": XML})
    assert (refused.status_code, gw_code(refused)) == (400, "GW-1022"), refused.text
    kept = client.post("/Observation", content=observation("1.5e308"),
                       headers={"Content-Type": XML, "Accept": XML})
    assert kept.status_code == 201, kept.text
    assert float(_xml(kept).find(F + "valueQuantity/" + F + "value").get("value")) == 1.5e308
