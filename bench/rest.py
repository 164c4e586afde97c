"""REST throughput/latency benchmark of the gateway against a floor.

``python -m bench.rest --db postgresql://127.0.0.1/test`` starts, on free
loopback ports, the gateway (``uvicorn gateway.main:create_app``) and the floor
(``uvicorn bench.floor:create_app``, see :mod:`bench.floor`) with the same
worker count, in a fresh PostgreSQL schema (or fresh SQLite files for
``--db sqlite:///…``), drives both with the same client, scenario by scenario
(floor then gateway, interleaved, so each pair sees the same machine state),
and prints one JSON line per scenario on stdout, then one line per target.
Progress goes to stderr. Everything it started is stopped and everything it
created (schema, temp files) is removed at the end, also on Ctrl-C or errors.

Scenarios (in this order; the later ones use the patients the first created):

1. ``create``        POST /Patient, a 2-3 KB German/Dutch patient per request
2. ``read``          GET /Patient/{id}
3. ``update``        PUT /Patient/{id} with If-Match; every client task updates
                     only its own patients, so 412s are rare (counted apart)
4. ``search_identifier``  GET /Patient?identifier=http://fhir.de/sid/gkv/kvid-10|…
5. ``search_name``   GET /Patient?name=<family name>
6. ``transaction``   POST / with a transaction Bundle: Patient + Encounter +
                     3 Observations linked by urn:uuid fullUrls

The floor answers writes with ``orjson.loads`` + one INSERT of the same bytes
and reads with one SELECT by primary key; for the searches the floor gets a
read by id of the same patient (it has no search), so those ratios compare a
search with the cheapest possible read.

The client: one or more processes (``--clients``) on uvloop, with request
bodies serialised before the clock starts and one HTTP/1.1 keep-alive
connection per concurrent task: by default a minimal client on asyncio
streams (``--client raw``, ~0.06 ms CPU per request), or httpx
(``--client httpx``, ~1 ms per request here: on 2 cores it starves the
servers and caps the floor; see bench/README.md). Each scenario warms up (not
measured) before its measured window. CPU use of client, server and
PostgreSQL during the window is read from /proc and reported, since on a
small machine they all share the same cores (and may share them with others:
``cpu.other``); ``cpu_ms_per_op`` is the cost of one operation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

import orjson

SCENARIOS = ("create", "read", "update", "search_identifier", "search_name", "transaction")
KVNR_SYSTEM = "http://fhir.de/sid/gkv/kvid-10"
BSN_SYSTEM = "http://fhir.nl/fhir/NamingSystem/bsn"
MRN_SYSTEM = "https://fhir.klinikum-nord.example/sid/patient-mrn"
FHIR_JSON = "application/fhir+json"
RESOURCES_PER_BUNDLE = 5
TX_SERIAL_BASE = 50_000_000  # patients of transaction Bundles never collide with create's

# targets (PostgreSQL, 2 cores): (scenario, metric, threshold, text)
TARGETS = (
    ("create", "ratio_to_floor", 0.5, "create >= 0.5x floor"),
    ("read", "ratio_to_floor", 0.7, "read >= 0.7x floor"),
    ("transaction", "resources_per_s", 1500.0, "transaction >= 1500 resources/s"),
)


def log(msg: str) -> None:
    print(f"[bench.rest {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- synthetic data -----------------------------------------------------------
# Everything is a pure function of (seed, serial), so the floor and the gateway
# get byte-identical bodies and the searches can be derived from a serial.

_STEMS = ("Berg", "Hof", "Lind", "Stein", "Wald", "Brand", "Kirch", "Rosen", "Eich", "Feld",
          "Mohr", "Schön", "Kalt", "Wein", "Gold", "Sommer", "Winter", "Hart", "Dorn", "Bruck",
          "Hahn", "Kling", "Roth", "Schwarz", "Weiß", "Groß", "Klein", "Lang", "Fuchs", "Wolf",
          "Bäcker", "Müll", "Schmied", "Vogel", "Ober", "Nieder", "Hoch", "Sand", "Buch", "Esch")
_SUFFIXES = ("mann", "er", "hof", "berg", "inger", "feld", "meier", "bach", "haus", "huber",
             "stedt", "kamp", "ling", "hardt", "baum", "rieder", "weg", "bauer", "dorf", "ke")
_DUTCH = ("de Vries", "van Dijk", "Bakker", "Janssen", "Visser", "Smit", "Meijer", "de Boer",
          "Mulder", "de Groot", "Bos", "Vos", "Peters", "Hendriks", "van Leeuwen", "Dekker",
          "Brouwer", "de Wit", "Dijkstra", "Smits", "de Graaf", "van der Meer", "van der Linden",
          "Kok", "Jacobs", "de Haan", "Vermeulen", "van den Berg", "van der Heijden", "Schouten")
SURNAMES = tuple(s + x for s in _STEMS for x in _SUFFIXES) + tuple(
    f"{d}-{s}{x}" for d in _DUTCH for s, x in zip(_STEMS, _SUFFIXES[::-1] * 2, strict=False))
GIVEN_F = ("Anna", "Maria", "Sophie", "Emma", "Lena", "Johanna", "Charlotte", "Marie", "Hannah",
           "Ingrid", "Ursula", "Monika", "Sanne", "Femke", "Lotte", "Daan", "Eva", "Greta")
GIVEN_M = ("Lukas", "Paul", "Jonas", "Felix", "Maximilian", "Karl", "Heinrich", "Wolfgang",
           "Jürgen", "Stefan", "Thomas", "Bram", "Sem", "Pieter", "Jan", "Willem", "Ruud", "Ole")
STREETS_DE = ("Hauptstraße", "Schulstraße", "Gartenstraße", "Bahnhofstraße", "Dorfstraße",
              "Bergstraße", "Birkenweg", "Lindenstraße", "Kirchstraße", "Waldstraße", "Ringstraße")
CITIES_DE = (("Berlin", "10", "BE"), ("Hamburg", "20", "HH"), ("München", "80", "BY"),
             ("Köln", "50", "NW"), ("Leipzig", "04", "SN"), ("Kiel", "24", "SH"),
             ("Bremen", "28", "HB"), ("Dresden", "01", "SN"), ("Münster", "48", "NW"))
STREETS_NL = ("Keizersgracht", "Dorpsstraat", "Kerkstraat", "Molenweg", "Stationsweg", "Markt")
CITIES_NL = ("Amsterdam", "Groningen", "Enschede", "Nijmegen", "Venlo", "Maastricht")


def kvnr(n: int) -> str:
    """A German KVNR-shaped value (letter + 9 digits), unique per serial."""
    return f"{chr(65 + n % 26)}{(n * 7919 + 12345) % 10**9:09d}"


def bsn(n: int) -> str:
    """A 9-digit Dutch BSN that passes the 11-test."""
    base = (n * 104729 + 100000000) % 900000000 + 100000000
    for k in range(20):
        digits = [int(c) for c in f"{(base + k * 10) % 10**9:09d}"[:8]]
        check = sum(d * w for d, w in zip(digits, range(9, 1, -1), strict=True)) % 11
        if check < 10:
            return "".join(map(str, digits)) + str(check)
    return "111222333"


def family(n: int) -> str:
    return SURNAMES[(n * 2654435761) % len(SURNAMES)]


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _decimal(value: float) -> float | int:
    # FHIR clients send 37.0 as well, but the gateway keeps decimals' text and
    # parses such bodies with the slow stdlib path: keep the common fast case.
    rounded = round(value, 1)
    return int(rounded) if rounded == int(rounded) else rounded


def patient(seed: int, n: int, variant: int = 0) -> dict[str, Any]:
    rng = random.Random(seed * 1_000_003 + n)
    female = rng.random() < 0.5
    given = GIVEN_F if female else GIVEN_M
    fam = family(n)
    first, second = rng.sample(given, 2)
    city, plz, state = rng.choice(CITIES_DE)
    street, house = rng.choice(STREETS_DE), str(rng.randint(1, 180))
    postal = f"{plz}{rng.randint(100, 999)}"
    year = rng.randint(1930, 2020)
    birth = f"{year}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    email = f"{first.lower()}.{fam.lower().replace(' ', '')}{n % 97}@example.org"
    name: dict[str, Any] = {
        "use": "official", "text": f"{first} {second} {fam}", "family": fam,
        "_family": {"extension": [{
            "url": "http://hl7.org/fhir/StructureDefinition/humanname-own-name",
            "valueString": fam}]},
        "given": [first, second],
    }
    if rng.random() < 0.3:
        name["prefix"] = ["Dr. med." if rng.random() < 0.5 else "Prof. Dr."]
    names = [name]
    if female and rng.random() < 0.4:
        names.append({"use": "maiden", "family": family(n + 7_777_777), "given": [first]})
    res: dict[str, Any] = {
        "resourceType": "Patient",
        "extension": [
            {"url": "http://hl7.org/fhir/StructureDefinition/patient-nationality",
             "extension": [{"url": "code", "valueCodeableConcept": {"coding": [
                 {"system": "urn:iso:std:iso:3166", "code": rng.choice(("DE", "NL"))}]}}]},
            {"url": "http://hl7.org/fhir/StructureDefinition/patient-birthPlace",
             "valueAddress": {"city": rng.choice(CITIES_DE)[0], "country": "DE"}},
        ],
        "identifier": [
            {"use": "official",
             "type": {"coding": [{"system": "http://fhir.de/CodeSystem/identifier-type-de-basis",
                                  "code": "GKV", "display": "Gesetzliche Krankenversicherung"}]},
             "system": KVNR_SYSTEM, "value": kvnr(n),
             "assigner": {"identifier": {"use": "official",
                                         "system": "http://fhir.de/sid/arge-ik/iknr",
                                         "value": f"10{rng.randint(1000000, 9999999)}"}}},
            {"use": "usual",
             "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                  "code": "MR", "display": "Medical record number"}]},
             "system": MRN_SYSTEM, "value": f"MRN{n:09d}"},
            {"use": "official", "system": BSN_SYSTEM, "value": bsn(n)},
        ],
        "active": variant % 3 != 2,
        "name": names,
        "telecom": [
            {"system": "phone",
             "value": f"+49 {rng.randint(30, 99)} {rng.randint(100000, 9999999)}",
             "use": "home", "rank": 2},
            {"system": "phone",
             "value": f"+49 15{rng.randint(1, 9)} {rng.randint(1000000, 99999999)}"
             f"{'' if variant == 0 else f' ext {variant}'}", "use": "mobile", "rank": 1},
            {"system": "email", "value": email, "use": "home"},
        ],
        "gender": "female" if female else "male",
        "birthDate": birth,
        "address": [
            {"use": "home", "type": "both", "text": f"{street} {house}, {postal} {city}",
             "line": [f"{street} {house}"],
             "_line": [{"extension": [
                 {"url": "http://hl7.org/fhir/StructureDefinition/iso21090-ADXP-streetName",
                  "valueString": street},
                 {"url": "http://hl7.org/fhir/StructureDefinition/iso21090-ADXP-houseNumber",
                  "valueString": house}]}],
             "city": city, "state": state, "postalCode": postal,
             "country": "DE"},
            {"use": "temp", "type": "postal",
             "line": [f"{rng.choice(STREETS_NL)} {rng.randint(1, 300)}"],
             "city": rng.choice(CITIES_NL),
             "postalCode": f"{rng.randint(1000, 9999)} {chr(65 + rng.randint(0, 25))}"
                           f"{chr(65 + rng.randint(0, 25))}",
             "country": "NL",
             "period": {"start": f"{rng.randint(2015, 2024)}-0{rng.randint(1, 9)}-01"}},
        ],
        "maritalStatus": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus",
            "code": rng.choice("MSDWU")}]},
        "communication": [{"language": {"coding": [{"system": "urn:ietf:bcp:47",
                                                      "code": rng.choice(("de", "nl"))}]},
                           "preferred": True}],
        "generalPractitioner": [{"reference": f"Practitioner/gp-{rng.randint(1, 400):04d}",
                                 "display": f"Dr. med. {rng.choice(GIVEN_F + GIVEN_M)} "
                                            f"{family(n + 3_333_333)}"}],
        "managingOrganization": {"reference": "Organization/klinikum-nord",
                                 "display": "Klinikum Nord"},
    }
    return res


def patient_bytes(seed: int, n: int, id: str | None = None, variant: int = 0) -> bytes:
    res = patient(seed, n, variant)
    if id is not None:
        res = {"resourceType": "Patient", "id": id, **{k: v for k, v in res.items()
                                                        if k != "resourceType"}}
    return orjson.dumps(res)


_VITALS = (("8867-4", "Heart rate", "/min", "/min", 55.0, 110.0),
           ("8310-5", "Body temperature", "Cel", "°C", 36.0, 39.5),
           ("29463-7", "Body weight", "kg", "kg", 45.0, 120.0),
           ("9279-1", "Respiratory rate", "/min", "/min", 10.0, 24.0),
           ("59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry", "%", "%",
            88.0, 100.0))


def transaction_bytes(seed: int, m: int) -> bytes:
    """Patient + Encounter + 3 Observations, cross-referenced by urn:uuid."""
    n = TX_SERIAL_BASE + m
    rng = random.Random(seed * 7_000_003 + m)
    p_url, e_url = f"urn:uuid:{_uuid(rng)}", f"urn:uuid:{_uuid(rng)}"
    day = f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    start = f"{day}T{rng.randint(7, 17):02d}:{rng.randint(0, 59):02d}:00+01:00"
    entries: list[dict[str, Any]] = [
        {"fullUrl": p_url, "resource": patient(seed, n),
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": e_url, "resource": {
            "resourceType": "Encounter", "status": "finished",
            "identifier": [{"system": "https://fhir.klinikum-nord.example/sid/encounter",
                            "value": f"ENC{m:010d}"}],
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                      "code": "AMB", "display": "ambulatory"},
            "type": [{"coding": [{"system": "http://snomed.info/sct", "code": "185349003",
                                  "display": "Encounter for check up"}]}],
            "subject": {"reference": p_url},
            "period": {"start": start, "end": start.replace("T", "T").replace(":00+", ":30+")},
            "serviceProvider": {"reference": "Organization/klinikum-nord"},
        }, "request": {"method": "POST", "url": "Encounter"}},
    ]
    for code, display, ucum, unit, lo, hi in rng.sample(_VITALS, 3):
        entries.append({"fullUrl": f"urn:uuid:{_uuid(rng)}", "resource": {
            "resourceType": "Observation", "status": "final",
            "category": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": "vital-signs", "display": "Vital Signs"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": display}],
                     "text": display},
            "subject": {"reference": p_url},
            "encounter": {"reference": e_url},
            "effectiveDateTime": start,
            "valueQuantity": {"value": _decimal(rng.uniform(lo, hi)), "unit": unit,
                              "system": "http://unitsofmeasure.org", "code": ucum},
        }, "request": {"method": "POST", "url": "Observation"}})
    return orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries})


# -- client processes ----------------------------------------------------------


@dataclass
class Work:
    """What one client process does in one scenario (pickled to it)."""

    scenario: str
    target: str  # "floor" | "gateway"
    base: str  # http://127.0.0.1:port/fhir
    concurrency: int
    warmup: float
    seconds: float
    seed: int
    proc: int
    procs: int
    # create/transaction: serials to use, in order (lazily extended past the list)
    serial_start: int = 0
    # read/update/search: (id, serial) of patients this process may use
    patients: list[tuple[str, int]] = field(default_factory=list)
    pregen: int = 0  # bodies serialised before the clock starts
    client: str = "raw"  # "raw" | "httpx"


@dataclass
class Outcome:
    ops: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    conflicts_412: int = 0
    matches: int = 0  # search: entries with search.mode = match
    created: list[tuple[str, int]] = field(default_factory=list)  # (id, serial)


def _expected(scenario: str) -> int:
    return {"create": 201, "transaction": 200}.get(scenario, 200)


def _id_from_location(location: str | None) -> str | None:
    if not location:
        return None
    parts = location.split("/")
    return parts[parts.index("_history") - 1] if "_history" in parts else parts[-1]


def _version(etag: str | None, fallback: int) -> int:
    if not etag:
        return fallback
    digits = "".join(c for c in etag if c.isdigit())
    return int(digits) if digits else fallback


#: (method, path below the base, body, extra headers, key for the response handler)
Request = tuple[str, str, Any, Any, Any]


@dataclass
class Prepared:
    """Per-task request streams, built (bodies serialised) before the clock starts."""

    streams: list[tuple[Request | None, Iterator[Request]]]
    versions: dict[str, int] = field(default_factory=dict)  # update: id -> current version


def prepare(work: Work) -> Prepared:
    scenario, seed = work.scenario, work.seed
    versions: dict[str, int] = {}
    rng = random.Random(seed * 31 + work.proc)

    def serial_of(task: int, i: int) -> int:
        return work.serial_start + work.proc + work.procs * (task + work.concurrency * i)

    def creator(task: int) -> Iterator[Request]:
        per_task = max(1, work.pregen // work.concurrency)
        path = "/Patient" if scenario == "create" else ""

        def make(n: int) -> bytes:
            return patient_bytes(seed, n) if scenario == "create" else transaction_bytes(seed, n)

        pool = [make(serial_of(task, i)) for i in range(per_task)]
        i = 0
        while True:
            n = serial_of(task, i)
            yield "POST", path, (pool[i] if i < per_task else make(n)), None, n
            i += 1

    def updater(task: int) -> Iterator[Request]:
        mine = work.patients[task::work.concurrency]
        if not mine:
            return
        bodies = {pid: [patient_bytes(seed, n, pid, v) for v in (1, 2)] for pid, n in mine}
        i = 0
        while True:
            pid = mine[i % len(mine)][0]
            yield ("PUT", f"/Patient/{pid}", bodies[pid][i // len(mine) % 2],
                   {"if-match": f'W/"{versions.get(pid, 1)}"'}, pid)
            i += 1

    def reader(task: int) -> Iterator[Request]:
        pats = work.patients
        r = random.Random(rng.random())
        picks = [pats[r.randrange(len(pats))] for _ in range(2048)]
        if work.target == "floor" or scenario == "read":
            urls = [f"/Patient/{pid}" for pid, _n in picks]
        elif scenario == "search_identifier":
            urls = [f"/Patient?identifier={quote(KVNR_SYSTEM, safe=':/')}%7C{kvnr(n)}"
                    for _pid, n in picks]
        else:
            urls = [f"/Patient?name={quote(family(n))}" for _pid, n in picks]
        i = 0
        while True:
            yield "GET", urls[i % len(urls)], None, None, None
            i += 1

    kind = (creator if scenario in ("create", "transaction")
            else updater if scenario == "update" else reader)
    streams = []
    for t in range(work.concurrency):
        gen = kind(t)
        streams.append((next(gen, None), gen))  # the first next() builds the pool
    return Prepared(streams, versions)


class RawConnection:
    """One HTTP/1.1 keep-alive connection on asyncio streams: the leanest client.

    Requests are written as bytes, responses parsed just enough (status line,
    headers, Content-Length or chunked body). Reconnects after a failure.
    """

    def __init__(self, base: str) -> None:
        rest = base.split("://", 1)[1]
        hostport, _, prefix = rest.partition("/")
        self.host, _, port = hostport.partition(":")
        self.port = int(port or 80)
        self.prefix = "/" + prefix if prefix else ""
        self.head = (f"Host: {hostport}\r\nAccept: {FHIR_JSON}\r\n").encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes | None,
                      extra: dict[str, str] | None) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        lines = [f"{method} {self.prefix}{path} HTTP/1.1\r\n".encode(), self.head]
        if body is not None:
            lines.append(f"Content-Type: {FHIR_JSON}\r\nContent-Length: {len(body)}\r\n"
                         .encode())
        if extra:
            lines.append("".join(f"{k}: {v}\r\n" for k, v in extra.items()).encode())
        lines.append(b"\r\n")
        if body is not None:
            lines.append(body)
        try:
            self.writer.write(b"".join(lines))
            head = await self.reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
            status = int(status_line.split(" ", 2)[1])
            headers = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if "content-length" in headers:
                content = await self.reader.readexactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                parts = []
                while True:
                    size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    data = await self.reader.readexactly(size + 2)
                    if size == 0:
                        break
                    parts.append(data[:-2])
                content = b"".join(parts)
            else:
                content = b""
            if headers.get("connection", "").lower() == "close":
                await self.close()
            return status, headers, content
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            self.reader = None


class HttpxConnection:
    """httpx with a pool of one connection per task.

    One AsyncClient with a pool of ``concurrency`` connections costs more
    client CPU per request here: httpcore scans every pooled connection (with
    a poll() each) on every request.
    """

    def __init__(self, base: str) -> None:
        import httpx

        self.client = httpx.AsyncClient(
            base_url=base, timeout=60.0, http2=False,
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            headers={"content-type": FHIR_JSON, "accept": FHIR_JSON})

    async def request(self, method: str, path: str, body: bytes | None,
                      extra: dict[str, str] | None) -> tuple[int, dict[str, str], bytes]:
        resp = await self.client.request(method, path, content=body, headers=extra)
        return resp.status_code, resp.headers, resp.content  # type: ignore[return-value]

    async def close(self) -> None:
        await self.client.aclose()


def _quiet_httpcore() -> None:
    """httpcore imports sniffio on every pool operation; when sniffio is not
    installed that is a failed import (a sys.path scan) each time, ~0.5 ms per
    request. Its fallback is "asyncio": provide exactly that answer."""
    try:
        import sniffio  # noqa: F401
    except ImportError:
        import types

        stub = types.ModuleType("sniffio")
        stub.current_async_library = lambda: "asyncio"  # type: ignore[attr-defined]
        sys.modules["sniffio"] = stub


async def drive(work: Work, prep: Prepared, go: float) -> Outcome:
    out = Outcome()
    scenario = work.scenario
    versions = prep.versions
    expected = _expected(scenario)
    measure_from = go + work.warmup
    end = measure_from + work.seconds
    if work.client == "httpx":
        _quiet_httpcore()
        conns: list[Any] = [HttpxConnection(work.base) for _ in prep.streams]
    else:
        conns = [RawConnection(work.base) for _ in prep.streams]

    async def run_task(conn: Any, req: Request | None, gen: Iterator[Request]) -> None:
        while req is not None:
            started = time.monotonic()
            if started >= end:
                return
            method, path, body, extra, key = req
            try:
                status, headers, content = await conn.request(method, path, body, extra)
                code = str(status)
            except Exception as exc:
                status, headers, content, code = 0, {}, b"", type(exc).__name__
            done = time.monotonic()
            measured = started >= measure_from
            if measured:
                out.ops += 1
                out.latencies.append(done - started)
                out.statuses[code] += 1
            if status == expected:
                if scenario == "create":
                    pid = _id_from_location(headers.get("location"))
                    if pid:
                        out.created.append((pid, key))
                elif scenario == "update":
                    versions[key] = _version(headers.get("etag"), versions.get(key, 1) + 1)
                elif scenario.startswith("search") and measured:
                    out.matches += content.count(b'"mode":"match"')
            elif scenario == "update" and status == 412:
                if measured:
                    out.conflicts_412 += 1  # kept apart from errors
                _s, cur, _c = await conn.request("GET", f"/Patient/{key}", None, None)
                versions[key] = _version(cur.get("etag"), versions.get(key, 1))
            elif measured:
                out.errors += 1
            req = next(gen, None)

    try:
        now = time.monotonic()
        if go > now:
            await asyncio.sleep(go - now)
        await asyncio.gather(*(run_task(c, first, gen)
                               for c, (first, gen) in zip(conns, prep.streams, strict=True)))
        out.elapsed = time.monotonic() - measure_from
    finally:
        for c in conns:
            await c.close()
    return out


def _client_main(conn: Any, work: Work) -> None:
    """A client process: prepare, report ready, wait for the start time, run, report."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    try:
        prep = prepare(work)
        conn.send("ready")
        go = float(conn.recv())
        conn.send(("ok", asyncio.run(drive(work, prep, go))))
    except BaseException as exc:
        conn.send(("error", repr(exc)))


# -- servers and databases -------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A uvicorn process group of our own (own session), stopped by its id."""

    def __init__(self, name: str, app: str, env: dict[str, str], workers: int, logdir: Path,
                 src: Path | None = None):
        self.name, self.app, self.env, self.workers = name, app, env, workers
        self.src = src or Path(__file__).resolve().parent.parent  # imports resolve from here
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}/fhir"
        self.log_path = logdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "uvicorn", self.app, "--factory", "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", str(self.workers), "--no-access-log",
               "--log-level", "info"]
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(cmd, env={**os.environ, **self.env}, stdout=logf,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, cwd=self.src)
        log(f"{self.name}: pid {self.proc.pid}, {self.base}, {self.workers} worker(s)")

    def wait_ready(self, timeout: float = 90.0) -> None:
        import httpx

        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")
            text = self.log_path.read_text(errors="replace")
            if text.count("Application startup complete") >= self.workers:
                try:
                    if httpx.get(self.base + "/metadata", timeout=5).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def pids(self) -> list[int]:
        return _descendants(self.proc.pid) if self.proc and self.proc.poll() is None else []

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # our own session: this server only
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        except ProcessLookupError:
            pass
        log(f"{self.name}: stopped")


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _descendants(pid: int) -> list[int]:
    out = [pid]
    for child in _children(pid):
        out.extend(_descendants(child))
    return out


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total / _TICK


def _local_ports_to(pids: list[int], remote_port: int) -> set[int]:
    """Local TCP ports of ``pids``' connections to ``remote_port`` (from /proc)."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            pass
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[9] in inodes and int(cols[2].rsplit(":", 1)[1], 16) == remote_port:
                        ports.add(int(cols[1].rsplit(":", 1)[1], 16))
        except OSError:
            pass
    return ports


def _postgres_pids(server_pids: list[int], pg_port: int) -> list[int]:
    """PostgreSQL processes working for ``server_pids``: their backends (found by
    client port in the process title) and the shared auxiliary processes (WAL
    writer, checkpointer, autovacuum …); other users' backends are left out."""
    ports = _local_ports_to(server_pids, pg_port)
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() not in ("postgres", "postmaster"):
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                title = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "(" in title and ")" in title.rsplit("(", 1)[1]:
            port = title.rsplit("(", 1)[1].split(")", 1)[0]
            if port.isdigit() and int(port) not in ports:
                continue  # a backend of someone else's connection
        elif "[local]" in title:
            continue
        pids.append(int(entry))
    return pids


def _idle_cpu() -> float:
    """Idle (incl. I/O wait) CPU seconds of the whole machine so far."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    return (vals[3] + vals[4]) / _TICK


class Store:
    """The benchmark's own database space: a PostgreSQL schema or SQLite files."""

    def __init__(self, url: str, tmpdir: Path) -> None:
        self.url = url
        self.kind = "sqlite" if url.startswith("sqlite:") else "postgresql"
        self.schema: str | None = None
        self.created = False
        self.pg_port = None if self.kind == "sqlite" else (urlparse(url).port or 5432)
        if self.kind == "sqlite":
            self.gateway_url = f"sqlite:///{tmpdir / 'gateway.db'}"
            self.floor_url = f"sqlite:///{tmpdir / 'floor.db'}"
        else:
            self.schema = f"bench_rest_{os.getpid()}_{secrets.token_hex(3)}"
            self.gateway_url = self.floor_url = url

    def setup(self) -> None:
        from bench.floor import prepare

        async def run() -> None:
            if self.kind == "postgresql":
                import asyncpg

                conn = await asyncpg.connect(self.url)
                try:
                    await conn.execute(f'CREATE SCHEMA "{self.schema}"')
                    self.created = True
                finally:
                    await conn.close()
            await prepare(self.floor_url, self.schema)

        asyncio.run(run())
        log(f"database: {self.kind}" + (f", schema {self.schema}" if self.schema else
                                         f", {self.gateway_url} / {self.floor_url}"))

    def teardown(self) -> None:
        if self.kind != "postgresql" or not self.created:
            return

        async def run() -> None:
            import asyncpg

            conn = await asyncpg.connect(self.url)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
            finally:
                await conn.close()

        asyncio.run(run())
        self.created = False
        log(f"dropped schema {self.schema}")

    def env(self, target: str) -> dict[str, str]:
        if target == "gateway":
            env = {"CAREPATH_DATABASE_URL": self.gateway_url}
            if self.schema:
                env["CAREPATH_DATABASE_SCHEMA"] = self.schema
            return env
        env = {"FLOOR_DATABASE_URL": self.floor_url}
        if self.schema:
            env["FLOOR_DATABASE_SCHEMA"] = self.schema
        return env


def server_version(url: str) -> str:
    if url.startswith("sqlite:"):
        import sqlite3

        return f"SQLite {sqlite3.sqlite_version}"

    async def run() -> str:
        import asyncpg

        conn = await asyncpg.connect(url)
        try:
            return str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()

    return f"PostgreSQL {asyncio.run(run())}"


# -- orchestration ------------------------------------------------------------------


@dataclass
class Measured:
    ops: int
    seconds: float
    throughput: float
    p50: float
    p95: float
    p99: float
    errors: int
    statuses: dict[str, int]
    conflicts_412: int
    matches: int
    cpu: dict[str, float]
    cpu_ms: dict[str, float | None]
    created: list[tuple[str, int]]


def _pct(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    return sorted_vals[min(len(sorted_vals) - 1, int(q * len(sorted_vals)))] * 1000


def run_clients(works: list[Work], server: Server, pg_port: int | None,
                profile: Callable[[float], Any] | None = None) -> Measured:
    ctx = mp.get_context("fork")
    pipes, procs = [], []
    prof = None
    finished = False
    try:
        for w in works:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_client_main, args=(child, w), daemon=True)
            p.start()
            pipes.append(parent)
            procs.append(p)
        for conn in pipes:
            if not conn.poll(300):
                raise RuntimeError("a client process did not get ready in 300 s")
            msg = conn.recv()
            if msg != "ready":
                raise RuntimeError(f"a client process failed to prepare: {msg}")
        w0 = works[0]
        go = time.monotonic() + 0.2  # all clients are prepared
        for conn in pipes:
            conn.send(go)
        measure_from = go + w0.warmup
        # sample CPU use over the measured window
        time.sleep(max(0.0, measure_from - time.monotonic()))
        client_pids = [p.pid for p in procs if p.pid is not None]
        server_pids = server.pids()
        pg_pids = _postgres_pids(server_pids, pg_port) if pg_port else []
        c0, s0, g0 = (_cpu_seconds(client_pids), _cpu_seconds(server_pids),
                      _cpu_seconds(pg_pids))
        i0 = _idle_cpu()
        m0 = time.monotonic()
        prof = profile(w0.seconds) if profile else None
        time.sleep(max(0.0, measure_from + w0.seconds - time.monotonic()))
        c1, s1 = _cpu_seconds(client_pids), _cpu_seconds(server_pids)
        g1 = _cpu_seconds([p for p in pg_pids if os.path.exists(f"/proc/{p}")])
        i1 = _idle_cpu()
        window = time.monotonic() - m0
        outcomes: list[Outcome] = []
        for conn in pipes:
            if not conn.poll(w0.seconds + 120):
                raise RuntimeError("a client process did not finish in time")
            status, value = conn.recv()
            if status != "ok":
                raise RuntimeError(f"client failed: {value}")
            outcomes.append(value)
        if prof is not None:
            prof.wait(timeout=60)
        finished = True
    finally:
        if prof is not None and prof.poll() is None:
            prof.terminate()
            prof.wait(timeout=10)
        for p in procs:
            p.join(timeout=5 if finished else 0)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    lat = sorted(x for o in outcomes for x in o.latencies)
    ops = sum(o.ops for o in outcomes)
    elapsed = max(o.elapsed for o in outcomes)
    statuses: Counter[str] = Counter()
    for o in outcomes:
        statuses.update(o.statuses)
    ncores = os.cpu_count() or 1
    cpu = {
        "client": round((c1 - c0) / window, 2),
        "server": round((s1 - s0) / window, 2),
        "postgres": round((g1 - g0) / window, 2),
        "idle": round((i1 - i0) / window, 2),
    }
    # whatever else ran on the machine meanwhile (other users' tests, the OS)
    cpu["other"] = round(max(0.0, ncores - sum(cpu.values())), 2)
    errors = sum(o.errors for o in outcomes)
    conflicts = sum(o.conflicts_412 for o in outcomes)
    ok = ops - errors - conflicts  # throughput counts successful responses only
    rate = ok / elapsed if elapsed > 0 else 0.0
    # CPU milliseconds per successful operation: robust against other load
    cpu_ms = {k: round(cpu[k] / rate * 1000, 3) if rate else None
              for k in ("client", "server", "postgres")}
    return Measured(ops=ops, seconds=round(elapsed, 3), throughput=rate, cpu_ms=cpu_ms,
                    p50=_pct(lat, 0.50), p95=_pct(lat, 0.95), p99=_pct(lat, 0.99),
                    errors=errors, statuses=dict(statuses), conflicts_412=conflicts,
                    matches=sum(o.matches for o in outcomes), cpu=cpu,
                    created=[c for o in outcomes for c in o.created])


def wait_quiet(limit: float, busy_max: float = 0.3) -> None:
    """Wait (at most ``limit`` s) until the machine was nearly idle for a second.

    Others may share the machine; their load lands in the measured window as
    ``cpu.other``. This only lowers the odds of that: it does not stop them."""
    ncores = os.cpu_count() or 1
    deadline = time.monotonic() + limit
    busy = float("nan")
    while time.monotonic() < deadline:
        i0, t0 = _idle_cpu(), time.monotonic()
        time.sleep(1.0)
        busy = ncores - (_idle_cpu() - i0) / (time.monotonic() - t0)
        if busy <= busy_max:
            return
    log(f"machine still busy ({busy:.2f} cores in use by others) after {limit:.0f}s; going on")


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _profile_starter(server: Server, outdir: Path, name: str,
                     native: bool = False) -> Callable[[float], Any]:
    def start(seconds: float) -> subprocess.Popen[bytes]:
        assert server.proc is not None
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        out = outdir / f"{name}.txt"
        log(f"profiling {server.name} for {seconds:.0f}s -> {out}")
        return subprocess.Popen(
            [exe, "record", "--pid", str(server.proc.pid), "--subprocesses",
             # native frames need the process paused while its stack is read
             *(("--native",) if native else ("--nonblocking",)), "--rate", "200",
             "--duration", str(max(1, int(seconds))), "--format", "raw",
             "-o", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)

    return start


def _r(x: float, nd: int = 1) -> float:
    return round(x, nd) if x == x else x  # NaN stays NaN


def bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    tmpdir = Path(tempfile.mkdtemp(prefix="carepath-bench-rest-"))
    store = Store(args.db, tmpdir)
    servers: dict[str, Server] = {}
    results: list[dict[str, Any]] = []
    warmup = 0.5 if args.quick else min(2.0, max(0.5, args.seconds * 0.15))
    seconds = 2.0 if args.quick else float(args.seconds)
    procs = args.clients
    conc = split(args.concurrency, procs)
    if min(conc) < 1:
        raise SystemExit("--concurrency must be >= --clients")
    profile_dir = Path(args.profile).resolve() if args.profile else None
    if profile_dir:
        profile_dir.mkdir(parents=True, exist_ok=True)
    try:
        store.setup()
        for target, app in (("floor", "bench.floor:create_app"),
                            ("gateway", "gateway.main:create_app")):
            src = Path(args.gateway_src).resolve() if (
                target == "gateway" and args.gateway_src) else None
            servers[target] = Server(target, app, store.env(target), args.workers, tmpdir, src)
            servers[target].start()
        for s in servers.values():
            s.wait_ready()
        created: dict[str, list[tuple[str, int]]] = {"floor": [], "gateway": []}
        serial = {"create": 0, "transaction": 0}
        # one shared serial range per scenario: floor and gateway get the same bodies
        for scenario in args.scenarios:
            if args.wait_quiet:
                wait_quiet(args.wait_quiet)
            row: dict[str, Any] = {"scenario": scenario}
            for target in ("floor", "gateway"):
                server = servers[target]
                pats = created[target]
                if scenario not in ("create", "transaction") and not pats:
                    raise RuntimeError(f"{scenario} needs patients: run create first")
                est = args.est_rate * (seconds + warmup)
                pregen = int(est) if scenario == "create" else int(est / 3)
                works = []
                for i in range(procs):
                    mine = pats[i::procs] if scenario == "update" else pats
                    works.append(Work(scenario, target, server.base, conc[i], warmup, seconds,
                                      args.seed, i, procs, serial.get(scenario, 0), mine,
                                      pregen // procs, args.client))
                log(f"{scenario} on {target}: {seconds:.0f}s after {warmup:.1f}s warm-up, "
                    f"{args.concurrency} concurrent, {procs} {args.client} client process(es)")
                prof = (_profile_starter(server, profile_dir, f"{store.kind}-{scenario}",
                                         args.profile_native)
                        if profile_dir and target == "gateway" else None)
                m = run_clients(works, server, store.pg_port, prof)
                if scenario == "create":
                    created[target].extend(m.created)
                key = "" if target == "gateway" else "floor_"
                row[f"{key}ops"] = m.ops
                row[f"{key}seconds"] = m.seconds
                row[f"{key}throughput_per_s"] = _r(m.throughput)
                row[f"{key}p50_ms"] = _r(m.p50, 2)
                row[f"{key}p95_ms"] = _r(m.p95, 2)
                row[f"{key}p99_ms"] = _r(m.p99, 2)
                row[f"{key}errors"] = m.errors
                row[f"{key}cpu"] = m.cpu
                row[f"{key}cpu_ms_per_op"] = m.cpu_ms
                bad = {k: v for k, v in m.statuses.items() if k != str(_expected(scenario))}
                if bad:
                    row[f"{key}unexpected_statuses"] = bad
                if scenario == "update":
                    row[f"{key}conflicts_412"] = m.conflicts_412
                if scenario == "transaction":
                    row[f"{key}resources_per_s"] = _r(m.throughput * RESOURCES_PER_BUNDLE)
                if scenario.startswith("search") and target == "gateway" and m.ops:
                    row["mean_matches"] = round(m.matches / max(1, m.ops - m.errors), 2)
                log(f"  {target}: {m.throughput:.0f}/s p50 {m.p50:.1f} ms p99 {m.p99:.1f} ms, "
                    f"errors {m.errors}, cpu {m.cpu}")
            if scenario in serial:
                serial[scenario] += 10_000_000
            row["ratio_to_floor"] = (round(row["throughput_per_s"] / row["floor_throughput_per_s"],
                                           3) if row["floor_throughput_per_s"] else None)
            # the same ratio in CPU spent per operation (client + server + database):
            # what the ratio would be on a machine of our own, free of other load
            gw_ms = sum(v or 0 for v in row["cpu_ms_per_op"].values())
            fl_ms = sum(v or 0 for v in row["floor_cpu_ms_per_op"].values())
            row["cpu_ratio_to_floor"] = round(fl_ms / gw_ms, 3) if gw_ms and fl_ms else None
            row["unit"] = "bundles" if scenario == "transaction" else "requests"
            if scenario == "create":
                row["patients"] = {t: len(created[t]) for t in created}
            results.append(_ordered(row))
            print(json.dumps(results[-1], ensure_ascii=False), flush=True)
        return results
    finally:
        for s in servers.values():
            try:
                s.stop()
            except Exception as exc:
                log(f"stopping {s.name}: {exc!r}")
        try:
            store.teardown()
        except Exception as exc:
            log(f"dropping schema {store.schema}: {exc!r}")
        shutil.rmtree(tmpdir, ignore_errors=True)


_FIRST = ("scenario", "ops", "seconds", "throughput_per_s", "p50_ms", "p95_ms", "p99_ms",
          "errors", "floor_throughput_per_s", "ratio_to_floor")


def _ordered(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: row[k] for k in _FIRST if k in row}
    out.update({k: v for k, v in row.items() if k not in out})
    return out


def check_targets(results: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    by = {r["scenario"]: r for r in results}
    lines = []
    for scenario, metric, threshold, text in TARGETS:
        if scenario not in by:
            continue
        value = by[scenario].get(metric)
        errors = by[scenario].get("errors", 0)
        lines.append({"target": text, "value": value,
                      "met": value is not None and value >= threshold and not errors,
                      "errors": errors, "applies": kind == "postgresql"})
    return lines


def markdown_table(results: list[dict[str, Any]], targets: list[dict[str, Any]]) -> str:
    """The results as a Markdown table (for bench/RESULTS.md)."""
    lines = ["| scenario | gateway /s | p50 ms | p95 ms | p99 ms | errors | floor /s "
             "| floor p50 ms | ratio | CPU ms/op gateway (server+db) | CPU ms/op floor "
             "| CPU ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def ms(cpu: dict[str, float | None]) -> str:
        srv, db = cpu.get("server") or 0.0, cpu.get("postgres") or 0.0
        return f"{srv + db:.2f} ({srv:.2f}+{db:.2f})" if db else f"{srv:.2f}"

    for r in results:
        name = r["scenario"]
        gw, fl = f"{r['throughput_per_s']:.0f}", f"{r['floor_throughput_per_s']:.0f}"
        if name == "transaction":
            name += " (bundles; resources)"
            gw += f"; {r['resources_per_s']:.0f}"
            fl += f"; {r['floor_resources_per_s']:.0f}"
        errs = str(r["errors"])
        if r.get("conflicts_412"):
            errs += f" (+{r['conflicts_412']} 412)"
        lines.append(f"| {name} | {gw} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} | {errs} | {fl} | {r['floor_p50_ms']:.1f} | "
                     f"{r['ratio_to_floor']:.2f} | {ms(r['cpu_ms_per_op'])} | "
                     f"{ms(r['floor_cpu_ms_per_op'])} | {r['cpu_ratio_to_floor']} |")
    if targets:
        lines.append("")
    for t in targets:
        verdict = "met" if t["met"] else "NOT met"
        note = "" if t["applies"] else " (informational: targets are for PostgreSQL)"
        lines.append(f"- target {t['target']}: {t['value']} -> {verdict}{note}")
    return "\n".join(lines)


def summarize_profile(path: str, top: int = 25) -> None:
    """Print self and inclusive time per function of a py-spy ``--format raw`` file."""
    selfc: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in Path(path).read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        # py-spy's first frame is the process/thread label
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        total += n
        if frames:
            selfc[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        print("no samples")
        return
    print(f"{total} samples in {path}")
    layers: Counter[str] = Counter()
    for f, n in selfc.items():
        where = f.rpartition("(")[2]
        layers[where.split("/", 1)[0] if "/" in where else where.split(".py")[0]] += n
    print("\nself % by package of the innermost frame")
    for layer, n in layers.most_common(12):
        print(f"{100 * n / total:6.1f}  {layer}")
    print("\nself %  function")
    for f, n in selfc.most_common(top):
        print(f"{100 * n / total:6.1f}  {f}")
    print("\ninclusive %  function (gateway/ only)")
    shown = 0
    for f, n in incl.most_common():
        if "gateway/" in f:
            print(f"{100 * n / total:6.1f}  {f}")
            shown += 1
            if shown >= top:
                break


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.rest", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default="postgresql://127.0.0.1/test",
                   help="postgresql://… (a fresh schema is created and dropped) or sqlite:///… "
                        "(fresh files in a temp dir are used; the path itself is not touched)")
    p.add_argument("--workers", type=int, default=2, help="uvicorn workers per server (2)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight (16)")
    p.add_argument("--seconds", type=float, default=10, help="measured seconds per scenario (10)")
    p.add_argument("--quick", action="store_true", help="smoke run: ~2 s per scenario")
    p.add_argument("--client", choices=("raw", "httpx"), default="raw",
                   help="raw: HTTP/1.1 keep-alive on asyncio streams (default, ~20x less client "
                        "CPU per request); httpx: httpx.AsyncClient per task")
    p.add_argument("--clients", type=int, default=1,
                   help="client processes sharing --concurrency (1; see bench/README.md)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated subset of {','.join(SCENARIOS)} (create always runs "
                        "first when another scenario needs patients)")
    p.add_argument("--seed", type=int, default=20240601, help="seed of the synthetic data")
    p.add_argument("--est-rate", type=float, default=4000,
                   help="expected ceiling of creates/s, sizes the pre-serialised body pools")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                   help="before each scenario wait up to S seconds for the machine to be idle "
                        "(for shared machines; 0 = don't)")
    p.add_argument("--gateway-src", metavar="DIR",
                   help="run the gateway from this source tree (e.g. `git archive <commit>` "
                        "unpacked) instead of this checkout")
    p.add_argument("--profile", metavar="DIR",
                   help="record each gateway scenario with py-spy (raw stacks) into DIR")
    p.add_argument("--profile-native", action="store_true",
                   help="with --profile: record native frames too (C extensions, system"
                        " calls; pauses the workers while sampling)")
    p.add_argument("--out", metavar="FILE", help="also write all result lines as JSON to FILE")
    p.add_argument("--profile-summary", metavar="FILE",
                   help="print the hottest functions of a py-spy raw file, then exit")
    args = p.parse_args(argv)
    wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(wanted) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if any(s not in ("create", "transaction") for s in wanted) and "create" not in wanted:
        wanted.insert(0, "create")
    args.scenarios = [s for s in SCENARIOS if s in wanted]
    if not args.db.startswith(("sqlite:", "postgresql:", "postgres:")):
        p.error("--db must be postgresql://… or sqlite:///…")
    if not args.quick and args.seconds <= 0:
        p.error("--seconds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.profile_summary:
        summarize_profile(args.profile_summary)
        return 0
    for host in (args.db.split("@")[-1].split("/")[2:3] if "://" in args.db else []):
        name = host.split(":")[0]
        if name and name not in ("127.0.0.1", "localhost", "[::1]", "::1"):
            raise SystemExit(f"--db must be on this machine (127.0.0.1), not {name!r}")

    def on_term(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)  # also when started with SIGINT ignored (&)
    kind = "sqlite" if args.db.startswith("sqlite:") else "postgresql"
    if args.gateway_src:
        log(f"gateway source: {Path(args.gateway_src).resolve()}")
    log(f"{server_version(args.db)}; "
        f"{os.cpu_count()} cores; workers {args.workers}, concurrency {args.concurrency}, "
        f"client {args.client} x {args.clients} process(es)")
    try:
        results = bench(args)
    except KeyboardInterrupt:
        log("interrupted; cleaned up")
        return 130
    targets = check_targets(results, kind)
    for t in targets:
        print(json.dumps(t), flush=True)
    print(markdown_table(results, targets), file=sys.stderr)
    if kind != "postgresql":
        log("targets are set for PostgreSQL; shown for information only")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()},
                                              "results": results, "targets": targets},
                                             indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
