"""Subscription operations of the R4 Subscriptions Backport IG.

* ``$status`` (type and instance level):
  https://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition-backport-subscription-status.html
* ``$events`` (instance): replay numbered events from the database; the
  ``notification-event`` parts and entries equal those delivered, less the
  events of resources the caller may not see now.
  https://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition-backport-subscription-events.html
* ``$resend`` (instance, POST): deliver a range of events again.
* ``$get-ws-binding-token`` (type and instance): a token for the websocket
  channel.
  https://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition-backport-subscription-get-ws-binding-token.html
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Callable
from typing import Any

import orjson

from gateway.fhir import json as fjson
from gateway.fhir.instants import instant
from gateway.fhir.outcome import Code, FhirError, information
from gateway.interactions.base import Context, FhirResponse, check_id
from gateway.interactions.operations import Operation, OperationRequest, stored_current
from gateway.security import guard
from gateway.settings import Settings
from gateway.storage import subscription_tables as tables
from gateway.storage.db import Connection, Database
from gateway.storage.outbox import versions
from gateway.subscriptions.dispatcher import events_of
from gateway.subscriptions.notification import CONTENTS, notification, status_parameters
from gateway.subscriptions.subscription import SubscriptionConfig
from gateway.subscriptions.topics import TopicRegistry, require_scopes

BACKPORT_OP = "http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition"
MAX_EVENTS = 1000
#: how long an operation on a Subscription just written waits for its delivery state
STATE_WAIT_SECONDS = 5.0
SUBSCRIPTION = frozenset({"Subscription"})


def now_micros() -> int:
    return int(time.time() * 1_000_000)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class SubscriptionOperations:
    def __init__(self, db: Database, topics: TopicRegistry, settings: Settings,
                 kick: Callable[[set[str]], None], websocket_path: str, *,
                 base_url: str) -> None:
        #: the base deliveries use (references must be equal in $events replays)
        self.base_url = base_url.rstrip("/")
        self.db = db
        self.topics = topics
        self.settings = settings
        self.kick = kick
        self.websocket_path = websocket_path

    def operations(self) -> list[Operation]:
        return [
            Operation("status", self.status, type_level=True, instance=True, types=SUBSCRIPTION,
                      definition=f"{BACKPORT_OP}/backport-subscription-status"),
            Operation("events", self.events, instance=True, types=SUBSCRIPTION,
                      definition=f"{BACKPORT_OP}/backport-subscription-events"),
            Operation("resend", self.resend, instance=True, types=SUBSCRIPTION,
                      affects_state=True,
                      definition=f"{BACKPORT_OP}/backport-subscription-resend"),
            Operation("get-ws-binding-token", self.ws_token, type_level=True, instance=True,
                      types=SUBSCRIPTION,
                      definition=f"{BACKPORT_OP}/backport-subscription-get-ws-binding-token"),
        ]

    async def _state(self, ctx: Context, sid: str) -> tables.StateRow:
        check_id(sid)
        async with self.db.read() as conn:
            state = await tables.get_state(conn, sid)
        if state is not None:
            return state
        stored = await ctx.store.read("Subscription", sid)
        if stored is None:
            raise FhirError(Code.NOT_FOUND, f"Subscription/{sid} is not known")
        if stored.deleted:
            raise FhirError(Code.GONE, f"Subscription/{sid} was deleted")
        criteria = fjson.loads_fast(stored.content or b"{}").get("criteria")
        if isinstance(criteria, str) and self.topics.get(criteria) is not None:
            # written a moment ago: its delivery state is made from the outbox, after
            # the write's commit (docs/adr-0004), in some tens of milliseconds
            deadline = time.monotonic() + STATE_WAIT_SECONDS
            while time.monotonic() < deadline:
                await asyncio.sleep(0.02)
                async with self.db.read() as conn:
                    state = await tables.get_state(conn, sid)
                if state is not None:
                    return state
        raise FhirError(Code.NOT_A_TOPIC_SUBSCRIPTION,
                        f"Subscription/{sid} is not (yet) a topic-based subscription in "
                        "delivery; try again in a moment if it was just created")

    @staticmethod
    async def _own(
        ctx: Context, conn: Connection, states: list[tables.StateRow]
    ) -> list[tables.StateRow]:
        """The subscriptions the caller's organisation created (all, unrestricted)."""
        restriction = guard.restriction(ctx.access)
        if restriction is None or not states:
            return states
        marks = ", ".join("?" for _ in states)
        mine = {row[0] for row in await conn.fetch(
            "SELECT res_id FROM resource_creator WHERE res_type = 'Subscription'"
            f" AND organization = ? AND res_id IN ({marks})",
            [restriction.organization, *(s.id for s in states)])}
        return [s for s in states if s.id in mine]

    def _config(self, state: tables.StateRow) -> SubscriptionConfig:
        return SubscriptionConfig.from_json(state.config, self.topics)

    def _checked(self, state: tables.StateRow) -> SubscriptionConfig:
        """The Subscription's config, once the caller's scopes open what its topic
        delivers: they were checked when it was written, by whoever wrote it, and
        a colleague's token may lack them."""
        config = self._config(state)
        topic = self.topics.get(config.topic)
        if topic is None:  # no longer offered: its types are not known, a wildcard opens them
            guard.require("*", "search")
        else:
            require_scopes(topic)
        return config

    @staticmethod
    async def _visible_now(ctx: Context,
                           rows: list[tables.EventRow]) -> list[tables.EventRow]:
        """The events whose resources the caller may see now: an event was matched
        against the subscribing organisation's access when it happened, and a
        Consent since (or the resource's move to another patient) may have closed
        it; a replay names and carries only what a search would now."""
        keys = sorted({(r.resource_type, r.id) for r in rows})
        shown = set(await guard.filter_visible(ctx.access, ctx.store, keys))
        return [r for r in rows if (r.resource_type, r.id) in shown]

    def _status_entry(self, req: OperationRequest, state: tables.StateRow) -> dict[str, Any]:
        config = self._config(state)
        params = status_parameters(
            base=self.base_url, subscription_id=state.id, topic=config.topic, status=state.status,
            type_="query-status", events_since_start=state.events_since_start, events=[],
            content="id-only", error=state.last_error,
        )
        return {"fullUrl": f"{req.base}/Subscription/{state.id}/$status", "resource": params,
                "search": {"mode": "match"}}

    async def status(self, ctx: Context, req: OperationRequest) -> FhirResponse:
        if req.id is not None:
            states = [await self._state(ctx, req.id)]
        else:
            params = req.parameters()
            ids = [str(i) for v in params.get("id", []) for i in str(v).split(",") if i]
            wanted = [str(s) for v in params.get("status", []) for s in str(v).split(",") if s]
            async with self.db.read() as conn:
                states = await tables.all_states(conn, ids or None, wanted or None)
                states = await self._own(ctx, conn, states)
        bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset",
                                  "total": len(states)}
        if states:  # (an empty array is not FHIR JSON)
            bundle["entry"] = [self._status_entry(req, s) for s in states]
        return FhirResponse(200, bundle)

    def _range(self, req: OperationRequest, state: tables.StateRow) -> tuple[int, int]:
        params = req.parameters()

        def number(name: str) -> int | None:
            values = params.get(name)
            if not values:
                return None
            try:
                return int(str(values[0]))
            except ValueError:
                raise FhirError(Code.INVALID_EVENT_RANGE, f"{name} must be a whole number") \
                    from None

        since, until = number("eventsSinceNumber"), number("eventsUntilNumber")
        if (since is not None and since < 0) or (until is not None and until < 0):
            raise FhirError(Code.INVALID_EVENT_RANGE, "event numbers are not negative")
        if since is not None and until is not None and since > until:
            raise FhirError(Code.INVALID_EVENT_RANGE,
                            f"eventsSinceNumber {since} is after eventsUntilNumber {until}")
        last = min(until if until is not None else state.events_since_start,
                   state.events_since_start)
        # (events are numbered from 1; a range beyond the last one is empty: a client
        # that asks for what came after the last event it saw is up to date)
        first = max(since, 1) if since is not None else max(1, last - 99)
        if until is None:  # "from here on": the first MAX_EVENTS, the client asks on
            last = min(last, first + MAX_EVENTS - 1)
        if last - first + 1 > MAX_EVENTS:
            raise FhirError(Code.INVALID_EVENT_RANGE, f"at most {MAX_EVENTS} events per call")
        return first, last

    async def events(self, ctx: Context, req: OperationRequest) -> FhirResponse:
        assert req.id is not None
        state = await self._state(ctx, req.id)
        config = self._checked(state)
        content = config.content
        asked = req.parameters().get("content")
        if asked:
            content = str(asked[0])
            if content not in CONTENTS:
                raise FhirError(Code.UNSUPPORTED_PAYLOAD, f"content must be {', '.join(CONTENTS)}")
        rows: list[tables.EventRow] = []
        contents: dict[tuple[str, str, int], bytes | None] = {}
        if state.events_since_start:
            first, last = self._range(req, state)
            async with self.db.read() as conn:
                rows = await tables.events_between(conn, state.id, first, last, MAX_EVENTS)
            if content != "empty":  # (an empty notification names no resource)
                rows = await self._visible_now(ctx, rows)
            if content == "full-resource" and rows:
                async with self.db.read() as conn:
                    contents = await versions(conn, [(r.resource_type, r.id, r.version)
                                                     for r in rows])
        bundle = notification(
            base=self.base_url, subscription_id=state.id, topic=config.topic, status=state.status,
            type_="query-event", events_since_start=state.events_since_start,
            events=events_of(rows), content=content, contents=contents, now=now_micros(),
        )
        return FhirResponse(200, orjson.dumps(bundle))

    async def resend(self, ctx: Context, req: OperationRequest) -> FhirResponse:
        assert req.id is not None
        state = await self._state(ctx, req.id)
        self._checked(state)
        if not state.events_since_start:
            return FhirResponse(200, information("this subscription has no events yet"))
        first, last = self._range(req, state)
        if first > last:
            return FhirResponse(200, information(
                f"no events {first}..{last} to resend (this subscription has 1.."
                f"{state.events_since_start})"))
        async with self.db.transaction() as conn:
            await tables.request_resend(conn, state.id, first, last)
        self.kick({state.id})
        return FhirResponse(200, information(f"events {first}..{last} of Subscription/"
                                             f"{state.id} queued for delivery"))

    async def ws_token(self, ctx: Context, req: OperationRequest) -> FhirResponse:
        if req.id is not None:
            ids = [req.id]
        else:
            ids = [str(i) for v in req.parameters().get("id", []) for i in str(v).split(",")
                   if i]
            if not ids:
                raise FhirError(Code.INVALID_SUBSCRIPTION,
                                "name the subscriptions with one or more 'id' parameters")
        for sid in ids:
            if req.id is None:  # (invoke checked an instance operation's own resource)
                await stored_current(ctx, "Subscription", sid)
            state = await self._state(ctx, sid)
            # the token does not name its holder: the socket delivers to whoever binds
            self._checked(state)
            if state.channel != "websocket":
                raise FhirError(Code.UNSUPPORTED_CHANNEL,
                                f"Subscription/{sid} does not use the websocket channel")
        token = secrets.token_urlsafe(32)
        now = now_micros()
        expires = now + self.settings.subscription_ws_token_lifetime * 1_000_000
        async with self.db.transaction() as conn:
            await tables.save_ws_token(conn, token_hash(token), ",".join(ids), expires, now)
        ws_base = req.base.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        body = {"resourceType": "Parameters", "parameter": [
            {"name": "token", "valueString": token},
            {"name": "expiration", "valueDateTime": instant(expires)},
            *({"name": "subscription", "valueString": sid} for sid in ids),
            {"name": "websocket-url", "valueUrl": f"{ws_base}{self.websocket_path}"},
        ]}
        return FhirResponse(200, body)
