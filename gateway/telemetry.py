"""The process's Prometheus metrics (prometheus_client's registry), counted where
the work happens; ``gateway.api.metrics`` serves them at ``/metrics``.

With ``PROMETHEUS_MULTIPROC_DIR`` set before the process starts (``carepath serve
--workers N`` does), the counts go to files there that every worker's
``/metrics`` sums.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Histogram, disable_created_metrics

disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series

REQUESTS = Counter("carepath_requests", "FHIR requests answered, by interaction and status"
                   " class", ["interaction", "status"])
DURATION = Histogram("carepath_request_duration_seconds", "Time to answer a FHIR request, by"
                     " interaction", ["interaction"],
                     buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                              2.5, 5.0, 10.0))
NOTIFICATIONS = Counter("carepath_notifications", "Subscription notifications sent"
                        " (handshakes and heartbeats included), by channel and outcome",
                        ["channel", "outcome"])

#: the labelled series by (interaction, status class): a dict look-up per request
#: instead of the client's locked one for each metric
_SERIES: dict[tuple[str, int], tuple[Any, Any]] = {}


def request(interaction: str, status: int, seconds: float) -> None:
    key = (interaction, status // 100)
    series = _SERIES.get(key)
    if series is None:
        series = _SERIES[key] = (REQUESTS.labels(interaction, f"{key[1]}xx"),
                                 DURATION.labels(interaction))
    series[0].inc()
    series[1].observe(seconds)


def notification(channel: str, delivered: bool) -> None:
    NOTIFICATIONS.labels(channel, "delivered" if delivered else "failed").inc()
