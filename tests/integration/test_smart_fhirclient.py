"""A second real client library, SMART on FHIR's Python ``fhirclient`` (its R4 models
and server class), against the running gateway over HTTP: create, read, update,
search with ``_include``, paging through every page, delete."""

from __future__ import annotations

from fhirclient import client
from fhirclient.models.observation import Observation
from fhirclient.models.patient import Patient

from tests.conftest import Server, unique


def test_smart_fhirclient_against_the_gateway(server: Server) -> None:
    smart = client.FHIRClient(settings={"app_id": "carepath-tests", "api_base": server.url})
    fhir = smart.server
    family = unique("Smart")
    ids = []
    for i in range(5):
        made = Patient({"name": [{"family": family, "given": [f"Kind{i}"]}],
                        "gender": "female"}).create(fhir)
        ids.append(made["id"])  # the server's answer: the stored resource
    first = Patient.read(ids[0], fhir)
    assert (first.name[0].family, first.meta.versionId) == (family, "1")
    first.active = True
    assert first.update(fhir)["meta"]["versionId"] == "2"
    assert Patient.read(ids[0], fhir).active is True

    search = Patient.where(struct={"family": family, "_count": "2", "_sort": "_id"})
    pages = list(search.perform_iter(fhir))  # the library follows the next links
    assert [len(page.entry) for page in pages] == [2, 2, 1]
    assert pages[0].total == 5
    assert [link.relation for link in pages[0].link] == ["self", "next"]
    assert [p.id for p in search.perform_resources_iter(fhir)] == sorted(ids)

    Observation({"status": "final", "code": {"text": "Blutdruck"},
                 "subject": {"reference": f"Patient/{ids[0]}"}}).create(fhir)
    (included,) = Observation.where(struct={"subject": f"Patient/{ids[0]}"}) \
        .include("subject").perform_iter(fhir)
    assert sorted((e.resource.resource_type, e.search.mode) for e in included.entry) == [
        ("Observation", "match"), ("Patient", "include")]

    Patient.read(ids[4], fhir).delete(fhir)
    try:
        Patient.read(ids[4], fhir)
    except Exception as exc:  # the library raises requests' HTTPError
        assert "410" in str(exc)
    else:
        raise AssertionError("a deleted patient was read")
