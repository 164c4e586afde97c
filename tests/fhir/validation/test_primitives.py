"""R4 primitive types in JSON (gateway.fhir.validation.primitives)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from gateway.fhir import json as fjson
from gateway.fhir.validation.primitives import CHECKS

NUMBER_150 = fjson.loads(b'{"v":1.50}')["v"]
BIG = fjson.loads(b'{"v":12345678901234567890}')["v"]
EXPONENT = fjson.loads(b'{"v":1e2}')["v"]

GOOD: list[tuple[str, Any]] = [
    ("boolean", True), ("boolean", False),
    ("integer", 0), ("integer", -2147483648), ("integer", 2147483647),
    ("unsignedInt", 0), ("positiveInt", 1),
    ("decimal", 0), ("decimal", 1.5), ("decimal", NUMBER_150), ("decimal", EXPONENT),
    ("decimal", -3), ("decimal", Decimal("0.1")),
    ("string", "a"), ("string", " padded "), ("string", "multi\nline"), ("markdown", "# x"),
    ("code", "a"), ("code", "a b"), ("code", "http://x|1"),
    ("id", "a"), ("id", "A-1.2"), ("id", "x" * 64),
    ("uri", "http://example.org"), ("uri", "urn:uuid:x"), ("uri", "#a"), ("url", "http://x"),
    ("canonical", "http://x/StructureDefinition/y|1.0"),
    ("oid", "urn:oid:1.2.840.10008"), ("uuid", "urn:uuid:a5b6c7d8-0000-4000-8000-123456789abc"),
    ("base64Binary", "aGVsbG8="), ("base64Binary", "aGVs\nbG8="),
    ("date", "2024"), ("date", "2024-02"), ("date", "2024-02-29"),
    ("dateTime", "2024-02-29T23:59:59.999+14:00"), ("dateTime", "1905-08-23"),
    ("instant", "2015-02-07T13:28:17.239+02:00"), ("instant", "2015-02-07T13:28:17Z"),
    ("time", "23:59:59"), ("time", "00:00:00.5"),
]

BAD: list[tuple[str, Any]] = [
    ("boolean", "true"), ("boolean", 1), ("boolean", None),
    ("integer", 1.0), ("integer", "1"), ("integer", True), ("integer", 2147483648),
    ("integer", EXPONENT), ("integer", BIG), ("unsignedInt", -1), ("positiveInt", 0),
    ("decimal", "1.5"), ("decimal", True), ("decimal", float("nan")), ("decimal", float("inf")),
    ("string", ""), ("string", 1), ("string", "x" * (1024 * 1024 + 1)), ("markdown", ""),
    ("code", ""), ("code", " a"), ("code", "a "), ("code", "a  b"), ("code", "a\tb"),
    ("id", ""), ("id", "a_b"), ("id", "x" * 65), ("id", "a b"),
    ("uri", ""), ("uri", "http://x y"), ("url", " http://x"), ("canonical", 1),
    ("oid", "1.2.3"), ("oid", "urn:oid:3.1"), ("uuid", "urn:uuid:A5B6C7D8-0000-4000-8000-1234"),
    ("base64Binary", ""), ("base64Binary", "abc"), ("base64Binary", "ab=c"),
    ("base64Binary", "a$bc"),
    ("date", "2023-02-29"), ("date", "2024-04-31"), ("date", "2024-13"), ("date", "24-01-01"),
    ("date", "2024-01-01T00:00:00Z"), ("date", ""),
    ("dateTime", "2024-01-01T10:00"), ("dateTime", "2024-01-01T10:00:00"),
    ("dateTime", "2024-01-01T24:00:00Z"), ("dateTime", "2024-01-01T10:00:00+14:30"),
    ("instant", "2015-02-07"), ("instant", "2015-02-07T13:28:17"),
    ("time", "24:00:00"), ("time", "12:00"), ("time", "12:00:00Z"),
]


@pytest.mark.parametrize(("type_code", "value"), GOOD)
def test_valid_primitives_pass(type_code: str, value: Any) -> None:
    assert CHECKS[type_code](value) is None


@pytest.mark.parametrize(("type_code", "value"), BAD)
def test_invalid_primitives_are_named(type_code: str, value: Any) -> None:
    assert CHECKS[type_code](value) is not None
