"""Definitions loaded once at start: resource types, search parameters, summaries.

May import: ``gateway.fhir``. Data comes from ``profiles/`` (see
:func:`profiles_dir`).
"""

from gateway.registry.registry import Registry, profiles_dir

__all__ = ["Registry", "profiles_dir"]
