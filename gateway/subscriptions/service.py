"""Topic-based subscriptions of one gateway process, composed for ``gateway.main``.

Matcher (a consumer of the event bus), dispatcher (deliveries), websocket
hub, the Subscription checks on every write path, the operations and the
CapabilityStatement additions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from gateway.events.consumer import ConsumerService
from gateway.events.runtime import EventRuntime
from gateway.fhir.outcome import Code, Issue
from gateway.fhir.validation.profiles import ProfileSet
from gateway.fhir.validation.snapshot import ProfileError
from gateway.interactions.base import Validator
from gateway.interactions.operations import Operation
from gateway.settings import Settings
from gateway.storage.db import Database
from gateway.storage.interface import Store
from gateway.subscriptions.delivery import RestHookSender
from gateway.subscriptions.dispatcher import Dispatcher
from gateway.subscriptions.endpoint import EndpointPolicy, Resolver
from gateway.subscriptions.matcher import GROUP, Matcher
from gateway.subscriptions.operations import SubscriptionOperations
from gateway.subscriptions.subscription import PROFILE, parse_subscription
from gateway.subscriptions.topics import TopicRegistry, require_scopes
from gateway.subscriptions.websocket import Socket, WebSocketHub

TOPIC_CANONICAL = ("http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
                   "capabilitystatement-subscriptiontopic-canonical")
WEBSOCKET_EXTENSION = "http://hl7.org/fhir/StructureDefinition/capabilitystatement-websocket"
WEBSOCKET_PATH = "/$websocket"
#: the backport IG's CapabilityStatement of an R4 server, which this one implements
SERVER_CAPABILITIES = ("http://hl7.org/fhir/uv/subscriptions-backport/CapabilityStatement/"
                       "backport-subscription-server-r4")
#: the relaying process numbers events in its round; the bus path is the safety
#: net, so its entries are read in batches (up to this much later)
MATCHER_SETTLE_MS = 25


class SubscriptionChecks:
    """The write-path validator plus the Subscription rules (422 at create/update)."""

    def __init__(self, inner: Validator | None, service: SubscriptionService) -> None:
        self.inner = inner
        self.service = service

    @property
    def model(self) -> Any:
        """The inner validator's R4 model (FHIRPath Patch navigates with it)."""
        return getattr(self.inner, "model", None)

    def with_stored(self, structure_definitions: Iterable[dict[str, Any]],
                    value_sets: Mapping[str, frozenset[tuple[str, str]]]) -> ProfileSet | None:
        if self.inner is None:
            return None
        return self.inner.with_stored(structure_definitions, value_sets)

    def snapshot(self, structure_definition: dict[str, Any],
                 stored: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
        if self.inner is None:
            raise ProfileError("validation is not configured on this server")
        return self.inner.snapshot(structure_definition, stored)

    def validate(self, resource: dict[str, Any], *, profile: str | None = None,
                 profiles: ProfileSet | None = None) -> list[Issue]:
        issues = self.inner.validate(resource, profile=profile, profiles=profiles) \
            if self.inner else []
        if resource.get("resourceType") == "Subscription":
            # the backport IG's profile is what the checks below hold a Subscription to:
            # known here, though not as a StructureDefinition
            issues = [i for i in issues if not (
                i.code is Code.UNKNOWN_PROFILE and i.severity == "warning"
                and PROFILE in (i.diagnostics or ""))]
            config, found = parse_subscription(resource, self.service.topics,
                                               self.service.policy, self.service.settings)
            issues += found
            topic = self.service.topics.get(config.topic) if config is not None else None
            if topic is not None:
                require_scopes(topic)
        return issues


class SubscriptionService:
    def __init__(self, db: Database, store: Store, settings: Settings, events: EventRuntime,
                 *, base_url: str, topics: TopicRegistry | None = None,
                 resolver: Resolver | None = None) -> None:
        self.settings = settings
        self.topics = topics or TopicRegistry.load()
        self.policy = EndpointPolicy.from_settings(settings)
        self.sender = RestHookSender(self.policy, resolver=resolver)
        self.dispatcher = Dispatcher(db, store, self.topics, settings, self.sender,
                                     base_url=base_url)
        self.hub = WebSocketHub(db, self.topics, base_url=base_url, kick=self.dispatcher.notify)
        self.dispatcher.ws_bound = self.hub.bound
        self.dispatcher.ws_send = self.hub.send
        self.matcher = Matcher(db, self.topics, settings, self.policy,
                               namespace=events.namespace, on_work=self.dispatcher.notify)
        # numbered in the relay's round; the bus entries are the safety net (ADR 0004)
        events.relay.in_round = self.matcher.within_relay
        events.add_consumer(ConsumerService(
            events.bus, GROUP, self.matcher.handle, idle=self.matcher.catch_up,
            block_ms=settings.subscription_poll_ms, claim_idle_ms=settings.event_claim_idle_ms,
            settle_ms=MATCHER_SETTLE_MS,
        ))
        self._operations = SubscriptionOperations(db, self.topics, settings,
                                                  self.dispatcher.notify, WEBSOCKET_PATH,
                                                  base_url=base_url)

    def checks(self, inner: Validator | None) -> SubscriptionChecks:
        return SubscriptionChecks(inner, self)

    def operations(self) -> list[Operation]:
        return self._operations.operations()

    def subscription_extensions(self, base: str) -> list[dict[str, Any]]:
        """``rest.resource`` (Subscription): one topic canonical extension per topic."""
        return [{"url": TOPIC_CANONICAL, "valueCanonical": url} for url in self.topics.canonicals]

    def rest_extensions(self, base: str) -> list[dict[str, Any]]:
        ws = base.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        return [{"url": WEBSOCKET_EXTENSION, "valueUri": f"{ws}{WEBSOCKET_PATH}"}]

    @property
    def supported_profile(self) -> str:
        return PROFILE

    async def websocket(self, socket: Socket) -> None:
        await self.hub.serve(socket)

    async def start(self) -> None:
        await self.dispatcher.start()

    async def stop(self) -> None:
        await self.dispatcher.stop()
