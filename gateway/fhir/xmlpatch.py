"""XML Patch: RFC 5261, as the media type ``application/xml-patch+xml`` (RFC 7351)
names it; https://hl7.org/fhir/R4/http.html#patch.

A patch document is ``<diff>`` (RFC 5261's examples) or ``<p:patch
xmlns:p="urn:ietf:rfc:7351">`` (RFC 7351) holding, in order, operations (RFC 5261
defines their types, not their namespace: ``<diff>``, ``<add>``, ``<replace>`` and
``<remove>`` are taken in any, so ``<diff xmlns="http://hl7.org/fhir">`` names
FHIR's elements without prefixes):

* ``<add sel="…">`` adds its content (elements, text, comments): as the last
  children of the element selected, or with ``pos="prepend"`` as its first, or
  with ``pos="before"``/``"after"`` beside the node selected; with
  ``type="@name"`` it adds an attribute of that name, its text the value;
* ``<replace sel="…">`` puts its content in the place of the node selected: one
  element for an element, text for an attribute's value or a text node, one
  comment or processing instruction for one;
* ``<remove sel="…">`` removes the node selected, with ``ws="before"``,
  ``"after"`` or ``"both"`` the whitespace text beside an element too.

Selectors (``sel``) are the XPath subset RFC 5261 defines (section 8.1) and no
more: a location path of child steps, each an element name (``f:name``) or ``*``
with predicates ``[n]``, ``[@a='v']``, ``[name='v']`` or ``[.='v']``, ending in
such a step, ``text()``, ``comment()``, ``processing-instruction()`` (with
``[n]``) or ``@attribute``. It is read by the parser here and walked over the
tree, never given to an XPath engine (libxml2's has no time limit); anything else
is refused, as are ``id()`` (FHIR XML declares no IDs) and namespace nodes
(``namespace::``, ``type="namespace::…"``: FHIR XML has no prefixes to declare).
A prefix names the namespace the operation element declares for it; a name
without one is in the operation's default namespace, if any (RFC 5261 4.2.1):
FHIR's elements are in ``http://hl7.org/fhir``, the narrative's in XHTML's.

A selector must select exactly one node (RFC 5261 4.1, ``<unlocated-node>``).
Errors name the operation (its index, kind and selector) and RFC 5261's error
(section 5.1), never the resource's content: a patch may be allowed where a
read is not.

The walk is bounded: all selectors of a patch together examine at most
:data:`MAX_VISITS` nodes (413 beyond), whatever the resource and the selectors.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

from lxml import etree  # type: ignore[import-untyped]

from gateway.fhir import xml as fhir_xml
from gateway.fhir.budget import Visits
from gateway.fhir.outcome import Code, FhirError
from gateway.fhir.validation.xhtml import MAX_ATTRIBUTES

MEDIA_TYPE = "application/xml-patch+xml"
RFC7351_NS = "urn:ietf:rfc:7351"
XML_NS = "http://www.w3.org/XML/1998/namespace"
#: nodes all selectors of one patch may examine (a child looked at, a predicate
#: tested): about a second of work
MAX_VISITS = 2_000_000
#: the nodes in an element (a fixed expression: no client's XPath is evaluated)
_SIZE = etree.XPath("count(descendant-or-self::node())")

_OPERATIONS = ("add", "replace", "remove")
_ATTRIBUTES = {"add": {"sel", "pos", "type"}, "replace": {"sel"}, "remove": {"sel", "ws"}}
_NCNAME = r"[^\W\d][\w.\-]*"
_QNAME = re.compile(rf"(?:({_NCNAME}):)?({_NCNAME})")
_NAME_OR_STAR = re.compile(rf"\*|(?:{_NCNAME}:)?{_NCNAME}")
_LITERAL = re.compile(r"'([^']*)'|\"([^\"]*)\"")
_POSITION = re.compile(r"\[([0-9]+)\]")
_NODE_TEST = re.compile(
    rf"(text|comment)\(\)|processing-instruction\(('{_NCNAME}'|\"{_NCNAME}\")?\)")


def _bad(message: str) -> FhirError:
    return FhirError(Code.INVALID_PATCH, f"XML Patch: {message}")


class _Refused(Exception):
    """What is wrong with one operation (its message says it to the client)."""


# -- the patch document ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Document:
    """A parsed XML Patch document: its operation elements, not yet checked."""

    elements: list[etree._Element]

    def __len__(self) -> int:
        return len(self.elements)


def parse(data: bytes) -> Document:
    """The operations of an XML Patch document, hardened as every XML input (no DTD,
    no entities, no network): GW-1027 when it is not XML, GW-1016 when it is not an
    XML Patch."""
    root = fhir_xml.parse(data, _bad)
    if _local(root.tag) != "diff" and root.tag != f"{{{RFC7351_NS}}}patch":
        raise _bad(f"the document is <{_clark(root.tag)}>, not <diff> (RFC 5261) or <patch>"
                   f" in {RFC7351_NS} (RFC 7351)")
    if (root.text or "").strip():
        raise _bad("text is not an operation")
    elements = []
    for child in root:
        if (child.tail or "").strip():
            raise _bad("text is not an operation")
        if isinstance(child.tag, str):
            elements.append(child)
    return Document(elements)


def _clark(tag: Any) -> str:
    return str(tag)[:100]


# -- selectors -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Step:
    """One child step: ``kind`` element, text, comment, pi (children) or attribute;
    ``name`` the Clark name (element, attribute), the PI's target, or None (any);
    ``conds`` the predicates in order: a position, or (what, name, literal) with what
    ``@`` (an attribute), ``child`` (a child element's text) or ``.`` (its own)."""

    kind: str
    name: str | None
    conds: tuple[int | tuple[str, str | None, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Operation:
    kind: str  # add, replace, remove
    sel: str
    steps: tuple[_Step, ...]
    element: etree._Element  # for its content
    pos: str | None = None
    attribute: str | None = None  # add type="@name": the Clark name
    ws: str | None = None
    #: a name of the selector without a prefix, in no namespace (a hint when it fails)
    unqualified: bool = False

    def named(self) -> str:
        return f"{self.kind} {self.sel[:200]}"


def check(document: Document) -> list[Operation]:
    """The operations of ``document``, their selectors parsed: GW-1016 naming the
    first that is not an RFC 5261 operation."""
    ops = []
    for n, element in enumerate(document.elements):
        kind = _operation_name(element.tag)
        if kind is None:
            raise _bad(f"operation {n}: <{_clark(element.tag)}> is not <add>, <replace> or"
                       " <remove> (invalid-patch-directive)")
        try:
            ops.append(_operation(kind, element))
        except _Refused as exc:
            sel = str(element.get("sel"))[:200]
            raise _bad(f"operation {n} ({kind} {sel}): {exc}") from None
    return ops


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _operation_name(tag: str) -> str | None:
    local = _local(tag)
    return local if local in _OPERATIONS else None


def _operation(kind: str, element: etree._Element) -> Operation:
    for name in element.attrib:
        if name not in _ATTRIBUTES[kind]:
            raise _Refused(f"<{kind}> has no attribute '{_clark(name)}'")
    sel = element.get("sel")
    if sel is None:
        raise _Refused("the selector (sel) is missing")
    pos, ws, type_ = element.get("pos"), element.get("ws"), element.get("type")
    if pos not in (None, "before", "after", "prepend"):
        raise _Refused("pos is before, after or prepend")
    if ws not in (None, "before", "after", "both"):
        raise _Refused("ws is before, after or both (invalid-whitespace-directive)")
    names = _Names(element)
    steps = _parse_selector(sel, names, add=kind == "add")
    attribute = None
    if type_ is not None:
        if type_.startswith("namespace::"):
            raise _Refused("namespace declarations are not patched: FHIR XML has only its"
                           " default namespaces")
        match = _QNAME.fullmatch(type_[1:]) if type_.startswith("@") else None
        if match is None:
            raise _Refused("type is @name (an attribute) (invalid-attribute-value)")
        attribute = names.attribute(match)
        if pos is not None:
            raise _Refused("an attribute has no position (pos)")
    if kind == "replace":  # refused now rather than half-way
        if steps[-1].kind == "attribute":
            _text_of(element)
        else:
            _content(element, kind, steps[-1].kind)
    elif attribute is not None:
        _text_of(element)
    return Operation(kind, sel, steps, element, pos, attribute, ws, names.unqualified)


class _Names:
    """Names in a selector resolved against the operation element's namespaces."""

    def __init__(self, element: etree._Element) -> None:
        self.nsmap: dict[str | None, str] = dict(element.nsmap)
        self.unqualified = False

    def _uri(self, prefix: str) -> str:
        if prefix == "xml":
            return XML_NS
        uri = self.nsmap.get(prefix)
        if uri is None:
            raise _Refused(f"the prefix '{prefix[:50]}' is not declared (invalid-namespace-prefix)")
        return uri

    def element(self, text: str) -> str | None:
        if text == "*":
            return None
        match = _QNAME.fullmatch(text)
        assert match is not None
        prefix, local = match.groups()
        uri = self._uri(prefix) if prefix else self.nsmap.get(None)
        self.unqualified = self.unqualified or uri is None
        return f"{{{uri}}}{local}" if uri else local

    def attribute(self, match: re.Match[str]) -> str:
        prefix, local = match.groups()  # no prefix: no namespace (XPath 1.0 2.3)
        return f"{{{self._uri(prefix)}}}{local}" if prefix else local


def _parse_selector(sel: str, names: _Names, *, add: bool) -> tuple[_Step, ...]:
    """RFC 5261 8.1's ``xpath`` (``xpath-add`` for ``add``: no attribute last)."""
    refused = _Refused("the selector is not one RFC 5261 allows (invalid-xpath): only a path"
                       " of child steps (/f:a/f:b[2]/f:c[@d='e']/@value, text(),"
                       " comment()), without // , axes or functions")
    if sel.startswith("id(") or sel.startswith("/id("):
        raise _Refused("id() is not supported: FHIR XML declares no IDs"
                       " (unsupported-id-function)")
    at = 1 if sel.startswith("/") else 0
    steps: list[_Step] = []
    while True:
        step, at = _parse_step(sel, at, names, refused)
        steps.append(step)
        if at == len(sel):
            break
        if sel[at] != "/" or step.kind != "element":
            raise refused
        at += 1
    if add and steps[-1].kind == "attribute":
        raise _Refused("<add> selects the node to add to or beside, not an attribute: add"
                       " one with type=\"@name\"")
    return tuple(steps)


def _parse_step(sel: str, at: int, names: _Names,
                refused: _Refused) -> tuple[_Step, int]:
    if sel.startswith("namespace::", at):
        raise _Refused("namespace nodes are not patched: FHIR XML has only its default"
                       " namespaces")
    if sel.startswith("@", at):
        match = _QNAME.match(sel, at + 1)
        if match is None or match.end() != len(sel):
            raise refused
        return _Step("attribute", names.attribute(match)), match.end()
    test = _NODE_TEST.match(sel, at)
    if test is not None:
        kind = test.group(1) or "pi"
        target = test.group(2)[1:-1] if test.group(2) else None
        at = test.end()
        position = _POSITION.match(sel, at)
        conds: tuple[int, ...] = ()
        if position is not None:
            conds, at = (_position(position.group(1)),), position.end()
        return _Step(kind, target, conds), at
    match = _NAME_OR_STAR.match(sel, at)
    if match is None:
        raise refused
    name, at = names.element(match.group()), match.end()
    preds: list[int | tuple[str, str | None, str]] = []
    while sel.startswith("[", at):
        position = _POSITION.match(sel, at)
        if position is not None:
            preds.append(_position(position.group(1)))
            at = position.end()
            continue
        at += 1
        if sel.startswith(".", at):
            what, key, at = ".", None, at + 1
        else:
            attr = sel.startswith("@", at)
            qname = _QNAME.match(sel, at + attr)
            if qname is None:
                raise refused
            what = "@" if attr else "child"
            key = names.attribute(qname) if attr else names.element(qname.group())
            at = qname.end()
        literal = _LITERAL.match(sel, at + 1) if sel.startswith("=", at) else None
        if literal is None or not sel.startswith("]", literal.end()):
            raise refused
        value = literal.group(1) if literal.group(1) is not None else literal.group(2)
        preds.append((what, key, value))
        at = literal.end() + 1
    return _Step("element", name, tuple(preds)), at


def _position(digits: str) -> int:
    """``[n]``'s n; one beyond any document as 10**9 (Python reads no more than 4,300
    digits)."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) < 10 else 10**9


# -- the tree --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Attribute:
    element: etree._Element
    name: str


@dataclass(frozen=True, slots=True)
class _Text:
    """A text node: ``parent.text`` (``after`` None) or ``after.tail``."""

    parent: etree._Element
    after: etree._Element | None

    @property
    def value(self) -> str:
        return (self.parent.text if self.after is None else self.after.tail) or ""

    def set(self, value: str | None) -> None:
        if self.after is None:
            self.parent.text = value
        else:
            self.after.tail = value


def _is_element(node: Any) -> bool:
    return isinstance(node, etree._Element) and isinstance(node.tag, str)


def _select(root: etree._Element, steps: tuple[_Step, ...], visits: Visits) -> list[Any]:
    context: list[etree._Element | None] = [None]  # None: the document node
    found: list[Any] = []
    for i, step in enumerate(steps):
        found = []
        for node in context:
            found += _children(root, node, step, visits)
        if i + 1 < len(steps):
            context = found
    return found


def _children(root: etree._Element, node: etree._Element | None, step: _Step,
              visits: Visits) -> list[Any]:
    if step.kind == "attribute":
        return [_Attribute(node, step.name)] if node is not None and step.name is not None \
            and step.name in node.attrib else []
    if node is None:  # the document node: its one element
        candidates: list[Any] = [root] if step.kind == "element" and (
            step.name is None or root.tag == step.name) else []
    else:
        visits.spend(len(node) + 1)
        if step.kind == "element":
            candidates = list(node.iterchildren(step.name or etree.Element))
        elif step.kind == "text":
            candidates = [t for t in [_Text(node, None)] + [_Text(node, c) for c in node]
                          if t.value]
        elif step.kind == "comment":
            candidates = [c for c in node if isinstance(c, etree._Comment)]
        else:
            candidates = [c for c in node if isinstance(c, etree._ProcessingInstruction)
                          and (step.name is None or c.target == step.name)]
    for cond in step.conds:
        visits.spend(len(candidates))
        if isinstance(cond, int):
            candidates = candidates[cond - 1:cond] if cond >= 1 else []
        else:
            candidates = [c for c in candidates if _holds(c, cond, visits)]
    return candidates


def _holds(element: etree._Element, cond: tuple[str, str | None, str], visits: Visits) -> bool:
    what, name, literal = cond
    if what == "@":
        return bool(element.get(name) == literal)
    if what == ".":
        return _string_value(element, visits) == literal
    visits.spend(len(element))
    return any(_string_value(c, visits) == literal for c in element.iterchildren(name))


def _string_value(element: etree._Element, visits: Visits) -> str:
    """XPath's string-value of an element: the text in it (a walk over all it holds,
    in C: a tenth of a visit a node; each call costs as ten)."""
    visits.spend(10 + int(_SIZE(element)) // 10)
    return str(etree.tostring(element, method="text", encoding="unicode", with_tail=False))


# -- applying --------------------------------------------------------------------------


def apply(root: etree._Element, ops: list[Operation]) -> etree._Element:
    """``root`` patched (in place; the root element itself may be replaced): GW-1016
    naming the first operation that cannot be applied."""
    visits = Visits(MAX_VISITS, f"XML Patch: the selectors would examine more than"
                                f" {MAX_VISITS} nodes of the resource; send fewer"
                                " operations or more precise selectors")
    for n, op in enumerate(ops):
        try:
            found = _select(root, op.steps, visits)
            if len(found) != 1:
                hint = "" if found or not op.unqualified else (
                    f"; a name without a prefix is in no namespace unless the operation"
                    f" declares a default one: FHIR's elements are in {fhir_xml.FHIR_NS}")
                raise _Refused(f"the selector matches {len(found)} nodes, not one"
                               f" (unlocated-node){hint}")
            root = _apply(root, op, found[0])
        except _Refused as exc:
            raise _bad(f"operation {n} ({op.named()}): {exc}") from None
    return root


def _apply(root: etree._Element, op: Operation, node: Any) -> etree._Element:
    if op.kind == "add":
        _add(root, op, node)
    elif op.kind == "replace":
        return _replace(root, op, node)
    else:
        _remove(root, op, node)
    return root


def _content(element: etree._Element, kind: str, target: str) -> list[Any]:
    """What an operation puts into the tree: text and copies of nodes, in order."""
    pieces: list[Any] = [element.text] if element.text else []
    for child in element:
        new = copy.deepcopy(child)
        new.tail = None
        pieces.append(new)
        if child.tail:
            pieces.append(child.tail)
    if kind == "replace":
        nodes = [p for p in pieces if not isinstance(p, str)]
        text = [p for p in pieces if isinstance(p, str) and p.strip()]
        if target == "text":
            if nodes:
                raise _Refused("a text node is replaced by text (invalid-node-types)")
        elif len(nodes) != 1 or text or _kind(nodes[0]) != target:
            raise _Refused(f"a node of the kind selected ({target}) is replaced by one such"
                           " node, nothing else (invalid-node-types)")
    return pieces


def _kind(node: etree._Element) -> str:
    """A node's kind as a selector's last step names it."""
    return "element" if _is_element(node) else \
        "comment" if isinstance(node, etree._Comment) else "pi"


def _text_of(element: etree._Element) -> str:
    if len(element):
        raise _Refused("an attribute's value is text, not elements (invalid-node-types)")
    return element.text or ""


def _add(root: etree._Element, op: Operation, node: Any) -> None:
    if isinstance(node, _Text) and op.pos is None:
        raise _Refused("text has no children: add beside it (pos before or after)"
                       " (invalid-node-types)")
    if op.attribute is not None:
        if not _is_element(node):
            raise _Refused("only an element has attributes (invalid-node-types)")
        if op.attribute in node.attrib:
            raise _Refused("the attribute is there already: replace it"
                           " (invalid-attribute-value)")
        if len(node.attrib) >= MAX_ATTRIBUTES:
            raise _Refused(f"an element has at most {MAX_ATTRIBUTES} attributes")
        node.set(op.attribute, _text_of(op.element))
        return
    pieces = _content(op.element, "add", "")
    if op.pos in (None, "prepend"):
        if not _is_element(node):
            raise _Refused("only an element has children: add beside it (pos before or"
                           " after) (invalid-node-types)")
        if op.pos is None:
            _insert(node, len(node), pieces, None)
        else:
            following, node.text = node.text, None
            _insert(node, 0, pieces, following)
        return
    if isinstance(node, _Text):
        index = 0 if node.after is None else node.parent.index(node.after) + 1
        if op.pos == "before":
            following = node.value
            node.set(None)
            _insert(node.parent, index, pieces, following)
        else:
            _insert(node.parent, index, pieces, None)
        return
    parent = node.getparent()
    if parent is None:
        raise _Refused("the resource is the document's only element: nothing is added"
                       " beside it (invalid-root-element-operation)")
    index = parent.index(node)
    if op.pos == "before":
        _insert(parent, index, pieces, None)
    else:
        following, node.tail = node.tail, None
        _insert(parent, index + 1, pieces, following)


def _insert(parent: etree._Element, index: int, pieces: list[Any], following: str | None) -> None:
    """``pieces`` into ``parent`` where its child ``index`` is, after the text before
    it; then ``following``, text that was after that place."""
    for piece in [*pieces, following] if following else pieces:
        if isinstance(piece, str):
            if index == 0:
                parent.text = (parent.text or "") + piece
            else:
                before = parent[index - 1]
                before.tail = (before.tail or "") + piece
        else:
            parent.insert(index, piece)
            index += 1


def _replace(root: etree._Element, op: Operation, node: Any) -> etree._Element:
    if isinstance(node, _Attribute):
        node.element.set(node.name, _text_of(op.element))
        return root
    if isinstance(node, _Text):
        _content(op.element, "replace", "text")
        node.set(op.element.text or None)
        return root
    new = next(p for p in _content(op.element, "replace", _kind(node))
               if not isinstance(p, str))
    parent = node.getparent()
    if parent is None:
        return new  # the resource itself: the patched one must still be it (type and id)
    new.tail = node.tail
    parent.replace(node, new)
    return root


def _remove(root: etree._Element, op: Operation, node: Any) -> None:
    if op.ws is not None and (isinstance(node, (_Attribute, _Text))):
        raise _Refused("ws is for an element, comment or processing instruction"
                       " (invalid-whitespace-directive)")
    if isinstance(node, _Attribute):
        del node.element.attrib[node.name]
        return
    if isinstance(node, _Text):
        node.set(None)
        return
    parent = node.getparent()
    if parent is None:
        raise _Refused("the resource itself is not removed (invalid-root-element-operation)")
    previous = node.getprevious()
    before = _Text(parent, previous)
    if op.ws in ("before", "both"):
        if not before.value or before.value.strip():
            raise _Refused("no whitespace text stands before the node"
                           " (invalid-whitespace-directive)")
        before.set(None)
    tail = node.tail
    if op.ws in ("after", "both"):
        if not tail or tail.strip():
            raise _Refused("no whitespace text stands after the node"
                           " (invalid-whitespace-directive)")
        tail = None
    parent.remove(node)
    if tail:
        before.set(before.value + tail)
