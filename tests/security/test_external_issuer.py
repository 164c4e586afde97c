"""Tokens of an external authorisation server, checked against its JWKS (fetched at start)."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import pytest

from gateway.api.app import www_authenticate
from gateway.security.auth import Authenticator
from gateway.security.tokens import AuthError
from gateway.settings import Settings
from gateway.storage.db import open_database
from gateway.storage.migrate import migrate
from tests.security.keys import ClientKey

ISSUER = "https://idp.example.test/realms/care"
#: RFC 6750 3: a challenge's error and error_description are quoted strings of
#: %x20-21 / %x23-5B / %x5D-7E
CHALLENGE = re.compile(r'Bearer error="[\x20\x21\x23-\x5b\x5d-\x7e]*", '
                       r'error_description="[\x20\x21\x23-\x5b\x5d-\x7e]*"')
AUDIENCE = "https://gateway.example.test/fhir"


def _serve_jwks(jwks: dict[str, object]) -> ThreadingHTTPServer:
    body = json.dumps(jwks).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_external_tokens_are_accepted_and_checked(tmp_path: Path) -> None:
    key = ClientKey.rsa("idp")
    server = _serve_jwks(key.jwks())
    url = f"http://127.0.0.1:{server.server_address[1]}/certs"
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'ext.db'}", auth_issuer=ISSUER,
                        auth_jwks_url=url, auth_audience=AUDIENCE)

    def token(**overrides: object) -> str:
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-7", "azp": "ehr-x",
                  "exp": now + 120, "scope": "system/Patient.rs", "organization": "org-x",
                  **overrides}
        return jwt.encode({k: v for k, v in claims.items() if v is not None}, key.private,
                          algorithm="RS384", headers={"kid": key.kid})

    async def run() -> None:
        db = open_database(settings.database_url)
        await db.open()
        await migrate(db)
        try:
            auth = Authenticator(db, settings)
            await auth.start(AUDIENCE)
            principal = await auth.authenticate(f"Bearer {token()}", "127.0.0.1")
            assert principal.client_id == "ehr-x"
            assert principal.organization == "org-x"
            assert principal.user == "user-7"
            assert principal.grant.allows("Patient", "r")
            assert not principal.grant.allows("Observation", "r")
            # no dev mode once an issuer is configured
            with pytest.raises(AuthError):
                await auth.authenticate(None, "127.0.0.1")
            for bad in (token(iss="https://evil.example"), token(aud="https://other"),
                        token(exp=int(time.time()) - 300),
                        jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 60},
                                   ClientKey.rsa("x").private, algorithm="RS384",
                                   headers={"kid": key.kid})):
                with pytest.raises(AuthError):
                    await auth.authenticate(f"Bearer {bad}", "127.0.0.1")
            # what a token's header says is echoed in the challenge only as it may be:
            # a control character or quote there would break the response
            for alg in ("\u0001", 'a"b', "a\r\nSet-Cookie: x=1", "é\\"):
                head = base64.urlsafe_b64encode(json.dumps({"alg": alg}).encode())
                forged = f"{head.rstrip(b'=').decode()}.e30.c2ln"
                with pytest.raises(AuthError) as refused:
                    await auth.authenticate(f"Bearer {forged}", "127.0.0.1")
                challenge = www_authenticate(refused.value.error, refused.value.description)
                assert CHALLENGE.fullmatch(challenge), challenge
        finally:
            await db.close()

    try:
        asyncio.run(run())
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("given", [{"auth_issuer": ISSUER}, {"auth_jwks_url": "http://x/certs"},
                                   {"auth_audience": AUDIENCE}])
def test_half_an_external_issuer_is_refused(tmp_path: Path, given: dict[str, str]) -> None:
    """One of the issuer's settings without the other would leave dev mode on: the
    gateway would serve without tokens while its operator believes it checks them."""
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'half.db'}", **given)

    async def run() -> None:
        db = open_database(settings.database_url)
        await db.open()
        await migrate(db)
        try:
            with pytest.raises(RuntimeError, match="an external issuer needs"):
                await Authenticator(db, settings).start(AUDIENCE)
        finally:
            await db.close()

    asyncio.run(run())
