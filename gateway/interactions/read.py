"""read and vread: https://hl7.org/fhir/R4/http.html#read, #vread.

Serves the stored bytes as they are; a deleted resource answers 410 Gone.
Conditional read (``If-None-Match``, ``If-Modified-Since``) answers 304.
``_summary`` (true, text, data) and ``_elements`` return the resource cut down
as in a search, tagged SUBSETTED.
"""

from __future__ import annotations

from email.utils import parsedate_to_datetime
from typing import Any

from gateway.fhir.outcome import Code, FhirError
from gateway.fhir.search import SearchQuery, parse_search
from gateway.interactions.base import (
    Context,
    FhirResponse,
    check_id,
    check_type,
    version_headers,
    version_number,
)
from gateway.interactions.search import shape
from gateway.security import guard
from gateway.storage.interface import StoredResource

_READ_PARAMS = frozenset({"_summary", "_elements"})


def subsetting_of(ctx: Context, resource_type: str,
                  query: list[tuple[str, str]]) -> SearchQuery | None:
    """``_summary``/``_elements`` of a read, checked; None: the whole resource. Other
    parameters mean nothing to a read (``_format``, a client's cache buster …)."""
    pairs = [(k, v) for k, v in query if k in _READ_PARAMS]
    if not pairs:
        return None
    parsed = parse_search(resource_type, pairs, ctx.registry.search_params, strict=True)
    if parsed.summary == "count":
        raise FhirError(Code.INVALID_SEARCH_VALUE, "_summary=count applies to searches")
    if parsed.elements or parsed.summary in ("true", "text", "data"):
        return parsed
    return None


def _body(ctx: Context, stored: StoredResource,
          subsetting: SearchQuery | None) -> bytes | dict[str, Any] | None:
    return stored.content if subsetting is None else shape(ctx, subsetting, stored)


def _not_modified(stored: StoredResource, if_none_match: str | None,
                  if_modified_since: str | None) -> bool:
    """Conditional read (http.html#cread): ``If-None-Match`` decides when present
    (RFC 9110 13.1.3), else ``If-Modified-Since`` (second precision). RFC 9110
    13.1.3: "A recipient MUST ignore If-Modified-Since if the field value is not a
    valid HTTP-date": one that cannot be parsed, or names a year no date holds
    (``Fri, 31 Dec 99999999999999999999 23:59:59 GMT``), is ignored."""
    if if_none_match:
        tags = {t.strip() for t in if_none_match.split(",")}
        return "*" in tags or bool(tags & {stored.etag, f'"{stored.version}"'})
    if if_modified_since:
        try:
            since = parsedate_to_datetime(if_modified_since)
            if since.tzinfo is None:
                return False  # not an HTTP date (those are GMT)
            seconds = int(since.timestamp())
        except (TypeError, ValueError, OverflowError):
            return False
        return stored.last_updated // 1_000_000 <= seconds
    return False


async def read(
    ctx: Context, resource_type: str, id: str, *, if_none_match: str | None = None,
    if_modified_since: str | None = None, query: list[tuple[str, str]] | None = None,
) -> FhirResponse:
    check_type(ctx, resource_type)
    check_id(id)
    guard.require(resource_type, "read")
    subsetting = subsetting_of(ctx, resource_type, query or [])
    stored = await ctx.store.read(resource_type, id)
    if stored is None:
        raise FhirError(Code.NOT_FOUND, f"{resource_type}/{id} is not known")
    await guard.ensure_visible(ctx.access, ctx.store, stored)
    if stored.deleted:
        raise FhirError(Code.GONE, f"{resource_type}/{id} was deleted")
    headers = version_headers(stored)
    if _not_modified(stored, if_none_match, if_modified_since):
        return FhirResponse(304, None, headers, stored.last_updated)
    return FhirResponse(200, _body(ctx, stored, subsetting), headers, stored.last_updated)


async def vread(ctx: Context, resource_type: str, id: str, version: str,
                query: list[tuple[str, str]] | None = None, *, if_none_match: str | None = None,
                if_modified_since: str | None = None) -> FhirResponse:
    check_type(ctx, resource_type)
    check_id(id)
    guard.require(resource_type, "vread")
    subsetting = subsetting_of(ctx, resource_type, query or [])
    number = version_number(version)
    current = await ctx.store.read(resource_type, id)
    if current is None:
        raise FhirError(Code.NOT_FOUND, f"{resource_type}/{id} is not known")
    await guard.ensure_visible(ctx.access, ctx.store, current)
    stored = await ctx.store.vread(resource_type, id, number)
    if stored is not None and not await guard.versions_visible(ctx.access, ctx.store, [stored]):
        stored = None  # about a patient the caller may not see: as if there were none
    if stored is None:
        raise FhirError(Code.VERSION_NOT_FOUND,
                        f"{resource_type}/{id} has no version {version}")
    if stored.deleted:
        raise FhirError(Code.GONE, f"{resource_type}/{id} version {version} is a deletion")
    headers = version_headers(stored)
    if _not_modified(stored, if_none_match, if_modified_since):  # a cache's copy is current
        return FhirResponse(304, None, headers, stored.last_updated)
    return FhirResponse(200, _body(ctx, stored, subsetting), headers, stored.last_updated)
