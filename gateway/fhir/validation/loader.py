"""Reads the definitions the validator compiles -- the package's only file access.

From ``profiles/`` (see ``profiles/README.md``):

* ``r4/Bundle-r4-structure-definitions.json`` -- R4 resources and data types;
* ``r4/Bundle-r4-profiles.json`` -- core profiles the official examples claim;
* ``r4/Bundle-r4-extensions.json`` -- R4's own extension definitions
  (``patient-birthPlace``, ``data-absent-reason`` ...), checked wherever an
  extension names one;
* ``r4/Bundle-r4-required-valuesets.json`` -- expansions of the ValueSets R4
  binds as *required*;
* ``StructureDefinition-*.json``, ``ValueSet-*.json``, ``CodeSystem-*.json`` --
  the gateway's own profiles and terminology, when present. Their ValueSets
  are expanded here (``terminology.Expander``) over their CodeSystems and the
  R4 expansions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from gateway.fhir.validation.terminology import Code, Expander, Unexpandable, expansion_contains


@dataclass(slots=True)
class Definitions:
    structure_definitions: list[dict[str, Any]]  # R4 base (resources, data types)
    profiles: dict[str, dict[str, Any]]  # constraint StructureDefinitions by canonical URL
    value_sets: dict[str, frozenset[Code]]  # expansions by canonical URL
    #: ValueSets that could not be expanded offline, with the reason
    unexpanded: dict[str, str] = field(default_factory=dict)
    #: R4's own extension definitions by canonical URL
    extensions: dict[str, dict[str, Any]] = field(default_factory=dict)


def _read(path: Path) -> Any:
    return orjson.loads(path.read_bytes())


def _bundle(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [e["resource"] for e in _read(path).get("entry", []) if "resource" in e]


def load_definitions(root: Path,
                     structure_definitions: list[dict[str, Any]] | None = None) -> Definitions:
    """Everything under ``root`` (a ``profiles/`` directory)."""
    r4 = root / "r4"
    base = structure_definitions if structure_definitions is not None else _bundle(
        r4 / "Bundle-r4-structure-definitions.json")
    profiles: dict[str, dict[str, Any]] = {}
    for sd in _bundle(r4 / "Bundle-r4-profiles.json"):
        profiles[sd["url"]] = sd
    value_sets: dict[str, frozenset[Code]] = {}
    unexpanded: dict[str, str] = {}
    for vs in _bundle(r4 / "Bundle-r4-required-valuesets.json"):
        if "expansion" in vs:
            value_sets[vs["url"]] = expansion_contains(vs)
        else:
            unexpanded[vs["url"]] = vs.get("description", "not expanded")
    extensions = {sd["url"]: sd for sd in _bundle(r4 / "Bundle-r4-extensions.json")}
    own_sds = [_read(p) for p in sorted(root.glob("StructureDefinition-*.json"))]
    own_vs = [_read(p) for p in sorted(root.glob("ValueSet-*.json"))]
    own_cs = [_read(p) for p in sorted(root.glob("CodeSystem-*.json"))]
    return with_own(Definitions(base, profiles, value_sets, unexpanded, extensions),
                    own_sds, own_vs, own_cs)


def with_own(defs: Definitions, structure_definitions: list[dict[str, Any]],
             value_sets: list[dict[str, Any]], code_systems: list[dict[str, Any]]
             ) -> Definitions:
    """``defs`` plus more profiles and terminology (the gateway's own, test fixtures)."""
    profiles = dict(defs.profiles)
    for sd in structure_definitions:
        if isinstance(sd, dict) and isinstance(sd.get("url"), str) and "snapshot" in sd:
            profiles[sd["url"]] = sd
    expander = Expander(
        {cs["url"]: cs for cs in code_systems if isinstance(cs.get("url"), str)},
        {vs["url"]: vs for vs in value_sets if isinstance(vs.get("url"), str)},
        defs.value_sets,
    )
    expansions = dict(defs.value_sets)
    unexpanded = dict(defs.unexpanded)
    for vs in value_sets:
        url = vs.get("url")
        if not isinstance(url, str):
            continue
        try:
            expansions[url] = expander.expand(url)
        except Unexpandable as exc:
            unexpanded[url] = str(exc)
    return Definitions(defs.structure_definitions, profiles, expansions, unexpanded,
                       defs.extensions)
