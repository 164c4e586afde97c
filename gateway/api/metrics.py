"""Prometheus metrics at ``GET /metrics`` (text exposition format).

Per request (every FHIR request, by interaction as the AuditEvent names it and
by status class): ``carepath_requests_total`` and the latency histogram
``carepath_request_duration_seconds``. At each scrape, from the database, what
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

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily

from gateway.storage.backlog import Backlog, backlog
from gateway.storage.db import Database

disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series

PATH = "/metrics"
MEDIA_TYPE = CONTENT_TYPE_LATEST

REQUESTS = Counter("carepath_requests", "FHIR requests answered, by interaction and status"
                   " class", ["interaction", "status"])
DURATION = Histogram("carepath_request_duration_seconds", "Time to answer a FHIR request, by"
                     " interaction", ["interaction"],
                     buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                              2.5, 5.0, 10.0))


#: the labelled series by (interaction, status class): a dict look-up per request
#: instead of the client's locked one for each metric
_SERIES: dict[tuple[str, int], tuple[Any, Any]] = {}


def observe(interaction: str, status: int, seconds: float) -> None:
    key = (interaction, status // 100)
    series = _SERIES.get(key)
    if series is None:
        series = _SERIES[key] = (REQUESTS.labels(interaction, f"{key[1]}xx"),
                                 DURATION.labels(interaction))
    series[0].inc()
    series[1].observe(seconds)


class _Waiting:
    """The backlog read at this scrape, as gauges."""

    def __init__(self, waiting: Backlog) -> None:
        self.waiting = waiting

    def collect(self) -> Any:
        w = self.waiting
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
    waiting = CollectorRegistry()
    waiting.register(_Waiting(await backlog(db)))
    return requests + generate_latest(waiting)
