"""The floor: the least work a JSON-over-HTTP resource server could do.

A bare ASGI app (no framework) that ``bench.rest`` serves with the same
uvicorn, worker count, driver and concurrency as the gateway, so that each
gateway figure can be read as a fraction of what this machine, this Python,
this HTTP stack and this database can do at all:

* a write (``POST /fhir/{Type}``, ``PUT /fhir/{Type}/{id}``, ``POST /fhir``)
  is ``orjson.loads`` of the body (so a malformed body would be refused) plus
  one INSERT of the same bytes (an upsert for PUT), committed on its own;
* a read (``GET /fhir/{Type}/{id}``) is one SELECT by primary key returning
  the stored bytes.

Storage, chosen by ``FLOOR_DATABASE_URL`` (``FLOOR_DATABASE_SCHEMA`` sets the
PostgreSQL ``search_path``):

* PostgreSQL: an asyncpg pool per worker of the gateway's default size (10) and
  settings; each statement runs in autocommit, i.e. one commit (WAL flush) per
  write.
* SQLite: WAL, ``synchronous=FULL``, ``busy_timeout``; writes run on one
  thread per worker (as aiosqlite would), reads run inline on the event loop
  (a cached primary-key lookup is a few microseconds).

The table is created by :func:`prepare` before the server starts.

Run by hand::

    FLOOR_DATABASE_URL=postgresql://127.0.0.1/test FLOOR_DATABASE_SCHEMA=bench_x \\
      .venv/bin/uvicorn bench.floor:create_app --factory --workers 2 --port 8099
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote, urlparse

import orjson

TABLE = "floor_resource"
POOL_SIZE = 10  # the gateway's default db_pool_size
BASE = "/fhir"

_JSON = [(b"content-type", b"application/fhir+json; charset=utf-8")]
_METADATA = orjson.dumps({"resourceType": "CapabilityStatement", "status": "active",
                          "kind": "instance", "fhirVersion": "4.0.1", "format": ["json"]})
_TX_RESPONSE = orjson.dumps({"resourceType": "Bundle", "type": "transaction-response"})


def sqlite_path(url: str) -> str:
    rest = url.split(":", 1)[1]
    return unquote(rest[3:]) if rest.startswith("///") else unquote(urlparse(url).path)


def _sqlite_connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


async def prepare(url: str, schema: str | None = None) -> None:
    """Create the floor's table (in ``schema`` on PostgreSQL, which must exist)."""
    if url.startswith("sqlite:"):
        conn = _sqlite_connect(sqlite_path(url))
        conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id TEXT PRIMARY KEY, content BLOB)")
        conn.close()
        return
    import asyncpg

    conn = await asyncpg.connect(url, server_settings={"search_path": schema} if schema else {})
    try:
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} (id TEXT PRIMARY KEY, content BYTEA NOT NULL)"
        )
    finally:
        await conn.close()


async def _no_reset(_conn: Any) -> None:
    """Pool release without a reset query."""


class _Postgres:
    def __init__(self, url: str, schema: str | None) -> None:
        self.url, self.schema = url, schema
        self.pool: Any = None

    async def open(self) -> None:
        import asyncpg

        # the gateway's pool settings: no reset query on release (asyncpg's default
        # costs a round trip per request; neither server sets session state) and no
        # idle timer
        self.pool = await asyncpg.create_pool(
            self.url, min_size=1, max_size=POOL_SIZE,
            server_settings={"search_path": self.schema} if self.schema else {},
            reset=_no_reset, max_inactive_connection_lifetime=0,
        )

    async def close(self) -> None:
        await self.pool.close()

    async def insert(self, id: str, content: bytes) -> None:
        await self.pool.execute(f"INSERT INTO {TABLE} (id, content) VALUES ($1, $2)", id, content)

    async def upsert(self, id: str, content: bytes) -> None:
        await self.pool.execute(
            f"INSERT INTO {TABLE} (id, content) VALUES ($1, $2)"
            " ON CONFLICT (id) DO UPDATE SET content = excluded.content", id, content)

    async def get(self, id: str) -> bytes | None:
        content: bytes | None = await self.pool.fetchval(
            f"SELECT content FROM {TABLE} WHERE id = $1", id)
        return content


class _Sqlite:
    def __init__(self, path: str) -> None:
        self.path = path
        self.writer: sqlite3.Connection | None = None
        self.reader: sqlite3.Connection | None = None
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="floor-writer")

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self.writer = await loop.run_in_executor(self.thread, _sqlite_connect, self.path)
        self.reader = _sqlite_connect(self.path)

    async def close(self) -> None:
        assert self.writer is not None and self.reader is not None
        await asyncio.get_running_loop().run_in_executor(self.thread, self.writer.close)
        self.reader.close()
        self.thread.shutdown()

    def _write(self, sql: str, id: str, content: bytes) -> None:
        assert self.writer is not None
        self.writer.execute(sql, (id, content))  # autocommit: one transaction

    async def insert(self, id: str, content: bytes) -> None:
        await asyncio.get_running_loop().run_in_executor(
            self.thread, self._write, f"INSERT INTO {TABLE} (id, content) VALUES (?, ?)",
            id, content)

    async def upsert(self, id: str, content: bytes) -> None:
        await asyncio.get_running_loop().run_in_executor(
            self.thread, self._write, f"INSERT INTO {TABLE} (id, content) VALUES (?, ?)"
            " ON CONFLICT (id) DO UPDATE SET content = excluded.content", id, content)

    async def get(self, id: str) -> bytes | None:
        assert self.reader is not None
        row = self.reader.execute(f"SELECT content FROM {TABLE} WHERE id = ?", (id,)).fetchone()
        return row[0] if row else None


def _open_store(url: str, schema: str | None) -> _Postgres | _Sqlite:
    if url.startswith("sqlite:"):
        return _Sqlite(sqlite_path(url))
    return _Postgres(url, schema)


async def _send(send: Any, status: int, body: bytes = b"",
                headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*(headers or _JSON), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


def create_app() -> Any:
    """The ASGI app (a factory, so each uvicorn worker opens its own pool)."""
    store = _open_store(os.environ["FLOOR_DATABASE_URL"], os.environ.get("FLOOR_DATABASE_SCHEMA"))

    async def lifespan(receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await store.open()
                except Exception as exc:  # pragma: no cover - reported by uvicorn
                    await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await store.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method = scope["method"]
        path = scope["path"]
        if not path.startswith(BASE):
            await _send(send, 404)
            return
        parts = [p for p in path[len(BASE):].split("/") if p]
        body = await _body(receive) if method in ("POST", "PUT") else b""
        try:
            if method == "GET" and parts == ["metadata"]:
                await _send(send, 200, _METADATA)
            elif method == "GET" and len(parts) == 2:
                content = await store.get(parts[1])
                if content is None:
                    await _send(send, 404)
                else:
                    await _send(send, 200, bytes(content))
            elif method == "POST" and len(parts) <= 1:
                orjson.loads(body)
                id = str(uuid.uuid4())
                await store.insert(id, body)
                if parts:  # create: echo the stored resource, as the gateway does
                    location = f"{BASE}/{parts[0]}/{id}/_history/1".encode()
                    await _send(send, 201, body, [*_JSON, (b"location", location)])
                else:  # transaction
                    await _send(send, 200, _TX_RESPONSE)
            elif method == "PUT" and len(parts) == 2:
                orjson.loads(body)
                await store.upsert(parts[1], body)
                await _send(send, 200, body)
            else:
                await _send(send, 405)
        except orjson.JSONDecodeError:
            await _send(send, 400)

    return app
