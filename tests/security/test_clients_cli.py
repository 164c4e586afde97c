"""``carepath clients add``: what it registers, and what it refuses with a reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jwt
import pytest

from tests.security.keys import ClientKey


def _add(tmp_path: Path, jwks: Any) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "client.jwks.json"
    path.write_text(jwks if isinstance(jwks, str) else json.dumps(jwks))
    env = {**os.environ, "CAREPATH_DATABASE_URL": f"sqlite:///{tmp_path / 'clients.db'}"}
    return subprocess.run([sys.executable, "-m", "gateway", "clients", "add", "ehr-x",
                           "--organization", "org-x", "--jwks", str(path)],
                          env=env, capture_output=True, text=True, timeout=60)


def test_public_rsa_and_ec_keys_are_registered(tmp_path: Path) -> None:
    keys = ClientKey.rsa("ehr-x").jwks()["keys"] + ClientKey.ec("ehr-x").jwks()["keys"]
    done = _add(tmp_path, {"keys": keys})
    assert done.returncode == 0, done.stderr
    assert "2 key(s)" in done.stdout + done.stderr


@pytest.mark.parametrize(("jwks", "said"), [
    ({"keys": [{"kty": "oct", "kid": "sym", "k": "c2VjcmV0"}]}, "secret key material"),
    ("private", "secret key material"),
    ({"keys": [{"kid": "no-kty", "n": "AQAB", "e": "AQAB"}]}, "is not RSA or EC"),
    ({"keys": [{"kty": "EC", "kid": "p256", "crv": "P-256", "x": "AA", "y": "AA"}]}, "P-384"),
    ({"keys": [{"kty": "RSA", "kid": "broken", "e": "AQAB"}]}, "not a usable public key"),
    ({"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB"}]}, "needs a kid"),
    ("not json", "cannot read the JWKS"),
    ("[1, 2]", "not a JSON object"),
])
def test_keys_that_cannot_or_must_not_be_stored_are_refused(
        tmp_path: Path, jwks: Any, said: str) -> None:
    """A shared secret or a private key would be stored with the client; a key with no
    type, on another curve or without its modulus could never verify an assertion; a
    file that is no JWKS is said to be one, not a traceback."""
    if jwks == "private":
        key = ClientKey.rsa("ehr-x")
        private = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.private))
        jwks = {"keys": [{**private, "kid": key.kid}]}
    done = _add(tmp_path, jwks)
    assert done.returncode == 2, done.stdout + done.stderr
    assert said in " ".join((done.stdout + done.stderr).split()), done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("command", [["audit", "verify"], ["clients", "list"], ["reindex"]])
def test_maintenance_on_a_mistyped_path_makes_no_database(tmp_path: Path,
                                                          command: list[str]) -> None:
    """Pointed at a SQLite file that does not exist, a maintenance command says so
    (it made a new, empty database and reported "audit chain intact: 0 records")."""
    missing = tmp_path / "typo.db"
    env = {**os.environ, "CAREPATH_DATABASE_URL": f"sqlite:///{missing}"}
    done = subprocess.run([sys.executable, "-m", "gateway", *command], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "there is no database" in done.stderr, done.stderr
    assert not missing.exists()


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CAREPATH_DATABASE_URL": f"sqlite:///{tmp_path / 'clients.db'}",
           "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "gateway", "clients", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_a_client_is_disabled_enabled_and_removed(tmp_path: Path) -> None:
    assert _add(tmp_path, ClientKey.ec("ehr-x").jwks()).returncode == 0

    def listed() -> list[list[str]]:
        done = _cli(tmp_path, "list")
        assert done.returncode == 0, done.stderr
        return [line.replace("│", " ").split() for line in done.stdout.splitlines()
                if "ehr-x" in line]

    assert [row[-1] for row in listed()] == ["yes"]
    done = _cli(tmp_path, "disable", "ehr-x")
    assert done.returncode == 0 and "disabled" in done.stdout + done.stderr, done.stderr
    assert [row[-1] for row in listed()] == ["no"]
    assert _cli(tmp_path, "enable", "ehr-x").returncode == 0
    assert [row[-1] for row in listed()] == ["yes"]
    assert _cli(tmp_path, "remove", "ehr-x").returncode == 0
    assert listed() == []
    for command in ("disable", "enable", "remove"):
        missing = _cli(tmp_path, command, "ehr-x")
        assert missing.returncode == 1, missing.stdout + missing.stderr
        assert "there is no client 'ehr-x'" in missing.stdout + missing.stderr
        assert "Traceback" not in missing.stderr
