"""The audit trail: one AuditEvent per request with the NEN 7513 fields, hash-chained,
written with the write it records, and the gateway fails closed without it."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.settings import Settings
from gateway.storage.db import open_database
from tests.conftest import RunningServer, backend_settings
from tests.security.conftest import CLIENTS, register
from tests.security.keys import ClientKey


async def _fetch(settings: Settings, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    db = open_database(settings.database_url, pool_size=1, schema=settings.database_schema)
    await db.open()
    try:
        async with db.read() as conn:
            return await conn.fetch(sql, params)
    finally:
        await db.close()


async def _execute(settings: Settings, *statements: str) -> None:
    db = open_database(settings.database_url, pool_size=1, schema=settings.database_schema)
    await db.open()
    try:
        async with db.transaction() as conn:
            for sql in statements:
                await conn.execute(sql)
    finally:
        await db.close()


def records(settings: Settings) -> list[dict[str, Any]]:
    rows = asyncio.run(_fetch(settings, "SELECT record FROM audit_log ORDER BY seq"))
    return [json.loads(bytes(r[0])) for r in rows]


class Audited:
    def __init__(self, backend: str, settings: Settings, url: str,
                 keys: dict[str, ClientKey]) -> None:
        self.backend, self.settings, self.url, self.keys = backend, settings, url, keys

    def token(self, client: str = "hospital-a") -> str:
        from tests.security.keys import token_form

        url = f"{self.url}/auth/token"
        r = httpx.post(url, data=token_form(self.keys[client].assertion(url)))
        assert r.status_code == 200, r.text
        return str(r.json()["access_token"])


@pytest.fixture(params=["sqlite", "postgresql"])
def audited(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            new_schema) -> Iterator[Audited]:  # type: ignore[no-untyped-def]
    settings = backend_settings(request.param, tmp_path_factory.mktemp("audit"), new_schema)
    keys = {cid: ClientKey.ec(cid) for cid in CLIENTS}
    register(settings, keys)
    with RunningServer(settings) as running:
        yield Audited(request.param, settings, running.url, keys)


def test_every_request_yields_exactly_one_audit_event(audited: Audited) -> None:
    before = len(records(audited.settings))
    token = audited.token()  # a token request is audited too
    h = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}
    url = audited.url
    patient = httpx.post(f"{url}/Patient", json={"resourceType": "Patient"}, headers=h).json()
    pid = patient["id"]
    calls = [
        ("GET", f"/Patient/{pid}", None),
        ("GET", f"/Patient?_id={pid}", None),
        ("GET", f"/Patient/{pid}/_history", None),
        ("PUT", f"/Patient/{pid}", {**patient, "active": True}),
        ("GET", "/metadata", None),
        ("GET", f"/Patient/{uuid.uuid4()}", None),  # 404
        ("POST", "/Patient", {"resourceType": "Observation"}),  # 400
        ("POST", "/", {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "request": {"method": "POST",
                                                                "url": "Observation"},
             "resource": {"resourceType": "Observation", "status": "final",
                          "code": {"text": "x"}, "subject": {"reference": f"Patient/{pid}"}}}]}),
        ("DELETE", f"/Patient/{uuid.uuid4()}", None),
    ]
    for method, path, body in calls:
        r = httpx.request(method, f"{url}{path}", json=body, headers=h)
        assert r.status_code < 500, r.text
    unauthenticated = httpx.get(f"{url}/Patient")
    assert unauthenticated.status_code == 401
    after = records(audited.settings)[before:]
    # token + create + calls + the denied attempt
    assert len(after) == 1 + 1 + len(calls) + 1
    read = next(e for e in after if e["subtype"][0]["code"] == "read"
                and e["outcome"] == "0")
    assert read["action"] == "R"
    assert {"reference": f"Patient/{pid}"} in [x.get("what") for x in read["entity"]]
    roles = {a["type"]["coding"][0]["code"] for a in read["agent"]}
    assert {"110152", "110153", "RESP"} <= roles
    client_agent = next(a for a in read["agent"]
                        if a["type"]["coding"][0]["code"] == "110153")
    assert client_agent["who"]["identifier"]["value"] == "hospital-a"
    assert client_agent["network"]["address"] == "127.0.0.1"
    assert read["purposeOfEvent"][0]["coding"][0]["code"] == "TREAT"
    assert read["recorded"]
    search = next(e for e in after if e["subtype"][0]["code"] == "search-type")
    query = next(x for x in search["entity"] if x.get("role", {}).get("code") == "24")
    assert f"_id={pid}" in base64.b64decode(query["query"]).decode()
    denied = after[-1]
    assert denied["outcome"] == "4" and "401" in denied["outcomeDesc"]
    update = next(e for e in after if e["subtype"][0]["code"] == "update")
    assert update["action"] == "U"
    assert any(x.get("what", {}).get("reference") == f"Patient/{pid}/_history/2"
               for x in update["entity"])


def test_audit_log_is_readable_and_reading_it_is_audited(audited: Audited) -> None:
    h = {"Authorization": f"Bearer {audited.token()}"}
    first = httpx.get(f"{audited.url}/$audit-log", params={"_count": 1000}, headers=h)
    assert first.status_code == 200, first.text
    n = len(first.json().get("entry", []))
    second = httpx.get(f"{audited.url}/$audit-log", params={"_count": 1000}, headers=h).json()
    events = [e["resource"] for e in second["entry"]]
    assert len(events) == n + 1
    assert events[-1]["subtype"][0]["code"] == "operation"
    query = [e for e in events[-1]["entity"] if e.get("role", {}).get("code") == "24"]
    assert "$audit-log" in query[0]["description"]


def test_the_request_id_is_answered_and_audited(audited: Audited) -> None:
    # IHE BALP: the X-Request-ID of the transport, as an entity of the AuditEvent
    h = {"Authorization": f"Bearer {audited.token()}"}
    mine = f"req-{uuid.uuid4().hex}"
    given = httpx.get(f"{audited.url}/Patient", params={"_count": 1},
                      headers={**h, "X-Request-ID": mine})
    assert given.status_code == 200 and given.headers["x-request-id"] == mine
    odd = httpx.get(f"{audited.url}/Patient", params={"_count": 1},
                    headers={**h, "X-Request-ID": "two words\tand a tab"})
    made = odd.headers["x-request-id"]
    assert made != "two words\tand a tab" and len(made) == 16
    denied = httpx.get(f"{audited.url}/Patient/{uuid.uuid4().hex}", headers={
        "Authorization": "Bearer nonsense", "X-Request-ID": f"{mine}-2"})
    assert denied.status_code == 401 and denied.headers["x-request-id"] == f"{mine}-2"

    def ids(event: dict[str, Any]) -> list[str]:
        return [e["what"]["identifier"]["value"] for e in event.get("entity", [])
                if e.get("type", {}).get("code") == "XrequestId"]

    events = records(audited.settings)
    assert [ids(e) for e in events[-3:]] == [[mine], [made], [f"{mine}-2"]]
    assert events[-1]["entity"][0]["type"]["system"] == (
        "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType")


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"CAREPATH_DATABASE_URL": settings.database_url}
    if settings.database_schema:
        env["CAREPATH_DATABASE_SCHEMA"] = settings.database_schema
    import os

    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=120)


def test_audit_verify_passes_then_fails_after_tampering(audited: Audited) -> None:
    h = {"Authorization": f"Bearer {audited.token()}", "Content-Type": "application/fhir+json"}
    for _ in range(3):
        httpx.get(f"{audited.url}/metadata", headers=h)
        # writes append their record in their own transaction (a separate code path)
        made = httpx.post(f"{audited.url}/Patient", json={"resourceType": "Patient"}, headers=h)
        assert made.status_code == 201
    ok = _cli(audited.settings, "audit", "verify")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "intact" in ok.stdout + ok.stderr
    seq = records_seq(audited.settings)[1]
    blob = "X'7b7d'" if audited.backend == "sqlite" else "'\\x7b7d'::bytea"
    asyncio.run(_execute(audited.settings,
                         f"UPDATE audit_log SET record = {blob} WHERE seq = {seq}"))
    broken = _cli(audited.settings, "audit", "verify")
    assert broken.returncode == 1
    assert f"broken at record {seq}" in broken.stdout + broken.stderr


def test_audit_verify_holds_the_columns_records_are_found_by_to_the_records(
        audited: Audited) -> None:
    """``$audit-log?patient=`` finds records by their ``patient`` column, which the
    hash does not cover: a record moved to another patient (hidden from the first
    one's log) is found by ``audit verify``; so is a record rewritten as text."""
    h = {"Authorization": f"Bearer {audited.token()}", "Content-Type": "application/fhir+json"}
    made = httpx.post(f"{audited.url}/Patient", json={"resourceType": "Patient"}, headers=h)
    assert made.status_code == 201
    assert httpx.get(f"{audited.url}/Patient/{made.json()['id']}", headers=h).status_code == 200
    ok = _cli(audited.settings, "audit", "verify")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    rows = asyncio.run(_fetch(audited.settings,
                              "SELECT seq FROM audit_log WHERE patient IS NOT NULL ORDER BY seq"))
    seq = int(rows[-1][0])
    asyncio.run(_execute(audited.settings,
                         f"UPDATE audit_log SET patient = 'zz' WHERE seq = {seq}"))
    moved = _cli(audited.settings, "audit", "verify")
    assert moved.returncode == 1, moved.stdout + moved.stderr
    assert f"broken at record {seq}" in moved.stdout + moved.stderr
    assert "filed under another" in moved.stdout + moved.stderr
    if audited.backend == "sqlite":  # (a bytea column cannot hold text; SQLite's can)
        first = records_seq(audited.settings)[0]
        asyncio.run(_execute(audited.settings,
                             f"UPDATE audit_log SET record = record || 'x' WHERE seq = {first}"))
        text = _cli(audited.settings, "audit", "verify")
        assert text.returncode == 1 and "Traceback" not in text.stderr, text.stderr
        assert f"broken at record {first}" in text.stdout + text.stderr


def records_seq(settings: Settings) -> list[int]:
    return [int(r[0]) for r in asyncio.run(_fetch(settings,
                                                  "SELECT seq FROM audit_log ORDER BY seq"))]


def test_no_audit_no_access(audited: Audited) -> None:
    """If the audit record cannot be written, neither the write nor the read goes through."""
    h = {"Authorization": f"Bearer {audited.token()}", "Content-Type": "application/fhir+json"}
    made = httpx.post(f"{audited.url}/Patient", json={"resourceType": "Patient"}, headers=h)
    pid = made.json()["id"]
    if audited.backend == "sqlite":
        block = ["CREATE TRIGGER block_audit BEFORE INSERT ON audit_log BEGIN "
                 "SELECT RAISE(ABORT, 'audit blocked'); END"]
        unblock = ["DROP TRIGGER block_audit"]
    else:
        block = ["CREATE FUNCTION block_audit() RETURNS trigger AS $$ BEGIN "
                 "RAISE EXCEPTION 'audit blocked'; END $$ LANGUAGE plpgsql",
                 "CREATE TRIGGER block_audit BEFORE INSERT ON audit_log "
                 "FOR EACH ROW EXECUTE FUNCTION block_audit()"]
        unblock = ["DROP TRIGGER block_audit ON audit_log", "DROP FUNCTION block_audit()"]
    asyncio.run(_execute(audited.settings, *block))
    try:
        marker = uuid.uuid4().hex
        write = httpx.post(f"{audited.url}/Patient", headers=h, json={
            "resourceType": "Patient", "name": [{"family": marker}]})
        assert write.status_code >= 500
        read = httpx.get(f"{audited.url}/Patient/{pid}", headers=h)
        assert read.status_code == 503 and read.headers["retry-after"] == "5"
        assert "Patient" not in read.text.replace("OperationOutcome", "")
    finally:
        asyncio.run(_execute(audited.settings, *unblock))
    found = httpx.get(f"{audited.url}/Patient", params={"family": marker}, headers=h).json()
    assert found.get("total") == 0  # the write was not committed without its audit record


def test_a_request_about_several_patients_is_in_each_ones_log(audited: Audited) -> None:
    """IHE BALP: one AuditEvent per patient a request is about, so that each patient's
    log (``$audit-log?patient=``) holds every search, history, transaction and
    deletion of their data, and names only what is theirs."""
    h = {"Authorization": f"Bearer {audited.token()}", "Content-Type": "application/fhir+json"}
    url = audited.url
    made = httpx.post(f"{url}/Organization", json={"resourceType": "Organization",
                                                   "name": "Lab"},
                      headers=h)
    assert made.status_code == 201, made.text
    org = made.json()["id"]
    pids = sorted(httpx.post(f"{url}/Patient", json={"resourceType": "Patient"},
                             headers=h).json()["id"] for _ in range(2))
    code = uuid.uuid4().hex
    obs = {pid: httpx.post(f"{url}/Observation", headers=h, json={
        "resourceType": "Observation", "status": "final", "code": {"text": code},
        "subject": {"reference": f"Patient/{pid}"},
        "performer": [{"reference": f"Organization/{org}"}]}).json()["id"] for pid in pids}

    def call(method: str, path: str, body: Any = None) -> str:
        rid = uuid.uuid4().hex
        r = httpx.request(method, f"{url}{path}", json=body,
                          headers={**h, "X-Request-ID": rid})
        assert r.status_code < 300, r.text
        return rid

    def logged(pid: str, rid: str) -> list[dict[str, Any]]:
        log = httpx.get(f"{url}/$audit-log", params={"patient": pid, "_count": 1000},
                        headers=h).json()
        return [e["resource"] for e in log.get("entry", [])
                if {"what": {"identifier": {"value": rid}}, "type": {
                    "system": "https://profiles.ihe.net/ITI/BALP/CodeSystem/"
                              "BasicAuditEntityType", "code": "XrequestId"}}
                in e["resource"].get("entity", [])]

    def named(event: dict[str, Any]) -> set[str]:
        return {e["what"]["reference"].split("/_history")[0]
                for e in event["entity"] if "reference" in e.get("what", {})}

    search = call("GET", f"/Observation?code:text={code}&_include=Observation:performer")
    history = call("GET", "/Observation/_history?_count=1000")
    bundle = call("POST", "/", {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "POST", "url": "Observation"}, "resource": {
            "resourceType": "Observation", "status": "final", "code": {"text": code},
            "subject": {"reference": f"Patient/{pid}"}}} for pid in pids]})
    deletion = call("DELETE", f"/Observation?code:text={code}&_id={obs[pids[1]]}")
    for n, pid in enumerate(pids):
        other = pids[1 - n]
        for rid in (search, history, bundle):
            (event,) = logged(pid, rid)
            refs = named(event)
            assert f"Patient/{pid}" in refs, event
            assert f"Patient/{other}" not in refs and f"Observation/{obs[other]}" not in refs
        assert f"Observation/{obs[pid]}" in named(logged(pid, search)[0])
        assert (f"Organization/{org}" in named(logged(pid, search)[0])) == (n == 0)
    assert logged(pids[1], deletion) and not logged(pids[0], deletion)
    # every record is still filed under what it names
    ok = _cli(audited.settings, "audit", "verify")
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_a_search_about_hundreds_of_patients_files_one_record_for_each(
        audited: Audited) -> None:
    """More patients than :data:`OFF_LOOP_PATIENTS`: their records are made beside
    the event loop, and still one per patient, each naming that patient only."""
    from gateway.security.audit import OFF_LOOP_PATIENTS

    h = {"Authorization": f"Bearer {audited.token()}", "Content-Type": "application/fhir+json"}
    family, n = uuid.uuid4().hex, OFF_LOOP_PATIENTS + 5
    made = httpx.post(f"{audited.url}/", headers=h, timeout=60, json={
        "resourceType": "Bundle", "type": "transaction", "entry": [
            {"request": {"method": "POST", "url": "Patient"},
             "resource": {"resourceType": "Patient", "name": [{"family": family}]}}
            for _ in range(n)]})
    assert made.status_code == 200, made.text[:300]
    pids = {e["response"]["location"].split("Patient/")[1].split("/")[0]
            for e in made.json()["entry"]}
    rid = uuid.uuid4().hex
    found = httpx.get(f"{audited.url}/Patient", params={"family": family, "_count": 1000},
                      headers={**h, "X-Request-ID": rid}, timeout=60)
    assert found.status_code == 200 and found.json()["total"] == n
    mine = [r for r in records(audited.settings)
            if {"what": {"identifier": {"value": rid}}, "type": {
                "system": "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType",
                "code": "XrequestId"}} in r.get("entity", [])]
    assert len(mine) == n
    about = [{e["what"]["reference"].split("/_history")[0] for e in r["entity"]
              if e.get("what", {}).get("reference", "").startswith("Patient/")} for r in mine]
    assert sorted(a for (a,) in about) == sorted(f"Patient/{pid}" for pid in pids)


def test_another_clients_query_is_not_shown_to_a_restricted_reader(audited: Audited) -> None:
    """A client sees the records about patients it may see, but another client's
    query may name patients (or say things about them) it may not: that is left
    out and the record marked REDACTED; its own records it sees whole."""
    a = {"Authorization": f"Bearer {audited.token()}", "Content-Type": "application/fhir+json"}
    b = {"Authorization": f"Bearer {audited.token('gp-b')}"}
    url = audited.url
    hidden = httpx.post(f"{url}/Patient", json={"resourceType": "Patient"}, headers=a).json()
    shared = httpx.post(f"{url}/Patient", headers=a, json={
        "resourceType": "Patient", "managingOrganization": {"reference": "Organization/org-b"}}
                        ).json()
    assert httpx.get(f"{url}/Patient/{shared['id']}", headers=b).status_code == 200
    assert httpx.get(f"{url}/Patient/{hidden['id']}", headers=b).status_code == 404
    rid = uuid.uuid4().hex
    searched = httpx.get(f"{url}/Patient", headers={**a, "X-Request-ID": rid}, params={
        "_id": f"{hidden['id']},{shared['id']}"})
    assert searched.json()["total"] == 2

    def the_search(headers: dict[str, str]) -> dict[str, Any]:
        log = httpx.get(f"{url}/$audit-log", params={"patient": shared["id"], "_count": 1000},
                        headers=headers).json()
        (event,) = [e["resource"] for e in log.get("entry", [])
                    if rid in json.dumps(e["resource"]["entity"])]
        return event

    def query(event: dict[str, Any]) -> dict[str, Any]:
        return next(e for e in event["entity"] if e.get("role", {}).get("code") == "24")

    seen_by_b = the_search(b)
    assert hidden["id"] not in json.dumps(seen_by_b)
    assert "query" not in query(seen_by_b) and "description" not in query(seen_by_b)
    assert {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
            "code": "REDACTED", "display": "redacted"} in seen_by_b["meta"]["security"]
    seen_by_a = the_search(a)
    assert hidden["id"] in base64.b64decode(query(seen_by_a)["query"]).decode()
    assert "meta" not in seen_by_a
