"""carepath-gateway: a FHIR R4 gateway for cross-sector care pathways."""

__version__ = "0.1.0"
