"""Database connections for SQLite (embedded) and PostgreSQL (production).

SQL in the gateway is written once with ``?`` placeholders; the PostgreSQL
connection rewrites them to ``$n`` (cached per statement). Both connection
kinds offer the same four calls: ``execute``, ``executemany``, ``fetch``,
``fetchrow``. :meth:`Database.transaction` yields a connection inside one
database transaction that holds the write lock for its resources.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from functools import lru_cache
from typing import Any, Protocol, TypeVar
from urllib.parse import unquote, urlparse

import aiosqlite
import asyncpg

from gateway.fhir.geo import distance_km
from gateway.fhir.outcome import Code, FhirError

log = logging.getLogger("carepath.storage")
T = TypeVar("T")

Row = tuple[Any, ...]


class RetryableError(Exception):
    """A transaction lost a race (deadlock, serialisation, busy); run it again."""


class Connection(Protocol):
    dialect: str

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None: ...
    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...
    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...
    async def fetchrow(self, sql: str, params: Sequence[Any] = ()) -> Row | None: ...
    async def lock(self, *keys: str) -> None:
        """Hold an exclusive lock on each of ``keys`` until the transaction ends.

        Several keys are taken in one order (whatever order they are given in),
        so that transactions locking overlapping sets cannot deadlock."""


class Database(Protocol):
    dialect: str

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    def transaction(self) -> Any: ...
    def read(self) -> Any: ...
    async def analyze(self, tables: Sequence[str]) -> int:
        """Refresh the query planner's statistics of ``tables``; how many it analyzed."""


def open_database(url: str, pool_size: int = 10, schema: str | None = None,
                  statement_timeout_ms: int = 0) -> Database:
    """``statement_timeout_ms``: a statement that runs longer is cancelled, and answers
    :data:`Code.DATABASE_TIMEOUT` (0: never), so that a costly request cannot hold
    the database after its client has given up. The server's; maintenance (the CLI's
    migrations and reindexing) runs without one."""
    if url.startswith("sqlite:"):
        return SqliteDatabase(sqlite_path(url), statement_timeout_ms=statement_timeout_ms)
    if url.startswith(("postgresql:", "postgres:")):
        return PostgresDatabase(url, pool_size=pool_size, schema=schema,
                                statement_timeout_ms=statement_timeout_ms)
    raise ValueError(f"unsupported database URL: {url!r} (use sqlite:/// or postgresql://)")


def _timed_out() -> FhirError:
    """A statement stopped at the server's limit (either database)."""
    return FhirError(Code.DATABASE_TIMEOUT,
                     "the database did not answer in the time a statement is allowed"
                     " (CAREPATH_DB_STATEMENT_TIMEOUT_MS); narrow the request, or try later")


def _unavailable(exc: BaseException) -> FhirError:
    """The database cannot be used now (either database); the client may try again.
    What went wrong is logged, not told (it can name hosts and paths)."""
    log.warning("database unavailable: %s: %s", type(exc).__name__, exc)
    return FhirError(Code.UNAVAILABLE, "the database cannot be used now; try again shortly")


def _raise_ours(error: Exception, exc: Exception) -> None:
    """Raise ``error``, what the gateway makes of the database's ``exc``, unless it
    made nothing of it (then the caller raises ``exc`` as it is)."""
    if error is not exc:
        raise error from exc


def sqlite_path(url: str) -> str:
    """``sqlite:///./x.db`` -> ``./x.db``; ``sqlite:////abs/x.db`` -> ``/abs/x.db``."""
    if url in ("sqlite://", "sqlite:///:memory:"):
        return ":memory:"
    rest = url.split(":", 1)[1]
    if rest.startswith("///"):
        return unquote(rest[3:])
    return unquote(urlparse(url).path)


# -- SQLite -----------------------------------------------------------------


class _Deadline:
    """When a connection's statement must end (SQLite's progress handler, on the
    connection's thread, reads it; the event loop sets it before each statement)."""

    __slots__ = ("abandoned", "at", "seconds")

    def __init__(self, timeout_ms: int) -> None:
        self.seconds = timeout_ms / 1000
        self.at = math.inf
        self.abandoned = False

    def start(self) -> None:
        if self.seconds and not self.abandoned:
            self.at = time.monotonic() + self.seconds

    def end(self) -> None:
        """Statements sent otherwise (``BEGIN``, ``ANALYZE``) run without a limit."""
        if not self.abandoned:
            self.at = math.inf

    def abandon(self) -> None:
        """Whoever awaited the running statement has gone (its task was cancelled: a
        client that left, :class:`gateway.api.app._Departure`): it stops at the
        handler's next look instead of running to its end for nobody."""
        self.abandoned = True
        self.at = -math.inf

    def clear(self) -> None:
        """After the abandoned statement ended (what the connection runs next waited
        for it), before the connection is used again."""
        self.abandoned = False
        self.at = math.inf

    def passed(self) -> int:
        """Non-zero: SQLite interrupts the statement."""
        return 1 if time.monotonic() > self.at else 0


#: SQLite's result codes (and their extended codes) of a database file that cannot
#: be written or read now: disk full, I/O error, read-only or vanished file
_SQLITE_GONE = ("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN")


def _sqlite_error(exc: sqlite3.Error) -> Exception:
    """A statement the progress handler stopped (:class:`_Deadline`) timed out; a
    busy database is a lost race; a file that cannot be written or read makes
    the database unavailable (503). Anything else is a fault of ours and stays
    what it is."""
    name = getattr(exc, "sqlite_errorname", "")
    if str(exc) == "interrupted" or name == "SQLITE_INTERRUPT":
        return _timed_out()
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return RetryableError(str(exc))
    if name.startswith(_SQLITE_GONE):
        return _unavailable(exc)
    return exc


class _SqliteConnection:
    dialect = "sqlite"

    def __init__(self, conn: aiosqlite.Connection, deadline: _Deadline, *,
                 reader: bool = False) -> None:
        self._conn = conn
        self._deadline = deadline
        self._reader = reader  # its statements may be abandoned (_Deadline.abandon)

    @contextmanager
    def _statement(self) -> Iterator[None]:
        self._deadline.start()
        try:
            yield
        except sqlite3.Error as exc:
            _raise_ours(_sqlite_error(exc), exc)
            raise
        finally:
            self._deadline.end()

    async def _run(self, step: Awaitable[T]) -> T:
        """``step`` of a statement, the statement abandoned (:meth:`_Deadline.abandon`)
        when a reader's task is cancelled while waiting for it: at once, not after
        what a cancelled wait still awaits (closing the cursor, which waits for the
        statement)."""
        try:
            return await step
        except asyncio.CancelledError:
            if self._reader:
                self._deadline.abandon()
            raise

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        with self._statement():
            await self._run(self._conn.execute(sql, tuple(params)))

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with self._statement():
            await self._run(self._conn.executemany(sql, [tuple(r) for r in rows]))

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._statement():
            rows = await self._run(self._conn.execute_fetchall(sql, tuple(params)))
            return [tuple(r) for r in rows]

    async def fetchrow(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        with self._statement():
            cur = await self._run(self._conn.execute(sql, tuple(params)))
            try:
                row = await self._run(cur.fetchone())
            finally:
                await cur.close()
        return tuple(row) if row is not None else None

    async def lock(self, *keys: str) -> None:
        # BEGIN IMMEDIATE already holds the database-wide write lock.
        return None


#: one statement of :meth:`_SqliteTransaction.batch`: SQL, then its parameters, or (when
#: the third item is true) its rows for ``executemany``
Step = tuple[str, Sequence[Any], bool]


class _SqliteTransaction(_SqliteConnection):
    """The writer's transaction, begun (``BEGIN IMMEDIATE``, SQLite's write lock) in
    the same call to the database's thread as its first statement.

    Writes that all wait until the end (``gateway.storage.sql`` buffers them) go
    to the thread as one :meth:`batch`, with ``BEGIN`` and ``COMMIT`` around them:
    one call instead of one per statement (each costs the event loop a wake-up,
    and its answer waits for the loop to take it up while SQLite's one write lock
    is held). A transaction Bundle of 5 resources cost a worker 7.4-9.1 ms of CPU
    instead of 10.7-14.0 (``bench.rest``, ``bench/RESULTS.md``)."""

    def __init__(self, conn: aiosqlite.Connection, deadline: _Deadline) -> None:
        super().__init__(conn, deadline)
        self.begun = False
        self.committed = False

    async def _begin(self) -> None:
        if not self.begun:
            await self.batch(())

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        await self._begin()
        await super().execute(sql, params)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._begin()
        await super().executemany(sql, rows)

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        await self._begin()
        return await super().fetch(sql, params)

    async def fetchrow(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        await self._begin()
        return await super().fetchrow(sql, params)

    async def lock(self, *keys: str) -> None:
        # the database-wide write lock, from here on
        await self._begin()

    async def batch(self, steps: Sequence[Step], *, last: bool = False) -> None:
        """``steps`` in one call to the database's thread, after ``BEGIN IMMEDIATE``
        if the transaction has not begun; ``last``: the transaction's final
        statements, committed in the same call."""
        begin, self.begun = not self.begun, True
        self.committed = last

        def run(raw: sqlite3.Connection) -> None:
            if begin:
                raw.execute("BEGIN IMMEDIATE")
            for sql, params, many in steps:
                if many:
                    raw.executemany(sql, params)
                else:
                    raw.execute(sql, params)
            if last:
                raw.execute("COMMIT")

        with self._statement():
            # aiosqlite's own way onto its thread (every call of its API goes through
            # it), with its sqlite3 connection; it has no public call for a function
            await self._conn._execute(run, self._conn._conn)  # type: ignore[no-untyped-call]


#: rows changed beyond half a PostgreSQL table's since its last ``ANALYZE`` that make
#: its statistics stale (:meth:`PostgresDatabase.analyze`)
STALE_ROWS = 1000

#: rows ``ANALYZE`` samples per index (``PRAGMA analysis_limit``): milliseconds at any
#: size, and enough for the planner to tell a resource's rows from a parameter's
ANALYSIS_LIMIT = 1000


def _ident(name: str) -> str:
    """A table name as an SQL identifier (the gateway's own names: letters, digits, _)."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise ValueError(f"not a table name: {name!r}")
    return name


class SqliteDatabase:
    """One writer connection (SQLite allows one writer) and a few readers (WAL).

    The query planner needs statistics (``sqlite_stat1``, written by ``ANALYZE``):
    without them it guesses, and on the index tables it guesses wrong (a sort
    looked up every row of the parameter for every resource: 11 s for 3,000
    Patients instead of 36 ms). :meth:`analyze` refreshes them; a connection
    loads them when it opens, so readers opened before are replaced when next
    used.
    """

    dialect = "sqlite"

    def __init__(self, path: str, readers: int = 4, statement_timeout_ms: int = 0) -> None:
        self.path = path
        self.statement_timeout_ms = statement_timeout_ms
        self._deadlines: dict[aiosqlite.Connection, _Deadline] = {}
        self._readers_n = readers if path != ":memory:" else 0
        self._writer: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()
        self._readers: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
        self._all: list[aiosqlite.Connection] = []
        self._statistics = 0  # how often ANALYZE ran
        self._loaded: dict[aiosqlite.Connection, int] = {}  # reader -> statistics it has

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None, timeout=30)
        try:
            await conn.execute("PRAGMA journal_mode=WAL")
            await conn.execute("PRAGMA synchronous=FULL")
            await conn.execute("PRAGMA busy_timeout=30000")
            await conn.execute("PRAGMA foreign_keys=ON")
            # the search's distance (Location near), as PostgreSQL computes it in SQL
            await conn.create_function("carepath_distance_km", 4, distance_km,
                                       deterministic=True)
        except BaseException:
            # (a file that is no database: its connection's thread, left open, kept the
            # process alive after the error)
            await conn.close()
            raise
        deadline = self._deadlines[conn] = _Deadline(self.statement_timeout_ms)
        if self.statement_timeout_ms:
            # looked at every 10,000 virtual machine instructions (well under a millisecond)
            await conn.set_progress_handler(deadline.passed, 10_000)
        self._all.append(conn)
        return conn

    async def open(self) -> None:
        try:
            self._writer = await self._connect()
            for _ in range(self._readers_n):
                self._readers.put_nowait(await self._reader())
        except BaseException:
            await self.close()
            raise

    async def _reader(self) -> aiosqlite.Connection:
        conn = await self._connect()
        self._loaded[conn] = self._statistics
        return conn

    async def close(self) -> None:
        for conn in self._all:
            await conn.close()
        self._all.clear()
        self._loaded.clear()
        self._deadlines.clear()

    async def analyze(self, tables: Sequence[str]) -> int:
        """Refresh the query planner's statistics of ``tables`` (sampling
        :data:`ANALYSIS_LIMIT` rows per index); how many."""
        assert self._writer is not None, "database not opened"
        async with self._write_lock:
            await self._writer.execute(f"PRAGMA analysis_limit={ANALYSIS_LIMIT}")
            for table in tables:
                await self._writer.execute(f"ANALYZE {_ident(table)}")
        self._statistics += 1
        return len(tables)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        assert self._writer is not None, "database not opened"
        async with self._write_lock:
            conn = self._writer
            tx = _SqliteTransaction(conn, self._deadlines[conn])
            try:
                yield tx
            except BaseException:
                await self._rollback(conn)
                raise
            if not tx.begun or tx.committed:
                return
            try:
                await conn.execute("COMMIT")
            except BaseException as exc:
                await self._rollback(conn)
                if isinstance(exc, sqlite3.Error):
                    _raise_ours(_sqlite_error(exc), exc)
                raise

    @staticmethod
    async def _rollback(conn: aiosqlite.Connection) -> None:
        """End the connection's transaction, if it is in one, once everything sent to
        its thread before has run. A task cancelled while it waited for a statement
        (its client went away) leaves that statement to run all the same: a
        ``BEGIN`` taking effect after the task gave the connection back would leave
        it in a transaction, and every later ``BEGIN`` on it failing. The thread
        runs what it is sent in order, so this runs after it; and it goes on if this
        task is cancelled too. Some errors (a full disk, an I/O error) have rolled
        the transaction back already, and ROLLBACK would fail on top of them."""
        def run(raw: sqlite3.Connection) -> None:
            if raw.in_transaction:
                raw.execute("ROLLBACK")

        # (aiosqlite's own way onto its thread, as :meth:`_SqliteTransaction.batch`)
        done = conn._execute(run, conn._conn)  # type: ignore[no-untyped-call]
        await asyncio.shield(done)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Connection]:
        if not self._readers_n:
            async with self._write_lock:
                assert self._writer is not None
                yield _SqliteConnection(self._writer, self._deadlines[self._writer])
            return
        conn = await self._readers.get()
        if self._loaded.get(conn) != self._statistics:
            # opened before the last ANALYZE: a new connection loads the statistics
            # (reloading them in place would need the write lock)
            try:
                fresh = await self._reader()
            except BaseException:
                self._readers.put_nowait(conn)  # keep it; the next use tries again
                raise
            stale, conn = conn, fresh
            self._loaded.pop(stale, None)
            self._deadlines.pop(stale, None)
            self._all.remove(stale)
            with suppress(Exception):  # a connection that will not close is dropped
                await stale.close()
        deadline = self._deadlines[conn]
        ended = False
        try:
            await conn.execute("BEGIN")
            try:
                yield _SqliteConnection(conn, deadline, reader=True)
            finally:
                # (after a statement abandoned by a cancelled task: once it stopped)
                await conn.execute("COMMIT")
                deadline.clear()
                ended = True
        finally:
            try:
                if not ended:  # cancelled or failed at BEGIN or COMMIT: see _rollback
                    await self._rollback(conn)
                    deadline.clear()
            finally:
                self._readers.put_nowait(conn)


# -- PostgreSQL -------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\?")


@lru_cache(maxsize=4096)
def _pg_sql(sql: str) -> str:
    counter = iter(range(1, 1_000_000))
    return _PLACEHOLDER.sub(lambda _m: f"${next(counter)}", sql)


#: the advisory locks of several keys, taken in the keys' order
_PG_LOCK_MANY = ("SELECT count(pg_advisory_xact_lock(hashtextextended(k, 0)))"
                 " FROM (SELECT DISTINCT unnest(?::text[]) AS k ORDER BY 1) s")

_RETRYABLE_PG = (
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
)
#: the server cannot be reached, or dropped the connection: a restart, a failover,
#: the network (``OSError``: refused, reset; asyncpg's ``InterfaceError`` on a
#: connection closed underneath it)
_PG_GONE = (
    asyncpg.exceptions.PostgresConnectionError,  # SQLSTATE class 08
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    OSError,
)
#: what the connection turns into the gateway's errors (:func:`_pg_error`)
_PG_ERRORS = (*_RETRYABLE_PG, asyncpg.exceptions.QueryCanceledError, *_PG_GONE,
              asyncpg.exceptions.InterfaceError, asyncpg.exceptions.InternalClientError)


def _pg_error(exc: Exception, conn: asyncpg.Connection | None = None) -> Exception:
    """A lost race (retried by the caller), a statement cancelled by
    ``statement_timeout``, or a database out of reach.

    A connection the server has ended (a restart, ``pg_terminate_backend``) can
    still be handed out before its end is read; asyncpg then fails the statement
    before sending it (``InternalClientError``: its protocol waits for the end of
    an error that came unasked). Such a connection is dropped, so that the pool
    opens a new one. ``InterfaceError`` on an open connection is a fault of ours
    and stays what it is."""
    if isinstance(exc, asyncpg.exceptions.QueryCanceledError):
        return _timed_out()
    if isinstance(exc, _RETRYABLE_PG):
        return RetryableError(str(exc))
    if isinstance(exc, asyncpg.exceptions.InternalClientError) and conn is not None:
        conn.terminate()
    gone = isinstance(exc, _PG_GONE) or conn is None or _closed(conn)
    return _unavailable(exc) if gone else exc


def _closed(conn: asyncpg.Connection) -> bool:
    """Whether ``conn`` (of the pool) is closed, or was dropped by :func:`_pg_error`
    (which hands it back to the pool)."""
    try:
        return bool(conn.is_closed())
    except asyncpg.exceptions.InterfaceError:  # no longer ours
        return True


class _PostgresConnection:
    dialect = "postgresql"

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        try:
            await self._conn.execute(_pg_sql(sql), *params)
        except _PG_ERRORS as exc:
            _raise_ours(_pg_error(exc, self._conn), exc)
            raise

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = list(rows)
        if rows:
            try:
                await self._conn.executemany(_pg_sql(sql), rows)
            except _PG_ERRORS as exc:
                _raise_ours(_pg_error(exc, self._conn), exc)
                raise

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        try:
            return [tuple(r) for r in await self._conn.fetch(_pg_sql(sql), *params)]
        except _PG_ERRORS as exc:
            _raise_ours(_pg_error(exc, self._conn), exc)
            raise

    async def fetchrow(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        try:
            row = await self._conn.fetchrow(_pg_sql(sql), *params)
        except _PG_ERRORS as exc:
            _raise_ours(_pg_error(exc, self._conn), exc)
            raise
        return tuple(row) if row is not None else None

    async def lock(self, *keys: str) -> None:
        if len(keys) == 1:
            await self.execute("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", keys)
        elif keys:
            await self.execute(_PG_LOCK_MANY, (list(keys),))


class _PostgresTransaction(_PostgresConnection):
    """A transaction that begins with its first statement.

    Work whose writes all wait until the end (``gateway.storage.sql`` buffers
    them) can then be sent as one statement with no ``BEGIN`` and ``COMMIT``
    around it (:meth:`execute_last`): PostgreSQL runs a lone statement as a
    transaction of its own, all or nothing, committed (and flushed, with
    ``synchronous_commit`` on) before it answers. One round trip instead of
    three.
    """

    def __init__(self, conn: asyncpg.Connection) -> None:
        super().__init__(conn)
        self.begun = False

    async def _begin(self) -> None:
        if not self.begun:
            self.begun = True
            try:
                await self._conn.execute("BEGIN")
            except _PG_ERRORS as exc:
                _raise_ours(_pg_error(exc, self._conn), exc)
                raise

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        await self._begin()
        await super().execute(sql, params)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._begin()
        await super().executemany(sql, rows)

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        await self._begin()
        return await super().fetch(sql, params)

    async def fetchrow(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        await self._begin()
        return await super().fetchrow(sql, params)

    async def execute_last(self, sql: str, params: Sequence[Any] = ()) -> None:
        """The transaction's last statement: alone, when nothing was sent before it
        (then there is nothing left to commit)."""
        await super().execute(sql, params)

    async def lock(self, *keys: str) -> None:
        if self.begun or len(keys) != 1:
            await super().lock(*keys)
            return
        key = keys[0]
        # the transaction's first statement: BEGIN and the lock in one round trip (a
        # simple query of two statements, which takes no parameters: the key goes
        # in as hex digits, so no text of a client's can end the literal)
        self.begun = True
        key_hex = key.encode().hex()
        try:
            await self._conn.execute(
                "BEGIN; SELECT pg_advisory_xact_lock(hashtextextended("
                f"convert_from(decode('{key_hex}', 'hex'), 'UTF8'), 0))")
        except _PG_ERRORS as exc:
            _raise_ours(_pg_error(exc, self._conn), exc)
            raise


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool release without ``RESET ALL``: the gateway sets no session state beyond
    what the pool's ``server_settings`` give every connection, and a transaction
    left open is rolled back by asyncpg before release."""


class PostgresDatabase:
    dialect = "postgresql"

    def __init__(self, url: str, pool_size: int = 10, schema: str | None = None,
                 statement_timeout_ms: int = 0) -> None:
        self.url = url
        self.pool_size = pool_size
        self.schema = schema
        self.statement_timeout_ms = statement_timeout_ms
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        # no JIT: it pays off for long analytical queries; a search whose estimate
        # crosses jit_above_cost (a sort over a few thousand resources) spent 190 ms
        # compiling for 35 ms of work
        settings = {"jit": "off", "statement_timeout": str(self.statement_timeout_ms),
                    **({"search_path": self.schema} if self.schema else {})}
        # no idle timer: asyncpg would re-arm and cancel one on every release and
        # acquire (about a third of their cost); the pool stays at the size it grew to
        self._pool = await asyncpg.create_pool(
            self.url, min_size=1, max_size=self.pool_size, server_settings=settings,
            reset=_keep_session, max_inactive_connection_lifetime=0,
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @asynccontextmanager
    async def _acquire(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection of the pool; the database out of reach is an error of the
        gateway's (503), not a fault."""
        assert self._pool is not None, "database not opened"
        try:
            conn = await self._pool.acquire()
        except _PG_ERRORS as exc:
            raise _pg_error(exc) from exc
        try:
            yield conn
        finally:
            await self._pool.release(conn)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        async with self._acquire() as conn:
            tx = _PostgresTransaction(conn)
            try:
                yield tx
            except BaseException:
                if tx.begun and not _closed(conn):
                    try:
                        await conn.execute("ROLLBACK")
                    except Exception:  # a cancelled query, say: the pool discards it
                        conn.terminate()
                raise
            if tx.begun:
                try:
                    await conn.execute("COMMIT")
                except _PG_ERRORS as exc:
                    _raise_ours(_pg_error(exc, conn), exc)
                    raise

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Connection]:
        """A connection for reads, in autocommit: each statement sees committed data."""
        async with self._acquire() as conn:
            yield _PostgresConnection(conn)

    @asynccontextmanager
    async def maintenance(self) -> AsyncIterator[Connection]:
        """A connection in autocommit without the statement timeout, for work that
        frames its own transactions and may run long (schema migrations: an index
        built over millions of rows). It goes back to the pool with the timeout, or
        is discarded if it cannot be given it back."""
        async with self._acquire() as conn:
            await conn.execute("SET statement_timeout = 0")
            try:
                yield _PostgresConnection(conn)
            finally:
                try:
                    await conn.execute(f"SET statement_timeout = {int(self.statement_timeout_ms)}")
                except Exception:  # in a failed transaction, or gone: the pool drops it
                    conn.terminate()

    async def analyze(self, tables: Sequence[str]) -> int:
        """Give the planner statistics of those of ``tables`` that have none, or whose
        rows changed by more than half their number (and 1,000) since they were last
        analyzed (how many). Autovacuum, where it runs, analyzes at a tenth and gets
        there first; where it is off or behind, a table loaded after its statistics
        were taken would be planned as if it were still small (a patient's 5,000
        Observations searched in 14 s instead of 40 ms). Sampled; blocks no reader
        or writer; one process at a time (the others skip).

        Vacuumed too, as autovacuum would: that marks their pages all-visible, so
        that counting index entries (``search_sql.choose_driver``) reads the index
        alone. Unvacuumed, counting 20,000 entries took 39 ms."""
        async with self._acquire() as conn:
            if not await conn.fetchval(
                    "SELECT pg_try_advisory_lock(hashtextextended($1, 0))", "carepath:analyze"):
                return 0
            try:
                stale = [r[0] for r in await conn.fetch(
                    "SELECT relname FROM pg_stat_user_tables WHERE schemaname ="
                    " current_schema() AND relname = ANY($1::text[]) AND (last_analyze IS NULL"
                    " AND last_autoanalyze IS NULL OR n_mod_since_analyze > n_live_tup / 2 + $2)",
                    [_ident(t) for t in tables], STALE_ROWS)]
                if stale:  # (VACUUM runs outside a transaction block)
                    await conn.execute(
                        f"VACUUM (ANALYZE) {', '.join(_ident(t) for t in stale)}")
            finally:
                await conn.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))",
                                   "carepath:analyze")
        return len(stale)
