"""Pure FHIR R4 semantics: no I/O, no web framework.

May import: the standard library, ``orjson``, ``jsonpatch``, ``fhirpathpy``.
"""
