"""StructureDefinition snapshots compiled into per-element tables.

One :class:`Node` per complex type, backbone element and resource type: the
JSON keys it allows (choice elements ``value[x]`` expanded to ``valueQuantity``,
``valueString``, ...; primitives also as ``_name`` for their id/extensions),
each key's cardinality, type, primitive check, required binding, reference
targets and element-level invariants, plus the node's own invariants. Built
once per type on first use and shared: a Patient's ``name`` and a
Practitioner's ``name`` point at the same ``HumanName`` node.

Spec: https://hl7.org/fhir/R4/elementdefinition.html,
https://hl7.org/fhir/R4/json.html (choice names, primitive ``_name`` siblings,
``resourceType``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.fhir.validation.fhirpath import Compiled, Env, compile_invariant
from gateway.fhir.validation.primitives import CHECKS, PRIMITIVES, URI_LIKE, Check

PRIM, COMPLEX, RESOURCE, XHTML = 0, 1, 2, 3

SD_BASE = "http://hl7.org/fhir/StructureDefinition/"
SIMPLE_QUANTITY = SD_BASE + "SimpleQuantity"
FHIRPATH_STRING = "http://hl7.org/fhirpath/System.String"

#: invariants checked by hand-written code (see ``walker`` and ``invariants``)
HAND_CODED = frozenset((
    "ele-1", "txt-1", "txt-2", "dom-2", "dom-3", "dom-4", "dom-5", "dom-6", "ref-1",
    "bdl-1", "bdl-2", "bdl-3", "bdl-4", "bdl-5", "bdl-7", "bdl-8", "bdl-9", "bdl-10",
    "bdl-11", "bdl-12", "sqty-1",
))

#: invariants not evaluated, with the reason (also listed in docs/adr-0002-validator.md)
SKIPPED: dict[str, str] = {
    "ctm-1": "needs resolve() of references to other resources",
}


@dataclass(slots=True)
class Binding:
    """A required binding with its expansion."""

    value_set: str
    codes: frozenset[tuple[str, str]]
    code_values: frozenset[str]


@dataclass(slots=True, eq=False)
class Invariant:
    """A constraint, compiled on first use: the tables it navigates may still be
    under construction when it is declared (recursive types)."""

    key: str
    severity: str  # error | warning
    human: str
    expression: str
    source: str  # StructureDefinition url
    element: str  # element id
    factory: Callable[[], Compiled]
    _compiled: Compiled | None = None
    type_path: str = ""  # the focus type fhirpathpy needs (tests compare with it)

    @property
    def compiled(self) -> Compiled:
        if self._compiled is None:
            self._compiled = self.factory()
        return self._compiled

    def evaluate(self, item: Any, env: Env) -> bool | None:
        compiled = self._compiled or self.compiled
        return compiled.evaluate(item, env)


@dataclass(slots=True, eq=False)
class Child:
    """One JSON key of a node."""

    key: str
    name: str  # element name (``value[x]`` for choices)
    label: str  # element path, for messages (``Observation.value[x]``)
    kind: int
    code: str  # FHIR type code
    array: bool
    min: int
    max: int | None  # None: unbounded
    group: str | None = None  # choice group (``value``) when the element is a choice
    check: Check | None = None
    node: Node | None = None
    binding: Binding | None = None
    targets: frozenset[str] | None = None  # reference target types; None: any
    invariants: tuple[Invariant, ...] = ()
    simple_quantity: bool = False
    uri_like: bool = False
    contained: bool = False  # DomainResource.contained
    #: a primitive with nothing to check beyond its format (the walker's fast path)
    plain: bool = False


@dataclass(slots=True)
class MemberInfo:
    """What FHIRPath member navigation needs (``fhirpath.Member``)."""

    keys: tuple[tuple[str, bool], ...]
    types: tuple[str, ...]
    children: tuple[Child, ...]

    def node(self) -> Node | None:
        if len(self.children) == 1:
            return self.children[0].node
        return None


@dataclass(slots=True, eq=False)
class Node:
    path: str  # backbone path or type name
    type_path: str  # what fhirpathpy needs for choice resolution
    children: dict[str, Child] = field(default_factory=dict)
    ext_children: dict[str, Child] = field(default_factory=dict)  # "_name" -> Child
    by_name: dict[str, MemberInfo] = field(default_factory=dict)
    #: (label, keys satisfying it, minimum) for elements with min >= 1
    required: tuple[tuple[str, tuple[str, ...], int], ...] = ()
    has_choices: bool = False
    invariants: tuple[Invariant, ...] = ()
    resource_type: str | None = None  # set on resource roots
    domain_resource: bool = False

    def member(self, name: str) -> MemberInfo | None:
        return self.by_name.get(name)


def _choice_key(name: str, code: str) -> str:
    return name[:-3] + code[0].upper() + code[1:]


def _max(value: Any) -> int | None:
    return None if value in (None, "*") else int(value)


class Model:
    """Compiles and caches nodes for a set of base StructureDefinitions."""

    def __init__(self, structure_definitions: list[dict[str, Any]],
                 bindings: Callable[[str], Binding | None]) -> None:
        self._bindings = bindings
        self.by_type: dict[str, dict[str, Any]] = {}
        for sd in structure_definitions:
            if sd.get("derivation") == "specialization" or sd.get("id") in ("Resource",
                                                                             "Element"):
                self.by_type[sd["type"]] = sd
        self._index: dict[str, dict[str, list[dict[str, Any]]]] = {}
        self._elements: dict[str, dict[str, dict[str, Any]]] = {}
        self._nodes: dict[tuple[str, str], Node] = {}
        self._ready: dict[str, Node] = {}
        self._lock = threading.RLock()
        # nodes live as long as the model, so their ids are stable keys
        self._compiled: dict[tuple[str, int, str, str | None], Compiled] = {}
        self.resource_types = frozenset(
            t for t, sd in self.by_type.items()
            if sd.get("kind") == "resource" and not sd.get("abstract")
        )

    # -- lookup ---------------------------------------------------------------------

    def _children_of(self, sd: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
        url = sd["url"]
        idx = self._index.get(url)
        if idx is None:
            idx = {}
            elements: dict[str, dict[str, Any]] = {}
            for el in sd["snapshot"]["element"]:
                elements[el["path"]] = el
                parent, _, _ = el["path"].rpartition(".")
                if parent:
                    idx.setdefault(parent, []).append(el)
            # elements first: a thread that finds the index reads them next
            self._elements[url] = elements
            self._index[url] = idx
        return idx

    def element(self, sd: dict[str, Any], path: str) -> dict[str, Any] | None:
        self._children_of(sd)
        return self._elements[sd["url"]].get(path)

    def type_node(self, code: str) -> Node | None:
        """The complete table of a type (compiled, with all it reaches, on first use)."""
        node = self._ready.get(code)
        if node is not None:
            return node
        with self._lock:  # concurrent first uses must not see half-built tables
            node = self._type_node(code)
            if node is not None:
                self._ready[code] = node
        return node

    def resource_node(self, resource_type: str) -> Node | None:
        if resource_type not in self.resource_types:
            return None
        return self.type_node(resource_type)

    def _type_node(self, code: str) -> Node | None:
        sd = self.by_type.get(code)
        if sd is None or sd.get("kind") == "primitive-type":
            return None
        return self.node(sd, sd["snapshot"]["element"][0]["path"])

    # -- compilation ----------------------------------------------------------------

    def node(self, sd: dict[str, Any], path: str) -> Node:
        key = (sd["url"], path)
        node = self._nodes.get(key)
        if node is not None:
            return node
        is_root = "." not in path
        node = Node(path, path if not is_root else sd["type"])
        self._nodes[key] = node  # registered first: types refer to themselves
        kids = self._children_of(sd).get(path, [])
        resource_root = is_root and sd.get("kind") == "resource"
        if resource_root:
            node.resource_type = sd["type"]
            node.domain_resource = sd.get("baseDefinition") == SD_BASE + "DomainResource"
        required: list[tuple[str, tuple[str, ...], int]] = []
        for el in kids:
            name = el["path"].rsplit(".", 1)[1]
            children = self._element_children(sd, el, name, resource_root)
            for ch in children:
                node.children[ch.key] = ch
                if ch.kind == PRIM:
                    node.ext_children["_" + ch.key] = ch
            if children:
                plain = name[:-3] if name.endswith("[x]") else name
                node.by_name[plain] = MemberInfo(
                    tuple((c.key, c.kind == PRIM) for c in children),
                    tuple(c.code for c in children), tuple(children))
                if name.endswith("[x]"):
                    node.has_choices = True
                if el.get("min", 0) >= 1:
                    keys: list[str] = []
                    for c in children:
                        keys.append(c.key)
                        if c.kind == PRIM:
                            keys.append("_" + c.key)
                    required.append((children[0].label, tuple(keys), int(el["min"])))
        node.required = tuple(required)
        own = self.element(sd, path)
        if own is not None:
            focus_path = sd["type"] if is_root else path
            node.invariants = self._invariants(sd, own, node, focus_path)
        return node

    def _element_children(self, sd: dict[str, Any], el: dict[str, Any], name: str,
                          resource_root: bool) -> list[Child]:
        label = el["path"]
        lo, hi = int(el.get("min", 0)), _max(el.get("max"))
        array = hi is None or hi > 1
        ref = el.get("contentReference")
        if ref:
            target = self.node(sd, ref.lstrip("#").split("#")[-1])
            return [Child(name, name, label, COMPLEX, "BackboneElement", array, lo, hi,
                          node=target)]
        types = [t for t in el.get("type", [])]
        choice = name.endswith("[x]")
        out: list[Child] = []
        for t in types:
            code: str = t["code"]
            if code == FHIRPATH_STRING or code.startswith("http://hl7.org/fhirpath/"):
                if name == "id" and resource_root:
                    code = "id"
                elif name == "url" and el["path"] == "Extension.url":
                    code = "uri"
                else:
                    code = "string"
            key = _choice_key(name, code) if choice else name
            ch = Child(key, name, label, COMPLEX, code, array, lo, hi,
                       group=name[:-3] if choice else None)
            if code == "xhtml":
                ch.kind, ch.check = XHTML, CHECKS["xhtml"]
            elif code in PRIMITIVES:
                ch.kind, ch.check = PRIM, CHECKS[code]
                ch.uri_like = code in URI_LIKE
            elif code == "Resource":
                ch.kind = RESOURCE
                ch.contained = resource_root and name == "contained"
            elif code in ("BackboneElement", "Element") and self._children_of(sd).get(
                    el["path"]):
                ch.node = self.node(sd, el["path"])
            else:
                ch.node = self._type_node(code)
                if ch.node is None:
                    raise ValueError(f"{label}: unknown type {code}")
            if SIMPLE_QUANTITY in t.get("profile", []):
                ch.simple_quantity = True
            if code == "Reference":
                targets = t.get("targetProfile") or []
                names = {p.rsplit("/", 1)[-1] for p in targets}
                if names and all(p.startswith(SD_BASE) and p.rsplit("/", 1)[-1] in
                                 self.resource_types for p in targets):
                    ch.targets = frozenset(names)
            binding = el.get("binding")
            if binding and binding.get("strength") == "required" and "valueSet" in binding \
                    and code in ("code", "Coding", "CodeableConcept", "Quantity", "string",
                                 "uri"):
                ch.binding = self._bindings(binding["valueSet"])
            out.append(ch)
        # element-level invariants apply to each occurrence; backbone elements carry
        # theirs on their own node
        for ch in out:
            if ch.node is not None and ch.node.path == el["path"]:
                continue
            focus: Any = ch.node if ch.node is not None else ch.code
            ch.invariants = self._invariants(sd, el, focus, ch.code,
                                             skip=self._type_keys(ch.code))
        for ch in out:
            ch.plain = ch.kind == PRIM and ch.binding is None and not ch.uri_like and \
                not ch.invariants
        return out

    def _type_keys(self, code: str) -> frozenset[str]:
        """Constraint keys a type declares on itself (checked on its node)."""
        sd = self.by_type.get(code)
        if sd is None:
            return frozenset()
        root = sd["snapshot"]["element"][0]
        return frozenset(c.get("key", "") for c in root.get("constraint", []) or [])

    def _invariants(self, sd: dict[str, Any], el: dict[str, Any], focus: Any,
                    type_path: str, skip: frozenset[str] = frozenset()
                    ) -> tuple[Invariant, ...]:
        out: list[Invariant] = []
        for c in el.get("constraint", []) or []:
            key = c.get("key", "")
            expr = c.get("expression")
            if not expr or key in HAND_CODED or key in SKIPPED or key in skip:
                continue
            resource = sd["type"] if sd.get("kind") == "resource" else None
            out.append(Invariant(key, c.get("severity", "error"), c.get("human", ""), expr,
                                 sd["url"], el["id"],
                                 self.factory(expr, focus, type_path, resource),
                                 type_path=type_path))
        return tuple(out)

    def factory(self, expression: str, focus: Any, type_path: str,
                resource: str | None = None) -> Callable[[], Compiled]:
        return lambda: self.compile(expression, focus, type_path, resource)

    def compile(self, expression: str, focus: Any, type_path: str,
                resource: str | None = None) -> Compiled:
        key = (expression, id(focus), type_path, resource)
        compiled = self._compiled.get(key)
        if compiled is None:
            # (the table through its lock: a profile's constraint, compiled on a thread,
            # may be the first use of its type; the loop must not see it half built)
            table = self.type_node(resource) if resource else None
            compiled = self._compiled[key] = compile_invariant(expression, focus, type_path,
                                                               table)
        return compiled


def value_sets_index(value_sets: Mapping[str, frozenset[tuple[str, str]]]
                     ) -> Callable[[str], Binding | None]:
    def lookup(url: str) -> Binding | None:
        canonical = url.split("|", 1)[0]
        codes = value_sets.get(canonical)
        if codes is None:
            return None
        return Binding(canonical, codes, frozenset(c for _, c in codes))

    return lookup
