"""``$audit-log``: read the gateway's own audit trail (system level, GET).

The gateway's AuditEvents live in the hash-chained ``audit_log``, not among
the resources clients write. Reading them needs the scope
``system/AuditEvent.rs``; a client of an organisation sees the records of its
own client and those about patients it may see, the latter without the query
another client sent (it may name patients, or say things about them, the
reader may not see: marked ``REDACTED``). The read is itself audited,
like every request. Parameters: ``patient`` (id), ``_count`` (≤ 1000),
``_cursor`` (sequence number to continue after).
"""

from __future__ import annotations

from urllib.parse import urlencode

from gateway.fhir.bundles import bundle, raw
from gateway.fhir.outcome import Code, FhirError
from gateway.interactions.base import Context, FhirResponse
from gateway.interactions.operations import Operation, OperationRequest
from gateway.security import guard
from gateway.security.audit import filed_under, without_query


async def audit_log(ctx: Context, req: OperationRequest) -> FhirResponse:
    guard.require("AuditEvent", "search")
    params = {k: v[-1] for k, v in req.parameters().items() if v}
    try:
        count = min(max(int(params.get("_count", 100)), 1), 1000)
        after = int(params.get("_cursor", 0))
    except (TypeError, ValueError):
        raise FhirError(Code.INVALID_SEARCH_VALUE, "_count and _cursor are integers") from None
    if not 0 <= after < 2**63:  # a sequence number the store can hold
        raise FhirError(Code.INVALID_SEARCH_VALUE, "_cursor is out of range")
    patient = params.get("patient")
    if patient is not None:
        patient = str(patient).removeprefix("Patient/")
    restriction = guard.restriction(ctx.access)
    principal = guard.caller().principal
    rows = await ctx.store.audit_records(after=after, limit=count + 1, patient=patient,
                                         restriction=restriction,
                                         client_id=principal.client_id)
    links = [("self", f"{req.base}/$audit-log?{urlencode(req.query)}")]
    if len(rows) > count:
        rows = rows[:count]
        query = {**params, "_count": count, "_cursor": rows[-1][0]}
        links.append(("next", f"{req.base}/$audit-log?{urlencode(query)}"))
    entries = [{"resource": raw(record) if restriction is None or filed_under(record)[0]
                == principal.client_id else without_query(record), "search": {"mode": "match"}}
               for _, record in rows]
    return FhirResponse(200, bundle("searchset", entries, links=links))


OPERATION = Operation("audit-log", audit_log, system=True)
