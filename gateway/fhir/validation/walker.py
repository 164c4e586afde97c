"""Base validation: one walk over the JSON against the compiled tables.

Checks, per https://hl7.org/fhir/R4/json.html and the R4 StructureDefinitions:
unknown elements, JSON types (arrays where ``max > 1``, objects, strings,
numbers, booleans), ``null`` and empty strings/arrays/objects, cardinality,
choice elements given twice, primitive formats, ``_name`` siblings of
primitives (aligned arrays, ``null`` only opposite a value), required
bindings (``code``, ``Coding``, ``CodeableConcept``, ``Quantity``), reference
target types of literal references, narrative safety (txt-1/txt-2), nesting
depth, and the invariants: hand-written ``ele-1``, ``dom-2``..``dom-6``,
``ref-1``, ``sqty-1`` and ``bdl-*``; compiled FHIRPath for the rest, evaluated
only on elements that are present. Extensions whose URL is one of R4's own
definitions are noted (:attr:`Walker.extensions`) and checked after the walk
(``extensions``).

The walk never changes the resource.
"""

from __future__ import annotations

import re
from collections.abc import Container
from typing import Any

from gateway.fhir.outcome import Code, Findings, Issue
from gateway.fhir.references import split_restful
from gateway.fhir.validation.fhirpath import Env, EvaluationError
from gateway.fhir.validation.model import COMPLEX, PRIM, RESOURCE, Child, Invariant, Model, Node
from gateway.fhir.validation.xhtml import check_narrative

Loc = tuple[Any, str, int | None] | None

_RELATIVE_REF = re.compile(
    r"([A-Z][A-Za-z]+)/[A-Za-z0-9\-.]{1,64}(/_history/[A-Za-z0-9\-.]{1,64})?")
_ABSOLUTE_REF = re.compile(
    r"https?://\S+/([A-Z][A-Za-z]+)/[A-Za-z0-9\-.]{1,64}(/_history/[A-Za-z0-9\-.]{1,64})?")


def reference_type(reference: str) -> str | None:
    """The type a literal reference names (``Patient/1``, ``http://x/fhir/Patient/1``,
    either with ``/_history/2``); None for a contained (``#p``) or ``urn:`` one."""
    m = _RELATIVE_REF.fullmatch(reference) or _ABSOLUTE_REF.fullmatch(reference)
    return m.group(1) if m is not None else None


def render(loc: Loc) -> str:
    """``(((None, 'Patient', None), 'name', 0), 'given', 1)`` -> ``Patient.name[0].given[1]``."""
    parts: list[str] = []
    while loc is not None:
        parent, key, index = loc
        parts.append(key if index is None else f"{key}[{index}]")
        loc = parent
    return ".".join(reversed(parts))


class _Resource:
    """Per root resource: what ref-1 and dom-3 need once the walk is done."""

    __slots__ = ("contained_ids", "current_contained", "local_refs", "self_referencing")

    def __init__(self) -> None:
        # (reference, location, index of the contained resource it occurs in)
        self.local_refs: list[tuple[str, Loc, int | None]] = []
        self.contained_ids: dict[str, int] = {}
        self.current_contained: int | None = None
        self.self_referencing: set[int] = set()  # contained resources holding '#'


class Walker:
    """Validates one resource; create one per call (it holds the issues)."""

    def __init__(self, model: Model, *, max_depth: int, max_nesting: int,
                 extensions: Container[str] = frozenset()) -> None:
        self.model = model
        #: URLs of the extensions checked after the walk (``extensions.CoreExtensions``)
        self.extension_urls = extensions
        #: the extensions with one of those URLs: (extension, location)
        self.extensions: list[tuple[dict[str, Any], Loc]] = []
        self.max_depth = max_depth
        self.max_nesting = max_nesting
        #: what the walk found (the first issues kept, the rest counted: a resource of a
        #: million faulty elements costs no million issues)
        self.found = Findings()
        self.nesting = 0
        self.res = _Resource()
        self.env = Env(None, None)
        #: nested resources that claim profiles: (resource, location)
        self.nested: list[tuple[dict[str, Any], Loc]] = []
        self.evaluations = 0  # invariant evaluations (for linearity tests)

    # -- issues ---------------------------------------------------------------------

    def issue(self, code: Code, loc: Loc, message: str, severity: str = "error") -> None:
        if self.found.keeps(severity):
            self.found.issues.append(Issue(code, message, (render(loc),), severity))

    # -- resources ------------------------------------------------------------------

    def resource(self, obj: Any, loc: Loc = None, depth: int = 1) -> None:
        """Validate ``obj`` as a root resource (top level, Bundle entry, parameter)."""
        saved_res, saved_env = self.res, self.env
        self.res = _Resource()
        try:
            node = self._enter(obj, loc)
            if node is None:
                return
            if loc is None:
                loc = (None, node.resource_type or "Resource", None)
            self.env = Env(obj, obj)
            self._resource_body(node, obj, loc, depth, contained=False)
            self._local_references(obj, loc)
        finally:
            self.res, self.env = saved_res, saved_env

    def _enter(self, obj: Any, loc: Loc) -> Node | None:
        if type(obj) is not dict:
            self.issue(Code.WRONG_JSON_TYPE, loc, "a resource must be a JSON object")
            return None
        rt = obj.get("resourceType")
        if type(rt) is not str:
            self.issue(Code.INVALID_RESOURCE_TYPE, loc, "resourceType is missing")
            return None
        node = self.model.resource_node(rt)
        if node is None:
            self.issue(Code.INVALID_RESOURCE_TYPE, loc,
                       f"'{rt[:64]}' is not an R4 resource type")
        return node

    def _resource_body(self, node: Node, obj: dict[str, Any], loc: Loc, depth: int,
                       *, contained: bool) -> None:
        self.nesting += 1
        try:
            if self.nesting > self.max_nesting:
                self.issue(Code.NESTING_TOO_DEEP, loc,
                           f"resources are nested more than {self.max_nesting} deep")
                return
            self.object(node, obj, loc, depth)
            if node.domain_resource:
                self._domain_resource(obj, loc, contained)
            if node.resource_type == "Bundle":
                self._bundle(obj, loc)
            meta = obj.get("meta")
            if (self.nesting > 1 or contained) and type(meta) is dict and meta.get("profile"):
                self.nested.append((obj, loc))
        finally:
            self.nesting -= 1

    def _nested(self, ch: Child, item: Any, loc: Loc, depth: int, index: int | None) -> None:
        if not ch.contained:
            self.resource(item, loc, depth)
            return
        res = self.res
        rid = item.get("id") if type(item) is dict else None
        if type(rid) is str and index is not None:
            res.contained_ids.setdefault(rid, index)
        node = self._enter(item, loc)
        if node is None:
            return
        saved_env, saved_current = self.env, res.current_contained
        res.current_contained = index
        self.env = Env(item, self.env.root)
        try:
            self._resource_body(node, item, loc, depth, contained=True)
        finally:
            self.env, res.current_contained = saved_env, saved_current

    # -- the walk -------------------------------------------------------------------

    def object(self, node: Node, obj: dict[str, Any], loc: Loc, depth: int) -> None:
        if depth > self.max_depth:
            self.issue(Code.NESTING_TOO_DEEP, loc,
                       f"elements are nested more than {self.max_depth} deep")
            return
        children = node.children
        groups: dict[str, str] | None = {} if node.has_choices else None
        for key, value in obj.items():
            ch = children.get(key)
            if ch is None:
                ext = node.ext_children.get(key)
                if ext is not None:
                    self._primitive_extension(ext, key, value, obj, loc, depth)
                elif not (key == "resourceType" and node.resource_type is not None):
                    self.issue(Code.UNKNOWN_ELEMENT, (loc, key, None),
                               f"unknown element '{key[:64]}' in {node.path}")
                continue
            if groups is not None and ch.group is not None:
                other = groups.setdefault(ch.group, key)
                if other != key:
                    self.issue(Code.MAX_CARDINALITY, (loc, key, None),
                               f"{ch.label} is given twice ('{other}' and '{key}')")
            if value is None:
                self.issue(Code.EMPTY_VALUE, (loc, key, None), f"{ch.label} is null")
                continue
            if ch.array:
                if type(value) is not list:
                    self.issue(Code.WRONG_JSON_TYPE, (loc, key, None),
                               f"{ch.label} must be a JSON array")
                    continue
                n = len(value)
                if n == 0:
                    self.issue(Code.EMPTY_VALUE, (loc, key, None),
                               f"{ch.label} is an empty array")
                    continue
                if ch.max is not None and n > ch.max:
                    self.issue(Code.MAX_CARDINALITY, (loc, key, None),
                               f"{ch.label} allows at most {ch.max}, found {n}")
                if ch.plain:
                    check = ch.check
                    for i, item in enumerate(value):
                        if item is None or check(item) is not None:  # type: ignore[misc]
                            self.item(ch, item, (loc, key, i), depth + 1, obj, i)
                else:
                    for i, item in enumerate(value):
                        self.item(ch, item, (loc, key, i), depth + 1, obj, i)
            else:
                if type(value) is list:
                    self.issue(Code.WRONG_JSON_TYPE, (loc, key, None),
                               f"{ch.label} allows one value, not an array")
                    continue
                if ch.plain and ch.check(value) is None:  # type: ignore[misc]
                    continue
                self.item(ch, value, (loc, key, None), depth + 1, obj, None)
        for label, keys, minimum in node.required:
            present = 0
            for k in keys:
                v = obj.get(k)
                if v is not None:
                    present = max(present, len(v) if type(v) is list else 1)
            if present < minimum:
                self.issue(Code.MIN_CARDINALITY, loc,
                           f"{label} is required" if minimum == 1 and not present else
                           f"{label} needs at least {minimum}, found {present}")
        if node.invariants:
            self.invariants(node.invariants, obj, loc)

    def item(self, ch: Child, item: Any, loc: Loc, depth: int, parent: dict[str, Any],
             index: int | None) -> None:
        kind = ch.kind
        if kind == PRIM:
            if item is None:
                if index is None or _ext_at(parent, ch.key, index) is None:
                    self.issue(Code.EMPTY_VALUE, loc, f"{ch.label} is null")
                return
            problem = ch.check(item)  # type: ignore[misc]
            if problem is not None:
                kind_of = Code.WRONG_JSON_TYPE if problem.startswith("must be a JSON") else \
                    Code.INVALID_PRIMITIVE
                self.issue(kind_of, loc, f"{ch.label} ({ch.code}) {problem}")
                return
            if ch.binding is not None and item not in ch.binding.code_values:
                self.issue(Code.CODE_NOT_IN_VALUESET, loc,
                           f"'{str(item)[:64]}' is not in the required value set "
                           f"{ch.binding.value_set} ({ch.label})")
            if ch.uri_like and item[:1] == "#":
                self.res.local_refs.append((item, loc, self.res.current_contained))
            if ch.invariants:
                self.invariants(ch.invariants, item, loc)
            return
        if kind == COMPLEX:
            if type(item) is not dict:
                self.issue(Code.WRONG_JSON_TYPE, loc,
                           f"{ch.label} ({ch.code}) must be a JSON object")
                return
            if not item:
                self.issue(Code.EMPTY_VALUE, loc, f"{ch.label} is an empty object")
                return
            if len(item) == 1 and "id" in item:
                self.issue(Code.INVARIANT_FAILED, loc,
                           f"ele-1: {ch.label} has no value and no children but id")
            self.object(ch.node, item, loc, depth)  # type: ignore[arg-type]
            code = ch.code
            if code == "Reference":
                self._reference(ch, item, loc)
            elif code == "Extension":
                url = item.get("url")
                if type(url) is str and url in self.extension_urls:
                    self.extensions.append((item, loc))
            if ch.binding is not None:
                self._coded(ch, item, loc)
            if ch.simple_quantity and "comparator" in item:
                self.issue(Code.INVARIANT_FAILED, (loc, "comparator", None),
                           f"sqty-1: {ch.label} is a SimpleQuantity: no comparator allowed")
            if ch.invariants:
                self.invariants(ch.invariants, item, loc)
            return
        if kind == RESOURCE:
            self._nested(ch, item, loc, depth, index)
            return
        # XHTML
        if type(item) is not str:
            self.issue(Code.WRONG_JSON_TYPE, loc, f"{ch.label} must be a JSON string")
            return
        if not item:
            self.issue(Code.EMPTY_VALUE, loc, f"{ch.label} is an empty string")
            return
        for key, message in check_narrative(item):
            # txt-2's executable R4 definition is htmlChecks(), the same as txt-1's; only
            # its human text asks for content, so an empty narrative is a warning
            self.issue(Code.UNSAFE_NARRATIVE, loc, f"{key}: {message}",
                       "warning" if key == "txt-2" else "error")

    def _primitive_extension(self, ch: Child, key: str, value: Any, obj: dict[str, Any],
                             loc: Loc, depth: int) -> None:
        base = obj.get(ch.key)
        if value is None:
            self.issue(Code.EMPTY_VALUE, (loc, key, None), f"{key} is null")
            return
        if ch.array:
            if type(value) is not list:
                self.issue(Code.WRONG_JSON_TYPE, (loc, key, None), f"{key} must be a JSON array")
                return
            if not value:
                self.issue(Code.EMPTY_VALUE, (loc, key, None), f"{key} is an empty array")
                return
            if base is not None and (type(base) is not list or len(base) != len(value)):
                self.issue(Code.WRONG_JSON_TYPE, (loc, key, None),
                           f"{key} must have as many entries as {ch.key}")
                return
            if base is None and ch.max is not None and len(value) > ch.max:
                self.issue(Code.MAX_CARDINALITY, (loc, key, None),
                           f"{ch.label} allows at most {ch.max}, found {len(value)}")
            for i, item in enumerate(value):
                if item is None:
                    if base is None or base[i] is None:
                        self.issue(Code.EMPTY_VALUE, (loc, key, i), f"{key}[{i}] is null")
                    continue
                self._element_object(item, (loc, key, i), depth + 1)
            return
        if type(value) is list:
            self.issue(Code.WRONG_JSON_TYPE, (loc, key, None), f"{key} must be a JSON object")
            return
        self._element_object(value, (loc, key, None), depth + 1)

    def _element_object(self, value: Any, loc: Loc, depth: int) -> None:
        if type(value) is not dict:
            self.issue(Code.WRONG_JSON_TYPE, loc, "the extensions of a primitive must be an "
                                                  "object")
            return
        if not value:
            self.issue(Code.EMPTY_VALUE, loc, "empty object")
            return
        if len(value) == 1 and "id" in value:
            self.issue(Code.INVARIANT_FAILED, loc, "ele-1: no value and no extensions")
        element = self.model.type_node("Element")
        assert element is not None
        self.object(element, value, loc, depth)

    # -- invariants -----------------------------------------------------------------

    def invariants(self, invariants: tuple[Invariant, ...], item: Any, loc: Loc) -> None:
        env = self.env
        for inv in invariants:
            self.evaluations += 1
            try:
                ok = inv.evaluate(item, env)
            except (EvaluationError, TypeError, ValueError, AttributeError, KeyError,
                    IndexError, ArithmeticError) as exc:
                self.issue(Code.INVARIANT_NOT_EVALUATED, loc,
                           f"{inv.key} could not be evaluated ({exc}); constraint on "
                           f"{inv.element} in {inv.source}", "warning")
                continue
            if ok is False:
                self.issue(Code.INVARIANT_FAILED, loc,
                           f"{inv.key}: {inv.human} (constraint on {inv.element} in "
                           f"{inv.source}: {inv.expression})", inv.severity)

    # -- datatypes with hand-written rules -------------------------------------------

    def _reference(self, ch: Child, item: dict[str, Any], loc: Loc) -> None:
        ref = item.get("reference")
        if type(ref) is not str:
            return
        if ref[:1] == "#":
            self.res.local_refs.append((ref, (loc, "reference", None),
                                        self.res.current_contained))
            return
        if ch.targets is None:
            return
        target = reference_type(ref)
        if target in self.model.resource_types and target not in ch.targets:
            self.issue(Code.INVALID_REFERENCE_TARGET, (loc, "reference", None),
                       f"{ch.label} may refer to {', '.join(sorted(ch.targets))}, "
                       f"not {target}")

    def _coded(self, ch: Child, item: dict[str, Any], loc: Loc) -> None:
        binding = ch.binding
        assert binding is not None
        code = ch.code
        if code == "CodeableConcept":
            codings = item.get("coding")
            if type(codings) is not list or not codings:
                self.issue(Code.CODE_NOT_IN_VALUESET, loc,
                           f"{ch.label} has no coding, and one from the required value set "
                           f"{binding.value_set} is needed")
                return
            for c in codings:
                if type(c) is dict and _coding_in(c, binding.codes, binding.code_values):
                    return
            self.issue(Code.CODE_NOT_IN_VALUESET, loc,
                       f"no coding of {ch.label} is in the required value set "
                       f"{binding.value_set}")
            return
        if "code" not in item:
            return
        if not _coding_in(item, binding.codes, binding.code_values):
            self.issue(Code.CODE_NOT_IN_VALUESET, loc,
                       f"{item.get('system')}|{str(item.get('code'))[:64]} is not in the "
                       f"required value set {binding.value_set} ({ch.label})")

    def _domain_resource(self, obj: dict[str, Any], loc: Loc, contained: bool) -> None:
        if contained:
            if "contained" in obj:
                self.issue(Code.INVARIANT_FAILED, (loc, "contained", None),
                           "dom-2: a contained resource may not contain resources")
            meta = obj.get("meta")
            if type(meta) is dict:
                if "versionId" in meta or "lastUpdated" in meta:
                    self.issue(Code.INVARIANT_FAILED, (loc, "meta", None),
                               "dom-4: a contained resource may not have meta.versionId or "
                               "meta.lastUpdated")
                if "security" in meta:
                    self.issue(Code.INVARIANT_FAILED, (loc, "meta", None),
                               "dom-5: a contained resource may not have a security label")
            return
        text = obj.get("text")
        if type(text) is not dict or "div" not in text:
            self.issue(Code.INVARIANT_FAILED, loc,
                       "dom-6: a resource should have narrative for robust management",
                       "warning")

    def _local_references(self, obj: dict[str, Any], loc: Loc) -> None:
        """ref-1 and dom-3 of one root resource, after its walk."""
        res = self.res
        referenced: set[str] = set()
        for ref, where, inside in res.local_refs:
            if ref == "#":
                if inside is None:
                    self.issue(Code.INVARIANT_FAILED, where,
                               "ref-1: '#' refers to the container, but this is no "
                               "contained resource")
                else:
                    res.self_referencing.add(inside)
                continue
            target = ref[1:]
            referenced.add(target)
            if target not in res.contained_ids and where is not None and \
                    where[1] == "reference":
                self.issue(Code.INVARIANT_FAILED, where,
                           f"ref-1: '{ref[:64]}' names no contained resource")
        for rid, index in res.contained_ids.items():
            if rid not in referenced and index not in res.self_referencing:
                self.issue(Code.INVARIANT_FAILED, (loc, "contained", index),
                           f"dom-3: contained resource '{rid[:64]}' is not referenced from "
                           "the rest of the resource")
        contained = obj.get("contained")
        if type(contained) is list:
            for i, c in enumerate(contained):
                if type(c) is dict and "id" not in c:
                    self.issue(Code.INVARIANT_FAILED, (loc, "contained", i),
                               "dom-3: a contained resource needs an id to be referenced")

    # -- Bundle (bdl-*) --------------------------------------------------------------

    def _bundle(self, obj: dict[str, Any], loc: Loc) -> None:
        btype = obj.get("type")
        entries = obj.get("entry")
        if type(entries) is not list:
            entries = []
        if "total" in obj and btype not in ("searchset", "history"):
            self.issue(Code.INVARIANT_FAILED, (loc, "total", None),
                       "bdl-1: total only when a search or history")
        wants_request = btype in ("batch", "transaction", "history")
        wants_response = btype in ("batch-response", "transaction-response", "history")
        seen: set[tuple[str, str]] = set()
        for i, e in enumerate(entries):
            if type(e) is not dict:
                continue
            where = (loc, "entry", i)
            if "search" in e and btype != "searchset":
                self.issue(Code.INVARIANT_FAILED, where,
                           "bdl-2: entry.search only when a search")
            if ("request" in e) != wants_request:
                self.issue(Code.INVARIANT_FAILED, where,
                           "bdl-3: entry.request mandatory for batch/transaction/history, "
                           "otherwise prohibited")
            if ("response" in e) != wants_response:
                self.issue(Code.INVARIANT_FAILED, where,
                           "bdl-4: entry.response mandatory for batch-response/"
                           "transaction-response/history, otherwise prohibited")
            if not ("resource" in e or "request" in e or "response" in e):
                self.issue(Code.INVARIANT_FAILED, where,
                           "bdl-5: an entry must have a resource unless there is a request "
                           "or response")
            full_url = e.get("fullUrl")
            if type(full_url) is str:
                if "/_history/" in full_url:
                    self.issue(Code.INVARIANT_FAILED, (where, "fullUrl", None),
                               "bdl-8: fullUrl cannot be a version specific reference")
                else:
                    self._full_url_names_resource(full_url, e.get("resource"), where)
                if btype != "history":
                    resource = e.get("resource")
                    meta = resource.get("meta") if type(resource) is dict else None
                    version = meta.get("versionId") if type(meta) is dict else None
                    pair = (full_url, version if type(version) is str else "")
                    if pair in seen:
                        self.issue(Code.INVARIANT_FAILED, (where, "fullUrl", None),
                                   f"bdl-7: fullUrl '{full_url[:100]}' (with that versionId) "
                                   "is not unique in the Bundle")
                    seen.add(pair)
        if btype == "document":
            ident = obj.get("identifier")
            if type(ident) is not dict or "system" not in ident or "value" not in ident:
                self.issue(Code.INVARIANT_FAILED, loc,
                           "bdl-9: a document must have an identifier with a system and a "
                           "value")
            if type(obj.get("timestamp")) is not str:
                self.issue(Code.INVARIANT_FAILED, loc, "bdl-10: a document must have a date")
            if _first_resource_type(entries) != "Composition":
                self.issue(Code.INVARIANT_FAILED, loc,
                           "bdl-11: a document must have a Composition as the first resource")
        if btype == "message" and _first_resource_type(entries) != "MessageHeader":
            self.issue(Code.INVARIANT_FAILED, loc,
                       "bdl-12: a message must have a MessageHeader as the first resource")


    def _full_url_names_resource(self, full_url: str, resource: Any, where: Loc) -> None:
        """Bundle.entry.fullUrl: "The fullUrl SHALL NOT disagree with the id in the
        resource - i.e. if the fullUrl is not a urn:uuid, the URL shall be version-
        independent URL consistent with the Resource.id". Judged when the fullUrl is
        an http(s) URL ending in ``Type/id`` and the resource has an id; a warning, as
        three of R4's own examples disagree (Bundle-lri-example's ``Observation/
        lri-gramstain1`` holds Observation ``gramstain1``)."""
        if type(resource) is not dict or type(resource.get("id")) is not str:
            return
        split = split_restful(full_url)
        named = f"{resource.get('resourceType')}/{resource['id']}"
        if split is not None and split[1] != named:
            self.issue(Code.INVARIANT_FAILED, (where, "fullUrl", None),
                       f"fullUrl '{full_url[:100]}' names {split[1][:100]}, but the entry's"
                       f" resource is {named[:100]}: the fullUrl SHALL NOT disagree with"
                       " the id in the resource (Bundle.entry.fullUrl)", severity="warning")


def _first_resource_type(entries: list[Any]) -> str | None:
    if not entries or type(entries[0]) is not dict:
        return None
    resource = entries[0].get("resource")
    return resource.get("resourceType") if type(resource) is dict else None


def _ext_at(obj: dict[str, Any], key: str, index: int) -> Any:
    ext = obj.get("_" + key)
    if type(ext) is list and index < len(ext):
        return ext[index]
    return None


def _coding_in(c: dict[str, Any], codes: frozenset[tuple[str, str]],
               code_values: frozenset[str]) -> bool:
    code = c.get("code")
    if type(code) is not str:
        return False
    system = c.get("system")
    if type(system) is str:
        return (system, code) in codes
    return code in code_values
