"""Reference rewriting for transactions: https://hl7.org/fhir/R4/bundle.html#references.

In a transaction, entries name each other by ``fullUrl`` (often
``urn:uuid:…``). Once the server has assigned ids, the places such a name occurs
are rewritten (http.html#trules): ``Reference.reference``, values of the types
``uri``, ``url``, ``oid`` and ``uuid``, and ``href``/``src`` attributes in
narrative XHTML. "Elements of type canonical are not replaced". A ``string`` that
happens to hold the name, such as an ``Identifier.value`` of ``urn:uuid:…``, is
data and stays as it is.

A ``uri`` holds an entry's name as a link only when the name is a placeholder
(``urn:uuid:``, ``urn:oid:``): an ``http`` fullUrl there is an identity (an
implementation guide's ValueSet sent with its canonical URL as fullUrl; its
``url``, a ``Coding.system`` naming a CodeSystem), which stays as it is, as in
HAPI FHIR, which replaces the ids it assigned anew.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from gateway.fhir import json as fjson
from gateway.fhir.paths import Model

CONDITIONAL_REF = re.compile(r"[A-Z][A-Za-z]+\?.*")
#: the names a client makes up for the entries of a transaction (bundle.html#references)
PLACEHOLDERS = ("urn:uuid:", "urn:oid:")
#: a relative RESTful reference (http.html#general-form)
RELATIVE_REF = re.compile(r"[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64}(?:/_history/[A-Za-z0-9\-.]{1,64})?")
_ATTR = re.compile(r"""(\b(?:href|src)\s*=\s*)(["'])(.*?)\2""", re.IGNORECASE | re.DOTALL)
#: the types whose values may name other entries by a placeholder
_NAMING_TYPES = frozenset(("uri", "url", "oid", "uuid"))
#: what an element found in the mapping is: a reference (any name is replaced), a
#: uri (a placeholder name is), neither
_REFERENCE, _URI = "reference", "uri"


def rewrite(
    node: Any,
    mapping: Mapping[str, str],
    conditional: Callable[[str], str] | None = None,
    relative: Mapping[str, str] | None = None,
    model: Model | None = None,
) -> Any:
    """Replace every mapped name in ``node`` (in place) and return it; a Bundle in
    it (a document or message, kept as it was assembled: documents.html) is left
    as it is, as one sent alone would be.

    ``conditional`` resolves a conditional reference (``Patient?identifier=…``)
    found in a ``reference`` element to ``Type/id``. ``relative`` maps relative
    references (``Patient/abc``) that, read against the base of the containing
    entry's fullUrl, name another entry (``http://x.org/fhir/Patient/abc``):
    see :func:`relative_names`. With ``model``, a value found in the mapping is
    replaced in a ``Reference.reference``, and where its element's type names
    resources (:data:`_NAMING_TYPES`, an element the model does not know too) when
    it is a placeholder; a resource's own ``url`` never.
    """
    _rewrite(node, mapping, conditional, relative, model, [])
    return node


def _rewrite(node: Any, mapping: Mapping[str, str], conditional: Callable[[str], str] | None,
             relative: Mapping[str, str] | None, model: Model | None, path: list[str]) -> None:
    # ``path``: the keys from the innermost resource (its type first) to ``node``;
    # only followed into the model when a value is in the mapping
    if isinstance(node, dict):
        rt = node.get("resourceType")
        if isinstance(rt, str):
            if rt == "Bundle":  # a document's or message's names are its own
                return
            path = [rt]
        for key, value in node.items():
            if isinstance(value, str):
                if key == "reference" and conditional and CONDITIONAL_REF.fullmatch(value):
                    node[key] = conditional(value)
                elif key == "reference" and relative and value in relative:
                    node[key] = relative[value]
                elif key == "div":
                    node[key] = _rewrite_xhtml(value, mapping) if mapping else value
                elif _names(value, mapping) and _replaced(value, model, [*path, key]):
                    node[key] = _renamed(value, mapping)
            elif isinstance(value, dict | list):
                path.append(key)
                _rewrite(value, mapping, conditional, relative, model, path)
                path.pop()
    elif isinstance(node, list):
        for i, value in enumerate(node):
            if isinstance(value, str):
                if _names(value, mapping) and _replaced(value, model, path):
                    node[i] = _renamed(value, mapping)
            elif isinstance(value, dict | list):
                _rewrite(value, mapping, conditional, relative, model, path)


def _names(value: str, mapping: Mapping[str, str]) -> bool:
    return value in mapping or ("|" in value and value.split("|", 1)[0] in mapping)


def _replaced(value: str, model: Model | None, path: list[str]) -> bool:
    """Whether ``value``, an entry's name, is replaced in the element at ``path``."""
    kind = _naming(model, path)
    return kind == _REFERENCE or (kind == _URI and value.startswith(PLACEHOLDERS))


def _naming(model: Model | None, path: list[str]) -> str | None:
    """What the element at ``path`` (a resource type, then JSON keys) is: a
    :data:`_REFERENCE` (``reference`` is a string, but a Reference's; anything
    without a model), a :data:`_URI` (a type of :data:`_NAMING_TYPES`, or an element
    the model does not know), or None (a canonical, a string, a resource's ``url``, the
    place of a primitive's id and extensions, ``_gender``, which holds an object: a
    string there is left as it is, and validation refuses it)."""
    if model is None or len(path) < 2:
        return _REFERENCE
    if len(path) == 2 and path[1] == "url":
        return None  # a canonical resource's identity
    ctx = path[0]
    code: str | None = None
    for key in path[1:]:
        if key.startswith("_"):  # a primitive's id and extensions (an Element, no value)
            ctx, code = "Element", None
            continue
        found = model.child(ctx, key)
        if found is None:
            return _URI
        if ctx == "Reference" and key == "reference":
            return _REFERENCE
        ctx, code = found[1].ctx, found[1].type
    return _URI if code in _NAMING_TYPES else None


def split_restful(url: str) -> tuple[str, str] | None:
    """``http://x.org/fhir/Patient/abc`` -> (``http://x.org/fhir/``, ``Patient/abc``);
    None for anything else (``urn:uuid:…``, relative, not Type/id)."""
    if not url.startswith(("http://", "https://")):
        return None
    base, _, tail = url.rpartition("/")
    base, _, rtype = base.rpartition("/")
    rel = f"{rtype}/{tail}"
    return (f"{base}/", rel) if base and RELATIVE_REF.fullmatch(rel) else None


def relative_names(names: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """The entries named by absolute RESTful fullUrls, by base and then by their
    relative form: a relative reference in an entry whose fullUrl has that base
    means them (bundle.html#references). One pass over ``names``, whatever the
    number of bases (a Bundle whose every entry has a base of its own)."""
    out: dict[str, dict[str, str]] = {}
    for name, target in names.items():
        split = split_restful(name)
        if split is not None:
            out.setdefault(split[0], {})[split[1]] = target
    return out


def _renamed(value: str, mapping: Mapping[str, str]) -> str:
    target = mapping.get(value)
    if target is not None:
        return target
    if "|" in value:  # a canonical with a version: urn:uuid:…|1.0
        head, tail = value.split("|", 1)
        if head in mapping:
            return f"{mapping[head]}|{tail}"
    return value


def _rewrite_xhtml(div: str, mapping: Mapping[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        target = mapping.get(m.group(3))
        return f"{m.group(1)}{m.group(2)}{target}{m.group(2)}" if target else m.group(0)

    return _ATTR.sub(sub, div)


def conditional_references(node: Any, out: list[str] | None = None) -> list[str]:
    """The conditional references (``Patient?identifier=…``, http.html#trules) in
    ``node``, a Bundle's (a document's) not: it is stored as sent (:func:`rewrite`)."""
    out = [] if out is None else out
    if isinstance(node, dict):
        if node.get("resourceType") == "Bundle":
            return out
        for key, value in node.items():
            if key == "reference" and isinstance(value, str) and "?" in value \
                    and CONDITIONAL_REF.fullmatch(value):
                out.append(value)
            elif isinstance(value, dict | list):
                conditional_references(value, out)
    elif isinstance(node, list):
        for value in node:
            if isinstance(value, dict | list):
                conditional_references(value, out)
    return out


def references_in(resource: Any) -> Iterator[tuple[str, str]]:
    """(element, value) of every ``Reference.reference`` in ``resource``, its
    contained resources included, a Bundle held inside it not: a document's or
    message's references name its own entries. The element is a path without
    list indices (``Observation.subject``)."""
    stack: list[tuple[Any, str]] = [(resource, str(resource.get("resourceType", "")))]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            if node is not resource and node.get("resourceType") == "Bundle":
                continue
            for key, value in node.items():
                if isinstance(value, str):
                    if key == "reference":
                        yield path, value
                elif isinstance(value, dict | list):
                    stack.append((value, f"{path}.{key}"))
        else:
            stack.extend((v, path) for v in node if isinstance(v, dict | list))


def localize(resource: dict[str, Any], bases: tuple[str, ...]) -> None:
    """Make ``reference`` values that point into one of ``bases`` (this server's
    FHIR base urls, each ending in ``/``) relative, in place.

    ``http://gw.example/fhir/Patient/1`` and ``Patient/1`` name the same
    resource here; stored relative, both match ``subject=Patient/1`` and count
    for the patient's compartment, while absolute references to other servers
    stay as they are (and match only their url). Canonical and uri values are
    identities and keep their form. A Bundle (a document or message kept as a
    whole) is left untouched.
    """
    if not bases or resource.get("resourceType") == "Bundle":
        return
    text = fjson.dumps(resource)  # a few µs; the walk below costs ten times that
    if not any(base.encode() in text for base in bases):
        return
    stack: list[Any] = [resource]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, str):
                    if key == "reference" and value.startswith(bases):
                        for base in bases:
                            rest = value[len(base):]
                            if value.startswith(base) and RELATIVE_REF.fullmatch(rest):
                                node[key] = rest
                                break
                elif isinstance(value, dict | list):
                    stack.append(value)
        else:
            stack.extend(v for v in node if isinstance(v, dict | list))
