"""The matcher: outbox events → numbered events per subscription.

A member of the bus consumer group ``subscriptions`` in every process. Bus
entries only wake it (and say up to which outbox position the relay found
the outbox final); the work is done from the database (ADR 0003): one
transaction, under the lock ``{namespace}:matcher``, reads the outbox from
the matcher's own position (``event_position`` row ``group:subscriptions``)
up to what the relay has published, and for each event in order

* on a ``Subscription`` write: creates, updates or removes the subscription's
  delivery state (status requested → handshake; client status changes;
  endpoint changes ask for a new handshake);
* on any other write: evaluates the topics triggering on its resource type
  (FHIRPath over the previous and the new version) and, for each
  subscription of a firing topic whose filters pass, assigns the next event
  number and records the event.

The event rows, the new counters and the new position commit together, so an
event is numbered exactly once per subscription however often its bus entry
arrives, and numbers follow commit order.

The process that relays also matches, in the relay's own transaction
(:meth:`Matcher.within_relay`, ADR 0004): no transaction, lock wait or trip
through the bus of its own. The bus entries then find the work done (the
matcher remembers the position it committed) and cost no database round;
they, and the catch-up when the bus is quiet, still do the work whenever the
relay's process could not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.events.bus import BusEntry
from gateway.fhir import json as fjson
from gateway.security.principal import DEFAULT_PURPOSE
from gateway.settings import Settings
from gateway.storage import access_sql
from gateway.storage import subscription_tables as tables
from gateway.storage.db import Connection, Database
from gateway.storage.interface import AccessRules, Restriction
from gateway.storage.outbox import (
    START,
    OutboxEvent,
    Position,
    load_positions,
    read_range,
    save_position,
    versions,
)
from gateway.subscriptions.endpoint import EndpointPolicy
from gateway.subscriptions.filters import EventValues, accepts
from gateway.subscriptions.subscription import SubscriptionConfig, parse_subscription
from gateway.subscriptions.topics import TopicRegistry

log = logging.getLogger("carepath.subscriptions")


def _end(ended: asyncio.Future[None]) -> None:
    """Mark a relay round's numbering ended (once; a future already done stays so)."""
    if not ended.done():
        ended.set_result(None)

GROUP = "subscriptions"
POSITION = f"group:{GROUP}"
RELAY = "relay"
BATCH = 200


def now_micros() -> int:
    return int(time.time() * 1_000_000)


@dataclass(slots=True)
class _Live:
    """A subscription as the matcher sees it during one round.

    One object per subscription for the whole round: candidates found before a write to
    the Subscription and after it are numbered from the same count."""

    state: tables.StateRow
    config: SubscriptionConfig | None
    count: int
    #: gets events numbered now (not switched off earlier in the round)
    matching: bool = True
    #: deleted later in the round: nothing found for it is recorded
    gone: bool = False


class Matcher:
    def __init__(self, db: Database, topics: TopicRegistry, settings: Settings,
                 policy: EndpointPolicy, *, namespace: str,
                 on_work: Callable[[set[str], dict[str, list[tables.EventRow]]], None]) -> None:
        self.db = db
        self.topics = topics
        self.settings = settings
        self.policy = policy
        self.lock_key = f"{namespace}:matcher"
        self.on_work = on_work
        self._configs: dict[tuple[str, int], SubscriptionConfig | None] = {}
        self.matched = 0  # events numbered by this process (metrics, tests)
        #: the access policy: a subscription only hears of what its organisation may see
        self.access_rules: AccessRules | None = None
        #: the matcher position known committed (by this process or another)
        self._done = START
        self._local = asyncio.Lock()
        #: the relay round numbering events right now: (up to, ended)
        self._in_relay: tuple[Position, asyncio.Future[None]] | None = None

    async def handle(self, entries: Sequence[BusEntry]) -> None:
        # the relay publishes before its own position commits: the entries say how far
        # the outbox is final (the relay found it so), the position row may lag behind
        await self.catch_up(max((e.position for e in entries), default=None))

    async def within_relay(self, conn: Connection, after: Position,
                           events: list[OutboxEvent]) -> Callable[[bool], None]:
        """Number ``events`` (which follow ``after``) in the relay's own transaction.

        The relay calls this after publishing (:attr:`gateway.events.relay.Relay.in_round`)
        and calls the result once its transaction has ended."""
        upto = events[-1].position
        ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._in_relay = (upto, ended)
        try:
            _n, done, touched, rows = await self._advance(conn, upto, (after, events))
        except BaseException:
            _end(ended)
            raise

        def told(committed: bool) -> None:
            if committed:
                self._done = max(self._done, done)
                if touched:
                    self.on_work(touched, rows)
            _end(ended)

        return told

    async def catch_up(self, upto: Position | None = None) -> None:
        """Number the events up to ``upto`` (None: whatever the relay has published)."""
        if upto is not None and self._in_relay is not None and upto <= self._in_relay[0]:
            # the relay of this process is numbering them right now; shielded: a waiter
            # cancelled (a consumer stopping, say) must not cancel the relay's future
            await asyncio.shield(self._in_relay[1])
        async with self._local:  # one round at a time in this process
            while upto is None or upto > self._done:
                async with self.db.transaction() as conn:
                    processed, done, touched, rows = await self._advance(conn, upto, None)
                self._done = max(self._done, done)
                if touched:
                    self.on_work(touched, rows)  # after the commit
                if processed < BATCH:
                    return

    def _config(self, state: tables.StateRow) -> SubscriptionConfig | None:
        key = (state.id, state.resource_version)
        if key not in self._configs:
            if len(self._configs) > 10_000:
                self._configs.clear()
            try:
                self._configs[key] = SubscriptionConfig.from_json(state.config, self.topics)
            except Exception as exc:  # a topic removed from the data, say
                log.warning("subscription %s: unusable configuration (%s)", state.id, exc)
                self._configs[key] = None
        return self._configs[key]

    async def _advance(
        self, conn: Connection, upto: Position | None,
        known: tuple[Position, list[OutboxEvent]] | None,
    ) -> tuple[int, Position, set[str], dict[str, list[tables.EventRow]]]:
        """Under the matcher lock, number the events after the matcher's position up to
        ``upto`` or the relay's position; ``known``: events (and the position they follow)
        already read. Returns (events processed, position reached, subscriptions touched,
        their new events)."""
        await conn.lock(self.lock_key)
        saved = await load_positions(conn, POSITION, RELAY)
        cursor = saved[POSITION].position if POSITION in saved else START
        relayed = saved[RELAY].position if RELAY in saved else START
        final = max(relayed, upto or START)
        if cursor >= final:
            return 0, cursor, set(), {}
        if known is not None and known[0] <= cursor:
            events = [e for e in known[1] if cursor < e.position <= final][:BATCH]
        else:
            events = await read_range(conn, cursor, final, BATCH)
        if not events:
            await save_position(conn, POSITION, final)
            return 0, final, set(), {}
        touched, rows = await self._process(conn, events)
        await save_position(conn, POSITION, events[-1].position)
        by_subscription: dict[str, list[tables.EventRow]] = {}
        for sid, number, event_id, rt, rid, version, interaction, ts in rows:
            by_subscription.setdefault(sid, []).append(
                tables.EventRow(number, event_id, rt, rid, version, interaction, ts))
        return len(events), events[-1].position, touched, by_subscription

    async def _process(self, conn: Connection,
                       events: list[OutboxEvent]) -> tuple[set[str], list[tuple[Any, ...]]]:
        live = {s.id: _Live(s, self._config(s), s.events_since_start)
                for s in await tables.matchable(conn)}
        has_subscription_events = any(e.resource_type == "Subscription" for e in events)
        if not live and not has_subscription_events:
            return set(), []
        wanted: list[tuple[str, str, int]] = []
        for e in events:
            if e.resource_type == "Subscription" or self.topics.for_type(e.resource_type):
                wanted.append((e.resource_type, e.id, e.version))
                if e.version > 1 and e.resource_type != "Subscription":
                    wanted.append((e.resource_type, e.id, e.version - 1))
        contents = await versions(conn, wanted)
        parsed: dict[tuple[str, str, int], Any] = {}

        def load(rt: str, id: str, version: int) -> Any:
            key = (rt, id, version)
            if key not in parsed:
                raw = contents.get(key)
                parsed[key] = fjson.loads_fast(raw) if raw else None
            return parsed[key]

        touched: set[str] = set()
        rows: list[tuple[Any, ...]] = []
        candidates: list[tuple[_Live, OutboxEvent]] = []
        for event in events:
            if event.resource_type == "Subscription":
                await self._reconcile(conn, event, load("Subscription", event.id, event.version),
                                      live, touched)
                continue
            topics = self.topics.for_type(event.resource_type)
            if not topics or not any(s.matching for s in live.values()):
                continue
            current = load(event.resource_type, event.id, event.version)
            previous = (load(event.resource_type, event.id, event.version - 1)
                        if event.version > 1 else None)
            if event.interaction == "delete":
                current = None
            values = EventValues(current if current is not None else previous)
            for topic in topics:
                subscribers = [s for s in live.values() if s.matching
                               and s.config is not None and s.config.topic == topic.url]
                if not subscribers or not topic.fires(event.resource_type, event.interaction,
                                                       previous, current):
                    continue
                for sub in sorted(subscribers, key=lambda s: s.state.id):
                    assert sub.config is not None
                    if not accepts(topic, list(sub.config.criteria), event.resource_type, values):
                        continue
                    candidates.append((sub, event))
        allowed = await self._authorised(conn, candidates)
        counted: dict[str, _Live] = {}
        for i, (sub, event) in enumerate(candidates):
            if i not in allowed or sub.gone:
                continue
            sub.count += 1
            rows.append((sub.state.id, sub.count, event.event_id, event.resource_type,
                         event.id, event.version, event.interaction, event.ts))
            touched.add(sub.state.id)
            counted[sub.state.id] = sub
        if rows:
            await tables.add_events(conn, rows)
            await tables.set_event_counts(conn, {sid: s.count for sid, s in counted.items()})
            self.matched += len(rows)
        return touched, rows

    async def _authorised(
        self, conn: Connection, candidates: list[tuple[_Live, OutboxEvent]]
    ) -> set[int]:
        """Indexes of the candidates whose subscription's organisation may see the focus.

        A subscription created without an organisation (dev mode) hears everything."""
        if self.access_rules is None or not candidates:
            return set(range(len(candidates)))
        ids = sorted({sub.state.id for sub, _ in candidates})
        marks = ", ".join("?" for _ in ids)
        owners = {row[0]: row[1] for row in await conn.fetch(
            "SELECT res_id, organization FROM resource_creator WHERE res_type = 'Subscription'"
            f" AND res_id IN ({marks})", ids)}
        wanted: dict[str, set[tuple[str, str]]] = {}
        for sub, event in candidates:
            org = owners.get(sub.state.id)
            if org is not None:
                wanted.setdefault(org, set()).add((event.resource_type, event.id))
        seen: dict[str, set[tuple[str, str]]] = {}
        now = int(time.time() * 1_000_000)
        for org, keys in wanted.items():
            restriction = Restriction(org, DEFAULT_PURPOSE, now, self.access_rules)
            ordered = sorted(keys)
            cond, params = access_sql.visible(restriction, "v", sorted({t for t, _ in ordered}))
            pairs = " OR ".join("(v.res_type = ? AND v.res_id = ?)" for _ in ordered)
            rows = await conn.fetch(
                f"SELECT v.res_type, v.res_id FROM resource v WHERE ({pairs}) AND {cond}",
                [*(x for k in ordered for x in k), *params])
            seen[org] = {(r[0], r[1]) for r in rows}
        out = set()
        for i, (sub, event) in enumerate(candidates):
            org = owners.get(sub.state.id)
            if org is None or (event.resource_type, event.id) in seen.get(org, set()):
                out.add(i)
        return out

    async def _reconcile(self, conn: Connection, event: OutboxEvent, resource: Any,
                         live: dict[str, _Live], touched: set[str]) -> None:
        seen = live.get(event.id)
        state = seen.state if seen is not None else await tables.get_state(conn, event.id)
        if state is not None and event.version <= state.resource_version:
            return  # the dispatcher's own status write, already applied
        if event.interaction == "delete" or not isinstance(resource, dict):
            if state is not None:
                await tables.delete_state(conn, event.id)
            if seen is not None:
                seen.gone = True  # its events found earlier in the round went with it
                del live[event.id]
            return
        config, issues = parse_subscription(resource, self.topics, self.policy, self.settings,
                                            resolve=False)
        now = now_micros()
        said = str(resource.get("status", ""))
        if config is None:
            # not a topic-based subscription of ours (or no longer valid): stop serving it
            if state is not None:
                await tables.upsert_state(
                    conn, id=event.id, resource_version=event.version, resource_status=said,
                    topic=state.topic, channel=state.channel, status="off",
                    config=state.config, heartbeat=0, end_at=0, handshake_pending=False,
                    now=now, reset_retry=False)
                await tables.set_status(conn, event.id, "off",
                                        "; ".join(i.diagnostics or "" for i in issues)[:1000])
            if seen is not None:
                seen.matching = False
            return
        status, handshake, reset = self._next_status(state, config, said)
        if config.channel == "websocket" and status == "requested":
            status, handshake = "active", False  # the handshake goes out when a socket binds
        await tables.upsert_state(
            conn, id=event.id, resource_version=event.version, resource_status=said,
            topic=config.topic, channel=config.channel, status=status, config=config.to_json(),
            heartbeat=config.heartbeat, end_at=config.end, handshake_pending=handshake,
            now=now, reset_retry=reset)
        fresh = await tables.get_state(conn, event.id)
        assert fresh is not None
        if seen is None:
            live[event.id] = _Live(fresh, config, fresh.events_since_start, status != "off")
        else:  # the same object: events found before this write keep their numbers
            seen.state, seen.config, seen.matching = fresh, config, status != "off"
        self._configs[(event.id, event.version)] = config
        touched.add(event.id)

    @staticmethod
    def _next_status(state: tables.StateRow | None, config: SubscriptionConfig,
                     said: str) -> tuple[str, bool, bool]:
        """(status, handshake pending, reset retries) after a client's write."""
        if said == "off":
            return "off", False, False
        if state is None:
            return "requested", True, True
        old = orjson.loads(state.config)
        moved = (old.get("endpoint"), old.get("channel")) != (config.endpoint, config.channel)
        if said == "requested" or moved:
            return "requested", True, True
        if said != state.status and said != state.resource_status and said == "active":
            return "requested", True, True  # the client reactivates it: handshake first
        return state.status, state.handshake_pending, False
