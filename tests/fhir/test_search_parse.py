"""gateway.fhir.search.parse_search: FHIR R4 search request -> SearchQuery."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

import pytest

from gateway.fhir.indexer import (
    Indexer,
    SearchParam,
    date_bounds,
    local_timezone,
    set_local_timezone,
)
from gateway.fhir.outcome import Code, FhirError
from gateway.fhir.search import (
    AP_DATE_MIN_MICROS,
    Chain,
    CompositeValue,
    Criterion,
    DateValue,
    Has,
    Include,
    InValue,
    MissingValue,
    NearValue,
    NumberValue,
    OfTypeValue,
    QuantityValue,
    ReferenceValue,
    SearchQuery,
    SortKey,
    StringValue,
    TokenValue,
    UriValue,
    parse_search,
    split_escaped,
    unescape,
    value_sets,
    with_value_sets,
)

_INDEXER = Indexer.from_profiles()

#: the expected bounds below are UTC's where a value has no zone
pytestmark = pytest.mark.usefixtures("utc_local_time")


def params(resource_type: str) -> Mapping[str, SearchParam]:
    return _INDEXER.params_for(resource_type)


def parse(rt: str | None, query: str | list[tuple[str, str]], **kw: object) -> SearchQuery:
    if isinstance(query, str):
        pairs = [tuple(p.split("=", 1)) for p in query.split("&") if p]
    else:
        pairs = query
    return parse_search(rt, pairs, params, **kw)  # type: ignore[arg-type]


def one(rt: str | None, query: str | list[tuple[str, str]], **kw: object) -> Criterion:
    q = parse(rt, query, **kw)
    assert len(q.criteria) == 1, q
    return q.criteria[0]


def error(rt: str | None, query: str | list[tuple[str, str]], **kw: object) -> FhirError:
    with pytest.raises(FhirError) as exc:
        parse(rt, query, **kw)
    return exc.value


def micros(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()) * 1_000_000


# -- escaping, AND / OR ---------------------------------------------------------


def test_split_and_unescape() -> None:
    assert split_escaped(r"a,b\,c,d", ",") == ["a", r"b\,c", "d"]
    assert split_escaped(r"sys|co\|de", "|") == ["sys", r"co\|de"]
    assert unescape(r"a\,b\|c\$d\\e\x") == r"a,b|c$d\e\x"


def test_comma_is_or_and_repeat_is_and() -> None:
    q = parse("Patient", "gender=male,female&gender=other")
    assert [c.values for c in q.criteria] == [
        (TokenValue("male"), TokenValue("female")),
        (TokenValue("other"),),
    ]


def test_escaped_comma_and_bar_are_literal() -> None:
    c = one("Patient", [("name", r"Smith\, John")])
    assert c.values == (StringValue("Smith, John", "smith, john"),)
    c = one("Patient", [("identifier", r"urn:sys|a\|b\,c")])
    assert c.values == (TokenValue("a|b,c", "urn:sys", False),)


def test_duplicate_or_values_collapse() -> None:
    assert one("Patient", "gender=male,male").values == (TokenValue("male"),)


# -- token ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("1234-5", TokenValue("1234-5")),
        ("http://loinc.org|1234-5", TokenValue("1234-5", "http://loinc.org", False)),
        ("|1234-5", TokenValue("1234-5", None, False)),
        ("http://loinc.org|", TokenValue(None, "http://loinc.org", False)),
    ],
)
def test_token_forms(raw: str, value: TokenValue) -> None:
    c = one("Observation", [("code", raw)])
    assert (c.code, c.type, c.modifier, c.values) == ("code", "token", None, (value,))


def test_token_modifiers() -> None:
    assert one("Observation", "code:not=x").modifier == "not"
    c = one("Observation", "code:text=Blood Sugar")
    assert c.modifier == "text"
    assert c.values == (StringValue("Blood Sugar", "blood sugar"),)
    assert one("Observation", "code:missing=true").values == (MissingValue(True),)
    assert one("Observation", "code:missing=false").values == (MissingValue(False),)


@pytest.mark.parametrize("mod", ["below", "above"])
def test_unsupported_reference_modifiers(mod: str) -> None:
    assert error("Observation", f"subject:{mod}=x").code is Code.UNSUPPORTED_SEARCH


@pytest.mark.parametrize(
    "query",
    ["code:bogus=x", "code:exact=x", "code:missing=maybe", "code=a|b|c", "code=|",
     "birthdate:contains=2000"],
)
def test_invalid_token_queries(query: str) -> None:
    rt = "Patient" if query.startswith("birthdate") else "Observation"
    assert error(rt, query).code is Code.INVALID_SEARCH_VALUE


def test_boolean_and_contactpoint_tokens() -> None:
    assert one("Patient", "active=true").values == (TokenValue("true"),)
    assert one("Patient", "phone=555").values == (TokenValue("555"),)


# -- string ---------------------------------------------------------------------


def test_string_modifiers() -> None:
    c = one("Patient", "name=Müller")
    assert (c.type, c.modifier, c.values) == ("string", None, (StringValue("Müller", "muller"),))
    assert one("Patient", "name:exact=Müller").modifier == "exact"
    assert one("Patient", "name:contains=ull").modifier == "contains"
    assert one("Patient", "name:missing=true").values == (MissingValue(True),)
    assert error("Patient", "name:text=x").code is Code.INVALID_SEARCH_VALUE
    assert error("Patient", "name:below=x").code is Code.INVALID_SEARCH_VALUE


def test_string_keeps_like_metacharacters_verbatim() -> None:
    assert one("Patient", "family=50%_off").values == (StringValue("50%_off", "50%_off"),)


# -- date -----------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "eq", "ne", "gt", "lt", "ge", "le", "sa", "eb"])
def test_date_prefixes(prefix: str) -> None:
    c = one("Patient", f"birthdate={prefix}2013-01")
    lo, hi = micros("2013-01-01T00:00:00"), micros("2013-02-01T00:00:00") - 1
    assert c.values == (DateValue(prefix or "eq", lo, hi, "2013-01"),)


def test_date_without_a_zone_is_the_local_time_zones() -> None:
    """search.html#date: ``date=2017-11-24`` is the server's local day (Berlin: from
    23:00Z the day before), as is a time without an offset."""
    before = local_timezone()
    try:
        set_local_timezone("Europe/Berlin")
        (v,) = one("Observation", "date=2017-11-24").values
        assert isinstance(v, DateValue)
        assert (v.lo, v.hi) == (micros("2017-11-23T23:00:00"), micros("2017-11-24T23:00:00") - 1)
        (v,) = one("Observation", "date=ge2020-07-01T10:00").values
        assert isinstance(v, DateValue)
        assert v.lo == micros("2020-07-01T08:00:00")
        (v,) = one("Observation", "date=2017-11-24T00:30:00Z").values
        assert isinstance(v, DateValue) and v.lo == micros("2017-11-24T00:30:00")
    finally:
        set_local_timezone(before.key)


def test_date_precision_defines_the_range() -> None:
    (v,) = one("Observation", "date=2013-01-14T10:00:00Z").values
    assert isinstance(v, DateValue)
    assert (v.lo, v.hi) == date_bounds("2013-01-14T10:00:00Z")
    assert v.hi - v.lo == 999_999


def test_date_unencoded_plus_in_timezone_is_repaired() -> None:
    (v,) = one("Observation", [("date", "ge2013-01-14T10:00:00 01:00")]).values
    assert isinstance(v, DateValue)
    assert v.text == "2013-01-14T10:00:00+01:00"
    assert (v.lo, v.hi) == date_bounds("2013-01-14T10:00:00+01:00")


def test_date_ap_widens_by_a_tenth_of_the_gap_to_now() -> None:
    now = micros("2023-01-01T00:00:00")
    (v,) = one("Patient", "birthdate=ap2013-01-01", now=now).values
    lo, hi = date_bounds("2013-01-01")  # type: ignore[misc]
    delta = (now - (lo + hi) // 2) // 10
    assert v == DateValue("ap", lo - delta, hi + delta, "2013-01-01")
    # near now the widening is at least a day
    (v,) = one("Patient", "birthdate=ap2022-12-31", now=now).values
    lo, hi = date_bounds("2022-12-31")  # type: ignore[misc]
    assert v == DateValue("ap", lo - AP_DATE_MIN_MICROS, hi + AP_DATE_MIN_MICROS, "2022-12-31")


@pytest.mark.parametrize("raw", ["2013-13-01", "xx2013", "gt", "13-01-2013", "2013-01-01T25:00",
                                 "today"])
def test_invalid_dates(raw: str) -> None:
    assert error("Patient", [("birthdate", raw)]).code is Code.INVALID_SEARCH_VALUE


def test_last_updated_is_a_date() -> None:
    c = one("Patient", "_lastUpdated=gt2020-01-01")
    assert c.code == "_lastUpdated" and c.type == "date"
    assert isinstance(c.values[0], DateValue) and c.values[0].prefix == "gt"


# -- number and quantity ----------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "prefix", "value", "lo", "hi"),
    [
        ("100", "eq", 100.0, 99.5, 100.5),
        ("100.00", "eq", 100.0, 99.995, 100.005),
        ("1e2", "eq", 100.0, 50.0, 150.0),
        ("0.8", "eq", 0.8, 0.75, 0.85),
        ("gt-5", "gt", -5.0, -5.5, -4.5),
        ("ne.5", "ne", 0.5, 0.45, 0.55),
        ("ap100", "ap", 100.0, 90.0, 110.0),
    ],
)
def test_number_precision(raw: str, prefix: str, value: float, lo: float, hi: float) -> None:
    (v,) = one("RiskAssessment", [("probability", raw)]).values
    assert isinstance(v, NumberValue)
    assert (v.prefix, v.value) == (prefix, value)
    assert v.lo == pytest.approx(lo) and v.hi == pytest.approx(hi)


@pytest.mark.parametrize("raw", ["abc", "1,5x", "xx5", "5.4.1", "NaN", "inf", "1e"])
def test_invalid_numbers(raw: str) -> None:
    assert error("RiskAssessment", [("probability", raw)]).code is Code.INVALID_SEARCH_VALUE


def test_quantity_forms() -> None:
    (v,) = one("Observation", "value-quantity=le5.4|http://unitsofmeasure.org|mg").values
    assert isinstance(v, QuantityValue)
    assert (v.prefix, v.value, v.system, v.code) == ("le", 5.4, "http://unitsofmeasure.org", "mg")
    assert (v.lo, v.hi) == pytest.approx((5.35, 5.45))
    (v,) = one("Observation", "value-quantity=5.4||mg").values
    assert isinstance(v, QuantityValue) and (v.system, v.code) == (None, "mg")
    (v,) = one("Observation", "value-quantity=5.4").values
    assert isinstance(v, QuantityValue) and (v.system, v.code) == (None, None)
    for bad in ("5.4|mg", "mg", "5.4|a|b|c"):
        assert error("Observation", [("value-quantity", bad)]).code is Code.INVALID_SEARCH_VALUE


# -- reference --------------------------------------------------------------------


def test_reference_forms() -> None:
    assert one("Observation", "subject=Patient/123").values == (ReferenceValue("Patient", "123"),)
    # a bare id takes the type of a single-target parameter ...
    assert one("Patient", "organization=123").values == (ReferenceValue("Organization", "123"),)
    # ... and any type otherwise
    assert one("Observation", "subject=123").values == (ReferenceValue(None, "123"),)
    c = one("Observation", "subject:Patient=123")
    assert (c.modifier, c.values) == ("Patient", (ReferenceValue("Patient", "123"),))
    assert one("Observation", "subject=Patient/123/_history/2").values == (
        ReferenceValue("Patient", "123", None, "2"),
    )
    assert one("Observation", "subject=http://other.org/fhir/Patient/1").values == (
        ReferenceValue(url="http://other.org/fhir/Patient/1"),
    )
    assert one("QuestionnaireResponse", "questionnaire=http://x.org/Questionnaire/q|1.0").values \
        == (ReferenceValue(url="http://x.org/Questionnaire/q", version="1.0"),)


def test_reference_under_own_base_becomes_relative() -> None:
    c = one("Observation", "subject=https://gw.example/fhir/Patient/7",
            base_url="https://gw.example/fhir/")
    assert c.values == (ReferenceValue("Patient", "7"),)


def test_reference_identifier_and_missing() -> None:
    c = one("Observation", "subject:identifier=urn:mrn|42")
    assert (c.modifier, c.values) == ("identifier", (TokenValue("42", "urn:mrn", False),))
    assert one("Observation", "subject:missing=true").values == (MissingValue(True),)


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("subject:Medication=1", Code.INVALID_SEARCH_VALUE),  # not a target of subject
        ("subject:Patient=Group/1", Code.INVALID_SEARCH_VALUE),
        ("subject=not a reference", Code.INVALID_SEARCH_VALUE),
        ("subject:exact=1", Code.INVALID_SEARCH_VALUE),
        ("subject:below=1", Code.UNSUPPORTED_SEARCH),
    ],
)
def test_invalid_references(query: str, code: Code) -> None:
    assert error("Observation", [tuple(query.split("=", 1))]).code is code  # type: ignore[list-item]


# -- uri, _id, meta parameters ---------------------------------------------------


def test_uri() -> None:
    c = one("ValueSet", "url=http://acme.org/fhir/ValueSet/123")
    assert (c.type, c.modifier, c.values) == (
        "uri", None, (UriValue("http://acme.org/fhir/ValueSet/123"),))
    assert one("ValueSet", "url:below=http://acme.org/fhir/").modifier == "below"
    assert one("ValueSet", "url:above=http://acme.org/fhir/ValueSet/123/x").modifier == "above"
    assert error("ValueSet", "url:contains=x").code is Code.INVALID_SEARCH_VALUE


def test_id_and_meta_params() -> None:
    c = one("Patient", "_id=a,b")
    assert (c.code, c.values) == ("_id", (TokenValue("a"), TokenValue("b")))
    assert error("Patient", "_id=a/b").code is Code.INVALID_SEARCH_VALUE
    assert one("Patient", "_tag=http://s|t").values == (TokenValue("t", "http://s", False),)
    assert one("Patient", "_security=http://s|R").type == "token"
    assert one("Patient", "_profile=http://p").values == (UriValue("http://p"),)
    assert one("Patient", "_source=urn:x").type == "uri"


# -- chains and _has ---------------------------------------------------------------


def test_chain_with_type() -> None:
    c = one("Observation", "subject:Patient.name=peter,paul")
    assert c == Criterion(
        "subject", "reference", "Patient", (),
        (Chain("Patient", Criterion("name", "string", None, (
            StringValue("peter", "peter"), StringValue("paul", "paul")))),),
    )


def test_chain_without_type_spans_the_targets_that_have_the_param() -> None:
    c = one("Observation", "subject.name=peter")
    assert {link.target_type for link in c.chain} == {"Patient", "Location"}
    c = one("Observation", "subject.birthdate=2000")
    assert [link.target_type for link in c.chain] == ["Patient"]


def test_multi_level_chain_with_modifier_at_the_end() -> None:
    c = one("Observation", "subject:Patient.organization.name:exact=Acme")
    (link,) = c.chain
    assert link.target_type == "Patient"
    (link2,) = link.criterion.chain
    assert link2.target_type == "Organization"
    assert link2.criterion == Criterion("name", "string", "exact", (StringValue("Acme", "acme"),))


def test_chain_errors() -> None:
    assert error("Patient", "name.family=x").code is Code.INVALID_SEARCH_VALUE
    assert error("Observation", "subject:missing.name=x").code is Code.INVALID_SEARCH_VALUE
    q = parse("Observation", "subject:Patient.nope=x")
    assert q.criteria == ()
    assert "nope" in q.warnings[0]
    assert error("Observation", "subject.nope=x", strict=True).code is Code.UNKNOWN_SEARCH_PARAM


def test_has() -> None:
    c = one("Patient", "_has:Observation:patient:code=1234,5678")
    assert c == Criterion("_has", "_has", has=Has("Observation", "patient", Criterion(
        "code", "token", None, (TokenValue("1234"), TokenValue("5678")))))


def test_nested_has() -> None:
    c = one("Patient", "_has:Observation:patient:_has:AuditEvent:entity:agent=Practitioner/1")
    assert c.has is not None and c.has.source_type == "Observation"
    inner = c.has.criterion
    assert inner.has == Has("AuditEvent", "entity", Criterion(
        "agent", "reference", None, (ReferenceValue("Practitioner", "1"),)))


@pytest.mark.parametrize(
    "query",
    ["_has:Observation:patient=1", "_has:Nope:patient:code=1",
     "_has:Observation:code:code=1", "_has:Observation:patient:code:bogus=1"],
)
def test_invalid_has(query: str) -> None:
    assert error("Patient", [tuple(query.split("=", 1))]).code is \
        Code.INVALID_SEARCH_VALUE  # type: ignore[list-item]


def test_has_reference_must_point_at_the_searched_type() -> None:
    # Observation.patient refers to Patients only
    assert error("Practitioner", "_has:Observation:patient:code=1").code is \
        Code.INVALID_SEARCH_VALUE


def test_has_with_unknown_inner_param() -> None:
    q = parse("Patient", "_has:Observation:patient:nope=1")
    assert q.criteria == () and q.warnings
    e = error("Patient", "_has:Observation:patient:nope=1", strict=True)
    assert e.code is Code.UNKNOWN_SEARCH_PARAM


def test_nesting_is_bounded() -> None:
    deep = "subject:Patient." + "link:Patient." * 6 + "name=x"
    assert error("Observation", deep, strict=True).code is Code.UNSUPPORTED_SEARCH


# -- unknown, unsupported, ignored --------------------------------------------------


def test_unknown_param_lenient_and_strict() -> None:
    q = parse("Patient", "foo=1&name=x")
    assert q.warnings == ("Unknown search parameter 'foo' for Patient was ignored",)
    assert [c.code for c in q.criteria] == ["name"]
    e = error("Patient", "foo=1", strict=True)
    assert e.code is Code.UNKNOWN_SEARCH_PARAM and "foo" in (e.diagnostics or "")


def test_composite_and_special_params() -> None:
    q = parse("Observation", "code-value-quantity=http://loinc.org|1234$gt5|http://u|mg"
                             "&code-value-concept=9$x,s|8\\$1$y")
    quantity, concept = q.criteria
    assert quantity.type == "composite" and quantity.values == (
        CompositeValue(TokenValue("1234", "http://loinc.org", False),
                       QuantityValue("gt", 5.0, 4.5, 5.5, "5", "http://u", "mg"), "quantity"),)
    assert concept.values == (CompositeValue(TokenValue("9"), TokenValue("x"), "token"),
                              CompositeValue(TokenValue("8$1", "s", False), TokenValue("y"),
                                             "token"))
    # R4's DocumentReference relationship pairs its components the wrong way round
    q = parse("DocumentReference", "relationship=replaces$DocumentReference/1")
    assert q.criteria == () and "relationship" in q.warnings[0]
    e = error("DocumentReference", "relationship=replaces$DocumentReference/1", strict=True)
    assert e.code is Code.UNSUPPORTED_SEARCH
    assert error("Patient", "_text=x", strict=True).code is Code.UNSUPPORTED_SEARCH
    assert error("Patient", "_filter=x", strict=True).code is Code.UNSUPPORTED_SEARCH


def test_near_takes_a_position_and_a_distance() -> None:
    """location.html#positional: latitude|longitude|distance|units, km by default."""
    near = one("Location", "near=51.34|12.37|10|km")
    assert near.type == "special" and near.values == (NearValue(51.34, 12.37, 10.0),)
    assert one("Location", "near=51.34|12.37|10").values == (NearValue(51.34, 12.37, 10.0),)
    assert one("Location", "near=-6.2|106.8|500|m").values == (NearValue(-6.2, 106.8, 0.5),)
    mile = one("Location", "near=0|0|2|[mi_i]").values[0]
    assert isinstance(mile, NearValue) and mile.km == pytest.approx(3.218688)
    # no distance, or 0: the position itself
    assert one("Location", "near=51.34|12.37").values == (NearValue(51.34, 12.37, None),)
    assert one("Location", "near=51.34|12.37|0|km").values == (NearValue(51.34, 12.37, None),)
    assert one("Location", "near=1|2|3,4|5|6").values == (
        NearValue(1.0, 2.0, 3.0), NearValue(4.0, 5.0, 6.0))
    assert one("Location", "near:missing=true").values == (MissingValue(True),)
    for bad in ("near=51.34", "near=x|12|1", "near=51|12|1|furlong", "near=91|0|1",
                "near=0|181|1", "near=0|0|-1", "near=0|0|1e999", "near=|1|1", "near=1|2|3|km|x"):
        assert error("Location", bad).code is Code.INVALID_SEARCH_VALUE, bad
    assert error("Location", "near:exact=1|2").code is Code.INVALID_SEARCH_VALUE
    # _sort=near measures from the positions near names
    q = parse("Location", "_sort=-near,name&near=1|2|3,4|5|6")
    assert q.sort == (SortKey("near", True, "special", origins=((1.0, 2.0), (4.0, 5.0))),
                      SortKey("name", False, "string"))
    assert error("Location", "_sort=near&name=x").code is Code.INVALID_SEARCH_VALUE


def test_http_layer_params_are_ignored_silently() -> None:
    q = parse("Patient", "_format=json&_pretty=true&_getpages=x&_getpagesoffset=10"
                         "&_contained=false&_containedType=container", strict=True)
    assert q == SearchQuery("Patient")


def test_offset_and_page() -> None:
    assert parse("Patient", "_offset=40&_count=20") == SearchQuery("Patient", count=20, offset=40)
    assert parse("Patient", "_page=3") == SearchQuery("Patient", page=3)
    for bad in ("_offset=-1", "_offset=x", "_page=0", "_page=1.5"):
        assert error("Patient", bad).code is Code.INVALID_SEARCH_VALUE, bad


def test_empty_value_is_ignored_with_a_warning() -> None:
    q = parse("Patient", "name=&gender=,")
    assert q.criteria == ()
    assert len(q.warnings) == 2


def test_invalid_values_fail_even_when_lenient() -> None:
    assert error("Patient", "birthdate=yesterday").code is Code.INVALID_SEARCH_VALUE


def test_unknown_resource_type() -> None:
    assert error("Nope", "name=x").code is Code.UNKNOWN_RESOURCE_TYPE


# -- result parameters ----------------------------------------------------------------


def test_sort() -> None:
    q = parse("Observation", "_sort=-date,code&_sort=_id&_sort=-_lastUpdated")
    assert q.sort == (
        SortKey("date", True, "date"), SortKey("code", False, "token"),
        SortKey("_id", False, "token"), SortKey("_lastUpdated", True, "date"),
    )
    assert error("Observation", "_sort=nope").code is Code.INVALID_SEARCH_VALUE
    assert error("Observation", "_sort=code-value-quantity").code is Code.INVALID_SEARCH_VALUE
    assert error("Observation", "_sort:asc=date").code is Code.INVALID_SEARCH_VALUE


@pytest.mark.parametrize(("raw", "count"), [("0", 0), ("10", 10), ("500", 500)])
def test_count(raw: str, count: int) -> None:
    assert parse("Patient", f"_count={raw}").count == count


@pytest.mark.parametrize("raw", ["-1", "abc", "1.5"])
def test_invalid_count(raw: str) -> None:
    assert error("Patient", f"_count={raw}").code is Code.INVALID_SEARCH_VALUE


def test_total_summary_elements() -> None:
    q = parse("Patient", "_total=accurate&_summary=count&_elements=name,birthDate,name")
    assert (q.total, q.summary, q.elements) == ("accurate", "count", ("name", "birthDate"))
    for bad in ("_total=all", "_summary=yes", "_elements=na me"):
        assert error("Patient", bad).code is Code.INVALID_SEARCH_VALUE


def test_include_forms() -> None:
    q = parse("Observation", "_include=Observation:subject:Patient&_include=Observation:performer"
                             "&_include:iterate=Patient:organization&_include=*"
                             "&_revinclude=Provenance:target&_revinclude:iterate=Observation:*")
    assert q.includes == (
        Include("Observation", "subject", "Patient"),
        Include("Observation", "performer"),
        Include("Patient", "organization", None, iterate=True),
        Include("*", "*", None, wildcard=True),
    )
    assert q.revincludes[1] == Include("Observation", "*", None, iterate=True, wildcard=True)
    # what a canonical reference may name by its url as well
    provenance = q.revincludes[0]
    assert provenance.source_type == "Provenance" and provenance.param_code == "target"
    assert {"Questionnaire", "PlanDefinition", "StructureDefinition", "ValueSet"} <= set(
        provenance.canonical)
    assert not {"Patient", "Subscription", "Device", "Contract"} & set(provenance.canonical)
    assert parse("QuestionnaireResponse", "_include=QuestionnaireResponse:questionnaire"
                 ).includes[0].canonical == ("Questionnaire",)


@pytest.mark.parametrize(
    "raw",
    ["Observation:code", "Observation:nope", "Observation", "Nope:subject",
     "Observation:subject:Medication", "Observation:subject:Patient:x"],
)
def test_invalid_includes(raw: str) -> None:
    assert error("Observation", [("_include", raw)]).code is Code.INVALID_SEARCH_VALUE
    assert error("Observation", [("_include:bogus", "Observation:subject")]).code is \
        Code.INVALID_SEARCH_VALUE


# -- system search --------------------------------------------------------------------


def test_system_search_common_params_only() -> None:
    q = parse(None, "_id=a&_lastUpdated=gt2020&_tag=s|t&_profile=http://p&_security=s|x"
                    "&_source=urn:s&_sort=-_lastUpdated")
    assert q.resource_type is None and q.types == ()
    assert [c.code for c in q.criteria] == ["_id", "_lastUpdated", "_tag", "_profile",
                                            "_security", "_source"]
    q = parse(None, "name=x")
    assert q.criteria == ()
    assert q.warnings == ("Unknown search parameter 'name' for a system-wide search was ignored",)


def test_system_search_with_type() -> None:
    q = parse(None, "_type=Patient,Practitioner&name=x&_sort=name")
    assert q.types == ("Patient", "Practitioner")
    assert [c.code for c in q.criteria] == ["name"]
    assert q.sort == (SortKey("name", False, "string"),)
    assert error(None, "_type=Patient,Observation&name=x").code is Code.UNKNOWN_SEARCH_PARAM
    assert error(None, "_type=Nope").code is Code.INVALID_SEARCH_VALUE


def test_type_param_on_type_level_search_is_ignored_with_warning() -> None:
    q = parse("Patient", "_type=Patient")
    assert q.criteria == () and q.warnings


def test_token_in_names_a_value_set_filled_in_by_the_caller() -> None:
    vs, other = "https://example.org/ValueSet/a", "https://example.org/ValueSet/b|2"
    q = parse("Encounter", f"type:in={vs}&subject:Patient.gender:not-in={other}"
                           f"&_has:Condition:encounter:code:in={vs}")
    assert q.criteria[0] == Criterion("type", "token", "in", (InValue(vs),))
    assert {url: use.used_by for url, use in value_sets(q).items()} == {
        vs: {("Encounter", "type"), ("Condition", "code")}, other: {("Patient", "gender")}}
    filled = with_value_sets(q, {vs: frozenset({("s", "1")}), other: frozenset()})
    assert filled.criteria[0].values == (InValue(vs, frozenset({("s", "1")})),)
    assert filled.criteria[1].chain[0].criterion.values == (InValue(other, frozenset()),)
    has = filled.criteria[2].has
    assert has is not None and has.criterion.values == (InValue(vs, frozenset({("s", "1")})),)
    assert error("Observation", "code:in=not-a-url").code is Code.INVALID_SEARCH_VALUE
    below = one("Observation", "code:below=http://loinc.org|LP1")
    assert below.values == (InValue("below:http://loinc.org|LP1", compose=(
        '{"include":[{"system":"http://loinc.org","filter":[{"property":"concept",'
        '"op":"is-a","value":"LP1"}]}]}')),)
    assert "generalizes" in (one("Observation", "code:above=urn:s|x").values[0].compose or "")
    for bad in ("LP1", "|LP1", "http://loinc.org|"):
        assert error("Observation", f"code:below={bad}").code is Code.INVALID_SEARCH_VALUE


def test_identifier_of_type_takes_three_parts() -> None:
    v2 = "http://terminology.hl7.org/CodeSystem/v2-0203"
    c = one("Patient", f"identifier:of-type={v2}|MR|12\\|3")
    assert c.modifier == "of-type" and c.values == (OfTypeValue(v2, "MR", "12|3"),)
    for bad in ("MR|123", f"{v2}||123", f"{v2}|MR|", "123"):
        assert error("Patient", f"identifier:of-type={bad}").code is Code.INVALID_SEARCH_VALUE


# -- what a search may cost -----------------------------------------------------


def test_values_are_counted_through_chains_and_has() -> None:
    from gateway.fhir.search import MAX_VALUES
    many = ",".join(f"v{i}" for i in range(MAX_VALUES))
    assert len(one("Patient", [("family", many)]).values) == MAX_VALUES
    assert error("Patient", [("family", many + ",one-more")]).code is Code.SEARCH_TOO_COSTLY
    # subject.name looks into the two types subject may point to that have a name
    # (Patient, Location): each value is tested for each of them
    share = ",".join(f"v{i}" for i in range(MAX_VALUES // 2))
    assert len(one("Observation", [("subject.name", share)]).chain) == 2
    assert error("Observation", [("subject.name", share + ",x")]).code is Code.SEARCH_TOO_COSTLY
    half = ",".join(f"v{i}" for i in range(MAX_VALUES // 2))
    assert error("Patient", [("_has:Observation:subject:code", half), ("family", half + ",x")]
                 ).code is Code.SEARCH_TOO_COSTLY
    # a value given twice counts as sent, and is tested once
    assert one("Patient", [("family", "a,a,b")]).values == (
        StringValue("a", "a"), StringValue("b", "b"))


def test_parameters_are_limited_and_sort_keys_given_again_dropped() -> None:
    from gateway.fhir.search import MAX_CRITERIA
    pairs = [("family", f"f{i}") for i in range(MAX_CRITERIA)]
    assert len(parse("Patient", pairs).criteria) == MAX_CRITERIA
    assert error("Patient", [*pairs, ("given", "g")]).code is Code.SEARCH_TOO_COSTLY
    q = parse("Patient", "_sort=family,-birthdate,-family,birthdate&_sort=family,_id")
    assert [(k.param_code, k.descending) for k in q.sort] == [
        ("family", False), ("birthdate", True), ("_id", False)]


def test_a_parameter_not_common_to_every_type_asked_for_is_refused() -> None:
    """search.html#_type: a search across types takes parameters common to all of
    them. Ignored, ``patient`` would widen "this patient's Observations and
    Conditions" to every Patient as well: refused; a name no
    type knows is still ignored with a warning."""
    both = parse(None, "_type=Observation,Condition&patient=p1")
    assert [c.code for c in both.criteria] == ["patient"]
    with pytest.raises(FhirError) as err:
        parse(None, "_type=Patient,Observation&patient=p1")
    assert err.value.code is Code.UNKNOWN_SEARCH_PARAM and "Observation" in str(err.value)
    unknown = parse(None, "_type=Patient,Observation&nonsense=1")
    assert not unknown.criteria and unknown.warnings
