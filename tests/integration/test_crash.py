"""Nothing acknowledged is lost when the server dies.

``carepath serve`` is killed (SIGKILL: no shutdown, no flush) while clients
create Patients and send transactions; started again on the same database,
it holds every resource it answered 201 for, every transaction it answered
200 for whole, and no part of a transaction it did not.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import PG_URL
from tests.integration.serve import Served

FHIR = {"Content-Type": "application/fhir+json"}
CLIENTS = 12


@pytest.fixture(params=["postgresql", "sqlite"])
def env(request, new_schema, tmp_path: Path) -> Iterator[dict[str, str]]:  # type: ignore[no-untyped-def]
    if request.param == "postgresql":
        yield {"CAREPATH_DATABASE_URL": PG_URL, "CAREPATH_DATABASE_SCHEMA": new_schema()}
    else:
        yield {"CAREPATH_DATABASE_URL": f"sqlite:///{tmp_path / 'gateway.db'}"}


def _bundle(tag: str) -> dict:  # type: ignore[type-arg]
    patient = f"urn:uuid:{uuid.uuid4()}"
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": patient, "request": {"method": "POST", "url": "Patient"},
         "resource": {"resourceType": "Patient",
                      "identifier": [{"system": "urn:test:crash-tx", "value": tag}]}},
        *({"request": {"method": "POST", "url": "Observation"},
           "resource": {"resourceType": "Observation", "status": "final",
                        "code": {"text": tag}, "subject": {"reference": patient}}}
          for _ in range(3)),
    ]}


async def _load(url: str, under_way: asyncio.Event, until: asyncio.Event
                ) -> tuple[list[str], list[str]]:
    """Creates and transactions from several clients until ``until``; what was
    acknowledged (Patient ids answered 201, tags of transactions answered 200).
    ``under_way`` is set once 100 creates and 40 transactions were."""
    created: list[str] = []
    committed: list[str] = []

    async def client(c: httpx.AsyncClient, k: int) -> None:
        n = 0
        while not until.is_set():
            n += 1
            tag = f"{k}-{n}"
            try:
                if n % 3:
                    r = await c.post("/Patient", headers=FHIR, json={
                        "resourceType": "Patient",
                        "identifier": [{"system": "urn:test:crash", "value": tag}]})
                    if r.status_code == 201:
                        created.append(r.json()["id"])
                else:
                    r = await c.post("/", headers=FHIR, json=_bundle(tag))
                    if r.status_code == 200:
                        committed.append(tag)
                if len(created) >= 100 and len(committed) >= 40:
                    under_way.set()
            except httpx.TransportError:  # the server is gone
                await asyncio.sleep(0.05)

    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        await asyncio.gather(*(client(c, k) for k in range(CLIENTS)))
    return created, committed


def test_a_killed_server_keeps_every_write_it_acknowledged(env: dict[str, str]) -> None:
    served = Served(env)

    async def crash() -> tuple[list[str], list[str]]:
        under_way, until = asyncio.Event(), asyncio.Event()
        load = asyncio.create_task(_load(served.url, under_way, until))
        # killed with writes in flight: the load goes on as the server dies
        await asyncio.wait_for(under_way.wait(), 60)
        assert served.proc is not None
        served.proc.send_signal(signal.SIGKILL)
        served.proc.wait()
        await asyncio.sleep(0.5)
        until.set()
        return await load

    with served:
        created, committed = asyncio.run(crash())

    with Served(env) as again, httpx.Client(base_url=again.url, timeout=30) as c:
        lost = [id for id in created if c.get(f"/Patient/{id}").status_code != 200]
        assert lost == []
        for tag in committed:
            found = c.get("/Observation", params={
                "code:text": tag, "subject.identifier": f"urn:test:crash-tx|{tag}",
                "_summary": "count"}).json()
            assert found["total"] == 3, tag
        # no part of a transaction without the rest: every transaction's Patient
        # has its three Observations, every Observation its Patient
        patients = c.get("/Patient", params={
            "identifier": "urn:test:crash-tx|", "_summary": "count"}).json()["total"]
        observations = c.get("/Observation", params={"_summary": "count"}).json()["total"]
        with_patient = c.get("/Observation", params={
            "subject.identifier": "urn:test:crash-tx|", "_summary": "count"}).json()["total"]
        assert patients >= len(committed)
        assert observations == with_patient == 3 * patients
