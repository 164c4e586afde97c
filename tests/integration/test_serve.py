"""``carepath serve`` as users start it: defaults, start-up time, restarts."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import time
from pathlib import Path

import httpx
import websockets

from gateway.storage.schema import MIGRATIONS
from tests.conftest import PG_URL
from tests.integration.serve import Served


def test_serve_defaults_to_sqlite_in_the_working_directory(tmp_path: Path) -> None:
    with Served({"CAREPATH_DATABASE_URL": "sqlite:///./carepath.db"}, cwd=tmp_path) as served:
        assert served.ready_after is not None and served.ready_after < 5
        cs = httpx.get(f"{served.url}/metadata").json()
        assert cs["fhirVersion"] == "4.0.1"
        created = httpx.post(f"{served.url}/Patient", json={"resourceType": "Patient"},
                             headers={"Content-Type": "application/fhir+json"})
        assert created.status_code == 201
    assert (tmp_path / "carepath.db").exists()
    # the resource was durably committed: it is in the file after the server stopped
    with sqlite3.connect(tmp_path / "carepath.db") as db:
        count = db.execute("SELECT count(*) FROM resource WHERE res_type = 'Patient'"
                           ).fetchone()[0]
    assert count == 1
    # starting again on the same database is safe: migrations are not re-applied
    with Served({"CAREPATH_DATABASE_URL": "sqlite:///./carepath.db"}, cwd=tmp_path) as served:
        rid = created.json()["id"]
        assert httpx.get(f"{served.url}/Patient/{rid}").status_code == 200
    with sqlite3.connect(tmp_path / "carepath.db") as db:
        versions = [v for (v,) in db.execute("SELECT version FROM schema_version")]
    assert versions == sorted(set(versions))  # each migration once
    assert versions == sorted(v for v, _, _ in MIGRATIONS)


def test_two_processes_starting_together_on_postgresql(new_schema) -> None:  # type: ignore[no-untyped-def]
    schema = new_schema()
    env = {"CAREPATH_DATABASE_URL": PG_URL, "CAREPATH_DATABASE_SCHEMA": schema}
    a, b = Served(env), Served(env)
    a.start()
    b.start()  # both migrate the fresh schema at once
    with a.wait_ready(), b.wait_ready():
        for served in (a, b):
            assert httpx.get(f"{served.url}/metadata").status_code == 200
        created = httpx.post(f"{a.url}/Patient", json={"resourceType": "Patient"},
                             headers={"Content-Type": "application/fhir+json"}).json()
        assert httpx.get(f"{b.url}/Patient/{created['id']}").status_code == 200


def test_startup_objects_are_kept_out_of_full_collections(server) -> None:  # type: ignore[no-untyped-def]
    """A full cyclic-collector pass over the registry and the compiled validator stalls
    every request of the process (about 90 ms); startup freezes them once."""
    import gc

    assert httpx.get(f"{server.url}/metadata").status_code == 200
    assert gc.get_freeze_count() > 50_000


def test_an_idle_connection_outlives_client_pools(tmp_path: Path) -> None:
    """A connection left idle for longer than client pools keep theirs (httpx, Node:
    5 s) is still open: the client closes it first, and never sends a request into a
    connection the server is closing. ``CAREPATH_KEEP_ALIVE_S`` sets the limit."""
    import socket
    import time
    from urllib.parse import urlsplit

    def exchange(sock: socket.socket, path: str) -> bytes:
        """One request and its whole answer (b"": the server had closed)."""
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body

    for keep_alive, open_after in (("", True), ("1", False)):
        env = {"CAREPATH_DATABASE_URL": f"sqlite:///{tmp_path}/k{keep_alive}.db"}
        if keep_alive:
            env["CAREPATH_KEEP_ALIVE_S"] = keep_alive
        with Served(env) as served:
            url = urlsplit(served.url)
            with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
                assert exchange(sock, f"{url.path}/metadata?_elements=fhirVersion"
                                ).startswith(b"HTTP/1.1 200")
                time.sleep(6)
                try:
                    reply = exchange(sock, f"{url.path}/metadata?_elements=fhirVersion")
                except ConnectionError:
                    reply = b""
                assert reply.startswith(b"HTTP/1.1 200") is open_after, (keep_alive, reply)


def test_a_profile_stored_through_one_process_holds_in_another(new_schema) -> None:  # type: ignore[no-untyped-def]
    """Each worker keeps the profiles stored on the server compiled, and notices from
    the history when they change: a profile stored, changed or deleted through one
    process holds in the next write through another."""
    import copy
    import gzip
    import json

    from tests.conftest import PG_URL

    data = Path(__file__).resolve().parent.parent / "data" / "ig-profiles.ndjson.gz"
    with gzip.open(data, "rt", encoding="utf-8") as f:
        profile = next(json.loads(row["text"]) for row in map(json.loads, f)
                       if row["file"] == "StructureDefinition-Patient-uv-ips.json")
    fhir = {"Content-Type": "application/fhir+json"}
    nameless = {"resourceType": "Patient", "birthDate": "1970-01-01",
                "meta": {"profile": [profile["url"]]}}
    env = {"CAREPATH_DATABASE_URL": PG_URL, "CAREPATH_DATABASE_SCHEMA": new_schema()}
    with Served(env) as a, Served(env) as b:
        # b compiles what is stored (nothing) first
        assert httpx.post(f"{b.url}/Patient", json=nameless, headers=fhir).status_code == 201
        stored = httpx.put(f"{a.url}/StructureDefinition/{profile['id']}", json=profile,
                           headers=fhir)
        assert stored.status_code == 201, stored.text
        assert httpx.post(f"{b.url}/Patient", json=nameless, headers=fhir).status_code == 422
        relaxed = copy.deepcopy(profile)
        for element in relaxed["snapshot"]["element"]:
            if element["path"] == "Patient.name":
                element["min"] = 0
        assert httpx.put(f"{a.url}/StructureDefinition/{profile['id']}", json=relaxed,
                         headers=fhir).status_code == 200
        assert httpx.post(f"{b.url}/Patient", json=nameless, headers=fhir).status_code == 201
        assert httpx.delete(f"{a.url}/StructureDefinition/{profile['id']}").status_code == 204
        del nameless["birthDate"]
        assert httpx.post(f"{b.url}/Patient", json=nameless, headers=fhir).status_code == 201


def test_the_address_flags_reach_the_server(tmp_path: Path) -> None:
    """``--host`` and ``--port`` are the server's address for everything it decides by
    it, not only for the socket: the URLs it writes into notifications and
    ``$status`` name that port, and an address beyond loopback is never dev mode."""
    env = {"CAREPATH_DATABASE_URL": f"sqlite:///{tmp_path / 'flags.db'}"}
    with Served(env) as served:
        subscription = httpx.post(f"{served.url}/Subscription", json={
            "resourceType": "Subscription", "status": "off", "reason": "test",
            "criteria": "https://carepath-gateway.org/fhir/SubscriptionTopic/referral-created",
            "channel": {"type": "rest-hook", "endpoint": "http://127.0.0.1:9/hook",
                        "payload": "application/fhir+json"}},
            headers={"Content-Type": "application/fhir+json"})
        assert subscription.status_code == 201, subscription.text
        sid = subscription.json()["id"]
        status = httpx.get(f"{served.url}/Subscription/{sid}/$status").json()
        parameters = status["entry"][0]["resource"]["parameter"]
        named = next(p["valueReference"]["reference"] for p in parameters
                     if p["name"] == "subscription")
        assert named == f"{served.url}/Subscription/{sid}", named
    # bound beyond loopback with no client registered: refused, not served openly
    try:
        with Served(env, args=("--host", "0.0.0.0")) as served:
            response = httpx.get(f"{served.url}/Patient")
            raise AssertionError(f"served without authentication: {response.status_code}")
    except RuntimeError as exc:
        assert "refusing to serve on 0.0.0.0 without authentication" in str(exc), exc


def test_a_request_head_beyond_the_bound_is_refused(tmp_path: Path) -> None:
    """httptools gathers a header for as long as it is sent (150 MB headers held a
    worker's memory): past 128 KiB of head, 431 and the connection closed; a large
    body behind a small head is not a large head."""
    import socket

    env = {"CAREPATH_DATABASE_URL": f"sqlite:///{tmp_path / 'head.db'}"}
    with Served(env) as served:
        with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
            sock.sendall(b"GET /fhir/metadata HTTP/1.1\r\nHost: x\r\nX-Big: ")
            answer = b""
            try:
                for _ in range(64):  # 4 MiB, unless the server closes first
                    sock.sendall(b"a" * 65536)
            except OSError:
                pass  # closed on us
            try:
                while chunk := sock.recv(65536):
                    answer += chunk
            except OSError:
                pass
        assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
        patient = {"resourceType": "Patient", "text": {
            "status": "generated",
            "div": '<div xmlns="http://www.w3.org/1999/xhtml">' + "x" * 300_000 + "</div>"}}
        created = httpx.post(f"{served.url}/Patient", json=patient,
                             headers={"Content-Type": "application/fhir+json"})
        assert created.status_code == 201, created.text[:300]
        near = httpx.get(f"{served.url}/metadata", params={"_summary": "true"},
                         headers={"X-Note": "n" * 100_000})
        assert near.status_code == 200
        # a head that ends in the read that takes it past the bound is counted too
        for size in (135_000, 190_000):
            with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock:
                sock.sendall(b"GET /fhir/metadata?_summary=true HTTP/1.1\r\nHost: x\r\n"
                             b"Connection: close\r\nX-Big: " + b"a" * size + b"\r\n\r\n")
                answer = _read_all(sock)
            assert answer.startswith(b"HTTP/1.1 431"), (size, answer[:100])


def test_a_write_is_never_dated_after_its_response(tmp_path: Path) -> None:
    """RFC 9110 8.8.2.1: no Last-Modified later than the response's Date (uvicorn's
    Date is made once a second and ran up to a second behind every write)."""
    from email.utils import parsedate_to_datetime

    env = {"CAREPATH_DATABASE_URL": f"sqlite:///{tmp_path / 'date.db'}"}
    with Served(env) as served, httpx.Client(base_url=served.url, timeout=30) as client:
        late = []
        for i in range(12):
            time.sleep(0.09 * (i % 4))  # at different points of a second
            reply = client.put("/Patient/dated", json={"resourceType": "Patient", "id": "dated"},
                               headers={"Content-Type": "application/fhir+json"})
            assert reply.status_code in (200, 201), reply.text
            dates = reply.headers.get_list("date")
            assert len(dates) == 1, dates
            if parsedate_to_datetime(reply.headers["last-modified"]) > \
                    parsedate_to_datetime(dates[0]):
                late.append((reply.headers["last-modified"], dates[0]))
        assert late == []


def _read_all(sock: socket.socket) -> bytes:
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except OSError:
        pass
    return answer


def test_a_request_sent_too_slowly_is_timed_out(tmp_path: Path) -> None:
    """A request's head must arrive within CAREPATH_REQUEST_HEAD_TIMEOUT_S (408, closed)
    and its body may not pause longer than CAREPATH_REQUEST_BODY_TIMEOUT_S: a client
    that opens connections and sends slowly holds none of them (uvicorn alone kept
    them for good). A request sent at a normal pace is not affected."""
    env = {"CAREPATH_DATABASE_URL": f"sqlite:///{tmp_path / 'slow.db'}",
           "CAREPATH_REQUEST_HEAD_TIMEOUT_S": "1.5", "CAREPATH_REQUEST_BODY_TIMEOUT_S": "1.5"}
    with Served(env) as served:
        def opened() -> socket.socket:
            return socket.create_connection(("127.0.0.1", served.port), timeout=20)

        started = time.monotonic()
        with opened() as silent, opened() as trickle, opened() as stalled:
            trickle.sendall(b"GET /fhir/metadata HTTP/1.1\r\nHost: x\r\n")
            stalled.sendall(b"POST /fhir/Patient HTTP/1.1\r\nHost: x\r\n"
                            b"Content-Type: application/fhir+json\r\nContent-Length: 40\r\n"
                            b"\r\n{\"resourceType\":")
            for _ in range(3):  # a header a second: each in time, the head not
                time.sleep(1)
                try:
                    trickle.sendall(b"X-More: 1\r\n")
                except OSError:
                    break  # closed on us
            answers = [_read_all(s) for s in (silent, trickle, stalled)]
        assert time.monotonic() - started < 15
        assert answers[0].startswith(b"HTTP/1.1 408"), answers[0][:100]
        assert answers[1].startswith(b"HTTP/1.1 408"), answers[1][:100]
        assert answers[2] == b"", answers[2][:100]  # a body that stopped: closed
        # a client that keeps up: a body sent in parts, each within the pause allowed
        with opened() as steady:
            body = json.dumps({"resourceType": "Patient", "active": True}).encode()
            steady.sendall(b"POST /fhir/Patient HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                           b"Content-Type: application/fhir+json\r\n"
                           b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
            for part in (body[:10], body[10:20], body[20:]):
                time.sleep(0.8)
                steady.sendall(part)
            assert _read_all(steady).startswith(b"HTTP/1.1 201")
        assert httpx.get(f"{served.url}/metadata").status_code == 200

        # a connection upgraded to a WebSocket (the subscriptions' channel) is no
        # request arriving: it stays open beyond both timeouts
        async def quiet_then_asks() -> str:
            url = served.url.replace("http://", "ws://") + "/$websocket"
            async with websockets.connect(url) as ws:
                await asyncio.sleep(3.5)
                await ws.send("hello")
                return str(await asyncio.wait_for(ws.recv(), 10))

        assert asyncio.run(quiet_then_asks()).startswith("error unknown command")


def test_a_file_that_is_no_database_ends_the_command(tmp_path: Path) -> None:
    """A SQLite path that names some other file: the command says so and exits (its
    connection's thread, left open, kept the process alive for good, so that a
    supervisor never saw it fail)."""
    import os
    import subprocess
    import sys

    other = tmp_path / "not-a-database"
    other.write_bytes(bytes(range(256)) * 20)
    env = {**os.environ, "CAREPATH_DATABASE_URL": f"sqlite:///{other}"}
    for command in (["migrate"], ["serve", "--port", "0"]):
        done = subprocess.run([sys.executable, "-m", "gateway", *command], env=env,
                              capture_output=True, timeout=60)
        assert done.returncode != 0, command
        assert b"file is not a database" in done.stdout + done.stderr, command


def test_a_database_it_cannot_use_ends_the_command_with_one_line(tmp_path: Path) -> None:
    """A schema newer than the gateway (another, newer gateway upgraded it), an
    unreachable PostgreSQL, a role that does not exist: one line naming the database,
    without its password, and exit 1; no traceback."""
    import os
    import subprocess
    import sys

    path = tmp_path / "newer.db"

    def run(url: str, *command: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "CAREPATH_DATABASE_URL": url}
        return subprocess.run([sys.executable, "-m", "gateway", *command], env=env,
                              capture_output=True, timeout=60, text=True)

    assert run(f"sqlite:///{path}", "migrate").returncode == 0
    newest = max(m[0] for m in MIGRATIONS)
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO schema_version VALUES (?, 'from the future', 0)",
                     (newest + 1,))
    for command in (["migrate"], ["serve", "--port", "0"], ["audit", "verify"]):
        done = run(f"sqlite:///{path}", *command)
        assert done.returncode == 1, (command, done.stderr)
        assert f"schema is at version {newest + 1}" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    for url, said in (("postgresql://127.0.0.1:9/x", "Connect call failed"),
                      ("postgresql://nobody:secret@127.0.0.1:5432/test", "nobody")):
        done = run(url, "migrate")
        assert done.returncode == 1 and said in done.stderr, done.stderr
        assert "secret" not in done.stderr and "Traceback" not in done.stderr
