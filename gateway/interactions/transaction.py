"""batch and transaction: https://hl7.org/fhir/R4/http.html#transaction,
https://hl7.org/fhir/R4/bundle.html#transaction.

A transaction is one database transaction: every entry succeeds or none
does, and a failure answers with one OperationOutcome naming the entry
(``Bundle.entry[i]``). Entries are processed in the spec's order (DELETE,
POST, PUT/PATCH, then GET/HEAD, which run inside the transaction: they see
its writes, and their failure fails it); ``fullUrl`` names (``urn:uuid:…``)
and conditional references (``Patient?identifier=…``) are resolved and
rewritten in every resource; identical conditional creates in one Bundle
yield one resource, and a conditional reference with the criteria of such a
create names the resource it found or makes (as HAPI does: Synthea's Bundles
refer to their Organizations and Practitioners so). A batch runs each entry
on its own.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import format_datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from gateway.fhir import json as fjson
from gateway.fhir.bundles import bundle, raw
from gateway.fhir.instants import instant
from gateway.fhir.outcome import Code, FhirError, information
from gateway.fhir.references import (
    PLACEHOLDERS,
    conditional_references,
    references_in,
    relative_names,
    rewrite,
    split_restful,
)
from gateway.interactions.base import (
    Context,
    FhirResponse,
    Prefer,
    admit,
    check_body,
    check_id,
    check_type,
    check_valid,
    if_none_exist_criteria,
    location,
    parse_criteria,
    run_write,
)
from gateway.interactions.conditional import (
    check_satisfies,
    criteria_key,
    reference_to_match,
    single_match,
)
from gateway.interactions.create import create_in, new_id
from gateway.interactions.delete import delete_in
from gateway.interactions.offload import Turns
from gateway.interactions.patch import check_patch, patch_in
from gateway.interactions.router import FhirRequest, route
from gateway.interactions.stored_profiles import CONFORMANCE_TYPES
from gateway.interactions.update import resolve_conditional_id, update_in
from gateway.security import audit as audit_trail
from gateway.security import guard
from gateway.security.principal import CALLER, Caller, current
from gateway.storage.interface import StoredResource, StoreTransaction

_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}
#: Bundle.entry.request's elements that stand for HTTP headers (all strings)
_HEADERS = (("ifNoneExist", "if-none-exist"), ("ifMatch", "if-match"),
            ("ifNoneMatch", "if-none-match"), ("ifModifiedSince", "if-modified-since"))


@dataclass(slots=True)
class Entry:
    index: int
    method: str
    path: str  # below the base
    query: str
    full_url: str | None
    resource: Any
    headers: dict[str, str]
    resource_type: str = ""
    id: str | None = None
    outcome: tuple[StoredResource, int] | None = None  # stored version, status
    response: FhirResponse | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"Bundle.entry[{self.index}]"


def _entry_error(entry: Entry, exc: FhirError) -> FhirError:
    prefix = f"{entry.where} ({entry.method} {entry.path}{'?' if entry.query else ''}"
    prefix += f"{entry.query}): "
    return FhirError(exc.code, prefix + (exc.diagnostics or exc.code.summary),
                     (f"{entry.where}", *exc.expression), exc.extra)


def _found_only(e: Entry) -> bool:
    """A conditional create that found its resource (it writes nothing)."""
    return e.method == "POST" and bool(e.extra.get("exists"))


def _relative(url: str, base: str) -> tuple[str, str]:
    if base and url.startswith(base + "/"):
        url = url[len(base) + 1 :]
    elif "://" in url.split("?", 1)[0]:  # (a search value may well be a URL)
        raise FhirError(Code.INVALID_ENTRY, f"request.url '{url[:100]}' is not on this server")
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # "//[": an authority urllib cannot read ("Invalid IPv6 URL")
        raise FhirError(Code.INVALID_ENTRY,
                        f"request.url '{url[:100]}' is not a valid URL ({exc})") from None
    return parts.path.strip("/"), parts.query


def parse_entries(ctx: Context, body: Any, base: str) -> tuple[str, list[Entry]]:
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        raise FhirError(Code.INVALID_BUNDLE, "POST to the base expects a Bundle")
    kind = body.get("type")
    if kind not in ("transaction", "batch", "history"):
        raise FhirError(Code.INVALID_BUNDLE,
                        f"Bundle.type must be transaction, batch or history, not '{kind}'",
                        ("Bundle.type",))
    raw_entries = body.get("entry", [])
    if not isinstance(raw_entries, list):
        raise FhirError(Code.INVALID_BUNDLE, "Bundle.entry must be an array", ("Bundle.entry",))
    if len(raw_entries) > ctx.settings.max_bundle_entries:
        raise FhirError(Code.TOO_MANY_ENTRIES,
                        f"{len(raw_entries)} entries; at most {ctx.settings.max_bundle_entries}")
    indexed = list(enumerate(raw_entries))
    if kind == "history":
        kind, indexed = "transaction", _latest_of_history(raw_entries)
    entries = []
    for i, e in indexed:
        try:
            entries.append(_parse_entry(i, e, base))
        except FhirError as exc:
            if kind == "transaction":
                raise
            # a batch's entries stand alone: this one is answered with its error (and
            # audited as the request it named, as far as it named one)
            req = e.get("request") if isinstance(e, dict) else None
            method, url = ((req.get("method"), req.get("url")) if isinstance(req, dict)
                           else (None, None))
            entries.append(Entry(i, method if isinstance(method, str) else "",
                                 url[:200] if isinstance(url, str) else "", "", None, None,
                                 {}, response=FhirResponse(exc.status, exc.outcome())))
    _check_unique(kind, entries)
    return kind, entries


def _latest_of_history(entries: list[Any]) -> list[tuple[int, Any]]:
    """A history Bundle as a transaction (http.html#other-bundles: "servers SHOULD
    accept a history Bundle"), to copy what another server holds: each resource as
    its newest entry leaves it (a history lists the newest first), under its own id,
    so that references to it keep their meaning: a POST or PUT becomes a PUT of
    ``Type/[resource.id]``, a DELETE stays one. The versions in between are not
    replayed; the copy has versions of its own. Each with its place in the Bundle."""
    out: list[tuple[int, Any]] = []
    seen: set[str] = set()
    for i, e in enumerate(entries):
        req = e.get("request") if isinstance(e, dict) else None
        method = req.get("method") if isinstance(req, dict) else None
        url = req.get("url") if isinstance(req, dict) else None
        if method not in ("POST", "PUT", "PATCH", "DELETE") or not isinstance(url, str):
            raise FhirError(Code.INVALID_ENTRY,
                            f"Bundle.entry[{i}]: a history entry needs request.method"
                            " (POST, PUT, PATCH or DELETE) and request.url",
                            (f"Bundle.entry[{i}].request",))
        resource = e.get("resource")
        rtype = url.split("?", 1)[0].split("/")[0]
        if method == "DELETE":
            key = "/".join(url.split("?", 1)[0].split("/")[:2])
        else:
            rid = resource.get("id") if isinstance(resource, dict) else None
            if not isinstance(rid, str) or not rid:
                raise FhirError(Code.INVALID_ENTRY,
                                f"Bundle.entry[{i}]: a history entry's resource keeps its id",
                                (f"Bundle.entry[{i}].resource.id",))
            key = f"{rtype}/{rid}"
        if key in seen:
            continue  # an older version of a resource written later in the Bundle
        seen.add(key)
        entry: dict[str, Any] = {"request": {"method": "DELETE" if method == "DELETE"
                                             else "PUT", "url": key}}
        if isinstance(e.get("fullUrl"), str):
            entry["fullUrl"] = e["fullUrl"]
        if method != "DELETE":
            entry["resource"] = resource
        out.append((i, entry))
    return out


def _check_unique(kind: str, entries: list[Entry]) -> None:
    """A ``fullUrl`` names one entry: "a resource can only appear in a transaction
    once (by identity)" (http.html#trules), and bdl-7 holds for a batch (the same
    fullUrl only for different versions). Otherwise which entry a reference to it
    means would be a guess."""
    first: dict[tuple[str, str | None], Entry] = {}
    for e in entries:
        if e.full_url is None or e.response is not None:
            continue
        meta = e.resource.get("meta") if isinstance(e.resource, dict) else None
        version = meta.get("versionId") if isinstance(meta, dict) and kind == "batch" else None
        key = (e.full_url, version if isinstance(version, str) else None)
        if key in first:
            raise FhirError(
                Code.INVALID_BUNDLE,
                f"{first[key].where} and {e.where} have the same fullUrl"
                f" '{e.full_url[:200]}': an entry's fullUrl must be unique in a {kind}"
                " (bdl-7)", (f"{e.where}.fullUrl",))
        first[key] = e


def _parse_entry(i: int, e: Any, base: str) -> Entry:
    """One entry's request, checked (a FhirError names the entry)."""
    where = f"Bundle.entry[{i}]"
    if not isinstance(e, dict) or not isinstance(e.get("request"), dict):
        raise FhirError(Code.INVALID_ENTRY, f"{where}: request is missing",
                        (f"{where}.request",))
    req = e["request"]
    method = req.get("method")
    url = req.get("url")
    if not isinstance(method, str) or method not in _ORDER or not isinstance(url, str) \
            or not url:
        raise FhirError(Code.INVALID_ENTRY,
                        f"{where}: request.method and request.url are required",
                        (f"{where}.request",))
    try:
        path, query = _relative(url, base)
    except FhirError as exc:
        raise FhirError(exc.code, f"{where}: {exc.diagnostics}",
                        (f"{where}.request.url",)) from None
    headers: dict[str, str] = {}
    for key, name in _HEADERS:
        value = req.get(key)
        if value is None:
            continue
        if not isinstance(value, str):  # ignored, it would make a conditional write a plain one
            raise FhirError(Code.INVALID_ENTRY,
                            f"{where}: request.{key} must be a string",
                            (f"{where}.request.{key}",))
        headers[name] = value
    if "if-modified-since" in headers:
        headers["if-modified-since"] = _http_date(headers["if-modified-since"])
    full_url = e.get("fullUrl")
    if full_url is not None and not isinstance(full_url, str):
        raise FhirError(Code.INVALID_ENTRY, f"{where}: fullUrl must be a string (a uri)",
                        (f"{where}.fullUrl",))
    if full_url is not None:
        _check_full_url(where, full_url, method, path)
    return Entry(i, method, path, query, full_url, e.get("resource"), headers)


def _check_full_url(where: str, full_url: str, method: str, path: str) -> None:
    """``fullUrl`` is a ``uri`` (not empty, no whitespace), not version specific
    (bdl-8: ``fullUrl.contains('/_history/').not()``), and one that names a
    resource by its RESTful URL "SHALL NOT disagree with the id in the resource"
    (Bundle.entry.fullUrl): a PUT's is that of the resource it writes."""
    if not full_url or any(c.isspace() for c in full_url):
        raise FhirError(Code.INVALID_ENTRY,
                        f"{where}: fullUrl '{full_url[:100]}' is not a valid URI",
                        (f"{where}.fullUrl",))
    if "/_history/" in full_url:
        raise FhirError(Code.INVALID_ENTRY,
                        f"{where}: fullUrl '{full_url[:200]}' names a version; a fullUrl"
                        " cannot be a version specific reference (bdl-8)",
                        (f"{where}.fullUrl",))
    split = split_restful(full_url)
    if method == "PUT" and split is not None and path.count("/") == 1 and split[1] != path:
        raise FhirError(Code.INVALID_ENTRY,
                        f"{where}: fullUrl '{full_url[:200]}' names {split[1]}, but the"
                        f" entry writes {path[:100]}", (f"{where}.fullUrl",))


#: the latest HTTP date (RFC 9110 5.6.7: a year of four digits), and one before any
#: version stored here
_LAST_HTTP_DATE = "Fri, 31 Dec 9999 23:59:59 GMT"
_EPOCH_HTTP_DATE = "Thu, 01 Jan 1970 00:00:00 GMT"


def _http_date(value: str) -> str:
    """``Bundle.entry.request.ifModifiedSince`` is an ``instant``
    (bundle-definitions.html#Bundle.entry.request.ifModifiedSince), the header
    it stands for an HTTP date: ``2035-01-01T00:00:00Z`` ->
    ``Mon, 01 Jan 2035 00:00:00 GMT``. A value that is neither is passed on, and
    ignored as an unparseable header is. An instant in UTC beyond the year 9999
    (``9999-12-31T23:59:59-12:00``) becomes the last HTTP date, one before 1970 the
    first of 1970: no version was stored at either, so the answer is the same
    (RFC 9110 13.1.3; a year below 1000 would be read as a two-digit one)."""
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return value
    if when.tzinfo is None:
        return value  # an instant carries its offset; a bare date-time is not one
    try:
        utc = when.astimezone(UTC)
    except OverflowError:  # beyond 9999-12-31 or before 0001-01-01 in UTC
        return _LAST_HTTP_DATE if when.year == 9999 else _EPOCH_HTTP_DATE
    if utc.year < 1970:
        return _EPOCH_HTTP_DATE
    return format_datetime(utc, usegmt=True)


def _status_line(status: int) -> str:
    """``Bundle.entry.response.status``: the code and its reason phrase, as HTTP writes them."""
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def _is_operation(path: str) -> bool:
    """An operation's answer (``$validate``'s OperationOutcome too) is the entry's resource."""
    return path.rsplit("/", 1)[-1].startswith("$")


def _response_entry(entry: Entry, base: str, prefer: Prefer) -> dict[str, Any]:
    if entry.response is not None:  # GET/HEAD, or a batch entry
        resp = entry.response
        out: dict[str, Any] = {"response": {"status": _status_line(resp.status)}}
        for header, key in (("Location", "location"), ("ETag", "etag")):
            if header in resp.headers:
                out["response"][key] = resp.headers[header]
        if resp.modified is not None:
            out["response"]["lastModified"] = instant(resp.modified)
        if entry.method == "HEAD" and resp.status < 400:
            pass  # the headers of a GET without its body (RFC 9110 9.3.2)
        elif isinstance(resp.body, bytes):
            out["resource"] = raw(resp.body)
        elif isinstance(resp.body, dict):
            if resp.body.get("resourceType") == "OperationOutcome" and (
                    resp.status >= 400 or not (entry.method in ("GET", "HEAD")
                                               or _is_operation(entry.path))):
                out["response"]["outcome"] = resp.body
            else:
                out["resource"] = resp.body
        return out
    response: dict[str, Any] = {}
    if entry.outcome is None:  # delete of nothing
        return {"response": {"status": "204 No Content"}}
    stored, status = entry.outcome
    response["status"] = _status_line(status)
    if status in (200, 201) and not stored.deleted:
        response["location"] = location(base, stored)
    response["etag"] = stored.etag
    response["lastModified"] = instant(stored.last_updated)
    out = {"response": response}
    if stored.content is not None and prefer.return_ == "representation":
        out["fullUrl"] = f"{base}/{stored.resource_type}/{stored.id}"
        out["resource"] = raw(stored.content)
    elif prefer.return_ == "OperationOutcome":  # (bundle.html: entry.response.outcome)
        what = "deleted" if stored.deleted else "stored"
        response["outcome"] = information(
            f"{stored.resource_type}/{stored.id} version {stored.version} {what}")
    return out


class _Transaction:
    """Resolves identities, rewrites references and writes the entries in ``tx``."""

    def __init__(self, ctx: Context, tx: StoreTransaction, entries: list[Entry]) -> None:
        self.ctx = ctx
        self.tx = tx
        self.entries = entries
        self.names: dict[str, str] = {}  # fullUrl -> Type/id
        self.conditional_creates: dict[str, Entry] = {}  # criteria_key -> first entry
        self.resolved_refs: dict[str, str] = {}
        self.new_patients: frozenset[str] = frozenset()
        self._relative_names: dict[str, dict[str, str]] | None = None
        #: conditional writes to check against their criteria once all are written
        self.satisfies: list[tuple[Entry, StoredResource, str]] = []

    async def run(self) -> None:
        writes = [e for e in self.entries if not _read_like(e)]
        keys = {key for e in writes for key in _lock_keys(e)}
        # Locks are taken at once and in one order, so that Bundles writing the same
        # resources in different orders wait for each other instead of deadlocking
        # (a lock taken again is held already): first every criteria's (conditional
        # entries and references), then, once the criteria have found their
        # resources, every resource's, those found and those named alike. A resource
        # locked before the criteria were searched would let two Bundles each hold
        # one resource and wait for the other's, found by its criteria.
        criteria = {k for k in keys if "?" in k}
        if criteria and len(keys) > 1:
            await self.tx.lock(*criteria)
        turns = Turns()
        for e in self._in_identity_order(writes):
            await turns.take()
            try:
                await self._identify(e)
            except FhirError as exc:
                raise _entry_error(e, exc) from None
        found = {f"{e.resource_type}/{e.id}" for e in writes
                 if e.id is not None and e.method != "POST" and "same_as" not in e.extra}
        if found and len(found | criteria) > 1:
            await self.tx.lock(*found)
        self._check_overlap(writes)
        fresh = set()
        for e in writes:
            if e.resource_type == "Patient" and e.id and e.method in ("POST", "PUT") and (
                    not e.extra.get("exists") and "same_as" not in e.extra):
                if e.method == "POST":  # an id the server has just drawn: nobody has it
                    fresh.add(e.id)
                    continue
                current = await self.tx.current("Patient", e.id)
                if current is None or current.deleted:
                    fresh.add(e.id)
        self.new_patients = frozenset(fresh)
        # a Bundle that writes profiles, value sets or code systems has the rest of
        # its resources validated after its writes, against what it stored (an
        # implementation guide's profiles and examples in one Bundle)
        defer = any(e.resource_type in CONFORMANCE_TYPES for e in writes)
        deferred: list[Entry] = []
        for e in writes:
            await turns.take()
            if e.method in ("POST", "PUT") and isinstance(e.resource, dict):
                try:
                    await self._rewrite(e)
                    if "same_as" not in e.extra and not e.extra.get("exists"):
                        later = defer and e.resource_type not in CONFORMANCE_TYPES
                        await admit(self.ctx, e.resource, self.tx, validate=not later)
                        if later:
                            deferred.append(e)
                except FhirError as exc:
                    raise _entry_error(e, exc) from None
        for e in sorted(writes, key=lambda e: (_ORDER[e.method], e.index)):
            await turns.take()
            try:
                await self._execute(e)
            except FhirError as exc:
                raise _entry_error(e, exc) from None
        # (after every write: criteria may chain into what later entries write)
        for e, stored, what in self.satisfies:
            try:
                await check_satisfies(self.ctx, self.tx, stored, e.extra["criteria"], what)
            except FhirError as exc:
                raise _entry_error(e, exc) from None
        for e in deferred:
            await turns.take()
            try:
                await check_valid(self.ctx, e.resource, self.tx)
            except FhirError as exc:
                raise _entry_error(e, exc) from None

    def _in_identity_order(self, writes: list[Entry]) -> Iterator[Entry]:
        """``writes`` in their order, but an entry whose criteria name another entry
        (``Observation?subject=urn:uuid:…``) after that one: its criteria are
        searched with the id that entry was given."""
        names = {e.full_url for e in writes if e.full_url}
        named = {id(e): _criteria_names(e, names) for e in writes} if names else {}
        pending = writes
        while pending:
            waiting = {e.full_url for e in pending if e.full_url}
            ready = [e for e in pending
                     if not (named.get(id(e), set()) - {e.full_url}) & waiting]
            if not ready:  # entries naming each other: their names stay as they are
                ready = pending
            yield from ready
            done = {id(e) for e in ready}
            pending = [e for e in pending if id(e) not in done]

    def _criteria(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """``pairs`` with the fullUrls of entries identified already replaced by what
        they name (as HAPI FHIR substitutes ids in conditional URLs): a Bundle sent
        again finds what it wrote the first time."""
        if not self.names:
            return pairs
        return [(k, ",".join(self.names.get(v, v) for v in value.split(",")))
                if ":" in value else (k, value) for k, value in pairs]

    async def _identify(self, e: Entry) -> None:
        parts = e.path.split("/") if e.path else []
        if not parts or not parts[0]:
            raise FhirError(Code.INVALID_ENTRY, "request.url names no resource type")
        e.resource_type = parts[0]
        check_type(self.ctx, e.resource_type)
        guard.require(e.resource_type, {"POST": "create", "PUT": "update", "PATCH": "patch",
                                        "DELETE": "delete"}[e.method])
        if e.method == "POST":
            if len(parts) != 1:
                raise FhirError(Code.INVALID_ENTRY, "POST request.url must be a resource type")
            res = check_body(self.ctx, e.resource, e.resource_type)
            res.pop("id", None)
            cond = e.headers.get("if-none-exist")
            if cond:
                criteria = self._criteria(if_none_exist_criteria(cond, e.resource_type))
                key = criteria_key(e.resource_type, criteria)
                first = self.conditional_creates.get(key)
                if first is not None and first.method == "POST":
                    # identical conditional create: the same resource
                    e.id = first.id
                    e.extra["same_as"] = first
                elif first is not None:  # a conditional update's: the same resource twice
                    e.id = first.id
                else:
                    self.conditional_creates[key] = e
                    e.extra["criteria"] = criteria
                    found = await single_match(self.ctx, self.tx, e.resource_type, criteria)
                    e.id = found or new_id()
                    e.extra["exists"] = found is not None
            else:
                e.id = new_id()
        elif e.method in ("PUT", "PATCH", "DELETE"):
            if len(parts) == 2:
                check_id(parts[1])
                e.id = parts[1]
            elif len(parts) == 1 and e.query:
                criteria = self._criteria(parse_criteria(e.query))
                if e.method == "PUT":
                    key = criteria_key(e.resource_type, criteria)
                    first = self.conditional_creates.get(key)
                    if first is not None:  # what another entry writes: written twice
                        e.id = first.id
                    else:
                        body_id = e.resource.get("id") if isinstance(e.resource, dict) \
                            else None
                        e.id = await resolve_conditional_id(self.ctx, self.tx,
                                                            e.resource_type, criteria, body_id)
                        self.conditional_creates[key] = e
                        e.extra["criteria"] = criteria
                else:
                    e.id = await single_match(self.ctx, self.tx, e.resource_type, criteria)
                    if e.id is None and e.method == "PATCH":
                        raise FhirError(Code.NOT_FOUND, "no resource matches the patch criteria")
            else:
                raise FhirError(Code.INVALID_ENTRY,
                                f"{e.method} request.url must be Type/id or Type?criteria")
            if e.method == "PUT":
                res = check_body(self.ctx, e.resource, e.resource_type)
                if len(parts) == 2 and res.get("id") != e.id:
                    raise FhirError(Code.ID_MISMATCH, "Resource.id must match request.url",
                                    ("id",))
            if e.method == "PATCH":
                e.extra["ops"] = check_patch(self._patch_ops(e),
                                             self.ctx.settings.max_patch_operations)
        if e.full_url and e.id:
            self.names[e.full_url] = f"{e.resource_type}/{e.id}"

    @staticmethod
    def _patch_ops(e: Entry) -> Any:
        # FHIR carries a JSON Patch or an XML Patch in a transaction as a Binary
        # resource (base64 data, contentType naming which)
        res = e.resource
        if isinstance(res, dict) and res.get("resourceType") == "Binary":
            import base64

            from gateway.fhir import json as fjson
            from gateway.fhir import xmlpatch

            xml = str(res.get("contentType", "")).split(";")[0].strip().lower() \
                == xmlpatch.MEDIA_TYPE
            try:
                data = base64.b64decode(res.get("data", ""), validate=True)
                return xmlpatch.parse(data) if xml else fjson.loads(data)
            except ValueError:
                raise FhirError(Code.INVALID_PATCH, "Binary.data is not a base64"
                                f" {'XML' if xml else 'JSON'} Patch") from None
        return res

    def _check_overlap(self, writes: list[Entry]) -> None:
        """Two entries that write one resource fail the transaction (http.html#trules:
        identities, "including resolved identities from conditional update/delete",
        may not overlap). A conditional create that found its resource writes
        nothing: it may name a resource another entry updates or patches (it answers
        with the version before), not one that another deletes (it was judged
        before the deletion it would have to see)."""
        seen: dict[tuple[str, str], Entry] = {}
        for e in writes:
            if e.id is None or "same_as" in e.extra:
                continue
            key = (e.resource_type, e.id)
            first = seen.get(key)
            if first is not None and not (
                    (_found_only(e) or _found_only(first))
                    and "DELETE" not in (e.method, first.method)):
                verb = "name" if _found_only(e) or _found_only(first) else "write"
                raise FhirError(
                    Code.DUPLICATE_IDENTITY,
                    f"{e.where} and {first.where} both {verb} {e.resource_type}/{e.id}",
                    (e.where,))
            if first is None or _found_only(first):
                seen[key] = e

    async def _rewrite(self, e: Entry) -> None:
        async def resolve_all(refs: list[str]) -> None:
            # conditional references are resolved first (they need I/O) …
            for ref in refs:
                if ref not in self.resolved_refs:
                    rt, _, query = ref.partition("?")
                    check_type(self.ctx, rt)
                    guard.require(rt, "search")
                    criteria = self._criteria(parse_criteria(query))
                    # the criteria of a conditional create in this Bundle: the resource
                    # it found or creates (as a Bundle with the Practitioners and
                    # Organizations its entries refer to by identifier is written)
                    same = self.conditional_creates.get(criteria_key(rt, criteria))
                    self.resolved_refs[ref] = f"{rt}/{same.id}" if (
                        same is not None and same.id is not None) else \
                        await reference_to_match(self.ctx, self.tx, ref, criteria)

        split = split_restful(e.full_url) if e.full_url else None
        relative = self._relative(split[0]) if split else {}
        await resolve_all(e.extra["refs"])
        # … then every name is replaced in one walk
        rewrite(e.resource, self.names, self.resolved_refs.__getitem__, relative,
                self.ctx.registry.indexer.model)
        if e.resource.get("resourceType") != "Bundle":
            for element, value in references_in(e.resource):
                if value.startswith(PLACEHOLDERS):  # names no entry of the Bundle
                    raise FhirError(Code.INVALID_ENTRY,
                                    f"{element} refers to '{value[:100]}', which is the"
                                    " fullUrl of no entry in this transaction",
                                    (element,))

    def _relative(self, base: str) -> dict[str, str]:
        if self._relative_names is None:  # (once every entry has its name)
            self._relative_names = relative_names(self.names)
        return self._relative_names.get(base, {})

    async def _execute(self, e: Entry) -> None:
        assert e.id is not None or e.method == "DELETE"
        ctx, tx = self.ctx, self.tx
        if e.method == "DELETE":
            if e.id is None:
                e.outcome = None
                return
            deleted = await delete_in(ctx, tx, e.resource_type, e.id,
                                      if_match=e.headers.get("if-match"))
            e.outcome = (deleted, 204) if deleted else None
            return
        assert e.id is not None
        if e.method == "POST":
            first = e.extra.get("same_as")
            if first is not None:
                e.outcome = first.outcome
                if e.outcome is not None:
                    e.outcome = (e.outcome[0], 200)
                return
            if e.extra.get("exists"):
                current = await tx.current(e.resource_type, e.id)
                assert current is not None
                e.outcome = (current, 200)
                return
            stored, _ = await create_in(ctx, tx, e.resource_type, copy.copy(e.resource),
                                        id=e.id, new_patients=self.new_patients)
            e.outcome = (stored, 201)
            if "criteria" in e.extra:
                self.satisfies.append((e, stored, "conditional create"))
        elif e.method == "PUT":
            stored, created = await update_in(ctx, tx, e.resource_type, e.id,
                                              copy.copy(e.resource),
                                              if_match=e.headers.get("if-match"),
                                              if_none_match=e.headers.get("if-none-match"),
                                              new_patients=self.new_patients)
            e.outcome = (stored, 201 if created else 200)
            if "criteria" in e.extra and created:
                self.satisfies.append((e, stored, "conditional update"))
        elif e.method == "PATCH":
            stored = await patch_in(ctx, tx, e.resource_type, e.id, e.extra["ops"],
                                    if_match=e.headers.get("if-match"),
                                    new_patients=self.new_patients)
            e.outcome = (stored, 200)


def _lock_keys(e: Entry) -> Iterator[str]:
    """The locks ``e`` will take, as far as they are known before any I/O: its
    resource's (``Type/id``), its criteria's and its conditional references'.
    Collects the conditional references (``extra["refs"]``) as it goes; an entry
    too malformed to tell yields what it can (its error comes later)."""
    refs: list[str] = []
    if e.method in ("POST", "PUT"):
        conditional_references(e.resource, refs)
    e.extra["refs"] = refs
    resource_type, _, rest = e.path.partition("/")
    try:
        if e.method == "POST":
            cond = e.headers.get("if-none-exist")
            if cond and not rest:
                yield criteria_key(resource_type, if_none_exist_criteria(cond, resource_type))
        elif rest and "/" not in rest:
            yield f"{resource_type}/{rest}"
        elif not rest and e.query:
            yield criteria_key(resource_type, parse_criteria(e.query))
        for ref in refs:
            rt, _, query = ref.partition("?")
            yield criteria_key(rt, parse_criteria(query))
    except FhirError:
        return


def _criteria_names(e: Entry, names: set[str]) -> set[str]:
    """The entries' fullUrls (of ``names``) that ``e``'s criteria name."""
    if e.method == "POST":
        cond = e.headers.get("if-none-exist")
        text = cond.partition("?")[2] or cond if cond else None
    else:
        text = e.query if "/" not in e.path else None
    if not text:
        return set()
    try:
        pairs = parse_criteria(text)
    except FhirError:
        return set()
    return {v for _, value in pairs if ":" in value for v in value.split(",") if v in names}


def _read_like(e: Entry) -> bool:
    """A GET or HEAD, or an operation invoked by POST (``ValueSet/$lookup`` with its
    Parameters): run after the Bundle's writes, inside its transaction."""
    return e.method in ("GET", "HEAD") or any(p.startswith("$") for p in e.path.split("/"))


@contextmanager
def _entry_caller(e: Entry) -> Iterator[Caller]:
    """The entry as the request being handled (its own caller, for its AuditEvent)."""
    child = current().child(e.method, e.path, e.query)
    token = CALLER.set(child)
    try:
        yield child
    finally:
        CALLER.reset(token)


async def _entry_request(
    ctx: Context, e: Entry, req: FhirRequest
) -> FhirResponse:
    """Route one entry as a request of its own, audited as one."""
    with _entry_caller(e) as child:
        try:
            response = await route(ctx, req)
        except FhirError as exc:
            response = FhirResponse(exc.status, _entry_error(e, exc).outcome())
        if ctx.audit is not None and not child.audited:
            await ctx.audit.write(await audit_trail.records_for(child, response.status))
        return response


async def _read_within(ctx: Context, tx: StoreTransaction, e: Entry, base: str
                       ) -> FhirResponse:
    """A GET/HEAD entry of a transaction, or an operation, run inside it: it sees the
    Bundle's writes, and its failure fails the Bundle. Audited as a request of its
    own, in the transaction."""
    req = FhirRequest(e.method, e.path, parse_qsl(e.query, keep_blank_values=True),
                      e.headers, e.resource if e.method == "POST" else None, base)
    with _entry_caller(e) as child:
        try:
            response = await route(replace(ctx, store=ctx.store.within(tx)), req)
        except FhirError as exc:
            raise _entry_error(e, exc) from None
        if ctx.audit is not None:
            await tx.append_audit(audit_trail.records_of(child, response.status))
        return response


async def process_bundle(ctx: Context, body: Any, *, base: str, prefer: Prefer) -> FhirResponse:
    kind, entries = parse_entries(ctx, body, base)
    if kind == "batch":
        return await _batch(ctx, entries, base, prefer)
    fresh = entries
    # each attempt starts from the Bundle as received: the first works on the parsed
    # entries themselves, a retry (a lost race) on copies of them as they came in
    received = [fjson.dumps(e.resource) if e.resource is not None else None for e in entries]
    attempts = 0

    async def work(tx: StoreTransaction) -> None:
        nonlocal fresh, attempts
        attempts += 1
        if attempts == 1:
            resources = [e.resource for e in entries]
        else:
            resources = [fjson.loads(r) if r is not None else None for r in received]
        fresh = [Entry(e.index, e.method, e.path, e.query, e.full_url, resource, e.headers)
                 for e, resource in zip(entries, resources, strict=True)]
        await _Transaction(ctx, tx, fresh).run()
        for e in fresh:
            if _read_like(e):
                e.response = await _read_within(ctx, tx, e, base)

    await run_write(ctx, work)
    return FhirResponse(200, bundle("transaction-response",
                                    [_response_entry(e, base, prefer) for e in fresh]))


def _refers_to_entry(e: Entry, placeholders: dict[str, int]) -> FhirError | None:
    """A batch entry that refers to a resource another entry creates: "considered to
    be non-conformant" (http.html#brules); its reference would be left naming
    nothing. A transaction resolves such names."""
    if e.resource.get("resourceType") == "Bundle":
        return None
    for element, value in references_in(e.resource):
        other = placeholders.get(value)
        if other is not None and other != e.index:
            return FhirError(Code.INVALID_ENTRY,
                             f"{element} refers to Bundle.entry[{other}], which this batch"
                             " creates: entries of a batch cannot refer to each other"
                             " (send a transaction)", (element,))
    return None


async def _batch(ctx: Context, entries: list[Entry], base: str, prefer: Prefer) -> FhirResponse:
    out = []
    # the names of what the batch creates: urn:… fullUrls, and those of POSTs
    placeholders = {e.full_url: e.index for e in entries if e.full_url is not None and (
        e.method == "POST" or e.full_url.startswith("urn:"))}
    for e in entries:
        if e.response is not None:  # refused as it stood (parse_entries)
            with _entry_caller(e) as child:
                if ctx.audit is not None:
                    await ctx.audit.write(await audit_trail.records_for(child, e.response.status))
            out.append(_response_entry(e, base, prefer))
            continue
        if e.method in ("POST", "PUT") and isinstance(e.resource, dict):
            refused = _refers_to_entry(e, placeholders)
            if refused is not None:
                with _entry_caller(e) as child:
                    if ctx.audit is not None:
                        await ctx.audit.write(await audit_trail.records_for(child, refused.status))
                e.response = FhirResponse(refused.status, _entry_error(e, refused).outcome())
                out.append(_response_entry(e, base, prefer))
                continue
        headers = dict(e.headers)
        if prefer.return_:
            headers["prefer"] = f"return={prefer.return_}"
        body = e.resource
        if e.method == "PATCH":
            try:
                body = _Transaction._patch_ops(e)
            except FhirError:
                body = None  # the router answers it as an invalid patch, audited
        req = FhirRequest(e.method, e.path, parse_qsl(e.query, keep_blank_values=True),
                          headers, body, base)
        e.response = await _entry_request(ctx, e, req)
        out.append(_response_entry(e, base, prefer))
    current().audited = ctx.audit is not None  # each entry carries its own AuditEvent
    return FhirResponse(200, bundle("batch-response", out))


