"""capabilities: https://hl7.org/fhir/R4/http.html#capabilities.

The CapabilityStatement is generated from what the registry really holds:
every resource type, its interactions and its search parameters.
"""

from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import gateway
from gateway.fhir import json as fjson
from gateway.fhir.indexer import SearchParam, composite_supported
from gateway.fhir.instants import instant
from gateway.fhir.outcome import Code, FhirError
from gateway.interactions import stored_profiles
from gateway.interactions.base import Context, FhirResponse
from gateway.interactions.operations import Operation, OperationRequest
from gateway.interactions.read import subsetting_of
from gateway.interactions.search import shaped
from gateway.registry import Registry

TYPE_INTERACTIONS = (
    "read", "vread", "update", "patch", "delete", "history-instance", "history-type",
    "create", "search-type",
)
SEARCH_RESULT_PARAMS = (
    ("_sort", "string"), ("_count", "number"), ("_include", "string"),
    ("_revinclude", "string"), ("_summary", "token"), ("_elements", "string"),
    ("_total", "token"), ("_has", "string"), ("_list", "special"),
)


def _operation_entry(op: Operation, resource_type: str | None = None) -> dict[str, Any]:
    entry = {"name": op.name}
    definition = op.definition or f"{BASE_CANONICAL}/OperationDefinition/{op.name}"
    entry["definition"] = definition.replace("{type}", resource_type or "Resource")
    return entry


BASE_CANONICAL = "https://carepath-gateway.org/fhir"

#: extensions of the base URL that a higher layer adds to a resource type's
#: entry (or, for type ``None``, to ``rest``), e.g. the subscription topics
Contribution = Callable[[str], list[dict[str, Any]]]
_CONTRIBUTIONS: dict[int, list[tuple[str | None, Contribution]]] = {}
#: what a higher layer declares the server to hold to: profiles by resource type (its
#: ``supportedProfile``) and CapabilityStatements it ``instantiates``
_DECLARED: dict[int, tuple[dict[str, list[str]], list[str]]] = {}
#: the live context each id above (and in the statement cache) stands for
_OWNERS: weakref.WeakValueDictionary[int, Context] = weakref.WeakValueDictionary()


def _key(ctx: Context) -> int:
    """``id(ctx)``, once what a context that is gone left under the same id is forgotten
    (Python reuses the ids of collected objects)."""
    key = id(ctx)
    if _OWNERS.get(key) is not ctx:
        _CONTRIBUTIONS.pop(key, None)
        _DECLARED.pop(key, None)
        for stale in [k for k in _CACHE if k[0] == key]:
            del _CACHE[stale]
        _OWNERS[key] = ctx
    return key


def forget(ctx: Context) -> None:
    """Make the statement again at its next request (the search parameters changed)."""
    key = _key(ctx)
    for stale in [k for k in _CACHE if k[0] == key]:
        del _CACHE[stale]


def contribute(ctx: Context, resource_type: str | None, extensions: Contribution) -> None:
    """Add extensions to the statement served for ``ctx`` (called by ``gateway.main``)."""
    _CONTRIBUTIONS.setdefault(_key(ctx), []).append((resource_type, extensions))


def declare(ctx: Context, *, profiles: Mapping[str, list[str]] | None = None,
            instantiates: list[str] | None = None) -> None:
    """Declare, in the statement served for ``ctx``, profiles a type's writes are held
    to beyond the validator's (``supportedProfile``) and CapabilityStatements the
    server implements (``instantiates``)."""
    by_type, canonicals = _DECLARED.setdefault(_key(ctx), ({}, []))
    for resource_type, urls in (profiles or {}).items():
        by_type.setdefault(resource_type, []).extend(urls)
    canonicals.extend(instantiates or [])


def _extensions(contributions: list[tuple[str | None, Contribution]], rt: str | None,
                base: str) -> dict[str, Any]:
    found = [e for t, fn in contributions if t == rt for e in fn(base)]
    return {"extension": found} if found else {}


def _search_params(params: Iterable[SearchParam]) -> list[dict[str, Any]]:
    """The parameters a search here answers: those with an expression to index
    (``_text``, ``_content``, ``_query`` and ``_filter`` have none; the one special
    parameter with one, Location ``near``, is a position), composites only where
    both components are indexed."""
    return [
        {"name": p.code, "definition": p.url, "type": p.type}
        for p in sorted(params, key=lambda p: p.code)
        if p.expression and (p.type != "composite" or composite_supported(p))
    ]


def _include_values(registry: Registry) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Per type, the ``_include`` values its searches take (``Type:param`` of its own
    reference parameters) and the ``_revinclude`` values (``Source:param`` of every
    reference parameter that can point at it; one without targets can point at any
    type). A client or test tool looks for these by name; ``*`` leads both lists."""
    includes: dict[str, list[str]] = {}
    revincludes: dict[str, set[str]] = {}
    types = registry.resource_types
    for source in types:
        for p in registry.search_params(source).values():
            if p.type != "reference" or not p.expression:
                continue
            includes.setdefault(source, []).append(f"{source}:{p.code}")
            for target in (p.targets or types):
                revincludes.setdefault(target, set()).add(f"{source}:{p.code}")
    return ({t: sorted(v) for t, v in includes.items()},
            {t: sorted(v) for t, v in revincludes.items()})


def _security(base: str, cors: bool) -> dict[str, Any]:
    """SMART Backend Services, whose endpoints ``.well-known/smart-configuration``
    names (SMART App Launch: servers SHALL convey them there). Not the ``oauth-uris``
    extension: R4 defines it with an ``authorize`` endpoint 1..1, which a server of
    client credentials only does not have."""
    return {
        "cors": cors,
        "service": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
            "code": "SMART-on-FHIR"}], "text": "SMART Backend Services (client credentials)"}],
        "description": "Bearer tokens from the SMART Backend Services token endpoint"
                       f" ({base}/.well-known/smart-configuration); the CapabilityStatement"
                       " and $versions are public.",
    }


def _statement(
    registry: Registry, base: str, operations: Mapping[str, Operation],
    contributions: list[tuple[str | None, Contribution]] | None = None,
    cors: bool = False, stored: Mapping[str, list[str]] | None = None,
    declared: tuple[dict[str, list[str]], list[str]] | None = None,
    date: str = "",
) -> dict[str, Any]:
    """``stored``: the profiles stored here that writes are held to, by type;
    ``declared``: what :func:`declare` added; ``date``: when its content last changed
    (the release's date when empty)."""
    contributions = contributions or []
    stored = stored or {}
    declared_profiles, instantiates = declared or ({}, [])
    includes, revincludes = _include_values(registry)
    resources = []
    for rt in registry.resource_types:
        type_ops = [
            _operation_entry(op, rt) for op in operations.values()
            if op.allows(rt, None) or op.allows(rt, "x")
        ]
        params = _search_params(registry.search_params(rt).values())
        params.extend({"name": n, "type": t} for n, t in SEARCH_RESULT_PARAMS)
        supported = registry.supported_profiles(rt)
        supported += [url for url in (*stored.get(rt, ()), *declared_profiles.get(rt, ()))
                      if url not in supported]
        resources.append({
            **_extensions(contributions, rt, base),
            "type": rt,
            "profile": f"http://hl7.org/fhir/StructureDefinition/{rt}",
            **({"supportedProfile": supported} if supported else {}),
            "interaction": [{"code": c} for c in TYPE_INTERACTIONS],
            "versioning": "versioned-update",
            "readHistory": True,
            "updateCreate": True,
            "conditionalCreate": True,
            "conditionalRead": "full-support",
            "conditionalUpdate": True,
            "conditionalDelete": "single",
            "referencePolicy": ["literal", "logical"],
            "searchInclude": ["*", *includes.get(rt, ())],
            "searchRevInclude": ["*", *revincludes.get(rt, ())],
            "searchParam": params,
            **({"operation": type_ops} if type_ops else {}),
        })
    system_ops = [_operation_entry(op) for op in operations.values() if op.system]
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": date or RELEASE_DATE,
        "publisher": "carepath-gateway",
        "kind": "instance",
        **({"instantiates": list(instantiates)} if instantiates else {}),
        "software": {"name": "carepath-gateway", "version": gateway.__version__},
        "implementation": {"description": "carepath-gateway FHIR R4 server", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json", "application/fhir+xml", "xml"],
        # (FHIRPath Patch is a Parameters resource, in either FHIR format)
        "patchFormat": ["application/json-patch+json", "application/xml-patch+xml",
                        "application/fhir+json", "application/fhir+xml"],
        "rest": [{
            **_extensions(contributions, None, base),
            "mode": "server",
            "security": _security(base, cors),
            "resource": resources,
            "interaction": [
                {"code": "transaction"}, {"code": "batch"},
                {"code": "search-system"}, {"code": "history-system"},
            ],
            "searchParam": _search_params(registry.common_search_params.values()),
            **({"operation": system_ops} if system_ops else {}),
            "compartment": [registry.compartment_urls[k]
                            for k in sorted(registry.compartment_urls)],
        }],
    }


#: the date of this release of the gateway's own definitions (its CapabilityStatement's
#: date, unless what it lists from the database changed since)
RELEASE_DATE = "2026-11-25"
#: the stored resources whose writes change what the CapabilityStatement lists
_LISTED_TYPES = ("SearchParameter", *stored_profiles.CONFORMANCE_TYPES)

#: statements built, by context and base URL, the most recently used last, with the
#: mark of the stored profiles they list (:func:`stored_profiles.in_use`). Bounded:
#: without ``CAREPATH_PUBLIC_BASE_URL`` the base comes from the request's ``Host``
#: header, which a client can vary at will.
#: Each with its JSON and ETag.
_CACHE: OrderedDict[tuple[int, str],
                    tuple[tuple[int, int], dict[str, Any], bytes, str]] = OrderedDict()
_CACHE_SIZE = 16


#: the filter operators ``$expand`` and ``$validate-code`` apply to a held code system
_FILTER_OPS = ("=", "is-a", "descendent-of", "is-not-a", "generalizes", "regex", "in",
               "not-in", "exists")


def _terminology_capabilities(registry: Registry, base: str) -> dict[str, Any]:
    """What the terminology operations can do (``metadata?mode=terminology``:
    https://hl7.org/fhir/R4/terminologycapabilities.html): the code systems held,
    completely, which ``$lookup``, ``$validate-code`` and ``$expand`` answer from
    (fragments, such as those of SNOMED CT and LOINC, are not claimed)."""
    systems: dict[str, list[str]] = {}
    for cs in registry.terminology.code_systems():
        url = cs.get("url")
        if isinstance(url, str) and cs.get("content") == "complete":
            versions = systems.setdefault(url, [])
            if isinstance(cs.get("version"), str) and cs["version"] not in versions:
                versions.append(cs["version"])
    return {
        "resourceType": "TerminologyCapabilities",
        "status": "active",
        "date": "2026-11-24",
        "publisher": "carepath-gateway",
        "kind": "instance",
        "software": {"name": "carepath-gateway", "version": gateway.__version__},
        "implementation": {"description": "carepath-gateway terminology (offline)",
                           "url": base},
        "codeSystem": [
            {"uri": url, **({"version": [
                {"code": v, "isDefault": i == 0,
                 "filter": [{"code": "concept", "op": list(_FILTER_OPS)}]}
                for i, v in enumerate(versions)]} if versions else {})}
            for url, versions in sorted(systems.items())
        ],
        "expansion": {"hierarchical": False, "paging": True, "incomplete": False,
                      "textFilter": "Every word of the filter must occur in the code, its"
                                    " display or a designation (case-insensitive)."},
        "validateCode": {"translations": False},
        "translation": {"needsMap": True},
    }


async def capabilities(ctx: Context, *, base: str,
                       query: list[tuple[str, str]] | None = None,
                       if_none_match: str | None = None) -> FhirResponse:
    """``GET [base]/metadata``; ``mode=terminology``: the TerminologyCapabilities.
    ``_summary`` and ``_elements`` as on a read (``_summary=true``: what a client
    asks for that wants the server's name and FHIR version, not its 800 KB of
    resource types). Each type's ``supportedProfile`` lists R4's, the gateway's
    own and those stored here that writes are held to (made again when a
    StructureDefinition, ValueSet or CodeSystem is written). Answered with an
    ``ETag`` that changes when the answer does (http.html#capabilities), and 304
    to an ``If-None-Match`` that names it. ``mode=normative`` is answered as
    ``full``: every part of R4 the gateway serves is in it ("servers MAY ignore
    the mode parameter")."""
    query = query or []
    mode = dict(query).get("mode")
    if mode == "terminology":
        return _answer(_shaped(ctx, "TerminologyCapabilities", query,
                               _terminology_capabilities(ctx.registry, base)), if_none_match)
    if mode not in (None, "full", "normative", "normal"):
        raise FhirError(Code.INVALID_SEARCH_VALUE,
                        f"mode must be full, normative or terminology, not '{mode[:32]}'")
    key = (_key(ctx), base)
    cached = _CACHE.get(key)
    mark, stored = await stored_profiles.in_use(ctx)
    if cached is None or cached[0] != mark:
        # "it should change when the substantive content of the capability statement
        # changes": the gateway's release, or the last write of what the statement
        # lists from the database (search parameters, profiles), the same in every
        # process
        changed = await ctx.store.last_changed(_LISTED_TYPES) if ctx.store is not None \
            else None  # (a context of no database lists nothing stored)
        date = instant(changed) if changed is not None else RELEASE_DATE
        statement = _statement(ctx.registry, base, ctx.operations,
                               _CONTRIBUTIONS.get(key[0]), declared=_DECLARED.get(key[0]),
                               cors=bool(ctx.settings.cors_origins), stored=stored,
                               date=max(date, RELEASE_DATE))
        content = fjson.dumps(statement)
        cached = _CACHE[key] = (mark, statement, content, _etag(content))
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    _, statement, content, etag = cached
    if subsetting_of(ctx, "CapabilityStatement", query) is None:
        return _answer(content, if_none_match, etag)
    return _answer(_shaped(ctx, "CapabilityStatement", query, statement), if_none_match)


def _etag(content: bytes) -> str:
    return f'W/"{hashlib.blake2b(content, digest_size=12).hexdigest()}"'


def _answer(body: dict[str, Any] | bytes, if_none_match: str | None,
            etag: str | None = None) -> FhirResponse:
    """200 with ``body`` and its ETag, or 304 when ``If-None-Match`` names that."""
    content = body if isinstance(body, bytes) else fjson.dumps(body)
    etag = etag or _etag(content)
    if if_none_match and ({t.strip() for t in if_none_match.split(",")} & {etag, "*"}):
        return FhirResponse(304, None, {"ETag": etag})
    return FhirResponse(200, content, {"ETag": etag})


def _shaped(ctx: Context, resource_type: str, query: list[tuple[str, str]],
            statement: dict[str, Any]) -> dict[str, Any]:
    wanted = subsetting_of(ctx, resource_type, query)
    return statement if wanted is None else shaped(ctx, wanted, resource_type, statement)


async def versions(ctx: Context, req: OperationRequest) -> FhirResponse:
    """``$versions``: the FHIR versions served here (one) and the default."""
    return FhirResponse(200, {"resourceType": "Parameters", "parameter": [
        {"name": "version", "valueCode": "4.0"}, {"name": "default", "valueCode": "4.0"}]})


VERSIONS = Operation(
    "versions", versions, system=True,
    definition="http://hl7.org/fhir/OperationDefinition/CapabilityStatement-versions",
)
