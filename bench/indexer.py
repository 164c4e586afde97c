"""Search-index extraction speed: ``python -m bench.indexer``.

Prints one JSON line per example resource: µs per ``Indexer.extract`` next to
µs per ``orjson.loads`` of the same (compact) JSON bytes, plus the row count.
"""

from __future__ import annotations

import gzip
import json
import time
import timeit
from pathlib import Path
from typing import Any

import orjson

from gateway.fhir import json as fjson
from gateway.fhir.indexer import Indexer

EXAMPLES = Path(__file__).resolve().parent.parent / "tests" / "data" / "r4-examples.ndjson.gz"
PICK = [
    ("Patient", "example"),
    ("Patient", "pat1"),
    ("Patient", "f001"),
    ("Observation", "example"),
    ("Observation", "blood-pressure"),
    ("Observation", "f001"),
    ("Encounter", "example"),
    ("Encounter", "f001"),
]


def _best_us(fn: Any, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main() -> None:
    by_key: dict[tuple[str, str], dict[str, Any]] = {}
    with gzip.open(EXAMPLES, "rt", encoding="utf-8") as fh:
        for line in fh:
            resource = fjson.loads(json.loads(line)["text"])
            by_key[(resource["resourceType"], resource.get("id", ""))] = resource
    t0 = time.perf_counter()
    indexer = Indexer.from_profiles()
    load_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    for rt in ("Patient", "Observation", "Encounter"):
        indexer.params_for(rt)
        indexer.extract({"resourceType": rt})  # compiles the type's accessors
    compile_ms = (time.perf_counter() - t0) * 1e3
    print(json.dumps({"setup": "Indexer.from_profiles", "ms": round(load_ms, 1),
                      "compile_3_types_ms": round(compile_ms, 1)}))
    for key in PICK:
        resource = by_key.get(key)
        if resource is None:
            continue
        raw = orjson.dumps(resource, default=str)
        out = indexer.extract(resource)
        print(json.dumps({
            "resource": f"{key[0]}/{key[1]}",
            "bytes": len(raw),
            "rows": sum(len(r) for r in out.values()),
            "extract_us": round(_best_us(lambda r=resource: indexer.extract(r), 2000), 1),
            "orjson_loads_us": round(_best_us(lambda b=raw: orjson.loads(b), 2000), 1),
        }))


if __name__ == "__main__":
    main()
