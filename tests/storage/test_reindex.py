"""Rebuilding the search index from stored content (SqlStore.reindex, both backends)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.fhir.indexer import Indexer
from gateway.storage.interface import StoreTransaction
from gateway.storage.sql import SqlStore
from tests.conftest import sql_store

INDEXER = Indexer.from_profiles()
BASE = "https://gw.example/fhir/"


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqlStore]:
    async with sql_store(request.param, tmp_path, INDEXER) as s:
        yield s


async def put(store: SqlStore, resource: dict[str, Any]) -> None:
    async def work(tx: StoreTransaction) -> None:
        current = await tx.current(resource["resourceType"], resource["id"])
        await tx.put(resource["resourceType"], resource["id"], dict(resource), "PUT", current)

    await store.run(work)


async def index_rows(store: SqlStore, rid: str) -> dict[str, list[tuple[Any, ...]]]:
    out = {}
    async with store.db.read() as conn:
        for table in ("sp_token", "sp_reference", "sp_string"):
            out[table] = sorted(tuple(r) for r in await conn.fetch(
                f"SELECT * FROM {table} WHERE res_id = ?", (rid,)))
    return out


async def test_reindex_restores_lost_rows_and_reads_local_absolute_references(
        store: SqlStore) -> None:
    obs = {"resourceType": "Observation", "id": "o1", "status": "final",
           "code": {"coding": [{"system": "http://loinc.org", "code": "1234-5"}]},
           "subject": {"reference": f"{BASE}Patient/p1"},
           "performer": [{"reference": "https://other.example/fhir/Practitioner/d1"}]}
    await put(store, obs)
    await put(store, {"resourceType": "Patient", "id": "p1", "gender": "female",
                      "name": [{"family": "Muster"}]})
    before = await index_rows(store, "o1")
    subject = [r for r in before["sp_reference"] if "subject" in r]
    assert subject and all(None in r[3:5] for r in subject)  # stored absolute: no local target
    async with store.db.transaction() as conn:  # an index from an older version: rows lost
        await conn.execute("DELETE FROM sp_token WHERE res_id = 'o1'")
        await conn.execute("DELETE FROM sp_string WHERE res_id = 'p1'")

    assert await store.reindex("Observation", bases=(BASE,), batch=1) == 1
    after = await index_rows(store, "o1")
    assert after["sp_token"] == before["sp_token"]
    # the reference into this server's base now names Patient p1; the other stays a url
    refs = {(r[2], r[3], r[4], r[6]) for r in after["sp_reference"]}
    assert ("subject", "Patient", "p1", None) in refs
    assert ("performer", None, None, "https://other.example/fhir/Practitioner/d1") in refs
    assert (await index_rows(store, "p1"))["sp_string"] == []  # not its type: untouched

    progress: list[int] = []
    assert await store.reindex(batch=1, progress=progress.append) == 2
    assert progress == [1, 2]
    assert (await index_rows(store, "p1"))["sp_string"] != []
    # content and versions are as they were
    stored = await store.read("Observation", "o1")
    assert stored is not None and stored.version == 1


def _carepath(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True,
                          text=True, env=env, timeout=120)


async def test_the_reindex_command(tmp_path: Path) -> None:
    async with sql_store("sqlite", tmp_path, INDEXER) as s:
        await put(s, {"resourceType": "Observation", "id": "o1", "status": "final",
                      "code": {"text": "x"}, "subject": {"reference": f"{BASE}Patient/p1"}})
    env = {**os.environ, "CAREPATH_DATABASE_URL": f"sqlite:///{tmp_path / 'store.db'}"}
    done = _carepath(env, "reindex", "Observation", "--local-base", BASE.rstrip("/"))
    assert done.returncode == 0, done.stderr
    assert "reindexed 1 resources" in done.stderr
    async with sql_store("sqlite", tmp_path, INDEXER) as s, s.db.read() as conn:
        row = await conn.fetchrow("SELECT target_type, target_id FROM sp_reference"
                                  " WHERE res_id = 'o1' AND param = 'subject'")
    assert row is not None and tuple(row) == ("Patient", "p1")
    unknown = _carepath(env, "reindex", "NoSuchType")
    assert unknown.returncode == 2 and "unknown resource type" in unknown.stderr


async def test_the_reindex_command_indexes_the_stored_search_parameters(
        tmp_path: Path) -> None:
    place = "http://hl7.org/fhir/StructureDefinition/patient-birthPlace"
    async with sql_store("sqlite", tmp_path, INDEXER) as s:
        await put(s, {"resourceType": "SearchParameter", "id": "birthplace",
                      "url": "http://example.org/SearchParameter/birthplace",
                      "name": "birthplace", "status": "active", "description": "birth place",
                      "code": "birthplace", "base": ["Patient"], "type": "string",
                      "expression": f"Patient.extension('{place}').value.ofType(Address).city"})
        await put(s, {"resourceType": "Patient", "id": "p1", "extension": [
            {"url": place, "valueAddress": {"city": "Utrecht"}}]})
    env = {**os.environ, "CAREPATH_DATABASE_URL": f"sqlite:///{tmp_path / 'store.db'}"}
    done = _carepath(env, "reindex", "Patient")
    assert done.returncode == 0, done.stderr
    async with sql_store("sqlite", tmp_path, INDEXER) as s, s.db.read() as conn:
        row = await conn.fetchrow("SELECT value FROM sp_string"
                                  " WHERE res_id = 'p1' AND param = 'birthplace'")
    assert row is not None and row[0] == "utrecht"
