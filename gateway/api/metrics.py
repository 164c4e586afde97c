"""Prometheus metrics at ``GET /metrics`` (text exposition format).

Counted where the work happens (``gateway.telemetry``): every FHIR request, by
interaction as the AuditEvent names it and by status class
(``carepath_requests_total``, the latency histogram
``carepath_request_duration_seconds``), and every subscription notification by
channel and outcome (``carepath_notifications_total``). At each scrape, from the database, what
waits: ``carepath_outbox_pending_events`` (committed, not yet published to the
bus), ``carepath_audit_unchained_records``, ``carepath_subscriptions`` by status
and ``carepath_subscription_undelivered_events``. The last three are what to
alert on when notifications of a handoff stop reaching their receivers.

Several worker processes (``carepath serve --workers N``) share their counts
through the prometheus_client multiprocess directory the command sets up
(``PROMETHEUS_MULTIPROC_DIR``), so any worker's answer holds them all. Outside
the FHIR base: no token, not audited, no patient data.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily

from gateway import telemetry
from gateway.events.relay import RELAY
from gateway.storage.backlog import Backlog, backlog
from gateway.storage.db import Database

log = logging.getLogger("carepath.metrics")

PATH = "/metrics"
MEDIA_TYPE = CONTENT_TYPE_LATEST
observe = telemetry.request


class _Waiting:
    """The backlog read at this scrape, as gauges; ``None``: the database did not
    answer (``carepath_backlog_readable`` 0, and the request counts still served)."""

    def __init__(self, waiting: Backlog | None) -> None:
        self.waiting = waiting

    def collect(self) -> Any:
        w = self.waiting
        yield GaugeMetricFamily("carepath_backlog_readable",
                                "1 when the backlog below was read from the database",
                                value=0 if w is None else 1)
        if w is None:
            return
        yield GaugeMetricFamily("carepath_outbox_pending_events",
                                "Events committed and not yet published to the event bus",
                                value=w.outbox_events)
        yield GaugeMetricFamily("carepath_audit_unchained_records",
                                "Audit records committed and not yet hash-chained",
                                value=w.audit_records)
        subscriptions = GaugeMetricFamily("carepath_subscriptions", "Subscriptions by status",
                                          labels=["status"])
        for status in sorted({"requested", "active", "error", "off", *w.subscriptions}):
            subscriptions.add_metric([status], w.subscriptions.get(status, 0))
        yield subscriptions
        yield GaugeMetricFamily("carepath_subscription_undelivered_events",
                                "Events matched for active or failing subscriptions and not"
                                " yet delivered", value=w.undelivered_events)


async def exposition(db: Database) -> bytes:
    """The metrics of every worker process, and what waits in the database."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        requests = generate_latest(registry)
    else:
        requests = generate_latest(REGISTRY)
    try:
        async with asyncio.timeout(2):
            read: Backlog | None = await backlog(db, RELAY)
    except Exception as exc:  # the scrape still answers: what this process counted
        log.warning("metrics: the backlog cannot be read: %s", exc)
        read = None
    waiting = CollectorRegistry()
    waiting.register(_Waiting(read))
    return requests + generate_latest(waiting)
