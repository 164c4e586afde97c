"""The Subscription operations give a caller only what its own token may see (both backends).

Scopes are checked when a Subscription is written, for whoever writes it; a
colleague of the same organisation reads, replays and binds it with a token of
its own, and the access to what an event names may have closed since.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.security.conftest import Secured, secured  # noqa: F401  (the same server here)
from tests.subscriptions.conftest import referral, subscription
from tests.subscriptions.receiver import Receiver

#: a colleague's token: Subscriptions, but not the Tasks the referral topic delivers
NARROW = "system/Subscription.cruds system/Patient.rs"
DENY_B = {"type": "deny", "actor": [{
    "role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                         "code": "PRCP"}]},
    "reference": {"reference": "Organization/org-b"}}]}


@pytest.fixture
def clients(secured: Secured) -> Iterator[dict[str, httpx.Client]]:  # noqa: F811
    made = {"a": secured.client("hospital-a"), "b": secured.client("gp-b"),
            "narrow": secured.client("hospital-a", NARROW)}
    yield made
    for c in made.values():
        c.close()


def _subscribed(client: httpx.Client, receiver: Receiver, **kw: Any) -> str:
    made = client.post("/Subscription", json=subscription("referral-created", receiver.url,
                                                          content="full-resource", **kw))
    assert made.status_code == 201, made.text
    sid = str(made.json()["id"])
    assert receiver.wait(lambda: len(receiver.of(sid, "handshake")) == 1)
    return sid


def _focuses(bundle: dict[str, Any]) -> list[str]:
    return [e["fullUrl"] for e in bundle["entry"][1:]]


def test_operations_need_the_scopes_of_the_topics_types(
    clients: dict[str, httpx.Client], receiver: Receiver
) -> None:
    a, narrow = clients["a"], clients["narrow"]
    sid = _subscribed(a, receiver)
    _, task = referral(a, "org-b")
    assert receiver.wait(lambda: len(receiver.of(sid, "event-notification")) >= 1)
    replayed = a.get(f"/Subscription/{sid}/$events")
    assert replayed.status_code == 200, replayed.text
    assert any(f.endswith(f"/Task/{task}") for f in _focuses(replayed.json()))
    # the colleague may read the Subscription, not the Tasks it delivers
    assert narrow.get(f"/Subscription/{sid}").status_code == 200
    assert narrow.get(f"/Task/{task}").status_code == 403
    for refused in (
        narrow.get(f"/Subscription/{sid}/$events"),
        narrow.get(f"/Subscription/{sid}/$events?content=full-resource"),
        narrow.post(f"/Subscription/{sid}/$resend", json={
            "resourceType": "Parameters",
            "parameter": [{"name": "eventsSinceNumber", "valueString": "1"}]}),
    ):
        assert refused.status_code == 403, refused.text
        assert "Task" in refused.json()["issue"][0]["diagnostics"]
    assert narrow.get(f"/Subscription/{sid}/$status").status_code == 200


def test_websocket_tokens_need_the_scopes_and_the_subscription(
    clients: dict[str, httpx.Client],
) -> None:
    a, b, narrow = clients["a"], clients["b"], clients["narrow"]
    made = a.post("/Subscription", json=subscription("referral-created", None,
                                                     channel="websocket",
                                                     content="full-resource"))
    assert made.status_code == 201, made.text
    sid = made.json()["id"]
    assert a.get(f"/Subscription/{sid}/$get-ws-binding-token").status_code == 200
    # whoever binds the token hears the topic's resources: the caller's scopes must open them
    for refused in (narrow.get(f"/Subscription/{sid}/$get-ws-binding-token"),
                    narrow.get(f"/Subscription/$get-ws-binding-token?id={sid}")):
        assert refused.status_code == 403, refused.text
    # by id at type level, another organisation's subscription is as unknown as a missing one
    assert b.get(f"/Subscription/{sid}/$get-ws-binding-token").status_code == 404
    assert b.get(f"/Subscription/$get-ws-binding-token?id={sid}").status_code == 404


def test_events_replay_only_what_the_caller_may_see_now(
    clients: dict[str, httpx.Client], receiver: Receiver
) -> None:
    a, b = clients["a"], clients["b"]
    sid = _subscribed(b, receiver)
    pid, closed = referral(a, "org-b")
    _, kept = referral(a, "org-b")
    assert receiver.wait(lambda: len(receiver.of(sid, "event-notification")) >= 1
                         and len([f for n in receiver.of(sid, "event-notification")
                                  for f in n.events()]) == 2)
    before = b.get(f"/Subscription/{sid}/$events?content=full-resource").json()
    assert sorted(f.rsplit("/", 1)[1] for f in _focuses(before)) == sorted([closed, kept])
    # the patient objects to org-b: its Task is no longer org-b's to see, nor to replay
    objection = a.post("/Consent", json={
        "resourceType": "Consent", "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                              "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{pid}"},
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                   "code": "OPTIN"}]},
        "provision": DENY_B})
    assert objection.status_code == 201, objection.text
    assert b.get(f"/Task/{closed}").status_code == 404
    for content in ("full-resource", "id-only"):
        after = b.get(f"/Subscription/{sid}/$events?content={content}")
        assert after.status_code == 200, after.text
        body = after.json()
        assert [f.rsplit("/", 1)[1] for f in _focuses(body)] == [kept]
        assert closed not in after.text
        if content == "full-resource":
            assert body["entry"][1]["resource"]["id"] == kept
    # the subscription's own count still tells how many events there were
    status = b.get(f"/Subscription/{sid}/$status").json()["entry"][0]["resource"]
    count = {p["name"]: p.get("valueString") for p in status["parameter"]}
    assert count["events-since-subscription-start"] == "2"
