"""Trim the official FHIR R4 definitions into the gateway's ``profiles/r4/`` data.

Source: the npm package ``hl7.fhir.r4.examples@4.0.1`` (CC0-1.0), which carries the
R4 StructureDefinitions and SearchParameters. The output keeps only the fields
the gateway reads, as FHIR JSON Bundles of type ``collection``:

* ``Bundle-r4-search-parameters.json`` -- every SearchParameter of R4
  (``url, code, base, type, expression, target, modifier, comparator,
  multipleOr, multipleAnd, component``).
* ``Bundle-r4-structure-definitions.json`` -- StructureDefinitions of the
  resources and data types (``kind`` resource/complex-type/primitive-type,
  ``derivation`` specialization) with snapshot elements reduced to ``id, path,
  sliceName, slicing, min, max, type (code, profile, targetProfile), isSummary,
  isModifier, maxLength, fixed[x], pattern[x], minValue[x], maxValue[x],
  binding (strength, valueSet), constraint (key, severity, human, expression),
  contentReference``.
* ``Bundle-r4-profiles.json`` -- the core profiles the official examples claim
  (vital signs: ``vitalsigns`` and the profiles derived from it), trimmed the
  same way plus ``base`` (path, min, max).
* ``Bundle-r4-extensions.json`` -- R4's own extension definitions (every
  StructureDefinition of type ``Extension`` in the package, ``patient-birthPlace``,
  ``data-absent-reason``, ``oauth-uris`` ...) with ``url, name, context`` and the
  snapshot elements trimmed as above, less what the base ``Extension`` already
  says: the base's invariants (ele-1, ext-1), ``isSummary``/``isModifier``,
  ``base``, bindings that are not *required*, and leaf elements that repeat the
  base element. The validator checks an extension with one of these URLs
  against its definition wherever it occurs.
* ``Bundle-r4-required-valuesets.json`` -- every ValueSet that the kept
  definitions bind with strength *required*, expanded offline
  (``gateway.fhir.validation.terminology``) from the package's ValueSets and
  CodeSystems into ``expansion.contains`` of ``(system, code)``. A ValueSet
  that cannot be expanded offline (external code systems such as BCP-13 MIME
  types, ISO 4217 currencies, UCUM as a whole) is listed without expansion and
  its ``description`` says why; the validator does not check those bindings.
* ``Bundle-r4-code-systems.json`` -- the complete CodeSystems of the package (R4's
  own, ``http://hl7.org/fhir/...``, and the HL7 terminology it carries,
  ``http://terminology.hl7.org/CodeSystem/...``) with ``url, version, name,
  status, content, caseSensitive, hierarchyMeaning`` and their concepts' ``code,
  display``, nested concepts and the properties ``notSelectable``, ``status``,
  ``deprecated``: an implementation guide's value sets include them, and
  ``$lookup`` answers for them.
* ``Bundle-r4-compartment-definitions.json`` -- the five CompartmentDefinitions
  (Patient, Encounter, RelatedPerson, Practitioner, Device) with ``code,
  search`` and the ``resource`` entries that have a ``param``.

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
EL_KEYS = ("path", "sliceName", "min", "max", "isSummary", "isModifier", "contentReference",
           "maxLength")
EL_PREFIXES = ("fixed", "pattern", "minValue", "maxValue")
# the core profiles that official examples claim (meta.profile)
PROFILE_BASES = ("http://hl7.org/fhir/StructureDefinition/vitalsigns",)


def trim_sp(sp: dict[str, Any]) -> dict[str, Any]:
    out = {k: sp[k] for k in SP_KEYS if k in sp}
    if "component" in out:
        out["component"] = [
            {"definition": c["definition"], "expression": c["expression"]}
            for c in out["component"]
        ]
    return out


def trim_element(el: dict[str, Any], *, keep_base: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"id": el["id"], **{k: el[k] for k in EL_KEYS if k in el}}
    out.update({k: v for k, v in el.items() if k.startswith(EL_PREFIXES)})
    if "slicing" in el:
        out["slicing"] = {k: el["slicing"][k] for k in ("discriminator", "ordered", "rules")
                          if k in el["slicing"]}
    if keep_base and "base" in el:
        out["base"] = el["base"]
    if "type" in el:
        types = []
        for t in el["type"]:
            tt: dict[str, Any] = {"code": t["code"]}
            for key in ("profile", "targetProfile"):
                if key in t:
                    tt[key] = t[key]
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
    keep_base = sd.get("derivation") == "constraint"
    out["snapshot"] = {"element": [trim_element(e, keep_base=keep_base)
                                   for e in sd["snapshot"]["element"]]}
    return out


EXT_KEYS = ("resourceType", "id", "url", "name", "kind", "type", "baseDefinition",
            "derivation")


def trim_extension(sd: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """An extension definition with what validation reads beyond the base ``Extension``."""
    known = {(c["key"], c.get("expression")) for e in base["snapshot"]["element"]
             for c in e.get("constraint", [])}
    base_els = {e["path"]: trim_element(e) for e in base["snapshot"]["element"]}
    elements = []
    for el in sd["snapshot"]["element"]:
        t = trim_element(el)
        for k in ("isSummary", "isModifier"):
            t.pop(k, None)
        if t.get("binding", {}).get("strength") != "required":
            t.pop("binding", None)
        kept = [c for c in t.get("constraint", []) if (c["key"], c.get("expression")) not in known]
        if kept:
            t["constraint"] = kept
        else:
            t.pop("constraint", None)
        elements.append(t)
    # leaf elements that say what the base says (Extension.id, ...) add nothing
    ids = [e["id"] for e in elements]
    out = []
    for i, t in enumerate(elements):
        has_children = any(other.startswith(t["id"] + ".") or other.startswith(t["id"] + ":")
                           for other in ids[i + 1:])
        b = base_els.get(t["path"])
        same = b is not None and "sliceName" not in t and \
            {k: v for k, v in t.items() if k not in ("id", "constraint")} == \
            {k: v for k, v in b.items() if k not in ("id", "constraint")}
        plain_id = t["path"].endswith(".id") and set(t) <= {"id", "path", "min", "max", "type"}
        if i == 0 or has_children or not (same or plain_id):
            out.append(t)
    trimmed = {k: sd[k] for k in EXT_KEYS if k in sd}
    trimmed["context"] = [{"type": c["type"], "expression": c["expression"]}
                          for c in sd.get("context", [])]
    trimmed["snapshot"] = {"element": out}
    return trimmed


def required_value_sets(sds: list[dict[str, Any]]) -> list[str]:
    urls = set()
    for sd in sds:
        for el in sd["snapshot"]["element"]:
            b = el.get("binding")
            if b and b.get("strength") == "required" and "valueSet" in b:
                urls.add(b["valueSet"].split("|")[0])
    return sorted(urls)


def expand_required(package: Path, urls: list[str]) -> list[dict[str, Any]]:
    from gateway.fhir.validation.terminology import Expander, Unexpandable

    value_sets = {}
    for f in sorted(package.glob("ValueSet-*.json")):
        vs = json.loads(f.read_text())
        value_sets[vs["url"]] = vs
    code_systems = {}
    for f in sorted(package.glob("CodeSystem-*.json")):
        cs = json.loads(f.read_text())
        code_systems[cs["url"]] = cs
    expander = Expander(code_systems, value_sets)
    out = []
    for url in urls:
        vs = value_sets.get(url, {})
        entry: dict[str, Any] = {"resourceType": "ValueSet", "url": url}
        for k in ("id", "version", "name", "status"):
            if k in vs:
                entry[k] = vs[k]
        entry.setdefault("status", "active")
        try:
            codes = sorted(expander.expand(url))
        except Unexpandable as exc:
            entry["description"] = f"not expanded: {exc}"
            print("  unexpandable:", url, "-", exc)
        else:
            entry["expansion"] = {
                "timestamp": "2019-11-01T09:29:23+11:00",
                "total": len(codes),
                "contains": [{"system": s, "code": c} for s, c in codes],
            }
        out.append(entry)
    return out


def trim_compartment(cd: dict[str, Any]) -> dict[str, Any]:
    keys = ("resourceType", "id", "url", "version", "name", "status", "code", "search")
    out = {k: cd[k] for k in keys if k in cd}
    out["resource"] = [{"code": r["code"], "param": r["param"]}
                       for r in cd["resource"] if r.get("param")]
    return out


def is_core_profile(sd: dict[str, Any]) -> bool:
    return sd.get("derivation") == "constraint" and (
        sd.get("url") in PROFILE_BASES or sd.get("baseDefinition") in PROFILE_BASES)


CS_KEYS = ("resourceType", "id", "url", "version", "name", "status", "content",
           "caseSensitive", "hierarchyMeaning")
CONCEPT_PROPERTIES = ("notSelectable", "status", "deprecated")


def trim_concept(concept: dict[str, Any]) -> dict[str, Any]:
    out = {k: concept[k] for k in ("code", "display") if k in concept}
    kept = [p for p in concept.get("property", []) if p.get("code") in CONCEPT_PROPERTIES]
    if kept:
        out["property"] = kept
    if concept.get("concept"):
        out["concept"] = [trim_concept(c) for c in concept["concept"]]
    return out


def code_systems(package: Path) -> list[dict[str, Any]]:
    out = []
    for f in sorted(package.glob("CodeSystem-*.json")):
        cs = json.loads(f.read_text())
        if cs.get("content") == "complete" and cs.get("concept"):
            out.append({**{k: cs[k] for k in CS_KEYS if k in cs},
                        "concept": [trim_concept(c) for c in cs["concept"]]})
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
    sps, sds, profiles, extensions = [], [], [], []
    base_extension = json.loads((package / "StructureDefinition-Extension.json").read_text())
    for f in sorted(package.glob("SearchParameter-*.json")):
        sps.append(trim_sp(json.loads(f.read_text())))
    for f in sorted(package.glob("StructureDefinition-*.json")):
        sd = json.loads(f.read_text())
        if (sd.get("derivation") == "specialization" and sd.get("kind") in (
            "resource", "complex-type", "primitive-type"
        )) or sd.get("id") in ("Resource", "Element"):
            sds.append(trim_sd(sd))
        elif is_core_profile(sd):
            profiles.append(trim_sd(sd))
        elif sd.get("type") == "Extension" and sd.get("derivation") == "constraint":
            extensions.append(trim_extension(sd, base_extension))
    value_sets = expand_required(package, required_value_sets(sds + profiles + extensions))
    compartments = [trim_compartment(json.loads(f.read_text()))
                    for f in sorted(package.glob("CompartmentDefinition-*.json"))]
    compartments = [c for c in compartments if c.get("id") != "example"]
    OUT.mkdir(parents=True, exist_ok=True)
    for name, items in (("r4-search-parameters", sps), ("r4-structure-definitions", sds),
                        ("r4-profiles", profiles), ("r4-extensions", extensions),
                        ("r4-required-valuesets", value_sets),
                        ("r4-compartment-definitions", compartments),
                        ("r4-code-systems", code_systems(package))):
        path = OUT / f"Bundle-{name}.json"
        path.write_text(json.dumps(collection(items, name), separators=(",", ":"),
                                   ensure_ascii=False) + "\n")
        print(path, len(items), path.stat().st_size)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "package"))
