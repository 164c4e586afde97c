"""A subscription hears only of what its organisation may see."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from tests.security.conftest import Secured
from tests.security.test_isolation import document_bundle
from tests.subscriptions.conftest import referral, subscription
from tests.subscriptions.receiver import Receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.down()


def _referral(secured: Secured, client_name: str, owner_org: str) -> str:
    """A patient of hospital-a and a referral Task owned by ``owner_org``; the Task's id."""
    with secured.client(client_name) as a:
        return referral(a, owner_org)[1]


def test_notifications_only_for_resources_the_subscriber_may_see(
    secured: Secured, receiver: Receiver
) -> None:
    b = secured.client("gp-b")
    try:
        made = b.post("/Subscription", json=subscription("referral-created", receiver.url))
        assert made.status_code == 201, made.text
        sid = made.json()["id"]
    finally:
        b.close()
    assert receiver.wait(lambda: len(receiver.of(sid, "handshake")) == 1)
    hidden = _referral(secured, "hospital-a", "org-c")  # no business of gp-b's organisation
    shown = _referral(secured, "hospital-a", "org-b")  # referred to gp-b's organisation
    assert receiver.wait(lambda: len(receiver.of(sid, "event-notification")) >= 1)
    time.sleep(1.0)  # give a wrongly delivered second notification the time to arrive
    notes = receiver.of(sid, "event-notification")
    focuses = [focus for note in notes for _, focus in note.events()]
    assert len(focuses) == 1, focuses
    assert focuses[0] is not None and focuses[0].endswith(f"/Task/{shown}")
    assert not any(f and f.endswith(f"/Task/{hidden}") for f in focuses)
    assert uuid.UUID(shown)


def test_status_lists_only_the_callers_subscriptions(secured: Secured,
                                                     receiver: Receiver) -> None:
    a, b = secured.client("hospital-a"), secured.client("gp-b")
    try:
        mine = b.post("/Subscription", json=subscription("referral-created", receiver.url))
        theirs = a.post("/Subscription", json=subscription("referral-created", receiver.url))
        assert mine.status_code == theirs.status_code == 201
        mine_id, theirs_id = mine.json()["id"], theirs.json()["id"]
        assert receiver.wait(lambda: len(receiver.of(mine_id, "handshake")) == 1
                             and len(receiver.of(theirs_id, "handshake")) == 1)
        listed = b.get("/Subscription/$status").json()
        ids = {e["resource"]["parameter"][0]["valueReference"]["reference"].split("/")[-1]
               for e in listed.get("entry", [])}
        assert mine_id in ids and theirs_id not in ids
        # and another organisation's subscription is as unknown as a missing one
        assert b.get(f"/Subscription/{theirs_id}/$status").status_code == 404
        assert b.get(f"/Subscription/{theirs_id}/$events").status_code == 404
    finally:
        a.close()
        b.close()


def test_subscribing_needs_the_search_scope_of_the_topics_types(
    secured: Secured, receiver: Receiver
) -> None:
    # a notification carries what a search would: the scopes must open the topic's types
    narrow = secured.client("gp-b", "system/Subscription.cruds system/Patient.rs")
    wide = secured.client("gp-b", "system/Subscription.cruds system/Task.rs")
    try:
        refused = narrow.post("/Subscription", json=subscription("referral-created",
                                                                  receiver.url))
        assert refused.status_code == 403, refused.text
        assert "Task" in refused.json()["issue"][0]["diagnostics"]
        made = wide.post("/Subscription", json=subscription("referral-created", receiver.url))
        assert made.status_code == 201, made.text
        changed = made.json() | {"end": "2099-01-01T00:00:00Z"}
        refused = narrow.put(f"/Subscription/{changed['id']}", json=changed)
        assert refused.status_code == 403, refused.text
    finally:
        narrow.close()
        wide.close()


def test_discharge_documents_reach_the_organisations_in_the_patients_care(
    secured: Secured, receiver: Receiver
) -> None:
    # a hospital sends the discharge letter as a FHIR document; the GP's organisation,
    # taking part in the patient's care, hears of it; of another patient's, it does not
    a, b = secured.client("hospital-a"), secured.client("gp-b")
    try:
        made = b.post("/Subscription", json=subscription("discharge-document-available",
                                                         receiver.url))
        assert made.status_code == 201, made.text
        sid = made.json()["id"]
        assert receiver.wait(lambda: len(receiver.of(sid, "handshake")) == 1)
        shared = a.post("/Patient", json={"resourceType": "Patient"}).json()["id"]
        other = a.post("/Patient", json={"resourceType": "Patient"}).json()["id"]
        referral = a.post("/ServiceRequest", json={
            "resourceType": "ServiceRequest", "status": "active", "intent": "order",
            "subject": {"reference": f"Patient/{shared}"},
            "requester": {"reference": "Organization/org-a"},
            "performer": [{"reference": "Organization/org-b"}]})
        assert referral.status_code == 201, referral.text
        hidden = a.post("/Bundle", json=document_bundle(other, by_entry=True))
        shown = a.post("/Bundle", json=document_bundle(shared, by_entry=True))
        assert hidden.status_code == 201 and shown.status_code == 201, shown.text
        assert receiver.wait(lambda: len(receiver.of(sid, "event-notification")) >= 1)
        time.sleep(1.0)  # give a wrongly delivered second notification the time to arrive
        focuses = [f for note in receiver.of(sid, "event-notification")
                   for _, f in note.events()]
        assert len(focuses) == 1 and focuses[0] is not None
        assert focuses[0].endswith(f"/Bundle/{shown.json()['id']}")
        assert b.get(f"/Bundle/{shown.json()['id']}").status_code == 200
    finally:
        a.close()
        b.close()
