"""Terminology operations: ``$lookup``, ``$expand``, ``$validate-code``, ``$translate``.

Specs: https://hl7.org/fhir/R4/codesystem-operation-lookup.html,
https://hl7.org/fhir/R4/valueset-operation-expand.html,
https://hl7.org/fhir/R4/valueset-operation-validate-code.html,
https://hl7.org/fhir/R4/codesystem-operation-validate-code.html,
https://hl7.org/fhir/R4/conceptmap-operation-translate.html.

The answers come from :class:`gateway.fhir.terminology.Terminology` over the
gateway's own content (``profiles/*.json``, through the registry; public like
the CapabilityStatement). Content a client stored (``POST /CodeSystem`` etc.)
is used too: an instance id or canonical URL the profiles do not know is looked
up in the store, as are the code systems and value sets such a value set refers
to -- with the same scope and visibility checks as read and search. Type level:
``/CodeSystem/$lookup``, ``/ValueSet/$expand``, ``/ValueSet/$validate-code``,
``/CodeSystem/$validate-code``, ``/ConceptMap/$translate``; instance level
where R4 defines it (``/ValueSet/{id}/$expand`` ...; ``$lookup`` has none).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from gateway.fhir import json as fjson
from gateway.fhir.outcome import Code, FhirError
from gateway.fhir.search import SearchQuery, parse_search, value_sets, with_value_sets
from gateway.fhir.terminology import Terminology
from gateway.interactions.base import Context, FhirResponse, check_id
from gateway.interactions.operations import Operation, OperationRequest
from gateway.security import guard

Json = dict[str, Any]
_DEPENDENCY_ROUNDS = 8
_OD = "http://hl7.org/fhir/OperationDefinition/"


# ---------------------------------------------------------------------------
# parameters


class _Params:
    def __init__(self, req: OperationRequest) -> None:
        self.values = req.parameters()

    def one(self, name: str) -> Any:
        got = self.values.get(name)
        if not got:
            return None
        if len(got) > 1:
            raise _bad(f"parameter '{name}' is given more than once")
        return got[0]

    def string(self, name: str) -> str | None:
        v = self.one(name)
        if v is None:
            return None
        if not isinstance(v, str) or not v:
            raise _bad(f"parameter '{name}' must be a non-empty string")
        return v

    def integer(self, name: str) -> int | None:
        v = self.one(name)
        if v is None:
            return None
        if isinstance(v, bool) or not (isinstance(v, int) or (
                isinstance(v, str) and v.isascii() and v.isdigit())):
            raise _bad(f"parameter '{name}' must be a non-negative integer")
        if not 0 <= int(v) <= 2**31 - 1:  # FHIR integer (the expansion echoes it)
            raise _bad(f"parameter '{name}' must be between 0 and 2147483647")
        return int(v)

    def boolean(self, name: str) -> bool:
        v = self.one(name)
        if v is None:
            return False
        if isinstance(v, bool):
            return v
        if v in ("true", "false"):
            return bool(v == "true")
        raise _bad(f"parameter '{name}' must be true or false")

    def strings(self, name: str) -> list[str]:
        out: list[str] = []
        for v in self.values.get(name, []):
            if not isinstance(v, str):
                raise _bad(f"parameter '{name}' must be a string")
            out.extend(p for p in v.split(",") if p)
        return out

    def resource(self, name: str, resource_type: str) -> Json | None:
        v = self.one(name)
        if v is None:
            return None
        if not isinstance(v, dict) or v.get("resourceType") != resource_type:
            raise _bad(f"parameter '{name}' must be a {resource_type} resource (POST)")
        return v

    def coding(self, name: str) -> Json | None:
        """A Coding (POST) or ``system|code`` (GET)."""
        v = self.one(name)
        if v is None:
            return None
        if isinstance(v, str):
            system, sep, code = v.rpartition("|")
            if not sep or not system or not code:
                raise _bad(f"parameter '{name}' must be a Coding or 'system|code'")
            return {"system": system, "code": code}
        if not isinstance(v, dict):
            raise _bad(f"parameter '{name}' must be a Coding")
        return v

    def codeable_concept(self, name: str) -> list[Json] | None:
        v = self.one(name)
        if v is None:
            return None
        if not isinstance(v, dict) or not isinstance(v.get("coding", []), list):
            raise _bad(f"parameter '{name}' must be a CodeableConcept (POST)")
        codings = [c for c in v.get("coding", []) if isinstance(c, dict)]
        if not codings:
            raise _bad(f"parameter '{name}' has no coding")
        return codings

    def codings(self, *, system_param: str = "system", version_param: str = "version",
                default_system: str | None = None) -> list[Json]:
        """The concept(s) to check: code (+system, version, display), coding or codeableConcept."""
        code = self.string("code")
        coding = self.coding("coding")
        concept = self.codeable_concept("codeableConcept")
        given = [x for x in (code, coding, concept) if x is not None]
        if len(given) != 1:
            raise _bad("give exactly one of code, coding and codeableConcept")
        if concept is not None:
            return concept
        if coding is not None:
            return [coding if "system" in coding or not default_system
                    else {**coding, "system": default_system}]
        assert code is not None
        out: Json = {"code": code}
        system = self.string(system_param) or default_system
        if system:
            out["system"] = system
        version = self.string(version_param)
        if version:
            out["version"] = version
        display = self.string("display")
        if display:
            out["display"] = display
        return [out]


def _bad(message: str) -> FhirError:
    return FhirError(Code.INVALID_TERMINOLOGY_REQUEST, message)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------------
# resolution: the registry's own content first, then the store


async def _stored_by_id(ctx: Context, resource_type: str, id: str) -> Json | None:
    check_id(id)
    guard.require(resource_type, "read")
    stored = await ctx.store.read(resource_type, id)
    if stored is None:
        return None
    await guard.ensure_visible(ctx.access, ctx.store, stored)
    if stored.deleted or stored.content is None:
        return None
    found = fjson.loads_fast(stored.content)
    return found if isinstance(found, dict) else None


async def _stored_by_url(ctx: Context, resource_type: str, url: str) -> Json | None:
    base, _, version = url.partition("|")
    pairs = [("url", base)] + ([("version", version)] if version else [])
    guard.require(resource_type, "search")
    query = parse_search(resource_type, pairs, ctx.registry.search_params)
    keys = await ctx.store.search_keys(query, 20, guard.restriction(ctx.access))
    if not keys:
        return None
    for rt, id in keys:
        guard.note(rt, id)
    candidates = []
    for stored in await ctx.store.read_many(keys):
        if stored.content is not None and not stored.deleted:
            r = fjson.loads_fast(stored.content)
            if isinstance(r, dict) and r.get("url") == base:
                candidates.append(r)
    candidates.sort(key=lambda r: str(r.get("version", "")))
    return candidates[-1] if candidates else None


async def _by_id(ctx: Context, term: Terminology, resource_type: str, id: str) -> Json:
    found = term.resource(resource_type, id) or await _stored_by_id(ctx, resource_type, id)
    if found is None:
        raise FhirError(_UNKNOWN[resource_type], f"{resource_type}/{id} is not known")
    return found


async def _by_url(ctx: Context, term: Terminology, resource_type: str, url: str,
                  version: str | None = None) -> Json:
    pinned = f"{url}|{version}" if version else url
    held = {"CodeSystem": term.code_system, "ValueSet": term.value_set,
            "ConceptMap": term.concept_map}[resource_type](pinned)
    found = held or await _stored_by_url(ctx, resource_type, pinned)
    if found is None:
        raise FhirError(_UNKNOWN[resource_type], f"{resource_type} {pinned} is not known here")
    return found


_UNKNOWN = {"CodeSystem": Code.UNKNOWN_CODE_SYSTEM, "ValueSet": Code.UNKNOWN_VALUE_SET,
            "ConceptMap": Code.UNKNOWN_CONCEPT_MAP}


async def _with_dependencies(ctx: Context, term: Terminology, value_set: Json) -> Terminology:
    """``term`` plus the stored code systems and value sets ``value_set`` needs."""
    tried: set[tuple[str, str]] = set()
    for _ in range(_DEPENDENCY_ROUNDS):
        wanted = term.missing(value_set) - tried
        if not wanted:
            break
        tried |= wanted
        found = [r for rt, url in sorted(wanted)
                 if (r := await _dependency(ctx, rt, url)) is not None]
        if not found:
            break
        term = term.with_resources(found)
    return term


async def _dependency(ctx: Context, resource_type: str, url: str) -> Json | None:
    """A stored dependency, or None -- also when the caller may not search for it."""
    try:
        return await _stored_by_url(ctx, resource_type, url)
    except FhirError as exc:
        if exc.code is Code.FORBIDDEN:
            return None
        raise


async def _value_set(ctx: Context, req: OperationRequest, p: _Params,
                     term: Terminology) -> Json:
    given = p.resource("valueSet", "ValueSet")
    url, version = p.string("url"), p.string("valueSetVersion")
    if req.id is not None:
        if given is not None or url:
            raise _bad("an instance-level call takes neither url nor valueSet")
        found = await _by_id(ctx, term, "ValueSet", req.id)
        if version and found.get("version") != version:
            raise FhirError(Code.UNKNOWN_VALUE_SET,
                            f"ValueSet/{req.id} is not version {version}")
        return found
    if given is not None:
        if url:
            raise _bad("give url or valueSet, not both")
        return given
    if not url:
        raise _bad("give the value set: url, valueSet (POST) or /ValueSet/{id}/$...")
    return await _by_url(ctx, term, "ValueSet", url, version)


#: most members a ValueSet may have for token ``:in``/``:not-in`` (two bound values each)
MAX_IN_CODES = 10_000


async def with_value_set_members(ctx: Context, query: SearchQuery) -> SearchQuery:
    """``query`` with the value sets of its ``:in``/``:not-in`` values expanded (those
    the gateway holds and those stored here, which the caller may search for), and of
    its ``:below``/``:above`` values (over code systems held or stored here)."""
    used = value_sets(query)
    if not used:
        return query
    members: dict[str, frozenset[tuple[str, str]]] = {}
    for url in sorted(used):
        base, _, version = url.partition("|")
        term = ctx.registry.terminology
        compose = used[url].compose
        try:
            value_set = ({"resourceType": "ValueSet", "url": url, "status": "active",
                          "compose": orjson.loads(compose)} if compose is not None
                         else await _by_url(ctx, term, "ValueSet", base, version or None))
        except FhirError as exc:
            if exc.code is not Code.UNKNOWN_VALUE_SET:
                raise
            raise FhirError(Code.INVALID_SEARCH_VALUE,
                            f"value set {url} is not known here") from None
        term = await _with_dependencies(ctx, term, value_set)
        codes, closed = term.members(value_set)
        if not closed:
            # a code system not held (a filter over ICD-10-GM, say): decide membership
            # for the codes the parameter holds here
            # (of what the caller may see: which codes are in use tells of the data)
            in_use: set[tuple[str, str]] = set()
            restriction = guard.restriction(ctx.access)
            for rtype, param in sorted(used[url].used_by, key=str):
                in_use.update(await ctx.store.token_codes(rtype, param, MAX_IN_CODES + 1,
                                                          restriction))
            if len(in_use) > MAX_IN_CODES:
                raise FhirError(Code.INVALID_SEARCH_VALUE,
                                f"value set {url} cannot be expanded here, and the searched"
                                f" parameter holds more than {MAX_IN_CODES} codes to check")
            member = term.membership(value_set)
            verdicts = {pair: member(*pair) for pair in in_use - codes}
            if any(v is None for v in verdicts.values()):
                raise FhirError(Code.INVALID_SEARCH_VALUE,
                                f"value set {url} cannot be expanded here: membership of codes"
                                " in use depends on a code system this server does not hold")
            codes = codes | {pair for pair, v in verdicts.items() if v}
        if len(codes) > MAX_IN_CODES:
            raise FhirError(Code.INVALID_SEARCH_VALUE,
                            f"value set {url} has {len(codes)} members; ':in' takes at most"
                            f" {MAX_IN_CODES}")
        members[url] = codes
    return with_value_sets(query, members)


# ---------------------------------------------------------------------------
# handlers


async def lookup(ctx: Context, req: OperationRequest) -> FhirResponse:
    p = _Params(req)
    coding = p.coding("coding")
    code, system = p.string("code"), p.string("system")
    if coding is not None:
        if code or system:
            raise _bad("give code and system, or coding, not both")
        code, system = coding.get("code"), coding.get("system")
    if not isinstance(code, str) or not isinstance(system, str) or not code or not system:
        raise _bad("$lookup needs a code and its system (or a coding)")
    version = p.string("version") or (coding or {}).get("version")
    term = ctx.registry.terminology
    if term.code_system(system, version) is None:
        stored = await _stored_by_url(ctx, "CodeSystem", f"{system}|{version}" if version
                                      else system)
        if stored is not None:
            term = term.with_resources([stored])
    return FhirResponse(200, term.lookup(system, code, version=version,
                                         properties=p.strings("property")))


async def expand(ctx: Context, req: OperationRequest) -> FhirResponse:
    p = _Params(req)
    term = ctx.registry.terminology
    value_set = await _value_set(ctx, req, p, term)
    term = await _with_dependencies(ctx, term, value_set)
    count = p.integer("count")
    limit = ctx.settings.max_page_size
    if count is not None and count > limit:
        count = limit
    result = term.expand(
        value_set, text_filter=p.string("filter"), offset=p.integer("offset") or 0,
        count=count, active_only=p.boolean("activeOnly"),
        include_designations=p.boolean("includeDesignations"),
        include_definition=p.boolean("includeDefinition"), timestamp=_now())
    return FhirResponse(200, result)


async def validate_code(ctx: Context, req: OperationRequest) -> FhirResponse:
    p = _Params(req)
    term = ctx.registry.terminology
    abstract_ok = p.boolean("abstract")
    if req.resource_type == "CodeSystem":
        given = p.resource("codeSystem", "CodeSystem")
        url, version = p.string("url"), p.string("version")
        if req.id is not None:
            code_system = await _by_id(ctx, term, "CodeSystem", req.id)
        elif given is not None:
            code_system = given
        elif url:
            code_system = await _by_url(ctx, term, "CodeSystem", url, version)
        else:
            raise _bad("give the code system: url, codeSystem (POST) or /CodeSystem/{id}/$...")
        term = term.with_resources([code_system])
        codings = p.codings(system_param="url", default_system=code_system.get("url"))
        return FhirResponse(200, term.validate_code_in_system(code_system, codings,
                                                              abstract_ok=abstract_ok))
    value_set = await _value_set(ctx, req, p, term)
    term = await _with_dependencies(ctx, term, value_set)
    codings = p.codings(version_param="systemVersion")
    return FhirResponse(200, term.validate_code(value_set, codings, abstract_ok=abstract_ok))


async def translate(ctx: Context, req: OperationRequest) -> FhirResponse:
    p = _Params(req)
    term = ctx.registry.terminology
    reverse = p.boolean("reverse")
    source, target = p.string("source"), p.string("target")
    given = p.resource("conceptMap", "ConceptMap")
    url, version = p.string("url"), p.string("conceptMapVersion")
    if req.id is not None:
        maps = [await _by_id(ctx, term, "ConceptMap", req.id)]
    elif given is not None:
        maps = [given]
    elif url:
        maps = [await _by_url(ctx, term, "ConceptMap", url, version)]
    else:
        maps = term.maps_for(source=source, target=target, reverse=reverse)
    codings = p.codings()
    return FhirResponse(200, term.translate(maps, codings, target=target,
                                            target_system=p.string("targetsystem"),
                                            reverse=reverse))


LOOKUP = Operation("lookup", lookup, type_level=True, types=frozenset({"CodeSystem"}),
                   definition=_OD + "CodeSystem-lookup")
EXPAND = Operation("expand", expand, type_level=True, instance=True,
                   types=frozenset({"ValueSet"}), definition=_OD + "ValueSet-expand")
VALIDATE_CODE = Operation("validate-code", validate_code, type_level=True, instance=True,
                          types=frozenset({"ValueSet", "CodeSystem"}),
                          definition=_OD + "{type}-validate-code")
TRANSLATE = Operation("translate", translate, type_level=True, instance=True,
                      types=frozenset({"ConceptMap"}), definition=_OD + "ConceptMap-translate")

OPERATIONS = (LOOKUP, EXPAND, VALIDATE_CODE, TRANSLATE)
