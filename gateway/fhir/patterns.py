"""Regular expressions that come from clients, matched in linear time (RE2).

Patterns written by whoever stores a resource reach the gateway in three places:
``ValueSet.compose.include.filter`` with op ``regex``
(https://hl7.org/fhir/R4/codesystem-filter-operator.html#regex), FHIRPath
``matches()`` / ``replaceMatches()`` in the invariants of a stored profile or the
expression of a stored SearchParameter (http://hl7.org/fhirpath/N1/#matchesregex-string-boolean,
#replacematchesregex-string-substitution-string-string). Python's ``re`` backtracks:
``(a+)+b`` against thirty ``a`` takes minutes and holds the worker (and every request
it serves) that long. RE2 (https://github.com/google/re2/wiki/Syntax) matches in time
linear in the text, whatever the pattern, so no time limit is needed.

RE2 reads the syntax the FHIR and FHIRPath specifications describe (XML Schema
regular expressions, and FHIRPath's recommended PCRE dialect) except what cannot be
matched in linear time: backreferences (``\\1``) and look-around (``(?=``, ``(?!``,
``(?<=``, ``(?<!``). A pattern using them is refused as unsupported
(:class:`PatternError`), as an invalid one is. Other differences from Python's
``re``: ``\\z`` (not ``\\Z``) is the end of the text, and ``\\d``, ``\\w``, ``\\s``,
``\\b`` are ASCII classes (use ``\\p{Nd}``, ``\\pL``, ... for Unicode ones).

Importing this module also routes fhirpathpy's ``matches()`` and ``replaceMatches()``
through RE2 (:func:`_route_fhirpathpy`); ``gateway.fhir`` imports it first, so every
fhirpathpy evaluation in the gateway uses it.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import re2
from fhirpathpy.engine.invocations import invocation_registry
from fhirpathpy.engine.invocations.strings import ensure_string_singleton
from re2 import _re2

# fhirpathpy carries no annotations
_fhirpathpy_functions: Any = invocation_registry
_string_singleton: Any = ensure_string_singleton
_UNANCHORED = _re2.RE2.Anchor.UNANCHORED
_ANCHOR_BOTH = _re2.RE2.Anchor.ANCHOR_BOTH

#: compiled patterns kept per process (RE2 bounds each program to 8 MiB)
_CACHE = 128
#: FHIRPath substitution: ``$1`` .. ``$99`` (fhirpathpy's reading) or ``${name}``
_GROUP_REF = re.compile(r"\$(?:(\d{1,2})|\{([A-Za-z_][A-Za-z0-9_]*)\})")


class PatternError(ValueError):
    """The pattern is not a regular expression RE2 matches; ``str(exc)`` says why."""


@lru_cache(maxsize=_CACHE)
def compiled(pattern: str, *, dot_all: bool = False, captures: bool = False) -> Any:
    """``pattern`` compiled by RE2: ``dot_all`` lets ``.`` match a newline (FHIRPath's
    'single line' mode); ``captures`` keeps groups (only a substitution needs them,
    and matching without them is faster)."""
    options = re2.Options()
    options.log_errors = False
    options.dot_nl = dot_all
    options.never_capture = not captures
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        why = exc.args[0] if exc.args else exc
        why = why.decode("utf-8", "replace") if isinstance(why, bytes) else str(why)
        raise PatternError(f"regular expression '{pattern[:80]}' is not supported: {why} "
                           "(patterns are matched by RE2: no backreferences or "
                           "look-around)") from None


def _matched(rx: Any, anchor: Any, text: str) -> bool:
    # RE2::Match on the UTF-8 text, as re2's own search()/fullmatch() call it, without
    # their translation of every offset back to str positions (a yes/no needs none;
    # that translation made a short match 10 times slower)
    data = text.encode()
    return bool(rx._regexp.Match(anchor, data, 0, len(data))[0][0] != -1)


def search(pattern: str, text: str, *, dot_all: bool = False) -> bool:
    """Does ``pattern`` match somewhere in ``text``?"""
    return _matched(compiled(pattern, dot_all=dot_all), _UNANCHORED, text)


def fullmatch(pattern: str, text: str) -> bool:
    """Does ``pattern`` match all of ``text``? (XML Schema patterns are anchored.)"""
    return _matched(compiled(pattern), _ANCHOR_BOTH, text)


def replace_matches(pattern: str, text: str, substitution: str) -> str:
    """Every match of ``pattern`` in ``text`` replaced by ``substitution``, in which
    ``$n`` and ``${name}`` stand for the text a group matched (empty when it matched
    nothing); any other character is taken as it is."""
    refs = list(_GROUP_REF.finditer(substitution))
    rx = compiled(pattern, captures=bool(refs))
    if not refs:
        return str(rx.sub(lambda m: substitution, text))
    for ref in refs:
        index, name = ref.group(1), ref.group(2)
        if (index is not None and int(index) > rx.groups) or (
                name is not None and name not in rx.groupindex):
            raise PatternError(f"'{ref.group(0)}' names no group of '{pattern[:80]}'")

    def expand(m: Any) -> str:
        def group(ref: re.Match[str]) -> str:
            index, name = ref.group(1), ref.group(2)
            return str(m.group(int(index) if index is not None else name) or "")
        return _GROUP_REF.sub(group, substitution)

    return str(rx.sub(expand, text))


# fhirpathpy (a dependency) compiles matches()/replaceMatches() patterns with Python's
# re. Its function table (fhirpathpy.engine.invocations.invocation_registry, which
# every evaluation reads) is pointed here instead: one place, at import, no fork.


def _fp_matches(ctx: Any, coll: Any, regex: Any) -> Any:
    if not regex or not coll:
        return []
    return search(regex, _string_singleton(coll), dot_all=True)


def _fp_replace_matches(ctx: Any, coll: Any, regex: Any, repl: Any) -> Any:
    string = _string_singleton(coll)
    if isinstance(regex, list) or isinstance(repl, list):
        return []
    return replace_matches(regex, string, repl)


def _route_fhirpathpy() -> None:
    """fhirpathpy's own ``matches``/``replaceMatches`` less the pattern engine
    (fhirpathpy.engine.invocations.strings): same arity, same empty-input rules."""
    for name, fn in (("matches", _fp_matches), ("replaceMatches", _fp_replace_matches)):
        _fhirpathpy_functions[name]["fn"] = fn


_route_fhirpathpy()

__all__ = ["PatternError", "compiled", "fullmatch", "replace_matches", "search"]
