"""A worker keeps answering while one request does long work: a transaction of
many entries gives the event loop turns between them, and a large resource is
parsed and validated on a thread (gateway.interactions.offload).

Each test measures the longest time ``/healthz`` (liveness: the loop alone, no
database) went unanswered while the long request was in flight, as a share of the
request's time. Without turns or threads the loop is held for most of the request
(0.6-0.95 of it); with them, for a few milliseconds at a time. Being a share, it
does not grow on a slower machine.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from itertools import pairwise
from typing import Any

import httpx
import pytest

from bench.validate import nested_questionnaire
from gateway.fhir.terminology import Terminology
from gateway.fhir.validation import FhirValidator
from gateway.fhir.validation.profiles import ProfileSet
from gateway.interactions import offload
from tests.api.helpers import FHIR
from tests.conftest import Server


def _longest_wait(server: Server, long_request: Callable[[], httpx.Response]
                  ) -> tuple[httpx.Response, float]:
    """The long request's response, and the longest time ``/healthz`` went unanswered
    while it ran, as a share of the time it ran."""
    root = server.url.rsplit("/fhir", 1)[0]
    running = threading.Event()
    finished = threading.Event()
    answered: list[float] = []

    def poll() -> None:
        with httpx.Client(timeout=60) as c:
            while not finished.is_set():
                c.get(f"{root}/healthz").raise_for_status()
                answered.append(time.monotonic())
                running.set()

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    assert running.wait(30)
    started = time.monotonic()
    try:
        response = long_request()
    finally:
        ended = time.monotonic()
        finished.set()
        poller.join(60)
    times = [started, *(t for t in answered if started < t < ended), ended]
    return response, max(b - a for a, b in pairwise(times)) / (ended - started)


def _observation(i: int, subject: str) -> dict[str, Any]:
    return {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "request": {"method": "POST",
                                                               "url": "Observation"},
            "resource": {"resourceType": "Observation", "status": "final",
                         "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                         "subject": {"reference": subject},
                         "effectiveDateTime": "2024-01-01T10:00:00Z",
                         "valueQuantity": {"value": 60 + i % 40, "unit": "/min",
                                           "system": "http://unitsofmeasure.org",
                                           "code": "/min"}}}


def test_a_long_transaction_gives_the_loop_turns(server: Server,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(offload, "SLICE_S", 0.0)  # a turn after every entry
    patient = f"urn:uuid:{uuid.uuid4()}"
    entries = [{"fullUrl": patient, "request": {"method": "POST", "url": "Patient"},
                "resource": {"resourceType": "Patient", "name": [{"family": "Turn"}]}}]
    entries += [_observation(i, patient) for i in range(600)]
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}

    def post() -> httpx.Response:
        return httpx.post(server.url, json=bundle, timeout=120,
                          headers={"Content-Type": FHIR, "Prefer": "return=minimal"})

    response, longest = _longest_wait(server, post)
    assert response.status_code == 200, response.text[:300]
    assert len(response.json()["entry"]) == 601
    assert longest < 0.5


def test_a_large_resource_is_validated_off_the_loop(server: Server) -> None:
    questionnaire = nested_questionnaire(40)  # about 0.8 MB, 13,640 items

    def post() -> httpx.Response:
        return httpx.post(f"{server.url}/Questionnaire", json=questionnaire, timeout=120,
                          headers={"Content-Type": FHIR, "Prefer": "return=minimal"})

    response, longest = _longest_wait(server, post)
    assert response.status_code == 201, response.text[:300]
    assert longest < 0.5


def test_a_large_invalid_resource_still_gets_its_issues(server: Server) -> None:
    questionnaire = nested_questionnaire(12)
    questionnaire["item"][-1]["item"][0]["linkId"] = questionnaire["item"][0]["linkId"]
    questionnaire["item"][3]["type"] = "no-such-type"
    response = httpx.post(f"{server.url}/Questionnaire", json=questionnaire, timeout=120,
                          headers={"Content-Type": FHIR})
    assert response.status_code == 422
    found = {i.get("diagnostics", "")[:6] for i in response.json()["issue"]}
    assert "que-2:" in found
    assert any("no-such-type" in i.get("diagnostics", "") for i in response.json()["issue"])


def test_a_large_malformed_body_is_refused_as_a_small_one(server: Server) -> None:
    body = b'{"resourceType": "Questionnaire", "status": "active", "item": [' + \
        b'{"linkId": "a", "type": "string"},' * 20_000 + b"]"  # 0.7 MB, never closed
    response = httpx.post(f"{server.url}/Questionnaire", content=body, timeout=60,
                          headers={"Content-Type": FHIR})
    assert response.status_code == 400
    assert response.json()["resourceType"] == "OperationOutcome"


def _on_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def test_stored_profiles_are_compiled_off_the_loop(server: Server,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The snapshot of a profile stored without one (made when the stored profiles
    are read again after a write of one), the expansion of the stored value set it
    binds, its compile on first use, and $snapshot run on a thread: with many slices
    or codes they take seconds."""
    url = f"urn:test:sd:{uuid.uuid4().hex}"
    vs_url = f"urn:test:vs:{uuid.uuid4().hex}"
    seen: list[tuple[str, bool]] = []
    with_stored, snapshot, get = FhirValidator.with_stored, FhirValidator.snapshot, \
        ProfileSet.get
    members = Terminology.members

    def recorded(name: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def run(self: Any, *args: Any, **kw: Any) -> Any:
            if (name == "get" and args[0] == url and url in self.raw) or (  # a compile
                    name == "members" and args[0].get("url") == vs_url) or \
                    name in ("with_stored", "snapshot"):
                seen.append((name, _on_loop()))
            return call(self, *args, **kw)
        return run

    monkeypatch.setattr(FhirValidator, "with_stored", recorded("with_stored", with_stored))
    monkeypatch.setattr(FhirValidator, "snapshot", recorded("snapshot", snapshot))
    monkeypatch.setattr(ProfileSet, "get", recorded("get", get))
    monkeypatch.setattr(Terminology, "members", recorded("members", members))
    marital = "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus"
    value_set = {"resourceType": "ValueSet", "url": vs_url, "status": "active",
                 "compose": {"include": [{"system": marital,
                                          "concept": [{"code": "M"}, {"code": "S"}]}]}}
    diff: list[dict[str, Any]] = [{"id": "Patient.identifier", "path": "Patient.identifier",
                                   "slicing": {"discriminator": [
                                       {"type": "value", "path": "system"}], "rules": "open"}}]
    for i in range(50):
        diff += [{"id": f"Patient.identifier:s{i}", "path": "Patient.identifier",
                  "sliceName": f"s{i}"},
                 {"id": f"Patient.identifier:s{i}.system", "path": "Patient.identifier.system",
                  "fixedUri": f"urn:test:s{i}"}]
    diff.append({"id": "Patient.birthDate", "path": "Patient.birthDate", "min": 1})
    diff.append({"id": "Patient.maritalStatus", "path": "Patient.maritalStatus",
                 "binding": {"strength": "required", "valueSet": vs_url}})
    profile = {"resourceType": "StructureDefinition", "url": url, "name": "ManySlices",
               "status": "draft", "kind": "resource", "abstract": False, "type": "Patient",
               "baseDefinition": "http://hl7.org/fhir/StructureDefinition/Patient",
               "derivation": "constraint", "differential": {"element": diff}}
    with httpx.Client(base_url=server.url, timeout=60, headers={"Content-Type": FHIR}) as c:
        bound = c.post("/ValueSet", json=value_set)
        assert bound.status_code == 201, bound.text
        stored = c.post("/StructureDefinition", json=profile)
        assert stored.status_code == 201, stored.text
        try:
            claiming = {"resourceType": "Patient", "meta": {"profile": [url]},
                        "identifier": [{"system": "urn:test:s7", "value": "1"}],
                        "maritalStatus": {"coding": [{"system": marital, "code": "W"}]}}
            refused = c.post("/Patient", json=claiming)
            assert refused.status_code == 422 and "Patient.birthDate" in refused.text
            assert vs_url in refused.text  # W is not in the stored value set
            made = c.post("/StructureDefinition/$snapshot", json=profile)
            assert made.status_code == 200
            assert len(made.json()["snapshot"]["element"]) > 50 * 9
        finally:  # (the server is shared: its CapabilityStatement lists stored profiles)
            for kind, made in (("StructureDefinition", stored), ("ValueSet", bound)):
                gone = c.delete(f"/{kind}/{made.json()['id']}")
                assert gone.status_code in (200, 204), gone.text
    assert {"with_stored", "members", "get", "snapshot"} <= {name for name, _ in seen}
    assert [name for name, on_loop in seen if on_loop] == []
