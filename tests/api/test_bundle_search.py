"""Searching stored Bundles by their first resource: ``Bundle?composition.…`` and
``Bundle?message.…`` (R4 Bundle-composition, Bundle-message: ``Bundle.entry[0].resource``).

A discharge letter sent as a FHIR document is one Bundle; its Composition is not
stored on its own, so these chains look into the Bundle itself.
"""

from __future__ import annotations

from typing import Any

import httpx

from tests.api.helpers import FHIR, patient, post, search_ids
from tests.conftest import unique

LOINC = "http://loinc.org"


def document(subject: str, *, code: str = "18842-5", title: str = "Entlassbrief",
             patient_entry: dict[str, Any] | None = None,
             date: str = "2026-11-20") -> dict[str, Any]:
    entries: list[dict[str, Any]] = [{
        "fullUrl": f"urn:uuid:{unique()}",
        "resource": {"resourceType": "Composition", "status": "final",
                     "type": {"coding": [{"system": LOINC, "code": code}]},
                     "subject": {"reference": subject}, "date": date,
                     "author": [{"display": "Klinikum"}], "title": title}}]
    if patient_entry is not None:
        entries.append(patient_entry)
    return {"resourceType": "Bundle", "type": "document",
            "identifier": {"system": "urn:test:doc", "value": unique()},
            "timestamp": "2026-11-20T10:00:00Z", "entry": entries}


def stored(client: httpx.Client, body: dict[str, Any]) -> str:
    response = post(client, body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def test_documents_are_found_by_their_composition(client: httpx.Client) -> None:
    mrn = unique("mrn")
    pid = stored(client, patient(mrn, family="Dokument"))
    other = stored(client, patient(unique("mrn")))
    by_ref = stored(client, document(f"Patient/{pid}"))
    # the subject named by the document's own Patient entry (fullUrl), as documents do
    entry_url = f"urn:uuid:{unique()}"
    by_entry = stored(client, document(entry_url, code="11488-4", title="Konsilbericht",
                                       patient_entry={"fullUrl": entry_url, "resource": {
                                           "resourceType": "Patient", "id": pid}}))
    elsewhere = stored(client, document(f"Patient/{other}"))
    both = sorted([by_ref, by_entry])

    def found(**params: str) -> list[str]:
        return sorted(search_ids(client, "/Bundle", **params))

    assert found(**{"composition.subject": f"Patient/{pid}"}) == both
    assert found(**{"composition.patient": pid}) == both
    assert found(**{"composition.subject:Patient.identifier": f"urn:test:mrn|{mrn}"}) == both
    assert found(**{"composition.subject.family": "Dokument"}) == both
    assert found(**{"composition.patient": pid, "composition.type": f"{LOINC}|18842-5"}) == [
        by_ref]
    assert found(**{"composition.patient": pid, "composition.title": "konsil"}) == [by_entry]
    assert found(**{"composition:Composition.patient": pid, "composition.date": "ge2026-11"}
                 ) == both
    assert found(**{"composition.patient": pid, "composition.date": "lt2026"}) == []
    assert elsewhere not in found(**{"composition.type": f"{LOINC}|11488-4"})
    # the Composition itself, as before: the reference to it
    cid = client.get(f"/Bundle/{by_ref}").json()["entry"][0]["resource"].get("id")
    if cid is not None:
        assert found(composition=f"Composition/{cid}") == [by_ref]
        assert found(message=f"Composition/{cid}") == []  # message names MessageHeaders


def test_messages_are_found_by_their_header(client: httpx.Client) -> None:
    event = unique("event")
    message = {"resourceType": "Bundle", "type": "message", "timestamp": "2026-11-20T10:00:00Z",
               "entry": [{"fullUrl": f"urn:uuid:{unique()}", "resource": {
                   "resourceType": "MessageHeader",
                   "eventCoding": {"system": "urn:test:events", "code": event},
                   "source": {"endpoint": "urn:test:his"}}}]}
    mid = stored(client, message)
    assert search_ids(client, "/Bundle", **{"message.event": f"urn:test:events|{event}"}) == [
        mid]
    assert search_ids(client, "/Bundle", **{"composition.type": f"urn:test:events|{event}"}
                      ) == []


def test_documents_sort_by_their_composition(client: httpx.Client) -> None:
    pid = stored(client, patient(unique("mrn")))
    dates = ["2026-03-01", "2026-11-01", "2025-07-15"]
    ids = {stored(client, document(f"Patient/{pid}", date=d)): d for d in dates}
    newest_first = search_ids(client, "/Bundle", **{"composition.patient": pid,
                                                     "_sort": "-composition.date"})
    assert [ids[i] for i in newest_first] == sorted(dates, reverse=True)
    by_title_then_date = search_ids(client, "/Bundle", **{
        "composition.patient": pid, "_sort": "composition.title,composition.date"})
    assert [ids[i] for i in by_title_then_date] == sorted(dates)
    unknown = client.get("/Bundle", params={"_sort": "composition._id"})
    assert unknown.status_code == 400


def test_what_a_bundle_chain_cannot_answer_is_said(client: httpx.Client) -> None:
    strict = client.get("/Bundle", params={"composition._id": "x"},
                        headers={"Prefer": "handling=strict"})
    assert strict.status_code == 400, strict.text
    lenient = client.get("/Bundle", params={"composition._id": "x"})
    assert lenient.status_code == 200
    outcome = [e["resource"] for e in lenient.json().get("entry", [])
               if e["resource"]["resourceType"] == "OperationOutcome"]
    assert outcome and "composition._id" in outcome[0]["issue"][0]["diagnostics"]
    wrong = client.get("/Bundle", params={"composition:Patient.name": "x"},
                       headers={"Prefer": "handling=strict", "Accept": FHIR})
    assert wrong.status_code == 400
