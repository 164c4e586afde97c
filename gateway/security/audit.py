"""The audit trail: an AuditEvent per interaction and patient, shaped after IHE BALP.

https://profiles.ihe.net/ITI/BALP/ — type ``rest``, subtype the RESTful
interaction, agents for server (DICOM 110152), client (110153, with its
network address) and the responsible organisation, the asserted user
(``IRCP``), entities for the patient (object-role 1), the query
(object-role 24) and the resources touched; ``purposeOfEvent`` from the
token. These are the fields NEN 7513 asks for: who, on whose behalf, what,
which patient, when, from where, outcome, why. A request about several
patients (a search over their data, a transaction writing it) has one
AuditEvent per patient, as BALP asks.

A write's AuditEvents are appended in the write's own database transaction.
Everything else is appended before the response leaves (fail closed): the
:class:`AuditWriter` groups concurrent appends into one transaction so reads
do not each pay for a commit, and by default does not wait for the
database's WAL flush (``audit_durable_reads``). The :class:`AuditChainer`
links committed records into the hash chain shortly afterwards (see
:mod:`gateway.storage.security` for why not at once).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from gateway import tasks
from gateway.fhir import json as fjson
from gateway.security.principal import Caller, Entity
from gateway.storage import security as tables
from gateway.storage.db import Database

log = logging.getLogger("carepath.audit")

DCM = "http://dicom.nema.org/resources/ontology/DCM"
_ACTION = {"create": "C", "read": "R", "vread": "R", "history-instance": "R", "update": "U",
           "patch": "U", "delete": "D"}


def interaction_of(method: str, path: str, query_string: str) -> str:
    """The restful-interaction code of a request (http.html)."""
    parts = [p for p in path.split("/") if p]
    n = len(parts)
    if (parts and parts[-1].startswith("$")) or (n > 1 and parts[-2:-1] == ["$"]):
        return "operation"
    if method == "POST" and n == 0:
        return "transaction"  # batch or transaction: refined by the caller
    if n == 0 or parts[0] in ("_search",):
        return "search-system"
    if parts[0] == "_history":
        return "history-system"
    if parts[0] == "metadata":
        return "capabilities"
    if n == 1:
        return {"GET": "search-type", "HEAD": "search-type", "POST": "create", "PUT": "update",
                "DELETE": "delete", "PATCH": "patch"}.get(method, "operation")
    if parts[1] == "_search":
        return "search-type"
    if parts[1] == "_history":
        return "history-type"
    if n == 2:
        return {"GET": "read", "HEAD": "read", "PUT": "update", "DELETE": "delete",
                "PATCH": "patch"}.get(method, "operation")
    if parts[2] == "_history":
        return "vread" if n == 4 else "history-instance"
    if parts[2][:1].isupper() and (n == 3 or parts[3:] == ["_search"]):
        return "search-type"  # in a compartment: Patient/1/Observation
    return "operation"


def outcome_code(status: int) -> str:
    if status < 400:
        return "0"
    return "4" if status < 500 else "8"


_PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
_ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
_OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
# the parts every event shares, built once (orjson writes shared objects as often as
# they occur)
_SERVER_ROLE = {"coding": [{"system": DCM, "code": "110152", "display": "Destination Role ID"}]}
_CLIENT_ROLE = {"coding": [{"system": DCM, "code": "110153", "display": "Source Role ID"}]}
_RESPONSIBLE = {"coding": [{"system": _PARTICIPATION, "code": "RESP",
                            "display": "responsible party"}]}
_RECIPIENT = {"coding": [{"system": _PARTICIPATION, "code": "IRCP",
                          "display": "information recipient"}]}
_SERVER_WHO = {"display": "carepath-gateway"}
_PERSON = {"system": _ENTITY_TYPE, "code": "1", "display": "Person"}
_SYSTEM_OBJECT = {"system": _ENTITY_TYPE, "code": "2", "display": "System Object"}
_PATIENT_ROLE = {"system": _OBJECT_ROLE, "code": "1", "display": "Patient"}
_QUERY_ROLE = {"system": _OBJECT_ROLE, "code": "24", "display": "Query"}
_DOMAIN_ROLE = {"system": _OBJECT_ROLE, "code": "4", "display": "Domain Resource"}
#: IHE BALP: the transport's request id (BasicAuditEntityType)
_REQUEST_ID = {"system": "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType",
               "code": "XrequestId"}
_REST = {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest",
         "display": "Restful Operation"}
_SOURCE_TYPE = [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                 "code": "4", "display": "Application Server"}]
_SUBTYPES: dict[str, list[dict[str, str]]] = {}
_PURPOSES: dict[str, list[dict[str, Any]]] = {}


def _subtype(interaction: str) -> list[dict[str, str]]:
    found = _SUBTYPES.get(interaction)
    if found is None:
        found = _SUBTYPES[interaction] = [
            {"system": "http://hl7.org/fhir/restful-interaction", "code": interaction}]
    return found


def _purpose(code: str) -> list[dict[str, Any]]:
    found = _PURPOSES.get(code)
    if found is None:
        found = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                              "code": code}]}]
        if len(_PURPOSES) < 256:  # codes come from tokens: keep the cache bounded
            _PURPOSES[code] = found
    return found


def build_event(caller: Caller, status: int, description: str = "", *,
                patient: str | None = None,
                entities: Sequence[Entity] | None = None) -> dict[str, Any]:
    """The AuditEvent of a request; with ``patient``, the one about that patient
    (of ``entities``, what the request touched: by default, all of it)."""
    p = caller.principal
    interaction = interaction_of(caller.method, caller.path, caller.query_string)
    site = caller.base or "carepath-gateway"
    client: dict[str, Any] = {
        "type": _CLIENT_ROLE,
        "who": {"identifier": {"system": "urn:carepath-gateway:client",
                               "value": p.client_id or (
                                   "anonymous-developer" if p.unrestricted else "anonymous")}},
        "requestor": p.user is None}
    if p.address:
        client["network"] = {"address": p.address, "type": "2"}
    agents: list[dict[str, Any]] = [
        {"type": _SERVER_ROLE, "who": _SERVER_WHO, "requestor": False,
         "network": {"address": site, "type": "5"}},
        client,
    ]
    if p.organization:
        agents.append({"type": _RESPONSIBLE, "who": {"reference": f"Organization/{p.organization}"},
                       "requestor": False})
    if p.user or p.on_behalf_of:
        agents.append({"type": _RECIPIENT, "who": {"display": p.user or p.on_behalf_of},
                       "requestor": True})
    described: list[dict[str, Any]] = []
    if patient is not None:
        described.append({"what": {"reference": f"Patient/{patient}"}, "type": _PERSON,
                          "role": _PATIENT_ROLE})
    if interaction.startswith(("search", "history")) or caller.query_string:
        request_line = f"{caller.method} {caller.path}" + (
            f"?{caller.query_string}" if caller.query_string else "")
        described.append({
            "type": _SYSTEM_OBJECT, "role": _QUERY_ROLE,
            "description": request_line[:2000],
            "query": base64.b64encode(request_line.encode()).decode()})
    if caller.request_id:  # first, as BALP's profiles slice it (entity[transaction])
        described.insert(0, {"what": {"identifier": {"value": caller.request_id}},
                             "type": _REQUEST_ID})
    seen: set[tuple[str, str]] = set()
    for rtype, rid, version, _query, _patients in (
            caller.entities if entities is None else entities):
        if rid is None or (rtype, rid) in seen:
            continue
        seen.add((rtype, rid))
        ref = f"{rtype}/{rid}" + (f"/_history/{version}" if version else "")
        described.append({"what": {"reference": ref}, "type": _SYSTEM_OBJECT,
                          "role": _DOMAIN_ROLE})
        if len(seen) >= 500:
            break
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": str(uuid.uuid4()),
        "type": _REST,
        "subtype": _subtype(interaction),
        "action": _ACTION.get(interaction, "E"),
        "recorded": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "outcome": outcome_code(status),
        "outcomeDesc": f"HTTP {status} {description}" if description else f"HTTP {status}",
        "purposeOfEvent": _purpose(p.purpose_of_use),
        "agent": agents,
        "source": {"site": site, "observer": _SERVER_WHO, "type": _SOURCE_TYPE},
    }
    if described:
        event["entity"] = described
    return event


def filed_under(record: bytes) -> tables.Filing:
    """The (client_id, patient, outcome) columns :func:`records_of` files ``record``
    (an AuditEvent it built) under: ``carepath audit verify`` holds the columns to
    the record, whose hash covers only its bytes."""
    event = orjson.loads(record)
    client: str | None = None
    for agent in event.get("agent", []):
        if agent.get("type") == _CLIENT_ROLE:
            client = agent.get("who", {}).get("identifier", {}).get("value")
    if client in ("anonymous", "anonymous-developer"):
        client = None
    # (a record names one patient; one of an earlier version of the gateway may name
    # several, filed under the first)
    patients = [e["what"]["reference"].removeprefix("Patient/")
                for e in event.get("entity", [])
                if e.get("type") == _PERSON and e.get("role") == _PATIENT_ROLE]
    return client, min(patients) if patients else None, event.get("outcome")


#: v3-ObservationValue: what is shown is less than what is held
_REDACTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
             "code": "REDACTED", "display": "redacted"}


def without_query(record: bytes) -> dict[str, Any]:
    """``record`` without the query it holds (marked REDACTED), as a reader who may
    not see everything the query names is shown another client's record."""
    event: dict[str, Any] = orjson.loads(record)
    event["entity"] = [
        {k: v for k, v in e.items() if k not in ("query", "description")}
        if e.get("role") == _QUERY_ROLE else e for e in event.get("entity", [])]
    if not event["entity"]:
        del event["entity"]
    meta = event.setdefault("meta", {})
    meta["security"] = [*meta.get("security", []), _REDACTED]
    return event


def records_of(caller: Caller, status: int, description: str = "") -> list[tables.AuditRecord]:
    """The request's AuditEvents: one per patient it is about (as IHE BALP asks, so
    that each patient's log is complete and names only what is about them), each
    with what the request touched of that patient; what is about no patient goes
    with the first. One, about no patient, when the request is about none."""
    client_id = caller.principal.client_id
    if not caller.patients:
        event = build_event(caller, status, description)
        return [tables.AuditRecord(fjson.dumps(event), client_id, None, event["outcome"])]
    if len(caller.patients) == 1:
        (patient,) = caller.patients
        event = build_event(caller, status, description, patient=patient)
        return [tables.AuditRecord(fjson.dumps(event), client_id, patient, event["outcome"])]
    # each entity to the patients it is about, in one pass (a page that includes
    # thousands of patients' resources: not patients x entities)
    patients = sorted(caller.patients)
    by_patient: dict[str, list[Entity]] = {p: [] for p in patients}
    for e in caller.entities:
        if not e[4]:
            by_patient[patients[0]].append(e)
        for patient in e[4]:
            if patient in by_patient:
                by_patient[patient].append(e)
    out = []
    for patient in patients:
        event = build_event(caller, status, description, patient=patient,
                            entities=by_patient[patient])
        out.append(tables.AuditRecord(fjson.dumps(event), client_id, patient, event["outcome"]))
    return out


#: a request about more patients than this has its AuditEvents made off the event loop
#: (ten thousand patients an included page names: 0.4 s of CPU)
OFF_LOOP_PATIENTS = 200


async def records_for(caller: Caller, status: int,
                      description: str = "") -> list[tables.AuditRecord]:
    """:func:`records_of`, in a worker thread when the request is about many patients:
    the other requests of the process go on meanwhile."""
    if len(caller.patients) > OFF_LOOP_PATIENTS:
        return await asyncio.to_thread(records_of, caller, status, description)
    return records_of(caller, status, description)


class AuditUnavailable(Exception):
    """The audit trail could not be written: the request must fail."""


class AuditWriter:
    """Appends audit records in groups: one transaction for all that are waiting."""

    def __init__(self, db: Database, max_batch: int = 256, *, durable: bool = True) -> None:
        self.db = db
        self.max_batch = max_batch
        #: False: commit without waiting for the WAL flush (PostgreSQL
        #: ``synchronous_commit = off`` for these transactions only)
        self.durable = durable
        self._queue: asyncio.Queue[
            tuple[Sequence[tables.AuditRecord], asyncio.Future[None]]] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    async def stop(self) -> None:
        await tasks.cancel(self._task)
        self._task = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def write(self, records: Sequence[tables.AuditRecord]) -> None:
        """Append a request's ``records`` (committed together) once committed."""
        if self._queue is None or not self.running:
            raise AuditUnavailable("the audit writer is not running")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._queue.put((records, future))
        await future

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await tables.append_audit_alone(self.db, [r for rs, _ in batch for r in rs],
                                                durable=self.durable)
            except Exception as exc:
                log.exception("audit append failed")
                for _, future in batch:
                    if not future.done():
                        future.set_exception(AuditUnavailable(str(exc)))
            else:
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)


class AuditChainer(tasks.Loop):
    """Links committed audit records into the hash chain, in every process.

    Chainers of several processes take turns (one lock); each looks every
    ``interval`` seconds, and again at once after a full batch. Once nothing
    has been linked for a while (an idle gateway, or records held back by a
    long transaction elsewhere on the server), it uses the precise bound,
    which is cheap when little runs and waits only for this schema's writers.
    """

    task_name = "audit-chainer"

    def __init__(self, db: Database, interval: float = 0.2, batch: int = 2000) -> None:
        self.db = db
        self.interval = interval
        self.batch = batch
        self.chained = 0  # records linked by this process

    async def _run(self) -> None:
        idle_since = time.monotonic()
        while True:
            precise = time.monotonic() - idle_since > 5 * self.interval
            try:
                n = await tables.chain_pending(self.db, self.batch, precise=precise)
            except Exception as exc:
                log.warning("audit chaining failed: %s", exc)
                n = 0
            self.chained += n
            if n:
                idle_since = time.monotonic()
            if n < self.batch:
                await asyncio.sleep(self.interval)
