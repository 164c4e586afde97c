"""Pure FHIR R4 semantics: no I/O, no web framework.

May import: the standard library, ``orjson``, ``jsonpatch``, ``fhirpathpy``, ``lxml``
(hardened parser for narrative XHTML only). The indexer and the validator read
their definitions from ``profiles/`` once, at start; nothing here does I/O per
request.
"""
