"""The basic flow over real HTTP: handshake, active, numbered notifications."""

from __future__ import annotations

from lxml import etree  # type: ignore[import-untyped]

from tests.subscriptions.conftest import GatewayFactory, subscription
from tests.subscriptions.receiver import Receiver


def test_handshake_then_numbered_notifications(gateway: GatewayFactory,
                                               receiver: Receiver) -> None:
    gw = gateway()
    sid = gw.subscribe("encounter-discharge", receiver.url)
    assert receiver.wait(lambda: len(receiver.of(sid, "handshake")) == 1)
    gw.wait_status(sid, "active", receiver)
    first = gw.create({"resourceType": "Encounter", "status": "finished",
                       "class": {"code": "IMP"}})
    gw.create({"resourceType": "Encounter", "status": "in-progress", "class": {"code": "IMP"}})
    assert receiver.wait(lambda: receiver.event_numbers(sid) == [1])
    note = receiver.of(sid, "event-notification")[0]
    assert note.events()[0][1].endswith(f"/Encounter/{first['id']}")
    assert note.bundle["type"] == "history"
    assert note.param("events-since-subscription-start") == "1"


def test_a_subscription_sent_as_active_is_requested_until_its_handshake(
        gateway: GatewayFactory, receiver: Receiver) -> None:
    """Subscription.status: "a client can only submit subscription resources in the
    requested or off state. Only the server can move a subscription from requested
    to active" (as the backport IG's tests expect of a create's answer)."""
    gw = gateway()
    errored = gw.create(subscription("encounter-discharge", receiver.url, status="error"))
    assert errored["status"] == "requested"
    created = gw.create(subscription("encounter-discharge", receiver.url, status="active"))
    assert created["status"] == "requested"
    sid = str(created["id"])
    assert receiver.wait(lambda: len(receiver.of(sid, "handshake")) == 1)
    gw.wait_status(sid, "active", receiver)
    # the same by PUT (an update that creates)
    again = subscription("encounter-discharge", receiver.url, status="active")
    put = gw.client.put(f"/Subscription/{sid}-put", json={**again, "id": f"{sid}-put"},
                        headers={"Content-Type": "application/fhir+json"})
    assert put.status_code == 201 and put.json()["status"] == "requested", put.text
    gw.wait_status(f"{sid}-put", "active", receiver)


def test_notifications_in_fhir_xml(gateway: GatewayFactory, receiver: Receiver) -> None:
    # channel.payload application/fhir+xml: the same notification, written as FHIR XML
    gw = gateway()
    sub = subscription("encounter-discharge", receiver.url, content="full-resource")
    sub["channel"]["payload"] = "application/fhir+xml"
    sid = str(gw.create(sub)["id"])
    gw.wait_status(sid, "active", receiver)
    first = gw.create({"resourceType": "Encounter", "status": "finished",
                       "class": {"code": "IMP"}})
    assert receiver.wait(lambda: receiver.event_numbers(sid) == [1])
    note = receiver.of(sid, "event-notification")[0]
    assert note.headers["content-type"] == "application/fhir+xml"
    root = etree.fromstring(note.body)
    assert root.tag == "{http://hl7.org/fhir}Bundle"
    assert root.find("{http://hl7.org/fhir}type").get("value") == "history"
    assert note.events()[0][1].endswith(f"/Encounter/{first['id']}")
    resource = note.bundle["entry"][1]["resource"]
    assert resource["id"] == first["id"] and resource["status"] == "finished"


LOINC = "http://loinc.org"


def _referral(gw: object, patient: str, status: str = "requested",
              business: str = "2.0") -> dict:
    return {
        "resourceType": "Task", "status": status, "intent": "order",
        "focus": {"reference": "ServiceRequest/sr-1"},
        "for": {"reference": patient},
        "businessStatus": {"coding": [{"system": "urn:bser", "code": business}]},
    }


def test_every_topic_notifies_with_contiguous_event_numbers(gateway: GatewayFactory,
                                                            receiver: Receiver) -> None:
    gw = gateway()
    topics = ["referral-created", "referral-status-changed", "encounter-discharge",
              "discharge-document-available", "handoff-overdue", "episode-status-changed"]
    subs = {t: gw.subscribe(t, receiver.url, heartbeat=1) for t in topics}
    for sid in subs.values():
        gw.wait_status(sid, "active", receiver)
    patient = f"Patient/{gw.create({'resourceType': 'Patient'})['id']}"

    # referral-created (2), referral-status-changed (2), handoff-overdue (1)
    task = gw.create(_referral(gw, patient))
    gw.create({"resourceType": "Task", "status": "requested", "intent": "order",
               "for": {"reference": patient}})  # no ServiceRequest focus: not a referral
    task2 = gw.create(_referral(gw, patient))
    task["businessStatus"] = {"coding": [{"system": "urn:bser", "code": "3.0"}]}
    task = gw.update(task)  # businessStatus changed
    task = gw.update(task)  # nothing changed: no event
    task["status"] = "accepted"
    task = gw.update(task)  # status changed
    task2["businessStatus"] = {"coding": [{
        "system": "https://carepath-gateway.org/fhir/CodeSystem/handoff-business-status",
        "code": "overdue"}]}
    gw.update(task2)  # referral-status-changed #3 and handoff-overdue #1

    # encounter-discharge (2)
    enc = gw.create({"resourceType": "Encounter", "status": "in-progress",
                     "class": {"code": "IMP"}, "subject": {"reference": patient}})
    enc["status"] = "finished"
    gw.update(enc)
    gw.update(enc)  # still finished: no event
    gw.create({"resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"}})

    # discharge-document-available (3): Composition, DocumentReference, document Bundle
    discharge = {"coding": [{"system": LOINC, "code": "18842-5"}]}
    comp = gw.create({"resourceType": "Composition", "status": "preliminary", "type": discharge,
                      "date": "2026-11-23", "title": "Entlassbrief",
                      "author": [{"display": "Dr. A"}], "subject": {"reference": patient}})
    comp["status"] = "final"
    gw.update(comp)
    gw.create({"resourceType": "DocumentReference", "status": "current", "type": discharge,
               "content": [{"attachment": {"contentType": "application/pdf"}}]})
    gw.create({"resourceType": "DocumentReference", "status": "current",
               "type": {"coding": [{"system": LOINC, "code": "11488-4"}]},
               "content": [{"attachment": {"contentType": "application/pdf"}}]})  # not discharge
    gw.create({"resourceType": "Bundle", "type": "document",
               "identifier": {"system": "urn:ietf:rfc:3986", "value": "urn:uuid:1"},
               "timestamp": "2026-11-23T10:00:00Z",
               "entry": [{"fullUrl": "urn:uuid:c1", "resource": {
                   "resourceType": "Composition", "status": "final", "type": discharge,
                   "date": "2026-11-23", "title": "Entlassbrief",
                   "author": [{"display": "Dr. A"}]}}]})

    # episode-status-changed (2)
    episode = gw.create({"resourceType": "EpisodeOfCare", "status": "planned",
                         "patient": {"reference": patient}})
    episode["status"] = "active"
    gw.update(episode)
    gw.update(episode)  # unchanged

    expected = {"referral-created": 2, "referral-status-changed": 3, "handoff-overdue": 1,
                "encounter-discharge": 2, "discharge-document-available": 3,
                "episode-status-changed": 2}
    for topic, n in expected.items():
        sid = subs[topic]
        assert receiver.wait(lambda sid=sid, n=n: len(receiver.event_numbers(sid)) >= n), topic
    import time

    time.sleep(1.5)  # late duplicates or extra events would show now; heartbeats too
    for topic, n in expected.items():
        assert receiver.event_numbers(subs[topic]) == list(range(1, n + 1)), topic
        assert receiver.of(subs[topic], "heartbeat"), f"{topic}: no heartbeat"
        beat = receiver.of(subs[topic], "heartbeat")[-1]
        assert beat.param("events-since-subscription-start") == str(n)
        assert beat.param("status") == "active"
