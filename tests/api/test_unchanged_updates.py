"""``CAREPATH_SKIP_UNCHANGED_UPDATES``: an update that changes nothing keeps the
current version (both backends). Off by default, where every update makes a version."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.api.helpers import FHIR, patient, post, put
from tests.conftest import BACKENDS, RunningServer, backend_settings, unique


@pytest.fixture(scope="module", params=BACKENDS)
def skipping(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
             new_schema: Any) -> Iterator[httpx.Client]:
    settings = backend_settings(request.param, tmp_path_factory.mktemp("unchanged"),
                                new_schema, skip_unchanged_updates=True)
    with RunningServer(settings) as running, httpx.Client(
            base_url=running.url, timeout=30, headers={"Accept": FHIR}) as c:
        yield c


def versions(client: httpx.Client, rtype: str, rid: str) -> list[str]:
    history = client.get(f"/{rtype}/{rid}/_history").json()
    return [e["response"]["etag"] for e in history["entry"]]


def test_the_same_data_again_keeps_the_version(skipping: httpx.Client) -> None:
    client = skipping
    created = post(client, patient(unique("mrn"))).json()
    rid = created["id"]
    # the stored representation, and the client's own (other member order, no meta)
    again = put(client, created)
    assert again.status_code == 200
    assert again.headers["ETag"] == 'W/"1"'
    assert again.json()["meta"] == created["meta"]
    body = {k: v for k, v in reversed(created.items()) if k != "meta"}
    assert put(client, body, **{"If-Match": 'W/"1"'}).headers["ETag"] == 'W/"1"'
    assert put(client, body, **{"If-Match": 'W/"2"'}).status_code == 412
    assert versions(client, "Patient", rid) == ['W/"1"']
    # a change, however small, is a new version: a value, a decimal's precision, a tag
    changed = {**body, "active": not body.get("active", False)}
    assert put(client, changed).headers["ETag"] == 'W/"2"'
    observation = {"resourceType": "Observation", "status": "final",
                   "code": {"text": "weight"}, "subject": {"reference": f"Patient/{rid}"},
                   "valueQuantity": {"value": 72.5, "unit": "kg"}}
    oid = post(client, observation).json()["id"]
    assert put(client, {**observation, "id": oid}).headers["ETag"] == 'W/"1"'
    finer = json.dumps({**observation, "id": oid}).replace("72.5", "72.50")
    assert client.put(f"/Observation/{oid}", content=finer,
                      headers={"Content-Type": FHIR}).headers["ETag"] == 'W/"2"'
    tagged = {**changed, "meta": {"tag": [{"system": "urn:t", "code": "x"}]}}
    assert put(client, tagged).headers["ETag"] == 'W/"3"'
    assert put(client, tagged).headers["ETag"] == 'W/"3"'


def test_a_patch_that_changes_nothing_keeps_the_version(skipping: httpx.Client) -> None:
    client = skipping
    rid = post(client, patient(unique("mrn"), gender="female")).json()["id"]
    same = client.patch(f"/Patient/{rid}", headers={"Content-Type": "application/json-patch+json"},
                        json=[{"op": "replace", "path": "/gender", "value": "female"}])
    assert same.status_code == 200 and same.headers["ETag"] == 'W/"1"'
    other = client.patch(f"/Patient/{rid}", headers={"Content-Type": "application/json-patch+json"},
                         json=[{"op": "replace", "path": "/gender", "value": "male"}])
    assert other.headers["ETag"] == 'W/"2"'


def test_a_transaction_sending_the_same_data_again(skipping: httpx.Client) -> None:
    client = skipping
    rid = unique("pat")
    body = patient(unique("mrn"), id=rid)
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": body, "request": {"method": "PUT", "url": f"Patient/{rid}"}}]}
    first = client.post("/", json=bundle, headers={"Content-Type": FHIR}).json()
    second = client.post("/", json=bundle, headers={"Content-Type": FHIR}).json()
    assert first["entry"][0]["response"]["status"].startswith("201")
    assert second["entry"][0]["response"]["status"].startswith("200")
    assert second["entry"][0]["response"]["etag"] == 'W/"1"'
    assert versions(client, "Patient", rid) == ['W/"1"']


def test_by_default_every_update_makes_a_version(client: httpx.Client) -> None:
    created = post(client, patient(unique("mrn"))).json()
    assert put(client, created).headers["ETag"] == 'W/"2"'
