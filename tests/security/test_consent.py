"""Consent and participation decide which organisation may see a patient (both backends)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gateway.fhir.search import parse_search
from gateway.main import registry
from gateway.security.policy import AccessPolicy, PolicyIndexer, load_rules
from gateway.security.principal import Principal
from gateway.security.scopes import Grant
from gateway.storage.interface import StoreTransaction
from gateway.storage.sql import SqlStore
from tests.conftest import sql_store

POLICY = AccessPolicy(load_rules("DE"), registry().indexer)


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqlStore]:
    indexer = PolicyIndexer(registry().indexer, POLICY)
    async with sql_store(request.param, tmp_path, indexer) as s:
        yield s


async def put(store: SqlStore, resource: dict[str, Any], creator: str | None = None) -> str:
    rid = resource.get("id") or str(uuid.uuid4())

    async def work(tx: StoreTransaction) -> None:
        current = await tx.current(resource["resourceType"], rid)
        await tx.put(resource["resourceType"], rid, dict(resource), "PUT", current,
                     creator=creator)

    await store.run(work)
    return rid


def principal(org: str, purpose: str = "TREAT") -> Principal:
    return Principal(f"client-{org}", org, Grant.everything(), purpose_of_use=purpose)


async def accessible(store: SqlStore, pid: str, org: str, *, nl: bool = False,
                     purpose: str = "TREAT") -> bool:
    policy = AccessPolicy(load_rules("NL" if nl else "DE"), registry().indexer)
    r = policy.restriction(principal(org, purpose))
    assert r is not None
    return pid in await store.accessible([pid], r)


async def patient_in_care_of(store: SqlStore, *orgs: str) -> str:
    pid = await put(store, {"resourceType": "Patient"})
    for org in orgs:
        await put(store, {"resourceType": "EpisodeOfCare", "status": "active",
                          "patient": {"reference": f"Patient/{pid}"},
                          "managingOrganization": {"reference": f"Organization/{org}"}})
    return pid


def consent(pid: str, provision: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "Consent", "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                              "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{pid}"}, **extra}
    if provision is not None:
        body["provision"] = provision
    return body


async def test_participation_decides_without_consent_in_de(store: SqlStore) -> None:
    pid = await patient_in_care_of(store, "org-a")
    assert await accessible(store, pid, "org-a")
    assert not await accessible(store, pid, "org-b")
    # a referral makes the performer a participant
    await put(store, {"resourceType": "ServiceRequest", "status": "active", "intent": "order",
                      "subject": {"reference": f"Patient/{pid}"},
                      "performer": [{"reference": "Organization/org-b"}]})
    assert await accessible(store, pid, "org-b")


async def test_practitioner_role_counts_for_its_organisation(store: SqlStore) -> None:
    pid = await put(store, {"resourceType": "Patient"})
    role = await put(store, {"resourceType": "PractitionerRole",
                             "organization": {"reference": "Organization/org-r"}})
    await put(store, {"resourceType": "Task", "status": "requested", "intent": "order",
                      "for": {"reference": f"Patient/{pid}"},
                      "owner": {"reference": f"PractitionerRole/{role}"}})
    assert await accessible(store, pid, "org-r")


async def test_creator_takes_part(store: SqlStore) -> None:
    pid = await put(store, {"resourceType": "Patient"}, creator="org-c")
    assert await accessible(store, pid, "org-c")
    assert not await accessible(store, pid, "org-d")


async def test_objection_wins_in_de(store: SqlStore) -> None:
    pid = await patient_in_care_of(store, "org-a", "org-b")
    cid = await put(store, consent(pid, {"type": "permit", "provision": [
        {"type": "deny", "actor": [{"role": {"text": "recipient"},
                                    "reference": {"reference": "Organization/org-b"}}]}]}))
    assert await accessible(store, pid, "org-a")
    assert not await accessible(store, pid, "org-b")
    # withdrawing the consent resource (inactive) lifts the objection
    await put(store, {**consent(pid), "id": cid, "status": "inactive"})
    assert await accessible(store, pid, "org-b")


async def test_nl_requires_opt_in(store: SqlStore) -> None:
    pid = await patient_in_care_of(store, "org-a")
    assert not await accessible(store, pid, "org-a", nl=True)
    await put(store, consent(pid, policyRule={"coding": [{
        "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]}))
    assert await accessible(store, pid, "org-a", nl=True)
    # consent does not make a non-participant a participant
    assert not await accessible(store, pid, "org-z", nl=True)


async def test_what_a_patient_without_permission_is_named_in_stays_hidden(
    store: SqlStore,
) -> None:
    # the compartment check asks "is this patient accessible?" under a NOT: where
    # consent is required and no consent row exists, the answer must be a no, never
    # an unknown that the NOT would turn into a yes
    pid = await patient_in_care_of(store, "org-a")
    obs = await put(store, {"resourceType": "Observation", "status": "final",
                            "code": {"text": "x"}, "subject": {"reference": f"Patient/{pid}"}})
    query = parse_search("Observation", [("subject", f"Patient/{pid}")],
                         registry().search_params)

    async def sees(nl: bool) -> tuple[bool, bool, bool]:
        policy = AccessPolicy(load_rules("NL" if nl else "DE"), registry().indexer)
        r = policy.restriction(principal("org-a"))
        assert r is not None
        read = bool(await store.visible([("Observation", obs)], r))
        found = ("Observation", obs) in await store.search_keys(query, 10, r)
        patient = bool(await store.visible([("Patient", pid)], r))
        return read, found, patient

    assert await sees(nl=False) == (True, True, True)  # DE: participation suffices
    assert await sees(nl=True) == (False, False, False)  # NL: no opt-in yet
    await put(store, consent(pid, policyRule={"coding": [{
        "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]}))
    assert await sees(nl=True) == (True, True, True)


async def test_consent_limited_by_purpose_and_period(store: SqlStore) -> None:
    pid = await patient_in_care_of(store, "org-a")
    await put(store, consent(pid, {"type": "permit", "purpose": [{
        "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "TREAT"}]}))
    assert await accessible(store, pid, "org-a", nl=True, purpose="TREAT")
    assert not await accessible(store, pid, "org-a", nl=True, purpose="HRESCH")
    old = await patient_in_care_of(store, "org-a")
    await put(store, consent(old, {"type": "permit",
                                   "period": {"start": "2020-01-01", "end": "2020-12-31"}}))
    assert not await accessible(store, old, "org-a", nl=True)


def test_unknown_jurisdiction_is_refused() -> None:
    with pytest.raises(ValueError, match="jurisdiction"):
        load_rules("XX")
    rules = load_rules("NL")
    assert rules.consent_required and not replace(rules, consent_required=False).consent_required


def test_patients_in_stored_bytes() -> None:
    """The patients a stored resource belongs to; bytes are parsed only when needed."""
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
           "subject": {"reference": "Patient/p1"},
           "performer": [{"reference": "Patient/p2"}, {"reference": "Practitioner/d1"}]}
    assert POLICY.patients_in("Observation", "o1", json.dumps(obs).encode()) == {"p1", "p2"}
    assert POLICY.patients_in("Observation", "o1", json.dumps(obs).encode()) == \
        POLICY.patients_of(obs)
    # a Patient of another server is not one of ours
    elsewhere = {**obs, "performer": [{"reference": "http://other.org/fhir/Patient/p1"}]}
    assert POLICY.patients_of(elsewhere) == {"p1"}  # the subject still is
    assert POLICY.patients_of({**elsewhere, "subject": {"reference": "http://o/fhir/Patient/p1"}}
                              ) == set()
    # a Patient is its own; a type outside the compartment has none: no parse of either
    assert POLICY.patients_in("Patient", "p9", b"not json") == {"p9"}
    assert POLICY.patients_in("Organization", "o1", b"not json") == set()
