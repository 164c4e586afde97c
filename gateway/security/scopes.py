"""SMART scopes (App Launch 2.x, scopes-and-launch-context.html).

v2: ``system/Patient.rs``, ``system/*.cruds``. v1 names are accepted:
``read`` = ``rs``, ``write`` = ``cud``, ``*`` = ``cruds``. Only the ``system``
context applies to backend services; ``patient/`` and ``user/`` scopes are
parsed and ignored for a system client.

Granular scopes (``system/Observation.rs?category=http://…|laboratory``) are
refused, not granted: the gateway does not narrow searches, reads and writes
by their criteria, and granting one as if it were the whole type would give
more than it says.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

ACTIONS = "cruds"
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}
_SCOPE = re.compile(
    r"(?P<context>system|patient|user)/(?P<type>\*|[A-Z][A-Za-z]+)\."
    r"(?P<actions>\*|read|write|[cruds]+)(?:\?(?P<query>.+))?"
)


class ScopeError(ValueError):
    """A scope string that is not a SMART scope."""


@dataclass(frozen=True, slots=True)
class Scope:
    context: str
    resource_type: str  # a type or "*"
    actions: frozenset[str]
    text: str = ""

    def covers(self, resource_type: str, action: str) -> bool:
        return (self.context == "system" and action in self.actions
                and self.resource_type in ("*", resource_type))

    def within(self, other: Scope) -> bool:
        """True when ``other`` grants everything this scope asks for."""
        if other.context != self.context:
            return False
        if other.resource_type not in ("*", self.resource_type):
            return False
        return self.actions <= other.actions


def parse_scope(text: str) -> Scope:
    m = _SCOPE.fullmatch(text)
    if not m:
        raise ScopeError(f"'{text[:100]}' is not a SMART resource scope")
    raw = m["actions"]
    if raw in _V1:
        actions = _V1[raw]
    else:
        if "".join(sorted(set(raw), key=ACTIONS.index)) != raw:
            raise ScopeError(f"'{text[:100]}': actions must be in the order c, r, u, d, s")
        actions = raw
    if m["query"]:
        raise ScopeError(f"'{text[:100]}': granular scopes (…?parameter=value) are not"
                         " supported; grant the type, or leave it out")
    return Scope(m["context"], m["type"], frozenset(actions), text)


def parse_scopes(text: str | Iterable[str]) -> tuple[list[Scope], list[str]]:
    """Resource scopes, and the other tokens (``openid``, ``launch``…) kept as text."""
    tokens = text.split() if isinstance(text, str) else list(text)
    scopes, other = [], []
    for token in tokens:
        if "/" in token:
            scopes.append(parse_scope(token))
        else:
            other.append(token)
    return scopes, other


@dataclass(frozen=True, slots=True)
class Grant:
    """What a principal may do: a set of scopes."""

    scopes: tuple[Scope, ...]

    @classmethod
    def everything(cls) -> Grant:
        return _EVERYTHING

    @classmethod
    def parse(cls, text: str) -> Grant:
        return cls(tuple(parse_scopes(text)[0]))

    def allows(self, resource_type: str, action: str) -> bool:
        """Some scope allows ``action`` on the type."""
        return any(s.covers(resource_type, action) for s in self.scopes)

    def within(self, other: Grant) -> bool:
        return all(any(s.within(o) for o in other.scopes) for s in self.scopes)

    def text(self) -> str:
        return " ".join(s.text for s in self.scopes)


_EVERYTHING = Grant((parse_scope("system/*.cruds"),))
