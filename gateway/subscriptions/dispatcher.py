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

Progress is kept in memory and written for all subscriptions together every
``FLUSH_S`` (one transaction; it also extends the leases), and always before
a lease is let go, on failures, handshakes and at shutdown. Events the local
matcher numbered reach the dispatcher in memory too, so a steady stream costs
no database round trip per notification. A process crash loses at most the
unwritten progress: those events are sent again after the lease expires
(timeout + 5 s), with the same event numbers. A slow or dead subscriber only
ever holds its own task and lease; ``CAREPATH_SUBSCRIPTION_CONCURRENCY``
bounds deliveries in flight per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from gateway import tasks, telemetry
from gateway.fhir import json as fjson
from gateway.fhir import xml as fhir_xml
from gateway.fhir.validation.model import Model
from gateway.settings import Settings
from gateway.storage import subscription_tables as tables
from gateway.storage.db import Database
from gateway.storage.interface import Store, StoreTransaction
from gateway.storage.outbox import versions
from gateway.subscriptions.delivery import DeliveryFailed, RestHookSender
from gateway.subscriptions.notification import NotificationEvent, dumps, notification
from gateway.subscriptions.subscription import XML_MIME, SubscriptionConfig
from gateway.subscriptions.topics import TopicRegistry

log = logging.getLogger("carepath.subscriptions")
# a private generator: background jitter must not touch the global random state
_JITTER = random.SystemRandom()

LEASE_MARGIN_S = 5
#: how often delivery progress is written (and leases extended)
FLUSH_S = 0.02
#: events kept in memory per subscription beyond those delivered
CACHE_MAX = 2_000
#: an idle subscriber's lease is kept this long for events that follow closely
LINGER_S = 0.1
#: a websocket channel: send(bundle bytes) to the sockets bound to a subscription
WsSend = Callable[[str, bytes], Awaitable[bool]]


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
        #: the definitions notifications in FHIR XML are written with (set at startup)
        self.xml_model: Model | None = None
        self.owner = f"{uuid.uuid4().hex[:16]}"
        self._running: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self._slots = asyncio.Semaphore(settings.subscription_concurrency)
        self._poller: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._stopping = False
        self._configs: dict[tuple[str, int], SubscriptionConfig] = {}
        #: events the local matcher numbered, by subscription, ascending
        self._cache: dict[str, list[tables.EventRow]] = {}
        #: highest event number the local matcher assigned, by subscription
        self._known: dict[str, int] = {}
        #: delivered but not yet written: subscription -> (delivered number, last sent)
        self._progress: dict[str, tuple[int, int]] = {}
        #: leases held: subscription -> (until (epoch µs), the subscription's timeout in s)
        self._leases: dict[str, tuple[int, int]] = {}
        self._lost: set[str] = set()
        #: set when work arrives for a subscription whose task is lingering
        self._wakeups: dict[str, asyncio.Event] = {}
        #: subscriptions whose state changed other than by new events (re-read it)
        self._dirty: set[str] = set()
        #: progress is written before a lease is let go, never after (it would be lost)
        self._writing = asyncio.Lock()
        self.sent = 0  # notifications delivered by this process (metrics, tests)

    # -- scheduling ---------------------------------------------------------

    def notify(self, ids: set[str],
               rows: dict[str, list[tables.EventRow]] | None = None) -> None:
        """Work for ``ids``; ``rows``: events just numbered for them (after commit)."""
        for sid, new in (rows or {}).items():
            if not new:
                continue
            cache = self._cache.setdefault(sid, [])
            if cache and new[0].number != cache[-1].number + 1:
                cache.clear()  # a gap (another process numbered some): read from the DB
            cache.extend(new)
            if len(cache) > CACHE_MAX:
                del cache[: len(cache) - CACHE_MAX]
            self._known[sid] = max(self._known.get(sid, 0), new[-1].number)
        for sid in ids:
            if rows is None or sid not in rows:
                self._dirty.add(sid)
            self._kick(sid)

    def _kick(self, sid: str) -> None:
        if self._stopping:
            return
        if sid in self._running:
            self._again.add(sid)
            wakeup = self._wakeups.get(sid)
            if wakeup is not None:
                wakeup.set()
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
        self._flusher = asyncio.create_task(self._flush_loop(), name="subscription-flusher")

    async def stop(self) -> None:
        self._stopping = True
        await tasks.cancel(self._poller, self._flusher, *self._running.values())
        self._running.clear()
        with contextlib.suppress(Exception):  # a clean stop writes what was delivered
            await self._flush(release=True)
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

    # -- progress -------------------------------------------------------------

    async def _flush_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(FLUSH_S)
            try:
                await self._flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("writing delivery progress failed: %s", exc)

    async def _flush(self, *, release: bool = False) -> None:
        """Write progress and extend leases running short (``release``: let all go)."""
        async with self._writing:
            await self._flush_locked(release)

    async def _flush_locked(self, release: bool) -> None:
        now = now_micros()
        # a lease is renewed when it has less than (timeout + 3 s) left, to timeout + 5 s
        due = {sid for sid, (until, timeout) in self._leases.items()
               if until < now + (timeout + 3) * 1_000_000}
        if not self._progress and not due and not release:
            return
        taken, self._progress = self._progress, {}
        progress: dict[str, tuple[int, int, int]] = {}
        for sid in set(taken) | due:
            number, sent = taken.get(sid, (0, 0))
            _until, timeout = self._leases.get(sid, (0, self.settings.subscription_timeout))
            progress[sid] = (number, sent, now + (timeout + LEASE_MARGIN_S) * 1_000_000)
        try:
            async with self.db.transaction() as conn:
                held = await tables.record_progress(conn, self.owner, progress)
                if release:
                    for sid in sorted(self._leases):
                        await tables.release(conn, sid, self.owner)
        except BaseException:
            for sid, (number, sent, _until) in progress.items():  # keep it for next time
                if number:
                    old = self._progress.get(sid, (0, 0))
                    self._progress[sid] = (max(old[0], number), max(old[1], sent))
            raise
        for sid, (_n, _s, until) in progress.items():
            if sid in self._leases:
                if sid in held:
                    self._leases[sid] = (until, self._leases[sid][1])
                else:
                    self._lost.add(sid)

    def _merge(self, state: tables.StateRow) -> tables.StateRow:
        """The DB state plus what this process knows and has not written yet."""
        done = self._progress.get(state.id)
        if done and done[0] > state.delivered_number:
            state = replace(state, delivered_number=done[0], last_sent=max(done[1],
                                                                            state.last_sent))
        known = self._known.get(state.id, 0)
        if known > state.events_since_start:
            state = replace(state, events_since_start=known)
        return state

    def _take_progress(self, sid: str, number: int | None) -> int | None:
        """Unwritten progress of ``sid`` folded into ``number`` (for an immediate write)."""
        done = self._progress.pop(sid, None)
        if done is None:
            return number
        return max(done[0], number or 0)

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
        self._leases[sid] = (state.lease_until, self.settings.subscription_timeout)
        self._lost.discard(sid)
        self._dirty.discard(sid)
        last = self._merge(state)
        current: tables.StateRow | None = last
        try:
            while current is not None and sid not in self._lost:
                current = await self._step(current)
                if current is not None:
                    last = current
                    continue
                if not await self._linger(sid, last):
                    break
                if sid in self._dirty:
                    self._dirty.discard(sid)
                    current = await self._reread(sid)
                else:
                    current = self._merge(last)
        finally:
            self._wakeups.pop(sid, None)
            self._leases.pop(sid, None)
            async with self._writing, self.db.transaction() as conn:
                number = self._take_progress(sid, None)
                if number:
                    await tables.record_progress(
                        conn, self.owner, {sid: (number, now_micros(), now_micros())})
                after = await tables.release(conn, sid, self.owner)
            if after is not None:
                self._forget(sid, after.delivered_number)
                if self._has_work(after):
                    self._again.add(sid)

    async def _linger(self, sid: str, last: tables.StateRow) -> bool:
        """Keep the lease of a healthy, idle subscription a moment; True if work came."""
        if last.status != "active" or last.attempts or self._stopping:
            return False
        if sid in self._again:
            self._again.discard(sid)
            return True
        wakeup = self._wakeups.setdefault(sid, asyncio.Event())
        wakeup.clear()
        try:
            async with asyncio.timeout(LINGER_S):  # no extra task, unlike wait_for
                await wakeup.wait()
        except TimeoutError:
            return False
        self._again.discard(sid)
        return True

    def _forget(self, sid: str, delivered: int) -> None:
        cache = self._cache.get(sid)
        if cache:
            while cache and cache[0].number <= delivered:
                cache.pop(0)
            if not cache:
                self._cache.pop(sid, None)

    def _cached(self, sid: str, first: int, batch: int) -> list[tables.EventRow]:
        cache = self._cache.get(sid, [])
        while cache and cache[0].number < first:
            cache.pop(0)
        if not cache or cache[0].number != first:
            return []
        return cache[:batch]

    def _has_work(self, s: tables.StateRow) -> bool:
        if s.status not in ("requested", "active") or s.next_attempt > now_micros():
            return False
        if s.channel == "websocket" and not self.ws_bound(s.id):
            return False
        known = max(s.events_since_start, self._known.get(s.id, 0))
        return known > s.delivered_number or s.resend_from is not None

    async def _reread(self, sid: str) -> tables.StateRow | None:
        async with self.db.read() as conn:
            state = await tables.get_state(conn, sid)
        return self._merge(state) if state is not None else None

    async def _step(self, state: tables.StateRow) -> tables.StateRow | None:
        """Do the next piece of work: the state to go on with (None: nothing to do now)."""
        now = now_micros()
        config = self._config(state)
        if state.end_at and state.end_at <= now and state.status != "off":
            async with self.db.transaction() as conn:
                await tables.set_status(conn, state.id, "off", "the subscription's end passed")
            return await self._reread(state.id)
        if state.status != state.resource_status and state.status != "requested":
            return await self._reread(state.id) if await self._sync_resource(state) else None
        if state.status not in ("requested", "active") or state.next_attempt > now:
            return None
        if config.channel == "websocket" and not self.ws_bound(state.id):
            return None
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
                    after = await tables.delivered(
                        conn, state.id, self.owner,
                        number=self._take_progress(state.id, None), sent=state.last_sent,
                        until=self._lease_until(config), resend_done=True)
                return self._merge(after) if after else None
            body = await self._event_bundle(state, config, topic_url, rows)
            return await self._deliver(state, config, body, resend_to=(last, done))
        if state.events_since_start > state.delivered_number:
            first = state.delivered_number + 1
            rows = self._cached(state.id, first, batch)
            if not rows:
                rows = await self._events(state.id, first, first + batch - 1)
            if not rows:
                log.error("subscription %s: events %d.. missing", state.id, first)
                return None
            body = await self._event_bundle(state, config, topic_url, rows)
            return await self._deliver(state, config, body, number=rows[-1].number)
        heartbeat_due = state.last_sent + config.heartbeat * 1_000_000 <= now
        if state.status == "active" and config.heartbeat and heartbeat_due:
            body = notification(base=self.base_url, subscription_id=state.id, topic=topic_url,
                                status="active", type_="heartbeat",
                                events_since_start=state.events_since_start, events=[],
                                content=config.content, now=now)
            return await self._deliver(state, config, body)
        return None

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
        # "the total number of actual events which have been generated since the
        # Subscription was created", not only up to the last one this notification
        # carries (a backlog goes out in several)
        return notification(base=self.base_url, subscription_id=state.id, topic=topic,
                            status="active", type_="event-notification",
                            events_since_start=max(state.events_since_start,
                                                   rows[-1].number),
                            events=events_of(rows), content=config.content,
                            contents=contents)

    async def _deliver(self, state: tables.StateRow, config: SubscriptionConfig,
                       bundle: dict[str, Any], *, handshake: bool = False,
                       number: int | None = None,
                       resend_to: tuple[int, bool] | None = None) -> tables.StateRow | None:
        body = dumps(bundle)
        if config.mime.split(";")[0].strip() == XML_MIME and self.xml_model is not None:
            body = fhir_xml.dumps(body, self.xml_model)
        # the lease must outlast this send (the flusher extends it in the background)
        held_until = self._leases.get(state.id, (0, 0))[0]
        self._leases[state.id] = (held_until, config.timeout)
        if held_until - now_micros() < (config.timeout + 1) * 1_000_000:
            until = self._lease_until(config)
            async with self.db.transaction() as conn:
                if not await tables.renew(conn, state.id, self.owner, until):
                    self._lost.add(state.id)
                    return None  # lost the lease (too slow): the new holder goes on
            self._leases[state.id] = (until, config.timeout)
        try:
            async with self._slots:
                if config.channel == "websocket":
                    if self.ws_send is None or not await self.ws_send(state.id, body):
                        return None
                else:
                    await self.sender.send(config, body)
        except DeliveryFailed as exc:
            telemetry.notification(config.channel, False)
            await self._failed(state, config, exc, handshake=handshake)
            return await self._reread(state.id)  # the failure may have changed the status
        self.sent += 1
        telemetry.notification(config.channel, True)
        now = now_micros()
        if not handshake and resend_to is None and not state.attempts and not state.last_error:
            # the common case: remember, write with the next flush, go on
            delivered = number if number is not None else state.delivered_number
            self._progress[state.id] = (delivered, now)
            self._forget(state.id, delivered)
            return self._merge(replace(state, delivered_number=delivered, last_sent=now))
        until = self._lease_until(config)
        async with self.db.transaction() as conn:
            if resend_to is not None:
                last, done = resend_to
                if not done:
                    await tables.resend_progress(conn, state.id, self.owner, last + 1)
                after = await tables.delivered(conn, state.id, self.owner,
                                               number=self._take_progress(state.id, None),
                                               sent=now, until=until, resend_done=done)
            else:
                after = await tables.delivered(conn, state.id, self.owner,
                                               number=self._take_progress(state.id, number),
                                               sent=now, until=until,
                                               handshake_done=handshake,
                                               status="active" if handshake else None)
        if after is None:
            self._lost.add(state.id)
            return None
        self._leases[state.id] = (until, config.timeout)
        return self._merge(after)

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
        number = self._take_progress(state.id, None)
        async with self.db.transaction() as conn:
            if number:
                await tables.record_progress(conn, self.owner,
                                             {state.id: (number, now, self._lease_until(config))})
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
            resource = fjson.loads_fast(current.content)
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
