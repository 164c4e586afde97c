"""``_history?_at=``: the versions current at some moment of a period, found by each
version's successor alone (one primary-key probe), the same as a walk over all of
a resource's versions would find them."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.fhir.indexer import Indexer
from gateway.storage.interface import StoreTransaction
from gateway.storage.sql import history_sql
from tests.conftest import sql_store
from tests.storage.test_history_since import _plan

INDEXER = Indexer.from_profiles()


def _current(times: list[int], lo: int, hi: int) -> list[int]:
    """The versions (1-based) current at some moment of [lo, hi], by definition."""
    return [v + 1 for v, t in enumerate(times)
            if t <= hi and (v + 1 == len(times) or times[v + 1] >= lo)]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_the_versions_current_in_a_period(tmp_path: Path, backend: str) -> None:
    async with sql_store(backend, tmp_path, INDEXER) as store:
        for _ in range(60):  # one version a transaction: each its own time
            async def work(tx: StoreTransaction) -> None:
                previous = await tx.current("Patient", "p")
                await tx.put("Patient", "p", {"resourceType": "Patient", "active": True},
                             "PUT", previous)
            await store.run(work)
        page = await store.history("Patient", "p", since=None, at=None, before=None,
                                   limit=100)
        times = [e.last_updated for e in reversed(page.entries)]
        assert len(times) == 60 and times == sorted(times)
        periods = [(times[0] - 10, times[0] - 5), (times[0], times[0]),
                   (times[10] + 1, times[12] - 1), (times[20], times[40]),
                   (times[59] + 5, times[59] + 10), (times[5] - 1, times[5] + 1)]
        for lo, hi in periods:
            found = await store.history("Patient", "p", since=None, at=(lo, hi), before=None,
                                        limit=100)
            assert sorted(e.version for e in found.entries) == _current(times, lo, hi), (lo, hi)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_a_version_is_judged_by_its_successor_alone(tmp_path: Path, backend: str) -> None:
    async with sql_store(backend, tmp_path, INDEXER) as store:
        (sql, params), _ = history_sql(["Patient"], "p", since=None, at=(10, 20), before=None,
                                       limit=20)
        plan = await _plan(store, sql, params)
        if backend == "sqlite":
            step = next(s for s in plan.split(" / ") if s.startswith("SEARCH h2 "))
            assert step.endswith("(res_type=? AND res_id=? AND version=?)"), plan
        else:
            assert "(h2.version = (h.version + 1))" in plan or \
                "(version = (h.version + 1))" in plan, plan
