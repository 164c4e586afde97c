"""Search-index extraction (gateway.fhir.indexer) against hand-written resources,
the official R4 examples, and fhirpathpy as an independent FHIRPath engine."""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gateway.fhir import json as fjson
from gateway.fhir.indexer import (
    DATE_MAX,
    DATE_MIN,
    EMBEDDED,
    ISO4217,
    MAX_KEY_BYTES,
    MAX_LEN,
    NUM_MAX,
    NUM_MIN,
    TABLES,
    Indexer,
    SearchParam,
    _fallback_getter,
    clip,
    date_bounds,
    local_timezone,
    normalize_string,
    set_local_timezone,
)
from gateway.fhir.paths import root_name, split_union

EXAMPLES = Path(__file__).parent.parent / "data" / "r4-examples.ndjson.gz"
UTC_ZONE, BERLIN = ZoneInfo("UTC"), ZoneInfo("Europe/Berlin")

#: the expected bounds below are UTC's where a value has no zone
pytestmark = pytest.mark.usefixtures("utc_local_time")


@pytest.fixture(scope="module")
def ix() -> Indexer:
    indexer = Indexer.from_profiles()
    indexer.raise_errors = True  # a bug in a converter must fail the test, not be skipped
    return indexer


def us(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    """Epoch microseconds of a UTC datetime."""
    dt = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    return int(dt.timestamp()) * 1_000_000


def rows(out: dict[str, list[tuple[Any, ...]]], table: str, code: str) -> set[tuple[Any, ...]]:
    """The rows of one parameter, without the param column."""
    return {r[1:] for r in out[table] if r[0] == code}


def load_examples() -> list[dict[str, Any]]:
    with gzip.open(EXAMPLES, "rt", encoding="utf-8") as fh:
        return [fjson.loads(json.loads(line)["text"]) for line in fh if line.strip()]


def with_bundle_entries(resource: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield resource
    if resource.get("resourceType") == "Bundle":
        for entry in resource.get("entry") or ():
            if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
                yield from with_bundle_entries(entry["resource"])


# --------------------------------------------------------------------------- helpers


def test_normalize_string() -> None:
    assert normalize_string("  Peter   James\tCHALMERS \n") == "peter james chalmers"
    assert normalize_string("Zoë Ångström") == "zoe angstrom"
    assert normalize_string("Straße") == "strasse"
    assert normalize_string("\uff21\uff22\uff23\uff11") == "abc1"  # NFKD folds full-width
    assert normalize_string("Ĳsselmeer") == "ijsselmeer"
    assert normalize_string("İstanbul") == "istanbul"
    assert normalize_string("") == ""


def test_date_bounds_partial_dates() -> None:
    assert date_bounds("2020", UTC_ZONE) == (us(2020, 1, 1), us(2021, 1, 1) - 1)
    assert date_bounds("2020-02", UTC_ZONE) == (us(2020, 2, 1), us(2020, 3, 1) - 1)
    assert date_bounds("2020-12", UTC_ZONE) == (us(2020, 12, 1), us(2021, 1, 1) - 1)
    assert date_bounds("2020-05-17", UTC_ZONE) == (us(2020, 5, 17), us(2020, 5, 18) - 1)
    assert date_bounds("9999", UTC_ZONE) == (us(9999, 1, 1),
                                             us(9999, 12, 31) + 86_400_000_000 - 1)


def test_date_bounds_times_and_offsets() -> None:
    t = us(2020, 5, 17, 8, 0, 0)
    assert date_bounds("2020-05-17T10:00:00+02:00") == (t, t + 999_999)
    assert date_bounds("2020-05-17T03:00:00-05:00") == (t, t + 999_999)
    assert date_bounds("2020-05-17T08:00:00Z") == (t, t + 999_999)
    assert date_bounds("2020-05-17T08:00:00", UTC_ZONE) == (t, t + 999_999)  # no zone: UTC's
    assert date_bounds("2020-05-17T08:00Z") == (t, t + 60_000_000 - 1)  # minutes precision
    assert date_bounds("2020-05-17T08:00:00.5Z") == (t + 500_000, t + 599_999)
    assert date_bounds("2020-05-17T08:00:00.123Z") == (t + 123_000, t + 123_999)
    assert date_bounds("2020-05-17T08:00:00.1234567Z") == (t + 123_456, t + 123_456)
    # crossing midnight / the year boundary through the offset
    assert date_bounds("2021-01-01T00:30:00+01:00") == (
        us(2020, 12, 31, 23, 30),
        us(2020, 12, 31, 23, 30) + 999_999,
    )


def test_date_bounds_without_a_zone_are_in_berlin_time() -> None:
    """search.html#date: a value without a zone is the server's local time; in
    Germany a day begins at 23:00Z in winter and at 22:00Z in summer."""
    # winter (CET, +01:00)
    assert date_bounds("2017-11-24", BERLIN) == (us(2017, 11, 23, 23), us(2017, 11, 24, 23) - 1)
    t = us(2017, 11, 23, 23, 30)
    assert date_bounds("2017-11-24T00:30:00", BERLIN) == (t, t + 999_999)
    # summer (CEST, +02:00)
    assert date_bounds("2020-07-01", BERLIN) == (us(2020, 6, 30, 22), us(2020, 7, 1, 22) - 1)
    t = us(2020, 7, 1, 8)
    assert date_bounds("2020-07-01T10:00", BERLIN) == (t, t + 60_000_000 - 1)
    # a span over a change of the offset: each end with its own
    assert date_bounds("2021-03", BERLIN) == (us(2021, 2, 28, 23), us(2021, 3, 31, 22) - 1)
    assert date_bounds("2021-03-28", BERLIN) == (us(2021, 3, 27, 23), us(2021, 3, 28, 22) - 1)
    assert date_bounds("2020", BERLIN) == (us(2019, 12, 31, 23), us(2020, 12, 31, 23) - 1)
    # a value with a zone is taken as it says
    t = us(2017, 11, 23, 23, 30)
    assert date_bounds("2017-11-24T00:30:00+01:00", BERLIN) == (t, t + 999_999)
    assert date_bounds("2017-11-23T23:30:00Z", BERLIN) == (t, t + 999_999)


def test_date_bounds_take_the_local_time_zone_set() -> None:
    """Without a zone argument, the server's (``CAREPATH_TIMEZONE``); bounds cached under
    one zone are not those of another."""
    before = local_timezone()
    try:
        set_local_timezone("UTC")
        assert date_bounds("2017-11-24") == (us(2017, 11, 24), us(2017, 11, 25) - 1)
        set_local_timezone("Europe/Berlin")
        assert date_bounds("2017-11-24") == (us(2017, 11, 23, 23), us(2017, 11, 24, 23) - 1)
        set_local_timezone("Europe/Amsterdam")
        assert date_bounds("2020-07-01") == (us(2020, 6, 30, 22), us(2020, 7, 1, 22) - 1)
        assert date_bounds("2020-07-01", UTC_ZONE) == (us(2020, 7, 1), us(2020, 7, 2) - 1)
    finally:
        set_local_timezone(before.key)


@pytest.mark.parametrize(
    "text",
    [
        "", "abc", "2020-13", "2021-02-29", "2020-02-30", "2020-05-17T25:00:00Z",
        "2020-05-17T10:61:00Z", "2020-05-17T10:00:60Z", "20200517", "2020-5-17",
        "0000", "2020-05-17T10:00:00+2:00", "2020-05-17 10:00:00", "x" * 100,
    ],
)
def test_date_bounds_rejects_bad_values(text: str) -> None:
    assert date_bounds(text) is None


def test_date_bounds_non_string() -> None:
    assert date_bounds({"a": 1}) is None  # type: ignore[arg-type]
    assert date_bounds(2020) is None  # type: ignore[arg-type]


# --------------------------------------------------------------------------- definitions


def test_params_for(ix: Indexer) -> None:
    p = ix.params_for("Patient")
    assert isinstance(p["name"], SearchParam)
    assert p["name"].type == "string"
    assert p["birthdate"].type == "date"
    assert set(p["general-practitioner"].targets) == {"Organization", "Practitioner",
                                                      "PractitionerRole"}
    assert {"_id", "_lastUpdated", "_tag", "_profile", "_security", "_source", "_text"} <= set(p)
    assert p["_profile"].type == "uri"
    assert p["_id"].expression == "Resource.id"  # the core definition, not the example one
    assert "eq" in ix.params_for("Observation")["value-quantity"].comparators
    comp = ix.params_for("Observation")["code-value-quantity"]
    assert comp.type == "composite" and comp.table == "sp_composite"
    assert [(c.code, c.type, c.expression) for c in comp.parts] == [
        ("code", "token", "code"), ("value-quantity", "quantity", "value.as(Quantity)")]
    assert ix.params_for("Location")["near"].type == "special"
    # Condition.subject: the core parameter wins over the "example-reference" one
    assert ix.params_for("Condition")["subject"].targets == ("Group", "Patient")
    # Bundle is not a DomainResource: no _text
    assert "_text" not in ix.params_for("Bundle") and "_tag" in ix.params_for("Bundle")
    assert ix.params_for("NotAType") == {}
    # callers get their own dict
    ix.params_for("Patient").clear()
    assert "name" in ix.params_for("Patient")


def test_location_position(ix: Indexer) -> None:
    def coords(position: object) -> list[tuple[object, ...]]:
        return ix.extract({"resourceType": "Location", "position": position})["sp_coords"]

    assert ix.params_for("Location")["near"].table == "sp_coords"
    assert coords({"latitude": Decimal("51.3397"), "longitude": -12, "altitude": 3}) == [
        ("near", 51.3397, -12.0)]
    for bad in ({"latitude": 91, "longitude": 0}, {"latitude": 0, "longitude": 180.5},
                {"latitude": True, "longitude": 0}, {"latitude": "51", "longitude": "12"},
                {"latitude": 51}, [], "51|12"):
        assert coords(bad) == [], bad


def test_every_table_present_and_skipped_params(ix: Indexer) -> None:
    out = ix.extract({"resourceType": "Patient", "id": "p1",
                      "meta": {"lastUpdated": "2020-01-01T00:00:00Z", "versionId": "1"}})
    assert set(out) == set(TABLES)
    # _id / _lastUpdated are not indexed; "deceased" is false by its FHIRPath (no deceased[x])
    assert {t: r for t, r in out.items() if r} == {"sp_token": [("deceased", None, "false", None)]}


@pytest.mark.parametrize("bad", [None, [], "Patient", {}, {"resourceType": 1},
                                 {"resourceType": "Nope", "id": "x"}])
def test_extract_garbage_top_level(ix: Indexer, bad: Any) -> None:
    out = ix.extract(bad)
    assert set(out) == set(TABLES) and not any(out.values())


# --------------------------------------------------------------------------- Patient

PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "p1",
    "meta": {
        "tag": [{"system": "http://example.org/tags", "code": "vip", "display": "V.I.P."}],
        "security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
                      "code": "R"}],
        "profile": ["http://example.org/StructureDefinition/my-patient|1.0"],
        "source": "http://example.org/source#abc",
    },
    "identifier": [
        {"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "12345",
         "type": {"text": "Medical  Record"}},
        {"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "12345",
         "type": {"text": "Medical  Record"}},  # duplicate: deduplicated
        {"value": "no-system"},
    ],
    "active": True,
    "name": [
        {"use": "official", "family": "Chalmers", "given": ["Peter", "James"],
         "prefix": ["Dr."], "suffix": ["III"], "text": "Dr. Peter James Chalmers III"},
        {"use": "usual", "given": ["Jim"]},
        {"family": "Müller-Lüdenscheidt"},
    ],
    "telecom": [
        {"system": "phone", "value": "(03) 5555 6473", "use": "work"},
        {"system": "email", "value": "peter@example.org"},
    ],
    "gender": "male",
    "birthDate": "1974-12-25",
    "deceasedDateTime": "2015-02-14T13:42:00+10:00",
    "address": [{
        "use": "home", "line": ["534 Erewhon St", "Unit 2"], "city": "PleasantVille",
        "district": "Rainbow", "state": "Vic", "postalCode": "3999", "country": "AU",
        "text": "534 Erewhon St, PleasantVille",
    }],
    "generalPractitioner": [{"reference": "Practitioner/pr1"}],
    "managingOrganization": {"reference": "Organization/1", "display": "ACME"},
    "link": [{"other": {"reference": "Patient/p0"}, "type": "seealso"}],
}


def test_patient_strings(ix: Indexer) -> None:
    out = ix.extract(PATIENT)
    assert rows(out, "sp_string", "family") == {
        ("chalmers", "Chalmers"), ("muller-ludenscheidt", "Müller-Lüdenscheidt")}
    assert rows(out, "sp_string", "given") == {
        ("peter", "Peter"), ("james", "James"), ("jim", "Jim")}
    assert rows(out, "sp_string", "name") == {
        ("chalmers", "Chalmers"), ("peter", "Peter"), ("james", "James"), ("dr.", "Dr."),
        ("iii", "III"), ("dr. peter james chalmers iii", "Dr. Peter James Chalmers III"),
        ("jim", "Jim"), ("muller-ludenscheidt", "Müller-Lüdenscheidt"),
    }
    assert rows(out, "sp_string", "address") == {
        ("534 erewhon st", "534 Erewhon St"), ("unit 2", "Unit 2"),
        ("pleasantville", "PleasantVille"), ("rainbow", "Rainbow"), ("vic", "Vic"),
        ("3999", "3999"), ("au", "AU"),
        ("534 erewhon st, pleasantville", "534 Erewhon St, PleasantVille"),
    }
    assert rows(out, "sp_string", "address-city") == {("pleasantville", "PleasantVille")}
    assert rows(out, "sp_string", "address-postalcode") == {("3999", "3999")}


def test_patient_tokens(ix: Indexer) -> None:
    out = ix.extract(PATIENT)
    assert rows(out, "sp_token", "identifier") == {
        ("urn:oid:1.2.36.146.595.217.0.1", "12345", "medical record"),
        (None, "no-system", None),
    }
    assert len([r for r in out["sp_token"] if r[0] == "identifier"]) == 2  # deduplicated
    # a code's system is implied by its required binding (administrative-gender)
    assert rows(out, "sp_token", "gender") == {
        ("http://hl7.org/fhir/administrative-gender", "male", None)}
    assert rows(out, "sp_token", "active") == {(None, "true", None)}
    assert rows(out, "sp_token", "deceased") == {(None, "true", None)}
    assert rows(out, "sp_token", "telecom") == {
        ("phone", "(03) 5555 6473", None), ("email", "peter@example.org", None)}
    assert rows(out, "sp_token", "phone") == {("phone", "(03) 5555 6473", None)}
    assert rows(out, "sp_token", "email") == {("email", "peter@example.org", None)}
    # through the datatype: Patient.address.use is Address.use, bound to address-use
    assert rows(out, "sp_token", "address-use") == {("http://hl7.org/fhir/address-use", "home",
                                                     None)}
    assert rows(out, "sp_token", "_tag") == {("http://example.org/tags", "vip", "v.i.p.")}
    assert rows(out, "sp_token", "_security") == {
        ("http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "R", None)}


def test_patient_dates_references_uris(ix: Indexer) -> None:
    out = ix.extract(PATIENT)
    assert rows(out, "sp_date", "birthdate") == {(us(1974, 12, 25), us(1974, 12, 26) - 1)}
    death = us(2015, 2, 14, 3, 42)
    assert rows(out, "sp_date", "death-date") == {(death, death + 999_999)}
    assert rows(out, "sp_reference", "general-practitioner") == {
        ("Practitioner", "pr1", None, None, None, None)}
    assert rows(out, "sp_reference", "organization") == {
        ("Organization", "1", None, None, None, None)}
    assert rows(out, "sp_reference", "link") == {("Patient", "p0", None, None, None, None)}
    assert rows(out, "sp_uri", "_profile") == {
        ("http://example.org/StructureDefinition/my-patient|1.0",),
        ("http://example.org/StructureDefinition/my-patient",),
    }
    assert rows(out, "sp_uri", "_source") == {("http://example.org/source#abc",)}


def test_patient_deceased_boolean(ix: Indexer) -> None:
    alive = ix.extract({"resourceType": "Patient", "deceasedBoolean": False})
    assert rows(alive, "sp_token", "deceased") == {(None, "false", None)}
    dead = ix.extract({"resourceType": "Patient", "deceasedBoolean": True})
    assert rows(dead, "sp_token", "deceased") == {(None, "true", None)}
    assert rows(dead, "sp_date", "death-date") == set()
    # `Patient.deceased.exists() and Patient.deceased != false` is false without deceased[x]
    unknown = ix.extract({"resourceType": "Patient"})
    assert rows(unknown, "sp_token", "deceased") == {(None, "false", None)}


def test_bad_values_are_skipped(ix: Indexer) -> None:
    out = ix.extract({
        "resourceType": "Patient",
        "birthDate": "1990-02-30",
        "name": ["not a HumanName", {"family": 42, "given": "Solo"}, {"given": [None, "Ann"]}],
        "identifier": {"system": "urn:x", "value": "not-a-list"},
        "telecom": ["555-1234", {"system": "phone", "value": None}],
        "gender": {"code": "male"},
        "address": [{"line": "single line", "city": ["x"]}],
        "meta": {"tag": "oops", "profile": [1, None, "http://ok"]},
        "managingOrganization": "Organization/1",
        "generalPractitioner": [{"reference": 5}, {"reference": "#contained"},
                                {"reference": ""}, {"display": "just text"}],
        "deceasedDateTime": "yesterday",
    })
    assert rows(out, "sp_date", "birthdate") == set()
    assert rows(out, "sp_date", "death-date") == set()
    assert rows(out, "sp_string", "given") == {("solo", "Solo"), ("ann", "Ann")}
    assert rows(out, "sp_string", "family") == set()
    assert rows(out, "sp_string", "address") == {("single line", "single line")}
    assert rows(out, "sp_token", "identifier") == {("urn:x", "not-a-list", None)}
    assert rows(out, "sp_token", "telecom") == set()
    assert rows(out, "sp_token", "gender") == set()
    assert rows(out, "sp_token", "_tag") == set()
    assert rows(out, "sp_uri", "_profile") == {("http://ok",)}
    assert rows(out, "sp_reference", "organization") == set()
    assert rows(out, "sp_reference", "general-practitioner") == set()


def test_long_strings_truncated(ix: Indexer) -> None:
    long = "Ab " * 1000
    out = ix.extract({"resourceType": "Patient", "name": [{"family": long}]})
    ((value, exact),) = rows(out, "sp_string", "family")
    # the indexed column to a B-tree entry's share, the other one further
    assert len(value) == MAX_KEY_BYTES and len(exact) == MAX_LEN
    assert value.startswith("ab ab") and exact == long[:MAX_LEN]


def test_indexed_columns_are_clipped_in_bytes_at_a_character_boundary(ix: Indexer) -> None:
    wide = "\u6f22" * 1000  # three bytes each
    assert clip("x" * 10) == "x" * 10
    assert clip(wide) == wide[:MAX_KEY_BYTES // 3]
    assert len(clip("\U0001f600" * 300).encode()) == MAX_KEY_BYTES  # four bytes each: 200
    out = ix.extract({"resourceType": "Patient", "name": [{"family": wide}],
                      "identifier": [{"system": "urn:" + "s" * 3000, "value": wide}]})
    ((value, _),) = rows(out, "sp_string", "family")
    ((system, code, _),) = rows(out, "sp_token", "identifier")
    assert all(len(v.encode()) <= MAX_KEY_BYTES for v in (value, system, code))
    assert code == wide[:MAX_KEY_BYTES // 3]


# --------------------------------------------------------------------------- Observation

OBSERVATION_TEXT = b"""{
  "resourceType": "Observation", "id": "o1", "status": "final",
  "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                             "code": "vital-signs", "display": "Vital Signs"}]}],
  "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7", "display": "Body Weight"},
                      {"system": "http://snomed.info/sct", "code": "27113001"}],
           "text": "Body weight"},
  "subject": {"reference": "Patient/p1"},
  "encounter": {"reference": "Encounter/e1"},
  "performer": [{"reference": "Practitioner/pr1"}, {"reference": "Organization/org1"}],
  "effectivePeriod": {"start": "2020-05-17T10:00:00+02:00", "end": "2020-05-17"},
  "valueQuantity": {"value": 67.50, "unit": "kg", "system": "http://unitsofmeasure.org",
                    "code": "kg"},
  "component": [
    {"code": {"text": "Free text only"}, "valueQuantity": {"value": 1.0E2, "comparator": "<",
                                                           "code": "mm[Hg]"}},
    {"code": {"coding": [{"code": "x"}]}, "valueCodeableConcept": {"text": "High"}}
  ]
}"""


def test_observation(ix: Indexer) -> None:
    obs = fjson.loads(OBSERVATION_TEXT)
    assert isinstance(obs["valueQuantity"]["value"], Decimal)  # numbers kept as written
    out = ix.extract(obs)
    assert rows(out, "sp_token", "code") == {
        ("http://loinc.org", "29463-7", "body weight"),
        ("http://snomed.info/sct", "27113001", "body weight"),  # CodeableConcept.text
    }
    assert rows(out, "sp_token", "category") == {
        ("http://terminology.hl7.org/CodeSystem/observation-category", "vital-signs",
         "vital signs")}
    assert rows(out, "sp_token", "component-code") == {
        (None, None, "free text only"), (None, "x", None)}
    assert rows(out, "sp_token", "component-value-concept") == {(None, None, "high")}
    assert rows(out, "sp_quantity", "value-quantity") == {
        ("http://unitsofmeasure.org", "kg", "kg", 67.5, 67.5)}
    assert rows(out, "sp_quantity", "component-value-quantity") == {
        (None, "mm[Hg]", None, NUM_MIN, 100.0)}
    # the union of two parameters: answered by their rows, none of its own
    assert rows(out, "sp_quantity", "combo-value-quantity") == set()
    assert ix.params_for("Observation")["combo-value-quantity"].stored_as == (
        "component-value-quantity", "value-quantity")
    assert rows(out, "sp_date", "date") == {(us(2020, 5, 17, 8), us(2020, 5, 18) - 1)}
    assert rows(out, "sp_reference", "subject") == {("Patient", "p1", None, None, None, None)}
    assert rows(out, "sp_reference", "patient") == {("Patient", "p1", None, None, None, None)}
    assert rows(out, "sp_reference", "performer") == {
        ("Practitioner", "pr1", None, None, None, None),
        ("Organization", "org1", None, None, None, None),
    }
    assert rows(out, "sp_reference", "encounter") == {
        ("Encounter", "e1", None, None, None, None)}
    assert rows(out, "sp_token", "status") == {("http://hl7.org/fhir/observation-status",
                                                "final", None)}
    # the choice element is restricted by the as(): no value-concept/value-date rows
    assert rows(out, "sp_token", "value-concept") == set()
    assert rows(out, "sp_date", "value-date") == set()


@pytest.mark.parametrize(
    ("value", "table", "code", "expected"),
    [
        ({"valueCodeableConcept": {"coding": [{"system": "s", "code": "c"}]}},
         "sp_token", "value-concept", {("s", "c", None)}),
        ({"valueString": "Trace  Amounts"}, "sp_string", "value-string",
         {("trace amounts", "Trace  Amounts")}),
        ({"valueCodeableConcept": {"text": "Positive"}}, "sp_string", "value-string",
         {("positive", "Positive")}),
        ({"valueDateTime": "2021-03"}, "sp_date", "value-date",
         {(us(2021, 3, 1), us(2021, 4, 1) - 1)}),
        ({"valuePeriod": {"start": "2021"}}, "sp_date", "value-date",
         {(us(2021, 1, 1), DATE_MAX)}),
        ({"valueBoolean": True}, "sp_token", "value-concept", set()),
    ],
)
def test_observation_value_choice(ix: Indexer, value: dict[str, Any], table: str, code: str,
                                  expected: set[tuple[Any, ...]]) -> None:
    out = ix.extract({"resourceType": "Observation", "status": "final", **value})
    assert rows(out, table, code) == expected


def test_effective_choice_types(ix: Indexer) -> None:
    def date_rows(extra: dict[str, Any]) -> set[tuple[Any, ...]]:
        return rows(ix.extract({"resourceType": "Observation", **extra}), "sp_date", "date")

    assert date_rows({"effectiveDateTime": "2020"}) == {(us(2020, 1, 1), us(2021, 1, 1) - 1)}
    assert date_rows({"effectiveInstant": "2020-01-01T00:00:00.000Z"}) == {
        (us(2020, 1, 1), us(2020, 1, 1) + 999)}
    assert date_rows({"effectivePeriod": {"end": "2020-01-01"}}) == {
        (DATE_MIN, us(2020, 1, 2) - 1)}
    assert date_rows({"effectivePeriod": {}}) == set()
    assert date_rows({"effectivePeriod": {"start": "2020-01-01", "end": "bad"}}) == set()
    assert date_rows({"effectiveTiming": {
        "event": ["2020-01-01", "2020-01-03"],
        "repeat": {"boundsPeriod": {"start": "2020-02-01", "end": "2020-02-02"}}}}) == {
        (us(2020, 1, 1), us(2020, 1, 2) - 1),
        (us(2020, 1, 3), us(2020, 1, 4) - 1),
        (us(2020, 2, 1), us(2020, 2, 3) - 1),
    }


def test_where_resolve_is_patient(ix: Indexer) -> None:
    def refs(subject: dict[str, Any]) -> tuple[set[Any], set[Any]]:
        out = ix.extract({"resourceType": "Observation", "subject": subject})
        return rows(out, "sp_reference", "patient"), rows(out, "sp_reference", "subject")

    assert refs({"reference": "Group/g1"}) == (set(), {("Group", "g1", None, None, None, None)})
    # a Patient elsewhere: its url only (no local type and id), still under "patient"
    absolute = (None, None, None, "http://other.org/fhir/Patient/9", None, None)
    assert refs({"reference": "http://other.org/fhir/Patient/9/_history/3"}) == (
        {absolute}, {absolute})
    urn = (None, None, None, "urn:uuid:7f0c2a0e-6b1e-4f1e-9d4c-0c9f3f1e2b3a", None, None)
    assert refs({"reference": urn[3]}) == (set(), {urn})
    logical = (None, None, None, None, "urn:oid:1.2.3", "MRN-1")
    assert refs({"type": "Patient", "identifier": {"system": "urn:oid:1.2.3", "value": "MRN-1"}}
                ) == ({logical}, {logical})
    assert refs({"identifier": {"system": "urn:oid:1.2.3", "value": "MRN-1"}}) == (
        set(), {logical})
    assert refs({"reference": "#p1"}) == (set(), set())


# --------------------------------------------------------------------------- other pathway types


def test_encounter(ix: Indexer) -> None:
    out = ix.extract({
        "resourceType": "Encounter", "status": "in-progress",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": "Patient/p1"},
        "participant": [{"individual": {"reference": "Practitioner/pr1"}},
                        {"individual": {"reference": "RelatedPerson/rp1"}}],
        "period": {"start": "2020-05-17T09:30:00+01:00"},
        "length": {"value": 90, "unit": "min", "system": "http://unitsofmeasure.org",
                   "code": "min"},
    })
    start = us(2020, 5, 17, 8, 30)
    assert rows(out, "sp_date", "date") == {(start, DATE_MAX)}
    assert rows(out, "sp_quantity", "length") == {
        ("http://unitsofmeasure.org", "min", "min", 90.0, 90.0)}
    assert rows(out, "sp_token", "class") == {
        ("http://terminology.hl7.org/CodeSystem/v3-ActCode", "AMB", None)}
    assert rows(out, "sp_reference", "practitioner") == {
        ("Practitioner", "pr1", None, None, None, None)}
    assert rows(out, "sp_reference", "participant") == {
        ("Practitioner", "pr1", None, None, None, None),
        ("RelatedPerson", "rp1", None, None, None, None),
    }
    assert rows(out, "sp_reference", "patient") == {("Patient", "p1", None, None, None, None)}


def test_task(ix: Indexer) -> None:
    out = ix.extract({
        "resourceType": "Task", "status": "requested", "intent": "order",
        "focus": {"reference": "ServiceRequest/sr1/_history/2"},
        "for": {"reference": "Group/g1"},
        "owner": {"reference": "Organization/o1",
                  "identifier": {"system": "http://example.org/org", "value": "O-1"}},
        "requester": {"reference": "PractitionerRole/r1"},
        "authoredOn": "2020-01-01T12:00:00Z",
        "executionPeriod": {"start": "2020-01-02", "end": "2020-01-03"},
        "businessStatus": {"text": "Waiting"},
    })
    assert rows(out, "sp_reference", "focus") == {
        ("ServiceRequest", "sr1", "2", None, None, None)}
    assert rows(out, "sp_reference", "owner") == {
        ("Organization", "o1", None, None, "http://example.org/org", "O-1")}
    assert rows(out, "sp_reference", "subject") == {("Group", "g1", None, None, None, None)}
    assert rows(out, "sp_reference", "patient") == set()  # Task.for.where(resolve() is Patient)
    assert rows(out, "sp_reference", "requester") == {
        ("PractitionerRole", "r1", None, None, None, None)}
    t = us(2020, 1, 1, 12)
    assert rows(out, "sp_date", "authored-on") == {(t, t + 999_999)}
    assert rows(out, "sp_date", "period") == {(us(2020, 1, 2), us(2020, 1, 4) - 1)}
    assert rows(out, "sp_token", "business-status") == {(None, None, "waiting")}


def test_service_request(ix: Indexer) -> None:
    out = ix.extract({
        "resourceType": "ServiceRequest", "status": "active", "intent": "order",
        "subject": {"reference": "Patient/p1"},
        "requester": {"reference": "http://example.org/fhir/Practitioner/pr9"},
        "performer": [{"reference": "Organization/o1"}, {"reference": "CareTeam/ct1"},
                      {"identifier": {"value": "perf-7"}}],
        "instantiatesCanonical": ["http://example.org/fhir/PlanDefinition/pd1|2.0",
                                  "ActivityDefinition/ad1"],
        "occurrenceTiming": {"event": ["2020-06-01"]},
        "authoredOn": "2020-05-31",
    })
    assert rows(out, "sp_reference", "requester") == {
        (None, None, None, "http://example.org/fhir/Practitioner/pr9", None, None)}
    assert rows(out, "sp_reference", "performer") == {
        ("Organization", "o1", None, None, None, None),
        ("CareTeam", "ct1", None, None, None, None),
        (None, None, None, None, None, "perf-7"),
    }
    assert rows(out, "sp_reference", "instantiates-canonical") == {
        (None, None, None, "http://example.org/fhir/PlanDefinition/pd1", None, None),
        ("ActivityDefinition", "ad1", None, None, None, None),
    }
    assert rows(out, "sp_uri", "instantiates-uri") == set()
    assert rows(out, "sp_date", "occurrence") == {(us(2020, 6, 1), us(2020, 6, 2) - 1)}
    assert rows(out, "sp_reference", "patient") == {("Patient", "p1", None, None, None, None)}


def test_condition_onset_choices(ix: Indexer) -> None:
    out = ix.extract({"resourceType": "Condition", "onsetAge": {
        "value": 52, "unit": "yr", "system": "http://unitsofmeasure.org", "code": "a"},
        "abatementRange": {"low": {"value": 1, "code": "a"}, "high": {"value": 3}}})
    assert rows(out, "sp_quantity", "onset-age") == {
        ("http://unitsofmeasure.org", "a", "yr", 52.0, 52.0)}
    assert rows(out, "sp_quantity", "abatement-age") == {(None, "a", None, 1.0, 3.0)}
    assert rows(out, "sp_date", "onset-date") == set()  # an Age is no date
    out = ix.extract({"resourceType": "Condition", "onsetString": "Childhood",
                      "abatementDateTime": "2019-07"})
    assert rows(out, "sp_string", "onset-info") == {("childhood", "Childhood")}
    assert rows(out, "sp_date", "abatement-date") == {(us(2019, 7, 1), us(2019, 8, 1) - 1)}


def test_numbers_and_money(ix: Indexer) -> None:
    ra = fjson.loads(b'{"resourceType": "RiskAssessment", "prediction": ['
                     b'{"probabilityDecimal": 0.250}, '
                     b'{"probabilityRange": {"low": {"value": 0.1}}}]}')
    out = ix.extract(ra)
    assert rows(out, "sp_number", "probability") == {(0.25, 0.25), (0.1, NUM_MAX)}
    out = ix.extract({"resourceType": "ChargeItem", "factorOverride": Decimal("0.8"),
                      "priceOverride": {"value": Decimal("40.00"), "currency": "EUR"}})
    assert rows(out, "sp_number", "factor-override") == {(0.8, 0.8)}
    assert rows(out, "sp_quantity", "price-override") == {(ISO4217, "EUR", None, 40.0, 40.0)}
    # booleans are not numbers, strings are not quantities
    out = ix.extract({"resourceType": "ChargeItem", "factorOverride": True,
                      "priceOverride": {"value": "40", "currency": "EUR"}})
    assert rows(out, "sp_number", "factor-override") == set()
    assert rows(out, "sp_quantity", "price-override") == set()


def test_bundle_composition(ix: Indexer) -> None:
    out = ix.extract({"resourceType": "Bundle", "type": "document",
                      "identifier": {"system": "urn:ietf:rfc:3986", "value": "urn:uuid:1"},
                      "meta": {"tag": [{"code": "t"}]},
                      "entry": [{"resource": {"resourceType": "Composition", "id": "c1"}},
                                {"resource": {"resourceType": "Patient", "id": "p1"}}]})
    assert rows(out, "sp_reference", "composition") == {
        ("Composition", "c1", None, None, None, None)}
    assert rows(out, "sp_token", "identifier") == {("urn:ietf:rfc:3986", "urn:uuid:1", None)}
    assert rows(out, "sp_token", "_tag") == {(None, "t", None)}


def test_careplan_timing(ix: Indexer) -> None:
    out = ix.extract({"resourceType": "CarePlan", "activity": [
        {"detail": {"scheduledTiming": {"repeat": {"boundsPeriod": {"start": "2021-01-01"}}}}},
        {"detail": {"scheduledString": "daily"}},
        {"detail": {"scheduledPeriod": {"start": "2021-02-01", "end": "2021-02-28"}}},
    ]})
    assert rows(out, "sp_date", "activity-date") == {
        (us(2021, 1, 1), DATE_MAX), (us(2021, 2, 1), us(2021, 3, 1) - 1)}


# --------------------------------------------------------------------------- custom definitions


def _indexer_with(*params: dict[str, Any]) -> Indexer:
    base = Indexer.from_profiles()
    sds: list[dict[str, Any]] = json.loads(
        (Path(__file__).parents[2] / "profiles" / "r4" / "Bundle-r4-structure-definitions.json")
        .read_text(encoding="utf-8"))["entry"]
    indexer = Indexer([{"resourceType": "SearchParameter", "url": f"http://x/{p['code']}",
                        **p} for p in params], [e["resource"] for e in sds])
    assert base.resource_types == indexer.resource_types
    indexer.raise_errors = True
    return indexer


def test_shared_expression_restricted_to_resource_type() -> None:
    indexer = _indexer_with({"code": "shared", "base": ["Patient", "Practitioner"],
                             "type": "token",
                             "expression": "Patient.gender | Practitioner.active"})
    pat = indexer.extract({"resourceType": "Patient", "gender": "female", "active": True})
    assert pat["sp_token"] == [("shared", None, "female", None)]
    pra = indexer.extract({"resourceType": "Practitioner", "gender": "female", "active": True})
    assert pra["sp_token"] == [("shared", None, "true", None)]
    assert indexer.fallbacks() == []


def test_fallback_to_fhirpathpy() -> None:
    indexer = _indexer_with({"code": "dutch-phone", "base": ["Patient"], "type": "token",
                             "expression": "Patient.telecom.where(value.startsWith('+31'))"})
    (fb,) = indexer.fallbacks()
    assert (fb.resource_type, fb.code) == ("Patient", "dutch-phone")
    assert "startsWith" in fb.reason
    out = indexer.extract({"resourceType": "Patient", "telecom": [
        {"system": "phone", "value": "+31 20 123"}, {"system": "phone", "value": "+44 1"}]})
    assert out["sp_token"] == [("dutch-phone", "phone", "+31 20 123", None)]


def test_extension_and_relative_expressions() -> None:
    indexer = _indexer_with(
        {"code": "mmn", "base": ["Patient"], "type": "string",
         "expression": "Patient.extension('http://x/mmn')"},
        {"code": "race", "base": ["Patient"], "type": "token",
         "expression": "Patient.extension('http://x/race').value"},
        {"code": "rel", "base": ["Patient"], "type": "token", "expression": "gender"},
    )
    out = indexer.extract({"resourceType": "Patient", "gender": "other", "extension": [
        {"url": "http://x/mmn", "valueString": "Smith"},
        {"url": "http://x/race", "valueCoding": {"system": "urn:r", "code": "2106-3"}},
        {"url": "http://x/other", "valueString": "ignored"},
    ]})
    assert out["sp_string"] == [("mmn", "smith", "Smith")]
    assert set(out["sp_token"]) == {("race", "urn:r", "2106-3", None),
                                    ("rel", None, "other", None)}
    assert indexer.fallbacks() == []


# --------------------------------------------------------------------------- R4 examples


def test_fallback_count(ix: Indexer) -> None:
    """Few (here: no) R4 expressions of the pathway types need the fhirpathpy fallback."""
    types = sorted({r["resourceType"] for r in load_examples()})
    total = sum(
        len([p for p in split_union(sp.expression)
             if root_name(p) in (rt, "Resource", "DomainResource")])
        for rt in types for sp in ix.params_for(rt).values()
        if sp.expression and sp.table and sp.code not in ("_id", "_lastUpdated")
    )
    fallbacks = ix.fallbacks(types)
    print(f"\nfallbacks: {len(fallbacks)} of {total} expression parts over {len(types)} types")
    for fb in fallbacks:
        print(" ", fb)
    assert total > 500
    assert len(fallbacks) <= 0.05 * total
    # ... and over every R4 resource type
    assert len(ix.fallbacks()) <= 0.05 * total


def _check_row_shapes(out: dict[str, list[tuple[Any, ...]]]) -> None:
    for table, table_rows in out.items():
        assert len(table_rows) == len(set(table_rows)), table
        for row in table_rows:
            assert isinstance(row[0], str)
            if table == "sp_string":
                assert len(row) == 3 and row[1] and row[1] == normalize_string(row[1])
            elif table == "sp_token":
                assert len(row) == 4 and any(x is not None for x in row[1:])
            elif table == "sp_date":
                assert len(row) == 3 and isinstance(row[1], int) and isinstance(row[2], int)
                assert row[1] <= row[2] or row[1] > DATE_MIN  # reversed periods happen
            elif table in ("sp_number", "sp_quantity"):
                lo, hi = row[-2], row[-1]
                assert isinstance(lo, float) and isinstance(hi, float)
            elif table == "sp_reference":
                assert len(row) == 7 and any(x is not None for x in row[1:])
                assert (row[1] is None) == (row[2] is None)
            elif table == "sp_uri":
                assert len(row) == 2 and row[1]


def test_extract_all_examples(ix: Indexer) -> None:
    examples = load_examples()
    assert len(examples) > 300
    counts = dict.fromkeys(TABLES, 0)
    n = 0
    for example in examples:
        for resource in with_bundle_entries(example):
            out = ix.extract(resource)
            _check_row_shapes(out)
            for table, table_rows in out.items():
                counts[table] += len(table_rows)
            n += 1
    assert n > 400
    assert all(counts[t] > 0 for t in TABLES), counts


def test_extract_some_parameters_gives_their_rows_of_the_whole(ix: Indexer) -> None:
    """``extract(resource, codes)`` is the whole extraction cut down to ``codes``."""
    checked = 0
    for example in load_examples():
        for resource in with_bundle_entries(example):
            whole = ix.extract(resource)
            codes = sorted({r[0] for table_rows in whole.values() for r in table_rows})
            for some in (frozenset(codes[::2]), frozenset(codes[1::3]), frozenset({"patient"})):
                part = ix.extract(resource, some)
                assert set(part) == set(whole)
                for table, table_rows in whole.items():
                    assert part[table] == [r for r in table_rows if r[0] in some], table
                checked += 1
    assert checked > 1200
    assert ix.extract({"resourceType": "Observation"}, frozenset()) == {t: [] for t in TABLES}


# Independent readings of fhirpathpy results, per parameter type.
_REF = re.compile(r"([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]+)?")
# an absolute RESTful url: names a resource elsewhere, kept as base/Type/id
_ABS = re.compile(r"(.+://.+?)/([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]+)?")


def _expected(param_type: str, value: Any, out: set[str], types: frozenset[str]) -> None:
    if isinstance(value, dict) and "url" in value and "resourceType" not in value:  # Extension
        for key, inner in value.items():
            if key.startswith("value"):
                _expected(param_type, inner, out, types)
        return
    if param_type == "token":
        if isinstance(value, bool):
            out.add("true" if value else "false")
        elif isinstance(value, str):
            out.add(value)
        elif isinstance(value, dict):
            if "coding" in value:
                out.update(c["code"] for c in value["coding"] if "code" in c)
            elif "value" in value:
                out.add(value["value"])
            elif "code" in value:
                out.add(value["code"])
    elif param_type == "string":
        if isinstance(value, str):
            out.add(normalize_string(value)[:MAX_LEN])
        elif isinstance(value, dict):
            for key in ("family", "text", "city", "district", "state", "postalCode", "country"):
                if isinstance(value.get(key), str):
                    out.add(normalize_string(value[key]))
            for key in ("given", "prefix", "suffix", "line"):
                out.update(normalize_string(s) for s in value.get(key) or () if isinstance(s, str))
    elif param_type == "reference":
        if isinstance(value, dict):
            if "resourceType" in value:
                if "id" in value:
                    out.add(f"{value['resourceType']}/{value['id']}")
                return
            ref = value.get("reference")
            if isinstance(ref, str) and not ref.startswith("#"):
                _expected(param_type, ref, out, types)
            elif isinstance(value.get("identifier"), dict):
                out.add(f"identifier:{value['identifier'].get('value')}")
        elif isinstance(value, str) and not value.startswith("#"):
            text = value.split("|")[0]
            m, a = _REF.fullmatch(text), _ABS.fullmatch(text)
            if m and m[1] in types:
                out.add(f"{m[1]}/{m[2]}")
            else:
                out.add(f"{a[1]}/{a[2]}/{a[3]}" if a and a[2] in types else text)


def _got(param_type: str, row: tuple[Any, ...]) -> str | None:
    """The comparable part of an index row (including its param column)."""
    if param_type == "token":
        return row[2]  # type: ignore[no-any-return]
    if param_type == "string":
        return row[1]  # type: ignore[no-any-return]
    _, target_type, target_id, _, url, _, ident_value = row
    if target_type is not None:
        return f"{target_type}/{target_id}"
    return url if url is not None else f"identifier:{ident_value}"


def test_examples_agree_with_fhirpathpy(ix: Indexer) -> None:
    """For token/reference/string params, the compiled accessors find the same codes,
    references and strings as fhirpathpy evaluating the same expression."""
    compiled: dict[tuple[str, str], Any] = {}
    checked = nonempty = 0
    mismatches: list[str] = []
    for resource in load_examples():
        rt = resource["resourceType"]
        out = ix.extract(resource)
        for code, sp in ix.params_for(rt).items():
            if sp.type not in ("token", "reference", "string") or not sp.expression:
                continue
            if code in ("_id", "_lastUpdated"):
                continue
            expected: set[str] = set()
            for part in split_union(sp.expression):
                root = root_name(part)
                if root is not None and root[:1].islower():
                    # relative to the resource (R4 writes InsurancePlan's name as
                    # "name | alias"): FHIRPath evaluates it on the resource
                    part, root = f"{rt}.{part}", rt
                if root not in (rt, "Resource", "DomainResource"):
                    continue
                # fhirpathpy does not treat "Resource." as a type filter, and its `as`
                # yields nothing on a collection of more than one item
                part = re.sub(r"^(Resource|DomainResource)\.", rt + ".", part)
                part = re.sub(r"\(([A-Za-z.]+) as (\w+)\)", r"\1.ofType(\2)", part)
                key = (rt, part)
                if key not in compiled:
                    compiled[key] = _fallback_getter(part, ix.resource_types)
                for value in compiled[key]([resource]):
                    _expected(sp.type, value, expected, ix.resource_types)
            expected.discard("")
            if rt == "Bundle" and code in EMBEDDED:
                # Bundle.entry[0].resource: the first resource when it has the
                # parameter's target type (Composition, MessageHeader)
                expected = {v for v in expected if v.startswith(f"{EMBEDDED[code]}/")}
            codes = sp.stored_as or (code,)  # a union of others: their rows
            got = {_got(sp.type, r) for r in out[sp.table or ""] if r[0] in codes} - {None}
            checked += 1
            nonempty += bool(expected)
            if got != expected:
                mismatches.append(f"{rt}/{resource.get('id')} {code}: fhirpathpy-only "
                                  f"{sorted(expected - got)[:3]} indexer-only "
                                  f"{sorted(str(g) for g in got - expected)[:3]}")
    assert checked > 5000 and nonempty > 1500
    assert mismatches == [], "\n".join(mismatches)


def test_a_bundles_first_resource_is_indexed_under_the_bundle(ix: Indexer) -> None:
    """``Bundle.composition``/``message`` are the first entry itself (R4), not stored on
    its own: its rows go under ``composition.<param>``, references between entries by
    fullUrl resolved to the entry's Type/id; the reference row only under the parameter
    of its type."""
    document = {"resourceType": "Bundle", "id": "b", "type": "document", "entry": [
        {"fullUrl": "urn:uuid:c", "resource": {
            "resourceType": "Composition", "id": "c1", "status": "final",
            "type": {"coding": [{"system": "http://loinc.org", "code": "18842-5"}]},
            "subject": {"reference": "urn:uuid:p"}, "date": "2024-01-02",
            "author": [{"reference": "Practitioner/d"}], "title": "Entlassbrief"}},
        {"fullUrl": "urn:uuid:p", "resource": {"resourceType": "Patient", "id": "p1"}}]}
    rows = ix.extract(document)
    refs = {(r[0], r[1], r[2]) for r in rows["sp_reference"]}
    assert refs == {("composition", "Composition", "c1"),
                    ("composition.subject", "Patient", "p1"),
                    ("composition.patient", "Patient", "p1"),
                    ("composition.author", "Practitioner", "d")}
    assert ("composition.type", "http://loinc.org", "18842-5") in {
        r[:3] for r in rows["sp_token"]}
    assert {r[0] for r in rows["sp_string"]} == {"composition.title"}
    message = {"resourceType": "Bundle", "type": "message", "entry": [{"resource": {
        "resourceType": "MessageHeader", "id": "m1",
        "eventCoding": {"system": "urn:test:events", "code": "discharge"},
        "source": {"endpoint": "urn:test:his"}}}]}
    rows = ix.extract(message)
    assert {(r[0], r[1], r[2]) for r in rows["sp_reference"]} == {
        ("message", "MessageHeader", "m1")}
    assert ("message.event", "urn:test:events", "discharge") in {
        r[:3] for r in rows["sp_token"]}
    collection = {"resourceType": "Bundle", "type": "collection",
                  "entry": [{"resource": {"resourceType": "Patient", "id": "x"}}]}
    assert all(not r[0].startswith(("composition", "message"))
               for table in ix.extract(collection).values() for r in table)


def test_a_parameter_whose_expression_cannot_be_compiled_is_left_out(
        ix: Indexer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stored SearchParameter the compiler fails on (an integer beyond FHIRPath's,
    which Python does not even read past 4,300 digits; any other failure) is not
    indexed; the type's other parameters are, and nothing is raised."""
    from gateway.fhir.paths import Compiler

    def sp(code: str, expression: str) -> dict[str, Any]:
        return {"url": f"urn:test:{code}", "code": code, "base": ["Patient"],
                "type": "string", "expression": expression}

    failing = Compiler.compile

    def compile_(self: Compiler, expression: str) -> Any:
        if "failing" in expression:
            raise KeyError("failing")
        return failing(self, expression)

    monkeypatch.setattr(Compiler, "compile", compile_)
    with_them = ix.with_params([sp("huge", f"Patient.name[{'1' * 5000}].family"),
                                sp("big", "Patient.name[2147483648].family"),
                                sp("odd", "Patient.name.family.where($this = 'failing')"),
                                sp("fine", "Patient.name[0].family")])
    rows = with_them.extract({"resourceType": "Patient", "name": [{"family": "Muster"}]})
    assert {r[0] for r in rows["sp_string"]} >= {"fine", "family", "name"}
    assert not {"huge", "big", "odd"} & {r[0] for r in rows["sp_string"]}
    assert set(with_them.left_out("Patient")) == {"huge", "big", "odd"}
    assert with_them.left_out("Observation") == {}
