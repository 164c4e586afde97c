"""A gateway with registered clients (no dev mode), on both backends."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.settings import Settings
from gateway.storage.db import open_database
from gateway.storage.migrate import migrate
from gateway.storage.security import Client, add_client
from tests.conftest import RunningServer, backend_settings
from tests.security.keys import ClientKey, token_form


@dataclass
class Secured:
    backend: str
    url: str
    settings: Settings
    keys: dict[str, ClientKey]

    @property
    def token_url(self) -> str:
        return f"{self.url}/auth/token"

    def token(self, client: str, scope: str = "system/*.cruds") -> str:
        key = self.keys[client]
        response = httpx.post(self.token_url, data=token_form(key.assertion(self.token_url),
                                                                scope))
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])

    def client(self, name: str, scope: str = "system/*.cruds") -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, headers={
            "Authorization": f"Bearer {self.token(name, scope)}",
            "Content-Type": "application/fhir+json"})


CLIENTS = {
    # client id -> (organization, granted scope, key kind)
    "hospital-a": ("org-a", "system/*.cruds", "rsa"),
    "gp-b": ("org-b", "system/*.cruds", "ec"),
    "reader-c": ("org-a", "system/Patient.rs system/Observation.rs", "ec"),
}


def register(settings: Settings, keys: dict[str, ClientKey]) -> None:
    async def run() -> None:
        db = open_database(settings.database_url, pool_size=1, schema=settings.database_schema)
        await db.open()
        try:
            await migrate(db)
            for cid, (org, scope, _) in CLIENTS.items():
                await add_client(db, Client(cid, org, json.dumps(keys[cid].jwks()), None,
                                            scope, True))
        finally:
            await db.close()

    asyncio.run(run())


@contextmanager
def secured_server(backend: str, tmp: Path, new_schema: Any, **kw: Any) -> Iterator[Secured]:
    """A gateway that requires tokens, with the :data:`CLIENTS` registered."""
    settings = backend_settings(backend, tmp, new_schema, **kw)
    keys = {cid: (ClientKey.rsa(cid) if kind == "rsa" else ClientKey.ec(cid))
            for cid, (_, _, kind) in CLIENTS.items()}
    register(settings, keys)
    with RunningServer(settings) as running:
        yield Secured(backend, running.url, settings, keys)


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def secured(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            new_schema) -> Iterator[Secured]:  # type: ignore[no-untyped-def]
    with secured_server(request.param, tmp_path_factory.mktemp(f"sec-{request.param}"),
                        new_schema) as running:
        yield running
