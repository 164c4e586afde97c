"""SearchParameters stored on the server are searched by
(gateway.interactions.search_parameters): indexed on write, the resources stored
before them indexed in the background, seen by every worker of the database."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.api.helpers import FHIR, gw_code
from tests.conftest import BACKENDS, RunningServer, backend_settings, unique
from tests.profiles.helpers import PROFILES

BIRTH_PLACE = "http://hl7.org/fhir/StructureDefinition/patient-birthPlace"
#: a worker looks for changes this often here (5 s by default)
REFRESH_S = 0.2


@pytest.fixture(scope="module", params=BACKENDS)
def settings(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
             new_schema: Any) -> Any:
    return backend_settings(request.param, tmp_path_factory.mktemp("search-parameters"),
                            new_schema, search_parameter_refresh_s=REFRESH_S)


@pytest.fixture(scope="module")
def client(settings: Any) -> Iterator[httpx.Client]:
    with RunningServer(settings) as running, httpx.Client(
            base_url=running.url, timeout=60, headers={"Accept": FHIR}) as c:
        yield c


def _parameter(code: str, **changes: Any) -> dict[str, Any]:
    body = {"resourceType": "SearchParameter", "url": f"http://example.org/SearchParameter/{code}",
            "name": code.replace("-", ""), "status": "active", "description": "birth place",
            "code": code, "base": ["Patient"], "type": "string",
            "expression": f"Patient.extension('{BIRTH_PLACE}').value.ofType(Address).city",
            **changes}
    return {k: v for k, v in body.items() if v is not None}


def _born_in(client: httpx.Client, city: str) -> str:
    made = client.post("/Patient", json={"resourceType": "Patient", "extension": [
        {"url": BIRTH_PLACE, "valueAddress": {"city": city}}]})
    assert made.status_code == 201, made.text
    return str(made.json()["id"])


def _eventually(found: Callable[[], set[str]], wanted: set[str], seconds: float = 10) -> set[str]:
    deadline = time.monotonic() + seconds
    while True:
        now = found()
        if now == wanted or time.monotonic() > deadline:
            return now
        time.sleep(0.1)


def _matches(client: httpx.Client, **params: str) -> set[str]:
    answer = client.get("/Patient", params=params, headers={"Prefer": "handling=strict"})
    if answer.status_code == 400:
        return {"unknown parameter"}
    assert answer.status_code == 200, answer.text
    return {e["resource"]["id"] for e in answer.json().get("entry", [])
            if e["search"]["mode"] == "match"}


def test_a_stored_parameter_indexes_new_writes_and_what_was_stored_before(
        client: httpx.Client) -> None:
    code, city = unique("birthplace"), unique("Utrecht")
    before = _born_in(client, city)
    assert _matches(client, **{code: city}) == {"unknown parameter"}
    stored = client.post("/SearchParameter", json=_parameter(code))
    assert stored.status_code == 201
    after = _born_in(client, city)
    # the new one at once (the writer's next request is indexed and searched by it);
    # the one stored before once it is indexed in the background
    assert after in _matches(client, **{code: city})
    assert _eventually(lambda: _matches(client, **{code: city}), {before, after}) \
        == {before, after}
    assert _matches(client, **{code: "Elsewhere"}) == set()
    assert _matches(client, **{f"{code}:exact": city.upper()}) == set()
    # an update re-indexes the resource
    patient = client.get(f"/Patient/{after}").json()
    patient["extension"][0]["valueAddress"]["city"] = "Elsewhere"
    assert client.put(f"/Patient/{after}", json=patient).status_code == 200
    assert _matches(client, **{code: city}) == {before}
    # listed where clients look for what they can search by
    statement = client.get("/metadata").json()
    patient_params = next(r["searchParam"] for r in statement["rest"][0]["resource"]
                          if r["type"] == "Patient")
    assert {"name": code, "type": "string",
            "definition": f"http://example.org/SearchParameter/{code}"} in patient_params
    # "it should change when the substantive content ... changes": it did, when the
    # parameter was stored (or something stored after it)
    assert statement["date"] >= stored.json()["meta"]["lastUpdated"], statement["date"]


def test_retired_and_deleted_parameters_are_no_longer_searched_by(
        client: httpx.Client) -> None:
    code, city = unique("birthplace"), unique("Zwolle")
    made = client.post("/SearchParameter", json=_parameter(code)).json()
    pid = _born_in(client, city)
    assert _matches(client, **{code: city}) == {pid}
    made["status"] = "retired"
    assert client.put(f"/SearchParameter/{made['id']}", json=made).status_code == 200
    assert _matches(client, **{code: city}) == {"unknown parameter"}
    made["status"] = "active"
    assert client.put(f"/SearchParameter/{made['id']}", json=made).status_code == 200
    assert _eventually(lambda: _matches(client, **{code: city}), {pid}) == {pid}
    assert client.delete(f"/SearchParameter/{made['id']}").status_code in (200, 204)
    assert _matches(client, **{code: city}) == {"unknown parameter"}


def test_a_parameter_the_base_already_has_leaves_it_as_it_is(client: httpx.Client) -> None:
    # as an IG republishes R4's Patient name under its own URL: stored, not used
    family = unique("Rijn")
    made = client.post("/Patient", json={"resourceType": "Patient", "gender": "female",
                                         "name": [{"family": family}]}).json()
    clash = _parameter("name", url=f"http://example.org/SearchParameter/{unique('name')}",
                       expression="Patient.gender")
    assert client.post("/SearchParameter", json=clash).status_code == 201
    time.sleep(3 * REFRESH_S)
    assert _matches(client, name=family) == {made["id"]}
    assert made["id"] not in _matches(client, name="female")


def test_parameters_that_can_never_be_searched_by_are_refused(client: httpx.Client) -> None:
    for changes in ({"expression": "Patient.$$$"}, {"expression": None},
                    {"expression": "Patient.where("}, {"code": "bad.place"},
                    {"code": "_bad"}):
        body = {**_parameter(unique("bad")), **changes}
        refused = client.post("/SearchParameter",
                              json={k: v for k, v in body.items() if v is not None})
        assert refused.status_code == 422, (changes, refused.text)
        assert gw_code(refused) == "GW-4005", changes
    unknown_base = client.post("/SearchParameter",
                               json=_parameter(unique("bad"), base=["NoSuchType"]))
    assert unknown_base.status_code == 422
    # a type the gateway does not index from stored parameters: kept, not used
    kept = client.post("/SearchParameter", json=_parameter(
        unique("composite"), type="composite", expression="Patient"))
    assert kept.status_code == 201
    # nothing was half-written: the refused ones are not there
    found = client.get("/SearchParameter", params={"url:below": "http://example.org/"}).json()
    assert all("bad" not in e["resource"]["code"] for e in found.get("entry", []))


def test_every_worker_of_the_database_searches_by_it(settings: Any) -> None:
    # two more gateways on the same database, as `carepath serve --workers` runs them
    with RunningServer(settings) as one, RunningServer(settings) as other, \
            httpx.Client(base_url=one.url, timeout=60) as a, \
            httpx.Client(base_url=other.url, timeout=60) as b:
        code, city = unique("birthplace"), unique("Delft")
        assert a.post("/SearchParameter", json=_parameter(code)).status_code == 201
        # the other worker notices within its refresh, and indexes what it writes (the
        # writer itself looks again a moment after its commit: either may be first)
        assert _eventually(lambda: _matches(b, **{code: "x"}), set()) == set()
        assert _eventually(lambda: _matches(a, **{code: "x"}), set()) == set()
        written_by_b = _born_in(b, city)
        assert _matches(a, **{code: city}) == {written_by_b}
        assert _matches(b, **{code: city}) == {written_by_b}


def test_copies_of_r4_parameters_find_what_r4_s_own_find(client: httpx.Client) -> None:
    # R4's own definitions, stored again under new codes as an IG might: every type
    # of parameter, expressions over several types, a choice type, a union (and a
    # composite, stored and not used)
    wanted = {"clinical-code", "clinical-date", "Observation-value-quantity",
              "Observation-subject", "individual-address-city", "individual-birthdate",
              "RiskAssessment-probability", "Observation-code-value-quantity",
              "StructureDefinition-url"}
    bundle = json.loads((PROFILES / "r4" / "Bundle-r4-search-parameters.json").read_text())
    tag = unique("c").replace("-", "")
    for e in bundle["entry"]:
        sp = dict(e["resource"])
        if sp["id"] not in wanted:
            continue
        sp.update(id=f"{tag}-{sp['id']}"[:64], code=f"{tag}-{sp['code']}", status="active",
                  url=f"http://example.org/SearchParameter/{tag}-{sp['id']}",
                  description="R4's, again")
        assert client.put(f"/SearchParameter/{sp['id']}", json=sp).status_code == 201
    city = unique("Town")
    pid = client.post("/Patient", json={"resourceType": "Patient", "birthDate": "1961-04-02",
                                        "address": [{"city": city}]}).json()["id"]
    subject = {"reference": f"Patient/{pid}"}
    for value, when in ((72.5, "2026-01-05"), (140, "2026-02-06T10:00:00Z")):
        client.post("/Observation", json={
            "resourceType": "Observation", "status": "final", "subject": subject,
            "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
            "effectiveDateTime": when,
            "valueQuantity": {"value": value, "system": "http://unitsofmeasure.org",
                              "code": "kg"}})
    client.post("/RiskAssessment", json={"resourceType": "RiskAssessment", "status": "final",
                                         "subject": subject,
                                         "prediction": [{"probabilityDecimal": 0.3}]})
    searches = [("Observation", "code", "http://loinc.org|29463-7"),
                ("Observation", "date", "ge2026-02"), ("Observation", "date", "lt2026-02"),
                ("Observation", "value-quantity", "gt100|http://unitsofmeasure.org|kg"),
                ("Observation", "subject", f"Patient/{pid}"),
                ("Patient", "address-city", city), ("Patient", "birthdate", "1961"),
                ("RiskAssessment", "probability", "gt0.2"),
                ("RiskAssessment", "probability", "lt0.2")]
    for rtype, code, value in searches:
        def copied(rtype: str = rtype, code: str = code, value: str = value) -> set[str]:
            answer = client.get(f"/{rtype}", params={f"{tag}-{code}": value, "subject": pid}
                                if rtype != "Patient" else {f"{tag}-{code}": value},
                                headers={"Prefer": "handling=strict"})
            return {e["resource"]["id"] for e in answer.json().get("entry", [])
                    if e.get("search", {}).get("mode") == "match"} \
                if answer.status_code == 200 else {"unknown parameter"}
        own = client.get(f"/{rtype}", params={code: value, "subject": pid}
                         if rtype != "Patient" else {code: value}).json()
        expected = {e["resource"]["id"] for e in own.get("entry", [])
                    if e["search"]["mode"] == "match"}
        assert _eventually(copied, expected) == expected, (rtype, code, value)


def test_a_backtracking_pattern_in_an_expression_does_not_hold_writes(
        client: httpx.Client) -> None:
    """The expression is evaluated on every write of its base; its ``matches()`` runs in
    RE2, linear in the text (Python's ``re`` takes seconds on ``(a+)+b`` and 25 a)."""
    code = unique("hostile")
    expression = "Patient.name.family.where($this.matches('(a+)+b'))"
    assert client.post("/SearchParameter", json=_parameter(
        code, expression=expression)).status_code == 201
    started = time.monotonic()
    for family in ("a" * 25, "a" * 25 + "b"):
        made = client.post("/Patient", json={"resourceType": "Patient",
                                             "name": [{"family": family}]})
        assert made.status_code == 201, made.text
    assert time.monotonic() - started < 3
    assert len(_matches(client, **{code: "a" * 25 + "b"})) == 1
    assert _matches(client, **{f"{code}:exact": "a" * 25}) == set()  # not indexed


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_expression_the_indexer_cannot_compile_never_holds_writes_of_its_base(
        backend: str, tmp_path: Any, new_schema: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An integer FHIRPath does not have (its Integer is 32-bit; Python reads no more
    than 4,300 digits as one) is no expression: 422 GW-4005. One stored before it was
    refused is left out when the stored parameters are read, on every start: the
    writes of its base go on (they answered 500, even after a restart)."""
    settings = backend_settings(backend, tmp_path, new_schema,
                                search_parameter_refresh_s=REFRESH_S)
    code = unique("huge")
    body = _parameter(code, expression=f"Patient.name[{'1' * 5000}].family")

    def writes_go_on(c: httpx.Client) -> None:
        made = c.post("/Patient", json={"resourceType": "Patient", "name": [{"family": "A"}]})
        assert made.status_code == 201, made.text[:500]
        again = c.put(f"/Patient/{made.json()['id']}", json={
            "resourceType": "Patient", "id": made.json()["id"], "name": [{"family": "B"}]})
        assert again.status_code == 200, again.text[:500]

    with RunningServer(settings) as running, httpx.Client(
            base_url=running.url, timeout=60, headers={"Accept": FHIR}) as c:
        refused = c.post("/SearchParameter", json=body)
        assert refused.status_code == 422, refused.text[:500]
        assert gw_code(refused) == "GW-4005"
        assert "FHIRPath's Integer" in refused.json()["issue"][0]["diagnostics"]
        writes_go_on(c)
        # as a version that did not refuse it stored it
        with monkeypatch.context() as patched:
            patched.setattr("gateway.interactions.search_parameters.check",
                            lambda base, sp: None)
            stored = c.post("/SearchParameter", json=body)
        assert stored.status_code == 201, stored.text[:500]
        writes_go_on(c)
        assert _matches(c, **{code: "B"}) == {"unknown parameter"}
    with RunningServer(settings) as running, httpx.Client(
            base_url=running.url, timeout=60, headers={"Accept": FHIR}) as c:
        writes_go_on(c)
        assert c.get(f"/SearchParameter/{stored.json()['id']}").status_code == 200
