"""HTTP edge: the only module that knows FastAPI.

One catch-all route per FHIR base hands a neutral
:class:`~gateway.interactions.router.FhirRequest` to the route table and
renders what comes back. Here, and only here: content negotiation
(``application/fhir+json``; ``_format``), body size and JSON depth limits,
and the mapping of :class:`~gateway.fhir.outcome.FhirError` to HTTP.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from gateway.api.openapi import openapi
from gateway.fhir import json as fjson
from gateway.fhir.outcome import Code, FhirError
from gateway.interactions.base import Context, FhirResponse
from gateway.interactions.router import FhirRequest, route
from gateway.security.audit import AuditUnavailable, record_of
from gateway.security.auth import Authenticator
from gateway.security.principal import CALLER, Caller, Principal
from gateway.security.tokens import AuthError

log = logging.getLogger("carepath.api")

FHIR_JSON = "application/fhir+json; charset=utf-8"
_JSON_TYPES = ("application/fhir+json", "application/json", "text/json", "json")
_XML_TYPES = ("application/fhir+xml", "application/xml", "text/xml", "xml")
_PATCH_TYPES = ("application/json-patch+json",)
_FORM = "application/x-www-form-urlencoded"


def _media(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


def _wants_json(request: Request) -> bool:
    fmt = request.query_params.get("_format")
    if fmt is not None:
        kind = _media(fmt)
        if kind in _JSON_TYPES:
            return True
        raise FhirError(Code.NOT_ACCEPTABLE, f"_format '{fmt[:60]}' is not supported; use json")
    accept = request.headers.get("accept", "")
    if not accept:
        return True
    kinds = [_media(a) for a in accept.split(",")]
    if any(k in _JSON_TYPES or k in ("*/*", "application/*") for k in kinds):
        return True
    if any(k in _XML_TYPES for k in kinds):
        raise FhirError(Code.NOT_ACCEPTABLE, "this server speaks FHIR JSON only")
    return True


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise FhirError(Code.TOO_LARGE, f"{declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise FhirError(Code.TOO_LARGE, f"more than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_body(
    ctx: Context, request: Request, raw: bytes, method: str
) -> tuple[Any, list[tuple[str, str]]]:
    """Parsed JSON body, plus form pairs for ``POST _search``."""
    if not raw:
        return None, []
    ctype = _media(request.headers.get("content-type", "application/fhir+json"))
    if ctype == _FORM:
        return None, parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True)
    if ctype in _XML_TYPES:
        raise FhirError(Code.UNSUPPORTED_MEDIA_TYPE, "this server accepts FHIR JSON only")
    if ctype not in _JSON_TYPES and ctype not in _PATCH_TYPES:
        raise FhirError(Code.UNSUPPORTED_MEDIA_TYPE,
                        f"Content-Type '{ctype[:60]}' is not supported")
    if method == "PATCH" and ctype not in _PATCH_TYPES:
        raise FhirError(Code.UNSUPPORTED_MEDIA_TYPE,
                        "PATCH takes application/json-patch+json")
    body = fjson.loads(raw)
    problem = fjson.check_limits(body, ctx.settings.max_json_depth,
                                 ctx.settings.max_string_length)
    if problem is not None:
        code = Code.TOO_DEEP if problem.startswith("nesting") else Code.STRING_TOO_LONG
        raise FhirError(code, problem)
    return body, []


def _render(resp: FhirResponse, pretty: bool, head: bool) -> Response:
    body: bytes | None
    if resp.body is None or resp.status == 304:
        body = None
    elif isinstance(resp.body, bytes) and not pretty:
        body = resp.body
    else:
        value = fjson.loads(resp.body) if isinstance(resp.body, bytes) else resp.body
        body = fjson.dumps_pretty(value) if pretty else fjson.dumps(value)
    headers = dict(resp.headers)
    if head:
        body = None
    if body is None:
        return Response(status_code=resp.status, headers=headers)
    return Response(body, status_code=resp.status, headers=headers, media_type=FHIR_JSON)


def _base_url(ctx: Context, request: Request) -> str:
    if ctx.settings.public_base_url:
        return ctx.settings.public_base_url.rstrip("/")
    return str(request.base_url).rstrip("/") + ctx.settings.base_path


def _auth_failure(exc: AuthError) -> FhirResponse:
    err = FhirError(Code.UNAUTHENTICATED, exc.description)
    header = f'Bearer error="{exc.error}", error_description="{exc.description[:200]}"'
    return FhirResponse(401, err.outcome(), {"WWW-Authenticate": header.replace("\n", " ")})


async def _smart_endpoint(
    auth: Authenticator, request: Request, path: str, base: str
) -> Response | None:
    """``.well-known/smart-configuration``, the JWKS and the token endpoint."""
    token_url = f"{base}/auth/token"
    if path == ".well-known/smart-configuration" and request.method == "GET":
        return JSONResponse(auth.smart_configuration(base, token_url))
    if path == ".well-known/jwks.json" and request.method == "GET":
        return JSONResponse(auth.jwks())
    if path == "auth/token":
        if request.method != "POST":
            return JSONResponse({"error": "invalid_request", "error_description": "use POST"},
                                status_code=405)
        raw = await _read_body(request, 64 * 1024)
        form = dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))
        try:
            body = await auth.token(form, token_url)
        except AuthError as exc:
            return JSONResponse({"error": exc.error, "error_description": exc.description},
                                status_code=exc.status)
        return JSONResponse(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})
    return None


class _GatewayApp(FastAPI):
    """FastAPI, except that every HTTP request under the FHIR base goes straight to
    :func:`create_api`'s handler, whatever its method (unsupported ones get a 405
    OperationOutcome from the router).

    It is one catch-all route: FastAPI's routing, dependency and middleware
    layers around it cost several times the handler's own dispatch (tens of
    microseconds per request) and add nothing here. Lifespan, websockets
    and anything outside the base still go through FastAPI.
    """

    fhir_endpoint: tuple[str, Callable[[Scope, Receive, Send, str], Awaitable[None]]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.fhir_endpoint is not None:
            base, endpoint = self.fhir_endpoint
            path = scope["path"]
            root = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root):]
            if path == base or path.startswith(base + "/"):
                await endpoint(scope, receive, send, path[len(base) + 1:])
                return
        await super().__call__(scope, receive, send)


def create_api(
    ctx: Context,
    startup: Callable[[], Awaitable[None]],
    shutdown: Callable[[], Awaitable[None]],
    auth: Authenticator,
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
    base_path = ctx.settings.base_path.rstrip("/")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: Code.UNKNOWN_ENDPOINT, 405: Code.METHOD_NOT_ALLOWED}.get(
            exc.status_code, Code.INVALID_HEADER)
        err = FhirError(code, str(exc.detail))
        return _render(FhirResponse(exc.status_code, err.outcome()), False, False)

    async def handle(request: Request, path: str) -> Response:
        base = _base_url(ctx, request)
        address = request.client.host if request.client else None
        caller = Caller(Principal.nobody(address), request.method, path,
                        request.url.query, base)
        CALLER.set(caller)
        try:
            response, description = await _serve(request, path, base, address, caller)
            if ctx.audit is not None and not caller.audited:
                await ctx.audit.write(record_of(caller, response.status_code, description))
        except AuditUnavailable:
            log.error("audit trail unavailable: refusing %s %s", request.method, path)
            err = FhirError(Code.UNAVAILABLE, "the audit trail cannot be written")
            return _render(FhirResponse(err.status, err.outcome()), False, False)
        return response

    async def _serve(
        request: Request, path: str, base: str, address: str | None, caller: Caller
    ) -> tuple[Response, str]:
        pretty = request.query_params.get("_pretty") == "true"
        head = request.method == "HEAD"
        try:
            special = await _smart_endpoint(auth, request, path, base)
            if special is not None:
                return special, ""
        except FhirError as exc:
            return _render(FhirResponse(exc.status, exc.outcome()), pretty, False), exc.code.gw
        try:
            caller.principal = await auth.authenticate(request.headers.get("authorization"),
                                                       address)
        except AuthError as exc:
            return _render(_auth_failure(exc), pretty, head), f"{exc.error}: {exc.description}"
        try:
            _wants_json(request)
            raw = await _read_body(request, ctx.settings.max_request_bytes)
            body, form = _parse_body(ctx, request, raw, request.method)
            query = parse_qsl(request.url.query, keep_blank_values=True) + form
            bad = fjson.first_forbidden(query)
            if bad is not None:
                raise FhirError(Code.INVALID_SEARCH_VALUE,
                                f"a parameter contains the forbidden character U+{ord(bad):04X}")
            headers = {k.lower(): v for k, v in request.headers.items()}
            fhir_request = FhirRequest(request.method, path, query, headers, body, base)
            resp = await route(ctx, fhir_request)
            description = ""
        except FhirError as exc:
            resp = FhirResponse(exc.status, exc.outcome())
            description = exc.code.gw
        except AuditUnavailable:
            raise
        except Exception:  # a bug of ours: still an OperationOutcome, never a bare 500
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            err = FhirError(Code.INTERNAL, "internal error; the gateway logged the details")
            resp = FhirResponse(err.status, err.outcome())
            description = err.code.gw
        return _render(resp, pretty, head), description

    async def fhir(scope: Scope, receive: Receive, send: Send, path: str) -> None:
        response = await handle(Request(scope, receive), path)
        await response(scope, receive, send)

    app.fhir_endpoint = (base_path, fhir)
    spec = openapi(ctx.registry, ctx.settings.base_path)
    app.openapi = lambda: spec  # type: ignore[method-assign]
    return app
