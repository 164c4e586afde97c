"""HTTP edge: the only module that knows the web framework.

Every request under the FHIR base is handled here as plain ASGI: it becomes a
neutral :class:`~gateway.interactions.router.FhirRequest` for the route table,
and what comes back is sent as it is (stored JSON bytes go out untouched).
Here, and only here: content negotiation (``application/fhir+json``;
``_format``; gzip both ways), body size and JSON depth limits, and the mapping of
:class:`~gateway.fhir.outcome.FhirError` to HTTP. FastAPI serves the rest
(lifespan, websockets, ``/openapi.json``).
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import logging
import re
import secrets
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from gateway.api import metrics
from gateway.api.forwarded import HOST, Proxies
from gateway.api.health import LIVE_PATH, READY_PATH, Health
from gateway.api.health import MEDIA_TYPE as HEALTH_MEDIA_TYPE
from gateway.api.openapi import openapi
from gateway.fhir import json as fjson
from gateway.fhir import xml as fhir_xml
from gateway.fhir import xmlpatch
from gateway.fhir.outcome import Code, FhirError
from gateway.fhir.validation.model import Model
from gateway.interactions import offload
from gateway.interactions.base import Context, FhirResponse
from gateway.interactions.router import FhirRequest, route
from gateway.security.audit import AuditUnavailable, interaction_of, records_for
from gateway.security.auth import Authenticator
from gateway.security.principal import CALLER, Caller, Principal
from gateway.security.tokens import AuthError
from gateway.storage.db import RetryableError

log = logging.getLogger("carepath.api")

FHIR_JSON = "application/fhir+json; charset=utf-8"
_FHIR_JSON = FHIR_JSON.encode()
_FHIR_XML = b"application/fhir+xml; charset=utf-8"
_PLAIN_JSON = b"application/json"
# application/json+fhir and application/xml+fhir: the DSTU2 names, still sent by clients
_JSON_TYPES = ("application/fhir+json", "application/json", "text/json", "json",
               "application/json+fhir")
_XML_TYPES = ("application/fhir+xml", "application/xml", "text/xml", "xml",
              "application/xml+fhir")
_FORMAT_TYPES = frozenset((*_JSON_TYPES, *_XML_TYPES))
#: a Binary written in these is the resource; in anything else (a CDA document in
#: text/xml, a PDF …) it is the content; in plain JSON, the resource when the body is
#: one (FHIR clients write resources as application/json), else the content
_RESOURCE_FORM = frozenset((*_JSON_TYPES, "application/fhir+xml", "application/xml+fhir"))
_PLAIN_JSON_TYPES = frozenset({"application/json", "text/json"})
#: the longest Content-Type a Binary written as its content keeps (RFC 6838 4.2: 127
#: characters each for type and subtype, and room for parameters)
_MAX_CONTENT_TYPE = 1024
_FHIR_ASKED = _RESOURCE_FORM - {"text/json"}
_PATCH_TYPES = ("application/json-patch+json",)
_FORM = "application/x-www-form-urlencoded"
_NO_BODY_STATUS = (204, 304)


class _Disconnected(Exception):
    """The client went away before its request body arrived."""


#: the status recorded (metrics, log) for a request whose client left before its
#: answer (nginx's "client closed request")
CLIENT_GONE = 499


class _Departure:
    """Stops the work of a request whose client has gone: a search, a history or an
    operation that a client gave up on (its timeout passed, it was closed) would
    otherwise hold the database until it ends or its statement timeout passes, and
    a client that retries would start it again beside it. The serving task is
    cancelled when the server (uvicorn) says the connection is gone, and with it the
    statement running for it: PostgreSQL's by asyncpg, SQLite's at the progress
    handler's next look (``_Deadline.abandon`` in ``gateway/storage/db.py``).

    The watch reads the request's messages, which a body's reading would share: it
    starts at once for a request without content, and for one whose content only
    asks to read (``POST _search``, a batch of reads) once that content was read.
    Never for a write: one stopped between its commit and its audit record would
    leave a change unaudited."""

    __slots__ = ("_receive", "_task", "_watch", "gone")

    def __init__(self, receive: Receive) -> None:
        self.gone = False
        self._receive = receive
        self._task = asyncio.current_task()
        self._watch: asyncio.Future[None] | None = None

    def start(self) -> None:
        if self._watch is None and self._task is not None:
            self._watch = asyncio.ensure_future(self._wait(self._receive, self._task))

    async def _wait(self, receive: Receive, task: asyncio.Task[Any]) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass  # the request's own (empty, or read) content
        self.gone = True
        task.cancel()

    def stop(self) -> None:
        """Before the answer is sent: once it is, the server says the connection is
        done the same way."""
        if self._watch is not None:
            self._watch.cancel()


def _may_take_long(request: HttpRequest) -> bool:
    """Whether a request is one a client could give up on: one without content that
    is not a read by id (``Type/id``, ``Type/id/_history/vid``) or ``metadata``."""
    if request.method not in ("GET", "HEAD") or "content-length" in request.headers \
            or "transfer-encoding" in request.headers:
        return False
    parts = request.path.split("/")
    if len(parts) == 2 and not parts[1].startswith(("_", "$")):
        return False
    return not (len(parts) == 4 and parts[2] == "_history") and request.path != "metadata"


async def _within(seconds: float, work: Awaitable[FhirResponse]) -> FhirResponse:
    """``work``, stopped after ``seconds`` in all (0: no limit): the statement timeout
    bounds each statement, and a search runs several (its page, what it reads ahead,
    a count; a batch runs a search per entry), so without this one request could hold
    the database for minutes while each statement stays under it."""
    if not seconds:
        return await work
    try:
        async with asyncio.timeout(seconds):
            return await work
    except TimeoutError:
        raise FhirError(Code.DATABASE_TIMEOUT,
                        f"the request took more than {seconds:g} s in all"
                        " (CAREPATH_QUERY_TIMEOUT_S); narrow it, or try later") from None


def _posted_reads(request: HttpRequest, body: Any) -> bool:
    """A ``POST`` that changes nothing: a search by ``POST _search``, or a batch or
    transaction Bundle of reads only."""
    if request.method != "POST":
        return False
    if request.path == "_search" or request.path.endswith("/_search"):
        return True
    if request.path or not isinstance(body, dict) or body.get("resourceType") != "Bundle" \
            or body.get("type") not in ("batch", "transaction"):
        return False
    entries = body.get("entry")
    return isinstance(entries, list) and bool(entries) and all(
        isinstance(e, dict) and isinstance(e.get("request"), dict)
        and e["request"].get("method") in ("GET", "HEAD") for e in entries)


def _encoded_slash(scope: Scope) -> str | None:
    """Why the path cannot be taken, None when it can: an encoded ``/`` (``%2F``) is
    decoded by the server before the gateway sees the path, and would then separate
    what the client sent as one segment (``Patient/1%2F_history`` read as the
    history); no id or name holds one (HAPI FHIR takes it as part of the id, which no
    id can be)."""
    raw = scope.get("raw_path") or b""
    if b"%2" in raw and (b"%2F" in raw or b"%2f" in raw):
        return "the path holds an encoded '/' (%2F), which no id or name may hold"
    return None


def host_problem(scope: Scope) -> str | None:
    """Why the request's ``Host`` cannot be used, None when it can. RFC 9112 3.2: an
    HTTP/1.1 request without one, with two, or with an invalid one, is answered 400
    (it would otherwise go into ``Location`` and every link of a Bundle)."""
    hosts = [v for k, v in scope["headers"] if k.lower() == b"host"]
    if len(hosts) > 1:
        return "the request has more than one Host header"
    if not hosts:
        return None if scope.get("http_version") == "1.0" else "the request has no Host header"
    if not HOST.fullmatch(hosts[0].decode("latin-1")):
        return f"Host '{hosts[0][:80].decode('latin-1')}' is not a host name and port"
    return None


@dataclass(slots=True)
class HttpRequest:
    """What the edge needs of an ASGI request (header names are lower-case)."""

    method: str
    path: str  # below the FHIR base, without leading slash
    query_string: str
    headers: dict[str, str]
    address: str | None
    receive: Receive

    @classmethod
    def of(cls, scope: Scope, receive: Receive, path: str) -> HttpRequest:
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope["headers"]:
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            # a field sent twice is one list (RFC 9110 5.3): Prefer, Accept, If-None-Match
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        client = scope.get("client")
        return cls(scope["method"], path, scope.get("query_string", b"").decode("latin-1"),
                   headers, client[0] if client else None, receive)

    async def body(self, limit: int) -> bytes:
        """The request content, at most ``limit`` bytes as sent and after ``gzip``
        decoding (a gzip body may be larger than what it decodes to: a series of
        empty members decodes to nothing)."""
        declared = self.headers.get("content-length")
        if declared is None and "transfer-encoding" not in self.headers:
            return b""  # RFC 9112 6.3: a request without either has no content
        if declared and declared.isascii() and declared.isdigit() and int(declared) > limit:
            raise FhirError(Code.TOO_LARGE, f"{declared} bytes; the limit is {limit}")
        decoder = _decoder(self.headers.get("content-encoding"))
        chunks: list[bytes] = []
        size = sent = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            if decoder is not None:
                sent += len(chunk)
                if sent > limit:
                    raise FhirError(Code.TOO_LARGE, f"more than {limit} bytes as sent")
                chunk = decoder.feed(chunk, limit - size)
            size += len(chunk)
            if size > limit:
                raise FhirError(Code.TOO_LARGE, f"more than {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                if decoder is not None and not decoder.eof:
                    raise FhirError(Code.BAD_CONTENT_ENCODING, "the gzip stream is truncated")
                return b"".join(chunks)


def _decoder(encoding: str | None) -> _Gunzip | None:
    """A gzip decoder for ``Content-Encoding: gzip``; None for no encoding."""
    codings = [c.strip().lower() for c in (encoding or "").split(",") if c.strip()]
    if not codings or codings == ["identity"]:
        return None
    if codings in (["gzip"], ["x-gzip"]):
        return _Gunzip()
    raise FhirError(Code.UNSUPPORTED_MEDIA_TYPE,
                    f"Content-Encoding '{(encoding or '')[:40]}' is not supported; use gzip")


#: how much of a gzip body is handed to zlib at a time (see :meth:`_Gunzip.feed`)
_GZIP_SLICE = 16 * 1024


class _Gunzip:
    """Decodes a ``gzip`` body, a series of members (RFC 1952 2.2, as ``gzip -c a b``
    writes it), never more than it is given room for (a bomb stops there)."""

    def __init__(self) -> None:
        self._member = zlib.decompressobj(wbits=31)

    @property
    def eof(self) -> bool:
        return bool(self._member.eof)

    def feed(self, chunk: bytes, room: int) -> bytes:
        """``chunk`` decoded: at most ``room`` + 1 bytes.

        The chunk is decoded a slice at a time: where a member ends, zlib copies what
        follows it (``unused_data``), and a chunk of many small members would be
        copied once per member."""
        out: list[bytes] = []
        view = memoryview(chunk)
        for start in range(0, len(view), _GZIP_SLICE):
            room = self._feed(view[start:start + _GZIP_SLICE], room, out)
            if room < 0:
                break
        return b"".join(out)

    def _feed(self, data: memoryview | bytes, room: int, out: list[bytes]) -> int:
        while True:
            try:
                piece: bytes = self._member.decompress(data, max(room, 0) + 1)
            except zlib.error as exc:
                raise FhirError(Code.BAD_CONTENT_ENCODING,
                                f"the body is not valid gzip: {exc}") from None
            out.append(piece)
            room -= len(piece)
            if room < 0 or not (self._member.eof and self._member.unused_data):
                return room
            data = self._member.unused_data  # the next member begins
            self._member = zlib.decompressobj(wbits=31)


@dataclass(slots=True)
class Reply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    async def send(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status,
                    "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


#: paths below the base anyone may GET, token or not
_DISCOVERY = frozenset({"metadata", "$versions"})


def _media(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


def _quality(media_range: str) -> float:
    for param in media_range.split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "q":
            try:
                return float(value)
            except ValueError:
                return 0.0
    return 1.0


def _keep_presentation(resp: FhirResponse, query: list[tuple[str, str]]) -> None:
    """A Bundle's links (``self``, ``next``...) keep the ``_format`` and ``_pretty``
    the request gave, as HAPI FHIR's do: a client that cannot set ``Accept`` (a
    browser, a tester following links) gets page 2 in the format of page 1."""
    kept = [(k, v) for k, v in query if k in ("_format", "_pretty")]
    body = resp.body
    if not kept or not isinstance(body, dict) or not isinstance(body.get("link"), list):
        return
    for link in body["link"]:
        url = link.get("url") if isinstance(link, dict) else None
        if isinstance(url, str) and not any(f"{k}=" in url for k, _ in kept):
            link["url"] = f"{url}{'&' if '?' in url else '?'}{urlencode(kept)}"


def _response_format(query: list[tuple[str, str]], headers: dict[str, str],
                     xml: bool) -> str:
    """``json`` or ``xml``: ``_format`` decides, else ``Accept`` (the higher quality;
    JSON on a tie, and for ``*/*``). ``xml``: FHIR XML can be written here. 406 for
    a format or FHIR version this server does not speak (http.html#mime-type)."""
    fmt = next((v for k, v in query if k == "_format"), None)
    if fmt is not None:
        # an unescaped "+" in the query string arrives as a space
        media = _media(fmt).replace(" ", "+")
        if not _our_version(fmt):
            raise FhirError(Code.NOT_ACCEPTABLE,
                            f"_format '{fmt[:60]}' names a FHIR version other than 4.0")
        if media in _JSON_TYPES:
            return "json"
        if media in _XML_TYPES and xml:
            return "xml"
        raise FhirError(Code.NOT_ACCEPTABLE, f"_format '{fmt[:60]}' is not supported; use json"
                                             + (" or xml" if xml else ""))
    accept = headers.get("accept", "")
    if not any(_media(a) in _FORMAT_TYPES for a in accept.split(",")):
        # no format asked for (nothing, */*, text/html): the one written in
        written = _media(headers.get("content-type", ""))
        return "xml" if xml and written in _XML_TYPES else "json"
    best = {"json": -1.0, "xml": -1.0}
    named_other_version = False
    for item in accept.split(","):
        media, q = _media(item), _quality(item)
        kind = "json" if media in _JSON_TYPES or media in ("*/*", "application/*") else \
            "xml" if media in _XML_TYPES and xml else None
        if kind is None or q <= 0:
            continue
        if not _our_version(item):
            named_other_version = True
            continue
        best[kind] = max(best[kind], q)
    if best["xml"] > best["json"]:
        return "xml"
    if best["json"] >= 0:
        return "json"
    if named_other_version:
        raise FhirError(Code.NOT_ACCEPTABLE, "this server speaks FHIR 4.0 (fhirVersion=4.0)")
    raise FhirError(Code.NOT_ACCEPTABLE, "this server speaks FHIR JSON" +
                    (" and XML" if xml else " only"))


def _our_version(value: str) -> bool:
    """No ``fhirVersion`` parameter in a media type, or R4's (http.html#version-parameter)."""
    for param in value.split(";")[1:]:
        key, _, version = param.partition("=")
        if key.strip().lower() == "fhirversion":
            version = version.strip().strip('"')
            return version == "4.0" or version.startswith("4.0.")
    return True


def _binary_content(path: str, method: str, headers: dict[str, str], raw: bytes,
                    max_string: int) -> dict[str, Any] | None:
    """A Binary written as its content (binary.html#rest): ``POST Binary`` or
    ``PUT Binary/[id]`` with a Content-Type that is not FHIR JSON becomes a Binary of
    that type; ``X-Security-Context`` names the resource that governs access to it.
    None: not such a request."""
    if method not in ("POST", "PUT") or not path.startswith("Binary"):
        return None
    parts = [p for p in path.split("/") if p]
    if parts[0] != "Binary" or not (
            (method == "POST" and len(parts) == 1) or (method == "PUT" and len(parts) == 2)):
        return None
    declared = headers.get("content-type", "").strip()
    media = _media(declared) if declared else ""
    if not declared or (media in _RESOURCE_FORM and (
            media not in _PLAIN_JSON_TYPES or _is_binary_resource(raw))):
        return None  # the Binary resource itself, in FHIR JSON or XML
    data = base64.b64encode(raw).decode("ascii")
    if len(data) > max_string:
        raise FhirError(Code.STRING_TOO_LONG, f"{len(raw)} bytes of content are more than a"
                                              " Binary may hold here")
    if len(declared) > _MAX_CONTENT_TYPE:  # (kept whole, or not at all: never cut)
        raise FhirError(Code.UNSUPPORTED_MEDIA_TYPE,
                        f"a Content-Type of {len(declared)} characters is longer than a"
                        f" Binary's may be here ({_MAX_CONTENT_TYPE})")
    binary: dict[str, Any] = {"resourceType": "Binary", "contentType": declared}
    if len(parts) == 2:
        binary["id"] = parts[1]
    context = headers.get("x-security-context")
    if context:
        binary["securityContext"] = {"reference": context.strip()}
    if raw:
        binary["data"] = data
    return binary


def _is_binary_resource(raw: bytes) -> bool:
    """A plain JSON body that is a Binary resource (not a JSON document to keep); a
    body that is no JSON the gateway takes (malformed, not UTF-8, a number beyond a
    double) is refused as any JSON body is (:class:`FhirError`, 4xx)."""
    body = fjson.loads(raw)
    return isinstance(body, dict) and body.get("resourceType") == "Binary"


def _binary_read(path: str, method: str) -> bool:
    """``GET Binary/[id]`` or ``GET Binary/[id]/_history/[vid]``."""
    if method not in ("GET", "HEAD") or not path.startswith("Binary"):
        return False
    parts = [p for p in path.split("/") if p]
    return parts[0] == "Binary" and (
        len(parts) == 2 or (len(parts) == 4 and parts[2] == "_history"))


def _asks_for_fhir(query: list[tuple[str, str]], headers: dict[str, str]) -> bool:
    """The request names a FHIR format (``_format``, or a FHIR media type or plain
    JSON in ``Accept``): a Binary is then answered as a resource, else as its content
    (``text/xml`` asks for an XML document such as a CDA, not for FHIR). Plain JSON
    asks for the content when that is JSON (:func:`_json_content`)."""
    if any(k == "_format" for k, _ in query):
        return True
    return any(_media(a) in _FHIR_ASKED for a in headers.get("accept", "").split(","))


def _json_content(resp: FhirResponse, headers: dict[str, str]) -> bool:
    """A Binary whose content is JSON, read with plain JSON (and no FHIR type) in
    ``Accept``: binary.html#rest, only the FHIR media types ask for the resource."""
    accepted = {_media(a) for a in headers.get("accept", "").split(",")}
    if not accepted & _PLAIN_JSON_TYPES or accepted & (_FHIR_ASKED - _PLAIN_JSON_TYPES):
        return False
    if resp.status != 200 or resp.body is None:
        return False
    binary = fjson.loads(resp.body, stored=True) if isinstance(resp.body, bytes) else resp.body
    ctype = binary.get("contentType") if isinstance(binary, dict) else None
    return isinstance(ctype, str) and (_media(ctype) in _PLAIN_JSON_TYPES
                                       or _media(ctype).endswith("+json"))


def _native(resp: FhirResponse, head: bool) -> Reply | None:
    """A read Binary as its own content, with its type; None when ``resp`` is not one.

    The content is whatever the writer sent, so a browser must not run it in this
    origin: ``Content-Security-Policy: sandbox`` and ``nosniff``."""
    if resp.status != 200 or resp.body is None:
        return None
    binary = fjson.loads(resp.body, stored=True) if isinstance(resp.body, bytes) else resp.body
    if not isinstance(binary, dict) or binary.get("resourceType") != "Binary":
        return None
    content = base64.b64decode(binary.get("data", ""))
    headers = {**resp.headers, "X-Content-Type-Options": "nosniff",
               "Content-Security-Policy": "sandbox"}
    context = binary.get("securityContext")
    reference = context.get("reference") if isinstance(context, dict) else None
    if isinstance(reference, str) and reference.isprintable() and reference.isascii():
        headers["X-Security-Context"] = reference  # a header value: no line breaks
    ctype = binary.get("contentType")
    if not (isinstance(ctype, str) and ctype.isprintable() and ctype.isascii() and ctype):
        ctype = "application/octet-stream"
    return Reply(200, _raw_headers(headers, ctype.encode("latin-1", "replace"), len(content)),
                 b"" if head else content)


def _xml_model(ctx: Context) -> Model | None:
    """The definitions FHIR XML is read and written with (those of the validator)."""
    model = getattr(ctx.validator, "model", None)
    return model if isinstance(model, Model) else None


def _check_limits(ctx: Context, body: Any, size: int) -> None:
    max_string = ctx.settings.max_string_length
    problem = fjson.check_limits(body, ctx.settings.max_json_depth,
                                 max_string if size > max_string else None)
    if problem is not None:
        code = Code.TOO_DEEP if problem.startswith("nesting") else Code.STRING_TOO_LONG
        raise FhirError(code, problem)


def _parse_body(
    ctx: Context, headers: dict[str, str], raw: bytes, method: str, path: str
) -> tuple[Any, list[tuple[str, str]]]:
    """Parsed JSON body, plus form pairs for ``POST _search``."""
    if not raw:
        return None, []
    ctype = _media(headers.get("content-type", "application/fhir+json"))
    if ctype == _FORM:
        # (what curl -d sends when told nothing else: a resource under the wrong name)
        last = path.rstrip("/").rpartition("/")[2]
        if last != "_search" and not last.startswith("$"):
            raise FhirError(Code.UNSUPPORTED_MEDIA_TYPE,
                            f"{_FORM} is the body of POST [type]/_search; send a resource as"
                            " application/fhir+json or application/fhir+xml")
        return None, parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True)
    if method == "POST" and path.rstrip("/").rpartition("/")[2] == "_search":
        # a body of any other kind would be read as no criteria: everything matches
        raise FhirError(Code.UNSUPPORTED_MEDIA_TYPE,
                        f"POST _search takes its parameters as {_FORM} (http.html#search),"
                        f" not {ctype[:60]}")
    model = _xml_model(ctx)
    if ctype in _XML_TYPES and model is None:
        raise FhirError(Code.UNSUPPORTED_MEDIA_TYPE, "this server accepts FHIR JSON only")
    if not _our_version(headers.get("content-type", "")):
        raise FhirError(Code.UNSUPPORTED_MEDIA_TYPE,
                        "this server accepts FHIR 4.0 only (fhirVersion=4.0)")
    if ctype in _XML_TYPES and model is not None:
        resource = fhir_xml.loads(raw, model)
        _check_limits(ctx, resource, len(raw))
        if method == "PATCH" and resource.get("resourceType") != "Parameters":
            raise FhirError(Code.UNSUPPORTED_MEDIA_TYPE,
                            f"a PATCH in {ctype} is a FHIRPath Patch (a Parameters resource);"
                            f" XML Patch is {xmlpatch.MEDIA_TYPE}")
        return resource, []
    if ctype == xmlpatch.MEDIA_TYPE:
        if method != "PATCH":
            raise FhirError(Code.UNSUPPORTED_MEDIA_TYPE,
                            f"{xmlpatch.MEDIA_TYPE} is the body of a PATCH")
        if model is None:
            raise FhirError(Code.UNSUPPORTED_MEDIA_TYPE, "this server accepts FHIR JSON only")
        return xmlpatch.parse(raw), []
    if ctype not in _JSON_TYPES and ctype not in _PATCH_TYPES:
        raise FhirError(Code.UNSUPPORTED_MEDIA_TYPE,
                        f"Content-Type '{ctype[:60]}' is not supported")
    if method == "PATCH" and ctype not in _PATCH_TYPES and ctype not in _JSON_TYPES:
        raise FhirError(Code.UNSUPPORTED_MEDIA_TYPE,
                        "PATCH takes application/json-patch+json (JSON Patch),"
                        f" {xmlpatch.MEDIA_TYPE} (XML Patch) or application/fhir+json"
                        " (FHIRPath Patch)")
    body = fjson.loads(raw)
    _check_limits(ctx, body, len(raw))
    if method == "PATCH" and ctype in _JSON_TYPES and not (
            isinstance(body, dict) and body.get("resourceType") == "Parameters"):
        raise FhirError(Code.UNSUPPORTED_MEDIA_TYPE,
                        f"a PATCH in {ctype} is a FHIRPath Patch (a Parameters resource);"
                        " JSON Patch is application/json-patch+json")
    return body, []


def _raw_headers(headers: dict[str, str], content_type: bytes | None,
                 length: int | None) -> list[tuple[bytes, bytes]]:
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1", "replace"))
           for k, v in headers.items()]
    if length is not None:
        raw.append((b"content-length", b"%d" % length))
    if content_type is not None:
        raw.append((b"content-type", content_type))
    return raw


def accepts_gzip(accept_encoding: str | None) -> bool:
    """``Accept-Encoding`` allows gzip: named, or ``*``, with a quality above 0."""
    quality: dict[str, float] = {}
    for item in (accept_encoding or "").lower().split(","):
        coding, *params = (part.strip() for part in item.split(";"))
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        quality.setdefault(coding, q)
    q = quality.get("gzip", quality.get("x-gzip", quality.get("*", 0.0)))
    return q > 0


def _render(resp: FhirResponse, pretty: bool, head: bool,
            encoded: tuple[bytes, dict[str, str]] | None = None,
            xml: Model | None = None) -> Reply:
    """The HTTP response; a HEAD request gets the GET's headers without the body.
    ``encoded``: the body and headers as :func:`_gzipped` made them; ``xml``: the
    body is (was) written as FHIR XML with these definitions."""
    if resp.body is None or resp.status in _NO_BODY_STATUS:
        length = None if resp.status in _NO_BODY_STATUS else 0
        return Reply(resp.status, _raw_headers(resp.headers, None, length), b"")
    body, headers = encoded if encoded is not None else (_body(resp, pretty, xml),
                                                         resp.headers)
    return Reply(resp.status, _raw_headers(headers, _FHIR_XML if xml else _FHIR_JSON,
                                           len(body)),
                 b"" if head else body)


def _body(resp: FhirResponse, pretty: bool, xml: Model | None = None) -> bytes:
    if xml is not None:
        return fhir_xml.dumps(_body(resp, False), xml, pretty=pretty)
    if isinstance(resp.body, bytes) and not pretty:
        return resp.body
    value = fjson.loads(resp.body, stored=True) if isinstance(resp.body, bytes) else resp.body
    return fjson.dumps_pretty(value) if pretty else fjson.dumps(value)


#: bodies larger than this are compressed on a worker thread (zlib releases the GIL):
#: about 12 ms per MB here, which would hold up every other request on the loop
_GZIP_INLINE_MAX = 256 * 1024
#: a body larger than this is parsed on a thread (FHIR JSON: about 0.15 s per MB;
#: the loop answers other requests meanwhile, gateway.interactions.offload)
_PARSE_INLINE_MAX = 256 * 1024


async def _gzipped(resp: FhirResponse, pretty: bool, gzip_from: int,
                   xml: Model | None = None) -> tuple[bytes, dict[str, str]] | None:
    """The body and its headers, gzip-compressed when the body is ``gzip_from`` bytes
    or more (0: never); None when the response has no body."""
    if resp.body is None or resp.status in _NO_BODY_STATUS:
        return None
    body = _body(resp, pretty, xml)
    if not gzip_from or len(body) < gzip_from:
        return body, resp.headers
    if len(body) > _GZIP_INLINE_MAX:
        body = await asyncio.to_thread(gzip.compress, body, 5, mtime=0)
    else:
        body = gzip.compress(body, 5, mtime=0)
    return body, {**resp.headers, "Content-Encoding": "gzip", "Vary": "Accept-Encoding"}


def _json_reply(status: int, value: dict[str, Any], headers: dict[str, str] | None = None
                ) -> Reply:
    body = fjson.dumps(value)
    return Reply(status, _raw_headers(headers or {}, _PLAIN_JSON, len(body)), body)


_CORS_METHODS = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
_CORS_HEADERS = (b"Authorization, Content-Type, Content-Encoding, Accept, Accept-Encoding,"
                 b" If-Match, If-None-Match, If-None-Exist, If-Modified-Since, Prefer,"
                 b" X-Security-Context, X-Request-ID, X-Correlation-ID")
_CORS_EXPOSE = (b"Location, Content-Location, ETag, Last-Modified, Content-Encoding,"
                b" X-Security-Context, X-Request-ID, X-Correlation-ID")
#: ``Access-Control-Request-Headers``: a list of header names (RFC 9110 5.1 tokens)
_NAME = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_HEADER_NAMES = re.compile(rf"{_NAME}(?:[ \t]*,[ \t]*{_NAME})*")
#: seconds a client should wait before it repeats a request refused as unavailable
_RETRY_AFTER = b"5"
#: a client's own request id, taken as it is (else the gateway makes one)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,200}")


def request_id(given: str | None) -> str:
    """The request's id: the client's ``X-Request-ID`` when it is a plain token,
    else a new one (as HAPI FHIR does)."""
    if given is not None and _REQUEST_ID.fullmatch(given):
        return given
    return secrets.token_hex(8)


class Cors:
    """Cross-origin access for browser clients (the Fetch standard's CORS protocol),
    for the origins configured in ``CAREPATH_CORS_ORIGINS`` (``*``: any).

    Tokens travel in ``Authorization``, so no header a page may send opens
    anything: a preflight allows the headers it asks for (Medplum's client sends
    ``X-Medplum``). Clients that fetch in credentials mode (Medplum's does) are
    allowed it from an origin named in the setting, never from ``*``: cookies a
    proxy in front may use must not be sent by any site."""

    def __init__(self, origins: str) -> None:
        allowed = {o.strip().rstrip("/") for o in origins.split(",") if o.strip()}
        self.any = "*" in allowed
        self.allowed = frozenset(allowed - {"*"})

    def allows(self, origin: str | None) -> bool:
        return origin is not None and (self.any or origin in self.allowed)

    def preflight(self, request: HttpRequest) -> Reply | None:
        """The answer to a CORS preflight (``OPTIONS`` with ``Origin`` and
        ``Access-Control-Request-Method``); None when the request is not one."""
        origin = request.headers.get("origin")
        if request.method != "OPTIONS" or origin is None or \
                "access-control-request-method" not in request.headers:
            return None
        if not self.allows(origin):
            return Reply(403, [(b"content-length", b"0"), (b"vary", b"Origin")], b"")
        asked = request.headers.get("access-control-request-headers", "").strip()
        allowed = asked.encode("latin-1") if len(asked) <= 4096 and \
            _HEADER_NAMES.fullmatch(asked) else _CORS_HEADERS
        return Reply(204, [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            *self._credentials(origin),
            (b"access-control-allow-methods", _CORS_METHODS),
            (b"access-control-allow-headers", allowed),
            (b"access-control-max-age", b"600"),
            (b"vary", b"Origin"),
        ], b"")

    def _credentials(self, origin: str) -> list[tuple[bytes, bytes]]:
        return [(b"access-control-allow-credentials", b"true")] if origin in self.allowed \
            else []

    def decorate(self, request: HttpRequest, reply: Reply) -> None:
        """Let an allowed origin read ``reply`` (and the headers a FHIR client needs).
        Every answer varies by ``Origin`` (the Fetch standard, "CORS protocol and HTTP
        caches"): a cache must not hand one made for no origin to an allowed one."""
        origin = request.headers.get("origin")
        if self.allows(origin):
            assert origin is not None
            reply.headers += [(b"access-control-allow-origin", origin.encode("latin-1")),
                              *self._credentials(origin),
                              (b"access-control-expose-headers", _CORS_EXPOSE)]
        reply.headers.append((b"vary", b"Origin"))


def _busy(request: HttpRequest, caller: Caller, exc: RetryableError) -> FhirError:
    """A lost race outside a retried write (a result set kept for paging, a client
    assertion's id recorded, SQLite's file held by another process for longer than
    its busy timeout): the request may be repeated as it was."""
    log.warning("database busy on %s /%s (request %s): %s", request.method, request.path,
                caller.request_id, exc)
    return FhirError(Code.DATABASE_BUSY, "the database was busy; try again shortly")


#: what RFC 6750 3 lets an ``error_description`` hold (%x20-21 / %x23-5B / %x5D-7E):
#: the rest, a token's own bytes among them, would break the header or its quoting
_NOT_IN_DESCRIPTION = re.compile(r'[^\x20\x21\x23-\x5b\x5d-\x7e]')


def www_authenticate(error: str, description: str) -> str:
    """The ``WWW-Authenticate`` challenge of a 401 (RFC 6750 3): without an error
    code when the request had no credentials."""
    if not error:
        return 'Bearer realm="carepath-gateway"'
    text = _NOT_IN_DESCRIPTION.sub("?", description[:200])
    return f'Bearer error="{_NOT_IN_DESCRIPTION.sub("?", error)}", error_description="{text}"'


def _auth_failure(exc: AuthError) -> FhirResponse:
    err = FhirError(Code.UNAUTHENTICATED, exc.description)
    return FhirResponse(401, err.outcome(),
                        {"WWW-Authenticate": www_authenticate(exc.error, exc.description)})


async def _smart_endpoint(
    auth: Authenticator, request: HttpRequest, base: str
) -> Reply | None:
    """``.well-known/smart-configuration``, the JWKS and the token endpoint."""
    token_url = f"{base}/auth/token"
    path, method = request.path, request.method
    if path == ".well-known/smart-configuration" and method == "GET":
        return _json_reply(200, auth.smart_configuration(base, token_url))
    if path == ".well-known/jwks.json" and method == "GET":
        return _json_reply(200, auth.jwks())
    if path == "auth/token":
        if method != "POST":
            return _json_reply(405, {"error": "invalid_request", "error_description": "use POST"})
        raw = await request.body(64 * 1024)
        form = dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))
        try:
            body = await auth.token(form, token_url)
        except AuthError as exc:
            return _json_reply(exc.status, {"error": exc.error,
                                            "error_description": exc.description})
        return _json_reply(200, body, {"Cache-Control": "no-store", "Pragma": "no-cache"})
    return None


class _GatewayApp(FastAPI):
    """FastAPI, except that every HTTP request under the FHIR base goes straight to
    :func:`create_api`'s endpoint, whatever its method (unsupported ones get a 405
    OperationOutcome from the router).

    FastAPI's routing, request and response objects, dependency and middleware
    layers cost several times the endpoint's own dispatch (tens of
    microseconds per request) and add nothing here. Lifespan, websockets
    and anything outside the base still go through FastAPI.
    """

    fhir_endpoint: tuple[str, Callable[[Scope, Receive, Send, str], Awaitable[None]]] | None = None
    #: FastAPI's own paths (health, metrics, the OpenAPI document), theirs also when
    #: the FHIR base is the root (``CAREPATH_BASE_PATH=/``)
    outside: frozenset[str] = frozenset()
    #: the reverse proxies believed (``gateway.api.forwarded``)
    proxies: Proxies | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.proxies is not None and scope["type"] != "lifespan":
            self.proxies.apply(scope)
        if scope["type"] == "http" and self.fhir_endpoint is not None:
            base, endpoint = self.fhir_endpoint
            path = scope["path"]
            root = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root):]
            if (path == base or path.startswith(base + "/")) and (
                    base or path not in self.outside):
                await endpoint(scope, receive, send, path[len(base) + 1:])
                return
        await super().__call__(scope, receive, send)


def _add_health(app: FastAPI, health: Health) -> None:
    """``/healthz`` and ``/readyz`` (:mod:`gateway.api.health`)."""

    async def live(_request: Request) -> Response:
        return Response(orjson.dumps(health.live()), media_type=HEALTH_MEDIA_TYPE,
                        headers={"Cache-Control": "no-store"})

    async def ready(_request: Request) -> Response:
        status, report = await health.ready()
        return Response(orjson.dumps(report), status_code=status,
                        media_type=HEALTH_MEDIA_TYPE, headers={"Cache-Control": "no-store"})

    app.add_route(LIVE_PATH, live, methods=["GET", "HEAD"], include_in_schema=False)
    app.add_route(READY_PATH, ready, methods=["GET", "HEAD"], include_in_schema=False)


def create_api(
    ctx: Context,
    startup: Callable[[], Awaitable[None]],
    shutdown: Callable[[], Awaitable[None]],
    auth: Authenticator,
    health: Health | None = None,
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await startup()
        try:
            yield
        finally:
            await shutdown()

    app = _GatewayApp(title="carepath-gateway", version="0.1.0", lifespan=lifespan,
                      docs_url=None, redoc_url=None)
    app.proxies = Proxies(ctx.settings.trusted_proxies)
    base_path = ctx.settings.base_path.rstrip("/")
    public_base = ctx.settings.public_base_url.rstrip("/") if ctx.settings.public_base_url \
        else None

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: Code.UNKNOWN_ENDPOINT, 405: Code.METHOD_NOT_ALLOWED}.get(
            exc.status_code, Code.INVALID_HEADER)
        err = FhirError(code, str(exc.detail))
        reply = _render(FhirResponse(exc.status_code, err.outcome()), False, False)
        return Response(reply.body, status_code=reply.status, media_type=FHIR_JSON)

    def base_url(scope: Scope, headers: dict[str, str]) -> str:
        """The FHIR base as the client addressed it (or as configured)."""
        if public_base is not None:
            return public_base
        host = headers.get("host")
        if not host:
            server = scope.get("server")
            host = f"{server[0]}:{server[1]}" if server else "localhost"
        return f"{scope.get('scheme', 'http')}://{host}{scope.get('root_path', '')}{base_path}"

    async def serve(request: HttpRequest, base: str, caller: Caller,
                    departure: _Departure) -> tuple[Reply, str]:
        """The reply, and what the AuditEvent says of the outcome."""
        try:
            special = await _smart_endpoint(auth, request, base)
            if special is not None:
                return special, ""
        except (FhirError, RetryableError) as exc:
            err = exc if isinstance(exc, FhirError) else _busy(request, caller, exc)
            return _render(FhirResponse(err.status, err.outcome()), False, False), err.code.gw
        query = parse_qsl(request.query_string, keep_blank_values=True)
        pretty = ("_pretty", "true") in query
        head = request.method == "HEAD"
        try:
            if request.path in _DISCOVERY and request.method in ("GET", "HEAD") \
                    and not request.headers.get("authorization"):
                # what the server is and speaks: read before a client has a token
                # (http.html#capabilities; SMART discovery), by nobody in particular
                caller.principal = Principal.nobody(request.address)
            else:
                caller.principal = await auth.authenticate(request.headers.get("authorization"),
                                                           request.address)
        except AuthError as exc:
            return _render(_auth_failure(exc), pretty, head), \
                f"{exc.error or 'no credentials'}: {exc.description}"
        except (FhirError, RetryableError) as exc:  # the database, asked who is calling
            err = exc if isinstance(exc, FhirError) else _busy(request, caller, exc)
            return _render(FhirResponse(err.status, err.outcome()), pretty, head), err.code.gw
        xml: Model | None = None
        try:
            native = _binary_read(request.path, request.method) and not _asks_for_fhir(
                query, request.headers)
            model = _xml_model(ctx)
            if not native and _response_format(query, request.headers,
                                               model is not None) == "xml":
                xml = model
            raw = await request.body(ctx.settings.max_request_bytes)
            binary = _binary_content(request.path, request.method, request.headers, raw,
                                     ctx.settings.max_string_length)
            offload.REQUEST_BYTES.set(len(raw))
            form: list[tuple[str, str]]
            if binary is not None:
                body, form = binary, []
            elif len(raw) > _PARSE_INLINE_MAX:
                body, form = await asyncio.to_thread(_parse_body, ctx, request.headers, raw,
                                                     request.method, request.path)
            else:
                body, form = _parse_body(ctx, request.headers, raw, request.method,
                                         request.path)
            if form:
                query += form
            bad = fjson.first_forbidden(query)
            if bad is not None:
                raise FhirError(Code.INVALID_SEARCH_VALUE,
                                f"a parameter contains the forbidden character U+{ord(bad):04X}")
            fhir_request = FhirRequest(request.method, request.path, query, request.headers,
                                       body, base)
            if _may_take_long(request) or _posted_reads(request, body):
                departure.start()  # (its content, if any, is read: the watch may begin)
                resp = await _within(query_timeout, route(ctx, fhir_request))
            else:
                resp = await route(ctx, fhir_request)
            _keep_presentation(resp, query)
            description = ""
            if not native and _binary_read(request.path, request.method) and not any(
                    k == "_format" for k, _ in query) and _json_content(resp, request.headers):
                native = True
            if native:
                reply = _native(resp, head)
                if reply is not None:
                    return reply, description
        except FhirError as exc:
            resp = FhirResponse(exc.status, exc.outcome(), dict(exc.headers))
            description = exc.code.gw
        except RetryableError as exc:
            err = _busy(request, caller, exc)
            resp = FhirResponse(err.status, err.outcome())
            description = err.code.gw
        except (AuditUnavailable, _Disconnected):
            raise
        except Exception:  # a bug of ours: still an OperationOutcome, never a bare 500
            log.exception("unhandled error on %s /%s (request %s)", request.method,
                          request.path, caller.request_id)
            err = FhirError(Code.INTERNAL, "internal error; the gateway logged the details"
                                           f" under request {caller.request_id}")
            resp = FhirResponse(err.status, err.outcome())
            description = err.code.gw
        gzip_from = ctx.settings.gzip_min_bytes if accepts_gzip(
            request.headers.get("accept-encoding")) else 0
        try:
            encoded = await _gzipped(resp, pretty, gzip_from, xml)
        except FhirError as exc:  # a body XML cannot carry: said in JSON
            resp, xml, description = (FhirResponse(exc.status, exc.outcome()), None,
                                      exc.code.gw)
            encoded = await _gzipped(resp, pretty, gzip_from)
        except Exception:  # a body the XML writer cannot write: a bug of ours, said so
            log.exception("cannot write the answer to %s /%s as XML (request %s)",
                          request.method, request.path, caller.request_id)
            err = FhirError(Code.INTERNAL, "internal error; the gateway logged the details"
                                           f" under request {caller.request_id}")
            resp, xml, description = FhirResponse(err.status, err.outcome()), None, err.code.gw
            encoded = await _gzipped(resp, pretty, gzip_from)
        return _render(resp, pretty, head, encoded, xml), description

    cors = Cors(ctx.settings.cors_origins) if ctx.settings.cors_origins else None
    query_timeout = ctx.settings.query_timeout_s
    measured = ctx.settings.metrics

    async def fhir(scope: Scope, receive: Receive, send: Send, path: str) -> None:
        started = time.perf_counter()
        request = HttpRequest.of(scope, receive, path)
        if cors is not None:
            preflight = cors.preflight(request)  # no data: neither authorised nor audited
            if preflight is not None:
                await preflight.send(send)
                return
        bad_host = host_problem(scope)
        bad_path = _encoded_slash(scope)
        base = base_url(scope, request.headers if bad_host is None else {})
        rid = request_id(request.headers.get("x-request-id"))
        caller = Caller(Principal.nobody(request.address), request.method, path,
                        request.query_string, base, request_id=rid)
        CALLER.set(caller)
        departure = _Departure(receive)
        if _may_take_long(request):
            departure.start()
        try:
            try:
                if bad_host is None and bad_path is None:
                    reply, description = await serve(request, base, caller, departure)
                else:
                    err = FhirError(Code.INVALID_HEADER, bad_host) if bad_host is not None \
                        else FhirError(Code.INVALID_ID, bad_path)
                    reply = _render(FhirResponse(err.status, err.outcome()), False, False)
                    description = err.code.gw
                if ctx.audit is not None and not caller.audited:
                    await ctx.audit.write(await records_for(caller, reply.status, description))
            except _Disconnected:
                return
            except AuditUnavailable:
                log.error("audit trail unavailable: refusing %s /%s (request %s)",
                          request.method, path, rid)
                err = FhirError(Code.UNAVAILABLE, "the audit trail cannot be written")
                reply = _render(FhirResponse(err.status, err.outcome()), False, False)
            finally:
                departure.stop()
            if reply.status == 503:  # transient (RFC 9110 15.6.4): when to try again
                reply.headers.append((b"retry-after", _RETRY_AFTER))
            reply.headers.append((b"x-request-id", rid.encode("ascii")))
            correlation = request.headers.get("x-correlation-id")
            if correlation is not None and _REQUEST_ID.fullmatch(correlation):
                # http.html#custom: "a client assigned request id echoed back"
                reply.headers.append((b"x-correlation-id", correlation.encode("ascii")))
            if cors is not None:
                cors.decorate(request, reply)
            await reply.send(send)
            status = reply.status
        except asyncio.CancelledError:
            if not departure.gone:
                raise  # the server's own (shutting down)
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            log.info("client gone: stopped %s /%s after %.3f s (request %s)", request.method,
                     path, time.perf_counter() - started, rid)
            status = CLIENT_GONE
        if measured:
            metrics.observe(interaction_of(request.method, path, request.query_string),
                            status, time.perf_counter() - started)

    app.fhir_endpoint = (base_path, fhir)
    if health is not None:
        _add_health(app, health)
    if measured and health is not None:  # the database to read the backlog from
        db = health.db

        async def exposition(_request: Request) -> Response:
            return Response(await metrics.exposition(db), media_type=metrics.MEDIA_TYPE,
                            headers={"Cache-Control": "no-store"})

        app.add_route(metrics.PATH, exposition, methods=["GET"], include_in_schema=False)
    spec = openapi(ctx.registry, ctx.settings.base_path)
    app.openapi = lambda: spec  # type: ignore[method-assign]
    app.outside = frozenset(getattr(r, "path", "") for r in app.router.routes) - {""}
    return app
