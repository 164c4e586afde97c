"""Several worker processes on one database: races resolve correctly.

``carepath serve --workers 3`` runs three processes behind one port; many
threads race on the same resource. PostgreSQL is the production case; SQLite
(one file shared by the processes) must behave the same.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import PG_URL, unique
from tests.integration.serve import Served

FHIR = {"Content-Type": "application/fhir+json"}
RACERS = 24


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def workers(request, new_schema, tmp_path_factory) -> Iterator[Served]:  # type: ignore[no-untyped-def]
    if request.param == "postgresql":
        env = {"CAREPATH_DATABASE_URL": PG_URL, "CAREPATH_DATABASE_SCHEMA": new_schema()}
    else:
        path = tmp_path_factory.mktemp("workers") / "gateway.db"
        env = {"CAREPATH_DATABASE_URL": f"sqlite:///{path}"}
    with Served(env, workers=3) as served:
        yield served


def _race(fn, n: int = RACERS) -> list[httpx.Response]:  # type: ignore[no-untyped-def]
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(lambda _: fn(), range(n)))


def test_concurrent_if_match_updates_exactly_one_wins(workers: Served) -> None:
    with httpx.Client(base_url=workers.url, timeout=60) as client:
        created = client.post("/Patient", json={"resourceType": "Patient"}, headers=FHIR).json()

        def update() -> httpx.Response:
            body = {**created, "active": True}
            with httpx.Client(base_url=workers.url, timeout=60) as c:
                return c.put(f"/Patient/{created['id']}", json=body,
                             headers={**FHIR, "If-Match": 'W/"1"'})

        statuses = Counter(r.status_code for r in _race(update))
        assert statuses == {200: 1, 412: RACERS - 1}
        final = client.get(f"/Patient/{created['id']}").json()
        assert final["meta"]["versionId"] == "2"


def test_concurrent_unconditional_updates_all_apply_in_sequence(workers: Served) -> None:
    with httpx.Client(base_url=workers.url, timeout=60) as client:
        created = client.post("/Patient", json={"resourceType": "Patient"}, headers=FHIR).json()

        def update() -> httpx.Response:
            with httpx.Client(base_url=workers.url, timeout=60) as c:
                return c.put(f"/Patient/{created['id']}", json=created, headers=FHIR)

        responses = _race(update)
        assert {r.status_code for r in responses} == {200}
        versions = sorted(int(r.json()["meta"]["versionId"]) for r in responses)
        assert versions == list(range(2, RACERS + 2))


def test_concurrent_conditional_creates_make_exactly_one_resource(workers: Served) -> None:
    ident = unique("kvnr")
    body = {"resourceType": "Patient",
            "identifier": [{"system": "http://fhir.de/sid/gkv/kvid-10", "value": ident}]}

    def create() -> httpx.Response:
        with httpx.Client(base_url=workers.url, timeout=60) as c:
            return c.post("/Patient", json=body, headers={
                **FHIR, "If-None-Exist": f"identifier=http://fhir.de/sid/gkv/kvid-10|{ident}"})

    responses = _race(create)
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {201: 1, 200: RACERS - 1}
    assert len({r.json()["id"] for r in responses}) == 1
    with httpx.Client(base_url=workers.url, timeout=60) as client:
        found = client.get("/Patient", params={"identifier": ident}).json()
    assert found["total"] == 1


def test_concurrent_transactions_with_the_same_conditional_create(workers: Served) -> None:
    ident = unique("org")
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [{
        "fullUrl": "urn:uuid:5f0c6f4e-9d55-4c55-9d7a-0d4a3a1f2b11",
        "resource": {"resourceType": "Organization",
                     "identifier": [{"system": "urn:test:org", "value": ident}]},
        "request": {"method": "POST", "url": "Organization",
                    "ifNoneExist": f"identifier=urn:test:org|{ident}"},
    }]}

    def send() -> httpx.Response:
        with httpx.Client(base_url=workers.url, timeout=60) as c:
            return c.post("/", json=bundle, headers=FHIR)

    responses = _race(send, 12)
    assert {r.status_code for r in responses} == {200}
    with httpx.Client(base_url=workers.url, timeout=60) as client:
        found = client.get("/Organization", params={"identifier": f"urn:test:org|{ident}"})
    assert found.json()["total"] == 1


def test_transactions_writing_the_same_resources_in_other_orders_all_commit(
        workers: Served) -> None:
    # each Bundle updates the same three patients, in an order of its own: taken in
    # entry order, their locks would deadlock (and the losers, retried, run out of
    # attempts); taken in one order, the Bundles wait for each other
    with httpx.Client(base_url=workers.url, timeout=60) as client:
        ids = [client.post("/Patient", json={"resourceType": "Patient"},
                           headers=FHIR).json()["id"] for _ in range(3)]
    orders = [[0, 1, 2], [2, 1, 0], [1, 2, 0], [0, 2, 1], [2, 0, 1], [1, 0, 2]]
    turn = iter(range(RACERS))

    def send() -> httpx.Response:
        order = orders[next(turn) % len(orders)]
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [{
            "resource": {"resourceType": "Patient", "id": ids[i], "active": True},
            "request": {"method": "PUT", "url": f"Patient/{ids[i]}"},
        } for i in order]}
        with httpx.Client(base_url=workers.url, timeout=120) as c:
            return c.post("/", json=bundle, headers=FHIR)

    responses = _race(send)
    assert Counter(r.status_code for r in responses) == {200: RACERS}
    with httpx.Client(base_url=workers.url, timeout=60) as client:
        for id in ids:
            final = client.get(f"/Patient/{id}").json()
            assert final["meta"]["versionId"] == str(RACERS + 1)


def test_transactions_finding_by_criteria_what_others_name_by_id_all_commit(
        workers: Served) -> None:
    # one Bundle updates patient A by its identifier and patient B by id, the other B
    # by its identifier and A by id: were the ids locked before the criteria found
    # theirs, each would hold one patient and wait for the other (a deadlock, and
    # after the retries 409); conditional patches alike
    system = f"urn:test:{unique('cond')}"
    with httpx.Client(base_url=workers.url, timeout=60) as client:
        ids = {name: client.post("/Patient", headers=FHIR, json={
            "resourceType": "Patient", "identifier": [{"system": system, "value": name}]},
        ).json()["id"] for name in "ab"}
    turn = iter(range(RACERS))

    def send() -> httpx.Response:
        k = next(turn)
        found, named = ("a", "b") if k % 2 else ("b", "a")
        by_criteria: dict[str, object] = {
            "resource": {"resourceType": "Patient", "active": bool(k % 2),
                         "identifier": [{"system": system, "value": found}]},
            "request": {"method": "PUT", "url": f"Patient?identifier={system}|{found}"}}
        if k % 3 == 0:
            patch = [{"op": "add", "path": "/active", "value": True}]
            by_criteria = {
                "resource": {"resourceType": "Binary", "contentType": "application/json-patch+json",
                             "data": base64.b64encode(json.dumps(patch).encode()).decode()},
                "request": {"method": "PATCH", "url": f"Patient?identifier={system}|{found}"}}
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [by_criteria, {
            "resource": {"resourceType": "Patient", "id": ids[named], "active": True,
                         "identifier": [{"system": system, "value": named}]},
            "request": {"method": "PUT", "url": f"Patient/{ids[named]}"}}]}
        with httpx.Client(base_url=workers.url, timeout=120) as c:
            return c.post("/", json=bundle, headers=FHIR)

    responses = _race(send)
    assert Counter(r.status_code for r in responses) == {200: RACERS}, \
        [r.text for r in responses if r.status_code != 200][:2]
    with httpx.Client(base_url=workers.url, timeout=60) as client:
        versions = [int(client.get(f"/Patient/{id}").json()["meta"]["versionId"])
                    for id in ids.values()]
    assert versions == [RACERS + 1, RACERS + 1]
