"""Tables of the security layer: registered clients, assertion ids seen,
the gateway's signing keys, and the hash-chained audit log.

The audit log is append-only and hash-chained: ``audit_chain`` gives each
record a position and the SHA-256 of the previous link and the record's
bytes, so altering or removing a record breaks the chain (``carepath audit
verify``).

Requests append their records without waiting for one another (in the
write's own transaction, or grouped for reads); a chainer links committed
records afterwards, one at a time across all processes, in the outbox's
commit-safe order (``tx_id``, ``seq``; see :mod:`gateway.storage.outbox`).
Chaining right at append time would put every write of every process behind
one lock held until commit. The price is a short window, normally well under
a second, in which a committed record is not yet linked.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.storage.access_sql import accessible
from gateway.storage.db import Connection, Database
from gateway.storage.interface import Restriction
from gateway.storage.outbox import START, Position, read_final

GENESIS = "0" * 64
AUDIT_LOCK = "carepath:audit"


def _now() -> int:
    return int(time.time() * 1_000_000)


@dataclass(frozen=True, slots=True)
class Client:
    client_id: str
    organization: str  # Organization id (no "Organization/")
    jwks: str  # JSON text
    jwks_url: str | None
    scope: str
    active: bool


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """What to append; ``record`` is the AuditEvent JSON bytes."""

    record: bytes
    client_id: str | None
    patient: str | None
    outcome: str


async def add_client(db: Database, client: Client) -> None:
    async with db.transaction() as conn:
        await conn.execute("DELETE FROM auth_client WHERE client_id = ?", (client.client_id,))
        await conn.execute(
            "INSERT INTO auth_client (client_id, organization, jwks, jwks_url, scope, created,"
            " active) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (client.client_id, client.organization, client.jwks, client.jwks_url, client.scope,
             _now(), int(client.active)),
        )


async def get_client(db: Database, client_id: str) -> Client | None:
    async with db.read() as conn:
        row = await conn.fetchrow(
            "SELECT client_id, organization, jwks, jwks_url, scope, active FROM auth_client"
            " WHERE client_id = ?", (client_id,))
    if row is None:
        return None
    return Client(row[0], row[1], row[2], row[3], row[4], bool(row[5]))


async def list_clients(db: Database) -> list[Client]:
    async with db.read() as conn:
        rows = await conn.fetch(
            "SELECT client_id, organization, jwks, jwks_url, scope, active FROM auth_client"
            " ORDER BY client_id")
    return [Client(r[0], r[1], r[2], r[3], r[4], bool(r[5])) for r in rows]


async def set_client_active(db: Database, client_id: str, active: bool) -> bool:
    """Enable or disable a client; False when there is none of that id."""
    async with db.transaction() as conn:
        if not await conn.fetchrow("SELECT 1 FROM auth_client WHERE client_id = ?",
                                   (client_id,)):
            return False
        await conn.execute("UPDATE auth_client SET active = ? WHERE client_id = ?",
                           (int(active), client_id))
    return True


async def remove_client(db: Database, client_id: str) -> bool:
    """Forget a client; False when there is none of that id."""
    async with db.transaction() as conn:
        if not await conn.fetchrow("SELECT 1 FROM auth_client WHERE client_id = ?",
                                   (client_id,)):
            return False
        await conn.execute("DELETE FROM auth_client WHERE client_id = ?", (client_id,))
    return True


async def count_clients(db: Database) -> int:
    """Registered clients, disabled ones too: disabling the last one must not turn a
    gateway on loopback into an open one (dev mode)."""
    async with db.read() as conn:
        row = await conn.fetchrow("SELECT count(*) FROM auth_client")
    return int(row[0]) if row else 0


async def remember_jti(db: Database, jti: str, client_id: str, expires: int) -> bool:
    """Record an assertion id; False when it was seen before (a replay)."""
    async with db.transaction() as conn:
        await conn.lock(f"jti:{jti}")
        await conn.execute("DELETE FROM auth_jti WHERE expires < ?", (_now(),))
        if await conn.fetchrow("SELECT 1 FROM auth_jti WHERE jti = ?", (jti,)):
            return False
        await conn.execute("INSERT INTO auth_jti (jti, client_id, expires) VALUES (?, ?, ?)",
                           (jti, client_id, expires))
    return True


async def signing_key(db: Database, make: Any) -> tuple[str, str]:
    """The newest (kid, private PEM); ``make()`` creates one when there is none."""
    async with db.transaction() as conn:
        await conn.lock("carepath:signing-key")
        row = await conn.fetchrow(
            "SELECT kid, private_pem FROM auth_key ORDER BY created DESC LIMIT 1")
        if row is not None:
            return row[0], row[1]
        kid, pem = make()
        await conn.execute("INSERT INTO auth_key (kid, private_pem, created) VALUES (?, ?, ?)",
                           (kid, pem, _now()))
        return kid, pem


def chain_hash(prev: str, record: bytes) -> str:
    return hashlib.sha256(prev.encode() + b"\n" + record).hexdigest()


_APPEND = ("INSERT INTO audit_log (recorded, client_id, patient, outcome, record)"
           " VALUES (?, ?, ?, ?, ?)")


def append_audit_cte(first: int) -> str:
    """``_APPEND`` as a data-modifying CTE (PostgreSQL) over :func:`audit_arrays`,
    parameters ``$first`` to ``$first + 4``: part of a statement that writes more."""
    return ("a AS (INSERT INTO audit_log (recorded, client_id, patient, outcome, record)"
            f" SELECT * FROM unnest(${first}::bigint[], ${first + 1}::text[],"
            f" ${first + 2}::text[], ${first + 3}::text[], ${first + 4}::bytea[]))")


def audit_arrays(records: Sequence[AuditRecord]) -> list[list[Any]]:
    """The parameters of :func:`append_audit_cte`."""
    now = _now()
    return [[now] * len(records), [r.client_id for r in records],
            [r.patient for r in records], [r.outcome for r in records],
            [r.record for r in records]]


async def append_audit(conn: Connection, records: Sequence[AuditRecord]) -> None:
    """Append ``records`` inside the caller's transaction (chained after commit)."""
    sql, rows = append_audit_rows(records)
    if len(rows) == 1:
        await conn.execute(sql, rows[0])
    elif rows:
        await conn.executemany(sql, rows)


def append_audit_rows(records: Sequence[AuditRecord]) -> tuple[str, list[tuple[Any, ...]]]:
    """:func:`append_audit`'s statement and its rows, to go out with other writes."""
    now = _now()
    return _APPEND, [(now, r.client_id, r.patient, r.outcome, r.record) for r in records]


#: a batch of records as one statement of its own; the commit need not wait for the
#: WAL flush (``synchronous_commit`` set for this statement's transaction only)
_PG_APPEND_LAZY = (f"WITH s AS (SELECT set_config('synchronous_commit', 'off', true)),"
                   f" {append_audit_cte(1)} SELECT 1 FROM s")
_PG_APPEND_ALONE = f"WITH {append_audit_cte(1)} SELECT 1"


async def append_audit_alone(db: Database, records: Sequence[AuditRecord], *,
                             durable: bool = True) -> None:
    """Append ``records`` in a transaction of their own: on PostgreSQL one statement,
    on SQLite one call to the database's thread (``BEGIN`` to ``COMMIT``).

    ``durable=False``: the commit does not wait for the WAL to reach the disk
    (records of reads; a crash may lose the last few hundred milliseconds)."""
    async with db.transaction() as conn:
        if conn.dialect != "postgresql":
            sql, rows = append_audit_rows(records)
            await conn.batch([(sql, rows, True)], last=True)
            return
        sql = _PG_APPEND_ALONE if durable else _PG_APPEND_LAZY
        await conn.execute_last(sql, audit_arrays(records))


async def chain_pending(db: Database, limit: int = 2000, *, precise: bool = False) -> int:
    """Link committed records that are not chained yet (at most ``limit``); how many.

    ``precise`` waits only for this schema's writers, not for every transaction on
    the server (see :func:`gateway.storage.outbox.read_final`).
    """
    async with db.transaction() as conn:
        await conn.lock(AUDIT_LOCK)
        last = await conn.fetchrow(
            "SELECT pos, tx_id, seq, hash FROM audit_chain ORDER BY pos DESC LIMIT 1")
        pos, after, prev = (
            (int(last[0]), Position(int(last[1]), int(last[2])), str(last[3])) if last
            else (0, START, GENESIS))
        rows, _held = await read_final(conn, "audit_log", "tx_id, seq, record", after, limit,
                                       precise=precise)
        links = []
        for tx_id, seq, record, *_ in rows:
            pos += 1
            digest = chain_hash(prev, _bytes(record))
            links.append((pos, int(tx_id), int(seq), prev, digest))
            prev = digest
        if conn.dialect == "postgresql" and links:
            await conn.execute(_PG_CHAIN, [list(column) for column in zip(*links, strict=True)])
        elif links:
            await conn.executemany(
                "INSERT INTO audit_chain (pos, tx_id, seq, prev_hash, hash) VALUES (?, ?, ?, ?, ?)",
                links)
    return len(links)


#: a batch of links as one statement (PostgreSQL)
_PG_CHAIN = ("INSERT INTO audit_chain (pos, tx_id, seq, prev_hash, hash)"
             " SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[],"
             " $5::text[])")


async def chain_all(db: Database) -> int:
    """Link every record committed so far."""
    total = 0
    while n := await chain_pending(db, precise=True):
        total += n
    return total


@dataclass(frozen=True, slots=True)
class ChainReport:
    records: int
    broken_at: int | None  # seq of the first record that does not verify
    reason: str = ""
    pending: int = 0  # committed records not linked yet (still held back)


#: what a record is filed under besides its bytes: (client_id, patient, outcome)
Filing = tuple[str | None, str | None, str | None]


def _bytes(record: Any) -> bytes:
    # (a record changed by hand in SQLite may have become TEXT)
    return record.encode() if isinstance(record, str) else bytes(record)


async def verify_chain(db: Database, batch: int = 5000,
                       filed_under: Callable[[bytes], Filing] | None = None) -> ChainReport:
    """Link what is committed, then check every link in chain order; with
    ``filed_under`` (what a record says it is filed under), also the columns a
    record is found by (``$audit-log?patient=``), which its hash does not cover."""
    await chain_all(db)
    prev = GENESIS
    last = 0
    count = 0
    async with db.read() as conn:
        while True:
            rows = await conn.fetch(
                "SELECT c.pos, c.seq, c.prev_hash, c.hash, a.record, a.client_id, a.patient,"
                " a.outcome FROM audit_chain c"
                " LEFT JOIN audit_log a ON a.seq = c.seq WHERE c.pos > ?"
                " ORDER BY c.pos LIMIT ?", (last, batch))
            if not rows:
                break
            for pos, seq, prev_hash, digest, record, client, patient, outcome in rows:
                if prev_hash != prev:
                    return ChainReport(count, seq, "previous hash does not match")
                if record is None:
                    return ChainReport(count, seq, "record is missing")
                if chain_hash(prev, _bytes(record)) != digest:
                    return ChainReport(count, seq, "record does not match its hash")
                if filed_under is not None:
                    try:
                        filing = filed_under(_bytes(record))
                    except ValueError:
                        return ChainReport(count, seq, "record is not an AuditEvent")
                    if filing != (client, patient, outcome):
                        return ChainReport(count, seq, "record is filed under another client,"
                                                       " patient or outcome than it names")
                prev = digest
                last = pos
                count += 1
        row = await conn.fetchrow(
            "SELECT count(*) FROM audit_log a WHERE NOT EXISTS"
            " (SELECT 1 FROM audit_chain c WHERE c.seq = a.seq)")
    return ChainReport(count, None, pending=int(row[0]) if row else 0)


async def audit_records(
    db: Database,
    *,
    after: int = 0,
    limit: int = 1000,
    patient: str | None = None,
    restriction: Restriction | None = None,
    client_id: str | None = None,
) -> list[tuple[int, bytes]]:
    """Records in chain order; a restricted caller sees its own client's records and
    those about patients it may see."""
    where = ["seq > ?"]
    params: list[Any] = [after]
    if patient is not None:
        where.append("patient = ?")
        params.append(patient)
    if restriction is not None:
        acc, acc_params = accessible(restriction, "audit_log.patient")
        where.append(f"(client_id = ? OR (patient IS NOT NULL AND {acc}))")
        params += [client_id, *acc_params]
    async with db.read() as conn:
        rows = await conn.fetch(
            f"SELECT seq, record FROM audit_log WHERE {' AND '.join(where)}"
            " ORDER BY seq LIMIT ?", [*params, limit])
    return [(int(r[0]), bytes(r[1])) for r in rows]
