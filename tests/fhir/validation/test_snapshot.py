"""Snapshot generation (gateway.fhir.validation.snapshot) is linear in the snapshot's
size, and makes what the flat-list generator it replaced made.

The reference (:class:`_ListSnapshot`) is that generator's placement of elements
(what it places, a type's children and a slice's copies, is the generator's own):
the snapshot as one list, re-indexed by id after every insertion, a slice placed
after a scan for the end of the sliced element's group. Its work grew with the
square of the number of slices; the outputs are compared at sizes it still makes
quickly, and the work of the generator is counted at sizes where the square shows.
"""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path
from typing import Any, ClassVar

import pytest

from gateway.fhir.validation import FhirValidator
from gateway.fhir.validation import snapshot as snapshot_module
from gateway.fhir.validation.snapshot import (
    Definitions,
    ProfileError,
    Snapshot,
    complete_structure_definition,
)
from gateway.registry import profiles_dir

Json = dict[str, Any]
R4 = "http://hl7.org/fhir/StructureDefinition/"
DATA = Path(__file__).resolve().parents[2] / "data"


class _ListSnapshot(Snapshot):
    """The snapshot as a flat list: positions by id rebuilt at every insertion, the
    end of a group found by scanning (the generator before the tree)."""

    def __init__(self, elements: list[Json], profile_url: str, defs: Definitions,
                 base_sd: Json) -> None:
        self.flat = elements
        self.url = profile_url
        self.defs = defs
        self.base_sd = base_sd
        self._reindex()

    @property
    def elements(self) -> list[Json]:
        return self.flat

    def _reindex(self) -> None:
        self.pos = {e["id"]: i for i, e in enumerate(self.flat)}
        if len(self.pos) != len(self.flat):
            raise ProfileError(f"{self.url}: duplicate element ids in the snapshot")

    def _insert(self, at: int, new: list[Json]) -> None:
        self.flat[at:at] = new
        self._reindex()

    def _group_end(self, element_id: str) -> int:
        i = self.pos[element_id] + 1
        while i < len(self.flat):
            eid = self.flat[i]["id"]
            if not (eid.startswith(element_id + ".") or eid.startswith(element_id + ":")):
                break
            i += 1
        return i

    def ensure(self, element_id: str) -> Json:
        if element_id in self.pos:
            return self.flat[self.pos[element_id]]
        parent, _, last = element_id.rpartition(".")
        if not parent:
            raise ProfileError(f"{self.url}: {element_id} is not in the base snapshot")
        name, _, slice_name = last.partition(":")
        if slice_name:
            if "/" in slice_name:
                raise ProfileError(f"{self.url}: re-slicing ({element_id}) is not supported")
            sliced = f"{parent}.{name}"
            self.ensure(sliced)
            self._add_slice(sliced, slice_name)
        else:
            self.ensure(parent)
            if element_id in self.pos:
                return self.flat[self.pos[element_id]]
            start = self.pos[parent]
            has_children = start + 1 < len(self.flat) and \
                self.flat[start + 1]["id"].startswith(parent + ".")
            if has_children:
                raise ProfileError(f"{self.url}: {element_id} is not an element of {parent}")
            self._unfold(parent)
            if element_id not in self.pos:
                raise ProfileError(f"{self.url}: {element_id} is not an element of {parent}")
        return self.flat[self.pos[element_id]]

    def _unfold(self, parent_id: str) -> None:
        children = self._type_children(self.flat[self.pos[parent_id]], parent_id)
        self._insert(self.pos[parent_id] + 1, children)

    def _add_slice(self, sliced_id: str, slice_name: str) -> None:
        start = self.pos[sliced_id]
        own = [self.flat[start]]
        for el in self.flat[start + 1:]:
            if not el["id"].startswith(sliced_id + "."):
                break
            own.append(el)
        new = self._slice_copies(sliced_id, slice_name, own)
        self._insert(self._group_end(sliced_id), new)


def _made(validator: FhirValidator, sd: Json, stored: dict[str, Json]) -> Json | str:
    try:
        return validator.snapshot(copy.deepcopy(sd), copy.deepcopy(stored))
    except ProfileError as exc:
        return f"ProfileError: {exc}"


def _both(validator: FhirValidator, sd: Json, stored: dict[str, Json] | None = None,
          ) -> tuple[Json | str, Json | str]:
    """What the generator makes of ``sd``, and what the flat-list generator made."""
    stored = stored or {}
    got = _made(validator, sd, stored)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(snapshot_module, "Snapshot", _ListSnapshot)
        want = _made(validator, sd, stored)
    return got, want


def _profile(type_: str, diff: list[Json], url: str = "urn:test:sd:made",
             base: str | None = None) -> Json:
    return {"resourceType": "StructureDefinition", "url": url, "name": "Made",
            "status": "draft", "kind": "resource", "abstract": False, "type": type_,
            "baseDefinition": base or R4 + type_, "derivation": "constraint",
            "differential": {"element": diff}}


def _identifier_slices(count: int, *, extra: bool = False) -> list[Json]:
    diff: list[Json] = [{"id": "Patient.identifier", "slicing": {
        "discriminator": [{"type": "value", "path": "system"}], "rules": "open"}}]
    for i in range(count):
        diff += [{"id": f"Patient.identifier:s{i}", "min": i % 2},
                 {"id": f"Patient.identifier:s{i}.system", "fixedUri": f"urn:test:s{i}"}]
        if extra and i % 7 == 0:
            diff.append({"id": f"Patient.identifier:s{i}.period.start", "min": 1})
    return diff


def test_many_slices_make_what_the_flat_list_made(validator: FhirValidator) -> None:
    got, want = _both(validator, _profile("Patient", _identifier_slices(300, extra=True)))
    assert isinstance(got, dict)
    assert len(got["snapshot"]["element"]) > 300 * 9
    assert got == want


# differentials that reach every way of placing an element
_SLICED_EXTENSIONS: list[Json] = [
    {"id": "Patient.extension:nick", "type": [{"code": "Extension", "profile": [
        "https://carepath-gateway.org/fhir/test/StructureDefinition/test-nickname"]}]},
    {"id": "Patient.extension:other", "max": "1"},
    {"id": "Patient.extension:other.url", "fixedUri": "urn:test:other"},
    {"id": "Patient.extension:other.value[x]", "type": [{"code": "string"}]},
    {"id": "Patient.modifierExtension:mod", "max": "1"},
    {"id": "Patient.identifier", "slicing": {
        "discriminator": [{"type": "value", "path": "system"}], "rules": "closed"}},
    {"id": "Patient.identifier.use", "min": 1},
    {"id": "Patient.identifier:a", "min": 1},
    {"id": "Patient.identifier:a.type.coding", "slicing": {
        "discriminator": [{"type": "value", "path": "code"}], "rules": "open"}},
    {"id": "Patient.identifier:a.type.coding:loinc", "min": 1},
    {"id": "Patient.identifier:a.type.coding:loinc.system", "fixedUri": "http://loinc.org"},
    {"id": "Patient.identifier:a.period.end", "min": 1},
    {"id": "Patient.identifier:a.assigner.identifier.value", "min": 1},
    {"id": "Patient.identifier:b"},
    {"id": "Patient.identifier:b.extension:x", "max": "1"},
    {"id": "Patient.contact", "slicing": {"discriminator": [
        {"type": "value", "path": "relationship"}], "rules": "open"}},
    {"id": "Patient.contact.name.family", "min": 1},
    {"id": "Patient.contact:c", "max": "1"},
]
_CASES: dict[str, tuple[Json, dict[str, Json]]] = {
    "slices, children of slices, slices in slices": (
        _profile("Patient", _SLICED_EXTENSIONS), {}),
    "a contentReference unfolded": (_profile("Questionnaire", [
        {"id": "Questionnaire.item.item.linkId", "fixedString": "x"},
        {"id": "Questionnaire.item.item.item.text", "min": 1},
        {"id": "Questionnaire.item", "slicing": {
            "discriminator": [{"type": "value", "path": "linkId"}], "rules": "open"}},
        {"id": "Questionnaire.item:q", "min": 1},
        {"id": "Questionnaire.item:q.item.linkId", "min": 1}]), {}),
    "slicing without a discriminator's slicing": (_profile("Patient", [
        {"id": "Patient.identifier:a", "min": 1}]), {}),
    "re-slicing": (_profile("Patient", [
        {"id": "Patient.identifier", "slicing": {"rules": "open"}},
        {"id": "Patient.identifier:a", "min": 1},
        {"id": "Patient.identifier:a/b", "min": 1}]), {}),
    "not an element": (_profile("Patient", [
        {"id": "Patient.identifier:a.nothing", "min": 1},
        {"id": "Patient.identifier", "slicing": {"rules": "open"}}]), {}),
}


def _on_a_profile() -> tuple[Json, dict[str, Json]]:
    """A profile on a profile with slices: more slices, children of the base's slices,
    and children of an element whose only members are its slices."""
    base = _profile("Patient", _SLICED_EXTENSIONS, url="urn:test:sd:base")
    diff: list[Json] = [
        {"id": "Patient.extension.id", "max": "0"},
        {"id": "Patient.extension:more", "max": "1"},
        {"id": "Patient.extension:nick.value[x]", "short": "nick"},
        {"id": "Patient.identifier:a.type.coding:snomed", "max": "1"},
        {"id": "Patient.identifier:c", "max": "1"},
        {"id": "Patient.identifier:c.value", "min": 1},
        {"id": "Patient.contact:c.name.given", "max": "0"},
    ]
    return _profile("Patient", diff, base="urn:test:sd:base"), {base["url"]: base}


def _odd_extension() -> tuple[Json, dict[str, Json]]:
    """An extension stored with a snapshot whose ids do not start with its root's:
    placed after the parent as they come (the flat list did no more)."""
    odd: Json = {"resourceType": "StructureDefinition", "url": "urn:test:sd:odd",
           "kind": "complex-type", "abstract": False, "type": "Extension",
           "baseDefinition": R4 + "Extension", "derivation": "constraint",
           "snapshot": {"element": [
               {"id": "Extension", "path": "Extension", "min": 0, "max": "*"},
               {"id": "Extension.url", "path": "Extension.url", "min": 1, "max": "1"},
               {"id": "Extensionvalue", "path": "Extension.value[x]", "min": 0, "max": "1"},
               {"id": "Extension.value[x]", "path": "Extension.value[x]", "min": 0,
                "max": "1", "type": [{"code": "string"}]}]}}
    diff: list[Json] = [
        {"id": "Patient.extension:odd", "type": [
            {"code": "Extension", "profile": ["urn:test:sd:odd"]}]},
        {"id": "Patient.extension:odd.url", "fixedUri": "urn:test:sd:odd"},
        {"id": "Patient.extension:other", "max": "1"},
        {"id": "Patient.extension:other.url", "fixedUri": "urn:test:other"},
        {"id": "Patient.extension:odd.value[x]", "max": "0"}]
    return _profile("Patient", diff), {odd["url"]: odd}


_CASES["on a profile with slices"] = _on_a_profile()
_CASES["an extension with odd ids"] = _odd_extension()


@pytest.mark.parametrize("case", sorted(_CASES))
def test_each_placement_makes_what_the_flat_list_made(validator: FhirValidator,
                                                      case: str) -> None:
    sd, stored = _CASES[case]
    got, want = _both(validator, sd, stored)
    assert got == want
    if case.startswith(("slices", "a content", "on a", "an ext")):
        assert isinstance(got, dict), got


def _published() -> list[tuple[Json, dict[str, Json]]]:
    """The gateway's own profiles and the IPS ones, each from its differential over
    the others'."""
    own = [json.loads(p.read_text()) for p in sorted(profiles_dir().glob("StructureDefinition-*"))]
    with gzip.open(DATA / "ig-profiles.ndjson.gz", "rt", encoding="utf-8") as f:
        ips = [json.loads(json.loads(row)["text"]) for row in f]
    sds = [{k: v for k, v in sd.items() if k != "snapshot"} for sd in own + ips
           if sd.get("derivation") == "constraint" and sd.get("differential")]
    return [(sd, {o["url"]: o for o in sds if o is not sd}) for sd in sds]


def test_published_profiles_make_what_the_flat_list_made(validator: FhirValidator) -> None:
    made = 0
    for sd, stored in _published():
        got, want = _both(validator, sd, stored)
        assert got == want, sd["url"]
        made += isinstance(got, dict)
    assert made >= 12


class _Counted(dict[str, Any]):
    """A snapshot element that counts the reads of its id: the generator's work
    (placing an element, finding one, ordering the output read ids)."""

    reads: ClassVar[int] = 0

    def __getitem__(self, key: str) -> Any:
        if key == "id":
            _Counted.reads += 1
        return super().__getitem__(key)


class _CountedTypes:
    """R4's definitions, their elements :class:`_Counted` (and so their copies)."""

    def __init__(self, validator: FhirValidator) -> None:
        self.types = validator.model.by_type
        self.done: dict[str, Json] = {}

    def get(self, url: str) -> Json:
        code = url.removeprefix(R4)
        if code not in self.done:
            sd = copy.deepcopy(self.types[code])
            sd["snapshot"]["element"] = [_Counted(e) for e in sd["snapshot"]["element"]]
            self.done[code] = sd
        return self.done[code]

    def type_definition(self, code: str) -> Json:
        return self.get(code)


def _reads_per_element(validator: FhirValidator, slices: int) -> float:
    defs = _CountedTypes(validator)
    defs.get(R4 + "Patient")
    defs.get(R4 + "Identifier")
    _Counted.reads = 0
    made = complete_structure_definition(_profile("Patient", _identifier_slices(slices)), defs)
    return _Counted.reads / len(made["snapshot"]["element"])


def test_the_work_per_element_does_not_grow_with_the_slices(validator: FhirValidator) -> None:
    """Each element's id is read a few times (5), however many slices: the flat list
    re-read every id at each of the 2 insertions a slice takes, and the slices so far
    to find where the next one goes (155 reads an element at 100 slices, 605 at 400)."""
    few, many = _reads_per_element(validator, 100), _reads_per_element(validator, 400)
    assert many <= 10
    assert many <= few * 1.1
