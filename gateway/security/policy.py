"""The access policy: organisation compartments and consent, as data.

Source: ``mappings/security/access-policy.json`` (compartment from the R4
Patient CompartmentDefinition, participation sources, consent policy per
jurisdiction with its legal source). This module turns it into the
:class:`~gateway.storage.interface.AccessRules` the store filters with, finds
the patients a resource belongs to, and derives the ``sp_consent`` rows from
Consent resources.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import gateway
from gateway.fhir import json as fjson
from gateway.fhir.indexer import DATE_MAX, DATE_MIN, date_bounds
from gateway.security.principal import Principal
from gateway.storage.access_sql import ACCESS_PROXY
from gateway.storage.interface import AccessRules, Restriction
from gateway.storage.sql import now_micros

OPT_IN = {"OPTIN", "OPTINR"}
OPT_OUT = {"OPTOUT", "OPTOUTE"}
CONSENT_SCOPES = {None, "patient-privacy", "treatment"}


class Indexer(Protocol):
    def extract(
        self, resource: dict[str, Any], codes: frozenset[str] | None = None
    ) -> dict[str, list[tuple[Any, ...]]]: ...

    def reference_rows(self, code: str, value: Any) -> list[tuple[Any, ...]]: ...


def mappings_dir() -> Path:
    here = Path(gateway.__file__).resolve().parent
    packaged = here / "_data" / "mappings"
    return packaged if packaged.is_dir() else here.parent / "mappings"


def load_rules(jurisdiction: str, path: Path | None = None) -> AccessRules:
    data = json.loads((path or mappings_dir() / "security" / "access-policy.json").read_text())
    policies = data["consent"]["policies"]
    if jurisdiction not in policies:
        raise ValueError(f"no consent policy for jurisdiction {jurisdiction!r} "
                         f"(known: {', '.join(sorted(policies))})")
    return AccessRules(
        compartment={t: tuple(p) for t, p in data["compartment"]["resources"].items()},
        owned=frozenset(data["owned"]["resources"]),
        participation=tuple((s["resourceType"], s["patient"], tuple(s["organization"]))
                            for s in data["participation"]["sources"]),
        consent_required=bool(policies[jurisdiction]["requiresConsent"]),
    )


def _local_id(reference: Any, resource_type: str) -> str | None:
    if not isinstance(reference, dict):
        return None
    ref = reference.get("reference")
    if not isinstance(ref, str):
        return None
    parts = ref.split("/")
    if len(parts) >= 2 and parts[-2] == resource_type:
        return parts[-1]
    if len(parts) >= 4 and parts[-4] == resource_type and parts[-2] == "_history":
        return parts[-3]
    return None


def _codes(concepts: Any) -> list[str]:
    out = []
    for item in concepts if isinstance(concepts, list) else []:
        if isinstance(item, dict) and isinstance(item.get("code"), str):
            out.append(item["code"])  # Coding
        elif isinstance(item, dict):
            out += [c["code"] for c in item.get("coding", []) if isinstance(c, dict)
                    and isinstance(c.get("code"), str)]
    return out


class AccessPolicy:
    def __init__(self, rules: AccessRules, indexer: Indexer) -> None:
        self.rules = rules
        self.indexer = indexer
        #: type -> its patient-compartment parameters
        self._links = {t: frozenset(p) for t, p in rules.compartment.items() if p}

    def restriction(self, principal: Principal) -> Restriction | None:
        if principal.unrestricted:
            return None
        # a token without an organisation sees no patient data (matches nothing)
        org = principal.organization or "\x00none"
        return Restriction(org, principal.purpose_of_use, now_micros(), self.rules)

    def patients_of(self, resource: dict[str, Any]) -> set[str]:
        """Ids of the local Patients a resource belongs to (its compartment links)."""
        rtype = resource.get("resourceType")
        if rtype == "Patient":
            rid = resource.get("id")
            return {rid} if isinstance(rid, str) else set()
        params = self._links.get(rtype) if isinstance(rtype, str) else None
        if not params:
            return set()
        rows = self.indexer.extract(resource, params).get("sp_reference", [])
        return {row[2] for row in rows
                if row[0] in params and row[1] == "Patient" and row[2] is not None}

    def patients_in(self, resource_type: str, id: str, content: bytes) -> set[str]:
        """:meth:`patients_of` for stored bytes, parsed only when the type links to
        patients (a Patient is its own)."""
        if resource_type == "Patient":
            return {id}
        if resource_type not in self._links:
            return set()
        return self.patients_of(fjson.loads_fast(content))

    def proxy_of(self, resource: dict[str, Any]) -> tuple[str, str] | None:
        """The (type, id) on this server whose access rules stand in for ``resource``'s
        (a Binary's ``securityContext``, a document Bundle's patient), if any."""
        proxy = _access_proxy(resource)
        ref = proxy.get("reference") if isinstance(proxy, dict) else None
        if not isinstance(ref, str) or "://" in ref or ref.startswith(("#", "urn:")):
            return None
        parts = ref.split("/")
        if len(parts) == 4 and parts[2] == "_history":
            parts = parts[:2]
        if len(parts) != 2 or not parts[0][:1].isupper():
            return None
        return parts[0], parts[1]

    def consent_rows(self, resource: dict[str, Any]) -> list[tuple[Any, ...]]:
        """``sp_consent`` rows of an active Consent: one per provision and actor/purpose."""
        if resource.get("resourceType") != "Consent" or resource.get("status") != "active":
            return []
        patient = _local_id(resource.get("patient"), "Patient")
        scope = _codes([resource["scope"]]) if isinstance(resource.get("scope"), dict) else []
        if patient is None or (scope and not set(scope) & {s for s in CONSENT_SCOPES if s}):
            return []
        rows: list[tuple[Any, ...]] = []
        provision = resource.get("provision")
        if isinstance(provision, dict):
            self._provision(patient, provision, 0, None, rows)
        else:
            rules = set(_codes([resource.get("policyRule")]))
            if rules & OPT_OUT:
                rows.append(("consent", patient, "*", "*", 1, DATE_MIN, DATE_MAX))
            elif rules & OPT_IN:
                rows.append(("consent", patient, "*", "*", 0, DATE_MIN, DATE_MAX))
        return rows

    def _provision(self, patient: str, p: dict[str, Any], depth: int, parent: str | None,
                   rows: list[tuple[Any, ...]]) -> None:
        kind = p.get("type")
        if kind not in ("permit", "deny"):
            kind = "permit" if parent is None else ("deny" if parent == "permit" else "permit")
        actors: list[str] = []
        unusable = False
        for actor in p.get("actor", []) if isinstance(p.get("actor"), list) else []:
            org = _local_id(actor.get("reference") if isinstance(actor, dict) else None,
                            "Organization")
            if org is None:
                unusable = True  # an actor other than an Organization: not this gateway's unit
            else:
                actors.append(org)
        purposes = _codes(p.get("purpose")) or ["*"]
        lo, hi = DATE_MIN, DATE_MAX
        period = p.get("period")
        if isinstance(period, dict):
            start_text, end_text = period.get("start"), period.get("end")
            start = date_bounds(start_text) if isinstance(start_text, str) else None
            end = date_bounds(end_text) if isinstance(end_text, str) else None
            lo = start[0] if start else DATE_MIN
            hi = end[1] if end else DATE_MAX
        weight = 2 * depth + (1 if kind == "deny" else 0)
        if not (unusable and not actors):
            for actor in actors or ["*"]:
                for purpose in purposes:
                    rows.append(("consent", patient, actor, purpose, weight, lo, hi))
        for child in p.get("provision", []) if isinstance(p.get("provision"), list) else []:
            if isinstance(child, dict):
                self._provision(patient, child, depth + 1, kind, rows)


class PolicyIndexer:
    """The search indexer plus the policy's derived rows (``sp_consent``)."""

    def __init__(self, indexer: Indexer, policy: AccessPolicy) -> None:
        self.indexer = indexer
        self.policy = policy

    def extract(self, resource: dict[str, Any]) -> dict[str, list[tuple[Any, ...]]]:
        rows = self.indexer.extract(resource)
        if resource.get("resourceType") == "Consent":
            rows = {**rows, "sp_consent": self.policy.consent_rows(resource)}
        else:
            proxy = _access_proxy(resource)
            if proxy is not None:
                # what stands in for this resource's access rules (access_sql.visible):
                # a reference row no search parameter names
                rows = {**rows, "sp_reference": [
                    *rows["sp_reference"], *self.indexer.reference_rows(ACCESS_PROXY, proxy)]}
        return rows


def _access_proxy(resource: dict[str, Any]) -> Any:
    """The Reference that stands in for a resource's access rules: a Binary's
    ``securityContext``; a document Bundle's patient, its Composition's ``subject``
    (an entry of the document, by its fullUrl, counts with the id it has)."""
    rtype = resource.get("resourceType")
    if rtype == "Binary":
        return resource.get("securityContext")
    if rtype != "Bundle" or resource.get("type") != "document":
        return None
    entries = [e for e in resource.get("entry") or [] if isinstance(e, dict)]
    composition = entries[0].get("resource") if entries else None
    subject = composition.get("subject") if isinstance(composition, dict) else None
    ref = subject.get("reference") if isinstance(subject, dict) else None
    if not isinstance(ref, str):
        return None
    for entry in entries:
        patient = entry.get("resource")
        if entry.get("fullUrl") == ref and isinstance(patient, dict) \
                and patient.get("resourceType") == "Patient" and isinstance(patient.get("id"), str):
            return {"reference": f"Patient/{patient['id']}"}
    return {"reference": ref} if ref.startswith("Patient/") else None
