"""gateway.fhir.terminology: $lookup, $expand, $validate-code, $translate, offline."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.fhir.outcome import FhirError
from gateway.fhir.terminology import MAX_EXPANSION, UNCLOSED, Terminology
from gateway.registry import Registry

B = "https://carepath-gateway.org/fhir"
CARE_LEVEL = f"{B}/CodeSystem/care-level"
LINE = f"{B}/CodeSystem/dutch-care-line"
PHASE = f"{B}/CodeSystem/pathway-phase"
ICD10GM = "http://fhir.de/CodeSystem/bfarm/icd-10-gm"
ICD11 = "http://id.who.int/icd/release/11/mms"
NOW = "2026-11-23T10:00:00Z"

TOY_CS: dict[str, Any] = {
    "resourceType": "CodeSystem", "id": "toy", "url": "urn:test:cs:toy", "version": "1",
    "name": "Toy", "status": "active", "content": "complete", "caseSensitive": False,
    "property": [{"code": "inactive", "type": "boolean"},
                 {"code": "notSelectable", "type": "boolean"},
                 {"code": "colour", "type": "code"}],
    "concept": [
        {"code": "fruit", "display": "Fruit",
         "property": [{"code": "notSelectable", "valueBoolean": True}],
         "concept": [
             {"code": "apple", "display": "Apple",
              "property": [{"code": "colour", "valueCode": "red"}],
              "designation": [{"language": "de", "value": "Apfel"}]},
             {"code": "pear", "display": "Pear",
              "property": [{"code": "colour", "valueCode": "green"}]},
             {"code": "quince", "display": "Quince",
              "property": [{"code": "inactive", "valueBoolean": True}]},
         ]},
        {"code": "nut", "display": "Nut", "property": [{"code": "parent", "valueCode": "fruit"}]},
    ],
}


def vs(compose: dict[str, Any], url: str = "urn:test:vs") -> dict[str, Any]:
    return {"resourceType": "ValueSet", "id": "t", "url": url, "status": "active",
            "compose": compose}


def params(p: dict[str, Any]) -> dict[str, Any]:
    """A Parameters resource as {name: value or [parts]} (repeated names -> list)."""
    out: dict[str, Any] = {}
    for part in p["parameter"]:
        value = part.get("part") or next(v for k, v in part.items() if k.startswith("value"))
        if part["name"] in out:
            if not isinstance(out[part["name"]], list) or "part" not in part:
                out[part["name"]] = [out[part["name"]]]
            out[part["name"]].append(value)
        else:
            out[part["name"]] = [value] if "part" in part else value
    return out


def codes(expansion: dict[str, Any]) -> list[str]:
    return [c["code"] for c in expansion["expansion"].get("contains", [])]


@pytest.fixture(scope="module")
def term() -> Terminology:
    return Registry.load().terminology.with_resources([TOY_CS])


# ------------------------------------------------------------------------------- $lookup


def test_lookup_gives_name_version_display_designations_and_properties(term: Terminology) -> None:
    p = params(term.lookup(PHASE, "nhn-inpatient"))
    assert p["name"] == "PathwayPhase" and p["version"] == "0.1.0"
    assert p["display"] == "Inpatient phase"
    assert {"name": "language", "valueCode": "de"} in p["designation"][0]
    props = {part[0]["valueCode"]: part[1] for part in p["property"]}
    assert props["parent"] == {"name": "value", "valueCode": "nhn-cardiac"}
    assert props["definition"]["valueString"].startswith("Hospital stay")


def test_lookup_of_a_group_lists_its_children_and_only_the_asked_properties(
        term: Terminology) -> None:
    p = params(term.lookup(PHASE, "nhn-cardiac", properties=["child"]))
    children = [part[1]["valueCode"] for part in p["property"]]
    assert children == ["nhn-pre-inpatient", "nhn-inpatient", "nhn-post-inpatient"]
    assert "designation" not in p


def test_lookup_reads_the_standard_fragments(term: Terminology) -> None:
    assert params(term.lookup("http://loinc.org", "18842-5"))["display"] == "Discharge summary"
    assert params(term.lookup(ICD10GM, "I20.0"))["display"] == "Instabile Angina pectoris"
    with pytest.raises(FhirError) as exc:
        term.lookup("http://loinc.org", "1-8")
    assert exc.value.code.gw == "GW-4304" and "fragment" in (exc.value.diagnostics or "")


def test_lookup_failures_are_404s(term: Terminology) -> None:
    with pytest.raises(FhirError) as exc:
        term.lookup("urn:unknown", "x")
    assert (exc.value.code.gw, exc.value.status) == ("GW-4301", 404)
    with pytest.raises(FhirError) as exc:
        term.lookup(CARE_LEVEL, "level-9")
    assert (exc.value.code.gw, exc.value.status) == ("GW-4304", 404)
    with pytest.raises(FhirError) as exc:
        term.lookup(CARE_LEVEL, "level-1", version="9.9")
    assert exc.value.code.gw == "GW-4301"


def test_lookup_honours_case_insensitive_code_systems(term: Terminology) -> None:
    assert params(term.lookup("urn:test:cs:toy", "APPLE"))["display"] == "Apple"


# ------------------------------------------------------------------------------- $expand


def test_expand_whole_code_system_counts_every_concept(term: Terminology) -> None:
    out = term.expand(term.value_set(f"{B}/ValueSet/handoff-obligation") or {}, timestamp=NOW)
    assert codes(out) == [f"H{i}" for i in range(1, 14)]
    assert out["expansion"]["total"] == 13 and out["expansion"]["timestamp"] == NOW
    assert "compose" not in out and out["url"] == f"{B}/ValueSet/handoff-obligation"
    assert {"name": "version", "valueUri": f"{B}/CodeSystem/handoff-obligation|0.1.0"} in \
        out["expansion"]["parameter"]


def test_expand_by_hierarchy_leaves_out_the_abstract_groups(term: Terminology) -> None:
    out = term.expand(term.value_set(f"{B}/ValueSet/escalation-criterion") or {}, timestamp=NOW)
    assert "escalate" not in codes(out) and "de-escalate" not in codes(out)
    assert len(codes(out)) == 7
    whole = term.expand(vs({"include": [{"system": "urn:test:cs:toy"}]}), timestamp=NOW)
    fruit = whole["expansion"]["contains"][0]
    assert fruit["code"] == "fruit" and fruit["abstract"] is True


def test_expand_filters_by_text_and_pages(term: Terminology) -> None:
    value_set = term.value_set(f"{B}/ValueSet/pathway-care-level") or {}
    assert codes(term.expand(value_set, text_filter="LINE sec", timestamp=NOW)) == ["second-line"]
    assert codes(term.expand(value_set, text_filter="Versorgungsebene 4", timestamp=NOW)) == [
        "level-4"]  # designations count
    page = term.expand(value_set, offset=2, count=3, timestamp=NOW)["expansion"]
    assert [c["code"] for c in page["contains"]] == ["level-3", "level-4", "first-line"]
    assert page["total"] == 7 and page["offset"] == 2
    empty = term.expand(value_set, count=0, timestamp=NOW)["expansion"]
    assert empty["total"] == 7 and "contains" not in empty


def test_expand_filters_on_properties_and_excludes(term: Terminology) -> None:
    toy = "urn:test:cs:toy"
    red = vs({"include": [{"system": toy, "filter": [
        {"property": "colour", "op": "=", "value": "red"}]}]})
    assert codes(term.expand(red, timestamp=NOW)) == ["apple"]
    fruit = vs({"include": [{"system": toy, "filter": [
        {"property": "concept", "op": "is-a", "value": "fruit"}]}],
        "exclude": [{"system": toy, "concept": [{"code": "pear"}]}]})
    assert codes(term.expand(fruit, timestamp=NOW)) == ["fruit", "apple", "quince", "nut"]
    active = term.expand(fruit, active_only=True, timestamp=NOW)
    assert "quince" not in codes(active)
    generalizes = vs({"include": [{"system": toy, "filter": [
        {"property": "concept", "op": "generalizes", "value": "nut"}]}]})
    assert codes(term.expand(generalizes, timestamp=NOW)) == ["fruit", "nut"]


def test_expand_of_codes_from_a_system_held_only_in_part_is_unclosed(term: Terminology) -> None:
    out = term.expand(term.value_set(f"{B}/ValueSet/chd-diagnosis") or {}, timestamp=NOW)
    assert codes(out)[:6] == ["I20", "I21", "I22", "I23", "I24", "I25"]
    assert "I20.0" in codes(out)  # from the fragment, by the regex filter
    assert {"url": UNCLOSED, "valueBoolean": True} in out["expansion"]["extension"]
    assert "total" not in out["expansion"]


def test_expand_of_a_whole_system_held_as_fragment_is_unclosed(term: Terminology) -> None:
    out = term.expand(vs({"include": [{"system": "http://loinc.org"}]}), timestamp=NOW)
    assert "18842-5" in codes(out) and "total" not in out["expansion"]
    assert out["expansion"]["extension"] == [{"url": UNCLOSED, "valueBoolean": True}]


def test_expand_imports_value_sets(term: Terminology) -> None:
    out = term.expand(term.value_set(f"{B}/ValueSet/pathway-condition") or {}, timestamp=NOW)
    assert "I21" in codes(out) and "MG30" in codes(out)


def test_expand_designations_only_when_asked(term: Terminology) -> None:
    value_set = term.value_set(f"{B}/ValueSet/dutch-care-line") or {}
    plain = term.expand(value_set, timestamp=NOW)["expansion"]["contains"][0]
    rich = term.expand(value_set, include_designations=True,
                       timestamp=NOW)["expansion"]["contains"][0]
    assert "designation" not in plain and rich["designation"][0]["value"] == "eerste lijn"


def test_expansion_identifier_is_stable_for_the_same_request(term: Terminology) -> None:
    value_set = term.value_set(f"{B}/ValueSet/care-level") or {}
    a = term.expand(value_set, text_filter="x", timestamp="t1")["expansion"]["identifier"]
    b = term.expand(value_set, text_filter="x", timestamp="t2")["expansion"]["identifier"]
    c = term.expand(value_set, text_filter="y", timestamp="t1")["expansion"]["identifier"]
    assert a == b != c and a.startswith("urn:uuid:")


@pytest.mark.parametrize(("compose", "gw"), [
    ({"include": [{"system": "urn:nowhere"}]}, "GW-4306"),
    ({"include": [{"valueSet": ["urn:nowhere"]}]}, "GW-4306"),
    ({"include": [{"system": "urn:test:cs:toy",
                   "filter": [{"property": "code", "op": "regex", "value": "(["}]}]}, "GW-4305"),
    ({"include": [{"system": "urn:test:cs:toy",
                   "filter": [{"property": "colour", "op": "??", "value": "x"}]}]}, "GW-4305"),
])
def test_expand_refuses_what_it_cannot_do_offline(term: Terminology, compose: dict[str, Any],
                                                  gw: str) -> None:
    with pytest.raises(FhirError) as exc:
        term.expand(vs(compose), timestamp=NOW)
    assert exc.value.code.gw == gw


def test_expand_detects_a_value_set_importing_itself() -> None:
    loop = vs({"include": [{"valueSet": ["urn:test:loop"]}]}, url="urn:test:loop")
    with pytest.raises(FhirError) as exc:
        Terminology([loop]).expand(loop, timestamp=NOW)
    assert exc.value.code.gw == "GW-4306"


def test_expand_of_a_value_set_with_only_an_expansion() -> None:
    precomputed = {"resourceType": "ValueSet", "url": "urn:test:pre", "status": "active",
                   "expansion": {"timestamp": "x", "contains": [
                       {"system": "urn:s", "code": "a"}, {"system": "urn:s", "code": "b"}]}}
    out = Terminology([precomputed]).expand(precomputed, text_filter="b", timestamp=NOW)
    assert codes(out) == ["b"]


# ------------------------------------------------------------------------------- $validate-code


def test_validate_code_in_value_set(term: Terminology) -> None:
    value_set = term.value_set(f"{B}/ValueSet/follow-up-care-level") or {}
    ok = params(term.validate_code(value_set, [{"system": CARE_LEVEL, "code": "level-2"}]))
    assert ok == {"result": True, "display": "Level 2: specialist (cardiologist)"}
    no = params(term.validate_code(value_set, [{"system": CARE_LEVEL, "code": "level-3"}]))
    assert no["result"] is False and "level-3" in no["message"]


def test_validate_code_checks_the_display_against_display_and_designations(
        term: Terminology) -> None:
    value_set = term.value_set(f"{B}/ValueSet/second-opinion-exception") or {}
    system = f"{B}/CodeSystem/second-opinion-exception"
    assert params(term.validate_code(value_set, [
        {"system": system, "code": "emergency", "display": "notfall"}]))["result"] is True
    wrong = params(term.validate_code(value_set, [
        {"system": system, "code": "emergency", "display": "Urgent"}]))
    assert wrong["result"] is False and wrong["display"] == "Emergency"


def test_abstract_codes_are_valid_only_when_allowed(term: Terminology) -> None:
    value_set = vs({"include": [{"system": PHASE}]})
    group = [{"system": PHASE, "code": "lcp-chronic-pain"}]
    assert params(term.validate_code(value_set, group))["result"] is False
    assert params(term.validate_code(value_set, group, abstract_ok=True))["result"] is True


def test_validate_code_decides_codes_of_systems_not_held_by_regex(term: Terminology) -> None:
    value_set = term.value_set(f"{B}/ValueSet/pathway-condition") or {}
    for system, code, ok in ((ICD10GM, "I25.11", True), (ICD10GM, "I26.0", False),
                             (ICD11, "MG30.01", True), (ICD11, "MG31", False)):
        got = params(term.validate_code(value_set, [{"system": system, "code": code}]))
        assert got["result"] is ok, (code, got)


def test_validate_code_with_a_codeable_concept_needs_one_good_coding(term: Terminology) -> None:
    value_set = term.value_set(f"{B}/ValueSet/nyha-class") or {}
    concept = [{"system": "urn:local", "code": "3"},
               {"system": "http://snomed.info/sct", "code": "420913000"}]
    assert params(term.validate_code(value_set, concept))["result"] is True
    assert params(term.validate_code(value_set, concept[:1]))["result"] is False


def test_validate_code_needs_a_system_and_a_code(term: Terminology) -> None:
    value_set = term.value_set(f"{B}/ValueSet/care-level") or {}
    for codings in ([], [{"code": "level-1"}], [{"system": CARE_LEVEL}]):
        with pytest.raises(FhirError) as exc:
            term.validate_code(value_set, codings)
        assert (exc.value.code.gw, exc.value.status) == ("GW-4305", 400)


def test_validate_code_in_a_code_system(term: Terminology) -> None:
    cs = term.code_system(CARE_LEVEL) or {}
    assert params(term.validate_code_in_system(cs, [{"code": "level-4"}]))["result"] is True
    assert params(term.validate_code_in_system(cs, [{"code": "level-0"}]))["result"] is False
    other = params(term.validate_code_in_system(cs, [{"system": LINE, "code": "first-line"}]))
    assert other["result"] is False


# ------------------------------------------------------------------------------- $translate


def test_translate_dutch_line_to_care_levels(term: Terminology) -> None:
    out = params(term.translate(term.maps_for(source=f"{B}/ValueSet/dutch-care-line"),
                                [{"system": LINE, "code": "second-line"}]))
    assert out["result"] is True
    matches = [(m[0]["valueCode"], m[1]["valueCoding"]["code"]) for m in out["match"]]
    assert matches == [("narrower", "level-2"), ("narrower", "level-3"), ("narrower", "level-4")]
    assert out["match"][0][2] == {"name": "source",
                                  "valueUri": f"{B}/ConceptMap/dutch-line-to-care-level"}


def test_translate_reverse_reads_the_map_backwards(term: Terminology) -> None:
    cm = term.concept_map(f"{B}/ConceptMap/dutch-line-to-care-level") or {}
    out = params(term.translate([cm], [{"system": CARE_LEVEL, "code": "level-3"}], reverse=True))
    matches = {(m[0]["valueCode"], m[1]["valueCoding"]["code"]) for m in out["match"]}
    assert matches == {("wider", "second-line"), ("narrower", "third-line")}


def test_translate_without_a_mapping_says_so(term: Terminology) -> None:
    out = params(term.translate(term.maps_for(), [{"system": CARE_LEVEL, "code": "level-1"}],
                                target_system="urn:elsewhere"))
    assert out["result"] is False and "no translation" in out["message"]


def test_translate_unmapped_modes_and_failed_matches() -> None:
    cm = {"resourceType": "ConceptMap", "url": "urn:test:cm", "status": "active", "group": [
        {"source": "urn:a", "target": "urn:b",
         "element": [{"code": "x", "target": [{"equivalence": "unmatched"}]}],
         "unmapped": {"mode": "fixed", "code": "other", "display": "Other"}},
        {"source": "urn:a", "target": "urn:c", "unmapped": {"mode": "provided"}, "element": []}]}
    t = Terminology([cm])
    x = params(t.translate([cm], [{"system": "urn:a", "code": "x"}], target_system="urn:b"))
    assert x["result"] is False and x["match"][0][0]["valueCode"] == "unmatched"
    y = params(t.translate([cm], [{"system": "urn:a", "code": "y"}]))
    assert y["result"] is True
    assert [m[1]["valueCoding"] for m in y["match"]] == [
        {"system": "urn:b", "code": "other", "display": "Other"},
        {"system": "urn:c", "code": "y"}]


# ------------------------------------------------------------------------------- composition


def test_with_resources_adds_content_but_own_content_wins(term: Terminology) -> None:
    impostor = {**(term.code_system(CARE_LEVEL) or {}), "concept": []}
    extra = {"resourceType": "CodeSystem", "url": "urn:test:extra", "content": "complete",
             "concept": [{"code": "a", "display": "A"}]}
    t = term.with_resources([impostor, extra])
    assert params(t.lookup(CARE_LEVEL, "level-1"))["display"].startswith("Level 1")
    assert params(t.lookup("urn:test:extra", "a"))["display"] == "A"
    with pytest.raises(FhirError):
        term.lookup("urn:test:extra", "a")  # the original is unchanged


def test_missing_lists_what_a_value_set_needs_and_is_not_held(term: Terminology) -> None:
    value_set = vs({"include": [{"system": "urn:x"}, {"valueSet": ["urn:y"]},
                                {"system": CARE_LEVEL}]})
    assert term.missing(value_set) == {("CodeSystem", "urn:x"), ("ValueSet", "urn:y")}


HOSTILE = ["", " ", "I2", "I25.", "I25.11", "i25.11", "MG30.Z", "(", "[a-", ".*", "\\", "|",
           "%", "'", '"', "\u0000", "\u00dc\u00dcH3", "\U0001f600", "a" * 300, "I2" * 200,
           "level-1 level-2", "\n\t"]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_text_never_breaks_expand_or_validate(term: Terminology, text: str) -> None:
    value_set = term.value_set(f"{B}/ValueSet/pathway-condition") or {}
    out = term.expand(value_set, text_filter=text, timestamp=NOW)
    assert set(codes(out)) <= set(codes(term.expand(value_set, timestamp=NOW)))
    if text:
        result = params(term.validate_code(value_set, [{"system": ICD10GM, "code": text}]))
        assert isinstance(result["result"], bool)


# ------------------------------------------------------------------------------- work per code
#
# An exclude or a filter is asked about every code of an expansion: what it needs (the
# set of its concepts, the split values of ``in``, the codes below a target) is gathered
# once. Counted here by the reads of what a test is built from, not by time.

DCM = "http://dicom.nema.org/resources/ontology/DCM"


class CountingList(list[Any]):
    """A list that counts the passes over it."""

    passes = 0

    def __iter__(self) -> Any:
        self.passes += 1
        return super().__iter__()


class CountingDict(dict[str, Any]):
    """A dict that counts its reads by ``get`` (a filter's fields, a hierarchy's links)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.reads: dict[str, int] = {}

    def get(self, key: str, default: Any = None) -> Any:
        self.reads[key] = self.reads.get(key, 0) + 1
        return super().get(key, default)


def dicom_codes(term: Terminology) -> list[str]:
    return [c["code"] for c in (term.code_system(DCM) or {})["concept"]]


def all_codes(out: dict[str, Any]) -> list[str]:
    assert out["expansion"]["total"] == len(codes(out))
    return codes(out)


def test_an_exclude_of_50000_codes_reads_its_concept_list_once(term: Terminology) -> None:
    dicom = dicom_codes(term)
    assert len(dicom) > 3000
    dropped = dicom[::7]
    listed = CountingList([{"code": c} for c in dropped]
                          + [{"code": f"x{i}"} for i in range(50_000 - len(dropped))])
    out = term.expand(vs({"include": [{"system": DCM}],
                          "exclude": [{"system": DCM, "concept": listed}]}), timestamp=NOW)
    assert all_codes(out) == [c for i, c in enumerate(dicom) if i % 7]
    assert listed.passes == 1  # was once for every code of the expansion


def test_an_in_filter_splits_its_values_once(term: Terminology) -> None:
    dicom = dicom_codes(term)
    wanted = dicom[::3]
    value = ",".join([*wanted, *(f"x{i}" for i in range(20_000))])
    for op, expected in (("in", wanted), ("not-in", [c for i, c in enumerate(dicom) if i % 3])):
        f = CountingDict({"property": "code", "op": op, "value": value})
        out = term.expand(vs({"include": [{"system": DCM, "filter": [f]}]}), timestamp=NOW)
        assert all_codes(out) == expected
        assert f.reads["value"] == 1  # was once for every code of the system


def chain(url: str, n: int, **links: list[str]) -> dict[str, Any]:
    """A CodeSystem of codes c0..c{n-1}, each the child of the one before (by the
    ``parent`` property); ``links``: more parents of a code."""
    return {"resourceType": "CodeSystem", "url": url, "status": "active", "content": "complete",
            "concept": [{"code": f"c{i}", "property": [
                {"code": "parent", "valueCode": p}
                for p in ([f"c{i - 1}"] if i else []) + links.get(f"c{i}", [])]}
                for i in range(n)]}


def count_walks(t: Terminology, url: str) -> CountingDict:
    """Count the steps of walks through ``url``'s hierarchy (up and down)."""
    cs = t._cs(url)
    assert cs is not None
    steps = CountingDict()
    for name in ("parents", "children"):
        links = CountingDict(getattr(cs, name))
        links.reads = steps.reads
        setattr(cs, name, links)
    return steps


@pytest.mark.parametrize(("op", "value", "expected"), [
    ("is-a", "c0", range(0, 3000)),
    ("is-a", "c1", range(1, 3000)),
    ("descendent-of", "c1", range(2, 3000)),
    ("is-not-a", "c2", range(0, 2)),
    ("generalizes", "c2999", range(0, 3000)),
])
def test_hierarchy_filters_walk_a_deep_chain_once(op: str, value: str,
                                                  expected: range) -> None:
    url = "urn:test:cs:chain"
    t = Terminology([chain(url, 3000)])
    steps = count_walks(t, url)
    out = t.expand(vs({"include": [{"system": url, "filter": [
        {"property": "concept", "op": op, "value": value}]}]}), timestamp=NOW)
    assert all_codes(out) == [f"c{i}" for i in expected]
    assert sum(steps.reads.values()) <= 3 * 3000  # was a walk to the root per code: ~4.5 M
    # an exclude by the same filter is asked about every code too
    steps.reads.clear()
    out = t.expand(vs({"include": [{"system": url}], "exclude": [{"system": url, "filter": [
        {"property": "concept", "op": op, "value": value}]}]}), timestamp=NOW)
    assert all_codes(out) == [f"c{i}" for i in range(3000) if i not in expected]
    assert sum(steps.reads.values()) <= 3 * 3000


def test_membership_in_a_deep_chain_is_one_walk_for_many_codes() -> None:
    url = "urn:test:cs:chain"
    t = Terminology([chain(url, 3000)])
    steps = count_walks(t, url)
    value_set = vs({"include": [{"system": url, "filter": [
        {"property": "concept", "op": "descendent-of", "value": "c0"}]}]})
    member = t.membership(value_set)
    assert [member(url, f"c{i}") for i in range(3000)] == [False] + [True] * 2999
    assert member(url, "nope") is False and member("urn:other", "c1") is False
    assert sum(steps.reads.values()) <= 3 * 3000
    assert t.member(value_set, url, "c2999") is True  # one code: one walk up


# diamonds (d below b and c, both below a), a cycle (x -> y -> z -> x), a link to a code
# the system does not hold (orphan's parent "ghost"); each code listed below its parents
GRAPH: dict[str, list[str]] = {
    "a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"], "e": ["d", "a"], "f": ["e"],
    "x": ["z", "a"], "y": ["x"], "z": ["y"], "w": ["z"], "orphan": ["ghost"], "lone": [],
}


def graph_system(url: str) -> dict[str, Any]:
    return {"resourceType": "CodeSystem", "url": url, "status": "active", "content": "complete",
            "concept": [{"code": code, "property": [{"code": "parent", "valueCode": p}
                                                    for p in parents]}
                        for code, parents in GRAPH.items()]}


def above(code: str) -> set[str]:
    """The ancestors of ``code`` in GRAPH, by a plain search (itself if in a cycle)."""
    seen: set[str] = set()
    todo = list(GRAPH.get(code, []))
    while todo:
        c = todo.pop()
        if c not in seen:
            seen.add(c)
            todo += GRAPH.get(c, [])
    return seen


@pytest.mark.parametrize("target", [*GRAPH, "ghost", "unknown"])
@pytest.mark.parametrize("op", ["is-a", "descendent-of", "is-not-a", "generalizes"])
def test_hierarchy_filters_over_diamonds_and_cycles(op: str, target: str) -> None:
    url = "urn:test:cs:graph"
    t = Terminology([graph_system(url)])
    expected = [code for code in GRAPH if {
        "is-a": code == target or target in above(code),
        "descendent-of": target in above(code),
        "is-not-a": not (code == target or target in above(code)),
        "generalizes": code == target or code in above(target),
    }[op]]
    value_set = vs({"include": [{"system": url, "filter": [
        {"property": "concept", "op": op, "value": target}]}]})
    assert all_codes(t.expand(value_set, timestamp=NOW)) == expected
    # the same answers one code at a time, and by an exclude
    assert [code for code in GRAPH if t.member(value_set, url, code)] == expected
    rest = vs({"include": [{"system": url}], "exclude": value_set["compose"]["include"]})
    assert all_codes(t.expand(rest, timestamp=NOW)) == [c for c in GRAPH if c not in expected]


def test_an_exclude_by_value_set_and_by_concepts(term: Terminology) -> None:
    """An exclude naming a value set takes out its codes; a concept whose code is not a
    string takes out nothing."""
    toy = "urn:test:cs:toy"
    t = term.with_resources([vs({"include": [{"system": toy, "concept": [{"code": "pear"}]}]},
                                url="urn:test:vs:pear")])
    out = t.expand(vs({"include": [{"system": toy}], "exclude": [
        {"valueSet": ["urn:test:vs:pear"]},
        {"system": toy, "concept": [{"code": "nut"}, {"code": 7}, {"code": ["x"]}]}]}),
        timestamp=NOW)
    assert codes(out) == ["fruit", "apple", "quince"]


def test_an_expansion_over_the_cap_stops_at_the_cap(term: Terminology) -> None:
    """An include is cut short once the expansion passes MAX_EXPANSION codes: the codes
    past the cap are never looked at (here: the first concept past it has no dict)."""
    url = "urn:test:cs:big"
    listed = CountingDict({"code": "b-last"})
    big = {"resourceType": "CodeSystem", "url": url, "status": "active", "content": "complete",
           "concept": [{"code": f"b{i}"} for i in range(MAX_EXPANSION + 5_000)]}
    t = term.with_resources([big])
    for include in ([{"system": url}],
                    [{"system": DCM}, {"system": url}],
                    [{"system": url, "concept": [{"code": f"b{i}"} for i in range(MAX_EXPANSION)]
                      + [{"code": "b10000"}, listed]}]):
        with pytest.raises(FhirError) as exc:
            t.expand(vs({"include": include}), timestamp=NOW)
        assert exc.value.code.gw == "GW-4307"
    assert listed.reads == {}  # was read: the whole include was listed before the check
    # at the cap exactly: every code, codes already taken not counted twice
    t.expand(vs({"include": [{"system": url, "concept": [{"code": f"b{i}"}
                                                         for i in range(MAX_EXPANSION)]},
                             {"system": url, "concept": [{"code": "b0"}]}]}), timestamp=NOW)
