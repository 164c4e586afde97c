"""Tokens: SMART Backend Services client assertions in, access tokens out.

Client authentication follows SMART App Launch 2.x backend services
(``private_key_jwt``, RFC 7523): the assertion is a JWT signed RS384 or
ES384 with a key from the client's registered JWKS, ``iss`` = ``sub`` =
client id, ``aud`` = the token endpoint, ``exp`` at most five minutes ahead,
a ``jti`` never seen before. Access tokens are JWTs the gateway signs (ES384)
with a short lifetime; or, when configured, tokens of an external issuer
verified against its JWKS.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_ALGS = ("RS384", "ES384")
MAX_ASSERTION_LIFETIME = 300  # seconds; SMART: exp no more than five minutes ahead
CLOCK_SKEW = 30
MAX_JTI = 255  # characters
TOKEN_LIFETIME = 300


class AuthError(Exception):
    """Authentication failed; ``error`` is the OAuth error code."""

    def __init__(self, error: str, description: str, status: int = 401) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status


def generate_signing_key() -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return str(uuid.uuid4()), pem


def _key_for(alg: str, kid: str | None, jwks: dict[str, Any]) -> Any:
    if not kid:
        raise AuthError("invalid_client", "the client assertion names no key (kid)")
    keys = [k for k in jwks.get("keys", []) if isinstance(k, dict) and k.get("kid") == kid]
    if not keys:
        raise AuthError("invalid_client", f"kid '{kid[:64]}' is not in the client's JWKS")
    jwk = keys[0]
    if alg.startswith("RS") and jwk.get("kty") != "RSA":
        raise AuthError("invalid_client", f"{alg} needs an RSA key, kid '{kid}' is not one")
    if alg.startswith("ES") and (jwk.get("kty") != "EC" or jwk.get("crv") != "P-384"):
        raise AuthError("invalid_client", f"{alg} needs an EC P-384 key")
    if jwk.get("alg") not in (None, alg):
        raise AuthError("invalid_client", f"kid '{kid}' is registered for {jwk.get('alg')}")
    try:
        key = jwt.PyJWK.from_dict(jwk, algorithm=alg).key
    except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError) as exc:
        raise AuthError("invalid_client", f"kid '{kid}' is not a usable key: {exc}") from None
    if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise AuthError("invalid_client", "the JWKS holds a private key")
    return key


def verify_client_assertion(
    assertion: str, client_id: str, jwks: dict[str, Any], token_url: str,
    now: float | None = None,
) -> dict[str, Any]:
    """Claims of a valid assertion; raises :class:`AuthError` otherwise."""
    now = time.time() if now is None else now
    try:
        header = jwt.get_unverified_header(assertion)
    except jwt.PyJWTError as exc:
        raise AuthError("invalid_client", f"the client assertion is not a JWT: {exc}") from None
    alg = header.get("alg")
    if alg not in ASSERTION_ALGS:
        raise AuthError("invalid_client", f"alg '{alg}' is not accepted (RS384 or ES384)")
    key = _key_for(alg, header.get("kid"), jwks)
    try:
        claims: dict[str, Any] = jwt.decode(
            assertion, key, algorithms=[alg], audience=token_url, leeway=CLOCK_SKEW,
            options={"require": ["iss", "sub", "aud", "exp", "jti"]},
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("invalid_client", "the client assertion has expired") from None
    except jwt.ImmatureSignatureError:
        raise AuthError("invalid_client", "the client assertion is not valid yet") from None
    except jwt.InvalidAudienceError:
        raise AuthError("invalid_client", f"aud must be the token endpoint {token_url}") from None
    except jwt.PyJWTError as exc:
        raise AuthError("invalid_client", f"the client assertion is invalid: {exc}") from None
    if claims["iss"] != client_id or claims["sub"] != client_id:
        raise AuthError("invalid_client", "iss and sub must both be the client_id")
    if float(claims["exp"]) - now > MAX_ASSERTION_LIFETIME + CLOCK_SKEW:
        raise AuthError("invalid_client", "exp is more than five minutes ahead")
    if not isinstance(claims["jti"], str) or not claims["jti"]:
        raise AuthError("invalid_client", "jti must be a non-empty string")
    if len(claims["jti"]) > MAX_JTI:  # it is kept (replay check) under a database index
        raise AuthError("invalid_client", f"jti must be at most {MAX_JTI} characters")
    return claims


def unverified_client_id(assertion: str) -> str | None:
    try:
        claims = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    value = claims.get("iss")
    return value if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class TokenClaims:
    client_id: str
    organization: str | None
    scope: str
    purpose_of_use: str | None
    user: str | None
    expires: int
    #: issued by this gateway to one of its registered clients (not an external issuer's)
    issued_here: bool = False


class TokenIssuer:
    """Signs and checks the gateway's own access tokens."""

    def __init__(self, kid: str, private_pem: str, issuer: str, audience: str,
                 lifetime: int = TOKEN_LIFETIME) -> None:
        self.kid = kid
        key = serialization.load_pem_private_key(private_pem.encode(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self._private = key
        self._public = key.public_key()
        self.issuer = issuer
        self.audience = audience
        self.lifetime = lifetime

    def issue(self, client_id: str, organization: str, scope: str,
              purpose_of_use: str | None = None) -> tuple[str, int]:
        now = int(time.time())
        claims = {
            "iss": self.issuer, "sub": client_id, "aud": self.audience, "iat": now,
            "nbf": now, "exp": now + self.lifetime, "jti": str(uuid.uuid4()),
            "scope": scope, "organization": organization,
        }
        if purpose_of_use:
            claims["purpose_of_use"] = purpose_of_use
        token = jwt.encode(claims, self._private, algorithm="ES384", headers={"kid": self.kid})
        return token, self.lifetime

    def verify(self, token: str) -> TokenClaims:
        try:
            header = jwt.get_unverified_header(token)
            if header.get("alg") != "ES384" or header.get("kid") != self.kid:
                raise AuthError("invalid_token", "token was not issued by this gateway")
            claims = jwt.decode(token, self._public, algorithms=["ES384"],
                                audience=self.audience, issuer=self.issuer,
                                leeway=CLOCK_SKEW,
                                options={"require": ["exp", "iss", "aud", "sub"]})
        except jwt.ExpiredSignatureError:
            raise AuthError("invalid_token", "the access token has expired") from None
        except jwt.PyJWTError as exc:
            raise AuthError("invalid_token", f"the access token is invalid: {exc}") from None
        return TokenClaims(claims["sub"], claims.get("organization"), claims.get("scope", ""),
                           claims.get("purpose_of_use"), None, int(claims["exp"]),
                           issued_here=True)

    def public_jwks(self) -> dict[str, Any]:
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self._public))
        return {"keys": [{**jwk, "kid": self.kid, "alg": "ES384", "use": "sig"}]}


class ExternalIssuer:
    """Tokens from another authorisation server, checked against its JWKS."""

    def __init__(self, issuer: str, audience: str, jwks: dict[str, Any],
                 org_claim: str = "organization") -> None:
        self.issuer = issuer
        self.audience = audience
        self.jwks = jwks
        self.org_claim = org_claim

    def verify(self, token: str) -> TokenClaims:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthError("invalid_token", f"not a JWT: {exc}") from None
        alg = header.get("alg")
        if alg not in ("RS256", "RS384", "ES256", "ES384", "PS256", "PS384"):
            raise AuthError("invalid_token", f"alg '{alg}' is not accepted")
        kid = header.get("kid")
        keys = [k for k in self.jwks.get("keys", []) if k.get("kid") == kid]
        if not keys:
            raise AuthError("invalid_token", "unknown signing key")
        try:
            key = jwt.PyJWK.from_dict(keys[0], algorithm=alg).key
            claims = jwt.decode(token, key, algorithms=[alg], audience=self.audience,
                                issuer=self.issuer, leeway=CLOCK_SKEW,
                                options={"require": ["exp", "iss", "aud"]})
        except jwt.ExpiredSignatureError:
            raise AuthError("invalid_token", "the access token has expired") from None
        except (jwt.PyJWTError, ValueError) as exc:
            raise AuthError("invalid_token", f"the access token is invalid: {exc}") from None
        client = claims.get("client_id") or claims.get("azp") or claims.get("sub")
        scope = claims.get("scope") or " ".join(claims.get("scp", []) or [])
        if not isinstance(client, str):
            raise AuthError("invalid_token", "the token names no client")
        org = claims.get(self.org_claim)
        return TokenClaims(client, org if isinstance(org, str) else None, str(scope),
                           claims.get("purpose_of_use"), claims.get("sub"), int(claims["exp"]))
