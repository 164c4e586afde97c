"""Compile a :class:`gateway.fhir.search.SearchQuery` to SQL (SQLite and PostgreSQL).

The statement is ``SELECT r.res_type, r.res_id FROM resource r WHERE
r.res_type = ? AND r.deleted = 0 AND <criterion> AND …`` where each criterion
looks into its index table (``sp_*``, rows for current versions only),
restricted to the parameter's code: as ``r.res_id IN (SELECT …)`` when the
type is known (the database can start from that index), else as an ``EXISTS``
correlated on ``(res_type, res_id)``. A search of several criteria starts from
the one with the fewest rows and tests the others per candidate, and one whose
criteria match most of its type walks the type in result order testing each
(:func:`choose_driver`; on PostgreSQL only for a search with a token criterion
and none naming a resource or an identifier). Chains nest
``target_id IN (SELECT … FROM resource r2 …)``, ``_has`` nests
``r.res_id IN (SELECT ref.target_id FROM sp_reference ref …)``.
``_id`` and ``_lastUpdated`` are answered from the ``resource`` row.

Every user value is a bound parameter; SQL text holds only identifiers and
constants chosen here (and never a literal question mark: the PostgreSQL
connection rewrites each one to ``$n``). LIKE patterns escape ``%``, ``_`` and
the escape character ``!`` itself.

Ordering: the ``_sort`` keys, then ``r.created_seq, r.res_id``. A key on an
index parameter sorts by a correlated ``MIN`` (ascending) or ``MAX``
(descending) of its value: string -> ``value``, token -> ``code``, date,
number, quantity -> ``lo`` ascending / ``hi`` descending, reference ->
``target_id``, uri -> ``value``. Resources without a value sort last either
way. On PostgreSQL text compares with ``COLLATE "C"`` (code point order, as
SQLite does).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, Protocol

from gateway.fhir.geo import EARTH_RADIUS_KM, latitude_band
from gateway.fhir.indexer import MAX_LEN, TABLE_FOR_TYPE, clip, clip_normalized
from gateway.fhir.search import (
    CompositeValue,
    Criterion,
    DateValue,
    Include,
    InValue,
    MissingValue,
    NearValue,
    NumberValue,
    OfTypeValue,
    QuantityValue,
    ReferenceValue,
    SearchQuery,
    SortKey,
    StringValue,
    TokenValue,
    UriValue,
    Value,
)
from gateway.storage.db import Connection

__all__ = ["Bound", "bound_by_sort", "bounds_by_sort", "choose_driver", "count", "like_escape",
           "plan", "resolve_includes", "select_ids"]

DIALECTS = ("sqlite", "postgresql")

_TABLE = TABLE_FOR_TYPE
#: (ascending column, descending column, is text) per parameter type
_SORT_COLUMN = {
    "string": ("value", "value", True),
    "token": ("code", "code", True),
    "date": ("lo", "hi", False),
    "number": ("lo", "hi", False),
    "quantity": ("lo", "hi", False),
    "reference": ("target_id", "target_id", True),
    "uri": ("value", "value", True),
}
_ESCAPE = "!"
_CHUNK = 500

Frag = tuple[str, list[Any]]


def like_escape(text: str) -> str:
    """Escape ``text`` for ``LIKE … ESCAPE '!'``."""
    return (
        text.replace(_ESCAPE, _ESCAPE * 2)
        .replace("%", _ESCAPE + "%")
        .replace("_", _ESCAPE + "_")
    )


class _Ctx:
    def __init__(self, dialect: str) -> None:
        if dialect not in DIALECTS:
            raise ValueError(f"unsupported SQL dialect {dialect!r}")
        self.dialect = dialect
        self._n = 0
        #: applied to the resources a chain or ``_has`` looks into as well: a search
        #: must not filter on what the caller may not see
        self.restrict: Restrict | None = None
        #: on SQLite, what the statement's ``WITH`` defines (name, SQL, parameters)
        self._ctes: list[tuple[str, str, list[Any]]] = []

    def ids(self, sql: str, params: list[Any]) -> Frag:
        """``(sql)``, an uncorrelated subquery of one column, ``res_id``, for an ``IN``.
        On SQLite it becomes a common table expression: its parser holds every
        construct still open on a stack of 100 entries, and each level of a chain or
        ``_has`` (with the caller's access condition on it) nests several; a table
        expression is parsed at the top of the statement. PostgreSQL nests it as it
        is (it would inline such an expression anyway)."""
        if self.dialect == "postgresql":
            return f"({sql})", params
        name = self.alias("ids")
        self._ctes.append((name, sql, params))
        return f"(SELECT res_id FROM {name})", []

    def with_clause(self) -> Frag:
        """``WITH …`` for the statement (empty if nothing was set aside), each
        expression after those it uses."""
        if not self._ctes:
            return "", []
        params: list[Any] = []
        for _, _, p in self._ctes:
            params.extend(p)
        return "WITH " + ", ".join(f"{n} AS ({sql})" for n, sql, _ in self._ctes) + " ", params

    def alias(self, stem: str) -> str:
        self._n += 1
        return f"{stem}{self._n}"

    def text(self, expr: str) -> str:
        """``expr`` compared in code point order on both dialects."""
        return f'{expr} COLLATE "C"' if self.dialect == "postgresql" else expr

    def distance_km(self, t: str, latitude: float, longitude: float) -> Frag:
        """The great-circle distance in km from a position to the row ``t`` of
        ``sp_coords`` (:func:`gateway.fhir.geo.distance_km`; on SQLite that function,
        registered on every connection)."""
        if self.dialect != "postgresql":
            return f"carepath_distance_km(?, ?, {t}.lat, {t}.lon)", [latitude, longitude]
        return (f"2 * {EARTH_RADIUS_KM} * asin(sqrt(least(1.0,"
                f" power(sin(radians({t}.lat - ?) / 2), 2) + cos(radians(?))"
                f" * cos(radians({t}.lat)) * power(sin(radians({t}.lon - ?) / 2), 2))))",
                [latitude, latitude, longitude])


# -- public API -----------------------------------------------------------------


class Restrict(Protocol):
    """Access control: the condition under which the caller may see the row aliased
    ``alias``; ``types``: the types that row can have, when it is not the searched
    type's (a chain's target, a ``_has`` source)."""

    def __call__(self, alias: str, types: Sequence[str] | None = None) -> Frag: ...


def select_ids(
    query: SearchQuery, dialect: str, limit: int | None = None,
    restrict: Restrict | None = None, columns: str = "r.res_type, r.res_id",
    driver: int | None = None, bound: Bound | None = None,
) -> tuple[str, list[Any]]:
    """SQL for the matching rows in result order: ``(res_type, res_id)``, or the
    ``columns`` of ``resource r`` given. ``driver``, ``bound``: see :func:`plan`
    (with a bound, it drives)."""
    ctx = _Ctx(dialect)
    where, where_params = _from_where(query, ctx, restrict, WALK if bound else driver)
    if bound is not None and query.resource_type is not None:
        bsql, bparams = _bound_sql(bound, query.resource_type, ctx)
        where, where_params = f"{where} AND {bsql}", [*where_params, *bparams]
    keys: list[str] = []
    directions: list[str] = []
    sort_params: list[Any] = []
    for key in query.sort:
        expr, p = _sort_expr(key, ctx)
        keys.append(expr)
        # the resource row's own columns are never null; so ordered, a descending
        # _lastUpdated is its index read backwards (NULLS LAST would make it a sort)
        nulls = " NULLS LAST" if _by_subquery(key) else ""
        directions.append(f"{'DESC' if key.descending else 'ASC'}{nulls}")
        sort_params.extend(p)
    keys += ["r.created_seq", ctx.text("r.res_id")]
    directions += ["", ""]
    with_, with_params = ctx.with_clause()
    if ctx.dialect == "sqlite" and any(_by_subquery(k) for k in query.sort):
        # SQLite (3.40) can drop rows when a LIMIT cuts a result ordered by a correlated
        # subquery whose matches an IN drives: Patient?family=x&_sort=birthdate with
        # LIMIT 4 skipped the third of seven. The keys are computed in a subquery of
        # their own (LIMIT -1: not merged into this one) and sorted above it.
        names = [c.strip().removeprefix("r.") for c in columns.split(",")]
        inner = ", ".join([columns, *(f"{k} AS _k{i}" for i, k in enumerate(keys))])
        order = ", ".join(f"_k{i} {d}".rstrip() for i, d in enumerate(directions))
        sql = (f"{with_}SELECT {', '.join(names)} FROM (SELECT {inner} {where} LIMIT -1)"
               f" ORDER BY {order}")
        params = [*with_params, *sort_params, *where_params]
    else:
        order = ", ".join(f"{k} {d}".rstrip() for k, d in zip(keys, directions, strict=True))
        sql = f"{with_}SELECT {columns} {where} ORDER BY {order}"
        params = [*with_params, *where_params, *sort_params]
    if limit is not None:
        sql += " LIMIT ?"
        params.append(int(limit))
    return sql, params


def count(
    query: SearchQuery, dialect: str, restrict: Restrict | None = None,
    driver: int | None = None,
) -> tuple[str, list[Any]]:
    """SQL for one row ``(count,)`` of the matches."""
    ctx = _Ctx(dialect)
    where, params = _from_where(query, ctx, restrict, driver)
    with_, with_params = ctx.with_clause()
    return f"{with_}SELECT COUNT(*) {where}", [*with_params, *params]


#: a criterion that matches more index rows than this never drives a search alone
PROBE_CAP = 20_000
_NOT_DRIVING = frozenset({"not", "not-in", "missing"})
_PROBE_ORDER = {"_id": 0, "reference": 1, "token": 2, "string": 3, "uri": 4}


#: :func:`choose_driver`'s answer for a search that walks its type's resources in
#: result order, testing each against every criterion, until it has enough
WALK = -1


async def choose_driver(conn: Connection, query: SearchQuery,
                        limit: int | None = None, *, walk: bool = True) -> int | None:
    """The criterion a search should start from, or :data:`WALK` (never when not
    ``walk``); None: let the database decide (nothing to tell the criteria apart).

    SQLite builds the whole list of every uncorrelated ``IN (SELECT …)`` before it
    looks at a resource: ``Observation?patient=X&code=Y`` listed every Observation
    with that code (thousands) to find a patient's three. With a driver, its
    criterion stays such a list and every other becomes a correlated ``EXISTS``
    probed per candidate, through the ``(res_type, res_id)`` index. The driver is
    the positive criterion with the fewest index rows, counted by index-only
    queries that stop at the smallest count so far (at most :data:`PROBE_CAP`).
    A criterion that cannot be counted so (``_has``, a chain of more than one link)
    leaves the choice to the database, as does a tie at the cap; a chain of one link
    is counted by the references to the targets that match.

    Listing every match first is slow when there are many, and needless when the
    result is read in its default order up to ``limit``: ``Observation?code=8302-2``
    (body height, 47,400 of 59,250 Observations) listed and sorted all of them for
    the first 1,001 (280 ms). Walking the Observations in result order and testing
    each took 13 ms. The walk is chosen when it should test fewer resources than
    the list holds: ``limit`` divided by the share of the type's resources that
    match (the criteria taken as independent) below the fewest rows of a criterion.

    PostgreSQL's planner guesses these numbers, and guesses them wrong where the
    columns of an index table depend on each other (a code belongs to one parameter
    of one type): 674 rows for those 47,400, so it listed them (600 ms). A search
    with a token criterion (a status, a category, a code: what most of a type can
    share) gets the statement chosen here, each shape with one plan that suits every
    value (the plan PostgreSQL caches had listed and sorted the 47,400 for a page of
    51: 2.3 s), as does one with a chain (``Observation?subject:Patient.gender=female``
    listed and sorted the Observations of half the patients). PostgreSQL decides the
    others, and any where a criterion names a
    resource or an identifier (a few rows whatever it names): their plans were good,
    and counting would only add a statement (a search by name 1.4 ms of CPU, not
    0.9)."""
    if query.resource_type is None:
        return None
    few = any(_names_few(c) for c in query.criteria)
    if not walk:
        limit = None
    by_sort = limit is not None and not few and bounds_by_sort(query)
    if by_sort and not query.criteria:
        return WALK if limit is not None and await _type_holds(
            conn, query.resource_type, _SORTED_WALK_COST * limit) else None
    if conn.dialect == "postgresql" and (few or not any(
            (c.type == "token" or c.chain) and c.has is None for c in query.criteria)):
        return None
    # past this many rows of every criterion a walk may be shorter; None: no walk (a
    # sort or a count needs every match, unless the sort can bound the search; a
    # resource or identifier named matches few: no count for a conditional create by
    # identifier either)
    walk_past = 2 * limit if limit is not None and (not query.sort or by_sort) \
        and not few else None
    walkable = walk_past is not None
    if len(query.criteria) < (1 if walkable else 2):
        return None
    positive = [i for i, c in enumerate(query.criteria) if c.modifier not in _NOT_DRIVING]
    if len(positive) <= 1 and not walkable:
        return positive[0] if positive else None
    if not positive:
        return None
    probes: list[tuple[int, Frag]] = []
    for i in positive:
        frag = _probe(query.criteria[i], query.resource_type, conn.dialect)
        if frag is None:
            return None
        probes.append((i, frag))
    probes.sort(key=lambda p: _PROBE_ORDER.get(
        "_id" if query.criteria[p[0]].code == "_id" else query.criteria[p[0]].type, 9))
    best, driver = PROBE_CAP, None
    counts: list[int] = []
    for i, (sql, params) in probes:
        # past the smallest count so far only a walk could still use the number, and
        # a walk only when every count is large
        cap = PROBE_CAP if walk_past is not None and best > walk_past else best
        row = await conn.fetchrow(f"SELECT COUNT(*) FROM ({sql} LIMIT ?) x", [*params, cap])
        n = int(row[0]) if row else 0
        counts.append(n)
        if n < best:
            best, driver = n, i
    if walk_past is not None and limit is not None and best > walk_past and \
            await _walk_is_shorter(conn, query.resource_type, limit, counts,
                                   _SORTED_WALK_COST if query.sort else 1):
        return WALK
    return driver if len(positive) > 1 else None


async def _type_count(conn: Connection, rtype: str, cap: int) -> int:
    """How many resources of ``rtype`` are stored, up to ``cap`` (deleted ones too:
    counted from an index alone)."""
    row = await conn.fetchrow(
        "SELECT COUNT(*) FROM (SELECT 1 FROM resource WHERE res_type = ? LIMIT ?) x",
        (rtype, cap))
    return int(row[0]) if row else 0


async def _type_holds(conn: Connection, rtype: str, n: int) -> bool:
    """Whether more than ``n`` resources of ``rtype`` are stored."""
    return await _type_count(conn, rtype, n + 1) > n


#: the index column a sort key's values are walked on, by (type, descending): the
#: column the sort takes the ``MIN`` (ascending) or ``MAX`` (descending) of, where an
#: index holds it in the order compared (on PostgreSQL a string's in code point order:
#: ``sp_string_prefix``; a token's and a uri's are in the database's collation, and a
#: number's and a quantity's ``hi`` have none)
_WALKED_ON = {("date", False): "lo", ("date", True): "hi", ("string", False): "value",
              ("string", True): "value", ("number", False): "lo", ("quantity", False): "lo"}

#: a bound on a search's first sort key (:func:`plan`): the key, and the value at
#: least as far as which its matches are
Bound = tuple[SortKey, Any]


def bounds_by_sort(query: SearchQuery) -> bool:
    """Whether the first ``_sort`` key can bound a walk (:func:`plan`): a date's or a
    string's, either way, a number's or a quantity's ascending."""
    return bool(query.sort) and _by_subquery(query.sort[0]) and (
        query.sort[0].type, query.sort[0].descending) in _WALKED_ON


async def plan(conn: Connection, query: SearchQuery, limit: int | None,
               restrict: Restrict | None = None) -> tuple[int | None, Bound | None]:
    """How to find the first ``limit`` matches of ``query``: its driver
    (:func:`choose_driver`), and a bound on its first sort key (for
    :func:`select_ids`).

    A sorted search orders every match by a value it looks up per match:
    ``Observation?status=final&_sort=-date`` over 48,000 Observations took 154 ms
    for its first 1,001. When a walk pays (:func:`choose_driver`), the first sort
    key's index is walked in its order instead, each row's resource tested against
    the criteria, until ``limit`` resources are seen: the value there bounds the
    result. The search is then run as asked, narrowed to the resources with a value
    at least as far (every resource that sorts before the bound, and those that tie
    with it) and ordered as before, so that the order, ties and all, is the
    unbounded search's. Where the walk does not reach ``limit`` resources (most
    matches have no value), the search runs unbounded."""
    driver = await choose_driver(conn, query, limit)
    if driver != WALK or not query.sort or limit is None:
        return driver, None
    bound = await bound_by_sort(conn, query, limit, restrict)
    if bound is None:  # most matches have no value: listed, from the fewest
        return await choose_driver(conn, query, limit, walk=False), None
    return WALK, bound


async def bound_by_sort(conn: Connection, query: SearchQuery, limit: int,
                        restrict: Restrict | None = None) -> Bound | None:
    """The bound on ``query``'s first sort key (:func:`bounds_by_sort`) that the
    first ``limit`` matches are within (:func:`plan`); None when fewer than
    ``limit`` matches have a value."""
    sql, params = _sort_walk(query, conn.dialect, 2 * limit, restrict)
    seen: set[str] = set()
    for rid, value in await conn.fetch(sql, params):
        seen.add(rid)
        if len(seen) >= limit:
            return query.sort[0], value
    return None


def _walked_column(key: SortKey, s: str, ctx: _Ctx) -> str:
    """The column of index row ``s`` that ``key``'s values are walked on, compared as
    its index orders it."""
    col = f"{s}.{_WALKED_ON[key.type, key.descending]}"
    return ctx.text(col) if key.type == "string" else col


def _bound_sql(bound: Bound, rtype: str, ctx: _Ctx) -> Frag:
    """``r`` has a value of the bound's key at least as far as the bound."""
    key, value = bound
    s = ctx.alias("s")
    col = _walked_column(key, s, ctx)
    param, codes = _param_is(s, key.codes)
    return (f"r.res_id IN (SELECT {s}.res_id FROM {_TABLE[key.type]} {s}"
            f" WHERE {s}.res_type = ? AND {param} AND {col} {'>=' if key.descending else '<='}"
            " ?)", [rtype, *codes, value])


def _sort_walk(query: SearchQuery, dialect: str, rows: int,
               restrict: Restrict | None) -> Frag:
    """The first sort key's index rows in its order ``(res_id, value)``, those of
    resources that match ``query``, at most ``rows``: for a descending key the
    highest of the values the sort takes the ``MAX`` of first, for an ascending one
    the lowest of those it takes the ``MIN`` of."""
    key = query.sort[0]
    ctx = _Ctx(dialect)
    where, where_params = _from_where(query, ctx, restrict, WALK)
    s = ctx.alias("s")
    col = f"{s}.{_WALKED_ON[key.type, key.descending]}"
    ordered = _walked_column(key, s, ctx)
    param, codes = _param_is(s, key.codes)
    with_, with_params = ctx.with_clause()
    return (f"{with_}SELECT {s}.res_id, {col} FROM {_TABLE[key.type]} {s}"
            f" WHERE {s}.res_type = ? AND {param} AND {col} IS NOT NULL"
            f" AND EXISTS (SELECT 1 {where} AND r.res_id = {s}.res_id{_per_row(ctx, True)})"
            f" ORDER BY {ordered} {'DESC' if key.descending else 'ASC'} LIMIT ?",
            [*with_params, query.resource_type, *codes, *where_params, rows])


#: how many matches listed and ordered cost as much as one index row walked for a
#: sort's bound (:func:`plan`: a resource row read and every criterion tested for
#: each). Measured with a fifth of the Observations matching: over the REST
#: benchmark's 48,000, listing and ordering the 9,538 took 44 ms and the walk 69;
#: over 59,250 Synthea-shaped ones, with more index rows each, listing the 11,850
#: took 90 ms and the walk 73. Two puts each on its side; with all of them
#: matching, the walk took 20 ms against 154
_SORTED_WALK_COST = 2


async def _walk_is_shorter(conn: Connection, rtype: str, limit: int,
                           counts: list[int], cost: int = 1) -> bool:
    """Whether walking ``rtype``'s resources until ``limit`` match tests fewer than
    listing the matches of the criterion with the fewest rows would hold (``cost``:
    what a resource walked costs, in matches listed). ``counts``:
    each positive criterion's rows, capped (a lower bound: the walk's estimate only
    errs long). The type's resources are counted up to the most a walk could be
    shorter with, deleted ones too (an estimate, read from an index alone: 5 ms for
    60,000, ten times that when each row's ``deleted`` is read)."""
    fewest = min(counts)
    most = fewest * fewest // (limit * cost)
    total = await _type_count(conn, rtype, most + 1)
    if not total or total > most:
        return False
    share = 1.0
    for n in counts:
        share *= min(n / total, 1.0)
    return limit * cost / share < fewest


def _names_few(c: Criterion) -> bool:
    """Whether ``c`` names resources or identifiers (``_id``, a reference, ``identifier``),
    itself or through each link of its chain: a few rows match it whatever it names."""
    if c.chain and c.has is None:
        return all(_names_few(link.criterion) for link in c.chain)
    return not c.chain and c.has is None and (
        c.code == "_id"
        or (c.type == "reference" and c.modifier not in _NOT_DRIVING)
        or (c.type == "token" and c.code == "identifier" and c.modifier is None))


def _probe(c: Criterion, rtype: str, dialect: str = "sqlite") -> Frag | None:
    """``SELECT 1`` per index row that criterion ``c`` (positive; plain, or a chain of
    one link to a plain criterion) matches."""
    if c.has is not None:
        return None
    ctx = _Ctx(dialect)
    if c.chain:
        if len(c.chain) != 1 or c.chain[0].criterion.chain or \
                c.chain[0].criterion.has is not None:
            return None
        link = c.chain[0]
        # (aliases without digits: ctx.alias numbers its own)
        inner, ip = _criterion(link.criterion, "pt", link.target_type, ctx)
        if ctx.with_clause()[0]:  # (none for a plain criterion)
            return None
        param, codes = _param_is("pr", c.codes)
        return (f"SELECT 1 FROM sp_reference pr WHERE pr.res_type = ? AND {param}"
                f" AND pr.target_type = ? AND pr.target_id IN (SELECT pt.res_id FROM resource pt"
                f" WHERE pt.res_type = ? AND pt.deleted = 0 AND {inner})",
                [rtype, *codes, link.target_type, link.target_type, *ip])
    if c.code in ("_id", "_lastUpdated"):
        cond, p = _id_criterion(c, "r") if c.code == "_id" else _last_updated(c, "r")
        return (f"SELECT 1 FROM resource r WHERE r.res_type = ? AND r.deleted = 0 AND {cond}",
                [rtype, *p])
    table = "sp_composite" if c.modifier == "of-type" else _TABLE.get(c.type)
    if table is None:
        return None
    param, codes = _param_is("t", c.codes)
    cond, p = _or([_value(c, v, "t", ctx) for v in c.values])
    return (f"SELECT 1 FROM {table} t WHERE t.res_type = ? AND {param} AND {cond}",
            [rtype, *codes, *p])


async def resolve_includes(
    conn: Connection, query: SearchQuery, matches: list[tuple[str, str]], limit: int,
    restrict: Restrict | None = None, types: Collection[str] | None = None,
) -> list[tuple[str, str]]:
    """The ``_include``/``_revinclude`` resources of ``matches``: current, not
    deleted, each once, none of ``matches``, in discovery order, at most
    ``limit``. The first round applies every include to ``matches``; later
    rounds apply the ``:iterate`` ones to what the previous round found, until
    nothing new turns up. A resource not of ``types`` (when given) is left out
    and not iterated from: what the caller may not see leads nowhere."""
    if limit <= 0 or not (query.includes or query.revincludes):
        return []
    seen: set[tuple[str, str]] = set(matches)
    found: list[tuple[str, str]] = []
    frontier = list(dict.fromkeys(matches))
    first = True
    while frontier:
        forward = [i for i in query.includes if first or i.iterate]
        reverse = [i for i in query.revincludes if first or i.iterate]
        if not forward and not reverse:
            break
        new: list[tuple[str, str]] = []
        steps = [(inc, False) for inc in forward] + [(inc, True) for inc in reverse]
        for inc, rev in steps:
            for sql, params in _include_sql(inc, frontier, rev, restrict):
                for row in await conn.fetch(sql, params):
                    key = (str(row[0]), str(row[1]))
                    if key in seen:
                        continue
                    seen.add(key)
                    if types is not None and key[0] not in types:
                        continue
                    found.append(key)
                    new.append(key)
                    if len(found) >= limit:
                        return found
        frontier = new
        first = False
    return found


# -- WHERE ----------------------------------------------------------------------


def _from_where(query: SearchQuery, ctx: _Ctx, restrict: Restrict | None = None,
                driver: int | None = None) -> Frag:
    conds: list[str] = []
    params: list[Any] = []
    if query.resource_type is not None:
        conds.append("r.res_type = ?")
        params.append(query.resource_type)
    elif query.types:
        conds.append(f"r.res_type IN ({_marks(len(query.types))})")
        params.extend(query.types)
    conds.append("r.deleted = 0")
    if query.created_by is not None:
        conds.append("r.created_seq <= ?")
        params.append(query.created_by)
    ctx.restrict = restrict
    for i, crit in enumerate(query.criteria):
        sql, p = _criterion(crit, "r", query.resource_type, ctx,
                            correlate=driver is not None and i != driver)
        conds.append(sql)
        params.extend(p)
    if restrict is not None:
        sql, p = restrict("r")
        conds.append(sql)
        params.extend(p)
    return f"FROM resource r WHERE {' AND '.join(conds)}", params


def _criterion(c: Criterion, a: str, rtype: str | None, ctx: _Ctx, *,
               correlate: bool = False) -> Frag:
    """A condition on the resource row aliased ``a`` (of type ``rtype`` if known).
    ``correlate``: as an ``EXISTS`` tested per row, even when the type is known."""
    if c.has is not None:
        h = c.has
        ref, a2 = ctx.alias("ref"), ctx.alias("r")
        inner, ip = _seen(_criterion(h.criterion, a2, h.source_type, ctx), a2, h.source_type,
                          ctx)
        type_sql, tp = ("?", [rtype]) if rtype else (f"{a}.res_type", [])
        sources, sp = ctx.ids(f"SELECT {a2}.res_id FROM resource {a2}"
                              f" WHERE {a2}.res_type = ? AND {a2}.deleted = 0 AND {inner}",
                              [h.source_type, *ip])
        by_id = (
            f"{a}.res_id IN (SELECT {ref}.target_id FROM sp_reference {ref}"
            f" WHERE {ref}.res_type = ? AND {ref}.param = ? AND {ref}.target_type = {type_sql}"
            f" AND {ref}.res_id IN {sources})",
            [h.source_type, h.param_code, *tp, *sp],
        )
        if not h.canonical:
            return by_id
        # a canonical resource is named by its url too (search.html#reference)
        u = ctx.alias("u")
        by_url = (
            f"{a}.res_id IN (SELECT {u}.res_id FROM sp_uri {u} JOIN sp_reference {ref}"
            f" ON {ref}.url = {u}.value WHERE {u}.res_type = {type_sql} AND {u}.param = 'url'"
            f" AND {ref}.res_type = ? AND {ref}.param = ? AND {ref}.target_type IS NULL"
            f" AND {ref}.res_id IN {sources})",
            [*tp, h.source_type, h.param_code, *sp],
        )
        return _or([by_id, by_url])
    if c.chain:
        ref = ctx.alias("ref")
        ors: list[str] = []
        params: list[Any] = [c.code]
        # tested per row on PostgreSQL, the target is looked up by the reference: as a
        # set of targets its generic plan (the one it caches after five runs) joined
        # that set to every row's references, Observation?subject:Patient.gender=female
        # walked for its first 1,001 in 6.4 s instead of 0.04
        targeted = correlate and ctx.dialect == "postgresql"
        for link in c.chain:
            a2 = ctx.alias("r")
            inner, ip = _seen(_criterion(link.criterion, a2, link.target_type, ctx,
                                         correlate=targeted), a2, link.target_type, ctx)
            if targeted:
                ors.append(f"({ref}.target_type = ? AND EXISTS (SELECT 1 FROM resource {a2}"
                           f" WHERE {a2}.res_type = ? AND {a2}.res_id = {ref}.target_id"
                           f" AND {a2}.deleted = 0 AND {inner} OFFSET 0))")
                params.extend([link.target_type, link.target_type, *ip])
                if link.canonical:  # named by its url
                    u = ctx.alias("u")
                    ors.append(f"({ref}.target_type IS NULL AND EXISTS (SELECT 1 FROM sp_uri {u}"
                               f" JOIN resource {a2} ON {a2}.res_type = {u}.res_type"
                               f" AND {a2}.res_id = {u}.res_id WHERE {u}.res_type = ?"
                               f" AND {u}.param = 'url' AND {u}.value = {ref}.url"
                               f" AND {a2}.deleted = 0 AND {inner} OFFSET 0))")
                    params.extend([link.target_type, *ip])
                continue
            found, fp = ctx.ids(f"SELECT {a2}.res_id FROM resource {a2}"
                                f" WHERE {a2}.res_type = ? AND {a2}.deleted = 0 AND {inner}",
                                [link.target_type, *ip])
            ors.append(f"({ref}.target_type = ? AND {ref}.target_id IN {found})")
            params.extend([link.target_type, *fp])
            if link.canonical:  # a canonical names it by its url
                u = ctx.alias("u")
                ors.append(f"({ref}.target_type IS NULL AND {ref}.url IN (SELECT {u}.value"
                           f" FROM sp_uri {u} WHERE {u}.res_type = ? AND {u}.param = 'url'"
                           f" AND {u}.res_id IN {found}))")
                params.extend([link.target_type, *fp])
        if rtype is not None and not correlate:  # the planner can drive it from the index
            return (
                f"{a}.res_id IN (SELECT {ref}.res_id FROM sp_reference {ref}"
                f" WHERE {ref}.res_type = ? AND {ref}.param = ? AND ({' OR '.join(ors)}))",
                [rtype, *params],
            )
        return (
            f"EXISTS (SELECT 1 FROM sp_reference {ref} WHERE {ref}.res_type = {a}.res_type"
            f" AND {ref}.res_id = {a}.res_id AND {ref}.param = ? AND ({' OR '.join(ors)})"
            f"{_per_row(ctx, correlate)})",
            params,
        )
    if c.code == "_id":
        return _id_criterion(c, a)
    if c.code == "_lastUpdated":
        return _last_updated(c, a)
    table = "sp_composite" if c.modifier == "of-type" else _TABLE.get(c.type)
    if table is None:
        raise ValueError(f"cannot search {c.type} parameter {c.code!r}")
    t = ctx.alias("t")
    param, codes = _param_is(t, c.codes)
    base = (
        f"SELECT 1 FROM {table} {t} WHERE {t}.res_type = {a}.res_type"
        f" AND {t}.res_id = {a}.res_id AND {param}"
    )
    if c.modifier == "missing":
        frags = [
            (f"{'NOT ' if _missing(v) else ''}EXISTS ({base})", codes) for v in c.values
        ]
        return _or(frags)
    cond, p = _or([_value(c, v, t, ctx) for v in c.values])
    negate = "NOT " if c.modifier in ("not", "not-in") else ""
    if table == "sp_coords" and rtype is not None and ctx.dialect == "postgresql":
        # the positions in range, found once (an InitPlan): a distance is dear to compute,
        # and statistics older than a load of Locations would have PostgreSQL repeat
        # the range scan and its distances for every Location (171 ms for 3,000, not 0.5)
        return (
            f"{a}.res_id = ANY(ARRAY(SELECT {t}.res_id FROM {table} {t}"
            f" WHERE {t}.res_type = ? AND {param} AND {cond}))",
            [rtype, *codes, *p],
        )
    if rtype is not None and not correlate:  # the planner can drive it from the index
        return (
            f"{a}.res_id {negate}IN (SELECT {t}.res_id FROM {table} {t}"
            f" WHERE {t}.res_type = ? AND {param} AND {cond})",
            [rtype, *codes, *p],
        )
    return f"{negate}EXISTS ({base} AND {cond}{_per_row(ctx, correlate)})", [*codes, *p]


def _per_row(ctx: _Ctx, correlate: bool) -> str:
    """What keeps PostgreSQL from turning an ``EXISTS`` the search chose to test per
    row into a join it plans itself (an ``OFFSET`` stops it)."""
    return " OFFSET 0" if correlate and ctx.dialect == "postgresql" else ""


def _seen(cond: Frag, alias: str, resource_type: str, ctx: _Ctx) -> Frag:
    """``cond`` on a resource a chain or ``_has`` looks into, and the caller may see it."""
    if ctx.restrict is None:
        return cond
    visible, vp = ctx.restrict(alias, [resource_type])
    return f"{cond[0]} AND {visible}", [*cond[1], *vp]


def _param_is(alias: str, codes: tuple[str, ...]) -> Frag:
    """``alias.param`` is one of ``codes`` (a parameter answered by others' rows: several)."""
    if len(codes) == 1:
        return f"{alias}.param = ?", list(codes)
    return f"{alias}.param IN ({_marks(len(codes))})", list(codes)


def _missing(v: Value) -> bool:
    if not isinstance(v, MissingValue):
        raise ValueError(f":missing takes true or false, not {v!r}")
    return v.missing


def _id_criterion(c: Criterion, a: str) -> Frag:
    if c.modifier == "missing":
        return _or([("1 = 0" if _missing(v) else "1 = 1", []) for v in c.values])
    ids: list[Any] = []
    for v in c.values:
        if not isinstance(v, TokenValue) or v.code is None:
            raise ValueError(f"_id takes ids, not {v!r}")
        ids.append(v.code)
    if not ids:
        return "1 = 0", []
    op = "NOT IN" if c.modifier == "not" else "IN"
    return f"{a}.res_id {op} ({_marks(len(ids))})", ids


def _last_updated(c: Criterion, a: str) -> Frag:
    if c.modifier == "missing":
        return _or([("1 = 0" if _missing(v) else "1 = 1", []) for v in c.values])
    frags: list[Frag] = []
    for v in c.values:
        if not isinstance(v, DateValue):
            raise ValueError(f"_lastUpdated takes dates, not {v!r}")
        col = f"{a}.last_updated"
        frags.append(_date(v, col, col))
    return _or(frags)


def _value(c: Criterion, v: Value, t: str, ctx: _Ctx) -> Frag:
    if isinstance(v, NearValue):
        if v.km is None:
            return f"({t}.lat = ? AND {t}.lon = ?)", [v.latitude, v.longitude]
        lo, hi = latitude_band(v.latitude, v.km)
        distance, dp = ctx.distance_km(t, v.latitude, v.longitude)
        return f"({t}.lat BETWEEN ? AND ? AND {distance} <= ?)", [lo, hi, *dp, v.km]
    if isinstance(v, OfTypeValue):  # sp_composite rows of the Identifiers' type codings
        return (f"({t}.a_system = ? AND {t}.a_code = ? AND {t}.code = ?)",
                [v.type_system, v.type_code, v.value])
    if isinstance(v, InValue):  # token :in / :not-in, the value set expanded by the caller
        if v.codes is None:
            raise ValueError(f"value set {v.url} was not expanded")
        if not v.codes:
            return "1 = 0", []
        pairs = sorted(v.codes)
        rows = ", ".join("(?, ?)" for _ in pairs)
        return (f"({t}.system, {t}.code) IN (VALUES {rows})",
                [x for pair in pairs for x in pair])
    if isinstance(v, CompositeValue):  # one sp_composite row holds both components
        first, fp = _token(v.first, f"{t}.a_system", f"{t}.a_code")
        if isinstance(v.second, DateValue):
            second, sp = _date(v.second, f"{t}.dlo", f"{t}.dhi")
        else:
            second, sp = _value(Criterion(c.code, v.second_type), v.second, t, ctx)
        return f"({first} AND {second})", [*fp, *sp]
    if isinstance(v, TokenValue):
        if c.type == "reference":
            return _token(v, f"{t}.ident_system", f"{t}.ident_value")
        return _token(v, f"{t}.system", f"{t}.code")
    if isinstance(v, StringValue):
        if c.type == "token":  # :text on the display
            pat = like_escape(v.normalized)
            return (
                f"({t}.display LIKE ? ESCAPE '{_ESCAPE}'"
                f" OR {t}.display LIKE ? ESCAPE '{_ESCAPE}')",
                [pat + "%", "% " + pat + "%"],
            )
        if c.modifier == "exact":
            if len(v.text) < MAX_LEN and v.normalized:
                # a row with this exact text holds its normalised form as well: the
                # value index finds the few candidates (the text itself is not indexed)
                return (f"({ctx.text(f'{t}.value')} = ? AND {t}.exact = ?)",
                        [clip_normalized(v.normalized), v.text])
            return f"{t}.exact = ?", [v.text]
        normalized = clip_normalized(v.normalized)  # as stored
        pat = like_escape(normalized) + "%"
        if c.modifier == "contains":
            return f"{t}.value LIKE ? ESCAPE '{_ESCAPE}'", ["%" + pat]
        # starts-with as a range too, so a (bytewise-ordered) index can serve it
        value = ctx.text(f"{t}.value")
        return (
            f"({value} >= ? AND {value} < ? AND {t}.value LIKE ? ESCAPE '{_ESCAPE}')",
            [normalized, normalized + "\U0010ffff", pat],
        )
    if isinstance(v, DateValue):
        return _date(v, f"{t}.lo", f"{t}.hi")
    if isinstance(v, QuantityValue):
        sql, params = _number(v.prefix, v.value, v.lo, v.hi, f"{t}.lo", f"{t}.hi")
        if v.system is not None:
            sql += f" AND {t}.system = ?"
            params.append(v.system)
            if v.code is not None:
                sql += f" AND {t}.code = ?"
                params.append(v.code)
        elif v.code is not None:
            sql += f" AND ({t}.code = ? OR {t}.unit = ?)"
            params.extend([v.code, v.code])
        return f"({sql})", params
    if isinstance(v, NumberValue):
        sql, params = _number(v.prefix, v.value, v.lo, v.hi, f"{t}.lo", f"{t}.hi")
        return f"({sql})", params
    if isinstance(v, ReferenceValue):
        if v.url is not None:
            return f"{t}.url = ?", [clip(v.url)]
        if v.id is None:
            raise ValueError(f"reference value without id or url: {v!r}")
        conds, params = [f"{t}.target_id = ?"], [v.id]
        if v.type is not None:
            conds.append(f"{t}.target_type = ?")
            params.append(v.type)
        if v.version is not None:
            conds.append(f"{t}.target_version = ?")
            params.append(v.version)
        return f"({' AND '.join(conds)})", params
    if isinstance(v, UriValue):
        uri = clip(v.value)  # as stored
        if c.modifier == "below":
            return f"substr({t}.value, 1, ?) = ?", [len(uri), uri]
        if c.modifier == "above":
            return f"{t}.value = substr(CAST(? AS TEXT), 1, length({t}.value))", [uri]
        return f"{t}.value = ?", [uri]
    raise ValueError(f"unexpected value {v!r} for {c.type} parameter {c.code!r}")


def _token(v: TokenValue, sys_col: str, code_col: str) -> Frag:
    conds: list[str] = []
    params: list[Any] = []
    if not v.any_system:
        if v.system is None:
            conds.append(f"({sys_col} IS NULL OR {sys_col} = '')")
        else:
            conds.append(f"{sys_col} = ?")
            params.append(clip(v.system))
    if v.code is not None:
        conds.append(f"{code_col} = ?")
        params.append(clip(v.code))
    if not conds:
        return "1 = 0", []
    return f"({' AND '.join(conds)})", params


def _date(v: DateValue, lo: str, hi: str) -> Frag:
    """Stored [lo, hi] against search [slo, shi], all inclusive (R4 search.html)."""
    slo, shi = v.lo, v.hi
    eq = f"({lo} >= ? AND {hi} <= ?)"
    match v.prefix:
        case "eq":
            return eq, [slo, shi]
        case "ne":
            return f"NOT {eq}", [slo, shi]
        case "gt":  # the range above the search value overlaps the target
            return f"{hi} > ?", [shi]
        case "lt":
            return f"{lo} < ?", [slo]
        case "ge":  # gt, or the search range contains the target
            return f"({hi} > ? OR {eq})", [shi, slo, shi]
        case "le":
            return f"({lo} < ? OR {eq})", [slo, slo, shi]
        case "sa":
            return f"{lo} > ?", [shi]
        case "eb":
            return f"{hi} < ?", [slo]
        case "ap":  # bounds already widened by the parser: overlap
            return f"({lo} <= ? AND {hi} >= ?)", [shi, slo]
    raise ValueError(f"unknown prefix {v.prefix!r}")


def _number(
    prefix: str, value: float, slo: float, shi: float, lo: str, hi: str
) -> tuple[str, list[Any]]:
    """Stored [lo, hi] against the search value (eq/ne: its range [slo, shi))."""
    match prefix:
        case "eq":
            return f"{lo} >= ? AND {hi} < ?", [slo, shi]
        case "ne":
            return f"NOT ({lo} >= ? AND {hi} < ?)", [slo, shi]
        case "gt":
            return f"{hi} > ?", [value]
        case "lt":
            return f"{lo} < ?", [value]
        case "ge":
            return f"{hi} >= ?", [value]
        case "le":
            return f"{lo} <= ?", [value]
        case "sa":
            return f"{lo} > ?", [value]
        case "eb":
            return f"{hi} < ?", [value]
        case "ap":
            return f"{lo} <= ? AND {hi} >= ?", [shi, slo]
    raise ValueError(f"unknown prefix {prefix!r}")


def _or(frags: Sequence[Frag]) -> Frag:
    """Any of ``frags``, nested in pairs: ``a OR b OR c …`` is a tree as deep as it is
    long, and SQLite refuses expressions deeper than 1,000 (SQLITE_MAX_EXPR_DEPTH)."""
    if not frags:
        return "1 = 0", []
    if len(frags) == 1:
        return frags[0]
    if len(frags) > _OR_RUN:
        half = len(frags) // 2
        return _or([_or(frags[:half]), _or(frags[half:])])
    params: list[Any] = []
    for _, p in frags:
        params.extend(p)
    return "(" + " OR ".join(sql for sql, _ in frags) + ")", params


#: the longest run of ``OR`` written flat (deeper lists are nested in halves)
_OR_RUN = 64


def _marks(n: int) -> str:
    return ", ".join("?" for _ in range(n))


# -- ORDER BY -------------------------------------------------------------------


def _by_subquery(key: SortKey) -> bool:
    """Whether :func:`_sort_expr` orders by a correlated subquery (every key but the
    resource row's own columns)."""
    return key.param_code not in ("_id", "_lastUpdated")


def _sort_expr(key: SortKey, ctx: _Ctx) -> Frag:
    if key.param_code == "_id":
        return ctx.text("r.res_id"), []
    if key.param_code == "_lastUpdated":
        return "r.last_updated", []
    if key.type == "special":  # _sort=near: the distance to the nearest origin
        s = ctx.alias("s")
        frags = [ctx.distance_km(s, lat, lon) for lat, lon in key.origins]
        dist = frags[0][0] if len(frags) == 1 else (
            ("LEAST" if ctx.dialect == "postgresql" else "MIN")
            + f"({', '.join(f for f, _ in frags)})")
        param, codes = _param_is(s, key.codes)
        return (f"(SELECT {'MAX' if key.descending else 'MIN'}({dist}) FROM sp_coords {s}"
                f" WHERE {s}.res_type = r.res_type AND {s}.res_id = r.res_id AND {param})",
                [*(x for _, p in frags for x in p), *codes])
    spec = _SORT_COLUMN.get(key.type)
    if spec is None:
        raise ValueError(f"cannot sort by {key.type or 'untyped'} parameter {key.param_code!r}")
    asc_col, desc_col, is_text = spec
    s = ctx.alias("s")
    col = f"{s}.{desc_col if key.descending else asc_col}"
    # the value as an expression, not the bare column: MIN/MAX of an indexed column
    # tempts a planner into walking the parameter's value index until it meets this
    # resource (seconds on a few thousand resources when its statistics are stale);
    # an expression leaves it the resource's own rows to aggregate
    col = ctx.text(f"({col} || '')") if is_text else f"({col} + 0)"
    agg = "MAX" if key.descending else "MIN"
    param, codes = _param_is(s, key.codes)
    return (
        f"(SELECT {agg}({col}) FROM {_TABLE[key.type]} {s} WHERE {s}.res_type = r.res_type"
        f" AND {s}.res_id = r.res_id AND {param})",
        codes,
    )


# -- _include / _revinclude -----------------------------------------------------


def _include_sql(
    inc: Include, frontier: list[tuple[str, str]], reverse: bool,
    restrict: Restrict | None = None,
) -> list[Frag]:
    by_type: dict[str, list[str]] = {}
    for rtype, rid in frontier:
        by_type.setdefault(rtype, []).append(rid)
    out: list[Frag] = []
    for rtype, ids in by_type.items():
        if reverse:
            if inc.target_type is not None and rtype != inc.target_type:
                continue
        elif inc.source_type != "*" and rtype != inc.source_type:
            continue
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            params: list[Any] = []
            if reverse:
                conds = ["ref.target_type = ?", f"ref.target_id IN ({_marks(len(chunk))})"]
                params += [rtype, *chunk]
                if inc.source_type != "*":
                    conds.append("ref.res_type = ?")
                    params.append(inc.source_type)
                pick, join = ("ref.res_type", "ref.res_id")
            else:
                conds = ["ref.res_type = ?", f"ref.res_id IN ({_marks(len(chunk))})"]
                params += [rtype, *chunk]
                if inc.target_type is not None:
                    conds.append("ref.target_type = ?")
                    params.append(inc.target_type)
                pick, join = ("ref.target_type", "ref.target_id")
            if not inc.wildcard:
                conds.append("ref.param = ?")
                params.append(inc.param_code)
            if restrict is not None:
                # the type of what is found, where the include names it: the access
                # condition of that type alone (a statement to plan of a few dozen
                # values, not of every type's hundreds)
                known = inc.source_type if reverse else inc.target_type
                sql, p = restrict("x", [known] if known not in (None, "*") else None)
                conds.append(sql)
                params.extend(p)
            out.append((
                f"SELECT DISTINCT {pick}, {join} FROM sp_reference ref"
                f" JOIN resource x ON x.res_type = {pick} AND x.res_id = {join}"
                f" WHERE x.deleted = 0 AND {' AND '.join(conds)}"
                f" ORDER BY {pick}, {join}",
                params,
            ))
            out += _canonical_include_sql(inc, rtype, chunk, reverse, restrict)
    return out


def _canonical_include_sql(
    inc: Include, rtype: str, ids: list[str], reverse: bool, restrict: Restrict | None,
) -> list[Frag]:
    """What an include finds by canonical URL (search.html#reference): the canonical
    resources ``ids`` name by their ``url``, or (``reverse``) the resources that name
    canonical resources ``ids`` so."""
    if not inc.canonical or inc.wildcard or (reverse and (
            rtype not in inc.canonical or inc.source_type == "*")):
        return []
    if reverse:
        conds = ["u.res_type = ?", f"u.res_id IN ({_marks(len(ids))})", "u.param = 'url'",
                 "ref.res_type = ?", "ref.param = ?", "ref.target_type IS NULL"]
        params: list[Any] = [rtype, *ids, inc.source_type, inc.param_code]
        pick, join = "ref.res_type", "ref.res_id"
        known: str | None = inc.source_type
    else:
        conds = ["ref.res_type = ?", f"ref.res_id IN ({_marks(len(ids))})", "ref.param = ?",
                 "ref.target_type IS NULL", f"u.res_type IN ({_marks(len(inc.canonical))})",
                 "u.param = 'url'"]
        params = [rtype, *ids, inc.param_code, *inc.canonical]
        pick, join = "u.res_type", "u.res_id"
        known = inc.canonical[0] if len(inc.canonical) == 1 else None
    if restrict is not None:
        sql, p = restrict("x", [known] if known is not None else None)
        conds.append(sql)
        params.extend(p)
    return [(
        f"SELECT DISTINCT {pick}, {join} FROM sp_reference ref"
        f" JOIN sp_uri u ON u.value = ref.url"
        f" JOIN resource x ON x.res_type = {pick} AND x.res_id = {join}"
        f" WHERE x.deleted = 0 AND {' AND '.join(conds)}"
        f" ORDER BY {pick}, {join}",
        params,
    )]
