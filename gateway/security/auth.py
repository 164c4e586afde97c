"""Authentication: the SMART Backend Services token endpoint and bearer tokens.

https://hl7.org/fhir/smart-app-launch/backend-services.html

Dev mode: when the gateway is bound to loopback, no client is registered
and no external issuer is configured, requests without a token are served
as an unrestricted developer (with a loud warning). A token that is
presented is always verified. Bound to any other address, the gateway
refuses to start without a way to authenticate.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from typing import Any

import httpx

from gateway.security.principal import DEFAULT_PURPOSE, Principal
from gateway.security.scopes import Grant, ScopeError
from gateway.security.tokens import (
    ASSERTION_TYPE,
    CLOCK_SKEW,
    AuthError,
    ExternalIssuer,
    TokenClaims,
    TokenIssuer,
    generate_signing_key,
    unverified_client_id,
    verify_client_assertion,
)
from gateway.settings import Settings
from gateway.storage import security as tables
from gateway.storage.db import Database

log = logging.getLogger("carepath.security")

DEV_RECHECK_SECONDS = 5.0
#: how long a client's being enabled is taken as known: a disabled or removed client's
#: tokens stop working within this time, not only when they expire
CLIENT_RECHECK_SECONDS = 5.0
#: verified access tokens kept per process (about 1 KB each)
VERIFIED_TOKENS_MAX = 10_000


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Authenticator:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        self.issuer: TokenIssuer | None = None
        self.external: ExternalIssuer | None = None
        self._dev_checked = 0.0
        self._dev = False
        self._warned = 0.0
        #: token -> what it grants and until when (epoch seconds, leeway included).
        #: Checking a signature costs about a millisecond of CPU (ES384), several
        #: times a whole read, and a client sends the same token until it expires.
        self._verified: dict[str, tuple[TokenClaims, Grant, float]] = {}
        #: client id -> whether it is registered and enabled, and when that was read
        self._enabled: dict[str, tuple[bool, float]] = {}
        self.clock = time.time

    async def start(self, base_url: str) -> None:
        kid, pem = await tables.signing_key(self.db, generate_signing_key)
        self.issuer = TokenIssuer(kid, pem, issuer=base_url, audience=base_url,
                                  lifetime=self.settings.access_token_lifetime)
        s = self.settings
        named = {"CAREPATH_AUTH_ISSUER": s.auth_issuer, "CAREPATH_AUTH_JWKS_URL": s.auth_jwks_url,
                 "CAREPATH_AUTH_AUDIENCE": s.auth_audience}
        if any(named.values()) and not (s.auth_issuer and s.auth_jwks_url):
            # half an external issuer is none: dev mode would stay on, without a token
            missing = [k for k, v in list(named.items())[:2] if not v]
            raise RuntimeError(f"an external issuer needs {' and '.join(missing)} too "
                               f"(set: {', '.join(k for k, v in named.items() if v)})")
        if s.auth_issuer and s.auth_jwks_url:
            async with httpx.AsyncClient(timeout=10, follow_redirects=False) as client:
                response = await client.get(s.auth_jwks_url)
                response.raise_for_status()
                jwks = response.json()
            self.external = ExternalIssuer(s.auth_issuer, s.auth_audience or base_url, jwks,
                                           s.auth_org_claim)
        await self._refresh_dev_mode(force=True)
        can_authenticate = self.external is not None or await tables.count_clients(self.db) > 0
        if not is_loopback(s.host) and not can_authenticate:
            raise RuntimeError(
                f"refusing to serve on {s.host} without authentication: register a client "
                "(carepath clients add …) or configure CAREPATH_AUTH_ISSUER/_JWKS_URL")

    async def _refresh_dev_mode(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._dev_checked < DEV_RECHECK_SECONDS:
            return
        self._dev_checked = now
        self._dev = (is_loopback(self.settings.host) and self.external is None
                     and await tables.count_clients(self.db) == 0)

    async def dev_mode(self) -> bool:
        await self._refresh_dev_mode()
        return self._dev

    async def authenticate(self, authorization: str | None, address: str | None,
                           headers: dict[str, str] | None = None) -> Principal:
        """The principal of a FHIR request; :class:`AuthError` (401) when not authenticated."""
        if not authorization:
            if await self.dev_mode():
                now = time.monotonic()
                if now - self._warned > 60:
                    self._warned = now
                    log.warning("DEV MODE: serving an unauthenticated request from %s with "
                                "full access; register a client to require tokens", address)
                return Principal.developer(address)
            # RFC 6750 3.1: a request without credentials gets no error code
            raise AuthError("", "a bearer token is required")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("invalid_request", "use 'Authorization: Bearer <token>'")
        claims, grant = self._verified_token(token.strip())
        if claims.issued_here and not await self._client_enabled(claims.client_id):
            # RFC 6750 3.1: "revoked"
            raise AuthError("invalid_token", "the access token was revoked: its client is"
                                             " disabled or no longer registered")
        return Principal(claims.client_id, claims.organization, grant,
                         purpose_of_use=claims.purpose_of_use or DEFAULT_PURPOSE,
                         user=claims.user, address=address)

    def _verified_token(self, token: str) -> tuple[TokenClaims, Grant]:
        """The claims and grant of a valid token, from the cache while it is valid."""
        now = self.clock()
        known = self._verified.get(token)
        if known is not None:
            if now <= known[2]:
                return known[0], known[1]
            del self._verified[token]
            raise AuthError("invalid_token", "the access token has expired")
        claims = self._verify(token)
        try:
            grant = Grant.parse(claims.scope)
        except ScopeError as exc:
            raise AuthError("invalid_token", str(exc)) from None
        if len(self._verified) >= VERIFIED_TOKENS_MAX:
            self._forget_tokens(now)
        self._verified[token] = (claims, grant, claims.expires + CLOCK_SKEW)
        return claims, grant

    async def _client_enabled(self, client_id: str) -> bool:
        now = time.monotonic()
        known = self._enabled.get(client_id)
        if known is not None and now - known[1] < CLIENT_RECHECK_SECONDS:
            return known[0]
        client = await tables.get_client(self.db, client_id)
        enabled = client is not None and client.active
        self._enabled[client_id] = (enabled, now)
        return enabled

    def _forget_tokens(self, now: float) -> None:
        """Room in the cache: expired tokens go, then the oldest half if still full."""
        cache = self._verified
        for token in [t for t, (_, _, until) in cache.items() if until < now]:
            del cache[token]
        if len(cache) >= VERIFIED_TOKENS_MAX:
            for token in list(cache)[:VERIFIED_TOKENS_MAX // 2]:
                del cache[token]

    def _verify(self, token: str) -> TokenClaims:
        assert self.issuer is not None
        try:
            return self.issuer.verify(token)
        except AuthError:
            if self.external is None:
                raise
        return self.external.verify(token)

    async def token(self, form: dict[str, str], token_url: str) -> dict[str, Any]:
        """The token endpoint (client_credentials + private_key_jwt)."""
        if form.get("grant_type") != "client_credentials":
            raise AuthError("unsupported_grant_type", "grant_type must be client_credentials",
                            400)
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            raise AuthError("invalid_request", f"client_assertion_type must be {ASSERTION_TYPE}",
                            400)
        assertion = form.get("client_assertion", "")
        client_id = unverified_client_id(assertion)
        client = await tables.get_client(self.db, client_id) if client_id else None
        if client is None or not client.active:
            raise AuthError("invalid_client", "unknown client")
        if "client_id" in form and form["client_id"] != client.client_id:
            # RFC 7521 4.2: "MUST identify the same client as ... the client assertion"
            raise AuthError("invalid_client", "client_id names another client than the"
                                              " client assertion")
        claims = verify_client_assertion(assertion, client.client_id, json.loads(client.jwks),
                                         token_url)
        if not await tables.remember_jti(self.db, claims["jti"], client.client_id,
                                         int(float(claims["exp"]) * 1_000_000) + 600_000_000):
            raise AuthError("invalid_client", "this client assertion was used before (jti)")
        if not form.get("scope", "").strip():
            # SMART Backend Services: scope is required; a grant is not handed out whole
            raise AuthError("invalid_scope", "scope is required (e.g. system/Patient.rs)", 400)
        try:
            requested = Grant.parse(form["scope"])
            granted = Grant.parse(client.scope)
        except ScopeError as exc:
            raise AuthError("invalid_scope", str(exc), 400) from None
        if not requested.scopes:
            raise AuthError("invalid_scope", "request at least one system/ scope", 400)
        if not requested.within(granted):
            raise AuthError("invalid_scope",
                            f"requested scopes exceed the client's grant ({client.scope})", 400)
        assert self.issuer is not None
        access, lifetime = self.issuer.issue(client.client_id, client.organization,
                                             requested.text(), form.get("purpose_of_use"))
        return {"access_token": access, "token_type": "bearer", "expires_in": lifetime,
                "scope": requested.text()}

    def smart_configuration(self, base_url: str, token_url: str) -> dict[str, Any]:
        # (no "issuer": SMART asks for it only with sso-openid-connect)
        return {
            "token_endpoint": token_url,
            "jwks_uri": f"{base_url}/.well-known/jwks.json",
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
            "scopes_supported": ["system/*.cruds", "system/*.rs", "system/*.read",
                                 "system/*.write", "system/*.*"],
            "capabilities": ["client-confidential-asymmetric", "permission-v1",
                             "permission-v2"],
        }

    def jwks(self) -> dict[str, Any]:
        assert self.issuer is not None
        return self.issuer.public_jwks()
