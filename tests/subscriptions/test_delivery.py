"""Delivery over real HTTP: operations, retries, errors, safety, signatures, websockets."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from typing import Any

import pytest
import websockets
from prometheus_client import REGISTRY

from gateway.subscriptions import operations
from tests.subscriptions.conftest import TOPIC, GatewayFactory, subscription
from tests.subscriptions.receiver import Receiver


def discharge(gw: Any, patient: str | None = None) -> str:
    body: dict[str, Any] = {"resourceType": "Encounter", "status": "finished",
                            "class": {"code": "IMP"}}
    if patient:
        body["subject"] = {"reference": patient}
    return str(gw.create(body)["id"])


def test_status_events_and_resend(gateway: GatewayFactory, receiver: Receiver,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    gw = gateway()
    sid = gw.subscribe("encounter-discharge", receiver.url, content="full-resource")
    gw.wait_status(sid, "active", receiver)
    ids = [discharge(gw) for _ in range(5)]
    assert receiver.wait(lambda: receiver.event_numbers(sid) == [1, 2, 3, 4, 5])

    status = gw.read(f"/Subscription/{sid}/$status")
    assert status["type"] == "searchset"
    params = {p["name"]: p for p in status["entry"][0]["resource"]["parameter"]}
    assert params["type"]["valueCode"] == "query-status"
    assert params["status"]["valueCode"] == "active"
    assert params["events-since-subscription-start"]["valueString"] == "5"
    everything = gw.read(f"/Subscription/$status?id={sid}")
    assert everything["total"] == 1
    none = gw.read("/Subscription/$status?status=off")  # an empty array is not FHIR JSON
    assert none["total"] == 0 and "entry" not in none

    # $events: the same notification-event parts and entries as delivered
    replay = gw.read(f"/Subscription/{sid}/$events?eventsSinceNumber=2&eventsUntilNumber=4")
    # (deliveries may carry several events each: compare event by event)
    delivered_parts, delivered_entries = {}, {}
    for got in receiver.of(sid, "event-notification"):
        parts = [p for p in got.status["parameter"] if p["name"] == "notification-event"]
        for part, entry in zip(parts, got.bundle["entry"][1:], strict=True):
            number = int(part["part"][0]["valueString"])
            delivered_parts[number], delivered_entries[number] = part, entry
    replayed_parts = [p for p in replay["entry"][0]["resource"]["parameter"]
                      if p["name"] == "notification-event"]
    assert replayed_parts == [delivered_parts[n] for n in (2, 3, 4)]
    assert replay["entry"][1:] == [delivered_entries[n] for n in (2, 3, 4)]
    assert [e["resource"]["id"] for e in replay["entry"][1:]] == ids[1:4]
    params = {p["name"]: p for p in replay["entry"][0]["resource"]["parameter"]}
    assert params["type"]["valueCode"] == "query-event"

    bad = gw.client.get(f"/Subscription/{sid}/$events?eventsSinceNumber=9&eventsUntilNumber=3")
    assert bad.status_code == 400
    assert bad.json()["issue"][0]["details"]["coding"][0]["code"] == "GW-4407"

    def replayed(query: str) -> list[int]:
        bundle = gw.read(f"/Subscription/{sid}/$events?{query}")
        return [int(p["part"][0]["valueString"])
                for p in bundle["entry"][0]["resource"]["parameter"]
                if p["name"] == "notification-event"]

    # 0 is a number, not "not given"; after the last event: up to date, nothing new
    assert replayed("eventsSinceNumber=0&eventsUntilNumber=2") == [1, 2]
    assert replayed("eventsUntilNumber=0") == []
    assert replayed("eventsSinceNumber=6") == []
    # "from here on" with more than a call gives: the first of them, the client asks on;
    # a range named at both ends stays refused whole
    monkeypatch.setattr(operations, "MAX_EVENTS", 2)
    assert replayed("eventsSinceNumber=2") == [2, 3]
    assert replayed("eventsSinceNumber=4") == [4, 5]
    too_many = gw.client.get(f"/Subscription/{sid}/$events?eventsSinceNumber=1"
                             "&eventsUntilNumber=5")
    assert too_many.status_code == 400, too_many.text
    monkeypatch.undo()
    assert replayed("eventsSinceNumber=4&eventsUntilNumber=99") == [4, 5]
    assert gw.client.get(f"/Subscription/{sid}/$events?eventsSinceNumber=-1").status_code \
        == 400

    # $resend: events 2..3 arrive again, with their numbers
    resent = gw.client.post(f"/Subscription/{sid}/$resend", json={
        "resourceType": "Parameters", "parameter": [
            {"name": "eventsSinceNumber", "valueString": "2"},
            {"name": "eventsUntilNumber", "valueString": "3"}]})
    assert resent.status_code == 200, resent.text
    assert receiver.wait(lambda: receiver.event_numbers(sid) == [1, 2, 3, 4, 5, 2, 3])


def test_filters_narrow_what_a_subscriber_gets(gateway: GatewayFactory,
                                               receiver: Receiver) -> None:
    gw = gateway()
    mine = gw.subscribe("encounter-discharge", receiver.url,
                        filters=("Encounter?patient=Patient/p-mine",))
    everything = gw.subscribe("encounter-discharge", receiver.url)
    # the patient named by the absolute URL the notifications' focus uses
    own = gw.running.settings.own_base
    by_url = gw.subscribe("encounter-discharge", receiver.url,
                          filters=(f"Encounter?patient={own}/Patient/p-mine",))
    for sid in (mine, everything, by_url):
        gw.wait_status(sid, "active", receiver)
    discharge(gw, "Patient/p-other")
    wanted = discharge(gw, "Patient/p-mine")
    discharge(gw, "Patient/p-other")
    assert receiver.wait(lambda: len(receiver.event_numbers(everything)) == 3)
    assert receiver.wait(lambda: receiver.event_numbers(mine) == [1])
    assert receiver.wait(lambda: receiver.event_numbers(by_url) == [1])
    assert receiver.of(mine, "event-notification")[0].events()[0][1].endswith(wanted)
    assert receiver.of(by_url, "event-notification")[0].events()[0][1] == \
        f"{own}/Encounter/{wanted}"


def test_signature_headers_and_empty_payload(gateway: GatewayFactory,
                                             receiver: Receiver) -> None:
    gw = gateway()
    secret = "a-long-enough-shared-secret"
    sid = gw.subscribe("encounter-discharge", receiver.url, content="empty", secret=secret,
                       headers=("Authorization: Bearer subscriber-token",))
    gw.wait_status(sid, "active", receiver)
    discharge(gw)
    assert receiver.wait(lambda: receiver.event_numbers(sid) == [1])
    got = receiver.of(sid, "event-notification")[0]
    expected = "sha256=" + hmac.new(secret.encode(), got.body, hashlib.sha256).hexdigest()
    assert got.headers["x-carepath-signature"] == expected
    assert got.headers["authorization"] == "Bearer subscriber-token"
    assert got.headers["content-type"] == "application/fhir+json"
    assert len(got.bundle["entry"]) == 1 and got.events() == [(1, None)]
    assert got.param("topic") is None  # empty: no topic, no focus


def test_failures_are_retried_in_order_and_a_redirect_is_never_followed(
    gateway: GatewayFactory, receiver: Receiver,
) -> None:
    gw = gateway()
    sid = gw.subscribe("encounter-discharge", receiver.url)
    gw.wait_status(sid, "active", receiver)

    def sent(outcome: str) -> float:  # the gateway runs in this process: its registry
        return REGISTRY.get_sample_value("carepath_notifications_total", {
            "channel": "rest-hook", "outcome": outcome}) or 0.0

    failed, delivered = sent("failed"), sent("delivered")
    answers = iter([500, 302, 503])
    receiver.answer = lambda got: next(answers, 200) if got.type != "handshake" else 200
    for _ in range(3):
        discharge(gw)
    assert receiver.wait(lambda: receiver.event_numbers(sid) == [1, 2, 3])
    status = gw.read(f"/Subscription/{sid}")
    assert status["status"] == "active"
    # /metrics counts the three refused notifications and those that got through
    assert sent("failed") - failed >= 3 and sent("delivered") - delivered >= 1


def test_retry_period_exhausted_turns_error_and_reactivation_delivers_the_backlog(
    gateway: GatewayFactory, receiver: Receiver,
) -> None:
    gw = gateway(subscription_retry_period=1)
    sid = gw.subscribe("encounter-discharge", receiver.url)
    gw.wait_status(sid, "active", receiver)
    receiver.status = 500
    discharge(gw)
    errored = gw.wait_status(sid, "error", receiver)
    assert "HTTP 500" in errored["error"]
    discharge(gw)  # still numbered while in error
    receiver.status = 200
    errored["status"] = "requested"  # the subscriber asks for reactivation
    gw.update(errored)
    assert receiver.wait(lambda: receiver.event_numbers(sid) == [1, 2])
    assert len(receiver.of(sid, "handshake")) == 2
    active = gw.wait_status(sid, "active", receiver)
    assert "error" not in active


def test_a_failed_handshake_is_an_error_with_its_reason(gateway: GatewayFactory,
                                                      receiver: Receiver) -> None:
    gw = gateway()
    receiver.status = 404
    sid = gw.subscribe("encounter-discharge", receiver.url)
    errored = gw.wait_status(sid, "error", receiver)
    assert "handshake" in errored["error"] and "404" in errored["error"]


def test_a_slow_subscriber_does_not_hold_up_others(gateway: GatewayFactory,
                                                   receiver: Receiver) -> None:
    slow = Receiver(delay=3.0)
    try:
        gw = gateway()
        slow_sid = gw.subscribe("encounter-discharge", slow.url, timeout=10)
        fast_sid = gw.subscribe("encounter-discharge", receiver.url)
        gw.wait_status(fast_sid, "active", receiver)
        slow.wait(lambda: bool(slow.of(slow_sid, "handshake")))
        started = time.monotonic()
        for _ in range(3):
            discharge(gw)
        assert receiver.wait(lambda: receiver.event_numbers(fast_sid) == [1, 2, 3])
        assert time.monotonic() - started < 2.5
    finally:
        slow.down()


def test_production_mode_refuses_unsafe_endpoints_at_creation(gateway: GatewayFactory) -> None:
    gw = gateway(dev_mode=False)
    for endpoint, expect in [("https://169.254.169.254/latest/meta-data/", "metadata"),
                             ("https://10.0.0.1/hook", "private"),
                             ("http://127.0.0.1:9/hook", "https"),
                             ("https://127.0.0.1:9/hook", "loopback")]:
        response = gw.client.post("/Subscription",
                                  json=subscription("encounter-discharge", endpoint))
        assert response.status_code == 422, response.text
        issues = response.json()["issue"]
        codes = [i["details"]["coding"][0]["code"] for i in issues]
        assert "GW-4404" in codes, codes
        assert any(expect in (i.get("diagnostics") or "") for i in issues)
    unknown = gw.client.post("/Subscription",
                             json=subscription("no-topic", "https://93.184.216.34/hook"))
    assert unknown.status_code == 422


def test_capability_statement_advertises_topics_and_operations(gateway: GatewayFactory) -> None:
    gw = gateway()
    statement = gw.read("/metadata")
    sub = next(r for r in statement["rest"][0]["resource"] if r["type"] == "Subscription")
    topics = sorted(e["valueCanonical"] for e in sub["extension"])
    assert TOPIC + "encounter-discharge" in topics and len(topics) == 6
    assert {o["name"] for o in sub["operation"]} >= {"status", "events", "resend",
                                                     "get-ws-binding-token"}
    ws = statement["rest"][0]["extension"][0]
    assert ws["valueUri"].endswith("/$websocket")
    # the backport IG's server statement and Subscription profile (as its tests check)
    assert statement["instantiates"] == [
        "http://hl7.org/fhir/uv/subscriptions-backport/CapabilityStatement/"
        "backport-subscription-server-r4"]
    profile = ("http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
               "backport-subscription")
    assert profile in sub["supportedProfile"]
    # a Subscription that claims it is held to it (the Subscription checks), not
    # "validated against the base definition only"
    claimed = subscription("encounter-discharge", "http://127.0.0.1:9/hook")
    checked = gw.client.post("/Subscription/$validate",
                             json={**claimed, "meta": {"profile": [profile]}})
    assert checked.status_code == 200, checked.text
    assert "GW-4211" not in checked.text


def test_websocket_channel_binds_with_a_token(gateway: GatewayFactory) -> None:
    gw = gateway()
    sub = gw.create(subscription("encounter-discharge", None, channel="websocket"))
    sid = sub["id"]
    for _ in range(50):  # the matcher registers it
        if gw.client.get(f"/Subscription/{sid}/$status").status_code == 200:
            break
        time.sleep(0.05)
    first = discharge(gw)  # before anyone listens: delivered on bind
    token = gw.read(f"/Subscription/{sid}/$get-ws-binding-token")
    params = {p["name"]: p for p in token["parameter"]}
    url = params["websocket-url"]["valueUrl"]

    async def listen() -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        async with websockets.connect(url) as ws:
            await ws.send(f"bind-with-token {params['token']['valueString']}")
            got.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
            got.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
            await asyncio.to_thread(discharge, gw)
            got.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
        return got

    messages = asyncio.run(listen())
    kinds = [next(p["valueCode"] for p in m["entry"][0]["resource"]["parameter"]
                  if p["name"] == "type") for m in messages]
    assert kinds == ["handshake", "event-notification", "event-notification"]
    assert messages[1]["entry"][1]["fullUrl"].endswith(f"/Encounter/{first}")


def test_off_stops_numbering_and_delete_forgets(gateway: GatewayFactory,
                                                receiver: Receiver) -> None:
    gw = gateway()
    sid = gw.subscribe("encounter-discharge", receiver.url)
    active = gw.wait_status(sid, "active", receiver)
    discharge(gw)
    assert receiver.wait(lambda: receiver.event_numbers(sid) == [1])
    active["status"] = "off"
    off = gw.update(active)
    discharge(gw)  # not an event of an "off" subscription
    time.sleep(0.5)
    off["status"] = "requested"
    gw.update(off)
    gw.wait_status(sid, "active", receiver)
    discharge(gw)
    assert receiver.wait(lambda: receiver.event_numbers(sid) == [1, 2])
    assert gw.client.delete(f"/Subscription/{sid}").status_code in (200, 204)
    discharge(gw)
    time.sleep(0.5)
    assert receiver.event_numbers(sid) == [1, 2]
    gone = gw.client.get(f"/Subscription/{sid}/$status")
    assert gone.status_code == 410


def test_a_backlog_goes_out_with_the_count_of_every_event(gateway: GatewayFactory,
                                                          receiver: Receiver) -> None:
    """events-since-subscription-start: "the total number of actual events which have
    been generated since the Subscription was created ... regardless of how many have
    been successfully communicated": a backlog sent two events at a time says 5 in
    each notification, not 2, 4 and 5."""
    gw = gateway(subscription_retry_initial_ms=200, subscription_retry_max_ms=400)
    sid = gw.subscribe("encounter-discharge", receiver.url, max_count=2)
    gw.wait_status(sid, "active", receiver)
    receiver.down()
    for _ in range(5):
        discharge(gw)

    def numbered() -> str | None:
        status = gw.read(f"/Subscription/{sid}/$status")["entry"][0]["resource"]
        return next(p["valueString"] for p in status["parameter"]
                    if p["name"] == "events-since-subscription-start")

    assert receiver.wait(lambda: numbered() == "5")
    receiver.up()
    assert receiver.wait(lambda: receiver.event_numbers(sid) == [1, 2, 3, 4, 5], within=30)
    notes = receiver.of(sid, "event-notification")
    assert len(notes) == 3
    assert {n.param("events-since-subscription-start") for n in notes} == {"5"}


def test_operations_answer_at_once_for_a_subscription_just_written(
        gateway: GatewayFactory) -> None:
    """``$status`` (and ``$events``, ``$get-ws-binding-token``) of a Subscription that
    was answered 201 a moment ago report it, rather than an error while its delivery
    state is being made (the IG: the server SHALL support ``$status``)."""
    gw = gateway()
    for channel in ("rest-hook", "rest-hook", "rest-hook", "websocket", "websocket"):
        endpoint = "http://127.0.0.1:9/hook" if channel == "rest-hook" else None
        sid = gw.create(subscription("encounter-discharge", endpoint, channel=channel))["id"]
        status = gw.client.get(f"/Subscription/{sid}/$status")
        assert status.status_code == 200, status.text
        params = {p["name"]: p for p in status.json()["entry"][0]["resource"]["parameter"]}
        assert params["status"]["valueCode"] in ("requested", "active")
        assert gw.client.get(f"/Subscription/{sid}/$events").status_code == 200
        if channel == "websocket":
            token = gw.client.get(f"/Subscription/{sid}/$get-ws-binding-token")
            assert token.status_code == 200, token.text
