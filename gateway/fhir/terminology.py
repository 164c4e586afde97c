"""Terminology operations, offline, over CodeSystems, ValueSets and ConceptMaps held in memory.

Pure: no I/O. :class:`Terminology` is built from conformance resources (the
gateway's ``profiles/*.json``, plus whatever a caller adds with
:meth:`Terminology.with_resources`) and answers the four R4 terminology
operations with the JSON the spec defines; failures raise
:class:`~gateway.fhir.outcome.FhirError` with a ``GW-43xx`` code.

* ``CodeSystem/$lookup`` -- https://hl7.org/fhir/R4/codesystem-operation-lookup.html
  (:meth:`Terminology.lookup` -> Parameters ``name``, ``version``, ``display``,
  ``designation``, ``property``)
* ``ValueSet/$expand`` -- https://hl7.org/fhir/R4/valueset-operation-expand.html
  (:meth:`Terminology.expand` -> ValueSet with ``expansion``; ``filter`` text,
  ``offset``/``count`` paging, ``total``)
* ``ValueSet/$validate-code`` and ``CodeSystem/$validate-code`` --
  https://hl7.org/fhir/R4/valueset-operation-validate-code.html
  (:meth:`Terminology.validate_code`, :meth:`Terminology.validate_code_in_system`
  -> Parameters ``result``, ``message``, ``display``)
* ``ConceptMap/$translate`` -- https://hl7.org/fhir/R4/conceptmap-operation-translate.html
  (:meth:`Terminology.translate` -> Parameters ``result``, ``message``,
  ``match`` with ``equivalence``, ``concept``, ``source``)

ValueSet ``compose`` support: ``include``/``exclude`` of whole code systems,
of ``concept`` lists and of ``valueSet`` imports (intersected with the system
part), ``filter`` with ``is-a``, ``descendent-of``, ``is-not-a``,
``generalizes`` (property ``concept``/``code``), ``=``, ``in``, ``not-in``,
``regex``, ``exists`` (on ``code``, ``display``, ``parent``, ``child`` or a
concept property). A code system that is not held, or held only as a
``fragment``, cannot be enumerated: expansions that need it are *unclosed*
(extension ``valueset-unclosed``, no ``total``), and membership is decided
from what can be decided offline (an enumerated concept, a ``regex`` on the
code) or reported as unknown.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from gateway.fhir import patterns
from gateway.fhir.outcome import Code, FhirError

Json = dict[str, Any]

UNCLOSED = "http://hl7.org/fhir/StructureDefinition/valueset-unclosed"
NOT_SELECTABLE_URI = "http://hl7.org/fhir/concept-properties#notSelectable"
MAX_EXPANSION = 10_000
_MAX_REGEX = 256
#: equivalence read backwards, for ``$translate`` with ``reverse=true``
_REVERSE = {"wider": "narrower", "narrower": "wider", "subsumes": "specializes",
            "specializes": "subsumes"}
_FAILED_MATCH = ("unmatched", "disjoint")

Key = tuple[str, str]  # (system, code)


def _canonical(url: str) -> tuple[str, str | None]:
    base, _, version = url.partition("|")
    return base, version or None


@lru_cache(maxsize=4)
def _fallback_index(load: Callable[[], Sequence[Json]]) -> dict[str, Json]:
    return {r["url"]: r for r in load() if isinstance(r.get("url"), str)}


def _regex_match(pattern: str, text: str) -> bool:
    """Does the ``regex`` filter ``pattern`` match all of ``text``? Matched by RE2, in
    time linear in the text (:mod:`gateway.fhir.patterns`): a pattern such as
    ``(a+)+b`` cannot hold the worker."""
    if len(pattern) > _MAX_REGEX:
        raise FhirError(Code.INVALID_TERMINOLOGY_REQUEST,
                        f"regex filter longer than {_MAX_REGEX} characters")
    try:
        return len(text) <= _MAX_REGEX and patterns.fullmatch(pattern, text)
    except patterns.PatternError as exc:
        raise FhirError(Code.INVALID_TERMINOLOGY_REQUEST, f"regex filter: {exc}") from None


def _parameters(*parts: Json | None) -> Json:
    return {"resourceType": "Parameters", "parameter": [p for p in parts if p is not None]}


def _bool_value(v: Any) -> bool:
    return v is True or (isinstance(v, str) and v.lower() == "true")


# ---------------------------------------------------------------------------
# code systems


class _CodeSystem:
    """One CodeSystem's concepts, hierarchy (nesting, ``parent``/``child`` properties)."""

    def __init__(self, cs: Json) -> None:
        self.resource = cs
        self.url: str = cs["url"]
        self.version: str | None = cs.get("version")
        self.name: str = cs.get("name") or cs.get("title") or self.url
        self.content: str = cs.get("content", "complete")
        self.case_sensitive = cs.get("caseSensitive", True) is not False
        self.concepts: dict[str, Json] = {}
        self.parents: dict[str, list[str]] = {}
        self.children: dict[str, list[str]] = {}
        self._folded: dict[str, str] = {}
        self._not_selectable = {p.get("code") for p in cs.get("property", []) or []
                                if p.get("uri") == NOT_SELECTABLE_URI} | {"notSelectable"}
        for concept, parent in self._walk(cs.get("concept", []) or [], None):
            code = concept["code"]
            self.concepts[code] = concept
            self._folded.setdefault(code.casefold(), code)
            if parent is not None:
                self._link(parent, code)
            for prop in concept.get("property", []) or []:
                if prop.get("code") == "parent" and isinstance(prop.get("valueCode"), str):
                    self._link(prop["valueCode"], code)
                elif prop.get("code") == "child" and isinstance(prop.get("valueCode"), str):
                    self._link(code, prop["valueCode"])

    def _walk(self, concepts: list[Json], parent: str | None) -> Iterator[tuple[Json, str | None]]:
        for c in concepts:
            if isinstance(c, dict) and isinstance(c.get("code"), str):
                yield c, parent
                yield from self._walk(c.get("concept", []) or [], c["code"])

    def _link(self, parent: str, child: str) -> None:
        if parent == child or parent in self.parents.get(child, []):
            return
        self.children.setdefault(parent, []).append(child)
        self.parents.setdefault(child, []).append(parent)

    @property
    def complete(self) -> bool:
        return self.content == "complete"

    @property
    def enumerable(self) -> bool:
        return self.content in ("complete", "fragment")

    def find(self, code: str) -> str | None:
        if code in self.concepts:
            return code
        return None if self.case_sensitive else self._folded.get(code.casefold())

    def ancestors(self, code: str) -> set[str]:
        """The codes above ``code`` (itself too when its parent links loop back to it)."""
        return self._closure(code, self.parents)

    def descendants(self, code: str) -> set[str]:
        """The codes below ``code``: those whose :meth:`ancestors` hold it, found in one
        walk down, not one walk up per code."""
        return self._closure(code, self.children)

    @staticmethod
    def _closure(code: str, links: dict[str, list[str]]) -> set[str]:
        out: set[str] = set()
        stack = list(links.get(code, []))
        while stack:
            c = stack.pop()
            if c not in out:
                out.add(c)
                stack.extend(links.get(c, []))
        return out

    def property_values(self, code: str, prop: str) -> list[str]:
        if prop == "parent":
            return list(self.parents.get(code, []))
        if prop == "child":
            return list(self.children.get(code, []))
        if prop == "display":
            display = self.concepts[code].get("display")
            return [display] if isinstance(display, str) else []
        values = []
        for p in self.concepts[code].get("property", []) or []:
            if p.get("code") == prop:
                for k, v in p.items():
                    if k.startswith("value"):
                        values.append(_scalar_text(v))
        return values

    def abstract(self, code: str) -> bool:
        return any(p.get("code") in self._not_selectable and _bool_value(p.get("valueBoolean"))
                   for p in self.concepts[code].get("property", []) or [])

    def inactive(self, code: str) -> bool:
        for p in self.concepts[code].get("property", []) or []:
            if p.get("code") == "inactive" and _bool_value(p.get("valueBoolean")):
                return True
            if p.get("code") == "status" and p.get("valueCode") in ("retired", "inactive"):
                return True
        return False

    def displays(self, code: str) -> list[str]:
        concept = self.concepts[code]
        out = [concept["display"]] if isinstance(concept.get("display"), str) else []
        out += [d["value"] for d in concept.get("designation", []) or []
                if isinstance(d.get("value"), str)]
        return out


def _scalar_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return str(v.get("code", ""))
    return str(v)


# ---------------------------------------------------------------------------
# expansion items


@dataclass(slots=True)
class _Item:
    system: str
    code: str
    version: str | None = None
    display: str | None = None
    abstract: bool = False
    inactive: bool = False
    designations: list[Json] = field(default_factory=list)

    def contains(self, include_designations: bool) -> Json:
        out: Json = {"system": self.system}
        if self.abstract:
            out["abstract"] = True
        if self.inactive:
            out["inactive"] = True
        if self.version:
            out["version"] = self.version
        out["code"] = self.code
        if self.display:
            out["display"] = self.display
        if include_designations and self.designations:
            out["designation"] = self.designations
        return out


@dataclass(slots=True)
class _Expansion:
    items: dict[Key, _Item]
    closed: bool = True
    versions: set[str] = field(default_factory=set)  # "system|version" used


class _Unexpandable(Exception):
    pass


class _TooLarge(Exception):
    """An include would take the expansion past :data:`MAX_EXPANSION` codes."""


#: is (system, code) in a value set or compose part? ``None``: cannot be decided offline
_Test = Callable[[str, str], "bool | None"]


def _lazy(make: Callable[[], _Test]) -> _Test:
    """The test ``make`` builds, built when first asked: what building it raises (a value
    set importing itself, one that cannot be expanded) is raised by the ask, as when each
    ask did all the work."""
    built: list[_Test] = []

    def test(system: str, code: str) -> bool | None:
        if not built:
            built.append(make())
        return built[0](system, code)

    return test


# ---------------------------------------------------------------------------
# the service


class Terminology:
    """Code systems, value sets and concept maps by canonical URL and by id."""

    def __init__(self, resources: Iterable[Mapping[str, Any]] = (),
                 fallback: Callable[[], Sequence[Json]] | None = None) -> None:
        """``fallback``: the code systems to look in when no resource held has the
        url asked for (R4's, read when first needed: a resource held, or stored
        here, with that url comes first)."""
        self._resources: list[Json] = []
        self._by_url: dict[tuple[str, str], list[Json]] = {}
        self._by_id: dict[tuple[str, str], Json] = {}
        # index per held resource, keyed by identity: the resources live as long as self
        self._systems: dict[int, _CodeSystem] = {}
        self._fallback = fallback
        for r in resources:
            self._add(r if isinstance(r, dict) else dict(r))

    def _add(self, r: Json) -> None:
        rt = r.get("resourceType")
        if rt not in ("CodeSystem", "ValueSet", "ConceptMap"):
            return
        self._resources.append(r)
        if isinstance(r.get("url"), str):
            self._by_url.setdefault((rt, r["url"]), []).append(r)
        if isinstance(r.get("id"), str):
            self._by_id.setdefault((rt, r["id"]), r)

    def with_resources(self, resources: Iterable[Mapping[str, Any]]) -> Terminology:
        """A new service over these resources and ``resources`` (own ones win on a clash)."""
        out = Terminology(self._resources, self._fallback)
        out._systems = dict(self._systems)  # same resource objects: their indexes stay valid
        for r in resources:
            r = r if isinstance(r, dict) else dict(r)
            url = r.get("url")
            if isinstance(url, str) and (r.get("resourceType"), url) in self._by_url:
                continue
            out._add(r)
        return out

    # -- resolution ------------------------------------------------------------

    def _find(self, resource_type: str, url: str, version: str | None = None) -> Json | None:
        base, pinned = _canonical(url)
        version = version or pinned
        for r in self._by_url.get((resource_type, base), []):
            if version is None or r.get("version") == version:
                return r
        if resource_type == "CodeSystem" and self._fallback is not None:
            held = _fallback_index(self._fallback).get(base)
            if held is not None and (version is None or held.get("version") == version):
                return held
        return None

    def code_system(self, url: str, version: str | None = None) -> Json | None:
        return self._find("CodeSystem", url, version)

    def value_set(self, url: str, version: str | None = None) -> Json | None:
        return self._find("ValueSet", url, version)

    def concept_map(self, url: str, version: str | None = None) -> Json | None:
        return self._find("ConceptMap", url, version)

    def resource(self, resource_type: str, id: str) -> Json | None:
        return self._by_id.get((resource_type, id))

    def code_systems(self) -> list[Json]:
        """The code systems held, as written (R4's among them, after the others)."""
        own = [r for r in self._resources if r["resourceType"] == "CodeSystem"]
        if self._fallback is None:
            return own
        urls = {r.get("url") for r in own}
        return own + [r for url, r in _fallback_index(self._fallback).items() if url not in urls]

    def concept_maps(self) -> list[Json]:
        return [r for r in self._resources if r["resourceType"] == "ConceptMap"]

    def _cs(self, url: str, version: str | None = None) -> _CodeSystem | None:
        raw = self.code_system(url, version)
        if raw is None:
            return None
        idx = self._systems.get(id(raw))
        if idx is None:
            idx = self._systems[id(raw)] = _CodeSystem(raw)
        return idx

    def missing(self, resource: Mapping[str, Any]) -> set[tuple[str, str]]:
        """``(resourceType, url)`` of what ``resource`` (a ValueSet) refers to and is not held,
        directly or through value sets that are held."""
        out: set[tuple[str, str]] = set()
        seen: set[int] = set()
        stack: list[Mapping[str, Any]] = [resource]
        while stack:
            vs = stack.pop()
            if id(vs) in seen:
                continue
            seen.add(id(vs))
            compose = vs.get("compose") or {}
            for part in [*(compose.get("include") or []), *(compose.get("exclude") or [])]:
                if isinstance(part.get("system"), str) and self.code_system(
                        part["system"], part.get("version")) is None:
                    out.add(("CodeSystem", part["system"]))
                for v in part.get("valueSet") or []:
                    held = self.value_set(v)
                    if held is None:
                        out.add(("ValueSet", v))
                    else:
                        stack.append(held)
        return out

    # -- $lookup -----------------------------------------------------------------

    def lookup(self, system: str, code: str, *, version: str | None = None,
               properties: Sequence[str] = ()) -> Json:
        cs = self._cs(system, version)
        if cs is None:
            which = f"{system}|{version}" if version else system
            raise FhirError(Code.UNKNOWN_CODE_SYSTEM, f"code system {which} is not known here")
        found = cs.find(code)
        if found is None:
            note = " (only a fragment of it is held here)" if not cs.complete else ""
            raise FhirError(Code.UNKNOWN_CODE,
                            f"code '{code}' is not in code system {cs.url}{note}")
        concept = cs.concepts[found]
        wanted = set(properties)

        def want(name: str) -> bool:
            return not wanted or name in wanted

        out: list[Json | None] = [
            {"name": "name", "valueString": cs.name},
            {"name": "version", "valueString": cs.version} if cs.version else None,
            {"name": "display", "valueString": concept.get("display") or found},
        ]
        if want("designation"):
            for d in concept.get("designation", []) or []:
                parts: list[Json] = []
                if d.get("language"):
                    parts.append({"name": "language", "valueCode": d["language"]})
                if d.get("use"):
                    parts.append({"name": "use", "valueCoding": d["use"]})
                parts.append({"name": "value", "valueString": d.get("value", "")})
                out.append({"name": "designation", "part": parts})
        props: list[tuple[str, str, Any]] = []
        if want("definition") and concept.get("definition"):
            props.append(("definition", "valueString", concept["definition"]))
        for p in concept.get("property", []) or []:
            if want(p.get("code", "")):
                for key, value in p.items():
                    if key.startswith("value"):
                        props.append((p["code"], key, value))
        if want("parent"):
            props += [("parent", "valueCode", c) for c in cs.parents.get(found, [])]
        if want("child"):
            props += [("child", "valueCode", c) for c in cs.children.get(found, [])]
        for name, key, value in props:
            parts = [{"name": "code", "valueCode": name}, {"name": "value", key: value}]
            if key == "valueCode" and cs.find(value) is not None and name in ("parent", "child"):
                display = cs.concepts[value].get("display")
                if display:
                    parts.append({"name": "description", "valueString": display})
            out.append({"name": "property", "part": parts})
        return _parameters(*out)

    # -- expansion -----------------------------------------------------------------

    def _expand(self, vs: Mapping[str, Any], stack: tuple[int, ...]) -> _Expansion:
        if id(vs) in stack:
            raise _Unexpandable(f"value set {vs.get('url')} imports itself")
        stack = (*stack, id(vs))
        compose = vs.get("compose")
        if not isinstance(compose, dict):
            expansion = vs.get("expansion")
            if isinstance(expansion, dict):
                return self._stored_expansion(expansion)
            raise _Unexpandable(f"value set {vs.get('url')} has neither compose nor expansion")
        out = _Expansion({})
        for part in compose.get("include", []) or []:
            try:
                got = self._include(part, stack, out.items)
            except _TooLarge:
                got = None
            if got is not None:
                out.closed &= got.closed
                out.versions |= got.versions
                for key, item in got.items.items():
                    out.items.setdefault(key, item)
            if got is None or len(out.items) > MAX_EXPANSION:
                raise FhirError(Code.EXPANSION_TOO_LARGE,
                                f"value set {vs.get('url')} has more than {MAX_EXPANSION} codes")
        for part in compose.get("exclude", []) or []:
            # one test for all the codes: what it needs (the set of an exclude's concepts,
            # the codes below a filter's target) is gathered once, not once a code
            excluded = self._part_test(part, stack)
            for key in list(out.items):
                if excluded(*key) is True:
                    del out.items[key]
        return out

    def _stored_expansion(self, expansion: Json) -> _Expansion:
        out = _Expansion({})

        def walk(items: list[Json]) -> None:
            for c in items:
                if isinstance(c.get("system"), str) and isinstance(c.get("code"), str):
                    out.items.setdefault((c["system"], c["code"]), _Item(
                        c["system"], c["code"], c.get("version"), c.get("display"),
                        bool(c.get("abstract")), bool(c.get("inactive")),
                        list(c.get("designation", []) or [])))
                walk(c.get("contains", []) or [])

        walk(expansion.get("contains", []) or [])
        out.closed = not any(e.get("url") == UNCLOSED and e.get("valueBoolean")
                             for e in expansion.get("extension", []) or [])
        return out

    def _include(self, part: Json, stack: tuple[int, ...],
                 taken: Mapping[Key, _Item]) -> _Expansion:
        """One include; raises :class:`_TooLarge` as soon as its codes and those ``taken``
        (the expansion's so far) are more than :data:`MAX_EXPANSION`."""
        imports = [self._import(v, stack) for v in part.get("valueSet", []) or []]
        system = part.get("system")
        if not isinstance(system, str):
            if not imports:
                raise _Unexpandable("an include names neither a system nor a value set")
            first, *rest = imports
            result = _Expansion({k: v for k, v in first.items.items()
                                 if all(k in r.items for r in rest)})
            result.closed = all(i.closed for i in imports)
            for i in imports:
                result.versions |= i.versions
            return result
        # the system's codes are counted only when they all stay: imports intersect them
        result = self._system_part(part, system, None if imports else taken)
        if imports:
            result.items = {k: v for k, v in result.items.items()
                            if all(self._in_expansion_or_unknown(i, k) for i in imports)}
            result.closed &= all(i.closed for i in imports)
        return result

    def _import(self, url: str, stack: tuple[int, ...]) -> _Expansion:
        vs = self.value_set(url)
        if vs is None:
            raise _Unexpandable(f"value set {url} is not known here")
        return self._expand(vs, stack)

    @staticmethod
    def _in_expansion_or_unknown(exp: _Expansion, key: Key) -> bool:
        return key in exp.items or not exp.closed

    def _system_part(self, part: Json, system: str,
                     taken: Mapping[Key, _Item] | None = None) -> _Expansion:
        """The codes of an include's system part. ``taken``: the expansion's codes so far,
        with which this part's may not be more than :data:`MAX_EXPANSION` (:class:`_TooLarge`
        once they are, not after a code system of a million codes has been listed)."""
        cs = self._cs(system, part.get("version"))
        out = _Expansion({})
        room = MAX_EXPANSION - len(taken) if taken is not None else 0

        def add(key: Key, item: _Item) -> None:
            nonlocal room
            if key in out.items:
                return
            if taken is not None and key not in taken:
                room -= 1
                if room < 0:
                    raise _TooLarge
            out.items[key] = item

        if cs is not None and cs.version:
            out.versions.add(f"{cs.url}|{cs.version}")
        concepts = part.get("concept")
        if concepts:
            for c in concepts:
                code = c.get("code")
                if not isinstance(code, str):
                    continue
                found = cs.find(code) if cs is not None else None
                if cs is not None and found is None and cs.complete:
                    continue  # not a code of the system: the value set is in error; skip it
                designations = list(c.get("designation", []) or [])
                if found is not None and cs is not None:
                    display = c.get("display") or cs.concepts[found].get("display")
                    designations += cs.concepts[found].get("designation", []) or []
                    item = _Item(system, found, part.get("version") or cs.version, display,
                                 cs.abstract(found), cs.inactive(found), designations)
                else:
                    item = _Item(system, code, part.get("version"), c.get("display"),
                                 designations=designations)
                add((system, item.code), item)
            return out
        if cs is None or not cs.enumerable:
            # codes cannot be listed; membership may still be decidable (regex on code)
            if not part.get("filter"):
                raise _Unexpandable(f"code system {system} is not available offline")
            out.closed = False
            return out
        tests = [_filter_test(cs, f) for f in part.get("filter", []) or []]
        for code in cs.concepts:
            if all(test(code) is True for test in tests):
                add((system, code), _Item(
                    system, code, cs.version, cs.concepts[code].get("display"),
                    cs.abstract(code), cs.inactive(code),
                    list(cs.concepts[code].get("designation", []) or [])))
        out.closed = cs.complete
        return out

    # -- membership ------------------------------------------------------------------
    #
    # Membership is decided by tests built once for a value set (or a compose part) and
    # asked for each code: an exclude asks about every code of the expansion, a search
    # about every code in use, so what a part needs is gathered once.

    def _member(self, vs: Mapping[str, Any], system: str, code: str,
                stack: tuple[int, ...] = ()) -> bool | None:
        """Is (system, code) in ``vs``? ``None``: cannot be decided offline."""
        return self._vs_test(vs, stack)(system, code)

    def _vs_test(self, vs: Mapping[str, Any], stack: tuple[int, ...]) -> _Test:
        """Is (system, code) in ``vs``? (See :meth:`_member`.)"""
        if id(vs) in stack:
            raise _Unexpandable(f"value set {vs.get('url')} imports itself")
        stack = (*stack, id(vs))
        compose = vs.get("compose")
        if not isinstance(compose, dict):
            exp = self._expand(vs, ())

            def in_expansion(system: str, code: str) -> bool | None:
                return True if (system, code) in exp.items else (False if exp.closed else None)

            return in_expansion
        includes = [self._part_test(part, stack) for part in compose.get("include", []) or []]
        excludes = [self._part_test(part, stack) for part in compose.get("exclude", []) or []]

        def member(system: str, code: str) -> bool | None:
            verdict: bool | None = False
            for included in includes:
                got = included(system, code)
                if got is True:
                    verdict = True
                    break
                if got is None:
                    verdict = None
            if verdict is not True:
                return verdict
            for excluded in excludes:
                got = excluded(system, code)
                if got is True:
                    return False
                if got is None:
                    verdict = None
            return verdict

        return member

    def _part_test(self, part: Json, stack: tuple[int, ...]) -> _Test:
        """Is (system, code) in the compose part ``part`` (an include or an exclude)?
        Built when first asked."""
        return _lazy(lambda: self._build_part_test(part, stack))

    def _build_part_test(self, part: Json, stack: tuple[int, ...]) -> _Test:
        tests: list[_Test] = []
        if isinstance(part.get("system"), str):
            tests.append(self._system_test(part))
        for url in part.get("valueSet", []) or []:
            tests.append(self._import_test(url, stack))

        def in_part(system: str, code: str) -> bool | None:
            if not tests:
                return False
            verdicts = [test(system, code) for test in tests]
            if any(v is False for v in verdicts):
                return False
            return True if all(v is True for v in verdicts) else None

        return in_part

    def _import_test(self, url: str, stack: tuple[int, ...]) -> _Test:
        vs = self.value_set(url)
        if vs is None:
            return lambda system, code: None
        return _lazy(lambda: self._vs_test(vs, stack))

    def _system_test(self, part: Json) -> _Test:
        """Is (system, code) in the system part of ``part``? The codes of its ``concept``
        list are put in a set, its filters built, when first asked about its system."""
        want = part["system"]
        built: list[_Test] = []

        def in_system_part(system: str, code: str) -> bool | None:
            if want != system:
                return False
            if not built:
                built.append(self._build_system_test(part, system))
            return built[0](system, code)

        return in_system_part

    def _build_system_test(self, part: Json, system: str) -> _Test:
        cs = self._cs(system, part.get("version"))
        concepts = part.get("concept")
        if concepts:
            listed = {code for c in concepts if isinstance(code := c.get("code"), str)}

            def in_concepts(system: str, code: str) -> bool | None:
                found = cs.find(code) if cs is not None else None
                return (found or code) in listed

            return in_concepts
        tests = [_filter_test(cs, f) for f in part.get("filter", []) or []]

        def passes_filters(system: str, code: str) -> bool | None:
            found = cs.find(code) if cs is not None else None
            if cs is not None and found is not None:
                results = [test(found) for test in tests]
            else:
                if cs is not None and cs.complete:
                    return False
                # a code the system does not hold: the filters decide without it
                results = [test(code) for test in tests] if tests else [None]
            if any(r is False for r in results):
                return False
            return True if all(r is True for r in results) else None

        return passes_filters

    # -- $expand ---------------------------------------------------------------------

    def member(self, value_set: Mapping[str, Any], system: str, code: str) -> bool | None:
        """Is (system, code) in ``value_set``? None: that cannot be decided offline."""
        return self.membership(value_set)(system, code)

    def membership(self, value_set: Mapping[str, Any]) -> Callable[[str, str], bool | None]:
        """:meth:`member` for many codes: the test is built once (when first asked), so
        asking about every code in use costs each code a look-up, not a pass over the
        value set's concept lists and hierarchies."""
        test = _lazy(lambda: self._vs_test(value_set, ()))

        def member(system: str, code: str) -> bool | None:
            try:
                return test(system, code)
            except _Unexpandable as exc:
                raise FhirError(Code.EXPANSION_FAILED, str(exc)) from None

        return member

    def members(self, value_set: Mapping[str, Any]) -> tuple[frozenset[tuple[str, str]], bool]:
        """The (system, code) pairs of ``value_set``'s expansion, and whether that
        expansion is closed (every member known)."""
        try:
            exp = self._expand(value_set, ())
        except _Unexpandable as exc:
            raise FhirError(Code.EXPANSION_FAILED,
                            f"value set {value_set.get('url')} cannot be expanded: {exc}") from None
        return frozenset((i.system, i.code) for i in exp.items.values()), exp.closed

    def expand(self, value_set: Mapping[str, Any], *, text_filter: str | None = None,
               offset: int = 0, count: int | None = None, active_only: bool = False,
               include_designations: bool = False, include_definition: bool = False,
               timestamp: str) -> Json:
        """``value_set`` expanded (a new ValueSet with ``expansion``)."""
        if offset < 0 or (count is not None and count < 0):
            raise FhirError(Code.INVALID_TERMINOLOGY_REQUEST, "offset and count must be >= 0")
        try:
            exp = self._expand(value_set, ())
        except _Unexpandable as exc:
            raise FhirError(Code.EXPANSION_FAILED,
                            f"value set {value_set.get('url')} cannot be expanded: {exc}") from None
        items = list(exp.items.values())
        if active_only:
            items = [i for i in items if not i.inactive]
        if text_filter:
            words = text_filter.casefold().split()
            items = [i for i in items if _text_match(i, words)]
        page = items[offset:] if count is None else items[offset:offset + count]
        params: list[Json] = []
        if text_filter:
            params.append({"name": "filter", "valueString": text_filter})
        if offset:
            params.append({"name": "offset", "valueInteger": offset})
        if count is not None:
            params.append({"name": "count", "valueInteger": count})
        if active_only:
            params.append({"name": "activeOnly", "valueBoolean": True})
        if include_designations:
            params.append({"name": "includeDesignations", "valueBoolean": True})
        params += [{"name": "version", "valueUri": v} for v in sorted(exp.versions)]
        ident = uuid.uuid5(uuid.NAMESPACE_URL, "|".join([
            str(value_set.get("url")), str(value_set.get("version")),
            *(f"{p['name']}={next(v for k, v in p.items() if k != 'name')}" for p in params)]))
        expansion: Json = {}
        if not exp.closed:
            expansion["extension"] = [{"url": UNCLOSED, "valueBoolean": True}]
        expansion["identifier"] = f"urn:uuid:{ident}"
        expansion["timestamp"] = timestamp
        if exp.closed:
            expansion["total"] = len(items)
        if offset or count is not None:
            expansion["offset"] = offset
        if params:
            expansion["parameter"] = params
        if page:
            expansion["contains"] = [i.contains(include_designations) for i in page]
        skip = {"text", "expansion"} | (set() if include_definition else {"compose"})
        out = {k: v for k, v in value_set.items() if k not in skip}
        out["expansion"] = expansion
        return out

    # -- $validate-code ------------------------------------------------------------------

    def validate_code(self, value_set: Mapping[str, Any], codings: Sequence[Json], *,
                      abstract_ok: bool = False) -> Json:
        """Is one of ``codings`` (``system``, ``code``, optional ``version``, ``display``)
        in ``value_set``? (Several codings: a CodeableConcept.)"""
        if not codings:
            raise FhirError(Code.INVALID_TERMINOLOGY_REQUEST,
                            "give code and system, a coding or a codeableConcept")
        messages: list[str] = []
        known: str | None = None  # the right display of a code whose details were wrong
        for coding in codings:
            system, code = coding.get("system"), coding.get("code")
            if not isinstance(code, str) or not code:
                raise FhirError(Code.INVALID_TERMINOLOGY_REQUEST, "a coding has no code")
            if not isinstance(system, str) or not system:
                raise FhirError(Code.INVALID_TERMINOLOGY_REQUEST,
                                f"code '{code}' needs a system")
            try:
                member = self._member(value_set, system, code)
            except _Unexpandable as exc:
                raise FhirError(Code.EXPANSION_FAILED, str(exc)) from None
            if member is not True:
                what = "is not in" if member is False else "cannot be checked offline against"
                messages.append(f"the code '{code}' from system '{system}' {what} value set "
                                f"{value_set.get('url')}")
                continue
            ok, message, display = self._check_concept(coding, abstract_ok=abstract_ok,
                                                       value_set=value_set)
            if ok:
                return _result(True, message, display)
            messages.append(message or "")
            known = known or display
        return _result(False, "; ".join(m for m in messages if m), known)

    def validate_code_in_system(self, code_system: Mapping[str, Any], codings: Sequence[Json],
                                *, abstract_ok: bool = False) -> Json:
        """``CodeSystem/$validate-code``: is one of ``codings`` a code of ``code_system``?"""
        if not codings:
            raise FhirError(Code.INVALID_TERMINOLOGY_REQUEST,
                            "give a code, a coding or a codeableConcept")
        url = code_system.get("url")
        messages = []
        known: str | None = None
        for coding in codings:
            code = coding.get("code")
            if not isinstance(code, str) or not code:
                raise FhirError(Code.INVALID_TERMINOLOGY_REQUEST, "a coding has no code")
            system = coding.get("system") or url
            if system != url:
                messages.append(f"the coding's system '{system}' is not {url}")
                continue
            ok, message, display = self._check_concept({**coding, "system": url},
                                                       abstract_ok=abstract_ok)
            if ok:
                return _result(True, message, display)
            messages.append(message or "")
            known = known or display
        return _result(False, "; ".join(m for m in messages if m), known)

    def _check_concept(self, coding: Json, *, abstract_ok: bool,
                       value_set: Mapping[str, Any] | None = None
                       ) -> tuple[bool, str | None, str | None]:
        """(valid, message, display) for a coding whose membership is settled."""
        system, code = coding["system"], coding["code"]
        version, display = coding.get("version"), coding.get("display")
        cs = self._cs(system)
        if cs is not None and version and cs.version and version != cs.version:
            return False, f"version '{version}' of code system {system} is not known here", None
        found = cs.find(code) if cs is not None else None
        if found is None:
            if cs is not None and cs.complete:
                return False, f"the code '{code}' is not in code system {system}", None
            known = self._enumerated_display(value_set, system, code) if value_set else None
            if display and known and _norm(display) != _norm(known):
                return False, (f"the display '{display}' is not the display of code '{code}' "
                               f"('{known}')"), known
            note = None if known and display else (
                f"code system {system} is not (fully) held here; the display was not checked"
                if display else None)
            return True, note, known
        assert cs is not None
        if cs.abstract(found) and not abstract_ok:
            return False, f"the code '{found}' is abstract and cannot be used here", None
        preferred = cs.concepts[found].get("display")
        if display and all(_norm(display) != _norm(d) for d in cs.displays(found)):
            return False, (f"the display '{display}' is not a display of code '{found}' "
                           f"('{preferred}')"), preferred
        message = f"the code '{found}' is inactive" if cs.inactive(found) else None
        if found != code:
            message = f"the code '{code}' is spelled '{found}' in code system {system}"
        return True, message, preferred

    def _enumerated_display(self, vs: Mapping[str, Any] | None, system: str,
                            code: str) -> str | None:
        """The display a value set gives a code of a system not held here."""
        stack: list[Mapping[str, Any] | None] = [vs]
        seen: set[int] = set()
        while stack:
            v = stack.pop()
            if v is None or id(v) in seen:
                continue
            seen.add(id(v))
            for part in (v.get("compose") or {}).get("include", []) or []:
                if part.get("system") == system:
                    for c in part.get("concept", []) or []:
                        if c.get("code") == code and c.get("display"):
                            return str(c["display"])
                stack.extend(self.value_set(u) for u in part.get("valueSet", []) or [])
        return None

    # -- $translate -------------------------------------------------------------------------

    def translate(self, maps: Sequence[Mapping[str, Any]], codings: Sequence[Json], *,
                  target: str | None = None, target_system: str | None = None,
                  reverse: bool = False) -> Json:
        """Translate ``codings`` with the concept maps ``maps`` (already chosen)."""
        if not codings:
            raise FhirError(Code.INVALID_TERMINOLOGY_REQUEST,
                            "give code and system, a coding or a codeableConcept")
        matches: list[Json] = []
        for coding in codings:
            system, code = coding.get("system"), coding.get("code")
            if not isinstance(system, str) or not isinstance(code, str) or not code:
                raise FhirError(Code.INVALID_TERMINOLOGY_REQUEST,
                                "a code to translate needs a system and a code")
            for cm in maps:
                if target and not reverse and _target_uri(cm) not in (None, target):
                    continue
                if target and reverse and _source_uri(cm) not in (None, target):
                    continue
                matches += _translate_one(cm, system, code, coding.get("version"),
                                          target_system, reverse)
        ok = any(m["equivalence"] not in _FAILED_MATCH for m in matches)
        out: list[Json | None] = [{"name": "result", "valueBoolean": ok}]
        if not ok:
            described = ", ".join(f"{c.get('system')}|{c.get('code')}" for c in codings)
            out.append({"name": "message",
                        "valueString": f"no translation found for {described}" if not matches
                        else f"{described} has no equivalent in the target"})
        for m in matches:
            parts: list[Json] = [{"name": "equivalence", "valueCode": m["equivalence"]}]
            if m.get("concept"):
                parts.append({"name": "concept", "valueCoding": m["concept"]})
            parts.append({"name": "source", "valueUri": m["source"]})
            out.append({"name": "match", "part": parts})
        return _parameters(*out)

    def maps_for(self, *, source: str | None = None, target: str | None = None,
                 reverse: bool = False) -> list[Json]:
        """Concept maps whose source/target value sets fit (``None``: any)."""
        out = []
        for cm in self.concept_maps():
            src, tgt = (_target_uri(cm), _source_uri(cm)) if reverse else \
                (_source_uri(cm), _target_uri(cm))
            if source and src not in (None, source):
                continue
            if target and tgt not in (None, target):
                continue
            out.append(cm)
        return out


def _result(ok: bool, message: str | None, display: str | None) -> Json:
    return _parameters(
        {"name": "result", "valueBoolean": ok},
        {"name": "message", "valueString": message} if message else None,
        {"name": "display", "valueString": display} if display else None,
    )


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _text_match(item: _Item, words: list[str]) -> bool:
    haystack = " ".join([item.code, item.display or "",
                         *(str(d.get("value", "")) for d in item.designations)]).casefold()
    return all(w in haystack for w in words)


def _filter_test(cs: _CodeSystem | None, f: Mapping[str, Any]) -> Callable[[str], bool | None]:
    """Does a code pass filter ``f``? ``None``: cannot tell without the code system.

    Built once for the codes of a part: the values of ``in``/``not-in`` are split once,
    and for ``is-a``, ``descendent-of`` and ``is-not-a`` the codes below the target are
    found by one walk down from it (from the second code asked on; the first is answered
    by a walk up from it, as cheap for a single code). A walk up from every code was
    quadratic in a deep hierarchy. Errors (a filter without a property, an operator not
    supported) are raised when a code is asked, as they were."""
    prop, op, value = f.get("property"), f.get("op"), str(f.get("value", ""))
    if op == "regex" and prop in ("code", "concept"):
        return lambda code: _regex_match(value, code)
    listed = {value} if op == "=" else set(value.split(",")) if op in ("in", "not-in") else set()
    hierarchy = prop in ("concept", "code") and op in ("is-a", "descendent-of", "is-not-a",
                                                       "generalizes")
    target = (cs.find(value) or value) if cs is not None and hierarchy else value
    below: set[str] | None = None  # the codes below target, once a second code is asked
    above: set[str] | None = None  # the codes above target
    asked = False

    def under(cs: _CodeSystem, code: str) -> bool:
        """Is target among the ancestors of ``code``?"""
        nonlocal below, asked
        if below is None:
            if not asked:
                asked = True
                return target in cs.ancestors(code)
            below = cs.descendants(target)
        return code in below

    def test(code: str) -> bool | None:
        nonlocal above
        if cs is None or cs.find(code) is None:
            if op in ("=", "in", "not-in") and prop in ("code", "concept"):
                return bool((code in listed) != (op == "not-in"))
            return None
        if hierarchy:
            if op == "is-a":
                return code == target or under(cs, code)
            if op == "descendent-of":
                return under(cs, code)
            if op == "is-not-a":
                return not (code == target or under(cs, code))
            if above is None:
                above = cs.ancestors(target)
            return code == target or code in above
        if prop in ("concept", "code"):
            values = [code]
        elif isinstance(prop, str):
            values = cs.property_values(code, prop)
        else:
            raise FhirError(Code.INVALID_TERMINOLOGY_REQUEST, "a filter has no property")
        if op == "=":
            return value in values
        if op == "in":
            return bool(listed & set(values))
        if op == "not-in":
            return not listed & set(values)
        if op == "regex":
            return any(_regex_match(value, v) for v in values)
        if op == "exists":
            return bool(values) == _bool_value(value)
        raise FhirError(Code.INVALID_TERMINOLOGY_REQUEST,
                        f"filter operator '{op}' on '{prop}' is not supported")

    return test


def _source_uri(cm: Mapping[str, Any]) -> str | None:
    v = cm.get("sourceUri") or cm.get("sourceCanonical")
    return _canonical(v)[0] if isinstance(v, str) else None


def _target_uri(cm: Mapping[str, Any]) -> str | None:
    v = cm.get("targetUri") or cm.get("targetCanonical")
    return _canonical(v)[0] if isinstance(v, str) else None


def _coding(system: str | None, version: str | None, code: str | None,
            display: str | None) -> Json:
    out: Json = {}
    if system:
        out["system"] = system
    if version:
        out["version"] = version
    if code:
        out["code"] = code
    if display:
        out["display"] = display
    return out


def _translate_one(cm: Mapping[str, Any], system: str, code: str, version: str | None,
                   target_system: str | None, reverse: bool) -> list[Json]:
    url = cm.get("url", "")
    out: list[Json] = []
    for group in cm.get("group", []) or []:
        src, tgt = group.get("source"), group.get("target")
        src_v, tgt_v = group.get("sourceVersion"), group.get("targetVersion")
        if reverse:
            if tgt != system or (target_system and src != target_system):
                continue
            if version and tgt_v and version != tgt_v:
                continue
            for el in group.get("element", []) or []:
                for t in el.get("target", []) or []:
                    if t.get("code") == code:
                        eq = t.get("equivalence", "equivalent")
                        out.append({"equivalence": _REVERSE.get(eq, eq), "source": url,
                                    "concept": _coding(src, src_v, el.get("code"),
                                                       el.get("display"))})
            continue
        if src != system or (target_system and tgt != target_system):
            continue
        if version and src_v and version != src_v:
            continue
        elements = [el for el in group.get("element", []) or [] if el.get("code") == code]
        for el in elements:
            for t in el.get("target", []) or []:
                concept = _coding(tgt, tgt_v, t.get("code"), t.get("display")) \
                    if t.get("code") else None
                out.append({"equivalence": t.get("equivalence", "equivalent"), "source": url,
                            "concept": concept})
        unmapped = group.get("unmapped")
        if not elements and isinstance(unmapped, dict):
            mode = unmapped.get("mode")
            if mode == "provided":
                out.append({"equivalence": "equal", "source": url,
                            "concept": _coding(tgt, tgt_v, code, None)})
            elif mode == "fixed" and unmapped.get("code"):
                out.append({"equivalence": "inexact", "source": url,
                            "concept": _coding(tgt, tgt_v, unmapped["code"],
                                               unmapped.get("display"))})
    return out
