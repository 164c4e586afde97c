"""PostgreSQL out of reach while the gateway runs: every request answers 503 with
an OperationOutcome (GW-5002, ``transient``) and ``Retry-After``, readiness
fails; once the database is back, the same requests are served, without a
restart of the gateway."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.settings import Settings
from tests.conftest import PG_URL, RunningServer
from tests.tcp_proxy import TcpProxy

FHIR = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}


class _Loop:
    """An event loop in a thread of its own, for the proxy."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout=10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def proxied(new_schema, tmp_path: Path) -> Iterator[tuple[RunningServer, TcpProxy, _Loop]]:  # type: ignore[no-untyped-def]
    loop = _Loop()
    proxy = TcpProxy.of(PG_URL)
    loop.run(proxy.start())
    # stored SearchParameters looked for often, their reindex begun 1.4 s after
    settings = Settings(database_url=proxy.url(PG_URL), database_schema=new_schema(),
                        search_parameter_refresh_s=0.2)
    try:
        with RunningServer(settings) as running:
            yield running, proxy, loop
    finally:
        loop.run(proxy.stop())
        loop.close()


def _requests(c: httpx.Client) -> dict[str, httpx.Response]:
    patient = {"resourceType": "Patient", "name": [{"family": "Outage"}]}
    return {
        "create": c.post("/Patient", json=patient, headers=FHIR),
        "read": c.get("/Patient/some-id"),
        "search": c.get("/Patient", params={"family": "Outage"}),
        "transaction": c.post("/", headers=FHIR, json={
            "resourceType": "Bundle", "type": "transaction",
            "entry": [{"resource": patient, "request": {"method": "POST", "url": "Patient"}}]}),
    }


def test_requests_while_the_database_is_out_of_reach(
        proxied: tuple[RunningServer, TcpProxy, _Loop]) -> None:
    running, proxy, loop = proxied
    ready = running.url.removesuffix(running.settings.base_path) + "/readyz"
    with httpx.Client(base_url=running.url, timeout=30) as c:
        before = _requests(c)
        assert {k: r.status_code for k, r in before.items()} == {
            "create": 201, "read": 404, "search": 200, "transaction": 200}

        loop.run(proxy.stop())
        for name, r in _requests(c).items():
            assert r.status_code == 503, (name, r.text)
            assert r.headers["retry-after"].isdigit(), name
            issue = r.json()["issue"][0]
            assert issue["code"] == "transient", name
            assert issue["details"]["coding"][0]["code"] == "GW-5002", name
        assert httpx.get(ready, timeout=30).status_code == 503

        loop.run(proxy.start())
        after = _requests(c)
        assert {k: r.status_code for k, r in after.items()} == {
            "create": 201, "read": 404, "search": 200, "transaction": 200}
        assert httpx.get(ready, timeout=30).status_code == 200
        # what was acknowledged before and after is there; nothing of the outage
        found = c.get("/Patient", params={"family": "Outage", "_total": "accurate"}).json()
        assert found["total"] == 4


def test_a_search_parameter_s_reindex_outlasts_the_database_out_of_reach(
        proxied: tuple[RunningServer, TcpProxy, _Loop]) -> None:
    """The resources stored before a SearchParameter are indexed in the background;
    the database out of reach when that begins delays it, and does not leave them
    unfound."""
    running, proxy, loop = proxied
    ext = "http://example.org/StructureDefinition/ward"
    with httpx.Client(base_url=running.url, timeout=30, headers=FHIR) as c:
        before = {c.post("/Patient", json={"resourceType": "Patient", "extension": [
            {"url": ext, "valueString": "B7"}]}).json()["id"] for _ in range(3)}
        stored = c.put("/SearchParameter/ward", json={
            "resourceType": "SearchParameter", "id": "ward", "status": "active",
            "url": "http://example.org/SearchParameter/ward", "name": "ward",
            "description": "ward", "code": "ward", "base": ["Patient"], "type": "string",
            "expression": f"Patient.extension('{ext}').value"})
        assert stored.status_code == 201, stored.text
        loop.run(proxy.stop())
        time.sleep(4)  # the reindex begins, and finds no database
        loop.run(proxy.start())
        deadline = time.monotonic() + 30
        while True:
            found = c.get("/Patient", params={"ward": "B7"})
            ids = {e["resource"]["id"] for e in found.json().get("entry", [])} \
                if found.status_code == 200 else set()
            if ids == before or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert ids == before
