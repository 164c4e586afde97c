"""SMART Backend Services: real signed assertions over HTTP, and every rejection."""

from __future__ import annotations

import asyncio
import random
import string
import time

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from gateway.security.auth import Authenticator
from gateway.security.tokens import AuthError
from gateway.settings import Settings
from gateway.storage.db import open_database
from gateway.storage.migrate import migrate
from gateway.storage.security import Client, add_client, remove_client, set_client_active
from tests.security.conftest import Secured, secured_server
from tests.security.keys import ClientKey, token_form
from tests.security.test_audit import records


def _token(secured: Secured, assertion: str, scope: str = "system/*.cruds") -> httpx.Response:
    return httpx.post(secured.token_url, data=token_form(assertion, scope))


def test_smart_configuration_is_published(secured: Secured) -> None:
    config = httpx.get(f"{secured.url}/.well-known/smart-configuration").json()
    assert config["token_endpoint"] == secured.token_url
    assert "private_key_jwt" in config["token_endpoint_auth_methods_supported"]
    assert {"RS384", "ES384"} <= set(config["token_endpoint_auth_signing_alg_values_supported"])
    assert "client-confidential-asymmetric" in config["capabilities"]
    # "issuer: ... Required if the server's capabilities include sso-openid-connect;
    # otherwise, omitted"
    assert "issuer" not in config and "sso-openid-connect" not in config["capabilities"]


def test_probes_need_no_token_and_are_not_fhir(secured: Secured) -> None:
    root = secured.url.rsplit("/fhir", 1)[0]
    assert httpx.get(f"{secured.url}/Patient").status_code == 401
    assert httpx.get(f"{root}/healthz").status_code == 200
    assert httpx.get(f"{root}/readyz").json()["status"] == "pass"


@pytest.mark.parametrize("client", ["hospital-a", "gp-b"])  # RS384 and ES384
def test_client_credentials_with_a_signed_assertion(secured: Secured, client: str) -> None:
    key = secured.keys[client]
    response = _token(secured, key.assertion(secured.token_url), "system/Patient.rs")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "bearer"
    assert body["scope"] == "system/Patient.rs"
    assert 0 < body["expires_in"] <= 300
    headers = {"Authorization": f"Bearer {body['access_token']}"}
    assert httpx.get(f"{secured.url}/Patient", headers=headers).status_code == 200
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] <= 300


def test_replayed_jti_is_rejected(secured: Secured) -> None:
    assertion = secured.keys["hospital-a"].assertion(secured.token_url)
    assert _token(secured, assertion).status_code == 200
    replay = _token(secured, assertion)
    assert replay.status_code == 401
    assert replay.json()["error"] == "invalid_client"


def test_assertion_rejections(secured: Secured) -> None:
    key = secured.keys["hospital-a"]
    url = secured.token_url
    public_pem = key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    now = int(time.time())
    cases = {
        "exp too far ahead": key.assertion(url, exp=now + 600),
        "wrong aud": key.assertion(url, aud="https://elsewhere.example/token"),
        "expired": key.assertion(url, exp=now - 120),
        "not yet valid": key.assertion(url, nbf=now + 300),
        "unknown kid": key.assertion(url, kid="no-such-key"),
        "iss is not the client": key.assertion(url, iss="gp-b"),
        "signed by another key": ClientKey.rsa("hospital-a").assertion(url, kid=key.kid),
        "alg none": jwt.encode({"iss": "hospital-a", "sub": "hospital-a", "aud": url,
                                "exp": now + 60, "jti": "x-none"}, None, algorithm="none",
                               headers={"kid": key.kid}),
        "HS/RS confusion": _hs_with_public_key(key, url, public_pem),
        "RS256 instead of RS384": key.assertion(url, alg="RS256"),
        "no jti": key.assertion(url, jti=None),
        # kept for the replay check under a database index: bounded
        "a 5,000-character jti": key.assertion(
            url, jti="".join(random.choice(string.ascii_letters) for _ in range(5000))),
        "not a JWT": "definitely-not-a-jwt",
    }
    for name, assertion in cases.items():
        response = _token(secured, assertion)
        assert response.status_code == 401, (name, response.text)
        assert response.json()["error"] == "invalid_client", name


def _hs_with_public_key(key: ClientKey, url: str, public_pem: bytes) -> str:
    import base64
    import hashlib
    import hmac
    import json

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS384", "kid": key.kid, "typ": "JWT"}).encode())
    claims = b64(json.dumps({"iss": key.client_id, "sub": key.client_id, "aud": url,
                             "exp": int(time.time()) + 60, "jti": "hs-confusion"}).encode())
    signature = hmac.new(public_pem, f"{header}.{claims}".encode(), hashlib.sha384).digest()
    return f"{header}.{claims}.{b64(signature)}"


def test_scope_escalation_and_bad_grants_are_refused(secured: Secured) -> None:
    key = secured.keys["reader-c"]  # granted Patient.rs and Observation.rs only
    for scope in ("system/*.cruds", "system/Patient.cruds", "system/Encounter.rs",
                  "system/Patient.write",
                  # granular: not narrowed by the gateway, so never granted as the whole type
                  "system/Observation.rs?category=http://terminology.hl7.org/CodeSystem/"
                  "observation-category|laboratory"):
        response = _token(secured, key.assertion(secured.token_url), scope)
        assert response.status_code == 400, (scope, response.text)
        assert response.json()["error"] == "invalid_scope"
    ok = _token(secured, key.assertion(secured.token_url), "system/Patient.read")
    assert ok.status_code == 200, ok.text
    bad_grant = httpx.post(secured.token_url, data={
        **token_form(key.assertion(secured.token_url)), "grant_type": "password"})
    assert bad_grant.status_code == 400
    unknown = ClientKey.ec("stranger")
    assert _token(secured, unknown.assertion(secured.token_url)).status_code == 401
    # SMART Backend Services: scope is required (the whole grant is not the default)
    for scope in ("", " "):
        response = _token(secured, key.assertion(secured.token_url), scope)
        assert (response.status_code, response.json()["error"]) == (400, "invalid_scope")
    # RFC 7521 4.2: a client_id sent beside the assertion names the same client
    other = httpx.post(secured.token_url, data={
        **token_form(key.assertion(secured.token_url), "system/Patient.rs"),
        "client_id": "hospital-a"})
    assert (other.status_code, other.json()["error"]) == (401, "invalid_client")
    same = httpx.post(secured.token_url, data={
        **token_form(key.assertion(secured.token_url), "system/Patient.rs"),
        "client_id": "reader-c"})
    assert same.status_code == 200, same.text


def test_discovery_needs_no_token(secured: Secured) -> None:
    """The CapabilityStatement and $versions tell a client what the server is before it
    has a token (http.html#capabilities); nothing else does."""
    metadata = httpx.get(f"{secured.url}/metadata")
    assert metadata.status_code == 200, metadata.text
    assert metadata.json()["resourceType"] == "CapabilityStatement"
    versions = httpx.get(f"{secured.url}/$versions")
    assert versions.status_code == 200, versions.text
    assert {p["name"]: p["valueCode"] for p in versions.json()["parameter"]} == {
        "version": "4.0", "default": "4.0"}
    assert httpx.post(f"{secured.url}/$versions").status_code == 401
    assert httpx.get(f"{secured.url}/$audit-log").status_code == 401
    # a presented token is still checked
    bad = httpx.get(f"{secured.url}/metadata", headers={"Authorization": "Bearer x.y.z"})
    assert bad.status_code == 401
    # and the token-less reads are audited, by an anonymous client
    logged = records(secured.settings)
    anonymous = [e for e in logged if any(
        a.get("who", {}).get("identifier", {}).get("value") == "anonymous"
        for a in e["agent"])]
    assert {e["subtype"][0]["code"] for e in anonymous} >= {"capabilities", "operation"}


def test_fhir_requests_need_a_valid_token(secured: Secured) -> None:
    none = httpx.get(f"{secured.url}/Patient")
    assert none.status_code == 401
    assert none.json()["issue"][0]["details"]["coding"][0]["code"] == "GW-1030"
    assert none.headers["WWW-Authenticate"].startswith("Bearer")
    # RFC 6750 3.1: no credentials at all, no error code
    assert "error=" not in none.headers["WWW-Authenticate"]
    token = secured.token("hospital-a")
    tampered = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert httpx.get(f"{secured.url}/Patient",
                     headers={"Authorization": f"Bearer {tampered}"}).status_code == 401
    assert httpx.get(f"{secured.url}/Patient",
                     headers={"Authorization": f"Basic {token}"}).status_code == 401
    foreign = jwt.encode({"iss": secured.url, "aud": secured.url, "sub": "hospital-a",
                          "exp": int(time.time()) + 60, "scope": "system/*.cruds"},
                         ClientKey.ec("x").private, algorithm="ES384", headers={"kid": "k"})
    assert httpx.get(f"{secured.url}/Patient",
                     headers={"Authorization": f"Bearer {foreign}"}).status_code == 401


def test_dev_mode_still_verifies_a_presented_token(client: httpx.Client) -> None:
    assert client.get("/Patient", params={"_count": 1}).status_code == 200  # no token: dev mode
    bad = client.get("/Patient", headers={"Authorization": "Bearer nonsense"})
    assert bad.status_code == 401


def test_refuses_to_start_on_a_public_address_without_clients(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async def run() -> None:
        settings = Settings(database_url=f"sqlite:///{tmp_path / 'x.db'}", host="0.0.0.0")
        db = open_database(settings.database_url)
        await db.open()
        await migrate(db)
        try:
            with pytest.raises(RuntimeError, match="refusing"):
                await Authenticator(db, settings).start("http://0.0.0.0:8080/fhir")
        finally:
            await db.close()

    asyncio.run(run())


def test_verified_tokens_are_remembered_until_they_expire(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A token's signature is checked once; its expiry on every request."""
    async def run() -> None:
        settings = Settings(database_url=f"sqlite:///{tmp_path / 'x.db'}")
        db = open_database(settings.database_url)
        await db.open()
        await migrate(db)
        try:
            for i in range(10):  # (a token of a client not registered here is revoked)
                await add_client(db, Client(f"c{i}", "org-1", '{"keys": []}', None,
                                            "system/*.rs", True))
            auth = Authenticator(db, settings)
            await auth.start("http://127.0.0.1:8080/fhir")
            assert auth.issuer is not None
            checked: list[str] = []
            verify = auth.issuer.verify
            monkeypatch.setattr(auth.issuer, "verify",
                                lambda t: (checked.append(t), verify(t))[1])
            token, lifetime = auth.issuer.issue("c1", "org-1", "system/Patient.rs")
            for _ in range(3):
                p = await auth.authenticate(f"Bearer {token}", "10.0.0.7")
                assert (p.client_id, p.organization, p.address) == ("c1", "org-1", "10.0.0.7")
                assert p.grant.allows("Patient", "r") and not p.grant.allows("Patient", "c")
            assert checked == [token]
            tampered = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
            with pytest.raises(AuthError):
                await auth.authenticate(f"Bearer {tampered}", None)
            # past exp and the clock-skew leeway: refused without a new signature check
            auth.clock = lambda: time.time() + lifetime + 31
            with pytest.raises(AuthError, match="expired"):
                await auth.authenticate(f"Bearer {token}", None)
            assert checked == [token, tampered]
            # the cache stays bounded
            monkeypatch.setattr("gateway.security.auth.VERIFIED_TOKENS_MAX", 4)
            auth.clock = time.time
            for i in range(10):
                other, _ = auth.issuer.issue(f"c{i}", "org-1", "system/Patient.rs")
                await auth.authenticate(f"Bearer {other}", None)
                assert len(auth._verified) <= 4
        finally:
            await db.close()

    asyncio.run(run())


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_disabled_or_removed_client_loses_its_tokens_at_once(
        backend: str, tmp_path, new_schema, monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    """A client whose key leaked is disabled: the token endpoint refuses it and the
    tokens it already holds stop working (RFC 6750 3.1 "revoked"), not only when they
    expire. Disabling every client does not open the gateway (dev mode)."""
    monkeypatch.setattr("gateway.security.auth.CLIENT_RECHECK_SECONDS", 0.0)
    monkeypatch.setattr("gateway.security.auth.DEV_RECHECK_SECONDS", 0.0)

    def change(work) -> None:  # type: ignore[no-untyped-def]
        async def run() -> None:
            db = open_database(running.settings.database_url,
                               schema=running.settings.database_schema)
            await db.open()
            try:
                assert await work(db)
            finally:
                await db.close()
        asyncio.run(run())

    with secured_server(backend, tmp_path, new_schema) as running:
        kept = running.client("gp-b")
        with running.client("hospital-a") as client:
            assert client.get("/Patient", params={"_count": 1}).status_code == 200
            change(lambda db: set_client_active(db, "hospital-a", False))
            revoked = client.get("/Patient", params={"_count": 1})
            assert revoked.status_code == 401, revoked.text
            assert "revoked" in revoked.headers["WWW-Authenticate"]
            key = running.keys["hospital-a"]
            refused = _token(running, key.assertion(running.token_url))
            assert refused.status_code == 401 and refused.json()["error"] == "invalid_client"
            assert kept.get("/Patient", params={"_count": 1}).status_code == 200
            change(lambda db: set_client_active(db, "hospital-a", True))
            assert client.get("/Patient", params={"_count": 1}).status_code == 200
            change(lambda db: remove_client(db, "hospital-a"))
            assert client.get("/Patient", params={"_count": 1}).status_code == 401
        for cid in ("gp-b", "reader-c"):
            change(lambda db, cid=cid: set_client_active(db, cid, False))
        assert kept.get("/Patient", params={"_count": 1}).status_code == 401
        assert httpx.get(f"{running.url}/Patient").status_code == 401  # no dev mode
        kept.close()
