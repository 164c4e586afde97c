"""The gateway's own SearchParameters (``profiles/SearchParameter-*.json``): searches
over the pathway extensions, indexed on write and listed in the CapabilityStatement."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.api.helpers import search_ids
from tests.conftest import unique
from tests.profiles.helpers import EXAMPLES

CARE_LEVEL = "https://carepath-gateway.org/fhir/CodeSystem/care-level"
OWN = "https://carepath-gateway.org/fhir/SearchParameter/"


def _store(client: httpx.Client, name: str) -> str:
    """A valid pathway example, stored under a new id; the id."""
    resource: dict[str, Any] = json.loads((EXAMPLES / "valid" / f"{name}.json").read_text())
    resource["id"] = unique(resource["id"])[:64]
    stored = client.put(f"/{resource['resourceType']}/{resource['id']}", json=resource)
    assert stored.status_code == 201, stored.text
    return str(resource["id"])


def test_episodes_referrals_and_follow_ups_are_found_by_their_extensions(
        client: httpx.Client) -> None:
    enrolled = _store(client, "EpisodeOfCare-nhn-enrolled")
    closed = _store(client, "EpisodeOfCare-nhn-closed")
    both = f"{enrolled},{closed}"

    def episodes(**params: str) -> set[str]:
        return set(search_ids(client, "/EpisodeOfCare", _id=both, **params))

    assert episodes(**{"care-level": "level-1"}) == {enrolled, closed}
    assert episodes(**{"care-level": f"{CARE_LEVEL}|level-1"}) == {enrolled, closed}
    assert episodes(**{"care-level": "level-3"}) == set()
    assert episodes(**{"care-level:not": "level-1"}) == set()
    assert episodes(phase="nhn-pre-inpatient") == {enrolled}
    assert episodes(**{"end-reason": "last-check-up-done"}) == {closed}
    assert episodes(**{"end-reason:missing": "true"}) == {enrolled}
    assert episodes(**{"enrolling-organization": "Organization/gp-practice-nord"}) \
        == {enrolled, closed}
    assert episodes(**{"enrolling-organization": "Organization/elsewhere"}) == set()

    escalation = _store(client, "ServiceRequest-lcp-escalation")
    emergency = _store(client, "ServiceRequest-emergency-admission")
    requests = f"{escalation},{emergency}"
    assert search_ids(client, "/ServiceRequest", _id=requests,
                      **{"escalation-criterion": "escalate-complexity"}) == [escalation]
    assert search_ids(client, "/ServiceRequest", _id=requests,
                      **{"second-opinion-exception": "emergency"}) == [emergency]

    plan = _store(client, "CarePlan-follow-up")
    for level, found in (("level-2", [plan]), ("level-1,level-2", [plan]), ("level-4", [])):
        assert search_ids(client, "/CarePlan", _id=plan,
                          **{"performing-care-level": level}) == found

    # an update re-indexes: the episode moves to the next phase
    episode = client.get(f"/EpisodeOfCare/{enrolled}").json()
    for ext in episode["extension"]:
        if ext["url"].endswith("/pathway-phase"):
            ext["valueCodeableConcept"]["coding"][0]["code"] = "nhn-inpatient"
            ext["valueCodeableConcept"]["coding"][0].pop("display", None)
    assert client.put(f"/EpisodeOfCare/{enrolled}", json=episode).status_code == 200
    assert episodes(phase="nhn-pre-inpatient") == set()
    assert episodes(phase="nhn-inpatient") == {enrolled}


def test_the_capability_statement_lists_them_with_their_definitions(
        client: httpx.Client) -> None:
    statement = client.get("/metadata").json()
    by_type = {r["type"]: {p["name"]: p for p in r.get("searchParam", [])}
               for r in statement["rest"][0]["resource"]}
    for rtype, code in (("EpisodeOfCare", "care-level"), ("EpisodeOfCare", "phase"),
                        ("EpisodeOfCare", "end-reason"),
                        ("EpisodeOfCare", "enrolling-organization"),
                        ("CarePlan", "performing-care-level"),
                        ("ServiceRequest", "escalation-criterion"),
                        ("ServiceRequest", "second-opinion-exception")):
        param = by_type[rtype][code]
        assert param["definition"] == f"{OWN}{rtype}-{code}", param
    assert by_type["EpisodeOfCare"]["enrolling-organization"]["type"] == "reference"
