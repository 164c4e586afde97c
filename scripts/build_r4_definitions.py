"""Trim the official FHIR R4 definitions into the gateway's ``profiles/r4/`` data.

Source: the npm package ``hl7.fhir.r4.examples@4.0.1`` (CC0-1.0), which carries the
R4 StructureDefinitions and SearchParameters. The output keeps only the fields
the gateway reads, as FHIR JSON Bundles of type ``collection``:

* ``Bundle-r4-search-parameters.json`` -- every SearchParameter of R4
  (``url, code, base, type, expression, target, modifier, comparator,
  multipleOr, multipleAnd, component``).
* ``Bundle-r4-structure-definitions.json`` -- StructureDefinitions of the
  resources and data types (``kind`` resource/complex-type/primitive-type,
  ``derivation`` specialization) with snapshot elements reduced to ``path, min,
  max, type (code, targetProfile), isSummary, isModifier, binding (strength,
  valueSet), constraint (key, severity, expression), contentReference``.

Usage::

    npm pack hl7.fhir.r4.examples@4.0.1
    tar xzf hl7.fhir.r4.examples-4.0.1.tgz
    python scripts/build_r4_definitions.py package/
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent.parent / "profiles" / "r4"

SP_KEYS = (
    "resourceType", "id", "url", "version", "name", "status", "code", "base", "type",
    "expression", "target", "modifier", "comparator", "multipleOr", "multipleAnd",
    "chain", "component",
)
EL_KEYS = ("path", "min", "max", "isSummary", "isModifier", "contentReference")


def trim_sp(sp: dict[str, Any]) -> dict[str, Any]:
    out = {k: sp[k] for k in SP_KEYS if k in sp}
    if "component" in out:
        out["component"] = [
            {"definition": c["definition"], "expression": c["expression"]}
            for c in out["component"]
        ]
    return out


def trim_element(el: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"id": el["id"], **{k: el[k] for k in EL_KEYS if k in el}}
    if "type" in el:
        types = []
        for t in el["type"]:
            tt: dict[str, Any] = {"code": t["code"]}
            if "targetProfile" in t:
                tt["targetProfile"] = t["targetProfile"]
            types.append(tt)
        out["type"] = types
    if "binding" in el and "valueSet" in el["binding"]:
        out["binding"] = {
            "strength": el["binding"]["strength"],
            "valueSet": el["binding"]["valueSet"],
        }
    if "constraint" in el:
        out["constraint"] = [
            {k: c[k] for k in ("key", "severity", "human", "expression") if k in c}
            for c in el["constraint"]
        ]
    return out


def trim_sd(sd: dict[str, Any]) -> dict[str, Any]:
    keys = ("resourceType", "id", "url", "version", "name", "status", "kind", "abstract",
            "type", "baseDefinition", "derivation")
    out = {k: sd[k] for k in keys if k in sd}
    out["snapshot"] = {"element": [trim_element(e) for e in sd["snapshot"]["element"]]}
    return out


def collection(entries: list[dict[str, Any]], bundle_id: str) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "id": bundle_id,
        "meta": {"source": "npm:hl7.fhir.r4.examples@4.0.1"},
        "type": "collection",
        "entry": [{"fullUrl": r["url"], "resource": r} for r in entries],
    }


def main(package: Path) -> None:
    sps, sds = [], []
    for f in sorted(package.glob("SearchParameter-*.json")):
        sps.append(trim_sp(json.loads(f.read_text())))
    for f in sorted(package.glob("StructureDefinition-*.json")):
        sd = json.loads(f.read_text())
        if (sd.get("derivation") == "specialization" and sd.get("kind") in (
            "resource", "complex-type", "primitive-type"
        )) or sd.get("id") in ("Resource", "Element"):
            sds.append(trim_sd(sd))
    OUT.mkdir(parents=True, exist_ok=True)
    for name, items in (("r4-search-parameters", sps), ("r4-structure-definitions", sds)):
        path = OUT / f"Bundle-{name}.json"
        path.write_text(json.dumps(collection(items, name), separators=(",", ":"),
                                   ensure_ascii=False) + "\n")
        print(path, len(items), path.stat().st_size)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "package"))
