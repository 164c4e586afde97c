"""R4's own extensions, checked wherever an extension names one.

R4 defines some 390 extensions (https://hl7.org/fhir/R4/extensibility-registry.html;
``patient-birthPlace``, ``data-absent-reason``, ``iso21090-EN-use``, the SMART
``oauth-uris`` ...). An extension whose ``url`` is one of them must conform to
its definition (https://hl7.org/fhir/R4/extensibility.html#Extension): the
walk (``walker``) notes each such extension with its location, and after it:

* the extension is checked against its definition, compiled on first use as a
  profile of ``Extension`` (``profiles``): the types and cardinality of
  ``value[x]``, the sub-extensions of a complex extension (slices by ``url``,
  their cardinality and values), fixed values and required bindings held here;
* its ``context`` (https://hl7.org/fhir/R4/defining-extensions.html#context):
  an extension of context type *element* may only be used on an element whose
  path (``Patient.address``, also from a data type: ``Address``), whose type
  (``Address``; also a type it specializes, ``Quantity`` for ``Age``,
  ``Resource`` for a resource) or contentReference (``Questionnaire.item`` for
  an item inside an item) the context names; ``Element`` allows any.

R4's own definitions (its StructureDefinitions, CodeSystems, ValueSets and
OperationDefinitions) use five extensions outside the context they declare;
:data:`R4_OWN_USES` adds those places, so that R4's own resources (and
snapshots made from them) are not refused.

Not checked: ``contextInvariant`` (13 Questionnaire and List extensions;
FHIRPath over the element the extension is on) and contexts of type
*fhirpath* or *extension* (R4 defines none). Extensions whose URL is not
one of R4's are not judged here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from gateway.fhir.outcome import Code, Findings, Issue
from gateway.fhir.validation.model import PRIM, RESOURCE, XHTML, Binding, Model
from gateway.fhir.validation.profiles import ProfileSet
from gateway.fhir.validation.walker import Loc, render

_ANY = "Element"
_SD = "http://hl7.org/fhir/StructureDefinition/"

#: where R4's own resources (npm ``hl7.fhir.r4.examples@4.0.1``) use an extension
#: beyond its declared context: allowed there too
R4_OWN_USES: dict[str, tuple[str, ...]] = {
    # on ElementDefinition.type, in every snapshot of R4 (declared: type.code;
    # R4B declares ElementDefinition.type)
    _SD + "structuredefinition-fhir-type": ("ElementDefinition.type",),
    # on ElementDefinition.type, next to structuredefinition-fhir-type
    _SD + "regex": ("ElementDefinition.type",),
    # on the first element of R4's type definitions and on its normative CodeSystems,
    # ValueSets and OperationDefinitions (declared: StructureDefinition)
    _SD + "structuredefinition-normative-version": (
        "ElementDefinition", "CodeSystem", "ValueSet", "OperationDefinition"),
    # on the entries of R4's ValueSet expansions (declared: string, code, markdown)
    _SD + "translation": ("ValueSet.expansion.contains",),
    # on CodeSystem concepts (declared: ValueSet.compose.include.concept)
    _SD + "valueset-concept-comments": ("CodeSystem.concept",),
}


class CoreExtensions:
    """R4's extension definitions by canonical URL, compiled on first use."""

    def __init__(self, model: Model, definitions: Mapping[str, dict[str, Any]],
                 bindings: Callable[[str], Binding | None]) -> None:
        self.model = model
        self.urls = frozenset(definitions)
        self.profiles = ProfileSet(model, dict(definitions), bindings)
        self._contexts: dict[str, frozenset[str] | None] = {}
        for url, sd in definitions.items():
            ctx = sd.get("context") or []
            # only element contexts are judged; any other kind: the context is not
            if ctx and all(c.get("type") == "element" for c in ctx):
                self._contexts[url] = frozenset(
                    (*(str(c.get("expression")) for c in ctx), *R4_OWN_USES.get(url, ())))
            else:
                self._contexts[url] = None

    def check(self, resource: dict[str, Any], found: list[tuple[dict[str, Any], Loc]]
              ) -> tuple[Findings, int]:
        """Issues of the extensions in ``found`` (as noted by the walk of ``resource``)."""
        out = Findings()
        evaluations = 0
        for ext, loc in found:
            url = ext["url"]
            allowed = self._contexts.get(url)
            if allowed is not None and _ANY not in allowed and loc is not None:
                where = self.context_of(resource, loc[0])
                if where is not None and not (where[1] & allowed):
                    out.add(Issue(Code.EXTENSION_CONTEXT,
                                  f"extension {url} is not allowed on {where[0]}; its "
                                  f"definition allows it on {', '.join(sorted(allowed))}",
                                  (render(loc),)))
            compiled = self.profiles.get(url)
            if compiled is None:
                continue
            more, evals = compiled.check(ext, loc)
            out.absorb(more)
            evaluations += evals
        return out, evaluations

    def context_of(self, resource: dict[str, Any], loc: Loc
                   ) -> tuple[str, frozenset[str]] | None:
        """The element at ``loc`` (the one holding the extension): its path from the
        nearest resource (``Patient.address``), and the names an element context may
        give it: that path, the paths from each data type on the way
        (``Address.line``), its type and the types that type specializes; None when
        the location cannot be followed (the walk has reported why)."""
        steps: list[tuple[str, int | None]] = []
        while loc is not None:
            loc, key, index = loc
            steps.append((key, index))
        steps.reverse()
        model = self.model
        rt = resource.get("resourceType")
        node = model.resource_node(rt) if isinstance(rt, str) else None
        if node is None:
            return None
        obj: Any = resource
        code: str = rt  # type: ignore[assignment]
        full = code
        relative: list[str] = []
        for key, index in steps[1:]:
            if not isinstance(obj, dict) or node is None:
                return None
            value = obj.get(key)
            if isinstance(value, list):
                value = value[index] if index is not None and 0 <= index < len(value) else None
            ch = node.children.get(key)
            if ch is None:
                ch = node.ext_children.get(key)  # _birthDate: the primitive's extensions
                if ch is None:
                    return None
            if ch.kind == RESOURCE:
                named = value.get("resourceType") if isinstance(value, dict) else None
                node = model.resource_node(named) if isinstance(named, str) else None
                if node is None:
                    return None
                obj, code, full, relative = value, str(named), str(named), []
                continue
            full = f"{full}.{ch.name}"
            relative = [f"{r}.{ch.name}" for r in relative]
            code = ch.code
            if ch.kind in (PRIM, XHTML):
                relative.append(code)
                node = model.type_node(_ANY)  # what a primitive's "_name" object holds
            else:
                node = ch.node
                if node is not None and node.path != code:
                    relative.append(node.path)  # a backbone element's definition path
                else:
                    relative.append(code)
            obj = value
        return full, frozenset((full, *relative, *self._ancestors(code)))

    def _ancestors(self, code: str) -> list[str]:
        out = [code]
        sd = self.model.by_type.get(code)
        while sd is not None:
            base = sd.get("baseDefinition")
            if not isinstance(base, str):
                break
            name = base.rsplit("/", 1)[-1]
            out.append(name)
            sd = self.model.by_type.get(name)
        return out
