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

from gateway.fhir import json as fjson
from gateway.fhir.outcome import Code, FhirError
from gateway.fhir.search import SearchQuery, related_types
from gateway.security.policy import AccessPolicy
from gateway.security.principal import Caller, current
from gateway.storage.access_sql import PARTICIPATION_PROXY
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


class WriteVisibility(Visibility, Protocol):
    """What a write's checks read, in its transaction."""

    async def referring(self, target_type: str, target_id: str,
                        limit: int) -> list[tuple[str, str]]: ...

    async def current(self, resource_type: str, id: str) -> StoredResource | None: ...


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


async def versions_visible(access: AccessPolicy | None, store: Visibility,
                           versions: list[StoredResource]) -> list[StoredResource]:
    """Of ``versions`` (of resources the caller may see now), those whose own content
    names only patients the caller may see: a version from before an Observation
    moved to another patient is about the first one (vread, history). Those returned
    are noted for the AuditEvent."""
    if access is None:
        return versions
    named = [patients_in(access, v) for v in versions]
    r = restriction(access)
    if r is not None:
        wanted = sorted(set().union(*named))
        allowed = await store.accessible(wanted, r) if wanted else set()
        kept = [(v, p) for v, p in zip(versions, named, strict=True) if p <= allowed]
    else:
        kept = list(zip(versions, named, strict=True))
    for v, patients in kept:
        note(v.resource_type, v.id, v.version, patients=patients)
    return [v for v, _ in kept]


def patients_in(access: AccessPolicy | None, stored: StoredResource) -> frozenset[str]:
    """The patients a stored version is about (none when deleted)."""
    if access is None or stored.content is None or stored.deleted:
        return frozenset()
    # stored bytes were checked on the way in: only references are read here
    return frozenset(access.patients_in(stored.resource_type, stored.id, stored.content))


def note(resource_type: str, id: str | None, version: int | None = None,
         query: str | None = None, *, patients: frozenset[str] = frozenset()) -> None:
    """Record what the request touched, and the patients it is about, for its
    AuditEvents."""
    caller = current()
    caller.entities.append((resource_type, id, version, query, patients))
    caller.patients.update(patients)


def note_stored(access: AccessPolicy | None, stored: StoredResource) -> None:
    """:func:`note` a version read: with the patients its content is about."""
    note(stored.resource_type, stored.id, stored.version,
         patients=patients_in(access, stored))


def note_patients(ids: Iterable[str]) -> None:
    """Patients the request is about beyond what it touched (a compartment searched)."""
    current().patients.update(ids)


async def ensure_visible(
    access: AccessPolicy | None, store: Visibility, stored: StoredResource
) -> None:
    r = restriction(access)
    if r is not None:
        key = (stored.resource_type, stored.id)
        if key not in await store.visible([key], r):
            raise FhirError(Code.NOT_FOUND, f"{stored.resource_type}/{stored.id} is not known")
    note_stored(access, stored)


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
    store: WriteVisibility,
    resource: dict[str, Any] | None,
    previous: StoredResource | None,
    new_patients: Iterable[str] = (),
) -> frozenset[str]:
    """The caller may write ``resource`` (replacing ``previous``); the patients the
    write is about (of the new content and of the version it replaces).

    The previous version must be visible (else: not found); every patient
    the new content belongs to must be accessible, or be created by this
    request (``new_patients``).
    """
    if access is None:
        return frozenset()
    r = restriction(access)
    patients = access.patients_of(resource) if resource is not None else set()
    proxy = access.proxy_of(resource) if resource is not None else None
    if proxy is not None and proxy[0] == "Patient":
        patients.add(proxy[1])  # a document about the patient: theirs to write about
    note_patients(patients)  # (the caller's own words: noted even when refused)
    if r is not None and previous is not None and not previous.deleted:
        key = (previous.resource_type, previous.id)
        if key not in await store.visible([key], r, writing=True):
            if key in await store.visible([key], r):  # read through its access proxy
                raise FhirError(Code.FORBIDDEN, f"{key[0]}/{key[1]} is written by the"
                                                " organisation that created it only")
            raise FhirError(Code.NOT_FOUND, f"{key[0]}/{key[1]} is not known")
    # what it replaces, once the caller may see it (a deletion is about its patients)
    about = frozenset(patients) | (patients_in(access, previous) if previous else frozenset())
    note_patients(about)
    if r is None:
        return about
    await _check_proxy(store, r, resource, previous)
    if resource is not None and resource.get("resourceType") == "Patient" and previous is None:
        return about  # registering a new patient: the caller becomes a participant (creator)
    wanted = sorted(set(patients) - set(new_patients))
    if wanted:
        allowed = await store.accessible(wanted, r)
        if set(wanted) - allowed:
            raise FhirError(Code.FORBIDDEN,
                            "the resource belongs to a patient outside the caller's care")
    if proxy is not None and proxy[0] != "Patient" and (
            proxy not in await store.visible([proxy], r)) and (
            await store.current(*proxy) is not None):
        # a Binary goes where its securityContext goes: only to what the caller sees
        # (or to what does not exist yet: a transaction may write it after the Binary)
        raise FhirError(Code.FORBIDDEN, f"the securityContext {proxy[0]}/{proxy[1][:64]} is"
                                        " not a resource the caller may see")
    rtype = resource.get("resourceType") if resource else None
    if previous is not None and rtype in access.rules.owned and previous.deleted:
        # reviving a deleted owned resource is for its creator only
        key = (previous.resource_type, previous.id)
        if key not in await store.visible([key], r):
            raise FhirError(Code.NOT_FOUND, f"{key[0]}/{key[1]} is not known")
    return about


def _proxy_organization(content: dict[str, Any] | None) -> str | None:
    """The organisation (id on this server) a PractitionerRole counts for."""
    org = content.get("organization") if isinstance(content, dict) else None
    ref = org.get("reference") if isinstance(org, dict) else None
    if isinstance(ref, str) and ref.startswith("Organization/"):
        return ref.split("/")[1]
    return None


#: most resources naming a new PractitionerRole looked at (beyond: refused)
_REFERRERS_CHECKED = 1000


async def _check_proxy(store: WriteVisibility, r: Restriction, resource: dict[str, Any] | None,
                       previous: StoredResource | None) -> None:
    """A PractitionerRole of another organisation is that organisation's to write: one
    that counts for the caller's opens the patients who name it as their GP (or
    whose Encounters, CareTeams, … do), so moving a role to the caller's
    organisation would open another organisation's patients. The caller writes
    and deletes roles of its own or of no organisation; and makes one (under an id
    of its choosing), or gives a role of no organisation its own, only if nothing
    it may not see already names that role."""
    if (resource or {}).get("resourceType") != PARTICIPATION_PROXY and (
            previous is None or previous.resource_type != PARTICIPATION_PROXY):
        return
    own = current().principal.organization
    for content in (resource, _content(previous)):
        if content is None or content.get("resourceType") != PARTICIPATION_PROXY:
            continue
        org = _proxy_organization(content)
        if org is not None and org != own:
            raise FhirError(Code.FORBIDDEN,
                            f"a PractitionerRole of Organization/{org[:64]} is written by"
                            " that organisation only")
    if resource is None or resource.get("resourceType") != PARTICIPATION_PROXY or \
            not isinstance(resource.get("id"), str):
        return
    before = _content(previous)
    if before is not None and (_proxy_organization(resource) is None
                               or _proxy_organization(before) is not None):
        return  # (its organisation unchanged, or taken away: that opens nobody)
    named = await store.referring(PARTICIPATION_PROXY, resource["id"], _REFERRERS_CHECKED + 1)
    if named and (len(named) > _REFERRERS_CHECKED
                  or set(named) - await store.visible(named, r)):
        raise FhirError(Code.FORBIDDEN,
                        f"PractitionerRole/{resource['id'][:64]} is named by resources of"
                        " patients outside the caller's care: it is not the caller's to make")


def _content(stored: StoredResource | None) -> dict[str, Any] | None:
    if stored is None or stored.deleted or stored.content is None:
        return None
    value = fjson.loads_stored(stored.content)
    return value if isinstance(value, dict) else None


def creator() -> str | None:
    principal = current().principal
    return principal.organization
