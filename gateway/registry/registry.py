"""The registry: what this gateway knows about FHIR R4 and its own profiles.

Built once at start from the data in ``profiles/r4`` (trimmed from the
official ``hl7.fhir.r4.examples@4.0.1`` package by
``scripts/build_r4_definitions.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import orjson

import gateway
from gateway.fhir.indexer import Indexer, SearchParam


def profiles_dir() -> Path:
    """``profiles/`` inside an installed wheel, else the source tree's."""
    here = Path(gateway.__file__).resolve().parent
    packaged = here / "_data" / "profiles"
    return packaged if packaged.is_dir() else here.parent / "profiles"


def _bundle_resources(path: Path) -> list[dict[str, Any]]:
    bundle = orjson.loads(path.read_bytes())
    return [e["resource"] for e in bundle.get("entry", [])]


@dataclass(frozen=True, slots=True)
class TypeInfo:
    """Top-level element facts of one resource type."""

    name: str
    summary: frozenset[str]  # element names (choice names without [x]) with isSummary
    mandatory: frozenset[str]  # element names with min >= 1
    choices: frozenset[str]  # choice element names (``value`` for ``value[x]``)


@dataclass(eq=False)  # hashed by identity: one registry per process
class Registry:
    structure_definitions: list[dict[str, Any]]
    search_parameters: list[dict[str, Any]]
    indexer: Indexer
    types: dict[str, TypeInfo] = field(default_factory=dict)

    @classmethod
    def load(cls, root: Path | None = None) -> Registry:
        r4 = (root or profiles_dir()) / "r4"
        sds = _bundle_resources(r4 / "Bundle-r4-structure-definitions.json")
        sps = _bundle_resources(r4 / "Bundle-r4-search-parameters.json")
        reg = cls(sds, sps, Indexer(sps, sds))
        for sd in sds:
            if sd.get("kind") == "resource" and not sd.get("abstract"):
                reg.types[sd["type"]] = _type_info(sd)
        return reg

    @property
    def resource_types(self) -> list[str]:
        return sorted(self.types)

    def is_resource_type(self, name: str) -> bool:
        return name in self.types

    def search_params(self, resource_type: str) -> dict[str, SearchParam]:
        return self.indexer.params_for(resource_type)

    @cached_property
    def common_search_params(self) -> dict[str, SearchParam]:
        """Parameters every type has (base Resource/DomainResource)."""
        return self.indexer.params_for("Resource")


def _type_info(sd: dict[str, Any]) -> TypeInfo:
    root = sd["type"]
    summary: set[str] = set()
    mandatory: set[str] = set()
    choices: set[str] = set()
    for el in sd["snapshot"]["element"]:
        parts = el["path"].split(".")
        if len(parts) != 2 or parts[0] != root:
            continue
        name = parts[1]
        if name.endswith("[x]"):
            name = name[:-3]
            choices.add(name)
        if el.get("isSummary"):
            summary.add(name)
        if el.get("min", 0) >= 1:
            mandatory.add(name)
    return TypeInfo(root, frozenset(summary), frozenset(mandatory), frozenset(choices))
