"""Liveness and readiness (``/healthz``, ``/readyz``): over real HTTP, and with
components that really cannot be reached."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from gateway.api.health import Health
from gateway.events.runtime import EventRuntime
from gateway.security.audit import AuditWriter
from gateway.settings import Settings
from gateway.storage.db import open_database
from gateway.storage.migrate import migrate
from tests.conftest import PG_URL, Server
from tests.tcp_proxy import TcpProxy

HEALTH = "application/health+json"


def _root(url: str) -> str:
    return url.rsplit("/fhir", 1)[0]


def _statuses(report: dict[str, Any]) -> dict[str, str]:
    return {name: checks[0]["status"] for name, checks in report["checks"].items()}


def test_live_and_ready_over_http(server: Server) -> None:
    root = _root(server.url)
    live = httpx.get(f"{root}/healthz")
    assert live.status_code == 200 and live.headers["content-type"] == HEALTH
    assert live.json()["status"] == "pass"
    ready = httpx.get(f"{root}/readyz")
    assert ready.status_code == 200 and ready.headers["content-type"] == HEALTH
    report = ready.json()
    assert report["status"] == "pass"
    assert _statuses(report) == {"database:responseTime": "pass",
                                 "event-bus:responseTime": "pass",
                                 "outbox-relay:running": "pass",
                                 "audit-trail:running": "pass"}
    database = report["checks"]["database:responseTime"][0]
    assert database["componentType"] == "datastore" and database["observedUnit"] == "ms"
    assert ready.headers["cache-control"] == "no-store"


def test_a_database_gone_away_fails_readiness() -> None:
    async def check() -> list[tuple[int, dict[str, Any]]]:
        proxy = TcpProxy.of(PG_URL)
        await proxy.start()
        db = open_database(proxy.url(PG_URL), pool_size=2)
        await db.open()
        events = EventRuntime(db, Settings(database_url=PG_URL))
        audit = AuditWriter(db)
        await audit.start()
        health = Health(db, audit, events, timeout=2)
        try:
            before = await health.ready()
            await proxy.stop()
            return [before, await health.ready()]
        finally:
            await audit.stop()
            await db.close()

    (up, up_report), (down, report) = asyncio.run(check())
    # (no relay runs here: readiness warns about that, and passes the database)
    assert up == 200 and _statuses(up_report)["database:responseTime"] == "pass", up_report
    assert down == 503 and report["status"] == "fail"
    database = report["checks"]["database:responseTime"][0]
    assert database["status"] == "fail" and database["output"].startswith("not reachable")
    assert "127.0.0.1" not in database["output"]  # the address stays in the log
    assert _statuses(report)["audit-trail:running"] == "pass"


def test_unreachable_redis_warns_and_a_stopped_audit_writer_fails(tmp_path: Any) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'h.db'}",
                        redis_url="redis://127.0.0.1:1/0")

    async def check(audit_running: bool) -> tuple[int, dict[str, Any]]:
        db = open_database(settings.database_url, pool_size=1)
        await db.open()
        events = EventRuntime(db, settings)
        audit = AuditWriter(db)
        if audit_running:
            await audit.start()
        try:
            return await Health(db, audit, events, timeout=2).ready()
        finally:
            await audit.stop()
            await events.bus.close()
            await db.close()

    status, report = asyncio.run(check(True))
    # events wait in the outbox: the gateway still answers, with a warning
    assert status == 200 and report["status"] == "warn", report
    bus = report["checks"]["event-bus:responseTime"][0]
    assert bus["status"] == "warn" and bus["componentId"] == "redis"
    assert _statuses(report)["database:responseTime"] == "pass"
    # no audit writer: every request would be refused
    status, report = asyncio.run(check(False))
    assert status == 503 and _statuses(report)["audit-trail:running"] == "fail"


def test_metrics_still_answer_when_the_database_is_gone(new_schema: Any) -> None:
    """A scrape while the database is away: the counts of this process, and
    ``carepath_backlog_readable`` 0 instead of the backlog."""
    from gateway.api.metrics import exposition

    async def scrape() -> tuple[str, str]:
        proxy = TcpProxy.of(PG_URL)
        await proxy.start()
        db = open_database(proxy.url(PG_URL), pool_size=1, schema=schema)
        await db.open()
        try:
            await migrate(db)
            up = (await exposition(db)).decode()
            await proxy.stop()
            return up, (await exposition(db)).decode()
        finally:
            await db.close()

    schema = new_schema()
    up, down = asyncio.run(scrape())
    assert "carepath_backlog_readable 1.0" in up and "carepath_outbox_pending_events" in up
    assert "carepath_backlog_readable 0.0" in down
    assert "carepath_outbox_pending_events" not in down


def test_health_and_metrics_stay_outside_a_fhir_base_at_the_root(tmp_path: Any) -> None:
    """CAREPATH_BASE_PATH=/ puts the FHIR API at the root; /healthz, /readyz and
    /metrics are still the probes' and the scraper's (they were FHIR 404s)."""
    from tests.conftest import RunningServer

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'root.db'}", base_path="/")
    with RunningServer(settings) as running:
        root = running.url.rstrip("/")
        for path in ("/healthz", "/readyz"):
            answer = httpx.get(f"{root}{path}")
            assert answer.status_code == 200 and answer.headers["content-type"] == HEALTH
        assert httpx.get(f"{root}/metrics").text.startswith("# HELP")
        assert httpx.get(f"{root}/metadata").json()["resourceType"] == "CapabilityStatement"
        assert httpx.get(f"{root}/Patient").json()["type"] == "searchset"
