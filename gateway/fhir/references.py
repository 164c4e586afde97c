"""Reference rewriting for transactions: https://hl7.org/fhir/R4/bundle.html#references.

In a transaction, entries name each other by ``fullUrl`` (often
``urn:uuid:…``). Once the server has assigned ids, every place such a name
occurs is rewritten: ``Reference.reference``, canonical/uri values, and
``href``/``src`` attributes in narrative XHTML.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

CONDITIONAL_REF = re.compile(r"[A-Z][A-Za-z]+\?.+")
_ATTR = re.compile(r"""(\b(?:href|src)\s*=\s*)(["'])(.*?)\2""", re.IGNORECASE | re.DOTALL)


def rewrite(
    node: Any,
    mapping: Mapping[str, str],
    conditional: Callable[[str], str] | None = None,
) -> Any:
    """Replace every mapped name in ``node`` (in place) and return it.

    ``conditional`` resolves a conditional reference (``Patient?identifier=…``)
    found in a ``reference`` element to ``Type/id``.
    """
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, str):
                if key == "reference" and conditional and CONDITIONAL_REF.fullmatch(value):
                    node[key] = conditional(value)
                elif key == "div":
                    node[key] = _rewrite_xhtml(value, mapping) if mapping else value
                else:
                    node[key] = _renamed(value, mapping)
            elif isinstance(value, dict | list):
                rewrite(value, mapping, conditional)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            if isinstance(value, str):
                node[i] = _renamed(value, mapping)
            elif isinstance(value, dict | list):
                rewrite(value, mapping, conditional)
    return node


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
