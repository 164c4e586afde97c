"""Liveness and readiness, for orchestrators and load balancers.

``GET /healthz``: the process answers (liveness; restarting it is the remedy
when it does not). ``GET /readyz``: whether this process can serve FHIR
requests now (readiness; send it no traffic while it cannot). Both answer in
the Health Check Response Format for HTTP APIs
(https://datatracker.ietf.org/doc/html/draft-inadarei-api-health-check,
``application/health+json``), as Kubernetes probes, HAProxy and most
monitoring read them: ``status`` ``pass``, ``warn`` or ``fail``, and for
readiness one entry per component under ``checks``.

Readiness fails (503) when a request could not be answered: the database does
not answer within the timeout, or the audit writer has stopped (reads are
refused without their audit record). It warns (200) when the gateway still
answers but events wait: the event bus (Redis) cannot be reached or the outbox
relay has stopped; what is written waits in the outbox, nothing is lost.

Outside the FHIR base, so neither authenticated nor audited: they carry no
patient data. Failures name the kind of error, never its message (a connection
string or host name stays in the log).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import gateway
from gateway.events.runtime import EventRuntime
from gateway.fhir.outcome import FhirError
from gateway.security.audit import AuditWriter
from gateway.storage.db import Database

log = logging.getLogger("carepath.health")

LIVE_PATH = "/healthz"
READY_PATH = "/readyz"
MEDIA_TYPE = "application/health+json"
_ORDER = {"pass": 0, "warn": 1, "fail": 2}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class Health:
    db: Database
    audit: AuditWriter | None
    events: EventRuntime
    #: seconds a component may take to answer before it counts as down
    timeout: float = 2.0

    def live(self) -> dict[str, Any]:
        return {"status": "pass", "version": gateway.__version__,
                "serviceId": "carepath-gateway"}

    async def _timed(self, component: str, kind: str, probe: Any, failing: str,
                     ) -> tuple[str, dict[str, Any]]:
        started = time.perf_counter()
        check: dict[str, Any] = {"componentType": kind, "time": _now()}
        try:
            async with asyncio.timeout(self.timeout):
                await probe()
        except Exception as exc:  # any way of not answering counts
            log.warning("readiness: %s: %s", component, exc)
            reason = ("timed out" if isinstance(exc, TimeoutError) else
                      exc.code.summary.lower() if isinstance(exc, FhirError) else
                      type(exc).__name__)
            return component, {**check, "status": failing, "output": f"not reachable: {reason}"}
        check["observedValue"] = round((time.perf_counter() - started) * 1e3, 2)
        check["observedUnit"] = "ms"
        return component, {**check, "status": "pass"}

    async def _database(self) -> None:
        async with self.db.read() as conn:
            await conn.fetchrow("SELECT 1")

    async def ready(self) -> tuple[int, dict[str, Any]]:
        """The HTTP status (200, or 503 when a component fails) and the report."""
        probes = [
            self._timed("database:responseTime", "datastore", self._database, "fail"),
            self._timed("event-bus:responseTime", "component", self.events.bus.ping,
                        "warn"),
        ]
        checks: dict[str, list[dict[str, Any]]] = {
            name: [check] for name, check in await asyncio.gather(*probes)}
        checks["event-bus:responseTime"][0]["componentId"] = self.events.bus.kind
        checks["outbox-relay:running"] = [_running(self.events.relay.running, "warn",
                                                    "stopped: events wait in the outbox")]
        if self.audit is not None:
            checks["audit-trail:running"] = [_running(
                self.audit.running, "fail", "stopped: requests are refused unaudited")]
        status = max((c["status"] for entries in checks.values() for c in entries),
                     key=_ORDER.__getitem__)
        report = {**self.live(), "status": status, "checks": checks}
        return (503 if status == "fail" else 200), report


def _running(running: bool, failing: str, output: str) -> dict[str, Any]:
    check: dict[str, Any] = {"componentType": "component", "observedValue": running,
                             "status": "pass" if running else failing, "time": _now()}
    if not running:
        check["output"] = output
    return check
