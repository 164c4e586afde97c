"""Security: SMART Backend Services authentication, scopes, organisation
compartments and consent, and the audit trail.

May import: ``gateway.storage``, ``gateway.registry``, ``gateway.fhir``.
``gateway.interactions`` calls it on every path; it never calls them.
"""
