"""Authorisation, enforced in one place for every path.

Interactions call these checks; the checks read the caller from
:data:`gateway.security.principal.CALLER`. Scopes decide which interactions
a client may use on which types; the access policy decides whose data it may
see and write. A resource the caller may not see answers exactly as a
missing one (404), so existence is not revealed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from gateway.fhir.outcome import Code, FhirError
from gateway.fhir.search import SearchQuery, related_types
from gateway.security.policy import AccessPolicy
from gateway.security.principal import Caller, current
from gateway.storage.interface import Restriction, StoredResource

# interaction -> SMART v2 action letter
ACTIONS = {
    "create": "c", "read": "r", "vread": "r", "history-instance": "r", "update": "u",
    "patch": "u", "delete": "d", "search": "s", "history-type": "s", "history-system": "s",
    "operation": "r",
}


class Visibility(Protocol):
    async def visible(
        self, keys: Sequence[tuple[str, str]], restriction: Restriction, *,
        writing: bool = False,
    ) -> set[tuple[str, str]]: ...

    async def accessible(self, ids: Sequence[str], restriction: Restriction) -> set[str]: ...


def caller() -> Caller:
    return current()


def allows(resource_type: str | None, interaction: str) -> bool:
    """Whether the caller's scopes allow ``interaction`` on ``resource_type``."""
    principal = current().principal
    action = ACTIONS[interaction]
    return principal.grant.allows(resource_type or "*", action) or (
        resource_type is None and any(s.resource_type != "*" and action in s.actions
                                      for s in principal.grant.scopes))


def require(resource_type: str | None, interaction: str) -> None:
    """The caller's scopes allow ``interaction`` on ``resource_type`` (403 otherwise)."""
    if not allows(resource_type, interaction):
        raise FhirError(Code.FORBIDDEN, f"the granted scopes do not allow {interaction} on"
                                        f" {resource_type or '*'}")


def allowed_types(types: Iterable[str], interaction: str) -> tuple[str, ...] | None:
    """Of ``types``, those the caller's scopes allow ``interaction`` on; ``None`` when a
    wildcard scope allows it on every type. For system-level searches and history:
    a scope on some types must not open the others."""
    if allows("*", interaction):
        return None
    return tuple(sorted(t for t in types if allows(t, interaction)))


def require_related(query: SearchQuery) -> None:
    """The caller may search every type ``query`` looks into besides its own
    (:func:`related_types`): a chain or ``_has`` filters on that type's data, and
    would otherwise answer questions about a type the scopes keep closed."""
    for resource_type in sorted(related_types(query)):
        require(resource_type, "search")


def restriction(access: AccessPolicy | None) -> Restriction | None:
    return access.restriction(current().principal) if access is not None else None


def note(resource_type: str, id: str | None, version: int | None = None,
         query: str | None = None) -> None:
    """Record what the request touched, for its AuditEvent."""
    current().entities.append((resource_type, id, version, query))


def note_patients(ids: Iterable[str]) -> None:
    current().patients.update(ids)


async def ensure_visible(
    access: AccessPolicy | None, store: Visibility, stored: StoredResource
) -> None:
    r = restriction(access)
    if r is not None:
        key = (stored.resource_type, stored.id)
        if key not in await store.visible([key], r):
            raise FhirError(Code.NOT_FOUND, f"{stored.resource_type}/{stored.id} is not known")
    note(stored.resource_type, stored.id, stored.version)
    if access is not None and stored.content is not None:
        # stored bytes were checked on the way in: only references are read here
        note_patients(access.patients_in(stored.resource_type, stored.id, stored.content))


async def filter_visible(
    access: AccessPolicy | None, store: Visibility, keys: Sequence[tuple[str, str]]
) -> list[tuple[str, str]]:
    r = restriction(access)
    if r is None:
        return list(keys)
    seen = await store.visible(keys, r)
    return [k for k in keys if k in seen]


async def check_write(
    access: AccessPolicy | None,
    store: Visibility,
    resource: dict[str, Any] | None,
    previous: StoredResource | None,
    new_patients: Iterable[str] = (),
) -> None:
    """The caller may write ``resource`` (replacing ``previous``).

    The previous version must be visible (else: not found); every patient
    the new content belongs to must be accessible, or be created by this
    request (``new_patients``).
    """
    if access is None:
        return
    r = restriction(access)
    patients = access.patients_of(resource) if resource is not None else set()
    note_patients(patients)
    if r is None:
        return
    if previous is not None and not previous.deleted:
        key = (previous.resource_type, previous.id)
        if key not in await store.visible([key], r, writing=True):
            if key in await store.visible([key], r):  # read through its access proxy
                raise FhirError(Code.FORBIDDEN, f"{key[0]}/{key[1]} is written by the"
                                                " organisation that created it only")
            raise FhirError(Code.NOT_FOUND, f"{key[0]}/{key[1]} is not known")
    if resource is not None and resource.get("resourceType") == "Patient" and previous is None:
        return  # registering a new patient: the caller becomes a participant (creator)
    wanted = sorted(set(patients) - set(new_patients))
    if wanted:
        allowed = await store.accessible(wanted, r)
        if set(wanted) - allowed:
            raise FhirError(Code.FORBIDDEN,
                            "the resource belongs to a patient outside the caller's care")
    rtype = resource.get("resourceType") if resource else None
    if previous is not None and rtype in access.rules.owned and previous.deleted:
        # reviving a deleted owned resource is for its creator only
        key = (previous.resource_type, previous.id)
        if key not in await store.visible([key], r):
            raise FhirError(Code.NOT_FOUND, f"{key[0]}/{key[1]} is not known")


def creator() -> str | None:
    principal = current().principal
    return principal.organization
