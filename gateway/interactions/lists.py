"""``_list``: https://hl7.org/fhir/R4/search.html#list.

``Patient?_list=42`` finds the Patients that List/42 names in ``entry.item``
(entries marked ``deleted`` left out), as they are now; ``_list=42,43`` those
of either List, and ``_list=42&_list=43`` those of both. The List is read as
the caller reads it: a List the caller may not see, or that does not exist,
names nothing. Functional lists (``$current-problems``) and ``_list`` in a
search of the whole system are not supported (the parser says so).
"""

from __future__ import annotations

from dataclasses import replace

from gateway.fhir.outcome import Code, FhirError
from gateway.fhir.references import RELATIVE_REF
from gateway.fhir.search import Criterion, SearchQuery, TokenValue
from gateway.interactions.base import Context
from gateway.interactions.operations import stored_content
from gateway.storage.interface import Listed

#: the most resources the Lists of one ``_list`` may name
MAX_LIST_MEMBERS = 10_000
#: an id no resource has (ids hold no colon): the criterion of a List naming nothing
_NOTHING = "_list:none"


async def with_list_members(ctx: Context, query: SearchQuery) -> SearchQuery:
    """``query`` with each ``_list`` criterion replaced by the ``_id``s its Lists name."""
    if not any(c.code == "_list" for c in query.criteria):
        return query
    assert query.resource_type is not None  # (the parser takes _list in a typed search)
    criteria = []
    for c in query.criteria:
        if c.code != "_list":
            criteria.append(c)
            continue
        ids: dict[str, None] = {}
        for value in c.values:
            assert isinstance(value, TokenValue) and value.code is not None
            ids.update(dict.fromkeys(await _members(ctx, value.code, query.resource_type)))
        if len(ids) > MAX_LIST_MEMBERS:
            raise FhirError(Code.SEARCH_TOO_COSTLY,
                            f"the Lists of _list name more than {MAX_LIST_MEMBERS:,} resources")
        criteria.append(Criterion("_id", "token", None, tuple(
            TokenValue(id, None, True) for id in (ids or [_NOTHING]))))
    return replace(query, criteria=tuple(criteria))


async def _members(ctx: Context, list_id: str, resource_type: str) -> list[str]:
    """The ids of the resources of ``resource_type`` that List ``list_id`` names."""
    return [id for rtype, id, _ in await listed_in(ctx, list_id) if rtype == resource_type]


async def listed_in(ctx: Context, list_id: str) -> list[Listed]:
    """What List ``list_id`` names on this server, as the caller reads it: each
    resource, with the version a version-specific reference names. A List the
    caller may not see, or that does not exist, names nothing."""
    try:
        listed = await stored_content(ctx, "List", list_id)
    except FhirError as exc:
        if exc.code in (Code.NOT_FOUND, Code.GONE):  # (another organisation's, too)
            return []
        raise
    out: list[Listed] = []
    for entry in listed.get("entry") or ():
        if not isinstance(entry, dict) or entry.get("deleted") is True:
            continue
        item = entry.get("item")
        ref = item.get("reference") if isinstance(item, dict) else None
        # references to this server are stored relative: Type/id, or a version of it
        if isinstance(ref, str) and RELATIVE_REF.fullmatch(ref):
            rtype, id, *rest = ref.split("/")
            version = rest[1] if rest else None
            out.append((rtype, id, int(version) if version and version.isdigit()
                        and len(version) < 19 else None))
    return out
