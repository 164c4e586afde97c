"""``/metrics``: Prometheus counts of FHIR requests, summed over worker processes,
and what waits in the database."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Server
from tests.integration.serve import Served

FHIR = "application/fhir+json"


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _requests(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float],
              interaction: str, status: str) -> float:
    return samples.get(("carepath_requests_total", (("interaction", interaction),
                                                     ("status", status))), 0.0)


def test_requests_are_counted_and_timed(server: Server) -> None:
    root = server.url.rsplit("/fhir", 1)[0]
    before = _samples(httpx.get(f"{root}/metrics").text)
    created = httpx.post(f"{server.url}/Patient", json={"resourceType": "Patient"},
                         headers={"Content-Type": FHIR})
    rid = created.json()["id"]
    for _ in range(3):
        assert httpx.get(f"{server.url}/Patient/{rid}").status_code == 200
    assert httpx.get(f"{server.url}/Patient/{rid}-none").status_code == 404
    scraped = httpx.get(f"{root}/metrics")
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    after = _samples(scraped.text)
    # other tests share this server: at least what this one did, counted by kind
    assert _requests(after, "read", "2xx") - _requests(before, "read", "2xx") >= 3
    assert _requests(after, "read", "4xx") - _requests(before, "read", "4xx") >= 1
    assert _requests(after, "create", "2xx") - _requests(before, "create", "2xx") >= 1
    timed = after[("carepath_request_duration_seconds_count", (("interaction", "read"),))]
    assert timed >= _requests(after, "read", "2xx") + _requests(after, "read", "4xx")
    # what waits, read from the database at the scrape
    for name in ("carepath_outbox_pending_events", "carepath_audit_unchained_records",
                 "carepath_subscription_undelivered_events"):
        assert (name, ()) in after
    assert ("carepath_subscriptions", (("status", "active"),)) in after
    assert not re.search(r"^carepath_requests_created", scraped.text, re.M)


def test_workers_are_summed(tmp_path: Path) -> None:
    """Whichever worker answers the scrape, it reports every worker's requests."""
    env = {"CAREPATH_DATABASE_URL": f"sqlite:///{tmp_path / 'w.db'}"}
    with Served(env, workers=2) as served:
        root = served.url.rsplit("/fhir", 1)[0]
        n = 40
        with httpx.Client() as c:  # new connections: the kernel spreads them over workers
            for _ in range(n):
                assert httpx.get(f"{served.url}/metadata", headers={
                    "Connection": "close"}).status_code == 200
            counts = set()
            for _ in range(6):
                samples = _samples(c.get(f"{root}/metrics",
                                         headers={"Connection": "close"}).text)
                counts.add(_requests(samples, "capabilities", "2xx"))
                time.sleep(0.05)
        # the readiness probe of Served reads /metadata too: at least n, and the same
        # figure from every worker
        assert len(counts) == 1 and counts.pop() >= n
