"""A real FHIR client library (fhirpy) against the running gateway over HTTP."""

from __future__ import annotations

from fhirpy import SyncFHIRClient

from tests.conftest import Server, unique


def test_fhirpy_create_read_update_search_include_and_page(server: Server) -> None:
    client = SyncFHIRClient(server.url, extra_headers={"Accept": "application/fhir+json"})
    family = unique("Fhirpy")
    org = client.resource("Organization", name=unique("Praxis"))
    org.save()
    assert org.id
    created = []
    for i in range(5):
        p = client.resource(
            "Patient",
            name=[{"family": family, "given": [f"Kind{i}"]}],
            birthDate=f"200{i}-01-01",
            managingOrganization={"reference": f"Organization/{org.id}"},
        )
        p.save()
        created.append(p.id)
    first = client.reference("Patient", created[0]).to_resource()
    assert first["name"][0]["family"] == family
    first["active"] = True
    first.save()
    again = client.resources("Patient").search(_id=created[0]).first()
    assert again["active"] is True
    assert again["meta"]["versionId"] == "2"

    found = client.resources("Patient").search(family=family).sort("birthdate").limit(2)
    ids = [p.id for p in found]  # iterating follows the Bundle's next links
    assert ids == created

    assert client.resources("Patient").search(family=family).count() == 5

    bundle = (client.resources("Patient").search(family=family)
              .include("Patient", "organization").limit(10).fetch_raw())
    types = sorted({e["resource"]["resourceType"] for e in bundle["entry"]})
    assert types == ["Organization", "Patient"]

    patient = client.reference("Patient", created[1]).to_resource()
    patient.delete()
    assert client.resources("Patient").search(family=family).count() == 4
