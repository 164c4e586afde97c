"""Store write cost on PostgreSQL, without HTTP: ``python -m bench.store``.

Concurrent writers (``--concurrency`` tasks in one process, the gateway's
asyncpg pool) run for ``--seconds`` each:

* ``floor``: one INSERT of the Patient's JSON bytes per operation, as
  ``bench.floor`` does;
* ``create``: ``SqlStore.run`` putting a new Patient (history, current row,
  search index, outbox: one statement);
* ``update``: ``SqlStore.run`` reading and replacing one of the created
  Patients (its index rows are cleared and rewritten);
* ``transaction``: ``SqlStore.run`` putting a Patient, an Encounter and three
  Observations (the REST benchmark's Bundle, references already resolved).

One JSON line per scenario: operations/s, and CPU milliseconds per operation
of this process (``client``: the store's Python side) and of the PostgreSQL
backends serving its pool (``postgres``). The CPU figures are the ones to
compare: throughput on a shared machine moves with everyone else's load.
A fresh schema is created and dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson

from bench.rest import patient, transaction_bytes
from gateway.registry import Registry
from gateway.storage.db import PostgresDatabase
from gateway.storage.interface import StoreTransaction
from gateway.storage.sql import SqlStore

_TICK = os.sysconf("SC_CLK_TCK")


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _resources(bundle: bytes) -> list[dict[str, Any]]:
    """The Bundle's resources with ids assigned and urn:uuid references resolved."""
    entries = orjson.loads(bundle)["entry"]
    ids = {e["fullUrl"]: f"{e['resource']['resourceType']}/{uuid.uuid4()}" for e in entries}
    text = orjson.dumps([e["resource"] for e in entries]).decode()
    for urn, ref in ids.items():
        text = text.replace(urn, ref)
    out = orjson.loads(text)
    for resource, ref in zip(out, ids.values(), strict=True):
        resource["id"] = ref.split("/", 1)[1]
    return list(out)


async def _measure(name: str, op: Callable[[int], Awaitable[int]], *, concurrency: int,
                   seconds: float, backends: list[int]) -> dict[str, Any]:
    done = 0
    writes = 0
    stop = time.monotonic() + seconds

    async def worker(w: int) -> None:
        nonlocal done, writes
        i = 0
        while time.monotonic() < stop:
            n = await op(w * 10_000_000 + i)
            writes += n
            done += 1
            i += 1

    pg0 = sum(_cpu(p) for p in backends)
    me0 = time.process_time()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    wall = time.perf_counter() - t0
    me = time.process_time() - me0
    pg = sum(_cpu(p) for p in backends) - pg0
    return {"scenario": name, "ops": done, "seconds": round(wall, 3),
            "ops_per_s": round(done / wall, 1), "resources_per_s": round(writes / wall, 1),
            "cpu_ms_per_op": {"client": round(me / done * 1e3, 3),
                              "postgres": round(pg / done * 1e3, 3)}}


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    schema = f"bench_store_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = await asyncpg.connect(args.db)
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    db = PostgresDatabase(args.db, pool_size=args.concurrency, schema=schema)
    store = SqlStore(db, Registry.load().indexer)
    results: list[dict[str, Any]] = []
    try:
        await store.open()
        async with db.transaction() as conn:
            await conn.execute("CREATE TABLE floor (id TEXT PRIMARY KEY, content BYTEA NOT NULL)")
        # every pool connection opened now, so their backends are known
        pool = db._pool
        assert pool is not None
        conns = [await pool.acquire() for _ in range(args.concurrency)]
        backends = [await c.fetchval("SELECT pg_backend_pid()") for c in conns]
        for c in conns:
            await pool.release(c)
        rng = random.Random(args.seed)
        bodies = [patient(args.seed, n) for n in range(200)]
        created: list[str] = []

        async def floor(i: int) -> int:
            content = orjson.dumps(bodies[i % len(bodies)])
            async with pool.acquire() as conn:  # autocommit, as bench.floor
                await conn.execute("INSERT INTO floor (id, content) VALUES ($1, $2)",
                                   str(uuid.uuid4()), content)
            return 1

        async def create(i: int) -> int:
            rid = str(uuid.uuid4())

            async def work(tx: StoreTransaction) -> None:
                await tx.put("Patient", rid, dict(bodies[i % len(bodies)]), "POST", None)

            await store.run(work)
            created.append(rid)
            return 1

        async def update(i: int) -> int:
            rid = created[rng.randrange(len(created))]

            async def work(tx: StoreTransaction) -> None:
                await tx.lock(f"Patient/{rid}")
                current = await tx.current("Patient", rid)
                await tx.put("Patient", rid, dict(bodies[(i + 7) % len(bodies)]), "PUT", current)

            await store.run(work)
            return 1

        async def transaction(i: int) -> int:
            resources = _resources(transaction_bytes(args.seed, i))

            async def work(tx: StoreTransaction) -> None:
                for r in resources:
                    await tx.put(r["resourceType"], r["id"], r, "POST", None)

            await store.run(work)
            return len(resources)

        scenarios = {"floor": floor, "create": create, "update": update,
                     "transaction": transaction}
        for name in args.scenarios.split(","):
            result = await _measure(name, scenarios[name], concurrency=args.concurrency,
                                    seconds=args.seconds, backends=backends)
            results.append(result)
            print(json.dumps(result), flush=True)
    finally:
        await store.close()
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default="postgresql://127.0.0.1/test")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scenarios", default="floor,create,update,transaction,floor",
                        help="comma-separated, in order: floor, create, update, transaction"
                             " (update needs create before it)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
