"""The official R4 examples (every type, bar the definitions of R4 itself) load and read back equal.

Source: npm ``hl7.fhir.r4.examples@4.0.1`` (CC0), vendored in
``tests/data/r4-examples.ndjson.gz``; what is not vendored is listed with its
reason in ``tests/data/r4-examples-exceptions.json``.
"""

from __future__ import annotations

import gzip
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import Server

DATA = Path(__file__).resolve().parent.parent / "data"


def load_examples() -> list[tuple[str, str]]:
    with gzip.open(DATA / "r4-examples.ndjson.gz", "rt", encoding="utf-8") as f:
        return [(row["file"], row["text"]) for row in map(json.loads, f)]


def exact(text: str | bytes) -> Any:
    # keep decimals as written so 1.50 and 1.5 differ
    return json.loads(text, parse_float=Decimal)


def without_server_meta(resource: dict[str, Any]) -> dict[str, Any]:
    out = dict(resource)
    meta = dict(out.get("meta", {}))
    meta.pop("versionId", None)
    meta.pop("lastUpdated", None)
    if meta:
        out["meta"] = meta
    else:
        out.pop("meta", None)
    return out


def test_every_vendored_example_loads_through_a_transaction_and_reads_back_equal(
    server: Server,
) -> None:
    # the examples that break R4 rules (listed with reasons) are refused, not stored
    invalid = {e["file"] for e in json.loads(
        (DATA / "r4-examples-validation-exceptions.json").read_text())["exceptions"]}
    listed = json.loads((DATA / "r4-examples-exceptions.json").read_text())
    exceptions = listed["exceptions"]
    rejected = invalid | {e["file"] for e in listed["rejected"]}
    everything = load_examples()
    refused = [(f, t) for f, t in everything if f in rejected]
    assert len(refused) == len(rejected)
    examples = [e for e in everything if e[0] not in rejected]
    assert len(examples) >= 650
    assert {e["file"] for e in exceptions}.isdisjoint(f for f, _ in examples)
    failures: list[str] = []
    # a FHIR client says it wants FHIR (a Binary is otherwise read as its content)
    with httpx.Client(base_url=server.url, timeout=120,
                      headers={"Accept": "application/fhir+json"}) as client:
        for start in range(0, len(examples), 40):
            chunk = examples[start : start + 40]
            body = transaction_text(server.url, chunk)
            response = client.post("/", content=body,
                                   headers={"Content-Type": "application/fhir+json"})
            if response.status_code != 200:
                failures.append(f"chunk {start}: {response.status_code} {response.text[:300]}")
        for name, text in refused:
            response = client.post("/", content=transaction_text(server.url, [(name, text)]),
                                   headers={"Content-Type": "application/fhir+json"})
            if response.status_code < 400 or response.status_code >= 500:
                failures.append(f"{name}: expected a refusal, got {response.status_code}")
        for name, text in examples:
            problem = read_back_problem(client, text)
            if problem:
                failures.append(f"{name}: {problem}")
    assert not failures, "\n".join(failures[:20])


def read_back_problem(client: httpx.Client, text: str) -> str | None:
    """Why the stored example ``text`` does not read back equal (modulo the server's
    meta), or None."""
    original = exact(text)
    read = client.get(f"/{original['resourceType']}/{original['id']}")
    if read.status_code != 200:
        return f"read {read.status_code}"
    if without_server_meta(exact(read.content)) != without_server_meta(original):
        return "differs after the round trip"
    return None


def transaction_text(base: str, chunk: list[tuple[str, str]]) -> bytes:
    """A transaction Bundle embedding each example's text verbatim (numbers as written)."""
    parts = []
    for _, text in chunk:
        head = json.loads(text)
        rt, rid = head["resourceType"], head["id"]
        full_url, url = json.dumps(f"{base}/{rt}/{rid}"), json.dumps(f"{rt}/{rid}")
        parts.append(f'{{"fullUrl":{full_url},"resource":{text},'
                     f'"request":{{"method":"PUT","url":{url}}}}}')
    entries = ",".join(parts)
    return f'{{"resourceType":"Bundle","type":"transaction","entry":[{entries}]}}'.encode()
