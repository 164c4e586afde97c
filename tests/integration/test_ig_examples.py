"""Third-party data: the examples of four HL7 implementation guides (IPS, SDC,
Genomics Reporting, mCODE) load, read back equal, and are found by every
value the index holds for them.

Vendored in ``tests/data/ig-examples.ndjson.gz`` by ``scripts/build_ig_examples.py``.
They carry what the official R4 examples lack: narratives rendered by the IG
Publisher (icons inlined as ``data:`` images, tree-table lines drawn with CSS
background images), profiles and extensions this server does not know, nested
Questionnaire items, document Bundles.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import httpx

from gateway.fhir.indexer import Indexer
from tests.conftest import Server
from tests.integration.test_r4_examples import read_back_problem, transaction_text

DATA = Path(__file__).resolve().parent.parent / "data"


#: examples that break R4's own definitions, refused (422) with the code given
REFUSED = {
    # cqf-calculatedValue with a valueExpression: R4 defines its value[x] as string
    # (https://hl7.org/fhir/R4/extension-cqf-calculatedvalue.html); SDC's is a later one
    "hl7.fhir.uv.sdc@4.0.0-ballot/Questionnaire-questionnaire-sdc-profile-example-form-"
    "behavior.json": "GW-4217",
}


def load_examples(*, refused: bool = False) -> list[tuple[str, str]]:
    """The examples; ``refused``: also those in :data:`REFUSED`."""
    with gzip.open(DATA / "ig-examples.ndjson.gz", "rt", encoding="utf-8") as f:
        rows = [(f"{row['package']}/{row['file']}", row["text"]) for row in map(json.loads, f)]
    return rows if refused else [r for r in rows if r[0] not in REFUSED]


def _escape(value: str) -> str:
    """A search value with FHIR's escapes (search.html#escaping)."""
    for ch in ("\\", ",", "|", "$"):
        value = value.replace(ch, "\\" + ch)
    return value


def searches_for(indexer: Indexer, resource: dict[str, Any]) -> list[tuple[str, str]]:
    """One search per token, string, reference and uri value the index holds for
    ``resource`` (the first few of each kind), each of which must find it."""
    rows = indexer.extract(resource)
    out: list[tuple[str, str]] = []
    for param, system, code, *_ in rows.get("sp_token", [])[:6]:
        if code is not None:
            out.append((param, f"{_escape(system)}|{_escape(code)}" if system else _escape(code)))
    for param, _normalized, text, *_ in rows.get("sp_string", [])[:6]:
        out.append((f"{param}:exact", _escape(text)))
    for param, rtype, rid, *_ in rows.get("sp_reference", [])[:6]:
        if rtype and rid:
            out.append((param, f"{rtype}/{rid}"))
    for param, uri, *_ in rows.get("sp_uri", [])[:3]:
        if uri:
            out.append((param, _escape(uri)))
    return out


def test_implementation_guide_examples_load_read_back_and_are_found(server: Server) -> None:
    examples = load_examples()
    assert len(examples) >= 470
    indexer = Indexer.from_profiles()
    failures: list[str] = []
    searched = 0
    # a FHIR client says it wants FHIR (a Binary is otherwise read as its content)
    with httpx.Client(base_url=server.url, timeout=120,
                      headers={"Accept": "application/fhir+json"}) as client:
        for start in range(0, len(examples), 40):
            response = client.post("/", content=transaction_text(server.url,
                                                                 examples[start : start + 40]),
                                   headers={"Content-Type": "application/fhir+json"})
            if response.status_code != 200:
                failures.append(f"chunk {start}: {response.status_code} {response.text[:300]}")
        for name, text in examples:
            problem = read_back_problem(client, text)
            if problem:
                failures.append(f"{name}: {problem}")
                continue
            resource = json.loads(text)
            rtype, rid = resource["resourceType"], resource["id"]
            for param, value in searches_for(indexer, resource):
                searched += 1
                found = client.get(f"/{rtype}", params={param: value, "_id": rid})
                ids = [e["resource"]["id"] for e in found.json().get("entry", [])] \
                    if found.status_code == 200 else []
                if ids != [rid]:
                    failures.append(f"{name}: {param}={value} -> {found.status_code} {ids}")
        for name, text in load_examples(refused=True):
            if name in REFUSED:
                head = json.loads(text)
                response = client.put(f"/{head['resourceType']}/{head['id']}",
                                      content=text.encode(),
                                      headers={"Content-Type": "application/fhir+json"})
                codes = {i["details"]["coding"][0]["code"]
                         for i in response.json().get("issue", [])}
                if response.status_code != 422 or REFUSED[name] not in codes:
                    failures.append(f"{name}: {response.status_code} {sorted(codes)}")
    assert searched > 3000
    assert not failures, "\n".join(failures[:20])
