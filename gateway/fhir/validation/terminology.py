"""Offline ValueSet expansion into ``(system, code)`` sets.

Used twice: by ``scripts/build_r4_definitions.py`` to expand the R4 ValueSets
that R4 binds with strength *required* (written once into
``profiles/r4/Bundle-r4-required-valuesets.json``), and at start-up for the
gateway's own ``profiles/ValueSet-*.json`` over ``profiles/CodeSystem-*.json``.

Supported ``compose`` content (https://hl7.org/fhir/R4/valueset.html#compose):
``include``/``exclude`` of a whole code system, of a ``concept`` list, of
``valueSet`` imports, and ``filter`` with the ops ``is-a``, ``descendent-of``,
``is-not-a`` (property ``concept``), ``=`` and ``in`` on ``concept``/``code``/
``parent``/a concept property, and ``regex`` on ``code``. Anything else (an
external code system we do not hold, such as SNOMED CT as a whole, or an
unknown filter) raises :class:`Unexpandable` with the reason, and the caller
records it: a binding to an unexpandable ValueSet is not checked.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from gateway.fhir import patterns

Code = tuple[str, str]  # (system, code)


class Unexpandable(Exception):
    """The ValueSet cannot be expanded offline; ``str(exc)`` says why."""


def _canonical(url: str) -> str:
    return url.split("|", 1)[0]


def _walk(concepts: list[dict[str, Any]], parent: str | None = None
          ) -> Iterator[tuple[dict[str, Any], str | None]]:
    for c in concepts:
        yield c, parent
        yield from _walk(c.get("concept", []) or [], c.get("code"))


class CodeSystemIndex:
    """The concepts of one CodeSystem with their hierarchy (nesting or ``parent``)."""

    def __init__(self, cs: dict[str, Any]) -> None:
        self.url: str = cs["url"]
        self.content: str = cs.get("content", "complete")
        self.concepts: dict[str, dict[str, Any]] = {}
        self.children: dict[str, list[str]] = {}
        for concept, parent in _walk(cs.get("concept", []) or []):
            code = concept.get("code")
            if not isinstance(code, str):
                continue
            self.concepts[code] = concept
            parents = [parent] if parent else []
            for prop in concept.get("property", []) or []:
                if prop.get("code") in ("parent", "subsumedBy") and "valueCode" in prop:
                    parents.append(prop["valueCode"])
            for p in parents:
                self.children.setdefault(p, []).append(code)

    def descendants(self, code: str) -> set[str]:
        out: set[str] = set()
        stack = list(self.children.get(code, []))
        while stack:
            c = stack.pop()
            if c not in out:
                out.add(c)
                stack.extend(self.children.get(c, []))
        return out

    def property_values(self, code: str, prop: str) -> list[str]:
        concept = self.concepts.get(code, {})
        values: list[str] = []
        for p in concept.get("property", []) or []:
            if p.get("code") == prop:
                values.extend(str(v) for k, v in p.items() if k.startswith("value"))
        return values

    def parents_of(self, code: str) -> set[str]:
        return {p for p, kids in self.children.items() if code in kids}


class Expander:
    """Expands ValueSets against the code systems and value sets it was given."""

    def __init__(self, code_systems: Mapping[str, dict[str, Any]],
                 value_sets: Mapping[str, dict[str, Any]],
                 expansions: Mapping[str, frozenset[Code]] | None = None) -> None:
        self._cs_raw = {_canonical(k): v for k, v in code_systems.items()}
        self._vs = {_canonical(k): v for k, v in value_sets.items()}
        self._cs: dict[str, CodeSystemIndex] = {}
        self._done: dict[str, frozenset[Code]] = dict(expansions or {})

    def code_system(self, url: str) -> CodeSystemIndex:
        url = _canonical(url)
        idx = self._cs.get(url)
        if idx is None:
            raw = self._cs_raw.get(url)
            if raw is None:
                raise Unexpandable(f"code system {url} is not available offline")
            if raw.get("content", "complete") not in ("complete", "fragment"):
                raise Unexpandable(f"code system {url} has content '{raw.get('content')}'")
            idx = self._cs[url] = CodeSystemIndex(raw)
        return idx

    def expand(self, url: str, _stack: tuple[str, ...] = ()) -> frozenset[Code]:
        url = _canonical(url)
        done = self._done.get(url)
        if done is not None:
            return done
        if url in _stack:
            raise Unexpandable(f"value set {url} imports itself")
        vs = self._vs.get(url)
        if vs is None:
            raise Unexpandable(f"value set {url} is not available offline")
        result = self.expand_resource(vs, (*_stack, url))
        self._done[url] = result
        return result

    def expand_resource(self, vs: dict[str, Any], _stack: tuple[str, ...] = ()
                        ) -> frozenset[Code]:
        compose = vs.get("compose")
        if not isinstance(compose, dict):
            contains = vs.get("expansion", {}).get("contains")
            if contains:
                return frozenset(_contains(contains))
            raise Unexpandable(f"value set {vs.get('url')} has no compose")
        included: set[Code] = set()
        for inc in compose.get("include", []) or []:
            included |= self._part(inc, _stack)
        for exc in compose.get("exclude", []) or []:
            included -= self._part(exc, _stack)
        return frozenset(included)

    def _part(self, inc: dict[str, Any], stack: tuple[str, ...]) -> set[Code]:
        system = inc.get("system")
        sets: list[set[Code]] = [set(self.expand(v, stack)) for v in inc.get("valueSet", []) or []]
        if system:
            if inc.get("concept"):
                codes = {(system, c["code"]) for c in inc["concept"] if "code" in c}
            else:
                cs = self.code_system(system)
                selected = set(cs.concepts)
                for f in inc.get("filter", []) or []:
                    selected &= _filter(cs, f)
                codes = {(system, c) for c in selected}
            sets.append(codes)
        if not sets:
            raise Unexpandable("include names neither a system nor a value set")
        out = sets[0]
        for s in sets[1:]:
            out &= s
        return out


def _filter(cs: CodeSystemIndex, f: dict[str, Any]) -> set[str]:
    op, prop, value = f.get("op"), f.get("property"), str(f.get("value", ""))
    if prop == "concept" and op == "is-a":
        return {value, *cs.descendants(value)} if value in cs.concepts else set()
    if prop == "concept" and op == "descendent-of":
        return cs.descendants(value)
    if prop == "concept" and op == "is-not-a":
        return set(cs.concepts) - {value, *cs.descendants(value)}
    if op == "regex" and prop == "code":
        try:
            return {c for c in cs.concepts if patterns.fullmatch(value, c)}
        except patterns.PatternError as exc:
            raise Unexpandable(str(exc)) from None
    if op in ("=", "in"):
        wanted = set(value.split(",")) if op == "in" else {value}
        if prop in ("concept", "code"):
            return wanted & set(cs.concepts)
        if prop == "parent":
            return {c for c in cs.concepts if cs.parents_of(c) & wanted}
        return {c for c in cs.concepts if set(cs.property_values(c, str(prop))) & wanted}
    raise Unexpandable(f"filter {prop} {op} {value} is not supported offline")


def _contains(items: list[dict[str, Any]]) -> Iterator[Code]:
    for c in items:
        if "code" in c and "system" in c:
            yield (c["system"], c["code"])
        yield from _contains(c.get("contains", []) or [])


def expansion_contains(vs: dict[str, Any]) -> frozenset[Code]:
    """The ``(system, code)`` pairs of an already expanded ValueSet."""
    return frozenset(_contains(vs.get("expansion", {}).get("contains", []) or []))
