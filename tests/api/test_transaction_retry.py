"""A transaction that loses a race runs again from the Bundle as it was received."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.interactions.base import Context, Prefer
from gateway.interactions.transaction import process_bundle
from gateway.main import registry
from gateway.settings import Settings
from gateway.storage.db import RetryableError
from gateway.storage.sql import SqlStore
from tests.conftest import BACKENDS, sql_store


class LosesTheFirstRace:
    """The store, except that the first attempt of each write fails after its work."""

    def __init__(self, store: SqlStore) -> None:
        self.store = store
        self.attempts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def run(self, work: Callable[[Any], Awaitable[Any]]) -> Any:
        async def flaky(tx: Any) -> Any:
            self.attempts += 1
            result = await work(tx)
            if self.attempts == 1:
                raise RetryableError("simulated serialization failure")
            return result

        return await self.store.run(flaky)


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqlStore]:
    async with sql_store(request.param, tmp_path, registry().indexer) as s:
        yield s


def urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


async def test_a_retried_transaction_starts_again_from_the_bundle_as_received(
    store: SqlStore,
) -> None:
    flaky = LosesTheFirstRace(store)
    ctx = Context(store=flaky, registry=registry(), settings=Settings())  # type: ignore[arg-type]
    p, e = urn(), urn()
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": p, "resource": {"resourceType": "Patient", "name": [{"family": "Retry"}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": e, "resource": {"resourceType": "Encounter", "status": "finished",
                                    "class": {"code": "IMP"}, "subject": {"reference": p}},
         "request": {"method": "POST", "url": "Encounter"}},
    ]}
    response = await process_bundle(ctx, bundle, base="http://gw/fhir", prefer=Prefer())
    assert flaky.attempts == 2
    assert response.status == 200
    assert isinstance(response.body, dict)
    locations = [x["response"]["location"] for x in response.body["entry"]]
    patient_id = locations[0].split("/Patient/")[1].split("/")[0]
    encounter_id = locations[1].split("/Encounter/")[1].split("/")[0]
    stored = await store.read("Encounter", encounter_id)
    assert stored is not None and stored.content is not None
    # the reference names the Patient of the attempt that committed, not the lost one
    assert orjson.loads(stored.content)["subject"] == {"reference": f"Patient/{patient_id}"}
    assert await store.read("Patient", patient_id) is not None
    assert bundle["entry"][1]["resource"]["subject"] != {"reference": p}  # worked in place
