"""Topics as data, filters, notification Bundles and Subscription parsing (no I/O)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.fhir.outcome import Code
from gateway.settings import Settings
from gateway.subscriptions.endpoint import EndpointPolicy
from gateway.subscriptions.filters import EventValues, FilterError, accepts, parse_filter
from gateway.subscriptions.notification import NotificationEvent, notification
from gateway.subscriptions.subscription import parse_subscription
from gateway.subscriptions.topics import TopicRegistry
from tests.subscriptions.conftest import TOPIC, subscription

TOPICS = TopicRegistry.load()


def test_the_six_topics_load_with_canonical_urls() -> None:
    assert [u.rsplit("/", 1)[-1] for u in TOPICS.canonicals] == [
        "discharge-document-available", "encounter-discharge", "episode-status-changed",
        "handoff-overdue", "referral-created", "referral-status-changed"]
    assert TOPICS.get(TOPIC + "encounter-discharge|1.0.0") is not None
    assert TOPICS.get(TOPIC + "encounter-discharge|9.9") is None
    assert {t.url.rsplit("/", 1)[-1] for t in TOPICS.for_type("Task")} == {
        "referral-created", "referral-status-changed", "handoff-overdue"}


def fires(topic: str, rt: str, interaction: str, previous: Any, current: Any) -> bool:
    found = TOPICS.get(TOPIC + topic)
    assert found is not None
    return found.fires(rt, interaction, previous, current)


ENC = {"resourceType": "Encounter", "class": {"code": "IMP"}}


@pytest.mark.parametrize(("interaction", "before", "after", "expected"), [
    ("create", None, "finished", True),
    ("create", None, "in-progress", False),
    ("update", "in-progress", "finished", True),
    ("update", "finished", "finished", False),
    ("update", "finished", "entered-in-error", False),
])
def test_encounter_discharge_fires_on_the_transition_to_finished(
    interaction: str, before: str | None, after: str, expected: bool,
) -> None:
    previous = {**ENC, "status": before} if before else None
    assert fires("encounter-discharge", "Encounter", interaction, previous,
                 {**ENC, "status": after}) is expected


def test_referral_status_changed_sees_status_and_business_status() -> None:
    task = {"resourceType": "Task", "status": "requested", "intent": "order",
            "focus": {"reference": "ServiceRequest/1"}}
    accepted = {**task, "businessStatus": {"coding": [{"code": "3.0"}]}}
    assert fires("referral-status-changed", "Task", "update", task, accepted)
    assert fires("referral-status-changed", "Task", "update", task, {**task, "status": "ready"})
    assert not fires("referral-status-changed", "Task", "update", accepted, dict(accepted))
    assert not fires("referral-status-changed", "Task", "create", None, accepted)
    plain = {k: v for k, v in task.items() if k != "focus"}
    assert not fires("referral-status-changed", "Task", "update", plain,
                     {**plain, "status": "ready"})


def test_filters_parse_against_the_topic_and_match_per_event() -> None:
    topic = TOPICS.get(TOPIC + "referral-created")
    assert topic is not None
    criteria = parse_filter("Task?patient=Patient/1&care-level=https://carepath-gateway.org/"
                            "fhir/CodeSystem/care-level|level-2", topic)
    task = {"resourceType": "Task", "for": {"reference": "Patient/1/_history/2"},
            "performerType": [{"coding": [{"system": "https://carepath-gateway.org/fhir/"
                                                     "CodeSystem/care-level",
                                        "code": "level-2"}]}]}
    assert accepts(topic, criteria, "Task", EventValues(task))
    other = {**task, "for": {"reference": "Patient/2"}}
    assert not accepts(topic, criteria, "Task", EventValues(other))
    # Patient/1 of another server is not this server's Patient/1; its url matches it
    elsewhere = {**task, "for": {"reference": "http://x/fhir/Patient/1"}}
    assert not accepts(topic, criteria, "Task", EventValues(elsewhere))
    by_url = parse_filter("Task?patient=http://x/fhir/Patient/1", topic)
    assert accepts(topic, by_url, "Task", EventValues(elsewhere))
    assert not accepts(topic, by_url, "Task", EventValues(task))
    # this server's own absolute URL (the one notifications use) names its Patient/1
    own = parse_filter("Task?patient=http://gw.example/fhir/Patient/1", topic,
                       "http://gw.example/fhir/")
    assert accepts(topic, own, "Task", EventValues(task))
    assert not accepts(topic, own, "Task", EventValues(elsewhere))
    by_id = parse_filter("Task?patient=1", topic)
    assert accepts(topic, by_id, "Task", EventValues(task))
    assert not accepts(topic, by_id, "Task", EventValues(elsewhere))
    assert accepts(topic, parse_filter("patient=Patient/2,Patient/1", topic), "Task",
                   EventValues(task))
    assert accepts(topic, parse_filter("organization=Organization/o", topic), "Task",
                   EventValues({**task, "requester": {"reference": "Organization/o"}}))
    for bad in ("Encounter?patient=Patient/1", "Task?colour=red", "Task?patient:missing=true",
                "Task?patient="):
        with pytest.raises(FilterError):
            parse_filter(bad, topic)


POLICY = EndpointPolicy(dev_mode=False)
SETTINGS = Settings(dev_mode=False)


def codes(resource: dict[str, Any]) -> list[str]:
    config, issues = parse_subscription(resource, TOPICS, POLICY, SETTINGS)
    assert (config is None) == bool(issues)
    return [i.code.gw for i in issues]


def test_subscription_parsing_reports_each_problem_with_its_code() -> None:
    good = subscription("encounter-discharge", "https://93.184.216.34/hook",
                        filters=("Encounter?patient=Patient/1",), heartbeat=60, timeout=5,
                        max_count=10, secret="s" * 20, headers=("Authorization: Bearer x",))
    config, issues = parse_subscription(good, TOPICS, POLICY, SETTINGS)
    assert issues == [] and config is not None
    assert (config.heartbeat, config.timeout, config.max_count, config.content) == (
        60, 5, 10, "id-only")
    assert config.headers == (("Authorization", "Bearer x"),)
    assert codes(subscription("no-such-topic", "https://93.184.216.34/")) == [
        Code.UNKNOWN_TOPIC.gw]
    assert codes(subscription("encounter-discharge", "https://93.184.216.34/",
                              filters=("Encounter?colour=red",))) == [Code.INVALID_FILTER.gw]
    assert codes(subscription("encounter-discharge", "https://169.254.169.254/")) == [
        Code.ENDPOINT_REFUSED.gw]
    assert codes(subscription("encounter-discharge", "https://10.0.0.1/")) == [
        Code.ENDPOINT_REFUSED.gw]
    assert codes(subscription("encounter-discharge", "https://93.184.216.34/",
                              channel="email")) == [Code.UNSUPPORTED_CHANNEL.gw]
    assert codes(subscription("encounter-discharge", "https://93.184.216.34/",
                              content="everything")) == [Code.UNSUPPORTED_PAYLOAD.gw]
    assert codes(subscription("encounter-discharge", "https://93.184.216.34/",
                              secret="short")) == [Code.INVALID_SUBSCRIPTION.gw]
    assert codes(subscription("encounter-discharge", "https://93.184.216.34/",
                              headers=("Host: evil",))) == [Code.INVALID_SUBSCRIPTION.gw]
    for timeout in (3600, 0):  # (0 is a timeout asked for, not the default)
        assert codes(subscription("encounter-discharge", "https://93.184.216.34/",
                                  timeout=timeout)) == [Code.INVALID_SUBSCRIPTION.gw], timeout


def test_notification_bundles_follow_the_r4_backport_shape_and_are_deterministic() -> None:
    events = [NotificationEvent(7, 1_700_000_000_000_000, "Encounter", "e1", 2, "update")]
    stored = {("Encounter", "e1", 2): b'{"resourceType":"Encounter","id":"e1"}'}

    def build() -> dict[str, Any]:
        bundle = notification(base="https://gw/fhir", subscription_id="s1",
                              topic=TOPIC + "encounter-discharge", status="active",
                              type_="event-notification", events_since_start=7, events=events,
                              content="full-resource", contents=stored)
        return dict(orjson.loads(orjson.dumps(bundle)))

    bundle = build()
    assert bundle == build()
    assert bundle["type"] == "history"
    status = bundle["entry"][0]["resource"]
    assert status["resourceType"] == "Parameters"
    names = [p["name"] for p in status["parameter"]]
    assert names == ["subscription", "topic", "status", "type",
                     "events-since-subscription-start", "notification-event"]
    parts = {p["name"]: p for p in status["parameter"][-1]["part"]}
    assert parts["event-number"]["valueString"] == "7"
    assert parts["focus"]["valueReference"]["reference"] == "https://gw/fhir/Encounter/e1"
    assert bundle["entry"][1]["resource"] == {"resourceType": "Encounter", "id": "e1"}
    assert bundle["entry"][1]["request"] == {"method": "PUT", "url": "Encounter/e1"}
    empty = notification(base="https://gw/fhir", subscription_id="s1", topic="t",
                         status="active", type_="event-notification", events_since_start=7,
                         events=events, content="empty")
    assert len(empty["entry"]) == 1
    assert "focus" not in orjson.dumps(empty).decode()


def test_a_code_filters_with_the_system_its_binding_implies() -> None:
    """``Task?status=http://hl7.org/fhir/task-status|accepted`` matches as the same
    search does: the system of a ``code`` is implied by its required binding."""
    from gateway.main import registry

    topics = TopicRegistry.load(implied=registry().indexer.implied_system)
    topic = topics.get(TOPIC + "referral-status-changed")
    assert topic is not None
    task = {"resourceType": "Task", "status": "accepted"}
    for wanted, matches in [("http://hl7.org/fhir/task-status|accepted", True),
                            ("accepted", True),
                            ("http://hl7.org/fhir/task-status|", True),
                            ("http://hl7.org/fhir/task-status|rejected", False),
                            ("http://example.org/other|accepted", False),
                            ("|accepted", False)]:
        criteria = parse_filter(f"Task?status={wanted}", topic)
        assert accepts(topic, criteria, "Task", EventValues(task)) is matches, wanted
