"""Validation speed: ``python -m bench.validate``.

Prints JSON lines, each a set of resources validated in one process on one
core, beside the floor ``orjson.loads`` of the same bytes:

* ``setup`` -- reading the definitions, and compiling on first use every type
  the examples use;
* ``base`` -- base R4 validation of the official R4 examples
  (``tests/data/r4-examples.ndjson.gz``): all of them, and the typical
  2-3 KB ones the goal is stated for (>= 5,000 resources/s per core);
* ``profile`` -- the examples that claim a core profile (vital signs), with
  their profiles, and the gateway's own example instances
  (``tests/profiles/examples/valid``) against the profile each one shows;
* ``bundle`` -- a document Bundle of 1,000 and of 10,000 entries (linear:
  the per-entry time should not grow);
* ``tree`` -- a Questionnaire of nested groups and a CodeSystem of nested
  concepts, each at two sizes (R4's ``que-2`` and ``csd-1`` look at every
  descendant: the time per MB should not grow).

Each figure is the best of several rounds (the machine is shared), as
resources per second and µs per resource. ``--rounds`` sets how many.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from gateway.fhir import json as fjson
from gateway.fhir.validation import FhirValidator, load_definitions
from gateway.registry import profiles_dir

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "tests" / "data" / "r4-examples.ndjson.gz"
OWN_EXAMPLES = ROOT / "tests" / "profiles" / "examples"


def _best(fn: Callable[[], object], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _line(kind: str, name: str, items: list[tuple[bytes, dict[str, Any], str | None]],
          validator: FhirValidator, rounds: int) -> None:
    if not items:
        return
    raws = [raw for raw, _, _ in items]
    work = [(res, profile) for _, res, profile in items]

    def validate() -> None:
        for res, profile in work:
            validator.validate(res, profile=profile)

    def parse() -> None:
        for raw in raws:
            orjson.loads(raw)

    errors = sum(1 for res, profile in work if any(
        i.severity == "error" for i in validator.validate(res, profile=profile)))
    n = len(items)
    took, floor = _best(validate, rounds), _best(parse, rounds)
    print(json.dumps({
        "kind": kind, "set": name, "resources": n,
        "mean_bytes": round(sum(map(len, raws)) / n),
        "with_errors": errors,
        "validate_per_s": round(n / took),
        "validate_us": round(took / n * 1e6, 1),
        "orjson_loads_per_s": round(n / floor),
        "orjson_loads_us": round(floor / n * 1e6, 1),
        "x_floor": round(took / floor, 1),
    }), flush=True)


def _without_profiles(resource: Any) -> Any:
    """A copy with every ``meta.profile`` removed (entries and contained too)."""
    if isinstance(resource, list):
        return [_without_profiles(x) for x in resource]
    if not isinstance(resource, dict):
        return resource
    out = {k: _without_profiles(v) for k, v in resource.items()}
    meta = out.get("meta")
    if isinstance(meta, dict) and "profile" in meta:
        out["meta"] = {k: v for k, v in meta.items() if k != "profile"}
        if not out["meta"]:
            del out["meta"]
    return out


def _document(entries: int) -> dict[str, Any]:
    urls = [f"urn:uuid:{uuid.UUID(int=i + 1)}" for i in range(entries)]
    div = '<div xmlns="http://www.w3.org/1999/xhtml">x</div>'
    composition = {
        "resourceType": "Composition", "status": "final",
        "text": {"status": "generated", "div": div},
        "type": {"coding": [{"system": "http://loinc.org", "code": "18842-5"}]},
        "subject": {"reference": urls[1]}, "date": "2020-01-01T00:00:00Z",
        "author": [{"reference": "Practitioner/1"}], "title": "Discharge letter",
        "section": [{"title": "all", "entry": [{"reference": u} for u in urls[1:]],
                     "text": {"status": "generated", "div": div}}],
    }
    entry = [{"fullUrl": urls[0], "resource": composition}]
    for u in urls[1:]:
        entry.append({"fullUrl": u, "resource": {
            "resourceType": "Condition", "text": {"status": "generated", "div": div},
            "clinicalStatus": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                "code": "active"}]},
            "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "I25.1"}]},
            "subject": {"reference": urls[1]}, "onsetPeriod": {"start": "2019-01-01"}}})
    return {"resourceType": "Bundle", "type": "document", "timestamp": "2020-01-01T00:00:00Z",
            "identifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{uuid.uuid4()}"},
            "entry": entry}


def nested_questionnaire(groups: int) -> dict[str, Any]:
    """``groups`` groups, each four levels of four groups deep, 341 items each."""
    count = 0

    def item(depth: int) -> dict[str, Any]:
        nonlocal count
        count += 1
        if depth == 0:
            return {"linkId": f"q{count}", "text": f"Question {count}", "type": "string"}
        return {"linkId": f"g{count}", "text": f"Group {count}", "type": "group",
                "item": [item(depth - 1) for _ in range(4)]}

    return {"resourceType": "Questionnaire", "status": "active",
            "item": [item(4) for _ in range(groups)]}


def _code_system(chapters: int) -> dict[str, Any]:
    """``chapters`` concepts, each with 20 children of 10 children (211 codes each)."""
    def concept(code: str, depth: int) -> dict[str, Any]:
        c: dict[str, Any] = {"code": code, "display": f"Concept {code}"}
        if depth:
            c["concept"] = [concept(f"{code}.{i}", depth - 1)
                            for i in range(20 if depth == 2 else 10)]
        return c

    return {"resourceType": "CodeSystem", "status": "active", "content": "complete",
            "url": "http://example.org/cs", "concept": [concept(f"C{i}", 2)
                                                         for i in range(chapters)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()

    t0 = time.perf_counter()
    validator = FhirValidator(load_definitions(profiles_dir()))
    load_ms = (time.perf_counter() - t0) * 1e3
    with gzip.open(EXAMPLES, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line)["text"].encode() for line in fh]
    examples = [(raw, fjson.loads(raw)) for raw in rows]
    t0 = time.perf_counter()
    for _, res in examples:
        validator.validate(res)
    compile_ms = (time.perf_counter() - t0) * 1e3
    print(json.dumps({"kind": "setup", "load_definitions_ms": round(load_ms, 1),
                      "first_pass_with_compilation_ms": round(compile_ms, 1),
                      "types": len({res["resourceType"] for _, res in examples})}), flush=True)

    every = [(raw, res, None) for raw, res in examples]
    typical = [x for x in every if 2000 <= len(x[0]) <= 3000]
    _line("base", "r4-examples (all)", every, validator, args.rounds)
    _line("base", "r4-examples 2-3 KB", typical, validator, args.rounds)
    for rt in ("Patient", "Observation", "Encounter", "Bundle"):
        _line("base", f"r4-examples {rt}", [x for x in every if x[1]["resourceType"] == rt],
              validator, args.rounds)

    claiming = [(raw, res, None) for raw, res in examples
                if validator.knows_profile(next(iter(res.get("meta", {}).get("profile", [])),
                                                ""))]
    _line("profile", "r4-examples claiming a core profile (meta.profile)", claiming,
          validator, args.rounds)
    _line("base", "the same without their profiles", [
        (raw, _without_profiles(res), None) for raw, res, _ in claiming],
        validator, args.rounds)
    manifest = OWN_EXAMPLES / "manifest.json"
    if manifest.is_file():
        own = []
        for entry in json.loads(manifest.read_text()).get("valid", []):
            raw = (OWN_EXAMPLES / entry["file"]).read_bytes()
            own.append((raw, fjson.loads(raw), entry.get("profile")))
        single = [x for x in own if x[1]["resourceType"] != "Bundle"]
        bundles = [x for x in own if x[1]["resourceType"] == "Bundle"]
        for name, items in (("gateway example instances (tests/profiles/examples/valid)",
                             single), ("gateway example Bundles (same folder)", bundles)):
            _line("profile", name, items, validator, args.rounds)
            _line("base", "the same without their profiles", [
                (raw, _without_profiles(res), None) for raw, res, _ in items],
                validator, args.rounds)

    for entries in (1_000, 10_000):
        bundle = _document(entries)
        raw = orjson.dumps(bundle)
        took = _best(lambda b=bundle: validator.validate(b), max(3, args.rounds // 5))
        floor = _best(lambda r=raw: orjson.loads(r), max(3, args.rounds // 5))
        print(json.dumps({
            "kind": "bundle", "entries": entries, "bytes": len(raw),
            "validate_ms": round(took * 1e3, 1),
            "validate_us_per_entry": round(took / entries * 1e6, 1),
            "orjson_loads_ms": round(floor * 1e3, 1),
            "invariant_evaluations": validator.last_evaluations,
        }), flush=True)

    for name, make, sizes in (("Questionnaire", nested_questionnaire, (25, 100)),
                              ("CodeSystem", _code_system, (40, 160))):
        for size in sizes:
            resource = make(size)
            raw = orjson.dumps(resource)
            took = _best(lambda r=resource: validator.validate(r), max(2, args.rounds // 7))
            print(json.dumps({
                "kind": "tree", "type": name, "bytes": len(raw),
                "validate_ms": round(took * 1e3, 1),
                "validate_s_per_mb": round(took / (len(raw) / 1e6), 2),
            }), flush=True)


if __name__ == "__main__":
    main()
