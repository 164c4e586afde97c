"""Notification Bundles of the R4 Subscriptions Backport IG 1.1.0.

A notification is a Bundle of type ``history`` whose first entry is a
``Parameters`` resource (profile ``backport-subscription-status-r4``):
``subscription``, ``topic``, ``status``, ``type`` (handshake | heartbeat |
event-notification | query-status | query-event),
``events-since-subscription-start`` and one ``notification-event`` per event
(``event-number``, ``timestamp``, ``focus``). For ``id-only`` and
``full-resource`` payloads each event's resource follows as an entry (with
``request``/``response``, as a history Bundle needs).
https://hl7.org/fhir/uv/subscriptions-backport/notifications.html,
https://hl7.org/fhir/uv/subscriptions-backport/payloads.html

Everything here is a pure function of its arguments (ids are name-based
UUIDs, timestamps come from the events), so ``$events`` rebuilds exactly the
entries that were delivered.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.fhir.instants import instant

BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport"
STATUS_PROFILE = f"{BACKPORT}/StructureDefinition/backport-subscription-status-r4"
BUNDLE_PROFILE = f"{BACKPORT}/StructureDefinition/backport-subscription-notification-r4"
_NAMESPACE = uuid.UUID("6f1c0b1e-4c1a-4d43-9a4e-2f7c6a0d5e11")
CONTENTS = ("empty", "id-only", "full-resource")

_METHOD = {"create": ("POST", "201"), "update": ("PUT", "200"), "delete": ("DELETE", "204")}


@dataclass(frozen=True, slots=True)
class NotificationEvent:
    number: int
    ts: int  # epoch microseconds
    resource_type: str
    id: str
    version: int
    interaction: str


def _name(*parts: object) -> str:
    return str(uuid.uuid5(_NAMESPACE, "/".join(str(p) for p in parts)))


def status_parameters(
    *,
    base: str,
    subscription_id: str,
    topic: str,
    status: str,
    type_: str,
    events_since_start: int,
    events: list[NotificationEvent],
    content: str,
    error: str | None = None,
    id_: str | None = None,
) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {"name": "subscription",
         "valueReference": {"reference": f"{base}/Subscription/{subscription_id}"}},
    ]
    if content != "empty":
        params.append({"name": "topic", "valueCanonical": topic})
    params += [
        {"name": "status", "valueCode": status},
        {"name": "type", "valueCode": type_},
        {"name": "events-since-subscription-start", "valueString": str(events_since_start)},
    ]
    for event in events:
        part: list[dict[str, Any]] = [
            {"name": "event-number", "valueString": str(event.number)},
            {"name": "timestamp", "valueInstant": instant(event.ts)},
        ]
        if content != "empty":
            part.append({"name": "focus", "valueReference": {
                "reference": f"{base}/{event.resource_type}/{event.id}"}})
        params.append({"name": "notification-event", "part": part})
    if error:
        params.append({"name": "error", "valueCodeableConcept": {"text": error}})
    out: dict[str, Any] = {"resourceType": "Parameters"}
    if id_:
        out["id"] = id_
    out["meta"] = {"profile": [STATUS_PROFILE]}
    out["parameter"] = params
    return out


def event_entry(base: str, event: NotificationEvent, content: str,
                stored: bytes | None) -> dict[str, Any]:
    method, status = _METHOD.get(event.interaction, ("PUT", "200"))
    entry: dict[str, Any] = {"fullUrl": f"{base}/{event.resource_type}/{event.id}"}
    if content == "full-resource" and stored is not None:
        entry["resource"] = orjson.Fragment(stored)
    entry["request"] = {
        "method": method,
        "url": event.resource_type if method == "POST" else f"{event.resource_type}/{event.id}",
    }
    entry["response"] = {"status": status, "etag": f'W/"{event.version}"',
                         "lastModified": instant(event.ts)}
    return entry


def notification(
    *,
    base: str,
    subscription_id: str,
    topic: str,
    status: str,
    type_: str,
    events_since_start: int,
    events: list[NotificationEvent],
    content: str,
    contents: dict[tuple[str, str, int], bytes | None] | None = None,
    now: int | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """The notification Bundle (a JSON-able dict; resource bytes as ``orjson.Fragment``)."""
    if events:
        name = _name(subscription_id, type_, events[0].number, events[-1].number,
                     events_since_start, status)
        timestamp = events[-1].ts
    else:
        assert now is not None, "handshake/heartbeat notifications carry the current time"
        name = _name(subscription_id, type_, events_since_start, now)
        timestamp = now
    params = status_parameters(
        base=base, subscription_id=subscription_id, topic=topic, status=status, type_=type_,
        events_since_start=events_since_start, events=events, content=content, error=error,
        id_=name,
    )
    entries: list[dict[str, Any]] = [{
        "fullUrl": f"urn:uuid:{name}",
        "resource": params,
        "request": {"method": "GET", "url": f"{base}/Subscription/{subscription_id}/$status"},
        "response": {"status": "200"},
    }]
    if content != "empty":
        for event in events:
            stored = (contents or {}).get((event.resource_type, event.id, event.version))
            entries.append(event_entry(base, event, content, stored))
    return {
        "resourceType": "Bundle",
        "id": name,
        "meta": {"profile": [BUNDLE_PROFILE]},
        "type": "history",
        "timestamp": instant(timestamp),
        "entry": entries,
    }


def dumps(bundle: dict[str, Any]) -> bytes:
    return orjson.dumps(bundle)
