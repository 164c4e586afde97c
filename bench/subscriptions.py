"""Subscription delivery benchmark: commit → rest-hook latency, beside a Redis floor.

``python -m bench.subscriptions`` starts, on free loopback ports,

* the gateway (``uvicorn gateway.main:create_app``, one worker) on PostgreSQL
  (a fresh schema in ``--db``) with Redis (``--redis``, a fresh key prefix),
* a receiver (a bare ASGI app under uvicorn, its own process) that notes the
  arrival time of every notification-event,

creates 1, 10 and 100 active rest-hook subscriptions on the topic
``encounter-discharge`` (id-only payload), and for each count writes
discharged Encounters at ``--rate`` writes/s for ``--seconds`` s. The latency
of an event is its arrival at the receiver minus its ``timestamp`` in the
notification (the version's ``lastUpdated``, taken in the write transaction
just before the commit, millisecond precision): p50/p99 over every
(subscription, event) pair. A second run per count writes as fast as
``--concurrency`` clients can and reports the sustained write rate and the
delivered events/s (and whether delivery kept up).

The floor: a raw Redis ``XADD`` → ``XREADGROUP`` (blocking) round trip at the
same rate, producer and consumer in this process — the least any Redis-based
delivery could cost. Everything runs on the same machine (on 2 cores the
gateway, PostgreSQL, Redis, the receiver and the load generator share them).

One JSON line per measurement on stdout; ``--record`` appends a table to
``bench/RESULTS.md``. Everything started is stopped and the schema and Redis
keys are removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
TOPIC = "https://carepath-gateway.org/fhir/SubscriptionTopic/encounter-discharge"
BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
ENCOUNTER = orjson.dumps({"resourceType": "Encounter", "status": "finished",
                          "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                    "code": "IMP"}})


# -- the receiver (runs in its own process: uvicorn bench.subscriptions:receiver) ---------

#: (subscription path, focus id, event timestamp, arrival), times in epoch seconds
_ARRIVALS: list[tuple[str, str, float, float]] = []


async def receiver(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """ASGI app: POST /hook/<n> records events; GET /results returns and clears them."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    now = time.time()
    if scope["method"] == "POST":
        bundle = orjson.loads(body)
        for p in bundle["entry"][0]["resource"]["parameter"]:
            if p["name"] == "notification-event":
                parts = {part["name"]: part for part in p["part"]}
                focus = parts["focus"]["valueReference"]["reference"].rsplit("/", 1)[-1]
                stamp = datetime.fromisoformat(parts["timestamp"]["valueInstant"]).timestamp()
                _ARRIVALS.append((scope["path"], focus, stamp, now))
        out = b""
    else:
        out = orjson.dumps(_ARRIVALS)
        _ARRIVALS.clear()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(out)).encode())]})
    await send({"type": "http.response.body", "body": out})


# -- processes ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], within: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited")
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(url, timeout=1)
            return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


@contextlib.contextmanager
def started(args: list[str], env: dict[str, str], probe: str,
            log: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    out = log.open("wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen(args, env={**os.environ, **env}, cwd=ROOT,
                            stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_http(probe, proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def uvicorn(app: str, port: int, factory: bool, workers: int = 1) -> list[str]:
    args = [sys.executable, "-m", "uvicorn", app, "--port", str(port), "--log-level", "warning",
            "--no-access-log", "--loop", "uvloop", "--http", "httptools",
            "--workers", str(workers)]
    return args + (["--factory"] if factory else [])


# -- measurements -------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of a process and its children (Linux /proc)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat.parent.name == str(pid) or fields[1] == str(pid):
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def subscription(endpoint: str) -> bytes:
    return orjson.dumps({
        "resourceType": "Subscription", "status": "requested", "reason": "bench",
        "criteria": TOPIC,
        "channel": {"type": "rest-hook", "endpoint": endpoint, "payload": "application/fhir+json",
                    "_payload": {"extension": [{"url": BACKPORT + "backport-payload-content",
                                                "valueCode": "id-only"}]}},
    })


async def create_subscriptions(base: str, receiver_url: str, count: int) -> list[str]:
    import httpx

    async with httpx.AsyncClient(base_url=base, timeout=30,
                                 headers={"Content-Type": "application/fhir+json"}) as client:
        ids = []
        for i in range(count):
            r = await client.post("/Subscription", content=subscription(f"{receiver_url}/hook/{i}"))
            r.raise_for_status()
            ids.append(r.json()["id"])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            r = await client.get("/Subscription/$status", params={"status": "active"})
            active = {e["resource"]["parameter"][0]["valueReference"]["reference"].rsplit("/")[-1]
                      for e in r.json().get("entry", [])}
            if set(ids) <= active:
                return ids
            await asyncio.sleep(0.2)
        raise RuntimeError("subscriptions did not become active")


async def delete_subscriptions(base: str, ids: list[str]) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        for sid in ids:
            await client.delete(f"/Subscription/{sid}")


async def drive(base: str, rate: float | None, seconds: float,
                concurrency: int) -> dict[str, float]:
    """Write Encounters (at ``rate``/s, or flat out); returns focus id -> ack time.

    ``concurrency`` keep-alive connections of ``bench.rest``'s raw client:
    httpx costs about 1 ms of client CPU per request here, which on two shared
    cores comes out of the gateway's share (see bench/RESULTS.md).
    """
    from bench.rest import RawConnection

    acked: dict[str, float] = {}
    pool: asyncio.Queue[RawConnection] = asyncio.Queue()
    for _ in range(concurrency):
        pool.put_nowait(RawConnection(base))
    start = time.monotonic()
    stop = start + seconds
    sent = 0

    async def one() -> None:
        conn = await pool.get()
        try:
            status, _headers, body = await conn.request("POST", "/Encounter", ENCOUNTER, None)
        finally:
            pool.put_nowait(conn)
        now = time.time()
        if status == 201:
            acked[orjson.loads(body)["id"]] = now

    try:
        if rate is None:
            async def worker() -> None:
                while time.monotonic() < stop:
                    await one()

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            pending: set[asyncio.Task[None]] = set()
            while time.monotonic() < stop:
                due = start + sent / rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(one())
                pending.add(task)
                task.add_done_callback(pending.discard)
                sent += 1
            if pending:
                await asyncio.gather(*pending)
    finally:
        while not pool.empty():
            await pool.get_nowait().close()
    return acked


async def collect(receiver_url: str, expected: int, within: float) -> list[Any]:
    import httpx

    got: list[Any] = []
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(timeout=30) as client:
        while True:
            got += (await client.get(f"{receiver_url}/results")).json()
            if len(got) >= expected or time.monotonic() > deadline:
                return got
            await asyncio.sleep(0.2)


async def latency_run(base: str, receiver_url: str, subs: int, rate: float, seconds: float,
                      concurrency: int, gateway_pid: int) -> dict[str, Any]:
    await collect(receiver_url, 0, 0)  # clear
    cpu = cpu_seconds(gateway_pid)
    started = time.monotonic()
    acked = await drive(base, rate, seconds, concurrency)
    elapsed = time.monotonic() - started
    arrivals = await collect(receiver_url, len(acked) * subs, within=120)
    drained = time.monotonic() - started
    cpu = cpu_seconds(gateway_pid) - cpu
    # from the event's timestamp (taken in the write transaction, just before its commit;
    # millisecond precision) to the arrival at the receiver, both on this machine's clock
    latencies = [(at - stamp) * 1000 for _path, focus, stamp, at in arrivals if focus in acked]
    # from the 201 reaching the client (right after the commit; late when the client lags)
    after_ack = [(at - acked[focus]) * 1000 for _path, focus, _stamp, at in arrivals
                 if focus in acked]
    return {
        "measure": "latency", "subscriptions": subs, "target_rate": rate,
        "writes": len(acked), "writes_per_s": round(len(acked) / elapsed, 1),
        "deliveries": len(latencies), "expected": len(acked) * subs,
        "p50_ms": round(pct(latencies, 0.50), 1), "p99_ms": round(pct(latencies, 0.99), 1),
        "max_ms": round(max(latencies, default=float("nan")), 1),
        "ack_p50_ms": round(pct(after_ack, 0.50), 1), "ack_p99_ms": round(pct(after_ack, 0.99), 1),
        "events_per_s": round(len(latencies) / drained, 1),
        "gateway_cpu_ms_per_write": round(cpu * 1000 / max(1, len(acked)), 2),
        "gateway_cpu_share": round(cpu / drained, 2),
    }


async def throughput_run(base: str, receiver_url: str, subs: int, seconds: float,
                         concurrency: int, gateway_pid: int) -> dict[str, Any]:
    await collect(receiver_url, 0, 0)
    cpu = cpu_seconds(gateway_pid)
    started = time.monotonic()
    acked = await drive(base, None, seconds, concurrency)
    write_time = time.monotonic() - started
    arrivals = await collect(receiver_url, len(acked) * subs, within=300)
    drained = time.monotonic() - started
    cpu = cpu_seconds(gateway_pid) - cpu
    return {
        "measure": "sustained", "subscriptions": subs, "concurrency": concurrency,
        "writes": len(acked), "writes_per_s": round(len(acked) / write_time, 1),
        "deliveries": len(arrivals), "expected": len(acked) * subs,
        "delivered_events_per_s": round(len(arrivals) / drained, 1),
        "drain_after_writes_s": round(drained - write_time, 1),
        "gateway_cpu_ms_per_write": round(cpu * 1000 / max(1, len(acked)), 2),
        "gateway_cpu_share": round(cpu / drained, 2),
    }


async def redis_floor(url: str, rate: float, seconds: float) -> dict[str, Any]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    reader = aioredis.Redis.from_url(url)
    key = f"bench-floor-{uuid.uuid4().hex[:8]}"
    await client.xgroup_create(key, "g", id="0", mkstream=True)
    latencies: list[float] = []
    done = asyncio.Event()

    async def consume() -> None:
        while not done.is_set():
            reply: Any = await reader.xreadgroup("g", "c", {key: ">"}, count=100, block=200)
            now = time.time()
            ids = []
            for _stream, items in reply or []:
                for eid, fields in items:
                    latencies.append((now - float(fields[b"t"])) * 1000)
                    ids.append(eid)
            if ids:
                await reader.xack(key, "g", *ids)

    consumer = asyncio.create_task(consume())
    start = time.monotonic()
    n = 0
    while time.monotonic() < start + seconds:
        delay = start + n / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await client.xadd(key, {"t": repr(time.time())})
        n += 1
    await asyncio.sleep(0.5)
    done.set()
    await consumer
    # flat out: sequential XADD + XREADGROUP + XACK round trips
    count, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < 2:
        await client.xadd(key, {"t": "0"})
        got: Any = await reader.xreadgroup("g", "c", {key: ">"}, count=1, block=1000)
        await reader.xack(key, "g", got[0][1][0][0])
        count += 1
    sequential = count / (time.monotonic() - t0)
    await client.delete(key)
    await client.aclose()
    await reader.aclose()
    return {"measure": "floor", "what": "redis XADD->XREADGROUP", "rate": rate,
            "messages": len(latencies), "p50_ms": round(pct(latencies, 0.5), 2),
            "p99_ms": round(pct(latencies, 0.99), 2),
            "sequential_round_trips_per_s": round(sequential)}


# -- main ---------------------------------------------------------------------------------


def record(results: list[dict[str, Any]], args: argparse.Namespace, note: str) -> None:
    lines = [
        "",
        f"## Subscriptions (`bench/subscriptions.py`), {time.strftime('%Y-%m-%d')}",
        "",
        f"Commit → rest-hook delivery, one gateway worker on PostgreSQL + Redis, topic "
        f"`encounter-discharge`, id-only payload, {args.seconds:g} s per run, "
        f"{os.cpu_count()} cores shared by the gateway, PostgreSQL, Redis, the receiver and "
        f"the load generator. Latency = arrival at the receiver minus the event's timestamp "
        f"(taken in the write transaction). {note}",
        "",
        "| measurement | subs | writes/s | deliveries (expected) | p50 / p99 ms |"
        " p50 / p99 ms after the 201 | events delivered/s | gateway CPU ms/write |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["measure"] == "floor":
            lines.append(f"| floor: Redis XADD→XREADGROUP at {r['rate']:g}/s | - | "
                         f"{r['rate']:g} | {r['messages']} | {r['p50_ms']} / {r['p99_ms']} | - | "
                         f"{r['sequential_round_trips_per_s']} sequential round trips/s | - |")
        elif r["measure"] == "latency":
            lines.append(f"| at {r['target_rate']:g} writes/s | {r['subscriptions']} | "
                         f"{r['writes_per_s']} | {r['deliveries']} ({r['expected']}) | "
                         f"{r['p50_ms']} / {r['p99_ms']} | {r['ack_p50_ms']} / {r['ack_p99_ms']} | "
                         f"{r['events_per_s']} | {r['gateway_cpu_ms_per_write']} |")
        else:
            lines.append(f"| sustained, {r['concurrency']} writers flat out | "
                         f"{r['subscriptions']} | {r['writes_per_s']} | {r['deliveries']} "
                         f"({r['expected']}) | - | - | {r['delivered_events_per_s']} "
                         f"(drained {r['drain_after_writes_s']} s after) | "
                         f"{r['gateway_cpu_ms_per_write']} |")
    with (ROOT / "bench" / "RESULTS.md").open("a") as out:
        out.write("\n".join(lines) + "\n")


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import asyncpg

    schema = f"bench_subs_{uuid.uuid4().hex[:8]}"
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(args.db)
    await conn.execute(f"CREATE SCHEMA {schema}")
    await conn.close()
    results: list[dict[str, Any]] = []
    gw_port, rc_port = free_port(), free_port()
    base = f"http://127.0.0.1:{gw_port}/fhir"
    receiver_url = f"http://127.0.0.1:{rc_port}"
    env = {"CAREPATH_DATABASE_URL": args.db, "CAREPATH_DATABASE_SCHEMA": schema,
           "CAREPATH_REDIS_URL": args.redis, "CAREPATH_REDIS_PREFIX": prefix,
           "CAREPATH_PUBLIC_BASE_URL": base, "CAREPATH_PORT": str(gw_port)}
    try:
        floor = await redis_floor(args.redis, max(args.rates), min(args.seconds, 10))
        print(json.dumps(floor), flush=True)
        results.append(floor)
        from gateway.storage.db import open_database
        from gateway.storage.migrate import migrate

        db = open_database(args.db, pool_size=1, schema=schema)
        await db.open()
        await migrate(db)
        await db.close()
        with started(uvicorn("bench.subscriptions:receiver", rc_port, False), {},
                     f"{receiver_url}/results"), \
             started(uvicorn("gateway.main:create_app", gw_port, True, args.workers), env,
                     f"{base}/metadata", args.gateway_log) as gateway:
            await drive(base, min(args.rates), 3, args.concurrency)  # warm up
            subs: list[str] = []
            for count in args.subscriptions:
                subs += await create_subscriptions(base, receiver_url, count - len(subs))
                await collect(receiver_url, 0, 0)
                for rate in args.rates if count else []:
                    result = await latency_run(base, receiver_url, count, rate, args.seconds,
                                               args.concurrency, gateway.pid)
                    print(json.dumps(result), flush=True)
                    results.append(result)
                result = await throughput_run(base, receiver_url, count, args.seconds,
                                              args.concurrency, gateway.pid)
                print(json.dumps(result), flush=True)
                results.append(result)
            await delete_subscriptions(base, subs)
    finally:
        conn = await asyncpg.connect(args.db)
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await conn.close()
        import redis

        client = redis.Redis.from_url(args.redis)
        keys = list(client.scan_iter(f"{prefix}:*"))
        if keys:
            client.delete(*keys)
        client.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default="postgresql://127.0.0.1:5432/test")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--rates", type=float, nargs="+", default=[50.0, 200.0],
                        help="writes/s of the latency runs")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--subscriptions", type=int, nargs="+", default=[0, 1, 10, 100])
    parser.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    parser.add_argument("--note", default="", help="a sentence for the recorded section")
    parser.add_argument("--gateway-log", type=Path, help="write the gateway's output here")
    parser.add_argument("--workers", type=int, default=1, help="gateway worker processes")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    print(json.dumps({"median_p99_ms": statistics.median(
        [r["p99_ms"] for r in results if r["measure"] == "latency"] or [0])}), file=sys.stderr)
    if args.record:
        record(results, args, args.note)


if __name__ == "__main__":
    main()
