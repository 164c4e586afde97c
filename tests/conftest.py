"""Shared fixtures: a real gateway over real HTTP, on SQLite and on PostgreSQL.

Every test that takes ``client`` (or ``server``) runs once per backend. The
PostgreSQL backend uses a schema of its own in database ``test`` on
127.0.0.1:5432 and drops it afterwards.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis
import uvicorn

from gateway.fhir.indexer import local_timezone, set_local_timezone
from gateway.main import create_app
from gateway.settings import Settings
from gateway.storage.db import Database, open_database
from gateway.storage.sql import SqlStore

PG_URL = os.environ.get("CAREPATH_TEST_POSTGRES", "postgresql://127.0.0.1:5432/test")
REDIS_URL = "redis://127.0.0.1:6379/0"
BACKENDS = ["sqlite", "postgresql"]


async def _pg(sql: str) -> None:
    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def pg_execute(sql: str) -> None:
    asyncio.run(_pg(sql))


@pytest.fixture
def prefix() -> Iterator[str]:
    """A Redis key prefix of its own; its keys are removed afterwards."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"{name}:*"))
    if keys:
        client.delete(*keys)
    client.close()


@asynccontextmanager
async def backend_database(backend: str, tmp: Path, pool_size: int = 2,
                           statement_timeout_ms: int = 0) -> AsyncIterator[Database]:
    """A Database on ``backend``, not opened yet: a SQLite file in ``tmp``, or a fresh
    PostgreSQL schema dropped afterwards."""
    schema = None
    if backend == "sqlite":
        db = open_database(f"sqlite:///{tmp / 'store.db'}",
                           statement_timeout_ms=statement_timeout_ms)
    else:
        schema = f"t_{uuid.uuid4().hex[:12]}"
        await _pg(f"CREATE SCHEMA {schema}")
        db = open_database(PG_URL, pool_size=pool_size, schema=schema,
                           statement_timeout_ms=statement_timeout_ms)
    try:
        yield db
    finally:
        if schema:
            await _pg(f"DROP SCHEMA {schema} CASCADE")


@asynccontextmanager
async def sql_store(backend: str, tmp: Path, indexer: Any, *, kind: type[SqlStore] = SqlStore,
                    **db_options: Any) -> AsyncIterator[Any]:
    """An opened SqlStore (or subclass ``kind``) on ``backend`` (see :func:`backend_database`)."""
    async with backend_database(backend, tmp, **db_options) as db:
        store = kind(db, indexer)
        await store.open()
        try:
            yield store
        finally:
            await store.close()


@dataclass
class Server:
    backend: str
    url: str  # FHIR base, e.g. http://127.0.0.1:1234/fhir
    settings: Settings


@pytest.fixture(scope="session")
def new_schema() -> Iterator[callable]:  # type: ignore[valid-type]
    made: list[str] = []

    def make() -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        pg_execute(f"CREATE SCHEMA {name}")
        made.append(name)
        return name

    yield make
    for name in made:
        pg_execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


def backend_settings(backend: str, tmp: Path, new_schema: callable, **kw: object) -> Settings:  # type: ignore[valid-type]
    if backend == "sqlite":
        return Settings(database_url=f"sqlite:///{tmp / 'gateway.db'}", **kw)  # type: ignore[arg-type]
    return Settings(database_url=PG_URL, database_schema=new_schema(), **kw)  # type: ignore[arg-type]


class RunningServer:
    """uvicorn serving the gateway on a loopback port, in a thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(create_app(settings), log_level="warning", lifespan="on",
                                proxy_headers=False)  # (as carepath serve runs it)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self) -> RunningServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("gateway did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.settings.base_path}"


@pytest.fixture(scope="session", params=BACKENDS)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           new_schema: callable) -> Iterator[Server]:  # type: ignore[valid-type]
    settings = backend_settings(request.param, tmp_path_factory.mktemp(request.param),
                                new_schema)
    with RunningServer(settings) as running:
        yield Server(request.param, running.url, settings)


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30,
                      headers={"Accept": "application/fhir+json"}) as c:
        yield c


@pytest.fixture
def utc_local_time() -> Iterator[None]:
    """Dates and times without a zone taken as UTC's (``CAREPATH_TIMEZONE=UTC``), for
    tests whose expectations are written in UTC."""
    before = local_timezone()
    set_local_timezone("UTC")
    yield
    set_local_timezone(before.key)


def unique(prefix: str = "x") -> str:
    """A value no other test uses: keeps tests independent on a shared database."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"
