"""Who is calling: the authenticated client, its organisation and grant.

The caller of the request being handled is kept in a context variable set at
the HTTP edge (and for each Bundle entry), so every interaction and the
store's audit hook see the same principal without threading it through every
signature.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field

from gateway.security.scopes import Grant

DEFAULT_PURPOSE = "TREAT"  # v3 ActReason: treatment


@dataclass(frozen=True, slots=True)
class Principal:
    client_id: str | None
    organization: str | None  # Organization id
    grant: Grant
    purpose_of_use: str = DEFAULT_PURPOSE
    user: str | None = None
    on_behalf_of: str | None = None
    address: str | None = None
    #: dev mode without a token: no organisation compartment applies
    unrestricted: bool = False

    @classmethod
    def developer(cls, address: str | None = None) -> Principal:
        return cls(None, None, Grant.everything(), address=address, unrestricted=True)

    @classmethod
    def nobody(cls, address: str | None = None) -> Principal:
        """Not (yet) authenticated: may do nothing."""
        return cls(None, None, Grant(()), address=address)

    @classmethod
    def system(cls) -> Principal:
        """The gateway itself (background work)."""
        return cls("carepath-gateway", None, Grant.everything(), unrestricted=True)


#: something a request touched: (type, id, version, query, the patients it is about)
Entity = tuple[str, str | None, int | None, str | None, frozenset[str]]


@dataclass(slots=True)
class Caller:
    principal: Principal
    #: the request, for its AuditEvent
    method: str = ""
    path: str = ""
    query_string: str = ""
    base: str = ""
    #: the request's id (``X-Request-ID``): in the response, the log and the AuditEvent
    request_id: str = ""
    #: what the request touched: (type, id, version, query, the patients it is about)
    entities: list[Entity] = field(default_factory=list)
    #: every patient the request is about (of its entities, and those it names)
    patients: set[str] = field(default_factory=set)
    #: True once an AuditEvent for this request is committed
    audited: bool = False

    def child(self, method: str, path: str, query_string: str = "") -> Caller:
        """The caller of one Bundle entry (batch entries are audited one by one)."""
        return Caller(self.principal, method, path, query_string, self.base,
                      request_id=self.request_id)


CALLER: ContextVar[Caller | None] = ContextVar("carepath_caller", default=None)


def current() -> Caller:
    caller = CALLER.get()
    if caller is None:  # background work and tests that call interactions directly
        caller = Caller(Principal.system())
        CALLER.set(caller)
    return caller
