"""JSON that keeps FHIR's decimals as written.

FHIR ``decimal`` carries its precision in its text (``1.50`` is not ``1.5``;
https://hl7.org/fhir/R4/datatypes.html#decimal). ``orjson`` parses numbers to
binary floats, so a body that holds a number whose text a float would not
reproduce (trailing zeros, exponents, more than 15 significant digits, integers
beyond 64 bits) is parsed again with the standard library, keeping those
numbers as :class:`Decimal`, and :func:`dumps` writes them back verbatim.
Everything else takes the fast path.

What orjson refuses is judged before the standard library reads it, as it would
let through what the gateway must not keep: a body that is not UTF-8 (RFC 8259
8.1 and http.html: UTF-8 SHALL be used; ``json`` would read UTF-16 and raw
surrogates), and a number beyond a double (``1e309``; R4's decimal admits it,
but it could not be read back with the fast path, nor by most clients).
"""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from gateway.fhir.outcome import Code, FhirError

# A number literal: it follows ``:``, ``[`` or ``,`` and ends before ``,``, ``]`` or
# ``}`` (text inside strings rarely looks like that). No part of the pattern can
# match what another part gave back, so a long run of digits that turns out not
# to be a number costs one pass, not one per digit (no catastrophic backtracking).
_NUMBER = re.compile(rb"[:\[,]\s*-?([0-9]+(?:\.[0-9]+)?)([eE][-+]?[0-9]+)?(?=\s*[,\]}])")


def _lossy(raw: bytes) -> bool:
    """Whether ``raw`` holds a number literal a binary float would not write back the
    same: a fraction ending in 0, an exponent, or 16 or more digits."""
    for m in _NUMBER.finditer(raw):
        mantissa, exponent = m.group(1), m.group(2)
        if exponent or len(mantissa) >= 16 or (b"." in mantissa and mantissa[-1:] == b"0"):
            return True
    return False


# Escapes that may decode to what FHIR strings forbid: control characters other
# than tab/LF/CR (datatypes.html#string) and lone UTF-16 surrogates; and the
# noncharacters U+FFFE and U+FFFF, escaped or not, which XML cannot carry (a
# resource must be as writable in XML as in JSON).
_SUSPECT = re.compile(rb"\\u00[01][0-9a-fA-F]|\\[bf]|\\u[dD][89a-fA-F]|\\u[fF]{3}[eEfF]"
                      rb"|\xef\xbf[\xbe\xbf]")
_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


class Number(Decimal):
    """A decimal that remembers how it was written. One whose exponent is beyond
    what a decimal holds (19 digits or more: far beyond a double either way) is
    infinite, as :func:`beyond_double` then says."""

    __slots__ = ("text",)
    text: str

    def __new__(cls, text: str) -> Number:
        try:
            self = super().__new__(cls, text)
        except InvalidOperation:
            self = super().__new__(cls, "-Infinity" if text[:1] == "-" else "Infinity")
        self.text = text
        return self


def _default(obj: Any) -> Any:
    if isinstance(obj, Number):
        return orjson.Fragment(obj.text)
    if isinstance(obj, Decimal):
        return orjson.Fragment(str(obj))
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _big_int(text: str) -> int | Number:
    # (more than 20 digits is beyond 64 bits; int() of 4,300 or more would raise)
    value = int(text) if len(text) <= 20 else None
    return value if value is not None and -(2**63) <= value < 2**64 else Number(text)


def beyond_double(number: Decimal) -> bool:
    """A number whose magnitude a binary double cannot hold (it would read as
    infinity: orjson refuses such JSON, so a stored one could not be read back)."""
    return math.isinf(float(number))


def loads(data: bytes | str, *, stored: bool = False) -> Any:
    """Parse JSON; raise :class:`FhirError` on malformed input (GW-1001), on an
    object that repeats a property (GW-1034, json.html: property names SHALL be
    unique), on a body that is not UTF-8 (GW-1001; UTF-16 or UTF-32: GW-1008) and on
    a number beyond a double (GW-1022, naming where it is). ``stored``: content the
    store holds, where such a number (written before it was refused) is read."""
    raw = data.encode() if isinstance(data, str) else data
    text: str | bytes = raw
    try:
        value = orjson.loads(raw)
        # Compact JSON as orjson itself writes it (what most clients send) reads
        # back to the same bytes: every number kept its text, and no property was
        # repeated (one dropped would be missing). Otherwise only a document with a
        # float can have lost a digit; then look at the text.
        compact = _written_as_orjson(value, raw)
        exact = compact or not _has_float(value) or not _lossy(raw)
    except orjson.JSONDecodeError:
        # malformed, not UTF-8, or a number beyond a double (1e400): json decides
        # what it is once the text is known to be UTF-8
        compact = exact = False
        text = _utf8(raw)
    if not exact:
        huge: list[Number] = []

        # (without an exponent, a number needs 309 digits before its point to
        # reach 1.8e308: most are not looked at further)
        def number(literal: str) -> Number:
            n = Number(literal)
            if (not stored and ("e" in literal or "E" in literal or len(literal) > 308)
                    and beyond_double(n)):
                huge.append(n)
            return n

        def integer(literal: str) -> int | Number:
            n = _big_int(literal)
            if not stored and type(n) is Number and len(literal) > 308 and beyond_double(n):
                huge.append(n)
            return n

        try:
            value = json.loads(text, parse_float=number, parse_int=integer,
                               object_pairs_hook=_unique)
        except (ValueError, RecursionError) as exc:
            raise FhirError(Code.MALFORMED_JSON, str(exc)) from None
        if huge:
            where = _path_to(value, huge[0])
            raise FhirError(Code.INVALID_RESOURCE,
                            f"{where}: the number {_abridged(huge[0].text)} is beyond what"
                            " this server can keep (a double, at most about 1.8e308)",
                            (where,))
    elif not compact:  # (about twice orjson's parse, for what is not compact)
        try:
            json.loads(raw, object_pairs_hook=_unique)
        except RecursionError:  # (orjson reads 1,024 levels, json about 1,000)
            raise FhirError(Code.TOO_DEEP, "more levels than can be read") from None
    if _SUSPECT.search(raw):
        bad = first_forbidden(value)
        if bad is not None:
            raise FhirError(Code.INVALID_RESOURCE,
                            f"a string contains the forbidden character U+{ord(bad):04X}")
    return value


def _utf8(raw: bytes) -> str:
    """``raw`` as UTF-8 text (a byte order mark at the start is ignored, RFC 8259 8.1
    allows that); anything else is refused: the standard library would read UTF-16,
    UTF-32 and encoded surrogates (U+D800 as ED A0 80), none of which FHIR JSON is
    (http.html#mime-type: UTF-8 SHALL be used)."""
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in raw[:4]:
        # (JSON begins with two ASCII characters: in UTF-16/32 one of them has a zero byte)
        raise FhirError(Code.UNSUPPORTED_MEDIA_TYPE,
                        "JSON is exchanged in UTF-8 (RFC 8259 8.1, http.html#mime-type);"
                        " this body is UTF-16 or UTF-32")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FhirError(Code.MALFORMED_JSON,
                        f"the body is not valid UTF-8 ({exc.reason} at byte {exc.start});"
                        " http.html#mime-type: UTF-8 SHALL be used") from None
    return text[1:] if text[:1] == "\ufeff" else text


def _abridged(literal: str) -> str:
    if len(literal) <= 24:
        return literal
    return f"{literal[:12]}…{literal[-8:]} ({len(literal)} characters)"


def _path_to(value: Any, target: object) -> str:
    """Where ``target`` is in ``value``, as a FHIRPath-like expression rooted at the
    resource type (``Observation.valueQuantity.value``, ``Bundle.entry[0]…``)."""
    root = value.get("resourceType") if isinstance(value, dict) else None
    stack: list[tuple[Any, str]] = [(value, root if isinstance(root, str) else "$")]
    while stack:
        node, path = stack.pop()
        if node is target:
            return path
        if type(node) is dict:
            stack.extend((v, f"{path}.{k}") for k, v in node.items())
        elif type(node) is list:
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(node))
    return "$"


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise FhirError(Code.DUPLICATE_PROPERTY,
                                f"the property {name[:64]!r} appears twice in one object")
            seen.add(name)
    return value


class StoredDataError(RuntimeError):
    """A stored resource that is not valid JSON any more (damaged outside the gateway):
    the server's fault, not the request's."""


def loads_stored(data: bytes | str) -> Any:
    """:func:`loads` for what the store holds: malformed content is a
    :class:`StoredDataError` (an internal error), never a client's 400."""
    try:
        return loads(data, stored=True)
    except FhirError as exc:
        raise StoredDataError(f"stored content is not valid JSON: {exc}") from None


def loads_fast(data: bytes) -> Any:
    """Stored content, parsed as fast as orjson does, for readers that need its
    structure, not its decimals' text (floats, as orjson gives them). What orjson
    refuses, a number beyond a double stored before such numbers were refused, is
    read by :func:`loads_stored`."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return loads_stored(data)


def _written_as_orjson(value: Any, raw: bytes) -> bool:
    try:
        return orjson.dumps(value) == raw
    except orjson.JSONEncodeError:  # nested deeper than orjson writes (the limits refuse it)
        return False


def _has_float(value: Any) -> bool:
    stack = [value]
    pop, extend = stack.pop, stack.extend
    while stack:
        node = pop()
        kind = type(node)
        if kind is dict:
            extend(node.values())
        elif kind is list:
            extend(node)
        elif kind is float:
            return True
    return False


def first_forbidden(value: Any) -> str | None:
    """The first character FHIR strings may not hold, anywhere in ``value``."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            m = _FORBIDDEN.search(node)
            if m:
                return m.group()
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)
    return None


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, default=_default)


def dumps_pretty(obj: Any) -> bytes:
    return orjson.dumps(obj, default=_default, option=orjson.OPT_INDENT_2)


def depth_exceeds(obj: Any, limit: int) -> bool:
    """True when ``obj`` nests objects/arrays deeper than ``limit``."""
    return check_limits(obj, limit, None) is not None


def check_limits(obj: Any, max_depth: int, max_string: int | None) -> str | None:
    """Why ``obj`` exceeds the nesting or string-length limits, or None.

    Walks level by level, looking only at containers; strings only when
    ``max_string`` is given (a caller whose document is shorter than that in
    bytes can pass None: no string in it can be longer).
    """
    level = [obj]
    depth = 1
    while level:
        if depth > max_depth:
            return f"nesting deeper than {max_depth}"
        below: list[Any] = []
        add = below.append
        for node in level:
            kind = type(node)
            values = node.values() if kind is dict else node if kind is list else ()
            for v in values:
                vk = type(v)
                if vk is dict or vk is list:
                    add(v)
                elif max_string is not None and vk is str and len(v) > max_string:
                    return f"a string longer than {max_string} characters"
        level = below
        depth += 1
    return None
