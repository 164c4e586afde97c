"""Vendor third-party R4 examples into ``tests/data/ig-examples.ndjson.gz``.

Sources: the ``example/`` folders of four HL7 implementation guides on npm, all
FHIR 4.0.1 and CC0-1.0, written by other people's tools (the IG Publisher's
narratives, profiles and extensions the gateway does not know, document
Bundles, SDC Questionnaires with nested items and expressions, genomics
Observations with many components):

* ``hl7.fhir.uv.ips@2.0.0`` -- International Patient Summary
* ``hl7.fhir.uv.sdc@4.0.0-ballot`` -- Structured Data Capture
* ``hl7.fhir.uv.genomics-reporting@3.0.0``
* ``hl7.fhir.us.mcode@4.0.0`` -- minimal Common Oncology Data Elements

One line per example, ``{"package": <name@version>, "file": <name>, "text":
<the file's text, verbatim>}``.

Beside them, ``tests/data/ig-profiles.ndjson.gz`` holds a few of the IPS
package's own StructureDefinitions (:data:`PROFILES`, with the IG Publisher's
snapshots), in the same form: the tests store them on the server and validate
the IPS examples against them.

Usage::

    for p in hl7.fhir.uv.ips@2.0.0 hl7.fhir.uv.sdc@4.0.0-ballot \\
             hl7.fhir.uv.genomics-reporting@3.0.0 hl7.fhir.us.mcode@4.0.0; do
        mkdir -p "$p" && npm pack "$p" && tar xzf "${p/@/-}.tgz" -C "$p"
    done
    python scripts/build_ig_examples.py */package
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
OUT = DATA / "ig-examples.ndjson.gz"
PROFILES_OUT = DATA / "ig-profiles.ndjson.gz"
#: the IPS profiles the tests store (those of three example types, and the data type
#: profile their codes use)
PROFILES = ("hl7.fhir.uv.ips", ("Patient-uv-ips", "Procedure-uv-ips",
                                "AllergyIntolerance-uv-ips", "CodeableConcept-uv-ips"))


def main(packages: list[Path]) -> None:
    rows = []
    for package in sorted(packages):
        manifest = json.loads((package / "package.json").read_text(encoding="utf-8"))
        name = f"{manifest['name']}@{manifest['version']}"
        for path in sorted((package / "example").glob("*.json")):
            text = path.read_text(encoding="utf-8")
            head = json.loads(text)
            if isinstance(head, dict) and "resourceType" in head and "id" in head:
                rows.append({"package": name, "file": path.name, "text": text})
    _write(OUT, rows)
    profiles = []
    for package in sorted(packages):
        manifest = json.loads((package / "package.json").read_text(encoding="utf-8"))
        if manifest["name"] == PROFILES[0]:
            for id in PROFILES[1]:
                path = package / f"StructureDefinition-{id}.json"
                profiles.append({"package": f"{manifest['name']}@{manifest['version']}",
                                 "file": path.name, "text": path.read_text(encoding="utf-8")})
    _write(PROFILES_OUT, profiles)


def _write(path: Path, rows: list[dict[str, str]]) -> None:
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=9) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(rows)} -> {path}")


if __name__ == "__main__":
    main([Path(p) for p in sys.argv[1:]])
