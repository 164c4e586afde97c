"""Client keys and signed assertions for the security tests."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.security.tokens import ASSERTION_TYPE


@dataclass
class ClientKey:
    client_id: str
    alg: str
    private: Any
    kid: str

    @classmethod
    def rsa(cls, client_id: str) -> ClientKey:
        return cls(client_id, "RS384", rsa.generate_private_key(65537, 2048), str(uuid.uuid4()))

    @classmethod
    def ec(cls, client_id: str) -> ClientKey:
        return cls(client_id, "ES384", ec.generate_private_key(ec.SECP384R1()),
                   str(uuid.uuid4()))

    def jwks(self) -> dict[str, Any]:
        algo = jwt.algorithms.RSAAlgorithm if self.alg.startswith("RS") else (
            jwt.algorithms.ECAlgorithm)
        jwk = json.loads(algo.to_jwk(self.private.public_key()))
        return {"keys": [{**jwk, "kid": self.kid, "alg": self.alg}]}

    def assertion(self, token_url: str, **overrides: Any) -> str:
        now = int(time.time())
        claims = {"iss": self.client_id, "sub": self.client_id, "aud": token_url,
                  "exp": now + 240, "jti": str(uuid.uuid4())}
        headers = {"kid": overrides.pop("kid", self.kid)}
        alg = overrides.pop("alg", self.alg)
        key = overrides.pop("key", self.private)
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        return jwt.encode(claims, key, algorithm=alg, headers=headers)


def token_form(assertion: str, scope: str = "system/*.cruds") -> dict[str, str]:
    return {"grant_type": "client_credentials", "scope": scope,
            "client_assertion_type": ASSERTION_TYPE, "client_assertion": assertion}
