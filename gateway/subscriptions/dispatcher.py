"""The dispatcher: numbered events → notifications, in order, at least once.

Each process runs one. Work for a subscription is done by one asyncio task at
a time in this process and, across processes, by whoever holds the
subscription's lease (``lease_owner``/``lease_until``, taken with a
conditional UPDATE). The holder, in a loop:

1. brings the Subscription resource's ``status``/``error`` in line with the
   delivery state (a new resource version, only if the client has not
   changed the resource meanwhile);
2. sends the handshake of a ``requested`` subscription; success → ``active``;
   ``CAREPATH_SUBSCRIPTION_HANDSHAKE_ATTEMPTS`` failures → ``error``;
3. re-sends a range asked for with ``$resend``;
4. sends the next events after ``delivered_number`` (at most ``maxCount``
   per notification) and advances ``delivered_number`` after a 2xx;
5. sends a heartbeat when nothing went out for ``heartbeatPeriod``.

A failure schedules the next attempt with exponential backoff and jitter
(``CAREPATH_SUBSCRIPTION_RETRY_INITIAL_MS`` doubling up to ``…_MAX_MS``);
after ``CAREPATH_SUBSCRIPTION_RETRY_PERIOD`` seconds of failures the
subscription turns ``error`` with the reason in ``Subscription.error``.
Events keep being numbered meanwhile and are delivered once the subscriber
is back (or reactivated), so nothing is skipped.

A process crash between a 2xx and the ``delivered_number`` update sends
those events again after the lease expires (timeout + 5 s): duplicates carry
the same event numbers. A slow or dead subscriber only ever holds its own
task and lease; ``CAREPATH_SUBSCRIPTION_CONCURRENCY`` bounds deliveries in
flight per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from gateway.settings import Settings
from gateway.storage import subscription_tables as tables
from gateway.storage.db import Database
from gateway.storage.interface import Store, StoreTransaction
from gateway.storage.outbox import versions
from gateway.subscriptions.delivery import DeliveryFailed, RestHookSender
from gateway.subscriptions.notification import NotificationEvent, dumps, notification
from gateway.subscriptions.subscription import SubscriptionConfig
from gateway.subscriptions.topics import TopicRegistry

log = logging.getLogger("carepath.subscriptions")
# a private generator: background jitter must not touch the global random state
_JITTER = random.SystemRandom()

LEASE_MARGIN_S = 5
#: a websocket channel: send(bundle bytes) to the sockets bound to a subscription
WsSend = Callable[[str, bytes], Awaitable[bool]]
#: what a step leaves: the state to go on with (None: stop), events already read
Step = tuple["tables.StateRow | None", "list[tables.EventRow] | None"]


def now_micros() -> int:
    return int(time.time() * 1_000_000)


def events_of(rows: list[tables.EventRow]) -> list[NotificationEvent]:
    return [NotificationEvent(r.number, r.ts, r.resource_type, r.id, r.version, r.interaction)
            for r in rows]


class Dispatcher:
    def __init__(self, db: Database, store: Store, topics: TopicRegistry, settings: Settings,
                 sender: RestHookSender, *, base_url: str,
                 ws_bound: Callable[[str], bool] | None = None,
                 ws_send: WsSend | None = None) -> None:
        self.db = db
        self.store = store
        self.topics = topics
        self.settings = settings
        self.sender = sender
        self.base_url = base_url.rstrip("/")
        self.ws_bound = ws_bound or (lambda _id: False)
        self.ws_send = ws_send
        self.owner = f"{uuid.uuid4().hex[:16]}"
        self._running: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self._slots = asyncio.Semaphore(settings.subscription_concurrency)
        self._poller: asyncio.Task[None] | None = None
        self._stopping = False
        self._configs: dict[tuple[str, int], SubscriptionConfig] = {}
        self.sent = 0  # notifications delivered by this process (metrics, tests)

    # -- scheduling ---------------------------------------------------------

    def notify(self, ids: set[str]) -> None:
        for sid in ids:
            self._kick(sid)

    def _kick(self, sid: str) -> None:
        if self._stopping:
            return
        if sid in self._running:
            self._again.add(sid)
            return
        self._running[sid] = asyncio.create_task(self._work(sid), name=f"subscription-{sid}")

    async def _work(self, sid: str) -> None:
        try:
            await self._serve(sid)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("subscription %s: delivery round failed", sid)
        finally:
            self._running.pop(sid, None)
            if sid in self._again:
                self._again.discard(sid)
                self._kick(sid)

    async def start(self) -> None:
        self._poller = asyncio.create_task(self._poll(), name="subscription-poller")

    async def stop(self) -> None:
        self._stopping = True
        tasks = [t for t in (self._poller, *self._running.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._running.clear()
        await self.sender.close()

    async def _poll(self) -> None:
        interval = self.settings.subscription_poll_ms / 1000
        while not self._stopping:
            try:
                async with self.db.read() as conn:
                    due = await tables.due(conn, now_micros(), 1000)
                for sid, channel in due:
                    # a websocket subscription is served where its socket is
                    if sid not in self._running and (channel != "websocket"
                                                     or self.ws_bound(sid)):
                        self._kick(sid)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("subscription poll failed: %s", exc)
            await asyncio.sleep(interval * (0.8 + 0.4 * _JITTER.random()))

    # -- one subscription ---------------------------------------------------

    def _config(self, state: tables.StateRow) -> SubscriptionConfig:
        key = (state.id, state.resource_version)
        config = self._configs.get(key)
        if config is None:
            if len(self._configs) > 10_000:
                self._configs.clear()
            config = self._configs[key] = SubscriptionConfig.from_json(state.config, self.topics)
        return config

    def _lease_until(self, config: SubscriptionConfig | None) -> int:
        timeout = config.timeout if config else self.settings.subscription_timeout
        return now_micros() + (timeout + LEASE_MARGIN_S) * 1_000_000

    async def _serve(self, sid: str) -> None:
        async with self.db.transaction() as conn:
            state = await tables.acquire(conn, sid, self.owner, self._lease_until(None),
                                         now_micros())
        if state is None:
            return  # another process has it; it looks again before letting go
        rows: list[tables.EventRow] | None = None
        try:
            while state is not None:
                state, rows = await self._step(state, rows)
        finally:
            async with self.db.transaction() as conn:
                after = await tables.release(conn, sid, self.owner)
            if after is not None and self._has_work(after):
                self._again.add(sid)

    def _has_work(self, s: tables.StateRow) -> bool:
        if s.status not in ("requested", "active") or s.next_attempt > now_micros():
            return False
        if s.channel == "websocket" and not self.ws_bound(s.id):
            return False
        return s.events_since_start > s.delivered_number or s.resend_from is not None

    async def _reread(self, sid: str) -> Step:
        async with self.db.read() as conn:
            return await tables.get_state(conn, sid), None

    async def _step(self, state: tables.StateRow, rows: list[tables.EventRow] | None) -> Step:
        """Do the next piece of work: the state to go on with (None: nothing to do now).

        ``rows``: the next events, when the previous step already read them.
        """
        now = now_micros()
        config = self._config(state)
        if state.end_at and state.end_at <= now and state.status != "off":
            async with self.db.transaction() as conn:
                await tables.set_status(conn, state.id, "off", "the subscription's end passed")
            return await self._reread(state.id)
        if state.status != state.resource_status and state.status != "requested":
            if await self._sync_resource(state):
                return await self._reread(state.id)
            return None, None
        if state.status not in ("requested", "active") or state.next_attempt > now:
            return None, None
        if config.channel == "websocket" and not self.ws_bound(state.id):
            return None, None
        topic = self.topics.get(config.topic)
        topic_url = topic.url if topic else config.topic
        if state.handshake_pending:
            body = notification(base=self.base_url, subscription_id=state.id, topic=topic_url,
                                status="requested", type_="handshake",
                                events_since_start=state.events_since_start, events=[],
                                content=config.content, now=now)
            return await self._deliver(state, config, body, handshake=True)
        batch = config.max_count or self.settings.subscription_max_batch
        if state.resend_from is not None and state.resend_to is not None:
            last = min(state.resend_to, state.resend_from + batch - 1)
            rows = await self._events(state.id, state.resend_from, last)
            done = last >= state.resend_to
            if not rows:
                async with self.db.transaction() as conn:
                    after = await tables.delivered(conn, state.id, self.owner, number=None,
                                                   sent=state.last_sent,
                                                   until=self._lease_until(config),
                                                   resend_done=True)
                return after, None
            body = await self._event_bundle(state, config, topic_url, rows)
            return await self._deliver(state, config, body, resend_to=(last, done))
        if state.events_since_start > state.delivered_number:
            first = state.delivered_number + 1
            if not rows or rows[0].number != first:
                rows = await self._events(state.id, first, first + batch - 1)
            if not rows:
                log.error("subscription %s: events %d.. missing", state.id, first)
                return None, None
            body = await self._event_bundle(state, config, topic_url, rows)
            return await self._deliver(state, config, body, number=rows[-1].number)
        heartbeat_due = state.last_sent + config.heartbeat * 1_000_000 <= now
        if state.status == "active" and config.heartbeat and heartbeat_due:
            body = notification(base=self.base_url, subscription_id=state.id, topic=topic_url,
                                status="active", type_="heartbeat",
                                events_since_start=state.events_since_start, events=[],
                                content=config.content, now=now)
            return await self._deliver(state, config, body)
        return None, None

    async def _events(self, sid: str, first: int, last: int) -> list[tables.EventRow]:
        async with self.db.read() as conn:
            return await tables.events_between(conn, sid, first, last, last - first + 1)

    async def _event_bundle(self, state: tables.StateRow, config: SubscriptionConfig,
                            topic: str, rows: list[tables.EventRow]) -> dict[str, Any]:
        contents: dict[tuple[str, str, int], bytes | None] = {}
        if config.content == "full-resource":
            async with self.db.read() as conn:
                contents = await versions(conn, [(r.resource_type, r.id, r.version)
                                                 for r in rows])
        return notification(base=self.base_url, subscription_id=state.id, topic=topic,
                            status="active", type_="event-notification",
                            events_since_start=rows[-1].number, events=events_of(rows),
                            content=config.content, contents=contents)

    async def _deliver(self, state: tables.StateRow, config: SubscriptionConfig,
                       bundle: dict[str, Any], *, handshake: bool = False,
                       number: int | None = None,
                       resend_to: tuple[int, bool] | None = None) -> Step:
        body = dumps(bundle)
        until = self._lease_until(config)
        # the lease must outlast this send; every recorded delivery extends it
        if state.lease_until - now_micros() < (config.timeout + 1) * 1_000_000:
            async with self.db.transaction() as conn:
                if not await tables.renew(conn, state.id, self.owner, until):
                    return None, None  # lost the lease (too slow): the new holder goes on
        try:
            async with self._slots:
                if config.channel == "websocket":
                    if self.ws_send is None or not await self.ws_send(state.id, body):
                        return None, None
                else:
                    await self.sender.send(config, body)
        except DeliveryFailed as exc:
            await self._failed(state, config, exc, handshake=handshake)
            return await self._reread(state.id)  # the failure may have changed the status
        self.sent += 1
        until = self._lease_until(config)
        rows: list[tables.EventRow] | None = None
        async with self.db.transaction() as conn:
            if resend_to is not None:
                last, done = resend_to
                if not done:
                    await tables.resend_progress(conn, state.id, self.owner, last + 1)
                after = await tables.delivered(conn, state.id, self.owner, number=None,
                                               sent=now_micros(), until=until, resend_done=done)
            else:
                after = await tables.delivered(conn, state.id, self.owner, number=number,
                                               sent=now_micros(), until=until,
                                               handshake_done=handshake,
                                               status="active" if handshake else None)
            if (after is not None and after.events_since_start > after.delivered_number
                    and after.resend_from is None and not after.handshake_pending):
                # read the next batch in the same round trip to the database
                batch = config.max_count or self.settings.subscription_max_batch
                first = after.delivered_number + 1
                rows = await tables.events_between(conn, state.id, first, first + batch - 1,
                                                   batch)
        return after, rows

    async def _failed(self, state: tables.StateRow, config: SubscriptionConfig,
                      exc: DeliveryFailed, *, handshake: bool) -> None:
        now = now_micros()
        attempts = state.attempts + 1
        since = state.failing_since or now
        status: str | None = None
        what = "handshake" if handshake else "notification"
        reason = f"{what} to {config.endpoint or 'websocket'} failed: {exc.reason}"
        handshake_over = handshake and attempts >= self.settings.subscription_handshake_attempts
        if exc.permanent or handshake_over:
            status = "error"
        elif now - since >= self.settings.subscription_retry_period * 1_000_000:
            status = "error"
            reason += f" (retried for {self.settings.subscription_retry_period} s)"
        initial = self.settings.subscription_retry_initial_ms
        delay_ms = min(self.settings.subscription_retry_max_ms,
                       initial * 2 ** min(attempts - 1, 30))
        delay_ms = int(delay_ms * (0.5 + _JITTER.random() / 2))  # equal jitter
        log.warning("subscription %s: %s (attempt %d%s)", state.id, reason, attempts,
                    "; now error" if status else f"; next in {delay_ms} ms")
        async with self.db.transaction() as conn:
            await tables.failed(conn, state.id, self.owner, attempts=attempts,
                                next_attempt=now + delay_ms * 1000, failing_since=since,
                                error=reason, status=status)

    async def _sync_resource(self, state: tables.StateRow) -> bool:
        """Write the delivery status into the Subscription resource (a new version)."""
        status, error = state.status, state.last_error if state.status == "error" else None
        expected = state.resource_version

        async def work(tx: StoreTransaction) -> int | None:
            await tx.lock(f"Subscription/{state.id}")
            current = await tx.current("Subscription", state.id)
            if current is None or current.deleted or current.version != expected:
                return None  # the client changed it; the matcher will tell us
            assert current.content is not None
            resource = orjson.loads(current.content)
            resource["status"] = status
            if error:
                resource["error"] = error[:1000]
            else:
                resource.pop("error", None)
            stored = await tx.put("Subscription", state.id, resource, "PUT", current)
            return stored.version

        version = await self.store.run(work)
        if version is None:
            return False
        async with self.db.transaction() as conn:
            await tables.note_resource_version(conn, state.id, version, status)
        return True
