"""Reading a Subscription resource (Backport profile) into what delivery needs.

Profile: https://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition-backport-subscription.html

* ``criteria`` — the topic's canonical URL (``url`` or ``url|version``);
* ``_criteria`` extension ``backport-filter-criteria`` — filters (0..*);
* ``channel.type`` — ``rest-hook`` or ``websocket``; ``channel.endpoint``;
  ``channel.header`` — ``Name: value`` lines sent with every notification;
* ``channel.payload`` — ``application/fhir+json`` (or ``application/json``) or
  ``application/fhir+xml`` (notifications written as FHIR XML), with extension
  ``backport-payload-content``: ``empty`` | ``id-only`` | ``full-resource``
  (default ``id-only``);
* ``channel`` extensions ``backport-heartbeat-period`` (s),
  ``backport-timeout`` (s), ``backport-max-count``;
* gateway extension ``subscription-signature-secret`` on ``channel``: key of
  the ``X-Carepath-Signature`` HMAC-SHA256 header (at least 16 characters).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import orjson

from gateway.fhir.outcome import Code, Issue
from gateway.settings import Settings
from gateway.subscriptions.endpoint import EndpointPolicy, EndpointRefused
from gateway.subscriptions.filters import Criterion, FilterError, parse_filter
from gateway.subscriptions.notification import CONTENTS
from gateway.subscriptions.topics import TopicRegistry

BACKPORT_SD = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
GATEWAY_SD = "https://carepath-gateway.org/fhir/StructureDefinition"
FILTER_CRITERIA = f"{BACKPORT_SD}/backport-filter-criteria"
PAYLOAD_CONTENT = f"{BACKPORT_SD}/backport-payload-content"
HEARTBEAT_PERIOD = f"{BACKPORT_SD}/backport-heartbeat-period"
TIMEOUT = f"{BACKPORT_SD}/backport-timeout"
MAX_COUNT = f"{BACKPORT_SD}/backport-max-count"
CHANNEL_TYPE = f"{BACKPORT_SD}/backport-channel-type"
SIGNATURE_SECRET = f"{GATEWAY_SD}/subscription-signature-secret"
PROFILE = f"{BACKPORT_SD}/backport-subscription"

CHANNELS = ("rest-hook", "websocket")
MIME_TYPES = ("application/fhir+json", "application/json", "application/fhir+xml")
XML_MIME = "application/fhir+xml"
STATUSES = ("requested", "active", "error", "off")
#: headers a subscriber may not set: the gateway writes them, or they change framing
RESERVED_HEADERS = frozenset({
    "host", "content-length", "content-type", "transfer-encoding", "connection", "upgrade",
    "x-carepath-signature", "te", "trailer", "expect", "proxy-authorization",
})
MIN_SECRET = 16


@dataclass(frozen=True, slots=True)
class SubscriptionConfig:
    topic: str
    filters: tuple[str, ...]  # normalised criterion texts
    channel: str
    endpoint: str | None
    mime: str
    content: str
    headers: tuple[tuple[str, str], ...] = ()
    heartbeat: int = 0
    timeout: int = 10
    max_count: int | None = None
    secret: str | None = None
    end: int = 0  # epoch microseconds; 0: no end
    criteria: tuple[Criterion, ...] = field(default=(), compare=False)

    def to_json(self) -> bytes:
        data = asdict(self)
        data.pop("criteria")
        return orjson.dumps(data)

    @classmethod
    def from_json(cls, raw: bytes, topics: TopicRegistry) -> SubscriptionConfig:
        data = orjson.loads(raw)
        data["headers"] = tuple(tuple(h) for h in data.get("headers", []))
        data["filters"] = tuple(data.get("filters", []))
        topic = topics.get(data["topic"])
        criteria: list[Criterion] = []
        if topic is not None:
            for text in data["filters"]:
                criteria += parse_filter(text, topic)
        return cls(**data, criteria=tuple(criteria))

    def delivery_timeout(self) -> float:
        return float(self.timeout)


def _ext(element: Any, url: str) -> list[dict[str, Any]]:
    if not isinstance(element, dict):
        return []
    return [e for e in element.get("extension", []) or []
            if isinstance(e, dict) and e.get("url") == url]


def _ext_value(element: Any, url: str, key: str) -> Any:
    found = _ext(element, url)
    return found[0].get(key) if found else None


def _end(value: Any) -> int:
    if not isinstance(value, str):
        return 0
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return 0
    if parsed.tzinfo is None:
        return 0
    return int(parsed.timestamp() * 1_000_000)


def parse_subscription(
    resource: dict[str, Any],
    topics: TopicRegistry,
    policy: EndpointPolicy,
    settings: Settings,
    *,
    resolve: bool = True,
) -> tuple[SubscriptionConfig | None, list[Issue]]:
    """The configuration of a topic-based Subscription, or the reasons it is not valid.

    ``resolve``: also resolve the endpoint's host and check its addresses.
    """
    issues: list[Issue] = []

    def bad(code: Code, text: str, *where: str) -> None:
        issues.append(Issue(code, text, tuple(f"Subscription.{w}" for w in where)))

    criteria = resource.get("criteria")
    topic = topics.get(criteria) if isinstance(criteria, str) else None
    if topic is None:
        known = ", ".join(topics.canonicals)
        bad(Code.UNKNOWN_TOPIC, f"criteria must be the canonical URL of a topic this server "
                                f"offers ({known}); got {str(criteria)[:200]!r}", "criteria")
    status = resource.get("status")
    if status not in STATUSES:
        bad(Code.INVALID_SUBSCRIPTION, f"status must be one of {', '.join(STATUSES)}", "status")
    filters: list[str] = []
    parsed: list[Criterion] = []
    for ext in _ext(resource.get("_criteria"), FILTER_CRITERIA):
        text = ext.get("valueString")
        if not isinstance(text, str) or topic is None:
            if not isinstance(text, str):
                bad(Code.INVALID_FILTER, "backport-filter-criteria needs a valueString",
                    "criteria.extension")
            continue
        try:
            found = parse_filter(text, topic, settings.own_base)
        except FilterError as exc:
            bad(Code.INVALID_FILTER, str(exc), "criteria.extension")
            continue
        parsed += found
        filters += [c.text() for c in found]
    channel = resource.get("channel")
    if not isinstance(channel, dict):
        bad(Code.INVALID_SUBSCRIPTION, "channel is required", "channel")
        channel = {}
    ctype = channel.get("type")
    custom = _ext_value(channel.get("_type"), CHANNEL_TYPE, "valueCoding")
    if ctype not in CHANNELS or custom is not None:
        bad(Code.UNSUPPORTED_CHANNEL, f"channel.type must be {' or '.join(CHANNELS)}",
            "channel.type")
    endpoint = channel.get("endpoint")
    if ctype == "rest-hook":
        if not isinstance(endpoint, str) or not endpoint:
            bad(Code.ENDPOINT_REFUSED, "a rest-hook channel needs an endpoint", "channel.endpoint")
        else:
            try:
                target = policy.check_url(endpoint)
                if resolve and not issues:  # no lookups for what is refused anyway
                    policy.resolve_blocking(target)
            except EndpointRefused as exc:
                bad(Code.ENDPOINT_REFUSED, str(exc), "channel.endpoint")
    mime = channel.get("payload")
    if mime is None:
        mime = "application/fhir+json"
    if not isinstance(mime, str) or mime.split(";")[0].strip() not in MIME_TYPES:
        bad(Code.UNSUPPORTED_PAYLOAD, f"channel.payload must be {' or '.join(MIME_TYPES)}",
            "channel.payload")
        mime = "application/fhir+json"
    content = _ext_value(channel.get("_payload"), PAYLOAD_CONTENT, "valueCode") or "id-only"
    if content not in CONTENTS:
        bad(Code.UNSUPPORTED_PAYLOAD, f"payload content must be {', '.join(CONTENTS)}",
            "channel.payload.extension")
    headers: list[tuple[str, str]] = []
    for line in channel.get("header", []) or []:
        name, sep, value = str(line).partition(":")
        name, value = name.strip(), value.strip()
        if (not sep or not name or any(c in str(line) for c in "\r\n\0")
                or not name.replace("-", "").isalnum()):
            bad(Code.INVALID_SUBSCRIPTION, "channel.header entries are 'Name: value' lines",
                "channel.header")
        elif name.lower() in RESERVED_HEADERS:
            bad(Code.INVALID_SUBSCRIPTION, f"header {name!r} is set by the gateway",
                "channel.header")
        else:
            headers.append((name, value))
    heartbeat = _ext_value(channel, HEARTBEAT_PERIOD, "valueUnsignedInt") or 0
    timeout = _ext_value(channel, TIMEOUT, "valueUnsignedInt")
    if timeout is None:  # (0 is a value, refused below, not the default)
        timeout = settings.subscription_timeout
    max_count = _ext_value(channel, MAX_COUNT, "valuePositiveInt")
    for seconds, label in ((heartbeat, "heartbeatPeriod"), (timeout, "timeout")):
        if not isinstance(seconds, int) or isinstance(seconds, bool) or seconds < 0:
            bad(Code.INVALID_SUBSCRIPTION, f"{label} must be a whole number of seconds",
                "channel.extension")
    if isinstance(timeout, int) and not 1 <= timeout <= settings.subscription_max_timeout:
        bad(Code.INVALID_SUBSCRIPTION,
            f"timeout must be 1..{settings.subscription_max_timeout} seconds",
            "channel.extension")
    if max_count is not None and (not isinstance(max_count, int) or max_count < 1):
        bad(Code.INVALID_SUBSCRIPTION, "maxCount must be a positive integer",
            "channel.extension")
    secret = _ext_value(channel, SIGNATURE_SECRET, "valueString")
    if secret is not None and (not isinstance(secret, str) or len(secret) < MIN_SECRET):
        bad(Code.INVALID_SUBSCRIPTION,
            f"the signature secret must be a string of at least {MIN_SECRET} characters",
            "channel.extension")
    if issues or topic is None:
        return None, issues
    return SubscriptionConfig(
        topic=topic.url,
        filters=tuple(filters),
        channel=str(ctype),
        endpoint=endpoint if isinstance(endpoint, str) else None,
        mime=mime,
        content=str(content),
        headers=tuple(headers),
        heartbeat=int(heartbeat),
        timeout=int(timeout),
        max_count=max_count,
        secret=secret,
        end=_end(resource.get("end")),
        criteria=tuple(parsed),
    ), []
