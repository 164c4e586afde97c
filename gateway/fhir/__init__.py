"""Pure FHIR R4 semantics: no I/O, no web framework.

May import: the standard library, ``orjson``, ``jsonpatch``, ``fhirpathpy``, ``lxml``
(the hardened parser: narrative XHTML, FHIR XML, XML Patch), ``re2`` (regular
expressions from clients, :mod:`gateway.fhir.patterns`). The indexer and the validator read
their definitions from ``profiles/`` once, at start; nothing here does I/O per
request.
"""

# Before any FHIRPath is evaluated: fhirpathpy's matches()/replaceMatches() use RE2
# (gateway.fhir.patterns), not Python's backtracking re; its children() and
# descendants() run in linear time (gateway.fhir.navigation).
from gateway.fhir import navigation as _navigation  # noqa: F401
from gateway.fhir import patterns as _patterns  # noqa: F401
