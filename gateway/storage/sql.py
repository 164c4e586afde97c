"""The SQL store (SQLite and PostgreSQL): :class:`gateway.storage.interface.Store`.

A write is one database transaction holding: the ``resource`` row (current
version, JSON bytes as served), a ``resource_history`` row, the search index
rows (on an update, those of the parameters whose values changed), and an
``outbox`` row for the event consumers. On PostgreSQL the writes of one
transaction (a whole Bundle) go out as one statement.
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import orjson

from gateway.fhir import json as fjson
from gateway.fhir.instants import instant
from gateway.fhir.outcome import Code, FhirError
from gateway.fhir.references import localize
from gateway.storage import access_sql, search_sql, snapshots
from gateway.storage.db import Connection, Database, RetryableError, Step
from gateway.storage.interface import (
    HistoryPage,
    Listed,
    Restriction,
    Snapshot,
    StoredResource,
)
from gateway.storage.migrate import migrate
from gateway.storage.schema import INDEX_TABLES
from gateway.storage.security import (
    AuditRecord,
    append_audit_cte,
    append_audit_rows,
    audit_arrays,
    audit_records,
)

if TYPE_CHECKING:
    from gateway.fhir.search import SearchQuery

T = TypeVar("T")

MAX_ATTEMPTS = 5
#: most writes a transaction keeps waiting to go out together: a large Bundle goes
#: in parts of this many (each one statement), not all its rows at once in memory
MAX_PENDING = 500

#: the members a stored resource begins with
_LEADING = frozenset(("resourceType", "id", "meta"))

_INSERT_INDEX = {
    table: (
        f"INSERT INTO {table} (res_type, res_id, param, {', '.join(cols)}) "
        f"VALUES (?, ?, ?, {', '.join('?' for _ in cols)})"
    )
    for table, cols in INDEX_TABLES.items()
}
_DELETE_INDEX = {t: f"DELETE FROM {t} WHERE res_type = ? AND res_id = ?" for t in INDEX_TABLES}

_RESOURCE_COLS = "res_type, res_id, version, last_updated, deleted, content"
#: the same, of the search's ``resource r``
_MATCH_COLS = ", ".join(f"r.{c}" for c in _RESOURCE_COLS.split(", "))

# PostgreSQL element types of each index table's value columns (after ``param``)
_PG_TYPES: dict[str, tuple[str, ...]] = {
    "sp_string": ("text", "text"),
    "sp_token": ("text", "text", "text"),
    "sp_date": ("bigint", "bigint"),
    "sp_number": ("float8", "float8"),
    "sp_quantity": ("text", "text", "text", "float8", "float8"),
    "sp_reference": ("text",) * 6,
    "sp_uri": ("text",),
    "sp_consent": ("text", "text", "text", "integer", "bigint", "bigint"),
    "sp_composite": ("text",) * 5 + ("float8", "float8", "bigint", "bigint") + ("text",) * 8,
    "sp_coords": ("float8", "float8"),
}


def _json_columns(table: str, keyed: bool = False) -> str:
    """The SELECT list reading one index row ``x`` of a JSON array: ``[param, values…]``,
    or with ``keyed`` ``[res_type, res_id, param, values…]``.

    Index rows travel as JSON text rather than one PostgreSQL array per column:
    asyncpg encodes arrays element by element in Python-facing code, which for
    the ~50 rows of a typical resource cost more client CPU than the whole
    statement costs the database. Every value is a string, an integer or a
    finite float (``gateway.fhir.indexer``), so JSON carries them exactly.
    The array is read as ``jsonb``: parsed once, so each ``x->>i`` is a lookup.
    With ``json`` every ``->>`` parses the row's text again from its start,
    which for a Bundle's ~100 rows of up to 20 columns cost PostgreSQL more
    than the rows' inserts (``bench/RESULTS.md``).
    """
    types = ("text", *(("text", "text") if keyed else ()), *_PG_TYPES[table])
    return ", ".join(f"x->>{i}" if t == "text" else f"(x->>{i})::{t}"
                     for i, t in enumerate(types))


@lru_cache(maxsize=1024)
def _pg_put_sql(tables: tuple[str, ...], stale: tuple[tuple[str, bool], ...], audit: bool, *,
                first: bool = False, creator: bool = True) -> str:
    """One PostgreSQL write as one statement of data-modifying CTEs: the common
    case (a create or update), cheaper than :func:`_pg_put_many_sql` with one row.

    Parameters: $1 type, $2 id, $3 version, $4 last_updated, $5 method,
    $6 content, $7 event id, $8 interaction, with ``creator`` $9 the creating
    organisation; then for each table of ``stale`` whose rows go by parameter
    (``(table, True)``) the parameters as a text array; then for each of
    ``tables`` the rows to insert as one JSON array (:func:`_json_rows`); with
    ``audit`` the audit records after them. ``stale`` names the tables where
    the previous version's rows go: those of the listed parameters, or with
    ``(table, False)`` all of them (:func:`_index_change`). ``first``: version 1, so no
    ``resource`` row exists (a concurrent writer of the same version fails on
    ``resource_history`` either way). Sub-statements share one snapshot: the
    DELETEs remove only the previous version's rows, never the ones inserted
    here. What a write does not need gets no sub-statement: each costs the
    database time to plan and run, even with nothing to do.
    """
    upsert = "" if first else (
        " ON CONFLICT (res_type, res_id) DO UPDATE SET version = excluded.version,"
        " last_updated = excluded.last_updated, deleted = 0, content = excluded.content")
    parts = [
        "h AS (INSERT INTO resource_history (res_type, res_id, version, last_updated, method,"
        " content) VALUES ($1, $2, $3, $4, $5, $6) RETURNING seq)",
        "r AS (INSERT INTO resource (res_type, res_id, version, last_updated, deleted, content,"
        f" created_seq) SELECT $1, $2, $3, $4, 0, $6, h.seq FROM h{upsert})",
        "o AS (INSERT INTO outbox (event_id, res_type, res_id, version, interaction, ts,"
        " history_seq) SELECT $7, $1, $2, $3, $8, $4, h.seq FROM h)",
    ]
    n = 9
    if creator:
        parts.append("c AS (INSERT INTO resource_creator (res_type, res_id, organization)"
                     " VALUES ($1, $2, $9) ON CONFLICT (res_type, res_id) DO NOTHING)")
        n = 10
    for table, by_param in stale:
        where = ""
        if by_param:
            where = f" AND param = ANY(${n}::text[])"
            n += 1
        parts.append(f"d_{table} AS (DELETE FROM {table} WHERE res_type = $1 AND res_id = $2"
                     f"{where})")
    for i, table in enumerate(tables, start=n):
        parts.append(f"i_{table} AS (INSERT INTO {table} (res_type, res_id, param,"
                     f" {', '.join(INDEX_TABLES[table])}) SELECT $1, $2, {_json_columns(table)}"
                     f" FROM jsonb_array_elements(${i}::jsonb) x)")
    if audit:
        parts.append(append_audit_cte(n + len(tables)))
    return "WITH " + ", ".join(parts) + " SELECT seq FROM h"


def _filled(rows: dict[str, list[tuple[Any, ...]]]) -> tuple[str, ...]:
    """The index tables ``rows`` has rows for, in ``INDEX_TABLES`` order."""
    return tuple(t for t in INDEX_TABLES if rows.get(t))


def _json_rows(rows: dict[str, list[tuple[Any, ...]]], tables: tuple[str, ...]) -> list[str]:
    """Index rows as one JSON array per table of ``tables``."""
    return [orjson.dumps(rows[table]).decode() for table in tables]


@lru_cache(maxsize=1024)
def _pg_put_many_sql(tables: tuple[str, ...], stale: tuple[str, ...], audit: bool,
                     first: bool = False) -> str:
    """Several PostgreSQL writes of a transaction as one statement of data-modifying CTEs.

    Parameters: one array per put, ``$1`` types, ``$2`` ids, ``$3`` versions,
    ``$4`` last_updated, ``$5`` methods, ``$6`` contents, ``$7`` creators (NULL:
    none), ``$8`` event ids, ``$9`` interactions; then for each table of
    ``stale`` the previous versions' rows that go, as one JSON array of
    ``[res_type, res_id, param]`` (param ``null``: all of the resource's rows
    in that table); then for each of ``tables`` the rows to insert as one JSON
    array, each row ``[res_type, res_id, param, values…]``; with ``audit`` the
    audit records after them. History and
    outbox rows are inserted in put order: event consumers read the outbox in
    seq order. Sub-statements share one snapshot: the DELETEs remove only the
    previous versions' rows, never the ones inserted here. A resource may occur
    once per statement. ``first``: every put is a version 1, so the current rows
    are plain INSERTs (an upsert inserts speculatively and confirms: a second
    WAL record per row).
    """
    upsert = "" if first else (
        " ON CONFLICT (res_type, res_id) DO UPDATE SET version = excluded.version,"
        " last_updated = excluded.last_updated, deleted = 0, content = excluded.content")
    parts = [
        "p AS (SELECT * FROM unnest($1::text[], $2::text[], $3::integer[], $4::bigint[],"
        " $5::text[], $6::bytea[], $7::text[], $8::text[], $9::text[])"
        " WITH ORDINALITY AS p(res_type, res_id, version, last_updated, method, content,"
        " creator, event_id, interaction, ord))",
        "h AS (INSERT INTO resource_history (res_type, res_id, version, last_updated, method,"
        " content) SELECT res_type, res_id, version, last_updated, method, content FROM p"
        " ORDER BY ord RETURNING seq, res_type, res_id)",
        "r AS (INSERT INTO resource (res_type, res_id, version, last_updated, deleted, content,"
        " created_seq) SELECT p.res_type, p.res_id, p.version, p.last_updated, 0, p.content,"
        f" h.seq FROM p JOIN h USING (res_type, res_id){upsert})",
        "c AS (INSERT INTO resource_creator (res_type, res_id, organization)"
        " SELECT res_type, res_id, creator FROM p WHERE creator IS NOT NULL"
        " ON CONFLICT (res_type, res_id) DO NOTHING)",
        "o AS (INSERT INTO outbox (event_id, res_type, res_id, version, interaction, ts,"
        " history_seq) SELECT p.event_id, p.res_type, p.res_id, p.version, p.interaction,"
        " p.last_updated, h.seq FROM p JOIN h USING (res_type, res_id) ORDER BY p.ord)",
    ]
    parts.extend(f"d_{table} AS (DELETE FROM {table} x USING jsonb_array_elements(${n}::jsonb) d"
                 " WHERE x.res_type = d->>0 AND x.res_id = d->>1"
                 " AND (d->>2 IS NULL OR x.param = d->>2))"
                 for n, table in enumerate(stale, start=10))
    for n, table in enumerate(tables, start=10 + len(stale)):
        parts.append(f"i_{table} AS (INSERT INTO {table} (res_type, res_id, param,"
                     f" {', '.join(INDEX_TABLES[table])}) SELECT {_json_columns(table, keyed=True)}"
                     f" FROM jsonb_array_elements(${n}::jsonb) x)")
    if audit:
        parts.append(append_audit_cte(10 + len(stale) + len(tables)))
    return "WITH " + ", ".join(parts) + " SELECT count(*) FROM h"


_PG_AUDIT = f"WITH {append_audit_cte(1)} SELECT 1"


@dataclass(frozen=True, slots=True)
class _Put:
    """One pending write."""

    res_type: str
    res_id: str
    version: int
    updated: int
    method: str
    content: bytes
    creator: str | None
    event_id: str
    interaction: str
    #: per index table, the previous version's rows that go: those of these
    #: parameters, or (``None``) all (:func:`_index_change`)
    stale: dict[str, tuple[str, ...] | None]
    rows: dict[str, list[tuple[Any, ...]]]  # the rows to insert


def _pg_put_many_params(puts: Sequence[_Put], stale: tuple[str, ...],
                        tables: tuple[str, ...]) -> list[Any]:
    """:func:`_pg_put_many_sql`'s parameters: the puts' columns, then the rows that go
    from the ``stale`` tables and the index rows of ``tables``, table by table."""
    out: list[Any] = [
        [p.res_type for p in puts], [p.res_id for p in puts], [p.version for p in puts],
        [p.updated for p in puts], [p.method for p in puts], [p.content for p in puts],
        [p.creator for p in puts], [p.event_id for p in puts],
        [p.interaction for p in puts],
    ]
    for table in stale:
        gone: list[tuple[str, str, str | None]] = []
        for p in puts:
            if table in p.stale:
                params = p.stale[table]
                gone.extend((p.res_type, p.res_id, param) for param in params or (None,))
        out.append(orjson.dumps(gone).decode())
    for table in tables:
        out.append(orjson.dumps(
            [(p.res_type, p.res_id, *r) for p in puts for r in p.rows.get(table, ())]).decode())
    return out


class Indexer(Protocol):
    def extract(self, resource: dict[str, Any]) -> dict[str, list[tuple[Any, ...]]]: ...


#: index tables whose rows an update replaces whole: they follow the deployment's access
#: policy as well as the resource (``sp_consent``, gateway.security.policy)
_REPLACED_WHOLE = frozenset({"sp_consent"})

_IndexRows = dict[str, list[tuple[Any, ...]]]


def _index_change(
    indexer: Indexer, previous: StoredResource | None, new: _IndexRows
) -> tuple[dict[str, tuple[str, ...] | None], _IndexRows]:
    """What a write changes in the search index: the rows that go (per table, the
    parameters whose rows go, ``None`` for all) and the rows to insert.

    A first version, or one after a deletion, has no rows: nothing goes and
    every row is inserted. Otherwise the previous version's rows are extracted
    again from its stored JSON (the index holds what the indexer extracts from
    it; after an upgrade that changes what is indexed, ``carepath reindex``
    makes it so again, README) and compared parameter by parameter, as HAPI
    FHIR synchronises its index rows. Only parameters
    whose rows differ are rewritten: an update of a telephone number replaces
    the telecom rows, not the ~50 rows of the Patient, which spares the
    database most of an update's work and its tables the dead rows.
    """
    if previous is None or previous.deleted:
        return {}, new
    try:
        old = indexer.extract(fjson.loads(previous.content)) if previous.content else None
    except FhirError:  # damaged stored JSON: replace what is there, whatever it is
        old = None
    if old is None:
        return dict.fromkeys(INDEX_TABLES), new
    stale: dict[str, tuple[str, ...] | None] = {}
    insert: _IndexRows = {}
    for table in INDEX_TABLES:
        before, after = old.get(table) or [], new.get(table) or []
        if table in _REPLACED_WHOLE:
            if before:
                stale[table] = None
            insert[table] = after
            continue
        if before == after:
            continue
        was = _by_param(before)
        now = _by_param(after)
        changed = {param for param in was.keys() | now.keys() if was.get(param) != now.get(param)}
        gone = tuple(sorted(changed & was.keys()))
        if gone:
            stale[table] = gone
        insert[table] = [row for row in after if row[0] in changed]
    return stale, insert


def _by_param(rows: list[tuple[Any, ...]]) -> dict[str, set[tuple[Any, ...]]]:
    out: dict[str, set[tuple[Any, ...]]] = {}
    for row in rows:
        out.setdefault(row[0], set()).add(row)
    return out


def now_micros() -> int:
    """Wall clock in epoch microseconds, truncated to milliseconds (``meta.lastUpdated``)."""
    return int(time.time() * 1000) * 1000


def _restrict(
    r: Restriction | None, types: Sequence[str] | None = None
) -> search_sql.Restrict | None:
    if r is None:
        return None

    searched = types

    def restrict(alias: str, types: Sequence[str] | None = None) -> search_sql.Frag:
        return access_sql.visible(r, alias, searched if types is None else types)

    return restrict


async def _visible(
    conn: Connection, keys: Sequence[tuple[str, str]], r: Restriction, writing: bool
) -> set[tuple[str, str]]:
    out: set[tuple[str, str]] = set()
    types = sorted({t for t, _ in keys})
    for start in range(0, len(keys), 200):
        chunk = keys[start : start + 200]
        # an access proxy lets others read, not write (access_sql.visible)
        cond, params = access_sql.visible(r, "v", types, proxies=not writing)
        pairs = " OR ".join("(v.res_type = ? AND v.res_id = ?)" for _ in chunk)
        rows = await conn.fetch(
            f"SELECT v.res_type, v.res_id FROM resource v WHERE ({pairs}) AND {cond}",
            [*(x for k in chunk for x in k), *params])
        out.update((row[0], row[1]) for row in rows)
    return out


async def _accessible(conn: Connection, ids: Sequence[str], r: Restriction) -> set[str]:
    if not ids:
        return set()
    acc, params = access_sql.accessible(r, "q.column1")
    values = ", ".join("(CAST(? AS TEXT))" for _ in ids)
    rows = await conn.fetch(f"SELECT q.column1 FROM (VALUES {values}) q WHERE {acc}",
                            [*ids, *params])
    return {row[0] for row in rows}


def _stored(row: Sequence[Any], method: str = "") -> StoredResource:
    content = row[5]
    return StoredResource(
        resource_type=row[0],
        id=row[1],
        version=row[2],
        last_updated=row[3],
        deleted=bool(row[4]),
        content=bytes(content) if content is not None else None,
        method=method,
    )


#: a version's ``seq`` in the history (``created_seq``, ``history_seq``), by its key
_SEQ_OF = ("(SELECT seq FROM resource_history WHERE res_type = ? AND res_id = ?"
           " AND version = ?)")
_SQLITE_HISTORY = ("INSERT INTO resource_history (res_type, res_id, version, last_updated,"
                   " method, content) VALUES (?, ?, ?, ?, ?, ?)")
_SQLITE_RESOURCE = (
    "INSERT INTO resource (res_type, res_id, version, last_updated, deleted, content,"
    f" created_seq) VALUES (?, ?, ?, ?, 0, ?, {_SEQ_OF})"
    " ON CONFLICT (res_type, res_id) DO UPDATE SET version = excluded.version,"
    " last_updated = excluded.last_updated, deleted = 0, content = excluded.content")
_SQLITE_DELETED = ("UPDATE resource SET version = ?, last_updated = ?, deleted = 1,"
                   " content = NULL WHERE res_type = ? AND res_id = ?")
#: a deletion as one statement: the version in the history, the current row marked
#: deleted, every index row of the resource gone, the event ($1 type, $2 id,
#: $3 version, $4 last_updated, $5 event id)
_PG_DELETE = (
    "WITH h AS (INSERT INTO resource_history (res_type, res_id, version, last_updated, method,"
    " content) VALUES ($1, $2, $3, $4, 'DELETE', NULL) RETURNING seq),"
    " r AS (UPDATE resource SET version = $3, last_updated = $4, deleted = 1, content = NULL"
    " WHERE res_type = $1 AND res_id = $2), "
    + "".join(f"d{n} AS (DELETE FROM {t} WHERE res_type = $1 AND res_id = $2), "
              for n, t in enumerate(INDEX_TABLES))
    + "o AS (INSERT INTO outbox (event_id, res_type, res_id, version, interaction, ts,"
    " history_seq) SELECT $5, $1, $2, $3, 'delete', $4, seq FROM h) SELECT 1")
_SQLITE_CREATOR = ("INSERT INTO resource_creator (res_type, res_id, organization)"
                   " VALUES (?, ?, ?) ON CONFLICT (res_type, res_id) DO NOTHING")
_SQLITE_EVENT = ("INSERT INTO outbox (event_id, res_type, res_id, version, interaction, ts,"
                 f" history_seq) VALUES (?, ?, ?, ?, ?, ?, {_SEQ_OF})")


def _sqlite_steps(puts: Sequence[_Put], audits: Sequence[AuditRecord]) -> list[Step]:
    """The statements of ``puts`` and ``audits`` on SQLite, in order: per put its
    history version, the current resource, the index rows that go and those that
    come, its creator and its event."""
    steps: list[Step] = []
    for p in puts:
        key = (p.res_type, p.res_id)
        version_key = (*key, p.version)
        steps.append((_SQLITE_HISTORY, (*version_key, p.updated, p.method, p.content), False))
        steps.append((_SQLITE_RESOURCE,
                      (*version_key, p.updated, p.content, *version_key), False))
        for table, sql in _DELETE_INDEX.items():
            if table in p.stale and p.stale[table] is None:
                steps.append((sql, key, False))
            elif params := p.stale.get(table):
                steps.append((f"{sql} AND param = ?", [(*key, n) for n in params], True))
        if p.creator is not None:
            steps.append((_SQLITE_CREATOR, (*key, p.creator), False))
        for table, table_rows in p.rows.items():
            if table_rows:
                steps.append((_INSERT_INDEX[table], [(*key, *r) for r in table_rows], True))
        steps.append((_SQLITE_EVENT, (p.event_id, *version_key, p.interaction, p.updated,
                                      *version_key), False))
    if audits:
        sql, rows = append_audit_rows(audits)
        steps.append((sql, rows, True))
    return steps


class _Transaction:
    """A unit of work. Puts wait in ``_pending`` and go out together: on PostgreSQL
    as one statement (one round trip for a whole Bundle), on SQLite as one call to
    the database's thread (:meth:`gateway.storage.db._SqliteTransaction.batch`).
    Anything that touches the database sends them first, so the transaction
    always sees its own writes."""

    def __init__(self, conn: Connection, indexer: Indexer) -> None:
        self.conn = conn
        self.indexer = indexer
        self._pending: dict[tuple[str, str], _Put] = {}
        #: audit records (PostgreSQL) going out with the pending writes
        self._audits: list[AuditRecord] = []

    async def _flush(self, last: bool = False) -> None:
        """Send the pending writes (and audit records) as one statement; ``last``: the
        transaction's final statement (alone, without BEGIN/COMMIT, if it is the only one)."""
        if not self._pending and not self._audits:
            return
        puts = list(self._pending.values())
        self._pending.clear()
        audits, self._audits = self._audits, []
        if self.conn.dialect != "postgresql":
            await self.conn.batch(_sqlite_steps(puts, audits), last=last)  # type: ignore[attr-defined]
            return
        params: list[Any]
        if len(puts) == 1:
            p = puts[0]
            tables = _filled(p.rows)
            stale = tuple((t, p.stale[t] is not None) for t in INDEX_TABLES if t in p.stale)
            sql = _pg_put_sql(tables, stale, bool(audits), first=p.version == 1,
                              creator=p.creator is not None)
            params = [p.res_type, p.res_id, p.version, p.updated, p.method, p.content,
                      p.event_id, p.interaction, *(() if p.creator is None else (p.creator,)),
                      *(list(p.stale[t] or ()) for t, by_param in stale if by_param),
                      *_json_rows(p.rows, tables)]
        elif puts:
            tables = tuple(t for t in INDEX_TABLES if any(p.rows.get(t) for p in puts))
            gone = tuple(t for t in INDEX_TABLES if any(t in p.stale for p in puts))
            sql = _pg_put_many_sql(tables, gone, bool(audits),
                                   all(p.version == 1 for p in puts))
            params = _pg_put_many_params(puts, gone, tables)
        else:
            sql, params = _PG_AUDIT, []
        if audits:
            params += audit_arrays(audits)
        finish = getattr(self.conn, "execute_last", None) if last else None
        await (finish or self.conn.execute)(sql, params)

    async def lock(self, *keys: str) -> None:
        await self._flush()
        await self.conn.lock(*keys)

    async def current(self, resource_type: str, id: str) -> StoredResource | None:
        await self._flush()
        row = await self.conn.fetchrow(
            f"SELECT {_RESOURCE_COLS} FROM resource WHERE res_type = ? AND res_id = ?",
            (resource_type, id),
        )
        return _stored(row) if row else None

    async def search_keys(
        self, query: SearchQuery, limit: int, restriction: Restriction | None = None
    ) -> list[tuple[str, str]]:
        await self._flush()
        restrict = _restrict(restriction, _types(query))
        driver, bound = await search_sql.plan(self.conn, query, limit, restrict)
        sql, params = search_sql.select_ids(query, self.conn.dialect, limit, restrict,
                                            driver=driver, bound=bound)
        return [(r[0], r[1]) for r in await self.conn.fetch(sql, params)]

    async def visible(
        self, keys: Sequence[tuple[str, str]], restriction: Restriction, *,
        writing: bool = False,
    ) -> set[tuple[str, str]]:
        await self._flush()
        return await _visible(self.conn, keys, restriction, writing)

    async def accessible(self, ids: Sequence[str], restriction: Restriction) -> set[str]:
        await self._flush()
        return await _accessible(self.conn, ids, restriction)

    async def referring(self, target_type: str, target_id: str,
                        limit: int) -> list[tuple[str, str]]:
        await self._flush()
        rows = await self.conn.fetch(
            "SELECT DISTINCT res_type, res_id FROM sp_reference WHERE target_id = ?"
            " AND target_type = ? ORDER BY res_type, res_id LIMIT ?",
            (target_id, target_type, limit))
        return [(str(r[0]), str(r[1])) for r in rows]

    async def append_audit(self, records: Sequence[AuditRecord]) -> None:
        self._audits.extend(records)  # with the writes

    async def put(
        self,
        resource_type: str,
        id: str,
        resource: dict[str, Any],
        method: str,
        previous: StoredResource | None,
        *,
        creator: str | None = None,
    ) -> StoredResource:
        version = previous.version + 1 if previous else 1
        updated = now_micros()
        if previous and updated <= previous.last_updated:
            updated = previous.last_updated + 1000
        meta = resource.get("meta")
        if not isinstance(meta, dict):
            meta = {}
        # resourceType, id and meta lead, and versionId and lastUpdated lead meta, as
        # servers conventionally write them (whatever order the client sent)
        rest = [(k, v) for k, v in resource.items() if k not in _LEADING]
        resource.clear()
        resource["resourceType"] = resource_type
        resource["id"] = id
        resource["meta"] = {
            "versionId": str(version),
            "lastUpdated": instant(updated),
            **{k: v for k, v in meta.items() if k not in ("versionId", "lastUpdated")},
        }
        resource.update(rest)
        content = fjson.dumps(resource)
        interaction = "create" if version == 1 or (
            previous is not None and previous.deleted) else "update"
        stale, rows = _index_change(self.indexer, previous, self.indexer.extract(resource))
        key = (resource_type, id)
        if key in self._pending or len(self._pending) >= MAX_PENDING:
            await self._flush()
        self._pending[key] = _Put(
            resource_type, id, version, updated, method, content,
            creator if previous is None else None, str(uuid.uuid4()), interaction,
            stale, rows)
        return StoredResource(resource_type, id, version, updated, False, content, method)

    async def delete(self, previous: StoredResource) -> StoredResource:
        await self._flush()
        version = previous.version + 1
        updated = max(now_micros(), previous.last_updated + 1000)
        rt, id = previous.resource_type, previous.id
        event_id = str(uuid.uuid4())
        if self.conn.dialect == "postgresql":
            await self.conn.execute(_PG_DELETE, (rt, id, version, updated, event_id))
        else:
            await self.conn.batch([  # type: ignore[attr-defined]
                (_SQLITE_HISTORY, (rt, id, version, updated, "DELETE", None), False),
                (_SQLITE_DELETED, (version, updated, rt, id), False),
                *((sql, (rt, id), False) for sql in _DELETE_INDEX.values()),
                (_SQLITE_EVENT, (event_id, rt, id, version, "delete", updated, rt, id, version),
                 False),
            ])
        return StoredResource(rt, id, version, updated, True, None, "DELETE")

    async def version(self, resource_type: str, id: str, version: int) -> StoredResource | None:
        await self._flush()
        row = await self.conn.fetchrow(
            "SELECT res_type, res_id, version, last_updated, content IS NULL, content, method"
            " FROM resource_history WHERE res_type = ? AND res_id = ? AND version = ?",
            (resource_type, id, version),
        )
        return _stored(row, row[6]) if row else None

    async def rewrite(self, stored: StoredResource, resource: dict[str, Any], *,
                      current: bool) -> StoredResource:
        await self._flush()
        rt, id = stored.resource_type, stored.id
        content = fjson.dumps(resource)
        await self.conn.execute(
            "UPDATE resource_history SET content = ? WHERE res_type = ? AND res_id = ?"
            " AND version = ?", (content, rt, id, stored.version))
        if current:
            await self.conn.execute(
                "UPDATE resource SET content = ? WHERE res_type = ? AND res_id = ?"
                " AND version = ?", (content, rt, id, stored.version))
            await self._clear_index(rt, id)
            for table, table_rows in self.indexer.extract(resource).items():
                if table_rows:
                    await self.conn.executemany(
                        _INSERT_INDEX[table], [(rt, id, *r) for r in table_rows])
        return replace(stored, content=content)

    async def _clear_index(self, rt: str, id: str,
                           stale: dict[str, tuple[str, ...] | None] | None = None) -> None:
        """Delete the resource's index rows: all, or those ``stale`` names (see _Put)."""
        for table, sql in _DELETE_INDEX.items():
            if stale is None or (table in stale and stale[table] is None):
                await self.conn.execute(sql, (rt, id))
            elif params := stale.get(table):
                await self.conn.executemany(f"{sql} AND param = ?",
                                            [(rt, id, param) for param in params])


class _Within:
    """A :class:`Database` whose every read and write goes through one open
    transaction, after its pending writes (:meth:`SqlStore.within`)."""

    def __init__(self, tx: _Transaction, dialect: str) -> None:
        self._tx = tx
        self.dialect = dialect

    async def open(self) -> None:
        raise RuntimeError("a transaction's view is opened with the transaction")

    async def close(self) -> None:
        raise RuntimeError("a transaction's view is closed with the transaction")

    async def analyze(self, tables: Sequence[str]) -> int:
        raise RuntimeError("statistics are refreshed on the database, not in a transaction")

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Connection]:
        await self._tx._flush()
        yield self._tx.conn

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        await self._tx._flush()
        yield self._tx.conn


class SqlStore:
    """:class:`~gateway.storage.interface.Store` over SQLite or PostgreSQL."""

    def __init__(self, db: Database, indexer: Indexer) -> None:
        self.db = db
        self.indexer = indexer

    @property
    def dialect(self) -> str:
        return self.db.dialect

    async def open(self) -> None:
        await self.db.open()
        await migrate(self.db)

    async def close(self) -> None:
        await self.db.close()

    def within(self, tx: Any) -> SqlStore:
        """This store as seen from inside ``tx``, one of its open transactions:
        reads (searches, history…) see what ``tx`` wrote so far, and commit or roll
        back with it. For the reads of a transaction Bundle."""
        if not isinstance(tx, _Transaction):
            raise TypeError(f"not a transaction of this store: {type(tx).__name__}")
        view = copy.copy(self)
        view.db = _Within(tx, self.db.dialect)
        return view

    async def run(self, work: Callable[[_Transaction], Awaitable[T]]) -> T:
        # inside a transaction (an operation that writes, run by a transaction Bundle,
        # :meth:`within`): its writes are part of that transaction, which commits them
        # or not; they must not end it (on SQLite the last call commits), and a lost
        # race is that transaction's to retry
        nested = isinstance(self.db, _Within)
        for attempt in range(MAX_ATTEMPTS):
            try:
                async with self.db.transaction() as conn:
                    tx = _Transaction(conn, self.indexer)
                    result = await work(tx)
                    await tx._flush(last=not nested)
                    return result
            except RetryableError:
                if nested:
                    raise
                if attempt == MAX_ATTEMPTS - 1:
                    break
            except Exception as exc:
                if _is_retryable(exc) and attempt < MAX_ATTEMPTS - 1 and not nested:
                    continue
                raise
        raise FhirError(Code.CONCURRENT_CONFLICT, "the transaction kept losing races")

    async def reindex(
        self, resource_type: str | None = None, *, bases: tuple[str, ...] = (),
        batch: int = 500, progress: Callable[[int], None] | None = None,
    ) -> int:
        """Rebuild the search index of the current resources (of one type, or all)
        from their stored content, ``batch`` resources per transaction; how many.

        For a change in what is indexed (new search parameters, schema 22).
        Content, versions and history stay as they are. References into
        ``bases`` (each ending in ``/``) are indexed as this server's, as
        :func:`gateway.fhir.references.localize` would have stored them."""
        done, after = 0, ("", "")
        while True:
            for attempt in range(MAX_ATTEMPTS):
                try:
                    keys = await self._reindex_batch(resource_type, after, bases, batch)
                    break
                except RetryableError:  # a deadlock with a writer: this batch again
                    if attempt == MAX_ATTEMPTS - 1:
                        raise
            if not keys:
                return done
            done += len(keys)
            after = keys[-1]
            if progress is not None:
                progress(done)

    async def _reindex_batch(self, resource_type: str | None, after: tuple[str, str],
                             bases: tuple[str, ...], batch: int) -> list[tuple[str, str]]:
        """One batch of :meth:`reindex`: the keys after ``after``, reindexed."""
        where = "deleted = 0 AND (res_type > ? OR (res_type = ? AND res_id > ?))"
        params: list[Any] = [after[0], after[0], after[1]]
        if resource_type is not None:
            where += " AND res_type = ?"
            params.append(resource_type)
        async with self.db.transaction() as conn:
            keys = [(str(r[0]), str(r[1])) for r in await conn.fetch(
                f"SELECT res_type, res_id FROM resource WHERE {where}"
                " ORDER BY res_type, res_id LIMIT ?", (*params, batch))]
            if not keys:
                return keys
            # the writers' per-resource locks, then the content as it is now: a write
            # either committed before (and is indexed here) or waits for this batch
            await conn.lock(*(f"{t}/{i}" for t, i in keys))
            rows = await conn.fetch(
                "SELECT res_type, res_id, content FROM resource WHERE deleted = 0 AND"
                f" (res_type, res_id) IN ({', '.join('(?, ?)' for _ in keys)})",
                [v for key in keys for v in key])
            index: dict[str, list[tuple[Any, ...]]] = {t: [] for t in INDEX_TABLES}
            for rt, rid, content in rows:
                resource = fjson.loads(bytes(content))
                localize(resource, bases)
                for table, table_rows in self.indexer.extract(resource).items():
                    index[table].extend((rt, rid, *r) for r in table_rows)
            for table in INDEX_TABLES:
                await conn.executemany(_DELETE_INDEX[table], keys)
                await conn.executemany(_INSERT_INDEX[table], index[table])
        return keys

    async def read(self, resource_type: str, id: str) -> StoredResource | None:
        async with self.db.read() as conn:
            row = await conn.fetchrow(
                f"SELECT {_RESOURCE_COLS} FROM resource WHERE res_type = ? AND res_id = ?",
                (resource_type, id),
            )
        return _stored(row) if row else None

    async def vread(self, resource_type: str, id: str, version: int) -> StoredResource | None:
        async with self.db.read() as conn:
            row = await conn.fetchrow(
                "SELECT res_type, res_id, version, last_updated, content IS NULL, content, method"
                " FROM resource_history WHERE res_type = ? AND res_id = ? AND version = ?",
                (resource_type, id, version),
            )
        return _stored(row, row[6]) if row else None

    async def visible(
        self, keys: Sequence[tuple[str, str]], restriction: Restriction, *,
        writing: bool = False,
    ) -> set[tuple[str, str]]:
        """The keys ``restriction`` may see (current state of the compartment);
        ``writing``: may write, which an access proxy does not grant."""
        if not keys:
            return set()
        async with self.db.read() as conn:
            return await _visible(conn, keys, restriction, writing)

    async def accessible(self, ids: Sequence[str], restriction: Restriction) -> set[str]:
        async with self.db.read() as conn:
            return await _accessible(conn, ids, restriction)

    async def read_many(self, keys: Sequence[tuple[str, str]]) -> list[StoredResource]:
        """Current, non-deleted versions of ``keys``, in the order given."""
        if not keys:
            return []
        found: dict[tuple[str, str], StoredResource] = {}
        async with self.db.read() as conn:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                cond = " OR ".join("(res_type = ? AND res_id = ?)" for _ in chunk)
                params = [v for k in chunk for v in k]
                for row in await conn.fetch(
                    f"SELECT {_RESOURCE_COLS} FROM resource WHERE deleted = 0 AND ({cond})",
                    params,
                ):
                    s = _stored(row)
                    found[(s.resource_type, s.id)] = s
        return [found[k] for k in keys if k in found]

    async def search_keys(
        self, query: SearchQuery, limit: int, restriction: Restriction | None = None
    ) -> list[tuple[str, str]]:
        restrict = _restrict(restriction, _types(query))
        async with self.db.read() as conn:
            driver, bound = await search_sql.plan(conn, query, limit, restrict)
            sql, params = search_sql.select_ids(query, self.dialect, limit, restrict,
                                                driver=driver, bound=bound)
            return [(r[0], r[1]) for r in await conn.fetch(sql, params)]

    async def search_resources(
        self, query: SearchQuery, limit: int, restriction: Restriction | None = None
    ) -> list[StoredResource]:
        restrict = _restrict(restriction, _types(query))
        async with self.db.read() as conn:
            driver, bound = await search_sql.plan(conn, query, limit, restrict)
            sql, params = search_sql.select_ids(query, self.dialect, limit, restrict,
                                                columns=_MATCH_COLS, driver=driver,
                                                bound=bound)
            return [_stored(row) for row in await conn.fetch(sql, params)]

    async def count(self, query: SearchQuery, restriction: Restriction | None = None) -> int:
        async with self.db.read() as conn:
            sql, params = search_sql.count(query, self.dialect,
                                           _restrict(restriction, _types(query)),
                                           driver=await search_sql.choose_driver(conn, query))
            row = await conn.fetchrow(sql, params)
        return int(row[0]) if row else 0

    async def token_codes(self, resource_type: str | None, param: str, limit: int,
                          restriction: Restriction | None = None) -> list[tuple[str, str]]:
        where = "x.param = ? AND x.system IS NOT NULL AND x.code IS NOT NULL"
        params: list[Any] = [param]
        if resource_type is not None:
            where = "x.res_type = ? AND " + where
            params.insert(0, resource_type)
        join = ""
        if restriction is not None:  # (which codes are in use tells of the data)
            cond, vis = access_sql.visible(
                restriction, "v", [resource_type] if resource_type is not None else None)
            join = " JOIN resource v ON v.res_type = x.res_type AND v.res_id = x.res_id"
            where, params = f"{where} AND {cond}", [*params, *vis]
        async with self.db.read() as conn:
            rows = await conn.fetch(
                f"SELECT DISTINCT x.system, x.code FROM sp_token x{join} WHERE {where}"
                " LIMIT ?", [*params, limit])
        return [(str(r[0]), str(r[1])) for r in rows]

    async def meta_summary(
        self, types: Sequence[str] | None, limit: int, restriction: Restriction | None = None,
    ) -> tuple[list[str], list[tuple[str | None, str]], list[tuple[str | None, str]]]:
        where, params = "1 = 1", []
        if types is not None:
            where = f"x.res_type IN ({', '.join('?' for _ in types)})" if types else "1 = 0"
            params = list(types)
        join = ""
        if restriction is not None:
            cond, vis = access_sql.visible(restriction, "v", types)
            join = " JOIN resource v ON v.res_type = x.res_type AND v.res_id = x.res_id"
            where, params = f"{where} AND {cond}", [*params, *vis]
        async with self.db.read() as conn:
            tokens = await conn.fetch(
                f"SELECT DISTINCT x.param, x.system, x.code FROM sp_token x{join}"
                f" WHERE x.param IN ('_tag', '_security') AND x.code IS NOT NULL AND {where}"
                " ORDER BY 1, 2, 3 LIMIT ?", [*params, limit])
            uris = await conn.fetch(
                f"SELECT DISTINCT x.value FROM sp_uri x{join}"
                f" WHERE x.param = '_profile' AND {where} ORDER BY 1 LIMIT ?", [*params, limit])
        profiles = [str(r[0]) for r in uris]
        versioned = {p.split("|", 1)[0] for p in profiles if "|" in p}
        # the index holds a versioned canonical also without its version
        # (search.html#versions): list it once, as written
        profiles = [p for p in profiles if "|" in p or p not in versioned]
        tags = [(r[1], str(r[2])) for r in tokens if r[0] == "_tag"]
        labels = [(r[1], str(r[2])) for r in tokens if r[0] == "_security"]
        return profiles, tags, labels

    async def referrers(self, target_type: str, target_id: str) -> set[tuple[str, str]]:
        async with self.db.read() as conn:
            rows = await conn.fetch(
                "SELECT DISTINCT res_type, param FROM sp_reference"
                " WHERE target_id = ? AND target_type = ?", (target_id, target_type))
        return {(str(r[0]), str(r[1])) for r in rows}

    async def includes(
        self, query: SearchQuery, matches: list[tuple[str, str]], limit: int,
        restriction: Restriction | None = None, types: Collection[str] | None = None,
    ) -> list[tuple[str, str]]:
        async with self.db.read() as conn:
            return await search_sql.resolve_includes(conn, query, matches, limit,
                                                     _restrict(restriction), types)

    async def audit_records(
        self, *, after: int, limit: int, patient: str | None,
        restriction: Restriction | None, client_id: str | None,
    ) -> list[tuple[int, bytes]]:
        return await audit_records(self.db, after=after, limit=limit, patient=patient,
                                   restriction=restriction, client_id=client_id)

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        await snapshots.save(self.db, snapshot, now_micros())

    async def last_version(self) -> int:
        async with self.db.read() as conn:
            row = await conn.fetchrow("SELECT MAX(seq) FROM resource_history")
        return int(row[0]) if row and row[0] is not None else 0

    async def extend_snapshot(self, snapshot: Snapshot, more: Sequence[tuple[str, str]], *,
                              complete: bool, truncated: bool) -> bool:
        return await snapshots.extend(self.db, snapshot, more, complete=complete,
                                      truncated=truncated)

    async def load_snapshot(self, search_id: str, start: int = 0,
                            stop: int | None = None) -> Snapshot | None:
        return await snapshots.load(self.db, search_id, start, stop)

    async def versions_mark(self, types: Sequence[str]) -> tuple[int, int]:
        if not types:
            return 0, 0
        async with self.db.read() as conn:  # over the history_type index
            row = await conn.fetchrow(
                "SELECT count(*), coalesce(max(seq), 0) FROM resource_history"
                f" WHERE res_type IN ({', '.join('?' for _ in types)})", list(types))
        return (int(row[0]), int(row[1])) if row else (0, 0)

    async def last_changed(self, types: Sequence[str]) -> int | None:
        if not types:
            return None
        async with self.db.read() as conn:  # the newest position, over history_type
            row = await conn.fetchrow(
                "SELECT last_updated FROM resource_history"
                f" WHERE res_type IN ({', '.join('?' for _ in types)})"
                " ORDER BY seq DESC LIMIT 1", list(types))
        return int(row[0]) if row else None

    async def history(
        self,
        resource_type: str | None,
        id: str | None,
        *,
        since: int | None,
        at: tuple[int, int] | None,
        before: int | None,
        limit: int,
        restriction: Restriction | None = None,
        types: Sequence[str] | None = None,
        listed: Collection[Listed] | None = None,
        offset: int = 0,
    ) -> HistoryPage:
        if resource_type is not None:
            types = [resource_type]
        if types is not None and listed is not None:
            listed = [x for x in listed if x[0] in types]
        if (types is not None and not types) or (listed is not None and not listed):
            return HistoryPage([], None, 0)
        counts = before is None and (restriction is None or id is not None)
        async with self.db.read() as conn:
            after = (None if since is None or id is not None
                     else await changed_after(conn, since, before))
            if after == NOTHING:  # nothing at all changed since
                return HistoryPage([], None, 0 if counts else None)
            (sql, params), (count_sql, count_params) = history_sql(
                types, id, since=since, at=at, before=before, limit=limit,
                restriction=restriction, after=after, listed=listed, offset=offset)
            rows = await conn.fetch(sql, params)
            total = None
            # the first page counts all versions, unless that would mean judging every
            # version of a type (or of all) for an organisation's client: 0.9 s for the
            # 60,000 Observation versions of a 100,000-resource database, against 3 ms
            # for the page itself (Bundle.total is optional in a history)
            if counts:
                row = await conn.fetchrow(count_sql, count_params)
                total = int(row[0]) if row else 0
        more = len(rows) > limit
        rows = rows[:limit]
        entries = [replace(_stored(r, r[6]), created=bool(r[8])) for r in rows]
        return HistoryPage(entries, int(rows[-1][7]) if more and rows else None, total)


def history_sql(
    types: Sequence[str] | None,
    id: str | None,
    *,
    since: int | None,
    at: tuple[int, int] | None,
    before: int | None,
    limit: int,
    restriction: Restriction | None = None,
    after: int | None = None,
    listed: Collection[Listed] | None = None,
    offset: int = 0,
) -> tuple[tuple[str, list[Any]], tuple[str, list[Any]]]:
    """A history page's statement (``limit`` + 1 versions, newest first, older than
    ``before``) and the statement counting every version it pages through.
    ``after``: no version of the page is older than this one (:func:`changed_after`).
    ``listed``: the versions of these resources only (not empty)."""
    where: list[str] = []
    params: list[Any] = []
    if listed is not None:
        cond, lparams = _listed_sql(listed)
        where.append(cond)
        params.extend(lparams)
    if restriction is not None:
        # versions of resources the caller may see now (deleted ones: by their creator)
        cond, cparams = access_sql.visible(restriction, "hv", types)
        where.append("EXISTS (SELECT 1 FROM resource hv WHERE hv.res_type = h.res_type"
                     f" AND hv.res_id = h.res_id AND {cond})")
        params.extend(cparams)
    if types is not None:
        where.append(f"h.res_type IN ({', '.join('?' for _ in types)})")
        params.extend(types)
    if id is not None:
        where.append("h.res_id = ?")
        params.append(id)
    if since is not None:  # over history_updated: what changed since, not every version
        where.append("h.last_updated >= ?")
        params.append(since)
    if at is not None:
        # versions current at some moment of the period [lo, hi]: written by hi, and not
        # replaced before lo. A resource's versions are written in time order (the store
        # keeps each version's time after its predecessor's), so the next version alone
        # tells: one probe of the primary key, where "any later version" compared every
        # pair of a resource's versions (3,000 versions: 4.5 s on PostgreSQL)
        where.append("h.last_updated <= ?")
        params.append(at[1])
        where.append(
            "NOT EXISTS (SELECT 1 FROM resource_history h2 WHERE h2.res_type = h.res_type"
            " AND h2.res_id = h.res_id AND h2.version = h.version + 1"
            " AND h2.last_updated < ?)"
        )
        params.append(at[0])
    if after is not None:
        where.append("h.seq >= ?")
        params.append(after)
    counted = f"SELECT count(*) FROM resource_history h{_where(where)}", list(params)
    if before is not None:
        where.append("h.seq < ?")
        params.append(before)
    page = (
        "SELECT h.res_type, h.res_id, h.version, h.last_updated, h.content IS NULL,"
        " h.content, h.method, h.seq, h.version = 1 OR EXISTS (SELECT 1 FROM"
        " resource_history hp WHERE hp.res_type = h.res_type AND hp.res_id = h.res_id"
        " AND hp.version = h.version - 1 AND hp.content IS NULL)"
        f" FROM resource_history h{_where(where)} ORDER BY h.seq DESC LIMIT ?"
    )
    if offset:
        return (page + " OFFSET ?", [*params, limit + 1, offset]), counted
    return (page, [*params, limit + 1]), counted


def _listed_sql(listed: Collection[Listed]) -> tuple[str, list[Any]]:
    """The versions of ``listed`` (all of a resource's, or the one named), by type."""
    by_type: dict[str, tuple[list[str], list[tuple[str, int]]]] = {}
    for rtype, id, version in listed:
        ids, versions = by_type.setdefault(rtype, ([], []))
        if version is None:
            ids.append(id)
        else:
            versions.append((id, version))
    ors: list[str] = []
    params: list[Any] = []
    for rtype, (ids, versions) in by_type.items():
        alts = [f"h.res_id IN ({', '.join('?' for _ in ids)})"] if ids else []
        alts += ["(h.res_id = ? AND h.version = ?)" for _ in versions]
        ors.append(f"(h.res_type = ? AND ({' OR '.join(alts)}))")
        params += [rtype, *ids, *(x for pair in versions for x in pair)]
    return f"({' OR '.join(ors)})", params


#: most versions :func:`changed_after` reads to bound a page of ``_history?_since=``
SINCE_PROBE = 5000
#: :func:`changed_after`: no version at all
NOTHING = -1


async def changed_after(conn: Connection, since: int, before: int | None) -> int | None:
    """The oldest version (``seq``) written at or after ``since`` (and before
    ``before``), read over ``history_updated`` when there are at most
    :data:`SINCE_PROBE` of them; ``None`` when there are more, :data:`NOTHING` when
    there are none.

    A page of ``_history?_since=`` is the newest versions since then: walked newest
    first, it stops as soon as it has them, unless fewer are left than it wants. A
    poll that finds little new was that case, and walked every older version
    looking for more (SQLite's planner always walks; PostgreSQL's too under a
    generic plan). Bounded by this version, such a page reads what changed. Times
    and positions are not in the same order (a transaction takes its time before
    its position), so the bound is the least position of those times, not a
    position found by time."""
    row = await conn.fetchrow(
        "SELECT count(*), min(seq) FROM (SELECT seq FROM resource_history"
        f" WHERE last_updated >= ?{'' if before is None else ' AND seq < ?'}"
        " ORDER BY last_updated LIMIT ?) AS changed",
        [since, *([] if before is None else [before]), SINCE_PROBE + 1])
    if row is None or int(row[0]) > SINCE_PROBE:
        return None
    return NOTHING if row[1] is None else int(row[1])


def _where(conditions: Sequence[str]) -> str:
    return f" WHERE {' AND '.join(conditions)}" if conditions else ""


def _types(query: SearchQuery) -> list[str] | None:
    if query.resource_type is not None:
        return [query.resource_type]
    return list(query.types) if query.types else None


def _is_retryable(exc: Exception) -> bool:
    text = str(exc).lower()
    return "database is locked" in text or "deadlock detected" in text
