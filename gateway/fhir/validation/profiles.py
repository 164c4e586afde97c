"""Profile validation: what a constraint StructureDefinition adds to the base.

A profile's snapshot repeats the base definition; validating against all of
it would report every base problem twice. So each snapshot element is compared
with the base element it constrains (the compiled base :class:`~model.Node`
found by walking both trees together), and only the differences become checks
(spec: https://hl7.org/fhir/R4/profiling.html):

* cardinality tighter than the base (``min``/``max``), also per slice;
* types of a choice element narrowed (``value[x]`` to ``Quantity`` only);
* ``fixed[x]`` (exact) and ``pattern[x]`` (the instance holds at least the
  pattern: every pattern array item matches some instance item) -- on any
  type, CodeableConcept and Coding included;
* required bindings to another value set than the base's (the gateway's own
  ValueSets, expanded at start), ``maxLength``, ``minValue``/``maxValue``
  (numbers);
* constraints the base does not have (FHIRPath, compiled as in the base);
* slicing (https://hl7.org/fhir/R4/profiling.html#slicing): discriminators of
  type ``value``/``pattern`` (fixed or pattern value, required binding, or the
  profile URL of an extension slice), ``exists``, ``type`` and ``profile``;
  rules ``closed`` (unmatched items are errors) and ``open``/``openAtEnd``;
* nested profiles: extension slices and ``Resource`` elements whose type names
  a known profile are checked against it too;
* the resource types a reference may name, where ``targetProfile`` narrows them
  (``Reference(Patient)`` where the base allows Patient or Group); whether the
  target conforms to a target profile is not checked (it needs the target).

Not checked: ``ordered`` slicing, and slices whose discriminator cannot be told here: a path
with a function (``resolve()``, ``extension('…')``), a required binding to a
value set not held or stored, a path to no element of the slice. Such a slice
matches nothing, its cardinality is not judged, and neither is its slicing's
``closed`` rule. Each profile's compile notes are in
:attr:`CompiledProfile.notes`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from gateway.fhir.outcome import Code, Findings, Issue
from gateway.fhir.validation.fhirpath import Compiled, Env, EvaluationError
from gateway.fhir.validation.model import (
    HAND_CODED,
    PRIM,
    RESOURCE,
    Binding,
    Child,
    Invariant,
    Model,
    Node,
)
from gateway.fhir.validation.walker import Loc, reference_type, render

log = logging.getLogger(__name__)

_R4_SD = "http://hl7.org/fhir/StructureDefinition/"


def _max(value: Any) -> int | None:
    return None if value in (None, "*") else int(value)


def _prefixed(el: dict[str, Any], prefix: str) -> tuple[str, Any] | None:
    for k, v in el.items():
        if k.startswith(prefix) and len(k) > len(prefix) and k[len(prefix)].isupper():
            return k[len(prefix):], v
    return None


# ----------------------------------------------------------------------------------
# value comparison


def _number(v: Any) -> Decimal | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int | Decimal):
        return Decimal(v)
    if isinstance(v, float):
        return Decimal(repr(v))
    return None


def _same(a: Any, b: Any) -> bool:
    """Exact equality (``fixed[x]``) with numbers compared by value."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    na, nb = _number(a), _number(b)
    if na is not None and nb is not None:
        return na == nb
    return type(a) is type(b) and a == b


def matches_pattern(value: Any, pattern: Any) -> bool:
    """``value`` holds at least what ``pattern`` says (``pattern[x]``)."""
    if isinstance(pattern, dict):
        if not isinstance(value, dict):
            return False
        return all(k in value and matches_pattern(value[k], p) for k, p in pattern.items())
    if isinstance(pattern, list):
        items = value if isinstance(value, list) else [value]
        return all(any(matches_pattern(v, p) for v in items) for p in pattern)
    return _same(value, pattern)


# ----------------------------------------------------------------------------------
# the snapshot as a tree of element ids


@dataclass(eq=False)
class _El:
    el: dict[str, Any]
    name: str  # element name, e.g. "component", "value[x]", "valueQuantity"
    children: dict[str, _El] = field(default_factory=dict)
    slices: list[_El] = field(default_factory=list)


def _segments(el: dict[str, Any]) -> list[str]:
    ident = el.get("id")
    if not isinstance(ident, str):
        ident = el["path"] + (f":{el['sliceName']}" if el.get("sliceName") else "")
    out: list[str] = []
    buf = ""
    depth = 0
    for ch in ident:  # split on dots outside [x] brackets
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "." and depth == 0:
            out.append(buf)
            buf = ""
        else:
            buf += ch
    out.append(buf)
    return out


def _tree(elements: list[dict[str, Any]]) -> _El:
    root = _El(elements[0], _segments(elements[0])[0])
    by_id: dict[tuple[str, ...], _El] = {(root.name,): root}
    for el in elements[1:]:
        segs = _segments(el)
        last = segs[-1]
        name, _, slice_name = last.partition(":")
        parent_key = tuple(segs[:-1])
        parent = by_id.get(parent_key)
        if parent is None:
            continue
        node = _El(el, name)
        by_id[tuple(segs)] = node
        if slice_name:
            base = parent.children.get(name)
            if base is None:
                base = parent.children[name] = _El({"path": el["path"]}, name)
                by_id[(*parent_key, name)] = base
            base.slices.append(node)
        else:
            parent.children[name] = node
    return root


# ----------------------------------------------------------------------------------
# compiled checks


class _Run:
    """State of one profile check: issues, environment, nested profiles."""

    def __init__(self, profiles: ProfileSet, url: str, env: Env) -> None:
        self.profiles = profiles
        self.url = url
        self.env = env
        self.found = Findings()  # the first issues kept, the rest counted
        self.evaluations = 0

    def issue(self, code: Code, loc: Loc, element: str, message: str,
              severity: str = "error") -> None:
        if self.found.keeps(severity):
            self.found.issues.append(Issue(
                code, f"{message} (profile {self.url}, element {element})", (render(loc),),
                severity))


@dataclass(eq=False)
class _Overlay:
    """The checks one profile element adds, applied to the items under its keys."""

    element: str  # element id in the profile
    label: str
    keys: tuple[str, ...]
    #: the keys of a primitive type: present also as ``_key`` (only an id or extensions,
    #: such as a data-absent-reason)
    prims: frozenset[str]
    min: int | None = None
    max: int | None = None
    disallowed: tuple[str, ...] = ()  # choice keys the profile removed
    fixed: Any = None
    pattern: Any = None
    binding: Binding | None = None
    #: the JSON keys a required binding applies to, with their types (of a choice such
    #: as ``value[x]`` of boolean or code, only the code is bound)
    binding_kinds: dict[str, str] = field(default_factory=dict)
    max_length: int | None = None
    min_value: Decimal | None = None
    max_value: Decimal | None = None
    invariants: tuple[Invariant, ...] = ()
    #: for a choice element: the invariants compiled for each JSON key's type
    invariants_by_key: dict[str, tuple[Invariant, ...]] | None = None
    children: tuple[_Overlay, ...] = ()
    slicing: _Slicing | None = None
    profile: str | None = None  # nested resource / extension profile
    #: the resource types a Reference may name, where the profile narrows the base's
    #: (``targetProfile``), and the JSON key of the Reference
    targets: frozenset[str] | None = None
    targets_key: str = ""

    def items(self, obj: dict[str, Any], loc: Loc) -> list[tuple[Any, Loc, str]]:
        out: list[tuple[Any, Loc, str]] = []
        for key in self.keys:
            v = obj.get(key)
            if v is None and key in self.prims:
                ext = obj.get("_" + key)
                if ext is None:
                    continue
                v = [None] * len(ext) if isinstance(ext, list) else None
                if v is None:
                    out.append((None, (loc, key, None), key))
                    continue
            if v is None:
                continue
            if isinstance(v, list):
                out.extend((x, (loc, key, i), key) for i, x in enumerate(v))
            else:
                out.append((v, (loc, key, None), key))
        return out

    def check(self, obj: dict[str, Any], loc: Loc, run: _Run) -> None:
        items = self.items(obj, loc)
        self.check_items(items, obj, loc, run)

    def check_items(self, items: list[tuple[Any, Loc, str]], obj: dict[str, Any], loc: Loc,
                    run: _Run) -> None:
        n = len(items)
        if self.min is not None and n < self.min:
            run.issue(Code.MIN_CARDINALITY, loc, self.element,
                      f"{self.label} needs at least {self.min}, found {n}")
        if self.max is not None and n > self.max:
            run.issue(Code.MAX_CARDINALITY, items[self.max][1] if items else loc, self.element,
                      f"{self.label} allows at most {self.max}, found {n}")
        for key in self.disallowed:
            if key in obj or "_" + key in obj:
                run.issue(Code.TYPE_NOT_ALLOWED, (loc, key, None), self.element,
                          f"{key} is not one of the types the profile allows for "
                          f"{self.label}")
        for value, where, key in items:
            self.check_item(value, where, run, key)
        if self.slicing is not None:
            self.slicing.check(items, loc, run)

    def check_item(self, value: Any, loc: Loc, run: _Run, key: str = "") -> None:
        if self.fixed is not None and not _same(value, self.fixed):
            run.issue(Code.FIXED_VALUE_MISMATCH, loc, self.element,
                      f"{self.label} must be exactly {_show(self.fixed)}")
        if self.pattern is not None and not matches_pattern(value, self.pattern):
            run.issue(Code.FIXED_VALUE_MISMATCH, loc, self.element,
                      f"{self.label} must match the pattern {_show(self.pattern)}")
        if value is None:
            return
        if self.binding is not None:
            kind = self.binding_kinds.get(key) if key else (
                next(iter(self.binding_kinds.values())) if len(self.binding_kinds) == 1
                else None)
            if kind is not None:
                self._binding(value, kind, loc, run)
        if self.max_length is not None and isinstance(value, str) and \
                len(value) > self.max_length:
            run.issue(Code.TOO_LONG, loc, self.element,
                      f"{self.label} is longer than {self.max_length} characters")
        if self.min_value is not None or self.max_value is not None:
            num = _number(value)
            if num is not None and ((self.min_value is not None and num < self.min_value) or
                                    (self.max_value is not None and num > self.max_value)):
                run.issue(Code.INVALID_PRIMITIVE, loc, self.element,
                          f"{self.label} is outside [{self.min_value}, {self.max_value}]")
        invariants = self.invariants
        if self.invariants_by_key is not None:
            invariants = self.invariants_by_key.get(key, ())
        for inv in invariants:
            run.evaluations += 1
            try:
                ok = inv.evaluate(value, run.env)
            except (EvaluationError, TypeError, ValueError, AttributeError, KeyError,
                    IndexError, ArithmeticError) as exc:
                run.issue(Code.INVARIANT_NOT_EVALUATED, loc, self.element,
                          f"{inv.key} could not be evaluated ({exc})", "warning")
                continue
            if ok is False:
                run.issue(Code.INVARIANT_FAILED, loc, self.element,
                          f"{inv.key}: {inv.human} ({inv.expression})", inv.severity)
        if isinstance(value, dict):
            if self.targets is not None and key in ("", self.targets_key):
                self._target(value, loc, run)
            for child in self.children:
                child.check(value, loc, run)
            if self.profile is not None:
                run.profiles.check_nested(self.profile, value, loc, run)

    def _target(self, value: dict[str, Any], loc: Loc, run: _Run) -> None:
        """A literal reference (or ``Reference.type``) to a type the profile's
        ``targetProfile`` leaves out. Whether the target conforms to a target profile
        needs the target itself and is not judged."""
        assert self.targets is not None
        for part, named in (("reference", value.get("reference")), ("type", value.get("type"))):
            if not isinstance(named, str):
                continue
            target = reference_type(named) if part == "reference" else named
            if target is not None and target in run.profiles.model.resource_types \
                    and target not in self.targets:
                run.issue(Code.INVALID_REFERENCE_TARGET, (loc, part, None), self.element,
                          f"{self.label} may refer to {', '.join(sorted(self.targets))} "
                          f"in this profile, not {target}")

    def _binding(self, value: Any, kind: str, loc: Loc, run: _Run) -> None:
        binding = self.binding
        assert binding is not None
        ok: bool
        if kind == "CodeableConcept":
            codings = value.get("coding") if isinstance(value, dict) else None
            ok = isinstance(codings, list) and any(
                isinstance(c, dict) and _coded(c, binding) for c in codings)
        elif kind in ("Coding", "Quantity"):
            ok = not isinstance(value, dict) or "code" not in value or _coded(value, binding)
        elif not isinstance(value, str):
            return  # an object or array where a code belongs: the base check reports it
        else:
            ok = value in binding.code_values
        if not ok:
            run.issue(Code.CODE_NOT_IN_VALUESET, loc, self.element,
                      f"{self.label} has no code from the required value set "
                      f"{binding.value_set}")


def _coded(c: dict[str, Any], binding: Binding) -> bool:
    code = c.get("code")
    if not isinstance(code, str):
        return False
    system = c.get("system")
    return (system, code) in binding.codes if isinstance(system, str) else \
        code in binding.code_values


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 160 else text[:157] + "..."


Matcher = Callable[[Any, str, "_Run"], bool]
#: the types a binding applies to (terminologies.html#binding)
_BINDABLE = frozenset({"code", "Coding", "CodeableConcept", "Quantity", "string", "uri"})


@dataclass(eq=False)
class _Slice:
    name: str
    overlay: _Overlay
    matchers: tuple[Matcher, ...]
    min: int
    max: int | None

    def matches(self, value: Any, key: str, run: _Run) -> bool:
        return bool(self.matchers) and all(m(value, key, run) for m in self.matchers)


@dataclass(eq=False)
class _Slicing:
    element: str
    label: str
    rules: str
    slices: tuple[_Slice, ...]

    def check(self, items: list[tuple[Any, Loc, str]], loc: Loc, run: _Run) -> None:
        matched: dict[str, list[tuple[Any, Loc, str]]] = {s.name: [] for s in self.slices}
        # a slice whose discriminator cannot be told here (a function in its path, a
        # value set not held, no element at its path): which items are in it is not
        # known, so neither its cardinality nor the closed rule is judged
        undecided = any(not s.matchers for s in self.slices)
        for item in items:
            value, where, key = item
            for s in self.slices:
                if s.matches(value, key, run):
                    matched[s.name].append(item)
                    break
            else:
                if self.rules == "closed" and not undecided:
                    run.issue(Code.SLICING_FAILED, where, self.element,
                              f"{self.label} matches none of the slices "
                              f"({', '.join(s.name for s in self.slices)}) and the slicing "
                              "is closed")
        for s in self.slices:
            got = matched[s.name]
            if not s.matchers:
                continue
            if len(got) < s.min:
                run.issue(Code.MIN_CARDINALITY, loc, s.overlay.element,
                          f"slice '{s.name}' of {self.label} needs at least {s.min}, "
                          f"found {len(got)}")
            if s.max is not None and len(got) > s.max:
                run.issue(Code.MAX_CARDINALITY, got[s.max][1], s.overlay.element,
                          f"slice '{s.name}' of {self.label} allows at most {s.max}, "
                          f"found {len(got)}")
            for value, where, key in got:
                s.overlay.check_item(value, where, run, key)


# ----------------------------------------------------------------------------------
# compilation


class CompiledProfile:
    def __init__(self, url: str, type_: str, root: _Overlay, notes: list[str],
                 profiles: ProfileSet) -> None:
        self.url = url
        self.type = type_
        self.root = root
        self.notes = notes
        self._profiles = profiles

    def check(self, resource: dict[str, Any], loc: Loc) -> tuple[Findings, int]:
        run = _Run(self._profiles, self.url, Env(resource, resource))
        self.root.check_item(resource, loc, run)
        return run.found, run.evaluations


class ProfileSet:
    """Constraint StructureDefinitions by canonical URL, compiled on first use."""

    def __init__(self, model: Model, profiles: dict[str, dict[str, Any]],
                 bindings: Callable[[str], Binding | None],
                 unusable: dict[str, str] | None = None) -> None:
        self.model = model
        self.raw = profiles
        #: profiles stored but not usable, by URL: why (no snapshot can be made...)
        self.unusable = unusable or {}
        self._bindings = bindings
        self._compiled: dict[str, CompiledProfile | None] = {}
        self._base_constraints: set[tuple[str, str]] | None = None
        self._lock = threading.RLock()
        self._compiling: set[str] = set()

    def get(self, url: str) -> CompiledProfile | None:
        url = url.split("|", 1)[0]
        if url in self._compiled:
            return self._compiled[url]
        with self._lock:
            if url in self._compiled:
                return self._compiled[url]
            if url in self._compiling:  # a profile that refers to itself
                return None
            self._compiling.add(url)
            try:
                sd = self.raw.get(url)
                compiled = _Compiler(self, sd).compile() if sd is not None else None
            except Exception:  # a definition that makes no sense (one stored on the
                # server, say): not used, as an unknown one, rather than failing writes
                log.warning("profile %s cannot be compiled; it is not used", url[:200],
                            exc_info=True)
                compiled = None
            finally:
                self._compiling.discard(url)
            self._compiled[url] = compiled
            return compiled

    def compiled(self, url: str) -> bool:
        """Whether :meth:`get` has compiled ``url`` (or found it cannot be): then it
        answers at once."""
        return url.split("|", 1)[0] in self._compiled

    def base_constraints(self) -> set[tuple[str, str]]:
        if self._base_constraints is None:
            self._base_constraints = {
                (c.get("key", ""), c.get("expression", ""))
                for sd in self.model.by_type.values()
                for el in sd["snapshot"]["element"]
                for c in el.get("constraint", []) or []
            }
        return self._base_constraints

    def binding(self, url: str) -> Binding | None:
        return self._bindings(url)

    def check_nested(self, url: str, value: dict[str, Any], loc: Loc, run: _Run) -> None:
        compiled = self.get(url)
        if compiled is None:
            return
        if compiled.type not in ("Extension", value.get("resourceType")):
            return
        inner = _Run(self, compiled.url, Env(value, run.env.root)
                     if "resourceType" in value else run.env)
        compiled.root.check_item(value, loc, inner)
        run.found.absorb(inner.found)
        run.evaluations += inner.evaluations

    def conforms(self, url: str, value: Any, run: _Run) -> bool:
        compiled = self.get(url)
        if compiled is None or not isinstance(value, dict):
            return False
        inner = _Run(self, compiled.url, run.env)
        compiled.root.check_item(value, None, inner)
        return not inner.found.failed


class _Compiler:
    def __init__(self, profiles: ProfileSet, sd: dict[str, Any]) -> None:
        self.profiles = profiles
        self.model = profiles.model
        self.sd = sd
        self.url: str = sd["url"]
        self.notes: list[str] = []

    def compile(self) -> CompiledProfile | None:
        elements = self.sd.get("snapshot", {}).get("element") or []
        if not elements:
            self.notes.append("no snapshot")
            return None
        type_ = self.sd.get("type") or elements[0]["path"].split(".")[0]
        base = self.model.type_node(type_)
        if base is None:
            return None
        tree = _tree(elements)
        root = _Overlay(tree.el.get("id", type_), type_, (), frozenset())
        root.invariants = self._invariants(tree.el, base, type_)
        root.children = self._children(tree, base)
        return CompiledProfile(self.url, type_, root, self.notes, self.profiles)

    def _children(self, parent: _El, base: Node, inherited: _El | None = None
                  ) -> tuple[_Overlay, ...]:
        out: list[_Overlay] = []
        for name, el in parent.children.items():
            same = inherited.children.get(name) if inherited is not None else None
            overlay = self._element(el, name, base, same)
            if overlay is not None:
                out.append(overlay)
        return tuple(out)

    def _base_children(self, name: str, base: Node) -> list[Child] | None:
        plain = name[:-3] if name.endswith("[x]") else name
        info = base.by_name.get(plain)
        if info is not None:
            return list(info.children)
        ch = base.children.get(name)  # a renamed choice: valueQuantity
        return [ch] if ch is not None else None

    def _element(self, el: _El, name: str, base: Node, inherited: _El | None = None
                 ) -> _Overlay | None:
        """The overlay of ``el``; ``inherited`` is the same element outside the slice
        ``el`` is in (its checks already run on every item, so they are not repeated)."""
        children = self._base_children(name, base)
        if children is None:
            self.notes.append(f"{el.el.get('id')}: not in the base definition")
            return None
        e = el.el
        ie = inherited.el if inherited is not None else {}

        def new(key: str) -> bool:
            return key not in ie or ie[key] != e[key]

        codes = [t.get("code") for t in e.get("type", [])]
        kept = [c for c in children if not codes or c.code in codes or len(children) == 1]
        if not kept:
            kept = children
        first = children[0]
        ov = _Overlay(e.get("id", first.label), first.label, tuple(c.key for c in kept),
                      frozenset(c.key for c in kept if c.kind == PRIM))
        if len(kept) < len(children) and ("type" not in ie or new("type")):
            ov.disallowed = tuple(c.key for c in children if c not in kept)
        useful = bool(ov.disallowed)
        if "min" in e and int(e["min"]) > first.min and new("min"):
            ov.min, useful = int(e["min"]), True
        hi = _max(e.get("max")) if "max" in e else first.max
        if hi is not None and (first.max is None or hi < first.max) and \
                ("max" not in e or new("max")):
            ov.max, useful = hi, True
        fixed, pattern = _prefixed(e, "fixed"), _prefixed(e, "pattern")
        if fixed is not None and new("fixed" + fixed[0]):
            ov.fixed, useful = fixed[1], True
        if pattern is not None and new("pattern" + pattern[0]):
            ov.pattern, useful = pattern[1], True
        if "maxLength" in e and new("maxLength"):
            ov.max_length, useful = int(e["maxLength"]), True
        for attr, prefix in (("min_value", "minValue"), ("max_value", "maxValue")):
            found = _prefixed(e, prefix)
            if found is not None and _number(found[1]) is not None and \
                    new(prefix + found[0]):
                setattr(ov, attr, _number(found[1]))
                useful = True
        binding = e.get("binding")
        if binding and binding.get("strength") == "required" and "valueSet" in binding \
                and ("binding" not in ie or new("binding")):
            vs = binding["valueSet"].split("|", 1)[0]
            base_vs = first.binding.value_set if first.binding is not None else None
            if vs != base_vs:
                resolved = self.profiles.binding(vs)
                if resolved is None:
                    self.notes.append(f"{ov.element}: value set {vs} is not expanded; "
                                      "binding not checked")
                else:
                    kinds = {c.key: c.code for c in kept if c.code in _BINDABLE}
                    if kinds:
                        ov.binding, ov.binding_kinds, useful = resolved, kinds, True
        skip = {c.get("key") for c in ie.get("constraint", []) or []}
        if len(kept) == 1:
            focus: Any = kept[0].node if kept[0].node is not None else kept[0].code
            ov.invariants = self._invariants(e, focus, kept[0].code, skip)
            useful = useful or bool(ov.invariants)
        else:
            ov.invariants_by_key = {
                c.key: self._invariants(e, c.node if c.node is not None else c.code, c.code,
                                        skip) for c in kept}
            useful = useful or any(ov.invariants_by_key.values())
        references = [c for c in kept if c.code == "Reference"]
        if len(references) == 1:
            targets = self._targets(e)
            base_targets = references[0].targets
            if targets is not None and (base_targets is None or targets < base_targets) \
                    and ("type" not in ie or new("type")):
                ov.targets, ov.targets_key, useful = targets, references[0].key, True
        profiles = [p for t in e.get("type", []) for p in t.get("profile", []) or []]
        if profiles and (kept[0].code == "Extension" or kept[0].kind == RESOURCE) and \
                self.profiles.raw.get(profiles[0].split("|", 1)[0]) is not None:
            ov.profile, useful = profiles[0], True
        if el.children:
            if len(kept) == 1 and kept[0].node is not None:
                ov.children = self._children(el, kept[0].node, inherited)
                useful = useful or bool(ov.children)
            elif len(kept) == 1 and kept[0].kind == PRIM:
                pass  # constraints on a primitive's id/extension/value: not checked
            else:
                self.notes.append(f"{ov.element}: children of several types not checked")
        if el.slices:
            ov.slicing = self._slicing(el, e, kept, base)
            useful = useful or ov.slicing is not None
        return ov if useful else None

    def _targets(self, e: dict[str, Any]) -> frozenset[str] | None:
        """The resource types the ``targetProfile`` of ``e``'s Reference type names
        (R4's definitions, or profiles held or stored here, by the type they
        constrain); None when there are none, or one is not known here."""
        urls = [u for t in e.get("type", []) if t.get("code") == "Reference"
                for u in t.get("targetProfile", []) or []]
        if not urls:
            return None
        types: set[str] = set()
        resource_types = self.profiles.model.resource_types
        for url in urls:
            url = url.split("|", 1)[0]
            sd = self.profiles.raw.get(url)
            named = sd.get("type") if sd is not None else (
                url.rsplit("/", 1)[-1] if url.startswith(_R4_SD) else None)
            if named == "Resource":
                return None  # any
            if not isinstance(named, str) or named not in resource_types:
                return None
            types.add(named)
        return frozenset(types)

    def _slicing(self, el: _El, e: dict[str, Any], kept: list[Child], base: Node
                 ) -> _Slicing | None:
        slicing = e.get("slicing") or {}
        discriminators = slicing.get("discriminator") or []
        slices: list[_Slice] = []
        for s in el.slices:
            se = s.el
            name = str(se.get("sliceName") or s.name)
            overlay = self._element(s, s.name, base, el) or _Overlay(
                se.get("id", name), kept[0].label, tuple(c.key for c in kept),
                frozenset(c.key for c in kept if c.kind == PRIM))
            # slice cardinality is checked per slice, not for the whole element
            overlay.min = overlay.max = None
            matchers = tuple(m for m in (self._matcher(d, s, kept) for d in discriminators)
                             if m is not None)
            if len(matchers) < len(discriminators):
                self.notes.append(f"{se.get('id')}: a discriminator is not supported; the "
                                  "slice matches nothing and its cardinality is not judged")
                matchers = ()
            slices.append(_Slice(name, overlay, matchers, int(se.get("min", 0)),
                                 _max(se.get("max"))))
        if not slices:
            return None
        label = kept[0].label
        return _Slicing(e.get("id", label), label, slicing.get("rules", "open"), tuple(slices))

    def _matcher(self, d: dict[str, Any], s: _El, kept: list[Child]) -> Matcher | None:
        dtype, path = d.get("type"), str(d.get("path", ""))
        steps = [] if path == "$this" else path.split(".")
        if any("(" in p for p in steps):
            return None
        # the element(s) the path names inside the slice: through re-slices too
        targets = [s]
        for step in steps:
            nxt: list[_El] = []
            for t in targets:
                child = t.children.get(step)
                if child is not None:
                    nxt.append(child)
                    nxt.extend(child.slices)
            targets = nxt
        te = targets[0].el if targets else {}
        if dtype in ("value", "pattern"):
            expected: list[tuple[Any, bool]] = []
            for t in targets:
                fixed = _prefixed(t.el, "fixed")
                pattern = _prefixed(t.el, "pattern")
                if fixed is not None:
                    expected.append((fixed[1], True))
                elif pattern is not None:
                    expected.append((pattern[1], False))
            if expected:
                return lambda v, key, run: any(
                    (_same(x, want) if exact else matches_pattern(x, want))
                    for x in _values(v, steps) for want, exact in expected)
            binding = te.get("binding") or {}
            if binding.get("strength") == "required" and "valueSet" in binding:
                resolved = self.profiles.binding(binding["valueSet"].split("|", 1)[0])
                if resolved is not None:
                    return lambda v, key, run: any(
                        (isinstance(x, dict) and _coded(x, resolved)) or
                        (isinstance(x, str) and x in resolved.code_values)
                        for x in _values(v, steps))
            if steps == ["url"]:
                profiles = [p for t in s.el.get("type", []) for p in t.get("profile", []) or []]
                if profiles:
                    url = profiles[0].split("|", 1)[0]
                    return lambda v, key, run: isinstance(v, dict) and v.get("url") == url
            return None
        if dtype == "exists":
            must = int(te.get("min", 0)) >= 1
            never = te.get("max") == "0"
            if not (must or never):
                return None
            return lambda v, key, run: bool(_values(v, steps)) == must
        if dtype == "type":
            codes = {t.get("code") for t in (s.el.get("type") if not steps else te.get("type"))
                     or []}
            if not codes:
                return None
            if not steps:
                by_key = {c.key: c.code for c in kept}
                return lambda v, key, run: (
                    _named_in(v.get("resourceType"), codes) if isinstance(v, dict) and
                    kept[0].kind == RESOURCE else by_key.get(key) in codes)
            return lambda v, key, run: any(
                isinstance(x, dict) and _named_in(x.get("resourceType"), codes)
                for x in _values(v, steps))
        if dtype == "profile":
            profiles = [p for t in (te.get("type") or []) for p in t.get("profile", []) or []]
            if not profiles:
                return None
            return lambda v, key, run: any(
                any(run.profiles.conforms(p, x, run) for p in profiles)
                for x in _values(v, steps))
        return None

    def _invariants(self, e: dict[str, Any], focus: Any, type_path: str,
                    skip: set[Any] | None = None) -> tuple[Invariant, ...]:
        known = self.profiles.base_constraints()
        out: list[Invariant] = []
        for c in e.get("constraint", []) or []:
            key, expr = c.get("key", ""), c.get("expression")
            if not expr or key in HAND_CODED or (key, expr) in known or key in (skip or ()):
                continue
            if focus is None:
                continue
            try:
                compiled = self.model.compile(expr, focus, type_path, self.sd.get("type"))
            except Exception as exc:  # parse errors in a profile's FHIRPath
                self.notes.append(f"{e.get('id')}: constraint {key} not compiled: {exc}")
                continue
            out.append(Invariant(key, c.get("severity", "error"), c.get("human", ""), expr,
                                 self.url, str(e.get("id", "")), _constant(compiled),
                                 compiled))
        return tuple(out)


def _named_in(value: Any, names: set[Any] | frozenset[Any]) -> bool:
    """``value`` is one of ``names``: a string (a resourceType of an object or array,
    which the base check reports, is none of them)."""
    return isinstance(value, str) and value in names


def _constant(compiled: Compiled) -> Callable[[], Compiled]:
    return lambda: compiled


def _values(value: Any, steps: list[str]) -> list[Any]:
    current = [value]
    for step in steps:
        nxt: list[Any] = []
        for v in current:
            if not isinstance(v, dict):
                continue
            if step.endswith("[x]"):
                prefix = step[:-3]
                found = [x for k, x in v.items() if k.startswith(prefix) and
                         len(k) > len(prefix) and k[len(prefix)].isupper()]
            else:
                found = [v[step]] if step in v else []
            for x in found:
                nxt.extend(x if isinstance(x, list) else [x])
        current = nxt
    return current

