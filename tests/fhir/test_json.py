"""gateway.fhir.json: decimals keep their text; forbidden characters are refused."""

from __future__ import annotations

import contextlib
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.fhir import json as fjson
from gateway.fhir.outcome import FhirError


@pytest.mark.parametrize("text", [
    b'{"v":1.50}', b'{"v":-0.10}', b'{"v":1e3}', b'{"v":1.0E-2}', b'{"v":[2.0,3.25]}',
    b'{"v":12345678901234567890123}', b'{"v":0.12345678901234567}', b'{"v":1.5}',
    b'{"v":100}', b'{"v":"1.50"}',
])
def test_numbers_are_written_back_as_received(text: bytes) -> None:
    assert fjson.dumps(fjson.loads(text)) == text


@pytest.mark.parametrize("text", [b"{", b"", b'{"a":}', b"[1,]", b"nan"])
def test_malformed_json_is_gw_1001(text: bytes) -> None:
    with pytest.raises(FhirError) as err:
        fjson.loads(text)
    assert err.value.code.gw == "GW-1001"


@pytest.mark.parametrize("text", [
    b'{"a":"x\\u0000"}', b'{"a":"\\u001f"}', b'{"a":"\\b"}', b'{"a":["\\f"]}',
    b'{"a":"\\ud800", "n": 1.50}',  # lone surrogate on the Decimal path
    b'{"a":"\\ud800"}',
])
def test_forbidden_characters_are_refused(text: bytes) -> None:
    with pytest.raises(FhirError) as err:
        fjson.loads(text)
    assert err.value.code.gw in ("GW-1022", "GW-1001")


def test_allowed_whitespace_and_escaped_backslashes_pass() -> None:
    assert fjson.loads(b'{"a":"\\t\\n\\r","b":"\\\\u0000"}') == {"a": "\t\n\r", "b": "\\u0000"}


def test_deeper_than_orjson_writes_still_parses() -> None:
    # orjson reads 1,024 levels but writes 255: the compact-text shortcut must not fail
    deep = b'{"a":' * 300 + b"1.50" + b"}" * 300
    value = fjson.loads(deep)
    assert fjson.depth_exceeds(value, 64)
    assert fjson.loads(b"[" * 300 + b"]" * 300)


def test_depth_limit() -> None:
    assert fjson.depth_exceeds(fjson.loads(b"[" * 10 + b"]" * 10), 9)
    assert not fjson.depth_exceeds(fjson.loads(b"[" * 10 + b"]" * 10), 10)


fhir_text = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | fhir_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(fhir_text, inner, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_round_trip_is_stable(value: object) -> None:
    once = fjson.dumps(value)
    assert fjson.dumps(fjson.loads(once)) == once


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    with contextlib.suppress(FhirError):
        fjson.loads(data)


def test_compact_bodies_read_back_exact_and_others_keep_their_text() -> None:
    # written as orjson writes it: floats are exact, no stdlib pass needed
    assert type(fjson.loads(b'{"v":[1.5,2]}')["v"][0]) is float
    # the same numbers, spaced or with a trailing zero, keep their text
    for text in (b'{"v": [1.50, 2]}', b'{ "v":[1.0E-2] }', b'{"a":"x","v":36.60}'):
        assert fjson.dumps(fjson.loads(text)).replace(b" ", b"") == text.replace(b" ", b"")


def test_limits_look_at_every_branch() -> None:
    deep = {"a": [1, {"b": "x"}], "c": {"d": {"e": [[{"f": "y" * 20}]]}}}
    assert fjson.check_limits(deep, 6, None) is None
    assert fjson.check_limits(deep, 5, None) == "nesting deeper than 5"
    assert fjson.check_limits(deep, 6, 19) == "a string longer than 19 characters"
    assert fjson.check_limits(deep, 6, 20) is None
    assert fjson.check_limits(["z" * 30], 6, 29) == "a string longer than 29 characters"


def test_digits_in_text_that_are_no_number_are_read_in_one_pass() -> None:
    # ":" and a long run of digits inside a string, in a body with a decimal that is
    # not written as orjson writes it: the number scan must give up in one pass (a
    # backtracking pattern took minutes for this; it is one body among many here)
    text = ":" + "1" * 100_000 + "x"
    body = ('{"resourceType": "Observation", "valueQuantity": {"value": 1.50},'
            f' "note": [{{"text": "{text}"}}]}}').encode()
    value = fjson.loads(body)
    assert value["note"][0]["text"] == text
    assert fjson.dumps(value["valueQuantity"]) == b'{"value":1.50}'


@pytest.mark.parametrize("text", [
    b'{"resourceType":"Patient","active":true,"active":false}',  # compact
    b'{"resourceType": "Patient", "active": true, "active": false}',
    b'{\n  "resourceType": "Patient",\n  "name": [{"given": ["A"]},'
    b' {"given": ["B"], "given": ["C"]}]\n}',
    # decimals kept
    b'{"resourceType": "Observation", "valueQuantity": {"value": 1.50, "value": 2}}',
    b'{"resourceType":"Patient","_birthDate":{"id":"a"},"_birthDate":{"id":"b"}}',
    b'{"a": 1, "\\u0061": 2}',  # the same name, escaped
])
def test_a_repeated_property_is_refused(text: bytes) -> None:
    """json.html: "Property names SHALL be unique"; which copy a reader keeps is its own
    choice (HAPI FHIR's kept the last), so a gateway between systems refuses them."""
    with pytest.raises(FhirError) as err:
        fjson.loads(text)
    assert err.value.code.gw == "GW-1034"
    assert err.value.status == 400


def test_the_same_name_in_different_objects_is_no_repeat() -> None:
    text = b'{"a": {"id": "1"}, "b": [{"id": "2"}, {"id": "3"}], "id": "4"}'
    assert fjson.loads(text) == {"a": {"id": "1"}, "b": [{"id": "2"}, {"id": "3"}], "id": "4"}
    assert fjson.loads(b"[" * 300 + b"]" * 300)  # deeper than orjson writes, read by json


def test_more_levels_than_can_be_read_are_too_deep() -> None:
    with pytest.raises(FhirError) as err:
        fjson.loads(b" " + b"[" * 1020 + b"]" * 1020)
    assert err.value.code.gw in ("GW-1001", "GW-1010")


@pytest.mark.parametrize(("text", "where"), [
    (b'{"resourceType":"Observation","valueQuantity":{"value":1e309}}',
     "Observation.valueQuantity.value"),
    (b'{"resourceType":"Observation","valueInteger":' + b"9" * 309 + b"}",
     "Observation.valueInteger"),
    (b'{"a":[1.50,' + b"1" * 5000 + b"]}", "$.a[1]"),  # beyond int()'s 4,300 digits
    (b'{"a":{"b":-1E400}}', "$.a.b"),
])
def test_numbers_beyond_a_double_are_refused_where_they_are(text: bytes, where: str) -> None:
    with pytest.raises(FhirError) as err:
        fjson.loads(text)
    assert (err.value.code.gw, err.value.expression) == ("GW-1022", (where,))
    # what is stored already is read (as written before such numbers were refused)
    assert fjson.dumps(fjson.loads_stored(text)) == text


def test_numbers_a_double_holds_are_kept() -> None:
    for text in (b'{"a":1.7976931348623157e308}', b'{"a":1e-400}', b'{"a":' + b"9" * 308 + b"}"):
        assert fjson.dumps(fjson.loads(text)) == text


@pytest.mark.parametrize("text", [
    b'{"a":"\xed\xa0\x80"}', b'{"\xed\xbf\xbf":1}', b'{"a":"\xed\xa0\x80","n":1.50}',
    b'{"a":"\xff"}', b'{"a":"\xc3"}',
])
def test_bodies_that_are_not_utf8_are_refused(text: bytes) -> None:
    with pytest.raises(FhirError) as err:
        fjson.loads(text)
    assert err.value.code.gw == "GW-1001" and "UTF-8" in str(err.value.diagnostics)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32",
                                      "utf-32-le", "utf-32-be"])
@pytest.mark.parametrize("text", ['{"a":"x"}', '{"a":"\\u0001"}', '{"a":"\\ud800"}',
                                  '{"a":"\\uffff"}', '["\\u0000"]', "1"])
def test_utf16_and_utf32_are_refused(text: str, encoding: str) -> None:
    with pytest.raises(FhirError) as err:
        fjson.loads(text.encode(encoding))
    assert err.value.code.gw == "GW-1008"


def test_a_utf8_byte_order_mark_is_ignored() -> None:
    assert fjson.loads(b'\xef\xbb\xbf{"a":"\xc3\xa9","n":1.50}') == {"a": "é", "n": Decimal("1.50")}
