"""The registry: what this gateway knows about FHIR R4 and its own profiles.

Built once at start from the data in ``profiles/r4`` (trimmed from the
official ``hl7.fhir.r4.examples@4.0.1`` package by
``scripts/build_r4_definitions.py``) and the gateway's own conformance
resources in ``profiles/*.json`` (StructureDefinitions, CodeSystems,
ValueSets, ConceptMaps, ...; completed by ``scripts/build_profiles.py``),
which are found by canonical URL (:meth:`Registry.canonical`) or by type and
id (:meth:`Registry.conformance_resource`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import orjson

import gateway
from gateway.fhir.indexer import Indexer, SearchParam
from gateway.fhir.terminology import Terminology


def profiles_dir() -> Path:
    """``profiles/`` inside an installed wheel, else the source tree's."""
    here = Path(gateway.__file__).resolve().parent
    packaged = here / "_data" / "profiles"
    return packaged if packaged.is_dir() else here.parent / "profiles"


@lru_cache(maxsize=1)
def _r4_code_systems() -> tuple[dict[str, Any], ...]:
    """R4's complete CodeSystems and the HL7 terminology its package carries
    (``profiles/r4/Bundle-r4-code-systems.json``, 8 MB in memory once read)."""
    return tuple(_bundle_resources(profiles_dir() / "r4" / "Bundle-r4-code-systems.json"))


def _conformance_resources(root: Path) -> list[dict[str, Any]]:
    """The top-level ``profiles/<Type>-<id>.json`` files, in file-name order."""
    out = []
    for path in sorted(root.glob("*.json")):
        resource = orjson.loads(path.read_bytes())
        if isinstance(resource, dict) and isinstance(resource.get("resourceType"), str):
            out.append(resource)
    return out


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
    #: below the top: each backbone element's path (``contact``, ``rest.resource``)
    #: -> the names of its elements with isSummary, and its choice names
    nested: Mapping[str, tuple[frozenset[str], frozenset[str]]] = field(default_factory=dict)
    #: an element defined as another's (``item.item`` -> ``item``: contentReference)
    aliases: Mapping[str, str] = field(default_factory=dict)


@dataclass(eq=False)  # hashed by identity: one registry per process
class Registry:
    structure_definitions: list[dict[str, Any]]
    search_parameters: list[dict[str, Any]]
    indexer: Indexer
    types: dict[str, TypeInfo] = field(default_factory=dict)
    #: the gateway's own conformance resources (``profiles/*.json``)
    conformance: list[dict[str, Any]] = field(default_factory=list)
    #: R4's ValueSets with a required binding, expanded (``profiles/r4``)
    r4_value_sets: list[dict[str, Any]] = field(default_factory=list)
    #: R4's core profiles the validator holds (vital signs): type -> canonical URLs
    core_profiles: dict[str, list[str]] = field(default_factory=dict)
    #: R4's compartments: the compartment's type (``Encounter``) -> each type in it
    #: -> the search parameters that put a resource there (``{def}``: the owner itself)
    compartments: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict)
    #: their canonical URLs, by the compartment's type
    compartment_urls: dict[str, str] = field(default_factory=dict)
    _by_url: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    _by_id: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, root: Path | None = None) -> Registry:
        root = root or profiles_dir()
        r4 = root / "r4"
        sds = _bundle_resources(r4 / "Bundle-r4-structure-definitions.json")
        sps = _bundle_resources(r4 / "Bundle-r4-search-parameters.json")
        value_sets = _bundle_resources(r4 / "Bundle-r4-required-valuesets.json")
        own = _conformance_resources(root)
        # R4's parameters and the gateway's own, over its extensions
        sps += [r for r in own if r["resourceType"] == "SearchParameter"]
        reg = cls(sds, sps, Indexer(sps, sds, value_sets))
        for sd in sds:
            if sd.get("kind") == "resource" and not sd.get("abstract"):
                reg.types[sd["type"]] = _type_info(sd)
        for resource in own:
            reg.add_conformance(resource)
        reg.r4_value_sets = value_sets
        for sd in _bundle_resources(r4 / "Bundle-r4-profiles.json"):
            if sd.get("kind") == "resource":
                reg.core_profiles.setdefault(sd["type"], []).append(sd["url"])
        for cd in _bundle_resources(r4 / "Bundle-r4-compartment-definitions.json"):
            reg.compartments[cd["code"]] = {r["code"]: tuple(r["param"])
                                            for r in cd["resource"]}
            reg.compartment_urls[cd["code"]] = cd["url"]
        return reg

    def add_conformance(self, resource: dict[str, Any]) -> None:
        """Register one conformance resource by ``url``, ``url|version`` and type/id."""
        self.conformance.append(resource)
        rt, rid, url = resource["resourceType"], resource.get("id"), resource.get("url")
        if isinstance(rid, str):
            self._by_id[(rt, rid)] = resource
        if isinstance(url, str):
            self._by_url.setdefault(url, resource)
            version = resource.get("version")
            if isinstance(version, str):
                self._by_url[f"{url}|{version}"] = resource

    def canonical(self, url: str, resource_type: str | None = None) -> dict[str, Any] | None:
        """The conformance resource with canonical ``url`` (``url|version`` pins a version).

        ``resource_type`` disambiguates when code system and value set share a URL
        (they do not in ``profiles/``, but imported content may).
        """
        found = self._by_url.get(url)
        if found is not None and resource_type not in (None, found["resourceType"]):
            base = url.split("|", 1)[0]
            version = url.partition("|")[2] or None
            found = next((r for r in self.conformance
                          if r["resourceType"] == resource_type and r.get("url") == base
                          and version in (None, r.get("version"))), None)
        return found

    def conformance_resource(self, resource_type: str, id: str) -> dict[str, Any] | None:
        return self._by_id.get((resource_type, id))

    def conformance_of(self, resource_type: str) -> list[dict[str, Any]]:
        return [r for r in self.conformance if r["resourceType"] == resource_type]

    def supported_profiles(self, resource_type: str) -> list[str]:
        """The profiles of ``resource_type`` that writes are validated against when
        they claim them: R4's core ones and the gateway's own."""
        own = [sd["url"] for sd in self.conformance_of("StructureDefinition")
               if sd.get("derivation") == "constraint" and sd.get("kind") == "resource"
               and sd.get("type") == resource_type]
        return sorted(self.core_profiles.get(resource_type, [])) + sorted(own)

    @cached_property
    def terminology(self) -> Terminology:
        """Terminology over the own CodeSystems, ValueSets and ConceptMaps, R4's
        required-binding ValueSets (expanded: their members are all there is), and
        R4's CodeSystems (read when first asked for)."""
        return Terminology([*self.conformance, *self.r4_value_sets],
                           fallback=_r4_code_systems)

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
        return self.indexer.common_params()


def _type_info(sd: dict[str, Any]) -> TypeInfo:
    root = sd["type"]
    summary: set[str] = set()
    mandatory: set[str] = set()
    choices: set[str] = set()
    nested: dict[str, tuple[set[str], set[str]]] = {}
    aliases: dict[str, str] = {}
    for el in sd["snapshot"]["element"]:
        parts = el["path"].split(".")
        if len(parts) < 2 or parts[0] != root:
            continue
        name = parts[-1]
        choice = name.endswith("[x]")
        if choice:
            name = name[:-3]
        if ref := el.get("contentReference"):  # "#Questionnaire.item"
            aliases[".".join([*parts[1:-1], name])] = ref.split(".", 1)[1]
        if len(parts) > 2:  # an element of a backbone element
            keep, kinds = nested.setdefault(".".join(parts[1:-1]), (set(), set()))
            if choice:
                kinds.add(name)
            if el.get("isSummary"):
                keep.add(name)
            continue
        if choice:
            choices.add(name)
        if el.get("isSummary"):
            summary.add(name)
        if el.get("min", 0) >= 1:
            mandatory.add(name)
    return TypeInfo(root, frozenset(summary), frozenset(mandatory), frozenset(choices),
                    {path: (frozenset(keep), frozenset(kinds))
                     for path, (keep, kinds) in nested.items()}, aliases)
