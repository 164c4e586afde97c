"""What subscribers and clients get from the subscription service is valid R4: the
notification Bundles of each kind (handshake, event, heartbeat), ``$status`` and
``$events``, and the Subscription as read back."""

from __future__ import annotations

from typing import Any

from gateway.fhir.validation import FhirValidator
from gateway.main import registry
from gateway.registry import profiles_dir
from gateway.settings import Settings
from tests.subscriptions.conftest import GatewayFactory
from tests.subscriptions.receiver import Receiver


def _errors(validator: FhirValidator, resource: dict[str, Any]) -> list[str]:
    return [f"{i.expression}: {i.diagnostics}" for i in validator.validate(resource)
            if i.severity in ("error", "fatal")]


def test_notifications_and_status_are_valid_r4(gateway: GatewayFactory,
                                               receiver: Receiver) -> None:
    validator = FhirValidator.load(profiles_dir(), registry().structure_definitions,
                                   Settings.from_env())
    gw = gateway()
    full = gw.subscribe("encounter-discharge", receiver.url, content="full-resource",
                        heartbeat=1)
    ids = gw.subscribe("encounter-discharge", receiver.url, content="id-only")
    gw.wait_status(full, "active", receiver)
    gw.wait_status(ids, "active", receiver)
    gw.create({"resourceType": "Encounter", "status": "finished", "class": {"code": "IMP"}})
    assert receiver.wait(lambda: bool(receiver.of(full, "event-notification"))
                         and bool(receiver.of(ids, "event-notification"))
                         and bool(receiver.of(full, "heartbeat")))
    got = {f"{kind} ({'full-resource' if sid == full else 'id-only'})": r.bundle
           for sid in (full, ids) for kind in ("handshake", "event-notification", "heartbeat")
           for r in receiver.of(sid, kind)[:1]}
    assert len(got) == 5  # no heartbeat for the second subscription
    got["$status"] = gw.read(f"/Subscription/{full}/$status")
    got["$events"] = gw.read(f"/Subscription/{full}/$events")
    got["Subscription"] = gw.read(f"/Subscription/{full}")
    found = {name: _errors(validator, body) for name, body in got.items()}
    assert found == {name: [] for name in got}
