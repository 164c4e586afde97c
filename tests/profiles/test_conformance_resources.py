"""Every file in ``profiles/`` (top level) is a well-formed, self-consistent FHIR resource."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fhirpathpy import compile as fhirpath_compile

from tests.profiles.helpers import (
    BASE,
    PROFILES,
    build_script,
    by_url,
    conformance,
    load_json,
    of_type,
)

FILES = conformance()
CODE_SYSTEMS = {cs["url"]: cs for cs in of_type("CodeSystem")}
VALUE_SETS = {vs["url"]: vs for vs in of_type("ValueSet")}
STRUCTURES = {sd["url"]: sd for sd in of_type("StructureDefinition")}
R4 = {sd["url"]: sd for sd in (e["resource"] for e in load_json(
    PROFILES / "r4" / "Bundle-r4-structure-definitions.json")["entry"])}
EQUIVALENCES = {"relatedto", "equivalent", "equal", "wider", "subsumes", "narrower",
                "specializes", "inexact", "unmatched", "disjoint"}


def concepts(cs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}

    def walk(items: list[dict[str, Any]]) -> None:
        for c in items:
            assert c["code"] not in out, f"{cs['url']}: code {c['code']} twice"
            out[c["code"]] = c
            walk(c.get("concept", []))

    walk(cs.get("concept", []))
    return out


def is_fragment(res: dict[str, Any]) -> bool:
    return res["resourceType"] == "CodeSystem" and res.get("content") == "fragment"


def test_profiles_directory_holds_the_issue_3_content() -> None:
    ids = {(r["resourceType"], r["id"]) for r in FILES.values()}
    for cs in ("care-level", "dutch-care-line", "pathway-programme", "handoff-obligation",
               "pathway-phase", "escalation-criterion", "second-opinion-exception"):
        assert ("CodeSystem", cs) in ids
        assert ("ValueSet", cs) in ids
    for sd in ("pathway-episode-of-care", "referral-service-request", "handoff-task",
               "discharge-composition", "follow-up-care-plan", "discharge-bundle",
               "pain-assessment-questionnaire-response"):
        assert ("StructureDefinition", sd) in ids
    assert ("ConceptMap", "dutch-line-to-care-level") in ids


@pytest.mark.parametrize("name", sorted(FILES))
def test_file_is_named_after_type_and_id_and_carries_the_metadata(name: str) -> None:
    res = FILES[name]
    assert name == f"{res['resourceType']}-{res['id']}.json"
    assert re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", res["id"])
    for key in ("url", "version", "name", "status", "description", "publisher", "date"):
        assert res.get(key), f"{name} has no {key}"
    assert res["status"] in ("draft", "active")
    if is_fragment(res):
        assert not res["url"].startswith(BASE), "a fragment carries the external system's URL"
        assert res.get("copyright")
    else:
        assert res["url"] == f"{BASE}/{res['resourceType']}/{res['id']}"
        assert res["version"] == "0.1.0"


@pytest.mark.parametrize("name", sorted(FILES))
def test_description_names_the_pathway_rule_it_serves(name: str) -> None:
    assert re.search(r"\bH(1[0-3]|[1-9])\b", FILES[name]["description"]), \
        f"{name}: description names no rule H1-H13 of PATHWAYS.md"


@pytest.mark.parametrize("name", sorted(FILES))
def test_narrative_is_generated_plain_xhtml(name: str) -> None:
    text = FILES[name]["text"]
    assert text["status"] == "generated"
    div = text["div"]
    assert div.startswith('<div xmlns="http://www.w3.org/1999/xhtml">') and div.endswith("</div>")
    assert not re.search(r"<script|\son\w+=|javascript:|<(img|a|style|iframe)\b", div, re.I)


def test_canonical_urls_are_unique() -> None:
    urls = [r["url"] for r in FILES.values()]
    assert len(urls) == len(set(urls))


# --------------------------------------------------------------------------- CodeSystems


@pytest.mark.parametrize("url", sorted(CODE_SYSTEMS))
def test_code_system_is_consistent(url: str) -> None:
    cs = CODE_SYSTEMS[url]
    codes = concepts(cs)
    assert codes, f"{url} has no concepts"
    declared = {p["code"] for p in cs.get("property", [])}
    for code, c in codes.items():
        assert c.get("display"), f"{url}#{code} has no display"
        for p in c.get("property", []):
            assert p["code"] in declared, f"{url}#{code} uses undeclared property {p['code']}"
    if cs["content"] == "complete":
        assert cs["count"] == len(codes)
        assert cs["valueSet"] in VALUE_SETS, f"{url}: its all-codes ValueSet is missing"
        assert all(c.get("definition") for c in codes.values()), url
    else:
        assert cs["content"] == "fragment"


def test_handoff_obligations_are_exactly_the_rules_of_pathways_md() -> None:
    cs = CODE_SYSTEMS[f"{BASE}/CodeSystem/handoff-obligation"]
    assert list(concepts(cs)) == [f"H{i}" for i in range(1, 14)]
    sources = {c["code"]: next(p["valueString"] for p in c["property"] if p["code"] == "source")
               for c in cs["concept"]}
    assert sources["H1"] == "001 IV.5" and sources["H11"] == "002 3.2" and sources["H13"] == "003"


# --------------------------------------------------------------------------- ValueSets


@pytest.mark.parametrize("url", sorted(VALUE_SETS))
def test_value_set_codes_exist_in_their_code_systems(url: str) -> None:
    vs = VALUE_SETS[url]
    parts = vs["compose"]["include"] + vs["compose"].get("exclude", [])
    for part in parts:
        for imported in part.get("valueSet", []):
            assert imported in VALUE_SETS, f"{url} imports unknown {imported}"
        system = part.get("system")
        if system is None:
            continue
        cs = CODE_SYSTEMS.get(system)
        assert cs is not None or not system.startswith(BASE), f"{url}: unknown system {system}"
        if cs is None:
            continue
        codes = concepts(cs)
        for c in part.get("concept", []):
            assert c["code"] in codes, f"{url}: {system}#{c['code']} does not exist"
            if c.get("display"):
                assert c["display"] == codes[c["code"]]["display"], f"{url}: display of {c['code']}"
        for f in part.get("filter", []):
            if f["property"] == "concept" and f["op"] in ("is-a", "descendent-of", "is-not-a"):
                assert f["value"] in codes, f"{url}: filter on unknown concept {f['value']}"
            if f["op"] == "regex":
                re.compile(f["value"])


def test_external_code_systems_are_referenced_by_their_official_uris() -> None:
    systems = {part["system"] for vs in VALUE_SETS.values()
               for part in vs["compose"]["include"] if "system" in part}
    external = {s for s in systems if not s.startswith(BASE)}
    assert external == {"http://loinc.org", "http://snomed.info/sct",
                        "http://fhir.de/CodeSystem/bfarm/icd-10-gm",
                        "http://id.who.int/icd/release/11/mms"}


# --------------------------------------------------------------------------- ConceptMaps


@pytest.mark.parametrize("cm", of_type("ConceptMap"), ids=lambda cm: cm["id"])
def test_concept_map_sources_and_targets_exist(cm: dict[str, Any]) -> None:
    assert cm["sourceUri"] in VALUE_SETS and cm["targetUri"] in VALUE_SETS
    for group in cm["group"]:
        source = concepts(CODE_SYSTEMS[group["source"]])
        target = concepts(CODE_SYSTEMS[group["target"]])
        assert {el["code"] for el in group["element"]} == set(source), "every source code is mapped"
        for el in group["element"]:
            assert el["display"] == source[el["code"]]["display"]
            for t in el["target"]:
                assert t["code"] in target, f"{cm['id']}: target {t['code']} does not exist"
                assert t["display"] == target[t["code"]]["display"]
                assert t["equivalence"] in EQUIVALENCES


def test_the_two_care_level_maps_are_each_others_reverse() -> None:
    maps = {cm["id"]: cm for cm in of_type("ConceptMap")}

    def pairs(cm: dict[str, Any]) -> set[tuple[str, str]]:
        return {(el["code"], t["code"]) for g in cm["group"] for el in g["element"]
                for t in el["target"]}

    forward = pairs(maps["dutch-line-to-care-level"])
    backward = {(line, level) for level, line in pairs(maps["care-level-to-dutch-line"])}
    assert forward == backward


# --------------------------------------------------------------------------- StructureDefinitions


@pytest.mark.parametrize("url", sorted(STRUCTURES))
def test_snapshot_contains_every_differential_element_with_its_constraints(url: str) -> None:
    sd = STRUCTURES[url]
    assert sd["derivation"] == "constraint" and sd["fhirVersion"] == "4.0.1"
    snapshot = {el["id"]: el for el in sd["snapshot"]["element"]}
    assert len(snapshot) == len(sd["snapshot"]["element"]), "snapshot ids are unique"
    for diff in sd["differential"]["element"]:
        el = snapshot.get(diff["id"])
        assert el is not None, f"{diff['id']} is not in the snapshot"
        for key, value in diff.items():
            if key == "constraint":
                merged = {c["key"]: c for c in el["constraint"]}
                for c in value:
                    assert merged[c["key"]]["expression"] == c["expression"]
                    assert merged[c["key"]]["source"] == url
            elif key not in ("short", "definition", "comment"):
                assert el[key] == value, f"{diff['id']}.{key} differs in the snapshot"


@pytest.mark.parametrize("url", sorted(STRUCTURES))
def test_snapshot_is_complete_against_the_base_definition(url: str) -> None:
    """Every element of the base type is in the snapshot, in the base's order."""
    sd = STRUCTURES[url]
    base = STRUCTURES.get(sd["baseDefinition"]) or R4[sd["baseDefinition"]]
    base_ids = [el["id"] for el in base["snapshot"]["element"]]
    ids = [el["id"] for el in sd["snapshot"]["element"]]
    assert [i for i in ids if i in set(base_ids)] == base_ids
    path_of = build_script().path_of
    for el in sd["snapshot"]["element"]:
        assert el["path"] == path_of(el["id"])
        last = el["id"].rsplit(".", 1)[-1]
        if ":" in last:
            assert el["sliceName"] == last.split(":", 1)[1]
            sliced = el["id"].rsplit(":", 1)[0]
            assert ids.index(sliced) < ids.index(el["id"]), f"{el['id']} precedes {sliced}"
            assert "slicing" in next(e for e in sd["snapshot"]["element"] if e["id"] == sliced)


@pytest.mark.parametrize("url", sorted(STRUCTURES))
def test_structure_definition_references_resolve(url: str) -> None:
    sd = STRUCTURES[url]
    known = by_url()
    assert sd["baseDefinition"] in known or sd["baseDefinition"] in R4
    for el in sd["snapshot"]["element"]:
        for t in el.get("type", []):
            for profile in t.get("profile", []):
                assert profile in known or profile.startswith("http://hl7.org/fhir/"), \
                    f"{el['id']}: unknown profile {profile}"
                if t["code"] == "Extension":
                    assert known[profile]["type"] == "Extension"
        binding = el.get("binding", {}).get("valueSet", "")
        if binding.startswith(BASE):
            assert binding in VALUE_SETS, f"{el['id']}: unknown value set {binding}"
        for c in el.get("constraint", []):
            if c.get("source") == url:
                fhirpath_compile(c["expression"])  # parses


@pytest.mark.parametrize("sd", [sd for sd in STRUCTURES.values() if sd["type"] == "Extension"],
                         ids=lambda sd: sd["id"])
def test_extension_fixes_its_url_and_says_where_it_applies(sd: dict[str, Any]) -> None:
    elements = {el["id"]: el for el in sd["snapshot"]["element"]}
    assert elements["Extension.url"]["fixedUri"] == sd["url"]
    assert elements["Extension.extension"]["max"] == "0"
    assert elements["Extension.value[x]"]["min"] == 1
    assert sd["context"] and all(c["type"] == "element" for c in sd["context"])


def test_required_bindings_of_the_profiles_use_the_gateways_value_sets() -> None:
    required = {el["binding"]["valueSet"] for sd in STRUCTURES.values()
                for el in sd["differential"]["element"]
                if el.get("binding", {}).get("strength") == "required"}
    assert required <= set(VALUE_SETS)
    assert f"{BASE}/ValueSet/handoff-obligation" in required


# --------------------------------------------------------------------------- registry, docs


def test_registry_finds_every_file_by_canonical_url_and_by_id() -> None:
    from gateway.registry import Registry

    registry = Registry.load()
    for res in FILES.values():
        assert registry.canonical(res["url"]) is not None
        assert registry.canonical(f"{res['url']}|{res['version']}", res["resourceType"]) == res
        assert registry.conformance_resource(res["resourceType"], res["id"]) == res
    assert registry.canonical(f"{BASE}/ValueSet/care-level|9.9") is None
    assert registry.canonical(f"{BASE}/CodeSystem/care-level", "ValueSet") is None
    assert len(registry.conformance_of("StructureDefinition")) == len(STRUCTURES)


def test_docs_profiles_md_lists_every_resource() -> None:
    text = (PROFILES.parent / "docs" / "profiles.md").read_text(encoding="utf-8")
    for res in FILES.values():
        assert f"`{res['id']}`" in text, f"docs/profiles.md does not mention {res['id']}"
