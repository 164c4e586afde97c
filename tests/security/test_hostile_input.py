"""Hostile input: XML entity attacks in narrative, deep and oversized JSON, numbers no
double holds, bodies that are not UTF-8 — refused fast, memory flat, never a server
error."""

from __future__ import annotations

import json
import resource
import sqlite3
import time
from pathlib import Path

import httpx

from gateway.settings import Settings
from tests.api.helpers import FHIR, gw_code, patient, post
from tests.conftest import RunningServer, unique

BILLION_LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    + "".join(f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">'
              for i in range(1, 10))
    + ']><div xmlns="http://www.w3.org/1999/xhtml">&lol9;</div>'
)
XXE = ('<!DOCTYPE div [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
       '<div xmlns="http://www.w3.org/1999/xhtml">&xxe;</div>')
XXE_NET = ('<!DOCTYPE div [<!ENTITY % ext SYSTEM "http://127.0.0.1:9/x.dtd"> %ext;]>'
           '<div xmlns="http://www.w3.org/1999/xhtml">x</div>')
SCRIPT = ('<div xmlns="http://www.w3.org/1999/xhtml"><p>x</p>'
          '<a href=" jav&#x09;ascript:alert(1)">x</a></div>')


def _patient(div: str) -> dict[str, object]:
    return {"resourceType": "Patient", "text": {"status": "generated", "div": div}}


def _max_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def test_entity_attacks_in_narrative_are_refused_fast_with_flat_memory(
    client: httpx.Client,
) -> None:
    before = _max_rss_kib()
    for div in (BILLION_LAUGHS, XXE, XXE_NET, SCRIPT):
        started = time.perf_counter()
        response = client.post("/Patient", json=_patient(div), headers={"Content-Type": FHIR})
        elapsed = time.perf_counter() - started
        assert response.status_code == 422, response.text
        assert "root:" not in response.text  # nothing of /etc/passwd comes back
        assert elapsed < 2.0
    # the server runs in this process: its peak memory grew by less than 50 MB
    assert _max_rss_kib() - before < 50 * 1024


def test_deep_json_is_refused_before_anything_else(client: httpx.Client) -> None:
    depth = 100_000
    body = b'{"resourceType":"Patient","extension":' + b"[" * depth + b"]" * depth + b"}"
    started = time.perf_counter()
    response = client.post("/Patient", content=body, headers={"Content-Type": FHIR})
    assert response.status_code == 400
    assert time.perf_counter() - started < 5.0


def _refused(response: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert (response.status_code, gw_code(response)) == (status, code), response.text
    issue: dict[str, object] = response.json()["issue"][0]
    return issue


def test_numbers_beyond_a_double_are_refused_on_every_write_path(
        client: httpx.Client) -> None:
    """R4's decimal pattern admits 1e309, but no double holds it: kept, the resource
    could not be read back (orjson refuses such JSON). Refused on the way in, naming
    the element, however it comes."""
    pid = post(client, patient(unique("mrn"))).json()["id"]

    def observation(value: bytes) -> bytes:
        return (b'{"resourceType":"Observation","status":"final","code":{"text":"x"},'
                b'"subject":{"reference":"Patient/' + pid.encode() + b'"},'
                b'"valueQuantity":{"value":' + value + b"}}")

    for value in (b"1e309", b"-1E400", b"9" * 309, b"1" * 5000, b"1.7976931348623159e308",
                  b"1e99999999999999999999", b"-1E-99999999999999999999"):
        issue = _refused(client.post("/Observation", content=observation(value),
                                     headers={"Content-Type": FHIR}), 400, "GW-1022")
        assert issue["expression"] == ["Observation.valueQuantity.value"], issue
        assert "beyond" in str(issue["diagnostics"])
    # the largest double is kept, and reads back
    kept = client.post("/Observation", content=observation(b"1.7976931348623157e308"),
                       headers={"Content-Type": FHIR})
    assert kept.status_code == 201, kept.text
    oid = kept.json()["id"]
    assert client.get(f"/Observation/{oid}").status_code == 200

    with_id = observation(b"1e309").replace(b"{", b'{"id":"' + oid.encode() + b'",', 1)
    _refused(client.put(f"/Observation/{oid}", content=with_id,
                        headers={"Content-Type": FHIR}), 400, "GW-1022")
    bundle = (b'{"resourceType":"Bundle","type":"transaction","entry":[{"resource":'
              + observation(b"1e309") + b',"request":{"method":"POST","url":"Observation"}}]}')
    issue = _refused(client.post("", content=bundle, headers={"Content-Type": FHIR}),
                     400, "GW-1022")
    assert issue["expression"] == ["Bundle.entry[0].resource.valueQuantity.value"]
    _refused(client.patch(
        f"/Observation/{oid}",
        content=b'[{"op":"replace","path":"/valueQuantity/value","value":1e309}]',
        headers={"Content-Type": "application/json-patch+json"}), 400, "GW-1022")
    _refused(client.patch(
        f"/Observation/{oid}",
        content=b'{"resourceType":"Parameters","parameter":[{"name":"operation","part":['
                b'{"name":"type","valueCode":"replace"},'
                b'{"name":"path","valueString":"Observation.valueQuantity.value"},'
                b'{"name":"value","valueDecimal":1e309}]}]}',
        headers={"Content-Type": FHIR}), 400, "GW-1022")
    _refused(client.post("/Observation/$validate", content=observation(b"1e309"),
                         headers={"Content-Type": FHIR}), 400, "GW-1022")
    assert client.get(f"/Observation/{oid}").json()["valueQuantity"]["value"] \
        == 1.7976931348623157e308


SURROGATE = b"\xed\xa0\x80"  # U+D800 as UTF-8 would write it, were it allowed


def test_json_bodies_are_utf8_only(client: httpx.Client) -> None:
    """http.html#mime-type: UTF-8 SHALL be used (RFC 8259 8.1). Encoded surrogates are
    not UTF-8 (400); UTF-16 and UTF-32 are refused as such (415), whatever they hold."""
    json_type = {"Content-Type": FHIR}
    pid = post(client, patient(unique("mrn"))).json()["id"]
    with_family = b'{"resourceType":"Patient","name":[{"family":"' + SURROGATE + b'"}]}'
    for response in (
        client.post("/Patient", content=with_family, headers=json_type),
        client.post("/Patient", content=b'{"resourceType":"Patient","' + SURROGATE + b'":1}',
                    headers=json_type),
        client.put(f"/Patient/{pid}", content=with_family.replace(
            b"{", b'{"id":"' + pid.encode() + b'",', 1), headers=json_type),
        client.post("", content=b'{"resourceType":"Bundle","type":"transaction","entry":['
                                b'{"resource":' + with_family + b',"request":'
                                b'{"method":"POST","url":"Patient"}}]}', headers=json_type),
        client.patch(f"/Patient/{pid}",
                     content=b'[{"op":"add","path":"/name","value":[{"family":"'
                             + SURROGATE + b'"}]}]',
                     headers={"Content-Type": "application/json-patch+json"}),
        client.post("/Binary", content=b'{"resourceType":"Binary","contentType":"text/plain",'
                                       b'"id":"' + SURROGATE + b'"}',
                    headers={"Content-Type": "application/json"}),
        client.post("/Patient/$validate", content=with_family, headers=json_type),
    ):
        issue = _refused(response, 400, "GW-1001")
        assert "UTF-8" in str(issue["diagnostics"])

    for text in ('{"resourceType":"Patient","name":[{"family":"a\\u0001b"}]}',
                 '{"resourceType":"Patient","name":[{"family":"a\\u0000b"}]}',
                 '{"resourceType":"Patient","name":[{"family":"a\\ud800b"}]}',
                 '{"resourceType":"Patient","name":[{"family":"a\\uffffb"}]}',
                 '{"resourceType":"Patient","name":[{"family":"Müller"}]}'):
        for encoding in ("utf-16le", "utf-16be", "utf-16", "utf-32"):
            _refused(client.post("/Patient", content=text.encode(encoding), headers=json_type),
                     415, "GW-1008")
    # a byte order mark before UTF-8 may be ignored (RFC 8259 8.1), and is
    bom = client.post("/Patient", content=b"\xef\xbb\xbf" + json.dumps(
        patient(unique("mrn"), "Müller")).encode(), headers=json_type)
    assert bom.status_code == 201, bom.text
    assert bom.json()["name"][0]["family"] == "Müller"


def _stored_before(path: Path, id: str) -> None:
    """The resource's ``1.5`` made ``1e309`` in the database, as a write from before
    such numbers were refused left it."""
    with sqlite3.connect(path) as db:
        for table in ("resource", "resource_history"):
            (content,) = db.execute(f"SELECT content FROM {table} WHERE res_id = ?",
                                    (id,)).fetchone()
            db.execute(f"UPDATE {table} SET content = ? WHERE res_id = ?",
                       (bytes(content).replace(b":1.5}", b":1e309}"), id))


def test_a_number_beyond_a_double_stored_before_is_still_served(tmp_path: Path) -> None:
    """Written before such numbers were refused, it reads, searches and deletes as any
    other resource (orjson, which the access rules read stored content with, refuses it)."""
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'old.db'}")
    with RunningServer(settings) as running, httpx.Client(base_url=running.url) as client:
        pid = post(client, patient(unique("mrn"))).json()["id"]
        oid = client.post("/Observation", headers={"Content-Type": FHIR}, json={
            "resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "subject": {"reference": f"Patient/{pid}"}, "valueQuantity": {"value": 1.5},
        }).json()["id"]
        _stored_before(tmp_path / "old.db", oid)
        read = client.get(f"/Observation/{oid}")
        assert read.status_code == 200, read.text
        assert b'"value":1e309' in read.content
        for path in (f"/Observation?subject=Patient/{pid}", f"/Patient/{pid}/$everything",
                     f"/Observation/{oid}/_history", f"/Observation/{oid}?_format=xml"):
            assert client.get(path).status_code == 200, path
        assert client.delete(f"/Observation/{oid}").status_code == 204


def test_a_value_set_with_such_a_number_stored_before_still_expands(tmp_path: Path) -> None:
    """The terminology operations read stored ValueSets too: one holding a number
    beyond a double (an extension's decimal, stored before they were refused) expands
    and validates codes as any other."""
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'old.db'}")
    with RunningServer(settings) as running, httpx.Client(base_url=running.url) as client:
        url = f"urn:test:vs:{unique('vs')}"
        made = client.post("/ValueSet", headers={"Content-Type": FHIR}, json={
            "resourceType": "ValueSet", "url": url, "status": "active",
            "extension": [{"url": "urn:test:weight", "valueDecimal": 1.5}],
            "compose": {"include": [{"system": "urn:test:cs", "concept": [{"code": "a"}]}]}})
        assert made.status_code == 201, made.text
        vid = made.json()["id"]
        _stored_before(tmp_path / "old.db", vid)
        for path, params in ((f"/ValueSet/{vid}/$expand", {}),
                             ("/ValueSet/$expand", {"url": url}),
                             ("/ValueSet/$validate-code",
                              {"url": url, "system": "urn:test:cs", "code": "a"})):
            answer = client.get(path, params=params)
            assert answer.status_code == 200, (path, answer.text)
