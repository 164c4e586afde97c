"""The store interface: what the rest of the gateway may ask of storage.

Narrow on purpose (compare HAPI's DAO sprawl): read the current or a given
version, read many, search, history, and a unit of work
(:class:`StoreTransaction`) in which writes happen. A write stores the
resource, its history row, its search index rows and its outbox event in one
database transaction.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from gateway.fhir.search import SearchQuery
    from gateway.storage.security import AuditRecord

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class AccessRules:
    """Data of the access policy (``mappings/security/access-policy.json``)."""

    #: resource type -> search parameters that link it to a Patient
    compartment: dict[str, tuple[str, ...]]
    #: types visible to their creating organisation only
    owned: frozenset[str]
    #: (resource type, patient parameter or "_self", organisation parameters)
    participation: tuple[tuple[str, str, tuple[str, ...]], ...]
    consent_required: bool


@dataclass(frozen=True, slots=True)
class Restriction:
    """Whose data a request may see: filters every read path in the store."""

    organization: str
    purpose: str
    now: int  # epoch microseconds, for consent periods
    rules: AccessRules


@dataclass(frozen=True, slots=True)
class StoredResource:
    """One version of a resource as stored. ``content`` is ``None`` for a deletion."""

    resource_type: str
    id: str
    version: int
    last_updated: int  # epoch microseconds
    deleted: bool
    content: bytes | None
    method: str = ""  # history only: POST, PUT, PATCH, DELETE
    #: history only: this version made the resource exist (its first, or the first
    #: after a deletion)
    created: bool = False

    @property
    def etag(self) -> str:
        return f'W/"{self.version}"'


#: a resource a List names (type, id), or one version of it (type, id, version)
Listed = tuple[str, str, int | None]


@dataclass(frozen=True, slots=True)
class HistoryPage:
    entries: list[StoredResource]
    next_cursor: int | None  # pass back as ``before`` for the next (older) page
    total: int | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    search_id: str
    query: str  # the original query string, re-parsed for each page's _include
    keys: list[tuple[str, str]]
    total: int
    truncated: bool
    #: False: ``keys`` is the result's head; the rest is read when a page needs it
    complete: bool = True
    #: the last stored version when the search began (what its rest may hold)
    bound: int | None = None
    #: the position of ``keys[0]`` in the kept list (``keys`` may be a part of it)
    start: int = 0
    #: how many keys are kept (-1: ``start + len(keys)``, the list up to its end)
    held: int = -1

    def __post_init__(self) -> None:
        if self.held < 0:
            object.__setattr__(self, "held", self.start + len(self.keys))


class StoreTransaction(Protocol):
    async def lock(self, *keys: str) -> None:
        """Serialise with other writers of each of ``keys`` until commit; several
        keys are taken in one order, so that writers of overlapping sets of keys
        wait for each other instead of deadlocking."""

    async def current(self, resource_type: str, id: str) -> StoredResource | None: ...

    async def search_keys(
        self, query: SearchQuery, limit: int, restriction: Restriction | None = None
    ) -> list[tuple[str, str]]: ...

    async def visible(
        self, keys: Sequence[tuple[str, str]], restriction: Restriction, *,
        writing: bool = False,
    ) -> set[tuple[str, str]]: ...

    async def accessible(self, ids: Sequence[str], restriction: Restriction) -> set[str]: ...

    async def referring(self, target_type: str, target_id: str,
                        limit: int) -> list[tuple[str, str]]:
        """The current resources (at most ``limit``) whose index rows point at
        ``target_type/target_id``."""

    async def append_audit(self, records: Sequence[AuditRecord]) -> None:
        """Append to the audit chain in this transaction."""

    async def put(
        self,
        resource_type: str,
        id: str,
        resource: dict[str, Any],
        method: str,
        previous: StoredResource | None,
        *,
        creator: str | None = None,
    ) -> StoredResource:
        """Store ``resource`` as the next version. Sets ``id`` and ``meta`` in it.

        ``creator``: the organisation creating it (recorded on the first version)."""

    async def delete(self, previous: StoredResource) -> StoredResource: ...

    async def version(self, resource_type: str, id: str, version: int) -> StoredResource | None:
        """One version as stored (a deletion has no content)."""

    async def rewrite(self, stored: StoredResource, resource: dict[str, Any], *,
                      current: bool) -> StoredResource:
        """Replace the content of the stored version ``stored`` in place: no new
        version, no event (``$meta-add``, ``$meta-delete``). ``current``: it is the
        current version, whose current row and search index follow."""


class Store(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...

    async def run(self, work: Callable[[StoreTransaction], Awaitable[T]]) -> T:
        """Run ``work`` in one database transaction, retrying lost races."""

    def within(self, tx: StoreTransaction) -> Store:
        """The store as seen from inside ``tx`` (its reads see ``tx``'s writes)."""

    async def read(self, resource_type: str, id: str) -> StoredResource | None: ...
    async def vread(self, resource_type: str, id: str, version: int) -> StoredResource | None: ...
    async def read_many(self, keys: Sequence[tuple[str, str]]) -> list[StoredResource]: ...

    async def visible(
        self, keys: Sequence[tuple[str, str]], restriction: Restriction, *,
        writing: bool = False,
    ) -> set[tuple[str, str]]: ...

    async def accessible(self, ids: Sequence[str], restriction: Restriction) -> set[str]: ...

    async def search_keys(
        self, query: SearchQuery, limit: int, restriction: Restriction | None = None
    ) -> list[tuple[str, str]]: ...

    async def search_resources(
        self, query: SearchQuery, limit: int, restriction: Restriction | None = None
    ) -> list[StoredResource]:
        """:meth:`search_keys` with the resources themselves (current versions)."""

    async def count(self, query: SearchQuery, restriction: Restriction | None = None) -> int: ...

    async def token_codes(self, resource_type: str | None, param: str, limit: int,
                          restriction: Restriction | None = None) -> list[tuple[str, str]]:
        """Distinct (system, code) pairs the token parameter ``param`` holds (of one
        type, or any; of resources ``restriction`` may see), at most ``limit``."""

    async def meta_summary(
        self, types: Sequence[str] | None, limit: int, restriction: Restriction | None = None,
    ) -> tuple[list[str], list[tuple[str | None, str]], list[tuple[str | None, str]]]:
        """The profiles, tags and security labels (system, code) that current resources
        carry (of ``types``, or any; those ``restriction`` may see), at most ``limit``
        of each (``$meta`` at type and system level)."""

    async def referrers(self, target_type: str, target_id: str) -> set[tuple[str, str]]:
        """(type, reference parameter) of the current resources whose index rows point
        at ``target_type/target_id``: where to search, not what may be shown."""

    async def includes(
        self, query: SearchQuery, matches: list[tuple[str, str]], limit: int,
        restriction: Restriction | None = None, types: Collection[str] | None = None,
    ) -> list[tuple[str, str]]:
        """What ``query``'s ``_include``/``_revinclude`` find from ``matches``, of
        ``types`` only (all when ``None``): a resource of another type is neither
        returned nor followed by an ``:iterate``."""
    async def audit_records(
        self, *, after: int, limit: int, patient: str | None,
        restriction: Restriction | None, client_id: str | None,
    ) -> list[tuple[int, bytes]]:
        """The audit chain's records (sequence number, AuditEvent JSON) after ``after``."""

    async def save_snapshot(self, snapshot: Snapshot) -> None: ...
    async def load_snapshot(self, search_id: str, start: int = 0,
                            stop: int | None = None) -> Snapshot | None:
        """The kept result set, with its keys from position ``start`` to ``stop``
        (None: to the end)."""

    async def last_version(self) -> int:
        """The last stored version's sequence number (``created_seq`` is one of them)."""

    async def extend_snapshot(self, snapshot: Snapshot, more: Sequence[tuple[str, str]], *,
                              complete: bool, truncated: bool) -> bool:
        """Append ``more`` to an incomplete snapshot that holds ``snapshot.held`` keys
        (``complete``: the rest of the result); False when another request read on
        first (load it again)."""

    async def versions_mark(self, types: Sequence[str]) -> tuple[int, int]:
        """How many versions of resources of ``types`` the history holds, and the
        position of the newest ((0, 0): none): it changes with every write of them
        that commits, also one that commits after a later one."""

    async def last_changed(self, types: Sequence[str]) -> int | None:
        """When the newest version of a resource of ``types`` was written (epoch
        microseconds, a deletion too); None when there is none."""

    async def history(
        self,
        resource_type: str | None,
        id: str | None,
        *,
        since: int | None,
        at: tuple[int, int] | None,
        before: int | None,
        limit: int,
        restriction: Restriction | None = None,
        types: Sequence[str] | None = None,
        listed: Collection[Listed] | None = None,
        offset: int = 0,
    ) -> HistoryPage:
        """Versions, newest first; ``types``: of these types only (system level);
        ``listed``: of these resources only (a version given: that version only);
        ``offset``: versions skipped before the page."""
