"""gateway.fhir.terminology: $lookup, $expand, $validate-code, $translate, offline."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.fhir.outcome import FhirError
from gateway.fhir.terminology import UNCLOSED, Terminology
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
