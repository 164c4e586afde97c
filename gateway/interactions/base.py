"""Request and response values shared by the interactions, and the context they run in.

Interactions are framework-free (compare Medplum's fhir-router): they take a
:class:`Context` and plain values and return a :class:`FhirResponse` or raise
:class:`~gateway.fhir.outcome.FhirError`.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import parse_qsl

from gateway.fhir.outcome import Code, FhirError, Issue, information
from gateway.fhir.references import localize
from gateway.fhir.validation.profiles import ProfileSet
from gateway.interactions import search_parameters
from gateway.interactions.stored_profiles import validation_issues
from gateway.registry import Registry
from gateway.security import audit as audit_trail
from gateway.security.policy import AccessPolicy
from gateway.security.principal import current as current_caller
from gateway.settings import Settings
from gateway.storage.interface import Store, StoredResource, StoreTransaction

if TYPE_CHECKING:
    from gateway.interactions.operations import Operation

ID_RE = re.compile(r"[A-Za-z0-9\-.]{1,64}")
#: a version's entity tag, weak or strong, quoted or (as some clients send it) bare
_ETAG_RE = re.compile(r'(?:W/)?(?:"([0-9]{1,18})"|([0-9]{1,18}))')


class Validator(Protocol):
    """Checks a resource against R4 and the profiles it claims (or ``profile``)."""

    def validate(self, resource: dict[str, Any], *, profile: str | None = None,
                 profiles: ProfileSet | None = None) -> list[Issue]:
        ...

    def with_stored(self, structure_definitions: Iterable[dict[str, Any]],
                    value_sets: Mapping[str, frozenset[tuple[str, str]]]) -> ProfileSet | None:
        """The profiles to validate with when ``structure_definitions`` are stored."""
        ...

    def snapshot(self, structure_definition: dict[str, Any],
                 stored: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
        """``structure_definition`` with a snapshot made from its differential."""
        ...


@dataclass(frozen=True, slots=True, weakref_slot=True)
class Context:
    store: Store
    registry: Registry
    settings: Settings
    validator: Validator | None = None
    #: organisation compartments and consent; None: no access control (tests of the core)
    access: AccessPolicy | None = None
    #: the audit trail; None: not audited (tests of the core)
    audit: audit_trail.AuditWriter | None = None
    #: extended operations by name, composed in ``gateway.main``
    operations: Mapping[str, Operation] = field(default_factory=dict)
    #: the SearchParameters stored here (``registry`` is theirs); None: R4's and the
    #: gateway's own only (tests of the core)
    search_parameters: search_parameters.StoredSearchParameters | None = None


T = TypeVar("T")


async def run_write(ctx: Context, work: Callable[[StoreTransaction], Awaitable[T]]) -> T:
    """Run a write in one transaction together with the request's AuditEvent."""
    caller = current_caller()
    mark = len(caller.entities)

    async def audited(tx: StoreTransaction) -> T:
        del caller.entities[mark:]  # a retried attempt starts over
        result = await work(tx)
        if ctx.audit is not None:
            await tx.append_audit(audit_trail.records_of(caller, 200))
        return result

    result = await ctx.store.run(audited)
    caller.audited = ctx.audit is not None
    if ctx.search_parameters is not None:
        await ctx.search_parameters.caught_up()
    return result


def local_bases(ctx: Context) -> tuple[str, ...]:
    """This server's FHIR base urls (configured, and as the request addressed it),
    each ending in ``/``."""
    bases = [b.rstrip("/") + "/" for b in (ctx.settings.public_base_url, current_caller().base)
             if b]
    return tuple(dict.fromkeys(bases))


async def admit(ctx: Context, resource: dict[str, Any],
                tx: StoreTransaction | None = None, *, validate: bool = True) -> None:
    """Ready a resource for storage: references to this server made relative
    (:func:`gateway.fhir.references.localize`), then validated against R4, the
    gateway's profiles and those stored here (422 on errors; the store stays
    unchanged). ``tx``: the transaction the write runs in. ``validate=False``: the
    caller validates later (:func:`check_valid`)."""
    localize(resource, local_bases(ctx))
    if validate:
        await check_valid(ctx, resource, tx)
    if resource.get("resourceType") == "SearchParameter" and ctx.search_parameters:
        search_parameters.check(ctx.search_parameters.base, resource)
        ctx.search_parameters.written(resource)


async def check_valid(ctx: Context, resource: dict[str, Any],
                      tx: StoreTransaction | None = None) -> None:
    """422 unless ``resource`` holds to R4, the gateway's profiles and those stored
    here (read in ``tx``, with what it wrote so far, when given)."""
    if ctx.validator is None:
        return
    issues = await validation_issues(ctx, resource, tx=tx)
    errors = [i for i in issues if i.severity in ("error", "fatal")]
    if errors:
        # one issue may count those not listed (GW-4220, outcome.MAX_ISSUES)
        more = any(i.code is Code.ISSUES_NOT_LISTED for i in errors)
        raise FhirError(Code.VALIDATION_FAILED,
                        f"{resource.get('resourceType')} has {'more than ' if more else ''}"
                        f"{len(errors) - more} validation error(s)", extra=issues)


@dataclass(slots=True)
class FhirResponse:
    """``body`` is stored JSON bytes or a JSON-able value; ``None`` for no body.
    ``modified``: when the version it answers with was stored (epoch microseconds;
    the ``Last-Modified`` header has whole seconds, a Bundle entry's
    ``response.lastModified`` is an ``instant``)."""

    status: int
    body: bytes | dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    modified: int | None = None


@dataclass(frozen=True, slots=True)
class Prefer:
    """The ``Prefer`` header (http.html#ops and search.html#errors)."""

    return_: str | None = None  # minimal | representation | OperationOutcome
    strict: bool = False

    @classmethod
    def parse(cls, header: str | None) -> Prefer:
        if not header:
            return cls()
        ret = None
        strict = False
        for part in header.split(","):
            for token in part.split(";"):
                key, _, value = token.strip().partition("=")
                value = value.strip().strip('"')
                if key.strip().lower() == "return":
                    ret = value
                elif key.strip().lower() == "handling":
                    strict = value.lower() == "strict"
        return cls(ret, strict)


@lru_cache(maxsize=1024)
def http_date(micros: int) -> str:
    return format_datetime(datetime.fromtimestamp(micros / 1_000_000, UTC), usegmt=True)


def check_type(ctx: Context, resource_type: str) -> None:
    if not ctx.registry.is_resource_type(resource_type):
        raise FhirError(Code.UNKNOWN_ENDPOINT, f"Unknown resource type '{resource_type}'")


def check_id(id: str) -> None:
    if not ID_RE.fullmatch(id):
        raise FhirError(Code.INVALID_ID, f"'{id[:80]}' is not a valid FHIR id")


def check_body(ctx: Context, body: Any, resource_type: str) -> dict[str, Any]:
    """The body is a resource of ``resource_type`` (http.html#create, #update)."""
    if not isinstance(body, dict):
        raise FhirError(Code.NOT_AN_OBJECT,
                        "the body must be a FHIR resource (a JSON object, or FHIR XML)")
    rt = body.get("resourceType")
    if not isinstance(rt, str):
        raise FhirError(Code.INVALID_RESOURCE, "resourceType is missing", ("resourceType",))
    if not ctx.registry.is_resource_type(rt):
        raise FhirError(Code.UNKNOWN_RESOURCE_TYPE, f"Unknown resource type '{rt[:80]}'",
                        ("resourceType",))
    if rt != resource_type:
        raise FhirError(Code.TYPE_MISMATCH,
                        f"resourceType '{rt}' does not match the URL's '{resource_type}'",
                        ("resourceType",))
    rid = body.get("id")
    if rid is not None and (not isinstance(rid, str) or not ID_RE.fullmatch(rid)):
        raise FhirError(Code.INVALID_ID, "Resource.id is not a valid FHIR id", ("id",))
    meta = body.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise FhirError(Code.INVALID_RESOURCE, "Resource.meta must be an object", ("meta",))
    return body


def parse_etag(value: str) -> frozenset[int] | None:
    """The versions an ``If-Match`` header names (RFC 9110 13.1.1: ``*`` or a list
    of entity tags); None for ``*``, any current version."""
    if value.strip() == "*":
        return None
    versions = set()
    for tag in value.split(","):
        m = _ETAG_RE.fullmatch(tag.strip())
        if not m:
            raise FhirError(Code.INVALID_HEADER,
                            f"'{value[:80]}' is not a version ETag like W/\"3\"")
        versions.add(int(m.group(1) or m.group(2)))
    return frozenset(versions)


def check_version(current: StoredResource | None, if_match: str | None, what: str) -> None:
    """412 unless ``If-Match`` (when given) names the current version; a resource
    that does not exist or was deleted has none."""
    if if_match is None:
        return
    wanted = parse_etag(if_match)
    if current is None or current.deleted or (
            wanted is not None and current.version not in wanted):
        have = "none" if current is None or current.deleted else str(current.version)
        raise FhirError(Code.VERSION_CONFLICT,
                        f"{what}: If-Match {if_match.strip()[:40]!r}, current version {have}")


def version_number(version: str) -> int:
    """A version id from a URL (``_history/[vid]``): ASCII digits only ("²" is a digit
    to Python, not to int()), no more than a stored version (a 32-bit integer) has;
    404 otherwise."""
    if not (version.isascii() and version.isdigit()) or len(version) > 9:
        raise FhirError(Code.VERSION_NOT_FOUND, f"version '{version[:20]}' is not known")
    return int(version)


def parse_criteria(query: str) -> list[tuple[str, str]]:
    """``identifier=a|b&name=x`` (If-None-Exist, conditional URLs) -> pairs."""
    pairs = parse_qsl(query.lstrip("?"), keep_blank_values=True)
    if not pairs:
        raise FhirError(Code.INVALID_CONDITION, "conditional criteria are empty")
    return pairs


def if_none_exist_criteria(value: str, resource_type: str) -> list[tuple[str, str]]:
    """The criteria of an ``If-None-Exist`` header (``Bundle.entry.request.ifNoneExist``):
    the query part of a search (http.html#ccreate), which some clients write as a
    whole search URL (``Patient?identifier=…``); its type must be the one created."""
    head, sep, tail = value.partition("?")
    if sep and "=" not in head and "&" not in head:
        named = head.rstrip("/").rsplit("/", 1)[-1]
        if named and named != resource_type:
            raise FhirError(Code.INVALID_CONDITION,
                            f"If-None-Exist searches {named[:64]}, not {resource_type}")
        value = tail
    return parse_criteria(value)


def location(base: str, stored: StoredResource) -> str:
    return f"{base}/{stored.resource_type}/{stored.id}/_history/{stored.version}"


def version_headers(stored: StoredResource) -> dict[str, str]:
    return {"ETag": stored.etag, "Last-Modified": http_date(stored.last_updated)}


def write_response(
    status: int, stored: StoredResource, base: str, prefer: Prefer, *, located: bool = False
) -> FhirResponse:
    """Response to create/update/patch honouring ``Prefer: return=`` (http.html#ops);
    ``located`` (or a 201) adds the version's ``Location``."""
    headers = version_headers(stored)
    if located or status == 201:
        headers["Location"] = location(base, stored)
    body: bytes | dict[str, Any] | None = stored.content
    if prefer.return_ == "minimal":
        body = None
    elif prefer.return_ == "OperationOutcome":
        body = information(
            f"{stored.resource_type}/{stored.id} version {stored.version} stored"
        )
    return FhirResponse(status, body, headers, stored.last_updated)
