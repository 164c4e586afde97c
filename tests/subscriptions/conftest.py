"""Gateways with subscriptions for tests: SQLite + in-process bus, PostgreSQL + Redis."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import PG_URL, REDIS_URL, RunningServer
from tests.events.conftest import store  # noqa: F401  (the same store fixture here)
from tests.subscriptions.receiver import Receiver

TOPIC = "https://carepath-gateway.org/fhir/SubscriptionTopic/"
BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
FAST = {
    "subscription_retry_initial_ms": 100,
    "subscription_retry_max_ms": 1000,
    "subscription_poll_ms": 200,
    "event_poll_ms": 100,
}


def settings_for(backend: str, tmp: Path, schema: Callable[[], str], prefix: str,
                 **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {**FAST, "redis_prefix": prefix, **overrides}
    if backend == "sqlite":
        values["database_url"] = f"sqlite:///{tmp / 'gateway.db'}"
    else:
        values.update(database_url=PG_URL, database_schema=schema(), redis_url=REDIS_URL)
    return values


class Gateway:
    def __init__(self, running: RunningServer) -> None:
        self.running = running
        self.url = running.url
        self.client = httpx.Client(base_url=running.url, timeout=30,
                                   headers={"Content-Type": "application/fhir+json"})

    def create(self, resource: dict[str, Any]) -> dict[str, Any]:
        response = self.client.post(f"/{resource['resourceType']}", json=resource)
        assert response.status_code == 201, response.text
        return dict(response.json())

    def update(self, resource: dict[str, Any]) -> dict[str, Any]:
        response = self.client.put(f"/{resource['resourceType']}/{resource['id']}", json=resource)
        assert response.status_code in (200, 201), response.text
        return dict(response.json())

    def read(self, path: str) -> dict[str, Any]:
        response = self.client.get(path)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def subscribe(self, topic: str, endpoint: str, **kw: Any) -> str:
        return str(self.create(subscription(topic, endpoint, **kw))["id"])

    def wait_status(self, sid: str, status: str, receiver: Receiver) -> dict[str, Any]:
        found: dict[str, Any] = {}

        def check() -> bool:
            found.update(self.read(f"/Subscription/{sid}"))
            return found.get("status") == status

        assert receiver.wait(check), f"Subscription/{sid} is {found.get('status')}, not {status}"
        return found


def subscription(topic: str, endpoint: str | None, *, filters: tuple[str, ...] = (),
                 content: str = "id-only", heartbeat: int | None = None,
                 timeout: int | None = None, max_count: int | None = None,
                 secret: str | None = None, status: str = "requested",
                 channel: str = "rest-hook", headers: tuple[str, ...] = ()) -> dict[str, Any]:
    extensions: list[dict[str, Any]] = []
    if heartbeat is not None:
        extensions.append({"url": BACKPORT + "backport-heartbeat-period",
                           "valueUnsignedInt": heartbeat})
    if timeout is not None:
        extensions.append({"url": BACKPORT + "backport-timeout", "valueUnsignedInt": timeout})
    if max_count is not None:
        extensions.append({"url": BACKPORT + "backport-max-count", "valuePositiveInt": max_count})
    if secret is not None:
        extensions.append({"url": "https://carepath-gateway.org/fhir/StructureDefinition/"
                                  "subscription-signature-secret", "valueString": secret})
    channel_json: dict[str, Any] = {
        "type": channel,
        "payload": "application/fhir+json",
        "_payload": {"extension": [{"url": BACKPORT + "backport-payload-content",
                                    "valueCode": content}]},
    }
    if extensions:
        channel_json["extension"] = extensions
    if endpoint is not None:
        channel_json["endpoint"] = endpoint
    if headers:
        channel_json["header"] = list(headers)
    body: dict[str, Any] = {
        "resourceType": "Subscription",
        "status": status,
        "reason": "test",
        "criteria": topic if topic.startswith("http") else TOPIC + topic,
        "channel": channel_json,
    }
    if filters:
        body["_criteria"] = {"extension": [
            {"url": BACKPORT + "backport-filter-criteria", "valueString": f} for f in filters]}
    return body




@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.down()


GatewayFactory = Callable[..., Gateway]


@pytest.fixture(params=["sqlite", "postgresql"])
def gateway(request: pytest.FixtureRequest, tmp_path: Path, new_schema: Callable[[], str],
            prefix: str) -> Iterator[GatewayFactory]:
    """``gateway(**settings)`` starts a gateway on the backend of this test run."""
    from gateway.settings import Settings

    with ExitStack() as stack:

        def start(**overrides: Any) -> Gateway:
            values = settings_for(request.param, tmp_path, new_schema, prefix, **overrides)
            running = stack.enter_context(RunningServer(Settings(**values)))
            gw = Gateway(running)
            stack.callback(gw.client.close)
            return gw

        yield start


def referral(a: httpx.Client, owner_org: str) -> tuple[str, str]:
    """A patient of hospital-a and a referral Task to ``owner_org``: (patient, Task)."""
    pid = a.post("/Patient", json={"resourceType": "Patient"}).json()["id"]
    sr = a.post("/ServiceRequest", json={
        "resourceType": "ServiceRequest", "status": "active", "intent": "order",
        "subject": {"reference": f"Patient/{pid}"},
        "requester": {"reference": "Organization/org-a"},
        "performer": [{"reference": f"Organization/{owner_org}"}]}).json()["id"]
    task = a.post("/Task", json={
        "resourceType": "Task", "status": "requested", "intent": "order",
        "focus": {"reference": f"ServiceRequest/{sr}"}, "for": {"reference": f"Patient/{pid}"},
        "requester": {"reference": "Organization/org-a"},
        "owner": {"reference": f"Organization/{owner_org}"}})
    assert task.status_code == 201, task.text
    return str(pid), str(task.json()["id"])
