"""Search at scale: ``python -m bench.search``.

Loads ``--bundles`` transaction Bundles (the REST benchmark's: a Patient, an
Encounter and three Observations each) and as many Locations spread over
Germany into a fresh database, then times typical searches (by reference, code
and date with a sort, chains, ``_has``, ``_revinclude``, sorts, counts,
``$everything``, Locations ``near`` a city) with the gateway's ASGI app called
in process: no HTTP, so the figures are the query plans and the gateway's
search code. One JSON line per search: milliseconds (best of
``--repeat``), status, total and entries returned. Then the store's part of a
read and of the searches by type for a client of an organisation, which every
production caller is (``"restricted"`` lines: access condition included, and
the same search without it). Last, a client paging through every Observation by
the ``next`` links (``--pages``).

PostgreSQL: a fresh schema is created and dropped; SQLite: a file in a
temporary directory. The planner statistics service runs as in ``carepath
serve`` (``gateway/storage/planner.py``); ``--settle`` seconds after loading
let it catch up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

import asyncpg
import orjson

from bench.rest import transaction_bytes
from gateway.fhir.search import parse_search
from gateway.interactions.base import Context
from gateway.main import create_app
from gateway.security.policy import load_rules
from gateway.settings import Settings
from gateway.storage.interface import Restriction

#: the organisation every Encounter of the benchmark names as its service provider
ORGANIZATION = "klinikum-nord"


async def asgi(app: Any, method: str, path: str, query: str = "",
               body: bytes = b"") -> tuple[int, bytes]:
    """One request through the ASGI app: (status, body)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": query.encode(), "root_path": "",
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/fhir+json"),
                         (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    chunks: list[bytes] = []
    status = 0
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects
        return {}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)


def searches(pid: str, eid: str, patient: dict[str, Any], now: str) -> list[tuple[str, str]]:
    """The searches timed; ``now``: an instant after the load (a poll that finds
    nothing new)."""
    ident = patient["identifier"][0]
    family = patient["name"][0]["family"]
    hr = "http://loinc.org|8867-4"
    return [
        ("Observation", f"subject=Patient/{pid}"),
        ("Observation", f"patient={pid}&code={hr}"),
        ("Observation", f"code={hr}&date=ge2020&_sort=-date&_count=10"),
        ("Observation", f"subject:Patient.identifier={ident['system']}|{ident['value']}"),
        ("Observation", f"subject.family={family}"),
        ("Patient", "_has:Observation:subject:code=http://loinc.org|59408-5&_count=10"),
        ("Encounter", f"subject={pid}&_revinclude=Observation:encounter"),
        ("Patient", f"_id={pid}&_revinclude=Observation:subject&_revinclude=Encounter:subject"),
        ("Observation", f"encounter=Encounter/{eid}"),
        ("Observation", f"code={hr}&_summary=count"),
        ("Observation", "status=final&_count=10"),
        ("Observation", "code:text=heart&_count=10"),
        ("Patient", "_sort=-_lastUpdated&_count=10"),
        ("Patient", "_sort=birthdate&_count=10"),
        ("Patient", "_sort=family&_count=10"),
        ("Patient", f"identifier={ident['value']}"),
        ("Patient", f"name:exact={family}"),
        ("Patient", f"name={family[:4]}&_count=10"),
        ("", "_type=Patient,Observation&_lastUpdated=gt2020&_count=10"),
        (f"Patient/{pid}/$everything", ""),
        ("Location", "near=51.3397|12.3731|25|km&_count=10"),
        ("Location", "near=51.3397|12.3731|25|km&_sort=near&_count=10"),
        ("Location", "near=51.3397|12.3731|150|km&_sort=near&_count=10"),
        ("_history", f"_since={now}"),
        ("Observation/_history", f"_since={now}"),
    ]


def location(seed: int, i: int) -> bytes:
    """A Location somewhere in Germany (its bounding box), the same for a seed."""
    r = random.Random(seed * 1_000_003 + i)
    return orjson.dumps({"resourceType": "Location", "name": f"Standort {i}",
                         "position": {"latitude": round(r.uniform(47.3, 55.0), 5),
                                      "longitude": round(r.uniform(5.9, 15.0), 5)}})


async def run(args: argparse.Namespace, emit: Callable[[dict[str, Any]], None]) -> None:
    schema = None
    tmp = tempfile.TemporaryDirectory(prefix="carepath-bench-search-")
    if args.db.startswith("sqlite"):
        settings = Settings.from_env(database_url=f"sqlite:///{Path(tmp.name) / 'bench.db'}")
    else:
        schema = f"bench_search_{uuid.uuid4().hex[:8]}"
        conn = await asyncpg.connect(args.db)
        await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.close()
        settings = Settings.from_env(database_url=args.db, database_schema=schema)
    try:
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            t0 = time.perf_counter()
            keys: dict[int, tuple[str, str]] = {}  # Bundle number -> (Patient, Encounter)
            gate = asyncio.Semaphore(8)

            async def load(i: int) -> None:
                async with gate:
                    status, body = await asgi(app, "POST", "/fhir", body=transaction_bytes(
                        args.seed, i))
                    if status != 200:
                        raise RuntimeError(f"load failed: {status} {body[:200]!r}")
                    loc = [e["response"]["location"] for e in orjson.loads(body)["entry"]]
                    keys[i] = (loc[0].split("/")[-3], loc[1].split("/")[-3])

            await asyncio.gather(*(load(i) for i in range(args.bundles)))

            async def place(i: int) -> None:
                async with gate:
                    status, body = await asgi(app, "POST", "/fhir/Location",
                                              body=location(args.seed, i))
                    if status != 201:
                        raise RuntimeError(f"load failed: {status} {body[:200]!r}")

            await asyncio.gather(*(place(i) for i in range(args.bundles)))
            emit({"loaded_bundles": args.bundles, "resources": 6 * args.bundles,
                  "seconds": round(time.perf_counter() - t0, 1), "backend": settings.database_url
                  .split(":", 1)[0]})
            await asyncio.sleep(args.settle)
            pid, eid = keys[len(keys) // 2]  # the same synthetic patient in every run
            _, raw = await asgi(app, "GET", f"/fhir/Patient/{pid}")
            now = datetime.now(UTC).isoformat(timespec="milliseconds")
            for path, query in searches(pid, eid, orjson.loads(raw), quote(now)):
                full = f"/fhir/{path}" if path else "/fhir"
                best = float("inf")
                status, body = 0, b""
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    status, body = await asgi(app, "GET", full, query)
                    best = min(best, time.perf_counter() - t)
                found = orjson.loads(body)
                emit({"search": f"{path}?{query}" if query else path, "ms": round(best * 1e3, 2),
                      "status": status, "total": found.get("total"),
                      "entries": len(found.get("entry", []))})
            await restricted(app.state.context, pid, eid, orjson.loads(raw), args.repeat, emit)
            await paging(app, "Observation", "status=final&_count=50", args.pages, emit)
    finally:
        if schema:
            conn = await asyncpg.connect(args.db)
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")
            await conn.close()
        tmp.cleanup()


async def paging(app: Any, path: str, query: str, pages: int,
                 emit: Callable[[dict[str, Any]], None]) -> None:
    """A client reading a long result page by page, by its ``next`` links (at most
    ``pages`` pages): one JSON line with the milliseconds of the first page, of the
    first page past what the first search read ahead (``search_read_ahead``), and
    the median and slowest of the others."""
    ahead = app.state.context.settings.search_read_ahead
    times: list[float] = []
    first_past = None
    at, full, qs = 0, f"/fhir/{path}", query
    t0 = time.perf_counter()
    while len(times) < pages:
        t = time.perf_counter()
        status, body = await asgi(app, "GET", full, qs)
        times.append((time.perf_counter() - t) * 1e3)
        if status != 200:
            raise RuntimeError(f"paging failed: {status} {body[:200]!r}")
        found = orjson.loads(body)
        size = len(found.get("entry", []))
        if first_past is None and at <= ahead < at + size:
            first_past = len(times) - 1
        at += size
        nxt = next((link["url"] for link in found.get("link", [])
                    if link["relation"] == "next"), None)
        if nxt is None:
            break
        full, _, qs = nxt.partition("?")
        full = "/fhir" + full.split("/fhir", 1)[1]
    rest = sorted(t for i, t in enumerate(times[1:], 1) if i != first_past)
    emit({"paging": f"{path}?{query}", "pages": len(times), "entries": at,
          "seconds": round(time.perf_counter() - t0, 2), "first_ms": round(times[0], 2),
          "past_read_ahead_ms": round(times[first_past], 2) if first_past else None,
          "median_ms": round(rest[len(rest) // 2], 2) if rest else None,
          "max_ms": round(rest[-1], 2) if rest else None})


async def restricted(ctx: Context, pid: str, eid: str, patient: dict[str, Any], repeat: int,
                     emit: Callable[[dict[str, Any]], None]) -> None:
    """The store's part of a read and of the searches by type, for a client of the
    organisation that provided every Encounter, so that it may see every patient (the
    most its access condition can have to look through). One JSON line each: the
    milliseconds with the restriction and without (best of ``repeat``)."""
    access = Restriction(ORGANIZATION, "TREAT", int(time.time() * 1e6),
                         load_rules(ctx.settings.jurisdiction))
    store = ctx.store

    async def best(work: Callable[[], Awaitable[Any]]) -> float:
        fastest = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            await work()
            fastest = min(fastest, time.perf_counter() - t)
        return round(fastest * 1e3, 2)

    for key in (("Patient", pid), ("Encounter", eid)):
        emit({"restricted": f"read {key[0]}", "ms": await best(
                  lambda key=key: store.visible([key], access)),  # type: ignore[misc]
              "visible": bool(await store.visible([key], access))})
    for path, query in searches(pid, eid, patient, ""):
        if "/" in path or not path or path.startswith("_"):  # reads, histories
            continue
        parsed = parse_search(path, parse_qsl(query), ctx.registry.search_params)
        emit({"restricted": f"{path}?{query}",
              "ms": await best(lambda p=parsed: store.search_resources(  # type: ignore[misc]
                  p, 21, access)),
              "unrestricted_ms": await best(lambda p=parsed: store.search_resources(  # type: ignore[misc]
                  p, 21, None))})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default="postgresql://127.0.0.1/test",
                        help="postgresql://… (a fresh schema) or sqlite (a temporary file)")
    parser.add_argument("--bundles", type=int, default=3000, help="Bundles to load (3000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per search; best kept (3)")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds to wait after loading (2)")
    parser.add_argument("--seed", type=int, default=11, help="seed of the synthetic data")
    parser.add_argument("--pages", type=int, default=400,
                        help="pages a client reads of a long result by its next links (400)")
    args = parser.parse_args()
    asyncio.run(run(args, lambda row: print(json.dumps(row), flush=True)))


if __name__ == "__main__":
    main()
