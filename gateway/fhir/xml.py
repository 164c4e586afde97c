"""FHIR XML, to and from the JSON the gateway keeps: https://hl7.org/fhir/R4/xml.html.

The two formats carry the same content; the JSON form is stored. Turning one
into the other needs the definitions (:class:`~gateway.fhir.validation.model.Model`):

* element order: XML elements follow the StructureDefinition's order, JSON
  members may come in any order;
* which elements repeat (a JSON array; repeated elements in XML) and which
  are primitives (``<birthDate value="…"/>``; in JSON the value, with its id and
  extensions in ``_birthDate``);
* a primitive's JSON type: ``boolean`` is ``true``/``false``, the integer types
  and ``decimal`` are numbers (a decimal keeps its text: ``1.50`` stays ``1.50``);
* ``Element.id`` and ``Extension.url`` are attributes in XML, a resource's
  ``id`` is an element; resources inside resources (``contained``,
  ``Bundle.entry.resource``, ``Parameters.parameter.resource``) are wrapped in
  an element named by their type; the narrative ``div`` is XHTML, inline.

Parsing is hardened as every XML input of the gateway: no DTD, no entities, no
network, no huge trees; a document that declares any of them is refused. An
element or attribute R4 does not define is an error (400), as an unknown JSON
member is; values are not judged here but by the validator afterwards.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from lxml import etree  # type: ignore[import-untyped]

from gateway.fhir import json as fjson
from gateway.fhir.outcome import Code, FhirError
from gateway.fhir.validation.model import COMPLEX, PRIM, RESOURCE, XHTML, Model, Node
from gateway.fhir.validation.xhtml import MAX_ATTRIBUTES, hardened_parser, has_dtd

FHIR_NS = "http://hl7.org/fhir"
XHTML_NS = "http://www.w3.org/1999/xhtml"
_F = "{" + FHIR_NS + "}"
#: XML Schema's instance attributes: ``xsi:schemaLocation`` names the schema an
#: instance was written against (test fixtures and older tools write it); not data
_XSI = "{http://www.w3.org/2001/XMLSchema-instance}"
_INTEGERS = frozenset(("integer", "positiveInt", "unsignedInt", "integer64"))
#: the primitives whose values are text, kept as written
_TEXT = frozenset(("string", "markdown"))
_INTEGER = re.compile(r"-?[0-9]+")
_DECIMAL = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_REFUSED = re.compile(rb"<!DOCTYPE|<!ENTITY", re.IGNORECASE)
#: where the root element begins (in UTF-8 and its ASCII kin): what comes before is
#: the prolog, where a DOCTYPE stands (UTF-16 is checked after parsing)
_ROOT_START = re.compile(rb"<[A-Za-z_]")
#: not content of a resource (xml.html): comments and processing instructions
_NOT_CONTENT = (etree._Comment, etree._ProcessingInstruction)


def _bad(message: str) -> FhirError:
    return FhirError(Code.INVALID_RESOURCE, f"FHIR XML: {message}")


# -- JSON -> XML ----------------------------------------------------------------------


def dumps(value: Any, model: Model, *, pretty: bool = False) -> bytes:
    """The XML of a resource given as JSON (bytes as stored, or parsed)."""
    return bytes(etree.tostring(to_element(value, model), xml_declaration=True,
                                encoding="UTF-8", pretty_print=pretty))


def to_element(value: Any, model: Model) -> etree._Element:
    """The XML tree of a resource given as JSON (bytes as stored, or parsed)."""
    if isinstance(value, bytes | bytearray):
        value = json.loads(value, parse_float=Decimal)
    elif not isinstance(value, dict):
        raise TypeError("a resource is a JSON object")
    else:  # through JSON text: stored fragments and Numbers become plain values
        value = json.loads(fjson.dumps(value), parse_float=Decimal)
    try:
        return _resource_element(value, model, None)
    except ValueError as exc:
        if "XML compatible" not in str(exc):
            raise
        # (stored before such characters were refused on the way in)
        raise FhirError(Code.NOT_ACCEPTABLE, "the resource holds characters XML cannot"
                                             " carry (such as U+FFFF): ask for JSON") from None


def _resource_element(resource: dict[str, Any], model: Model,
                      parent: etree._Element | None) -> etree._Element:
    rtype = resource.get("resourceType")
    node = model.resource_node(rtype) if isinstance(rtype, str) else None
    if node is None or not isinstance(rtype, str):
        raise ValueError(f"not a resource type: {rtype!r}")
    element = etree.Element(_F + rtype, nsmap={None: FHIR_NS}) if parent is None \
        else etree.SubElement(parent, _F + rtype)
    _fill(element, resource, node, model)
    return element


def _text(value: Any) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    return str(value)


def _fill(element: etree._Element, value: dict[str, Any], node: Node, model: Model) -> None:
    resource = node.resource_type is not None
    if not resource:
        if isinstance(value.get("id"), str):
            element.set("id", value["id"])
        if node.path == "Extension" and isinstance(value.get("url"), str):
            element.set("url", value["url"])
    for key, child in node.children.items():
        if not resource and (key == "id" or (key == "url" and node.path == "Extension")):
            continue
        present, extra = value.get(key), value.get("_" + key)
        if present is None and extra is None:
            continue
        if child.kind == PRIM:
            values = present if isinstance(present, list) else [present]
            extras = extra if isinstance(extra, list) else [extra]
            for i in range(max(len(values), len(extras))):
                v = values[i] if i < len(values) else None
                x = extras[i] if i < len(extras) else None
                if v is None and not x:
                    continue
                sub = etree.SubElement(element, _F + key)
                if isinstance(x, dict):
                    _fill_primitive_extras(sub, x, model)
                if v is not None:
                    sub.set("value", _text(v))
            continue
        for item in present if isinstance(present, list) else [present]:
            if item is None:
                continue
            if child.kind == XHTML:
                element.append(_xhtml(item))
            elif child.kind == RESOURCE:
                _resource_element(item, model, etree.SubElement(element, _F + key))
            else:
                sub = etree.SubElement(element, _F + key)
                target = child.node if child.kind == COMPLEX else None
                if target is not None and isinstance(item, dict):
                    _fill(sub, item, target, model)


def _fill_primitive_extras(element: etree._Element, extras: dict[str, Any],
                           model: Model) -> None:
    """A primitive's ``_name`` object: its id (attribute) and extensions (elements)."""
    if isinstance(extras.get("id"), str):
        element.set("id", extras["id"])
    extension = model.type_node("Extension")
    for item in extras.get("extension") or []:
        sub = etree.SubElement(element, _F + "extension")
        if extension is not None and isinstance(item, dict):
            _fill(sub, item, extension, model)


def _xhtml(div: Any) -> etree._Element:
    if not isinstance(div, str) or _REFUSED.search(div.encode()):
        raise ValueError("the narrative is not XHTML")
    element = etree.fromstring(div.encode(), hardened_parser())
    # an (empty) text node keeps a pretty printer from indenting inside the div:
    # whitespace there is content (<pre>, between inline elements)
    element.text = element.text or ""
    return element


# -- XML -> JSON ----------------------------------------------------------------------


def loads(data: bytes, model: Model) -> dict[str, Any]:
    """The JSON form of a FHIR XML resource; :class:`FhirError` (400) when it is not one."""
    return from_element(parse(data), model)


def parse(data: bytes, bad: Callable[[str], FhirError] = _bad) -> etree._Element:
    """The root of an XML document, parsed as every XML input of the gateway is;
    ``bad`` makes the error for a document that declares a DTD or entities, or has
    an element of too many attributes (one that is not well-formed: GW-1027)."""
    start = _ROOT_START.search(data)  # a DOCTYPE stands before the root element
    if _REFUSED.search(data, 0, start.start() if start else len(data)):
        raise bad("a DOCTYPE or entity declaration is not allowed")
    try:
        root = etree.fromstring(data, hardened_parser())
    except (etree.XMLSyntaxError, ValueError) as exc:
        raise FhirError(Code.MALFORMED_XML, str(exc)[:200]) from None
    if has_dtd(root):
        raise bad("a DOCTYPE or entity declaration is not allowed")
    for element in root.iter():
        # (lxml reads the attributes of an element in time that grows with the
        # square of their number: 4.6 s for 40,000)
        if len(element.attrib) > MAX_ATTRIBUTES:
            raise bad(f"an element has more than {MAX_ATTRIBUTES} attributes")
    return root


def from_element(root: etree._Element, model: Model) -> dict[str, Any]:
    """The JSON form of a resource's XML tree (one :func:`parse` read, or one made
    from such: elements of at most ``MAX_ATTRIBUTES`` attributes)."""
    return _resource_json(root, model, root.tag)


def _attribute(name: str, value: str, where: str, *, text: bool = False) -> str:
    """An attribute's value, not empty ("attributes cannot be empty ... present with
    at least one character of non-whitespace content"), trimmed ("SHOULD trim
    leading and trailing whitespace when reading attribute values") unless it is
    ``text`` (a string or markdown: whitespace there is content the JSON form keeps)."""
    trimmed = value.strip()
    if not trimmed:
        raise _bad(f"{where}: attribute '{name}' is empty")
    return value if text else trimmed


def _local(element: etree._Element, where: str) -> str:
    tag = element.tag
    if not isinstance(tag, str):  # a processing instruction or entity reference
        raise _bad(f"{where}: only FHIR elements may stand here")
    if not tag.startswith(_F):
        raise _bad(f"{where}: <{tag}> is not in the FHIR namespace ({FHIR_NS})")
    return tag[len(_F):]


def _resource_json(element: etree._Element, model: Model, where: str) -> dict[str, Any]:
    rtype = _local(element, where)
    node = model.resource_node(rtype)
    if node is None:
        raise _bad(f"<{rtype}> is not a resource type")
    out: dict[str, Any] = {"resourceType": rtype}
    _read(element, node, out, model, rtype)
    _tidy(out)
    return out


def _read(element: etree._Element, node: Node, out: dict[str, Any], model: Model,
          where: str) -> None:
    resource = node.resource_type is not None
    for name, value in element.attrib.items():
        if (not resource and name == "id") or (name == "url" and node.path == "Extension"):
            out[name] = _attribute(name, value, where)
        elif resource and name in (_XSI + "schemaLocation", _XSI + "noNamespaceSchemaLocation"):
            continue
        else:
            raise _bad(f"{where}: attribute '{name}' is not defined here")
    if element.text and element.text.strip():
        raise _bad(f"{where}: text is not allowed here")
    for sub in element:
        if sub.tail and sub.tail.strip():
            raise _bad(f"{where}: text is not allowed here")
        if isinstance(sub, _NOT_CONTENT):
            continue
        if sub.tag == "{" + XHTML_NS + "}div":
            child = node.children.get("div")
            if child is None or child.kind != XHTML:
                raise _bad(f"{where}: a narrative div is not allowed here")
            out["div"] = etree.tostring(_narrative(sub), encoding="unicode")
            continue
        name = _local(sub, where)
        child = node.children.get(name)
        if child is None or (not resource and name == "id") or (
                name == "url" and node.path == "Extension"):
            raise _bad(f"{where}: element <{name}> is not defined here")
        path = f"{where}.{name}"
        if child.kind == PRIM:
            _read_primitive(sub, child.code, child.array, name, out, model, path)
            continue
        if child.kind == RESOURCE:
            inner = [e for e in sub if not isinstance(e, _NOT_CONTENT)]
            if len(inner) != 1 or sub.attrib:
                raise _bad(f"{path}: holds one resource")
            item: Any = _resource_json(inner[0], model, path)
        elif child.kind == COMPLEX and child.node is not None:
            item = {}
            _read(sub, child.node, item, model, path)
            _tidy(item)
        else:
            raise _bad(f"{path}: cannot be read")
        if child.array:
            out.setdefault(name, []).append(item)
        elif name in out:
            raise _bad(f"{path}: given more than once")
        else:
            out[name] = item


def _narrative(div: etree._Element) -> etree._Element:
    """The narrative ``div`` on its own, as FHIR JSON holds it: XHTML the default
    namespace (whatever prefix it had), and none of the namespaces declared around
    it in the document (the FHIR namespace, ``xsi``) declared on it."""
    def copy(element: etree._Element, parent: etree._Element | None) -> etree._Element:
        if parent is None:
            new = etree.Element(element.tag, nsmap={None: XHTML_NS})
        elif isinstance(element.tag, str):
            new = etree.SubElement(parent, element.tag)
        else:  # a comment or processing instruction
            new = copy_of(element)
            parent.append(new)
            new.tail = element.tail
            return new
        for name, value in element.attrib.items():
            new.set(name, value)
        new.text, new.tail = element.text, (element.tail if parent is not None else None)
        for child in element:
            copy(child, new)
        return new

    def copy_of(node: etree._Element) -> etree._Element:
        return etree.Comment(node.text) if isinstance(node, etree._Comment) else \
            etree.ProcessingInstruction(node.target, node.text)

    return copy(div, None)


def _read_primitive(element: etree._Element, code: str, array: bool, name: str,
                    out: dict[str, Any], model: Model, path: str) -> None:
    extras: dict[str, Any] = {}
    raw = None
    for attr, text in element.attrib.items():
        if attr == "id":
            extras["id"] = _attribute(attr, text, path)
        elif attr == "value":
            raw = _attribute(attr, text, path, text=code in _TEXT)
        else:
            raise _bad(f"{path}: attribute '{attr}' is not defined here")
    if element.text and element.text.strip():
        raise _bad(f"{path}: a primitive's value is its value attribute")
    extension = model.type_node("Extension")
    for sub in element:
        if isinstance(sub, _NOT_CONTENT):
            continue
        if _local(sub, path) != "extension" or extension is None:
            raise _bad(f"{path}: a primitive holds extensions only")
        item: dict[str, Any] = {}
        _read(sub, extension, item, model, f"{path}.extension")
        extras.setdefault("extension", []).append(item)
    if raw is None and "extension" not in extras:
        # "FHIR elements are never empty": a value, or extensions (an id alone says
        # nothing), as JSON's "birthDate": null is refused
        raise _bad(f"{path}: an element is never empty: it has a value attribute or"
                   " extensions")
    value = None if raw is None else _typed(raw, code)
    if isinstance(value, fjson.Number) and fjson.beyond_double(value):
        # as in JSON (gateway.fhir.json): kept, it could not be read back
        raise FhirError(Code.INVALID_RESOURCE,
                        f"{path}: the number {value.text[:40]} is beyond what this server can keep"
                        " (a double, at most about 1.8e308)", (path,))
    if array:
        values, more = out.setdefault(name, []), out.get("_" + name)
        index = len(values)
        values.append(value)
        if extras or more is not None:
            more = out.setdefault("_" + name, [None] * index)
            more.extend([None] * (index - len(more)))
            more.append(extras or None)
        return
    if name in out or "_" + name in out:
        raise _bad(f"{path}: given more than once")
    if value is not None:
        out[name] = value
    if extras:
        out["_" + name] = extras


def _tidy(value: dict[str, Any]) -> None:
    """A primitive array without a single value, only ids or extensions, is left out
    (its ``_name`` twin says it all), as FHIR JSON writes it."""
    for key in [k for k, v in value.items()
                if isinstance(v, list) and f"_{k}" in value and all(x is None for x in v)]:
        del value[key]


def _typed(text: str, code: str) -> Any:
    """A primitive's value as its JSON type (a value that does not fit stays a string:
    the validator says what is wrong with it)."""
    if code == "boolean":
        return {"true": True, "false": False}.get(text, text)
    if code in _INTEGERS:
        return int(text) if _INTEGER.fullmatch(text) and len(text) < 20 else text
    if code == "decimal":
        return fjson.Number(text) if _DECIMAL.fullmatch(text) else text
    return text
