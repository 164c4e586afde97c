"""Vendor the official FHIR R4 examples into ``tests/data/r4-examples.ndjson.gz``.

Source: the npm package ``hl7.fhir.r4.examples@4.0.1`` (CC0-1.0). One line per
example, ``{"file": <name>, "text": <the file's text, verbatim>}``, in file-name
order: every resource of every R4 type up to 1 MB, except the definitions of
R4 itself (the ``DEFINITIONAL`` types: StructureDefinitions, ValueSets,
SearchParameters … -- about 4,500 files and 70 MB that describe FHIR rather than
exemplify data; the gateway's own conformance resources are tested on their
own). ``tests/data/r4-examples-exceptions.json`` lists what is left out.

Usage::

    npm pack hl7.fhir.r4.examples@4.0.1
    tar xzf hl7.fhir.r4.examples-4.0.1.tgz
    python scripts/build_r4_examples.py package/
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "r4-examples.ndjson.gz"
MAX_BYTES = 1_000_000
DEFINITIONAL = frozenset({
    "CapabilityStatement", "CodeSystem", "CompartmentDefinition", "ConceptMap",
    "ExampleScenario", "GraphDefinition", "ImplementationGuide", "MessageDefinition",
    "NamingSystem", "OperationDefinition", "SearchParameter", "StructureDefinition",
    "StructureMap", "TerminologyCapabilities", "ValueSet",
})


def main(package: Path) -> None:
    rows = []
    for path in sorted(package.glob("*.json")):
        if path.name in ("package.json", ".index.json") or path.stat().st_size > MAX_BYTES:
            continue
        text = path.read_text(encoding="utf-8")
        head = json.loads(text)
        if not isinstance(head, dict) or head.get("resourceType") in DEFINITIONAL \
                or "resourceType" not in head:
            continue
        rows.append({"file": path.name, "text": text})
    with gzip.open(OUT, "wt", encoding="utf-8", compresslevel=9) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(rows)} examples -> {OUT}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
