"""``Patient/[id]/$everything``:
https://hl7.org/fhir/R4/patient-operation-everything.html.

The Patient and every resource in its patient compartment (the R4
CompartmentDefinition, as the access policy holds it), as a searchset Bundle:
the Patient first, then type by type in creation order. Paged like a search
(a snapshot, ``next`` links). ``_type`` limits the types, ``_since`` keeps what
changed since then, ``_count`` sets the page size. Only what the caller may see
is included: types the granted scopes do not let it search are left out, and
the organisation's compartment and consent apply as in every search.
``start``/``end`` (care dates) are not supported and say so in the Bundle.
"""

from __future__ import annotations

from dataclasses import replace
from urllib.parse import urlencode

from gateway.fhir.outcome import Code, FhirError
from gateway.fhir.search import SearchQuery, parse_search
from gateway.interactions.base import Context, FhirResponse, check_id
from gateway.interactions.operations import Operation, OperationRequest
from gateway.interactions.search import first_page, patient_compartment
from gateway.security import guard


def _one(values: list[object] | None, name: str) -> str | None:
    if not values:
        return None
    if len(values) > 1 or not isinstance(values[0], str | int):
        raise FhirError(Code.INVALID_SEARCH_VALUE, f"give {name} once")
    return str(values[0])


async def everything(ctx: Context, req: OperationRequest) -> FhirResponse:
    assert req.id is not None
    check_id(req.id)
    guard.require("Patient", "read")
    params = req.parameters()
    compartment = patient_compartment(ctx)
    types = sorted(compartment)
    wanted = _one(params.get("_type"), "_type")
    if wanted:
        asked = {t.strip() for t in wanted.split(",") if t.strip()}
        unknown = sorted(t for t in asked if not ctx.registry.is_resource_type(t))
        if unknown:
            raise FhirError(Code.INVALID_SEARCH_VALUE, f"_type: unknown type {unknown[0]}")
        types = [t for t in types if t in asked]
    since = _one(params.get("_since"), "_since")
    filters = [("_lastUpdated", f"ge{since}")] if since else []
    count = _one(params.get("_count"), "_count")
    if count is not None and not (count.isascii() and count.isdigit()):
        raise FhirError(Code.INVALID_SEARCH_VALUE, "_count must be a non-negative integer")
    size = min(int(count), ctx.settings.max_page_size) if count else (
        ctx.settings.default_page_size)
    warnings = tuple(f"{p} is not supported by $everything and was ignored"
                     for p in ("start", "end") if p in params)

    patient = await ctx.store.read("Patient", req.id)
    if patient is None:
        raise FhirError(Code.NOT_FOUND, f"Patient/{req.id} is not known")
    await guard.ensure_visible(ctx.access, ctx.store, patient)
    if patient.deleted:
        raise FhirError(Code.GONE, f"Patient/{req.id} was deleted")
    restriction = guard.restriction(ctx.access)
    cap = ctx.settings.max_search_results
    keys: list[tuple[str, str]] = []
    if "Patient" in types or not wanted:
        own = parse_search("Patient", [("_id", req.id), *filters], ctx.registry.search_params,
                           strict=True)
        keys += await ctx.store.search_keys(own, 1, restriction)
    seen = set(keys)
    # only the types whose compartment parameters point at the patient anywhere
    # (one index lookup), each with one search over those parameters together
    pointing: dict[str, list[str]] = {}
    for rt, param in sorted(await ctx.store.referrers("Patient", req.id)):
        if param in compartment.get(rt, ()):
            pointing.setdefault(rt, []).append(param)
    for rt in types:
        if rt not in pointing:
            continue
        try:
            guard.require(rt, "search")
        except FhirError:
            continue  # not granted: left out, as a search would not show it
        linked = pointing[rt]
        query = parse_search(rt, [(linked[0], f"Patient/{req.id}"), *filters],
                             ctx.registry.search_params, strict=True)
        link, *rest = query.criteria
        query = replace(query, criteria=(replace(link, stored=tuple(linked)), *rest))
        for key in await ctx.store.search_keys(query, cap + 1 - len(keys), restriction):
            if key not in seen:
                seen.add(key)
                keys.append(key)
    truncated = len(keys) > cap
    found = len(keys)
    if truncated:
        keys = keys[:cap]
        warnings = (*warnings, f"only the first {cap} resources can be paged through")
    pairs = [(k, v) for k, v in req.query if k not in ("_format", "_pretty")]
    self_link = f"{req.base}/Patient/{req.id}/$everything"
    if pairs:
        self_link += "?" + urlencode(pairs)
    guard.note("Patient", req.id, None, self_link)
    if size == 0:  # _count=0: how many, as in a search
        keys = []
    # pages are read back as a plain search over Patient: no includes, no subsetting
    return await first_page(ctx, SearchQuery("Patient"), keys, req.base, size=size,
                            links=[("self", self_link)], warnings=warnings,
                            total=None if truncated else found, truncated=truncated,
                            replay="Patient?")


OPERATION = Operation(
    "everything", everything, instance=True, types=frozenset({"Patient"}),
    definition="http://hl7.org/fhir/OperationDefinition/Patient-everything",
)
