"""Bundles shaped as Synthea writes them load and read back as a hospital expects.

Synthea is where most test data of FHIR servers comes from. Its Bundles lean on
what the gateway does for transactions: ``ifNoneExist`` on the hospitals and
practitioners (sent again with every export), references to them by
``Type?identifier=…`` from the patients' Bundles, ``urn:uuid`` references
everywhere (a Provenance names every entry), contained resources referred to by
``#id``, and profiles the gateway does not hold. The Bundles come from
``bench/synthea_shaped.py``, the generator of the search benchmark's load.
"""

from __future__ import annotations

import random
from typing import Any

import httpx

from bench.synthea_shaped import NPI, SYNTHEA, Generator

FHIR = "application/fhir+json"


def _post(client: httpx.Client, bundle: dict[str, Any]) -> list[str]:
    answer = client.post("", json=bundle, headers={"Content-Type": FHIR})
    assert answer.status_code == 200, answer.text[:500]
    return [e["response"]["status"] for e in answer.json()["entry"]]


def _ids(client: httpx.Client, url: str, **params: str) -> list[str]:
    found = client.get(url, params={**params, "_count": "1000"}).json()
    return [f"{e['resource']['resourceType']}/{e['resource']['id']}"
            for e in found.get("entry", [])]


def test_a_synthea_shaped_load(client: httpx.Client) -> None:
    gen = Generator(seed=random.randrange(2**32))  # the server is shared: ids of its own
    hospitals, practitioners = gen.hospitals(2), gen.practitioners(3)
    patient = gen.patient(4)
    assert set(_post(client, hospitals)) == {"201 Created"}
    assert set(_post(client, practitioners)) == {"201 Created"}
    statuses = _post(client, patient)
    assert len(statuses) == len(patient["entry"]) and set(statuses) == {"201 Created"}

    # the next export sends the hospitals again: found, not created twice
    assert set(_post(client, hospitals)) == {"200 OK"}
    statuses = _post(client, practitioners)  # a Practitioner is found; its role, with no
    assert statuses[0::2] == ["200 OK"] * 3  # ifNoneExist, is created again (as Synthea asks)
    organizations = [_ids(client, "/Organization", identifier=f"{SYNTHEA}|{o['id']}")
                     for o in gen.organizations]
    assert [len(found) for found in organizations] == [1, 1]
    organizations = [found[0] for found in organizations]
    assert [len(_ids(client, "/Practitioner", identifier=f"{NPI}|{npi}"))
            for npi in gen.npis] == [1, 1, 1]

    pid = client.get("/Patient", params={
        "identifier": f"{SYNTHEA}|{patient['entry'][0]['resource']['id']}"}).json()[
        "entry"][0]["resource"]["id"]
    encounters = client.get("/Encounter", params={"patient": pid}).json()["entry"]
    assert len(encounters) == 4
    for e in encounters:
        enc = e["resource"]
        assert enc["serviceProvider"]["reference"] in organizations
        assert enc["participant"][0]["individual"]["reference"].startswith("Practitioner/")
        assert enc["location"][0]["location"]["reference"].startswith("Location/")
    assert len(_ids(client, "/Observation", patient=pid, category="vital-signs")) == 4 * 5

    # contained resources keep their local references; entries point at entries
    eob = client.get("/ExplanationOfBenefit", params={"patient": pid}).json()["entry"][0][
        "resource"]
    assert eob["referral"]["reference"] == "#referral"
    assert eob["insurance"][0]["coverage"]["reference"] == "#coverage"
    assert {c["id"] for c in eob["contained"]} == {"referral", "coverage"}
    assert client.get(f"/{eob['claim']['reference']}").status_code == 200

    # the Provenance names every other entry, each by its stored id
    provenance = client.get("/Provenance", params={"patient": pid}).json()["entry"][0][
        "resource"]
    targets = [t["reference"] for t in provenance["target"]]
    assert len(targets) == len(patient["entry"]) - 1
    assert not [t for t in targets if t.startswith("urn:")]

    # the patient's record, with the organisations and practitioners it refers to
    record = set(_ids(client, f"/Patient/{pid}/$everything"))
    assert set(targets) <= record
    assert any(r.startswith("Organization/") for r in record)
    assert any(r.startswith("Practitioner/") for r in record)
