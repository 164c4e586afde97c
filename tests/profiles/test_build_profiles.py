"""``scripts/build_profiles.py``: snapshot generation, idempotence, and no drift in ``profiles/``.

The generator is run on the repository's trimmed R4 definitions (fixture
``trimmed_package``), so these tests need neither the network nor the npm
package; with the package present (``$FHIR_R4_PACKAGE`` or
``/tmp/npm/ex/package``) the committed files are also compared byte for byte.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.profiles.helpers import BASE, PROFILES, build_script, conformance, load_json

bp = build_script()
COMPARED = ("id", "path", "sliceName", "min", "max", "contentReference")


def _sources() -> dict[str, dict[str, Any]]:
    """The committed StructureDefinitions, differential only (what an author writes)."""
    out = {}
    for res in conformance().values():
        if res["resourceType"] == "StructureDefinition":
            src = {k: v for k, v in res.items() if k not in ("snapshot", "text")}
            out[src["url"]] = src
    return out


def _defs(package: Path, local: dict[str, dict[str, Any]] | None = None) -> Any:
    return bp.Definitions(package, _sources() if local is None else local)


def _profile(diff: list[dict[str, Any]], type_: str = "EpisodeOfCare",
             url: str = f"{BASE}/StructureDefinition/test") -> dict[str, Any]:
    return {"resourceType": "StructureDefinition", "id": "test", "url": url, "type": type_,
            "kind": "resource", "derivation": "constraint",
            "baseDefinition": f"http://hl7.org/fhir/StructureDefinition/{type_}",
            "differential": {"element": diff}}


def _snapshot(package: Path, diff: list[dict[str, Any]], type_: str = "EpisodeOfCare"
              ) -> list[dict[str, Any]]:
    sd = _profile(diff, type_)
    local = {**_sources(), sd["url"]: sd}
    return list(_defs(package, local).get(sd["url"])["snapshot"]["element"])


def _ids(elements: list[dict[str, Any]]) -> list[str]:
    return [e["id"] for e in elements]


def _types(el: dict[str, Any]) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    return [(t["code"], tuple(t.get("profile", [])), tuple(t.get("targetProfile", [])))
            for t in el.get("type", [])]


def _slicing(el: dict[str, Any]) -> Any:
    s = el.get("slicing")
    return s and (s.get("discriminator"), s.get("rules"), s.get("ordered", False))


def test_element_path_drops_slice_names() -> None:
    assert bp.path_of("Composition.section:medication.code") == "Composition.section.code"
    assert bp.path_of("Extension.value[x]") == "Extension.value[x]"


def test_datatype_children_are_unfolded_only_where_the_differential_goes(
        trimmed_package: Path) -> None:
    elements = _snapshot(trimmed_package, [
        {"id": "EpisodeOfCare.period.start", "min": 1}])
    ids = _ids(elements)
    assert ids[ids.index("EpisodeOfCare.period") + 1:ids.index("EpisodeOfCare.period") + 5] == [
        "EpisodeOfCare.period.id", "EpisodeOfCare.period.extension",
        "EpisodeOfCare.period.start", "EpisodeOfCare.period.end"]
    start = elements[ids.index("EpisodeOfCare.period.start")]
    assert start["min"] == 1 and start["path"] == "EpisodeOfCare.period.start"
    assert "EpisodeOfCare.managingOrganization.reference" not in ids


def test_slices_copy_the_sliced_backbone_and_follow_its_last_slice(trimmed_package: Path) -> None:
    elements = _snapshot(trimmed_package, [
        {"id": "Composition.section", "slicing": {
            "discriminator": [{"type": "pattern", "path": "code"}], "rules": "open"}},
        {"id": "Composition.section:a", "min": 1, "max": "1"},
        {"id": "Composition.section:a.code", "min": 1,
         "patternCodeableConcept": {"coding": [{"system": "http://loinc.org", "code": "1-8"}]}},
        {"id": "Composition.section:b", "max": "1"},
        {"id": "Composition.section.title", "min": 1},
    ], "Composition")
    ids = _ids(elements)
    a, b = ids.index("Composition.section:a"), ids.index("Composition.section:b")
    assert ids.index("Composition.section.section") < a < b
    assert elements[a]["sliceName"] == "a" and "slicing" not in elements[a]
    assert elements[b]["min"] == 0  # a slice does not inherit the sliced element's min
    # the slice carries the sliced element's children, with the profile's constraints on them
    assert elements[ids.index("Composition.section:b.title")]["min"] == 1
    assert elements[ids.index("Composition.section:a.code")]["min"] == 1
    assert "Composition.section:b.section" in ids
    assert ids[-1] == "Composition.section:b.section"


def test_extension_slices_get_default_slicing_and_unfold_from_their_profile(
        trimmed_package: Path) -> None:
    ext = f"{BASE}/StructureDefinition/care-level"
    elements = _snapshot(trimmed_package, [
        {"id": "EpisodeOfCare.extension:level", "min": 1, "max": "1",
         "type": [{"code": "Extension", "profile": [ext]}]},
        {"id": "EpisodeOfCare.extension:level.value[x]",
         "binding": {"strength": "required", "valueSet": f"{BASE}/ValueSet/care-level"}},
    ])
    by_id = {e["id"]: e for e in elements}
    assert by_id["EpisodeOfCare.extension"]["slicing"]["discriminator"] == [
        {"type": "value", "path": "url"}]
    assert by_id["EpisodeOfCare.extension:level.url"]["fixedUri"] == ext
    value = by_id["EpisodeOfCare.extension:level.value[x]"]
    assert value["path"] == "EpisodeOfCare.extension.value[x]"
    assert value["binding"]["valueSet"] == f"{BASE}/ValueSet/care-level"
    assert [t["code"] for t in value["type"]] == ["CodeableConcept"]
    assert by_id["EpisodeOfCare.extension:level"]["short"]  # read from the extension


def test_profile_constraints_are_appended_with_their_source(trimmed_package: Path) -> None:
    elements = _snapshot(trimmed_package, [
        {"id": "EpisodeOfCare", "constraint": [
            {"key": "t-1", "severity": "error", "human": "x", "expression": "status.exists()"}]}])
    root = elements[0]
    keys = [c["key"] for c in root["constraint"]]
    assert "dom-2" in keys and keys[-1] == "t-1"
    assert root["constraint"][-1]["source"] == f"{BASE}/StructureDefinition/test"


@pytest.mark.parametrize(("diff", "message"), [
    ([{"id": "EpisodeOfCare.status", "max": "*"}], "widens max"),
    ([{"id": "EpisodeOfCare.type:x"}], "needs slicing"),
    ([{"id": "EpisodeOfCare.nonsense", "min": 1}], "is not an element"),
    ([{"id": "EpisodeOfCare.patient", "type": [{"code": "string"}]}], "is not one of"),
    ([{"id": "EpisodeOfCare.period", "min": 2}], "min > max"),
    ([{"id": "EpisodeOfCare.type:a/b"}], "re-slicing"),
])
def test_impossible_differentials_are_errors(trimmed_package: Path, diff: list[dict[str, Any]],
                                             message: str) -> None:
    if "type:a/b" in diff[0]["id"]:
        diff = [{"id": "EpisodeOfCare.type", "slicing": {"rules": "open"}}, *diff]
    with pytest.raises(bp.ProfileError, match=message.replace("[", r"\[")):
        _snapshot(trimmed_package, diff)


@pytest.mark.parametrize("url", sorted(_sources()))
def test_committed_snapshots_match_a_regeneration(trimmed_package: Path, url: str) -> None:
    """Regenerate from the differential: same elements, cardinality, types and rules."""
    committed = next(r for r in conformance().values() if r.get("url") == url)
    generated = _defs(trimmed_package).get(url)
    got, want = generated["snapshot"]["element"], committed["snapshot"]["element"]
    assert _ids(got) == _ids(want)
    for g, w in zip(got, want, strict=True):
        for key in COMPARED:
            assert g.get(key) == w.get(key), f"{w['id']}.{key}"
        assert _types(g) == _types(w), f"{w['id']}.type"
        assert _slicing(g) == _slicing(w), f"{w['id']}.slicing"
        for key in set(g) | set(w):
            if key.startswith(("fixed", "pattern", "minValue", "maxValue")):
                assert g.get(key) == w.get(key), f"{w['id']}.{key}"
        if "valueSet" in g.get("binding", {}):
            assert g["binding"]["strength"] == w["binding"]["strength"]
            assert g["binding"]["valueSet"] == w["binding"]["valueSet"]
        assert {c["key"] for c in g.get("constraint", [])} == \
            {c["key"] for c in w.get("constraint", [])}, f"{w['id']}.constraint"
    assert generated["differential"] == committed["differential"]


def test_non_structure_definitions_are_up_to_date() -> None:
    for path in sorted(PROFILES.glob("*.json")):
        res = load_json(path)
        if res["resourceType"] != "StructureDefinition":
            assert bp.dump(bp.complete(res, None)) == path.read_text(encoding="utf-8"), path.name


def test_building_twice_changes_nothing(tmp_path: Path, trimmed_package: Path) -> None:
    for path in PROFILES.glob("*.json"):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    assert bp.main(["--profiles", str(tmp_path), "--package", str(trimmed_package)]) == 0
    first = {p.name: p.read_text(encoding="utf-8") for p in tmp_path.glob("*.json")}
    assert bp.main(["--profiles", str(tmp_path), "--package", str(trimmed_package),
                    "--check"]) == 0
    assert first == {p.name: p.read_text(encoding="utf-8") for p in tmp_path.glob("*.json")}


def test_a_differential_only_file_gets_its_snapshot(tmp_path: Path, trimmed_package: Path) -> None:
    for path in PROFILES.glob("*.json"):
        res = load_json(path)
        if res["resourceType"] == "StructureDefinition":
            res = {k: v for k, v in res.items() if k not in ("snapshot", "text", "mapping")}
            diff = res["differential"]["element"]
            # authored in any order, but slices in the order they are to appear
            res["differential"] = {"element": [e for e in diff if ":" in e["id"]]
                                   + [e for e in reversed(diff) if ":" not in e["id"]]}
        (tmp_path / path.name).write_text(json.dumps(res), encoding="utf-8")
    assert bp.main(["--profiles", str(tmp_path), "--package", str(trimmed_package)]) == 0
    task = load_json(tmp_path / "StructureDefinition-handoff-task.json")
    ids = _ids(task["snapshot"]["element"])
    assert "Task.restriction.period.end" in ids
    committed = load_json(PROFILES / "StructureDefinition-handoff-task.json")
    assert task["differential"] == committed["differential"]  # re-sorted to snapshot order


def test_a_file_named_against_its_id_is_refused(tmp_path: Path, trimmed_package: Path) -> None:
    cs = copy.deepcopy(load_json(PROFILES / "CodeSystem-care-level.json"))
    (tmp_path / "CodeSystem-wrong.json").write_text(json.dumps(cs), encoding="utf-8")
    assert bp.main(["--profiles", str(tmp_path), "--package", str(trimmed_package)]) == 2


def _r4_package() -> Path:
    """The npm package hl7.fhir.r4.examples@4.0.1, unpacked (fetched by name once)."""
    package = bp.DEFAULT_PACKAGE
    if (package / "StructureDefinition-Resource.json").is_file():
        return package
    cache = Path.home() / ".cache" / "carepath" / "hl7.fhir.r4.examples-4.0.1"
    unpacked = cache / "package"
    if not (unpacked / "StructureDefinition-Resource.json").is_file():
        npm = shutil.which("npm")
        assert npm is not None, "npm is needed to fetch hl7.fhir.r4.examples@4.0.1"
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([npm, "pack", "--silent", "hl7.fhir.r4.examples@4.0.1"], cwd=cache,
                       check=True, capture_output=True, timeout=600)
        with tarfile.open(cache / "hl7.fhir.r4.examples-4.0.1.tgz") as tar:
            tar.extractall(cache, filter="data")
    return unpacked


def test_committed_files_equal_a_build_with_the_r4_package() -> None:
    """Byte-for-byte against the npm package (the snapshots carry its texts)."""
    assert bp.main(["--check", "--package", str(_r4_package())]) == 0
