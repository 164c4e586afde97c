"""Over HTTP: gzip (compressed responses for clients that accept them, compressed
request bodies, what is refused: decompression bombs, broken streams) and CORS."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from gateway.api.app import HttpRequest, _may_take_long, accepts_gzip
from gateway.settings import Settings
from gateway.storage.db import RetryableError
from gateway.storage.sql import SqlStore
from tests.api.helpers import FHIR, gw_code, patient, post
from tests.conftest import PG_URL, RunningServer, backend_settings, unique


@pytest.mark.parametrize(("header", "expected"), [
    ("gzip", True), ("gzip, deflate, br", True), ("br;q=1.0, gzip;q=0.5", True),
    ("*", True), ("x-gzip", True), ("GZIP", True),
    (None, False), ("", False), ("identity", False), ("br", False),
    ("gzip;q=0", False), ("gzip;q=0.000", False), ("*;q=0", False),
    ("gzip;q=0, *", False), ("br, *;q=0.1", True), ("gzip;q=nonsense", False),
])
def test_accept_encoding(header: str | None, expected: bool) -> None:
    assert accepts_gzip(header) is expected


def _raw(client: httpx.Client, path: str, **headers: str) -> httpx.Response:
    """The response as it came over the wire (no automatic decoding)."""
    with client.stream("GET", path, headers=headers) as response:
        response.raw = b"".join(response.iter_raw())  # type: ignore[attr-defined]
    return response


@pytest.mark.parametrize("inline_max", [1 << 20, 1_000])  # compressed on the loop / a thread
def test_large_responses_are_gzipped_for_clients_that_accept_it(
        client: httpx.Client, inline_max: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gateway.api.app._GZIP_INLINE_MAX", inline_max)
    family = unique("Zip")
    for i in range(8):  # about 1.5 KB each: a Bundle of all is over the 8 KiB threshold
        post(client, patient(unique("mrn"), family=family,
                             address=[{"line": [f"Hauptstrasse {i}, Hinterhaus " * 40]}]))
    big = _raw(client, f"/Patient?family={family}", **{"Accept-Encoding": "gzip"})
    assert big.status_code == 200
    assert big.headers["Content-Encoding"] == "gzip"
    assert "Accept-Encoding" in big.headers["Vary"]
    assert int(big.headers["Content-Length"]) == len(big.raw)  # type: ignore[attr-defined]
    bundle = json.loads(gzip.decompress(big.raw))  # type: ignore[attr-defined]
    assert bundle["total"] == 8
    plain = _raw(client, f"/Patient?family={family}", **{"Accept-Encoding": "identity"})
    assert "Content-Encoding" not in plain.headers
    assert json.loads(plain.raw)["total"] == 8  # type: ignore[attr-defined]
    # a small body is not worth compressing
    one = post(client, patient(unique("mrn"))).json()
    small = _raw(client, f"/Patient/{one['id']}", **{"Accept-Encoding": "gzip"})
    assert "Content-Encoding" not in small.headers
    assert json.loads(small.raw)["id"] == one["id"]  # type: ignore[attr-defined]


def test_gzip_request_bodies(client: httpx.Client) -> None:
    resource = patient(unique("mrn"))
    headers = {"Content-Type": FHIR, "Content-Encoding": "gzip"}
    created = client.post("/Patient", content=gzip.compress(json.dumps(resource).encode()),
                          headers=headers)
    assert created.status_code == 201, created.text
    assert created.json()["identifier"] == resource["identifier"]

    broken = client.post("/Patient", content=b"not gzip at all", headers=headers)
    assert (broken.status_code, gw_code(broken)) == (400, "GW-1026")
    truncated = gzip.compress(json.dumps(resource).encode())[:-12]
    cut = client.post("/Patient", content=truncated, headers=headers)
    assert (cut.status_code, gw_code(cut)) == (400, "GW-1026")
    other = client.post("/Patient", content=json.dumps(resource).encode(),
                        headers={**headers, "Content-Encoding": "br"})
    assert (other.status_code, gw_code(other)) == (415, "GW-1008")
    # RFC 1952 2.2: a gzip file is a series of members (gzip -c a b > c)
    text = json.dumps(resource).encode()
    members = gzip.compress(text[:20]) + gzip.compress(text[20:])
    joined = client.post("/Patient", content=members, headers=headers)
    assert joined.status_code == 201, joined.text
    trailing = client.post("/Patient", content=gzip.compress(text) + b"junk", headers=headers)
    assert (trailing.status_code, gw_code(trailing)) == (400, "GW-1026")


def test_a_resource_sent_as_a_form_is_refused_with_the_reason(client: httpx.Client) -> None:
    # what curl -d sends unless told otherwise
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    body = json.dumps(patient(unique("mrn"))).encode()
    for response in (client.post("/Patient", content=body, headers=form),
                     client.put(f"/Patient/{unique('id')}", content=body, headers=form),
                     client.post("/", content=body, headers=form)):
        assert (response.status_code, gw_code(response)) == (415, "GW-1008")
        assert "application/fhir+json" in response.json()["issue"][0]["diagnostics"]
    # the body of a search, as it should be
    searched = client.post("/Patient/_search", content=b"_count=1", headers=form)
    assert searched.status_code == 200 and searched.json()["type"] == "searchset"


def test_a_decompression_bomb_stops_at_the_size_limit(client: httpx.Client) -> None:
    # 10 KB on the wire, 64 MiB inflated (the default limit is 10 MiB)
    bomb = gzip.compress(b'{"resourceType":"Patient","x":"' + b"0" * (64 << 20) + b'"}')
    assert len(bomb) < 100_000
    response = client.post("/Patient", content=bomb,
                           headers={"Content-Type": FHIR, "Content-Encoding": "gzip"})
    assert (response.status_code, gw_code(response)) == (413, "GW-1011")


def test_a_gzip_body_is_bounded_as_sent_as_well_as_decoded(client: httpx.Client) -> None:
    """Empty gzip members decode to nothing: a chunked body (no Content-Length to
    refuse up front) of ever more of them is cut off at the size limit as sent."""
    limit = 10 << 20  # the default CAREPATH_MAX_REQUEST_BYTES
    empty = gzip.compress(b"", mtime=0) * 4096
    text = json.dumps(patient(unique("mrn"))).encode()

    def chunks() -> Any:
        for _ in range(limit // len(empty) + 2):
            yield empty
        yield gzip.compress(text)

    started = time.perf_counter()
    response = client.post("/Patient", content=chunks(),
                           headers={"Content-Type": FHIR, "Content-Encoding": "gzip"})
    assert (response.status_code, gw_code(response)) == (413, "GW-1011"), response.text
    assert time.perf_counter() - started < 5.0
    # a few empty members before the resource are still a gzip body
    fine = client.post("/Patient", content=gzip.compress(b"") * 3 + gzip.compress(text),
                       headers={"Content-Type": FHIR, "Content-Encoding": "gzip"})
    assert fine.status_code == 201, fine.text


def test_many_gzip_members_in_one_chunk_cost_linear_time() -> None:
    """zlib copies what follows the end of a member; fed whole, a chunk of many small
    members was copied once per member (2 MB of empty members: seconds, not ms)."""
    empty = gzip.compress(b"", mtime=0)
    body = empty * ((2 << 20) // len(empty)) + gzip.compress(b"{}")
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, object]:
        return messages.pop()

    request = HttpRequest("POST", "Patient", "", {"content-length": str(len(body)),
                                                  "content-encoding": "gzip"}, None, receive)
    started = time.perf_counter()
    assert asyncio.run(request.body(10 << 20)) == b"{}"
    assert time.perf_counter() - started < 1.5


def test_cors_for_configured_origins(tmp_path: Path) -> None:
    """Preflight and actual requests of an allowed browser origin; others get no
    CORS headers (and a refused preflight), and without the setting nothing changes."""
    app_origin = "https://app.example.org"
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'cors.db'}",
                        cors_origins=f"{app_origin}, https://other.example.org/")
    with RunningServer(settings) as running:
        preflight = httpx.options(f"{running.url}/Patient", headers={
            "Origin": app_origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, if-match,"
                                              " x-request-id"})
        assert preflight.status_code == 204
        h = preflight.headers
        assert h["Access-Control-Allow-Origin"] == app_origin
        assert "POST" in h["Access-Control-Allow-Methods"]
        assert {"authorization", "content-type", "if-match", "x-request-id"} <= {
            x.strip().lower() for x in h["Access-Control-Allow-Headers"].split(",")}
        assert "Origin" in h["Vary"]
        created = httpx.post(f"{running.url}/Patient", json=patient(unique("mrn")),
                             headers={"Origin": app_origin, "Content-Type": FHIR})
        assert created.status_code == 201
        assert created.headers["Access-Control-Allow-Origin"] == app_origin
        exposed = {x.strip() for x in created.headers["Access-Control-Expose-Headers"].split(",")}
        assert {"Location", "ETag", "X-Request-ID"} <= exposed
        # an origin not configured: refused preflight, no CORS headers on requests
        evil = "https://evil.example"
        refused = httpx.options(f"{running.url}/Patient", headers={
            "Origin": evil, "Access-Control-Request-Method": "GET"})
        assert refused.status_code == 403
        assert "Access-Control-Allow-Origin" not in refused.headers
        read = httpx.get(f"{running.url}/metadata", headers={"Origin": evil})
        assert read.status_code == 200 and "Access-Control-Allow-Origin" not in read.headers
        # every answer varies by Origin, so that a cache keeps them apart
        assert "Origin" in read.headers["Vary"]
        assert "Origin" in httpx.get(f"{running.url}/metadata").headers["Vary"]
        assert httpx.get(f"{running.url}/metadata", headers={
            "Origin": "https://other.example.org"}).headers["Access-Control-Allow-Origin"] == \
            "https://other.example.org"


def test_cors_allows_what_a_browser_client_asks_and_credentials_from_named_origins(
        tmp_path: Path) -> None:
    """Medplum's client sends ``X-Medplum`` and fetches in credentials mode: the
    preflight allows the headers asked for, and an origin named in the setting may
    send credentials. Under ``*`` any origin is answered, never with credentials."""
    named = "https://app.example.org"
    for origins, credentials in ((named, True), ("*", False)):
        settings = Settings(database_url=f"sqlite:///{tmp_path / f'cors{credentials}.db'}",
                            cors_origins=origins)
        with RunningServer(settings) as running:
            preflight = httpx.options(f"{running.url}/Patient/x", headers={
                "Origin": named, "Access-Control-Request-Method": "PUT",
                "Access-Control-Request-Headers": "authorization,content-type,if-match,"
                                                  "x-medplum"})
            assert preflight.status_code == 204
            allowed = {x.strip().lower()
                       for x in preflight.headers["Access-Control-Allow-Headers"].split(",")}
            assert {"authorization", "content-type", "if-match", "x-medplum"} <= allowed
            made = httpx.post(f"{running.url}/Patient", json=patient(unique("mrn")),
                              headers={"Origin": named, "Content-Type": FHIR})
            assert made.status_code == 201
            for answer in (preflight, made):
                assert answer.headers["Access-Control-Allow-Origin"] == named
                assert (answer.headers.get("Access-Control-Allow-Credentials") == "true") \
                    is credentials
            # a header list that is not one is not echoed
            odd = httpx.options(f"{running.url}/Patient", headers={
                "Origin": named, "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "x-a, set-cookie: a=b"})
            assert "set-cookie" not in odd.headers["Access-Control-Allow-Headers"].lower()


def test_no_cors_unless_configured(client: httpx.Client) -> None:
    preflight = client.options("/Patient", headers={
        "Origin": "https://app.example.org", "Access-Control-Request-Method": "GET"})
    assert "Access-Control-Allow-Origin" not in preflight.headers
    assert preflight.status_code == 405
    read = client.get("/metadata", headers={"Origin": "https://app.example.org"})
    assert "Access-Control-Allow-Origin" not in read.headers


def test_an_internal_error_names_its_request(tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """A stored resource that is no longer JSON (damaged outside the gateway) is a 500
    OperationOutcome, never a bare one, naming the request id the log names too."""
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'damaged.db'}")
    with RunningServer(settings) as running:
        made = httpx.post(f"{running.url}/Patient", json=patient(unique("mrn")),
                          headers={"Content-Type": FHIR}).json()
        with sqlite3.connect(tmp_path / "damaged.db") as db:
            db.execute("UPDATE resource SET content = ? WHERE res_id = ?",
                       (b"{not json", made["id"]))
        with caplog.at_level(logging.ERROR, logger="carepath"):
            broken = httpx.get(f"{running.url}/Patient/{made['id']}",
                               params={"_elements": "name"},
                               headers={"X-Request-ID": "support-case-17"})
    assert broken.status_code == 500 and gw_code(broken) == "GW-5001"
    assert broken.headers["x-request-id"] == "support-case-17"
    assert "support-case-17" in broken.json()["issue"][0]["diagnostics"]
    assert any("support-case-17" in r.getMessage() for r in caplog.records)


def test_a_database_busy_beyond_its_retries_is_a_503_to_repeat(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lost race outside a retried write (here keeping a long result for paging,
    and counting clients to know whether tokens are required) is a 503 with
    GW-5004 and ``Retry-After``, not an internal error; the same request answers
    once the database is free again."""
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'busy.db'}", default_page_size=2)
    family = unique("Busy")
    with RunningServer(settings) as running, httpx.Client(base_url=running.url) as http:
        for _ in range(3):
            assert post(http, patient(unique("mrn"), family)).status_code == 201

        async def busy(*_args: object, **_kw: object) -> None:
            raise RetryableError("database is locked")

        with monkeypatch.context() as patched:
            patched.setattr(SqlStore, "save_snapshot", busy)
            paged = http.get("/Patient", params={"family": family})
        assert paged.status_code == 503 and gw_code(paged) == "GW-5004"
        assert paged.headers["retry-after"] == "5"
        assert paged.json()["issue"][0]["code"] == "transient"
        again = http.get("/Patient", params={"family": family})
        assert again.status_code == 200 and again.json()["total"] == 3

        with monkeypatch.context() as patched:
            patched.setattr("gateway.storage.security.count_clients", busy)
            patched.setattr("gateway.security.auth.DEV_RECHECK_SECONDS", -1)
            who = http.get("/Patient", params={"family": family})
        assert who.status_code == 503 and gw_code(who) == "GW-5004"


@pytest.mark.parametrize(("method", "path", "headers", "watched"), [
    ("GET", "Patient", {}, True),
    ("GET", "", {}, True),
    ("GET", "_history", {}, True),
    ("GET", "Patient/_history", {}, True),
    ("GET", "Patient/p1/_history", {}, True),
    ("GET", "Patient/p1/$everything", {}, True),
    ("GET", "Patient/p1/Observation", {}, True),
    ("HEAD", "Observation", {}, True),
    ("GET", "Patient/p1", {}, False),  # a read by id: one lookup
    ("GET", "Patient/p1/_history/2", {}, False),
    ("GET", "metadata", {}, False),
    ("GET", "Patient", {"content-length": "3"}, False),  # its body is read instead
    ("POST", "Patient/_search", {}, False),
    ("DELETE", "Patient?identifier=x", {}, False),
])
def test_which_requests_stop_when_their_client_goes(
        method: str, path: str, headers: dict[str, str], watched: bool) -> None:
    request = HttpRequest(method, path, "", headers, None, _never)
    assert _may_take_long(request) is watched


async def _never() -> dict[str, object]:
    raise AssertionError("not read")


def _count_search(url: str, form: str, timeout: float) -> httpx.Response:
    """``Patient?_summary=count`` as a GET, a ``POST _search`` or a batch entry."""
    if form == "get":
        return httpx.get(f"{url}/Patient", params={"_summary": "count"}, timeout=timeout)
    if form == "post":
        return httpx.post(f"{url}/Patient/_search", content=b"_summary=count", timeout=timeout,
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
    return httpx.post(f"{url}/", timeout=timeout, json={
        "resourceType": "Bundle", "type": "batch",
        "entry": [{"request": {"method": "GET", "url": "Patient?_summary=count"}}]},
        headers={"Content-Type": "application/fhir+json"})


@pytest.mark.parametrize("form", ["get", "post", "batch"])
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_search_stops_when_its_client_goes(
        backend: str, form: str, tmp_path: Path, new_schema: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that gives up on a search (its timeout passes and it closes the
    connection) stops it: the statement running for it is cancelled (PostgreSQL) or
    interrupted (SQLite), instead of holding the database until it ends. The next
    request is answered as ever. A search sent with content (``POST _search``, a
    batch of reads) too, once its content is read."""
    started, stopped = threading.Event(), threading.Event()

    async def slow_count(self: SqlStore, *_args: object, **_kw: object) -> int:
        started.set()
        try:
            async with self.db.read() as conn:
                await conn.fetchrow(f"SELECT pg_sleep(30), '{marker}'"
                                    if self.db.dialect == "postgresql" else SQLITE_SLOW)
        except asyncio.CancelledError:
            stopped.set()
            raise
        return 0

    marker = unique("gone")
    monkeypatch.setattr(SqlStore, "count", slow_count)
    settings = backend_settings(backend, tmp_path, new_schema)
    with RunningServer(settings) as running:
        t0 = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            _count_search(running.url, form, timeout=1)
        assert started.is_set()
        assert stopped.wait(10), "the search went on after its client left"
        assert time.monotonic() - t0 < 10
        if backend == "postgresql":
            deadline = time.monotonic() + 10
            while _pg_running(marker) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not _pg_running(marker), "the statement still runs on PostgreSQL"
        monkeypatch.undo()
        answer = httpx.get(f"{running.url}/Patient", params={"_summary": "count"}, timeout=10)
        assert answer.status_code == 200 and answer.json()["total"] == 0


@pytest.mark.parametrize("form", ["get", "post", "batch"])
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_search_is_stopped_after_the_query_timeout_in_all(
        backend: str, form: str, tmp_path: Path, new_schema: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each statement is bounded by the statement timeout, and a search runs several
    (a batch one per entry): ``CAREPATH_QUERY_TIMEOUT_S`` bounds them together, 503
    GW-5003, and the statement running then is stopped. A write is not held to it."""
    stopped = threading.Event()

    async def slow_count(self: SqlStore, *_args: object, **_kw: object) -> int:
        try:
            async with self.db.read() as conn:
                await conn.fetchrow("SELECT pg_sleep(30)" if self.db.dialect == "postgresql"
                                    else SQLITE_SLOW)
        except asyncio.CancelledError:
            stopped.set()
            raise
        return 0

    monkeypatch.setattr(SqlStore, "count", slow_count)
    settings = backend_settings(backend, tmp_path, new_schema, query_timeout_s=1.0)
    with RunningServer(settings) as running:
        t0 = time.monotonic()
        answer = _count_search(running.url, form, timeout=30)
        assert time.monotonic() - t0 < 10
        # (a batch as a whole: its entries share the request's time)
        assert answer.status_code == 503, answer.text
        assert answer.json()["issue"][0]["details"]["coding"][0]["code"] == "GW-5003"
        assert stopped.wait(10)
        made = httpx.post(f"{running.url}/Patient", json={"resourceType": "Patient"},
                          headers={"Content-Type": "application/fhir+json"}, timeout=10)
        assert made.status_code == 201


#: minutes of counting, unless interrupted
SQLITE_SLOW = ("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n"
               " WHERE i < 5000000000) SELECT count(*) FROM n")


def _pg_running(marker: str) -> bool:
    async def query() -> bool:
        conn = await asyncpg.connect(PG_URL)
        try:
            return bool(await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
                " AND query LIKE '%pg_sleep%' AND query LIKE $1", f"%{marker}%"))
        finally:
            await conn.close()

    return asyncio.run(query())


def test_a_correlation_id_is_echoed(client: httpx.Client) -> None:
    """http.html#custom: ``X-Correlation-Id``, "a client assigned request id echoed
    back in the response"; one that is not a plain token is not repeated."""
    response = client.get("/metadata", params={"_summary": "true"},
                          headers={"X-Correlation-Id": "corr-123"})
    assert response.headers["X-Correlation-Id"] == "corr-123"
    refused = client.get("/Patient/bad$id", headers={"X-Correlation-Id": "corr-124"})
    assert refused.status_code == 400 and refused.headers["X-Correlation-Id"] == "corr-124"
    odd = client.get("/metadata", params={"_summary": "true"},
                     headers={"X-Correlation-Id": "a b\tc"})
    assert "X-Correlation-Id" not in odd.headers


def test_the_host_header_is_a_host_and_port(client: httpx.Client) -> None:
    """RFC 9112 3.2: an HTTP/1.1 request without Host, with two, or with one that is not
    a host and port is answered 400; the value would be written into Location and
    every link (``Host: evil.example/x?y=`` made ``http://evil.example/x?y=/fhir/…``)."""
    import socket

    url = httpx.URL(str(client.base_url))
    body = json.dumps(patient(unique("mrn"))).encode()

    def raw(head: bytes) -> bytes:
        with socket.create_connection((url.host, url.port or 80), timeout=10) as sock:
            sock.sendall(head + b"Content-Type: application/fhir+json\r\nConnection: close\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            return answer

    post_line = f"POST {url.path.rstrip('/')}/Patient HTTP/1.1\r\n".encode()
    for head in (b"Host: evil.example/x?y=\r\n", b"Host: a.example\r\nHost: b.example\r\n",
                 b"Host: a b\r\n", b""):
        answer = raw(post_line + head)
        assert answer.startswith(b"HTTP/1.1 400"), (head, answer[:200])
        assert b"GW-1020" in answer
    good = raw(post_line + f"Host: {url.host}:{url.port}\r\n".encode())
    assert good.startswith(b"HTTP/1.1 201"), good[:200]
    assert f"location: http://{url.host}:{url.port}/".encode() in good.lower()
    ipv6 = raw(post_line + b"Host: [::1]:8080\r\n")
    assert ipv6.startswith(b"HTTP/1.1 201") and b"http://[::1]:8080/" in ipv6
    # HTTP/1.0 had no Host
    old = raw(post_line.replace(b"HTTP/1.1", b"HTTP/1.0"))
    assert old.startswith(b"HTTP/1.1 201"), old[:200]
