"""Validation of FHIR R4 resources against the base definitions and profiles.

See ``README.md`` in this package and ``docs/adr-0002-validator.md``.
"""

from gateway.fhir.validation.loader import Definitions, load_definitions, with_own
from gateway.fhir.validation.validator import FhirValidator

__all__ = ["Definitions", "FhirValidator", "load_definitions", "with_own"]
