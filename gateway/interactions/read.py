"""read and vread: https://hl7.org/fhir/R4/http.html#read, #vread.

Serves the stored bytes as they are; a deleted resource answers 410 Gone.
Conditional read (``If-None-Match``, ``If-Modified-Since``) answers 304.
"""

from __future__ import annotations

from email.utils import parsedate_to_datetime

from gateway.fhir.outcome import Code, FhirError
from gateway.interactions.base import Context, FhirResponse, check_id, check_type, version_headers
from gateway.security import guard
from gateway.storage.interface import StoredResource


def _not_modified(stored: StoredResource, if_none_match: str | None,
                  if_modified_since: str | None) -> bool:
    """Conditional read (http.html#cread): ``If-None-Match`` decides when present
    (RFC 9110 13.1.3), else ``If-Modified-Since`` (second precision; a date that
    cannot be parsed is ignored)."""
    if if_none_match:
        tags = {t.strip() for t in if_none_match.split(",")}
        return "*" in tags or bool(tags & {stored.etag, f'"{stored.version}"'})
    if if_modified_since:
        try:
            since = parsedate_to_datetime(if_modified_since)
        except (TypeError, ValueError):
            return False
        if since.tzinfo is None:
            return False  # not an HTTP date (those are GMT)
        return stored.last_updated // 1_000_000 <= int(since.timestamp())
    return False


async def read(
    ctx: Context, resource_type: str, id: str, *, if_none_match: str | None = None,
    if_modified_since: str | None = None,
) -> FhirResponse:
    check_type(ctx, resource_type)
    check_id(id)
    guard.require(resource_type, "read")
    stored = await ctx.store.read(resource_type, id)
    if stored is None:
        raise FhirError(Code.NOT_FOUND, f"{resource_type}/{id} is not known")
    await guard.ensure_visible(ctx.access, ctx.store, stored)
    if stored.deleted:
        raise FhirError(Code.GONE, f"{resource_type}/{id} was deleted")
    headers = version_headers(stored)
    if _not_modified(stored, if_none_match, if_modified_since):
        return FhirResponse(304, None, headers)
    return FhirResponse(200, stored.content, headers)


async def vread(ctx: Context, resource_type: str, id: str, version: str) -> FhirResponse:
    check_type(ctx, resource_type)
    check_id(id)
    guard.require(resource_type, "vread")
    if not version.isdigit():
        raise FhirError(Code.VERSION_NOT_FOUND, f"version '{version[:20]}' is not known")
    current = await ctx.store.read(resource_type, id)
    if current is None:
        raise FhirError(Code.NOT_FOUND, f"{resource_type}/{id} is not known")
    await guard.ensure_visible(ctx.access, ctx.store, current)
    stored = await ctx.store.vread(resource_type, id, int(version))
    if stored is None:
        raise FhirError(Code.VERSION_NOT_FOUND,
                        f"{resource_type}/{id} has no version {version}")
    if stored.deleted:
        raise FhirError(Code.GONE, f"{resource_type}/{id} version {version} is a deletion")
    return FhirResponse(200, stored.content, version_headers(stored))
