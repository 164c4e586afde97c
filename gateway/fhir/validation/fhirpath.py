"""Invariants (``ElementDefinition.constraint.expression``) compiled once.

FHIRPath: http://hl7.org/fhirpath/N1/ ; invariants: https://hl7.org/fhir/R4/conformance-rules.html#constraints

fhirpathpy evaluates an expression in ~35-70 µs, too slow to run every
invariant on every element. So each expression is parsed once (by
fhirpathpy's parser) and translated into Python closures for the part of the
language the R4 invariants mostly use -- navigation to child elements (typed by
the compiled StructureDefinition tables, so choice elements such as ``value``
find ``valueQuantity``), ``exists()``, ``empty()``, ``not()``, ``count()``,
``hasValue()``, ``where()``, ``all()``, ``matches()``, ``trace()``, ``=``,
``!=``, ``<``/``<=``/``>``/``>=`` (numbers, strings, and dates with FHIRPath's
partial-precision rule), ``+`` on integers, ``in`` a literal list, ``and``,
``or``, ``xor``, ``implies``, ``%ucum`` and literals. A logical operand outside
that subset is handed to fhirpathpy (on the parsed sub-tree, so nothing is
re-parsed), the rest of the expression stays compiled. ``tests/fhir/validation``
checks that both agree on every invariant of the R4 examples.

An invariant fails only when it evaluates to ``false``; an empty result (for
instance dates of different precision) is not a failure.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

import fhirpathpy
from fhirpathpy.engine.nodes import ResourceNode
from fhirpathpy.models import models as _fhirpath_models
from fhirpathpy.parser import parse

from gateway.fhir import patterns
from gateway.fhir.validation.primitives import NUMERIC, PRIMITIVES, STRING_LIKE

UCUM = "http://unitsofmeasure.org"
DATE_TYPES = frozenset(("date", "dateTime", "instant"))
_MODEL = _fhirpath_models["r4"]
# fhirpathpy's functions carry no annotations
_parse: Any = parse
_apply_parsed_path: Any = fhirpathpy.apply_parsed_path
_create_node: Any = ResourceNode.create_node


class _NoValue:
    """A primitive element that has extensions but no value (``_name`` only)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NO_VALUE"


NO_VALUE = _NoValue()


@dataclass(slots=True)
class Env:
    """What ``%resource`` and ``%rootResource`` mean where an invariant runs."""

    resource: Any
    root: Any


class Member(Protocol):
    keys: tuple[tuple[str, bool], ...]  # (JSON key, is primitive)
    types: tuple[str, ...]

    def node(self) -> Any: ...  # the complex type's table when there is exactly one type


class TypeTable(Protocol):
    def member(self, name: str) -> Member | None: ...


class NotCompilable(Exception):
    pass


class EvaluationError(Exception):
    pass


Coll = list[Any]
Fn = Callable[[Coll, Env], Coll]
Evaluator = Callable[[Any, Env], "bool | None"]


@dataclass(frozen=True, slots=True)
class SType:
    """Static type of a compiled sub-expression."""

    kind: str  # node | prim | choice | bool | int | str | num | any
    # TypeTable for kind "node"; not in the repr, which names a type in an error
    # message: the table's own would walk every type reachable from it (1.3 s)
    table: Any = field(default=None, repr=False)
    code: str = ""  # FHIR type code for kind "prim"


BOOL = SType("bool")
INT = SType("int")
STR = SType("str")
NUM = SType("num")
ANY = SType("any")


# ----------------------------------------------------------------------------------
# value helpers


def truth(coll: Sequence[Any]) -> bool | None:
    """FHIRPath singleton evaluation of a collection as Boolean."""
    if not coll:
        return None
    if len(coll) == 1:
        v = coll[0]
        if v is True or v is False:
            return v
        if v is NO_VALUE:
            return None
        return True
    raise EvaluationError("a collection of several items where a Boolean is expected")


def _num(v: Any) -> Decimal | None:
    if v is True or v is False or v is NO_VALUE:
        return None
    if isinstance(v, int | Decimal):
        return Decimal(v)
    if isinstance(v, float):
        return Decimal(repr(v))
    return None


_DT = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(\.\d+)?)?"
    r"(Z|[+-]\d{2}:\d{2})?)?)?)?"
)

_Parts = list[Decimal | int]


def _date_parts(value: str) -> tuple[_Parts, _Parts | None] | None:
    """Components (year, month, day, hour, minute, seconds) as written, and in UTC
    when a time with a zone was given."""
    m = _DT.fullmatch(value)
    if m is None:
        return None
    y, mo, d, h, mi, s, frac, tz = m.groups()
    parts: _Parts = [int(y)]
    for p in (mo, d, h, mi):
        if p is None:
            break
        parts.append(int(p))
    if s is not None and len(parts) == 5:
        parts.append(Decimal(s + (frac or "")))
    if not tz or len(parts) < 5:
        return parts, None
    offset = timedelta(0) if tz == "Z" else (1 if tz[0] == "+" else -1) * timedelta(
        hours=int(tz[1:3]), minutes=int(tz[4:6]))
    seconds = Decimal(parts[5]) if len(parts) > 5 else Decimal(0)
    whole = min(int(seconds), 59)  # a leap second compares as :59 plus its fraction
    try:
        at = datetime(int(parts[0]), int(parts[1]), int(parts[2]), int(parts[3]),
                      int(parts[4]), whole, tzinfo=UTC) - offset
    except (ValueError, OverflowError):
        return None
    utc: _Parts = [at.year, at.month, at.day, at.hour, at.minute]
    if len(parts) > 5:
        utc.append(Decimal(at.second) + (seconds - whole))
    return parts, utc


def date_compare(a: str, b: str) -> int | None:
    """-1/0/1, or None when precision (or a missing zone) leaves it undecided."""
    pa, pb = _date_parts(a), _date_parts(b)
    if pa is None or pb is None:
        return None
    (la, ua), (lb, ub) = pa, pb
    if ua is not None and ub is not None:
        xa, xb = ua, ub
    elif len(la) > 3 and len(lb) > 3:
        return None  # times, one without a zone: undecided
    else:
        xa, xb = la, lb
    for u, v in zip(xa, xb, strict=False):
        if u != v:
            return -1 if u < v else 1
    if len(xa) != len(xb):
        return None
    return 0


def _item_eq(a: Any, b: Any) -> bool | None:
    if a is NO_VALUE or b is NO_VALUE:
        return None
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    na, nb = _num(a), _num(b)
    if na is not None and nb is not None:
        return na == nb
    return False


def _equals(a: Coll, b: Coll) -> Coll:
    if not a or not b:
        return []
    if len(a) != len(b):
        return [False]
    for x, y in zip(a, b, strict=True):
        r = _item_eq(x, y)
        if r is None:
            return []
        if not r:
            return [False]
    return [True]


# ----------------------------------------------------------------------------------
# AST helpers


def _kids(node: dict[str, Any]) -> list[dict[str, Any]]:
    return list(node.get("children") or [])


def _op(node: dict[str, Any]) -> str:
    texts = node.get("terminalNodeText") or []
    return str(texts[0]) if texts else ""


def _identifier(node: dict[str, Any]) -> str:
    text = str((node.get("terminalNodeText") or [node.get("text", "")])[0])
    return text[1:-1] if text.startswith("`") else text


_ESCAPES = {"'": "'", '"': '"', "`": "`", "\\": "\\", "/": "/", "f": "\f", "n": "\n",
            "r": "\r", "t": "\t"}


def _string_literal(text: str) -> str:
    body = text[1:-1]
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            if nxt == "u" and i + 5 < len(body):
                out.append(chr(int(body[i + 2:i + 6], 16)))
                i += 6
                continue
            out.append(_ESCAPES.get(nxt, nxt))
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


# ----------------------------------------------------------------------------------
# the compiler


class _Compiler:
    def __init__(self, type_path: str, resource: TypeTable | None) -> None:
        self.type_path = type_path
        self.resource = resource
        self.fallbacks = 0

    # -- collections --------------------------------------------------------------

    def coll(self, node: dict[str, Any], t: SType) -> tuple[Fn, SType]:
        kind = node.get("type")
        kids = _kids(node)
        if kind == "TermExpression":
            return self.term(kids[0], t)
        if kind == "InvocationExpression":
            presence = self.presence(node, t)
            if presence is not None:
                return (lambda items, env: _box(presence(items, env))), BOOL
            left, lt = self.coll(kids[0], t)
            right, rt = self.invocation(kids[1], lt)
            return (lambda items, env: right(left(items, env), env)), rt
        if kind in ("AndExpression", "OrExpression", "ImpliesExpression"):
            fn = self.logic(node, t)
            return (lambda items, env: _box(fn(items, env))), BOOL
        if kind == "EqualityExpression":
            return self.equality(node, t)
        if kind == "InequalityExpression":
            return self.inequality(node, t)
        if kind == "AdditiveExpression" and _op(node) == "+":
            (a, at), (b, bt) = self.coll(kids[0], t), self.coll(kids[1], t)
            if at.kind == bt.kind == "int":
                def add(items: Coll, env: Env) -> Coll:
                    x, y = a(items, env), b(items, env)
                    return [x[0] + y[0]] if x and y else []
                return add, INT
        if kind == "MembershipExpression" and _op(node) == "in":
            return self.membership(node, t)
        if kind == "UnionExpression":
            values = self.literal_union(node)
            return (lambda items, env: list(values)), ANY
        if kind == "TypeExpression" and _op(node) == "is":
            return self.is_type(node, t)
        if kind == "TypeExpression" and _op(node) == "as":
            return self.as_type(node, t)
        if kind == "PolarityExpression" and _op(node) == "-":
            inner, it = self.coll(kids[0], t)
            if it.kind == "num":
                value = inner([], Env(None, None))
                negated = [-value[0]]
                return (lambda items, env: negated), NUM
        raise NotCompilable(str(kind))

    def term(self, node: dict[str, Any], t: SType) -> tuple[Fn, SType]:
        kind = node.get("type")
        kids = _kids(node)
        if kind == "InvocationTerm":
            inv = kids[0]
            if inv.get("type") == "MemberInvocation" and t.kind == "node" and \
                    _identifier(_kids(inv)[0]) == self.type_path and \
                    t.table.member(self.type_path) is None:
                return (lambda items, env: items), t  # "Appointment.status" on an Appointment
            return self.invocation(inv, t)
        if kind == "ParenthesizedTerm":
            return self.coll(kids[0], t)
        if kind == "LiteralTerm":
            lit = kids[0]
            lk = lit.get("type")
            text = str((lit.get("terminalNodeText") or [""])[0])
            if lk == "StringLiteral":
                value: list[Any] = [_string_literal(text)]
                return (lambda items, env: value), STR
            if lk == "NumberLiteral":
                num = Decimal(text)
                value = [int(num)] if num == num.to_integral_value() and "." not in text \
                    else [num]
                return (lambda items, env: value), NUM
            if lk == "BooleanLiteral":
                value = [text == "true"]
                return (lambda items, env: value), BOOL
            if lk == "NullLiteral":
                return (lambda items, env: []), ANY
            raise NotCompilable(str(lk))
        if kind == "ExternalConstantTerm":
            name = _identifier(_kids(kids[0])[0])
            if name == "ucum":
                value = [UCUM]
                return (lambda items, env: value), STR
            if name == "resource" and self.resource is not None:
                return (lambda items, env: [env.resource]), SType("node", self.resource)
            raise NotCompilable("%" + name)
        raise NotCompilable(str(kind))

    def invocation(self, node: dict[str, Any], t: SType) -> tuple[Fn, SType]:
        kind = node.get("type")
        if kind == "MemberInvocation":
            return self.member(_identifier(_kids(node)[0]), t)
        if kind == "ThisInvocation":
            return (lambda items, env: items), t
        if kind == "FunctionInvocation":
            functn = _kids(node)[0]
            parts = _kids(functn)
            name = _identifier(parts[0])
            params = _kids(parts[1]) if len(parts) > 1 else []
            return self.function(name, params, t)
        raise NotCompilable(str(kind))

    def member(self, name: str, t: SType) -> tuple[Fn, SType]:
        if t.kind != "node" or t.table is None:
            raise NotCompilable(f"member {name} of {t.kind}")
        m = t.table.member(name)
        if m is None:
            raise NotCompilable(f"unknown member {name}")
        keys = m.keys
        if len(m.types) == 1:
            code = m.types[0]
            sub = m.node()
            st = SType("node", sub) if sub is not None else (
                SType("prim", code=code) if keys[0][1] else ANY)
        else:
            st = SType("choice")

        def step(items: Coll, env: Env) -> Coll:
            out: Coll = []
            for it in items:
                if type(it) is not dict:
                    continue
                for key, prim in keys:
                    v = it.get(key)
                    if v is None:
                        if prim:
                            ext = it.get("_" + key)
                            if type(ext) is list:
                                out.extend(NO_VALUE for _ in ext)
                            elif ext is not None:
                                out.append(NO_VALUE)
                        continue
                    if type(v) is list:
                        if prim:
                            out.extend(NO_VALUE if x is None else x for x in v)
                        else:
                            out.extend(v)
                    else:
                        out.append(v)
            return out

        return step, st

    def function(self, name: str, params: list[dict[str, Any]], t: SType
                 ) -> tuple[Fn, SType]:
        if name in ("exists", "where", "all") and params:
            crit = self.boolean(params[0], t)

            def matching(items: Coll, env: Env) -> Coll:
                return [i for i in items if crit([i], env) is True]

            if name == "where":
                return matching, t
            if name == "exists":
                return (lambda items, env: [bool(matching(items, env))]), BOOL
            return (lambda items, env: [all(crit([i], env) is True for i in items)]), BOOL
        if name == "select" and len(params) == 1:
            proj, pt = self.coll(params[0], t)

            def select(items: Coll, env: Env) -> Coll:
                out: Coll = []
                for i in items:
                    out.extend(proj([i], env))
                return out
            return select, pt
        if name in ("startsWith", "contains") and len(params) == 1:
            arg, at = self.coll(params[0], t)
            if at.kind != "str" or not (t.kind == "str" or (t.kind == "prim" and
                                                           t.code in STRING_LIKE)):
                raise NotCompilable(f"{name} on {t.kind}")
            text = arg([], Env(None, None))[0]

            def string_test(items: Coll, env: Env) -> Coll:
                if not items or items[0] is NO_VALUE:
                    return []
                if len(items) > 1:
                    raise EvaluationError(f"{name}() on several items")
                v = items[0]
                if not isinstance(v, str):
                    return []
                return [v.startswith(text) if name == "startsWith" else text in v]
            return string_test, BOOL
        if name == "intersect" and len(params) == 1:
            other, ot = self.coll(params[0], _root_type(t))
            if ot.kind != t.kind or (t.kind == "node" and ot.table is not t.table):
                raise NotCompilable("intersect of different types")

            def intersect(items: Coll, env: Env) -> Coll:
                right = other(items, env)
                out: Coll = []
                for i in items:
                    if any(_deep_equal(i, r) for r in right) and \
                            not any(_deep_equal(i, o) for o in out):
                        out.append(i)
                return out
            return intersect, t
        if params and name not in ("matches", "trace"):
            raise NotCompilable(f"{name}(...)")
        if name == "exists":
            return (lambda items, env: [bool(items)]), BOOL
        if name == "empty":
            return (lambda items, env: [not items]), BOOL
        if name == "count":
            return (lambda items, env: [len(items)]), INT
        if name == "not":
            def not_(items: Coll, env: Env) -> Coll:
                v = truth(items)
                return [] if v is None else [not v]
            return not_, BOOL
        if name == "hasValue":
            def has_value(items: Coll, env: Env) -> Coll:
                return [len(items) == 1 and items[0] is not NO_VALUE
                        and type(items[0]) is not dict]
            return has_value, BOOL
        if name == "trace":
            return (lambda items, env: items), t
        if name == "first":
            return (lambda items, env: items[:1]), t
        if name == "toString" and (t.kind == "str" or (
                t.kind == "prim" and (t.code in STRING_LIKE or t.code in DATE_TYPES or
                                      t.code == "time"))):
            return (lambda items, env: [i for i in items if isinstance(i, str)]), STR
        if name == "length" and (t.kind == "str" or (t.kind == "prim" and
                                                    t.code in STRING_LIKE)):
            def length(items: Coll, env: Env) -> Coll:
                if len(items) > 1:
                    raise EvaluationError("length() on several items")
                return [len(items[0])] if items and isinstance(items[0], str) else []
            return length, INT
        if name == "isDistinct":
            if not (t.kind in ("str", "num", "int") or (t.kind == "prim" and
                                                        t.code in STRING_LIKE | NUMERIC)):
                raise NotCompilable(f"isDistinct() of {t.kind}")

            def distinct(items: Coll, env: Env) -> Coll:
                keys = {_num(i) if not isinstance(i, str) else i for i in items}
                return [len(keys) == len(items)]
            return distinct, BOOL
        if name == "matches" and len(params) == 1:
            pattern, pt = self.coll(params[0], t)
            if pt.kind != "str":
                raise NotCompilable("matches with a computed pattern")
            regex = pattern([], Env(None, None))[0]
            try:  # RE2, linear in the text: a stored profile's pattern cannot hang a write
                patterns.compiled(regex, dot_all=True)
            except patterns.PatternError as exc:
                raise NotCompilable(str(exc)) from None  # fhirpathpy reports it

            def matches(items: Coll, env: Env) -> Coll:
                if not items:
                    return []
                if len(items) > 1:
                    raise EvaluationError("matches() on several items")
                v = items[0]
                return ([patterns.search(regex, v, dot_all=True)] if isinstance(v, str)
                        else [])
            return matches, BOOL
        raise NotCompilable(f"{name}()")

    def equality(self, node: dict[str, Any], t: SType) -> tuple[Fn, SType]:
        op = _op(node)
        if op not in ("=", "!="):
            raise NotCompilable(op)
        kids = _kids(node)
        (a, at), (b, bt) = self.coll(kids[0], t), self.coll(kids[1], t)
        if not (_comparable(at, bt) or _comparable(bt, at)):
            raise NotCompilable(f"{at} {op} {bt}")
        if op == "=":
            return (lambda items, env: _equals(a(items, env), b(items, env))), BOOL

        def not_equal(items: Coll, env: Env) -> Coll:
            r = _equals(a(items, env), b(items, env))
            return [not r[0]] if r else []
        return not_equal, BOOL

    def inequality(self, node: dict[str, Any], t: SType) -> tuple[Fn, SType]:
        op = _op(node)
        kids = _kids(node)
        (a, at), (b, bt) = self.coll(kids[0], t), self.coll(kids[1], t)
        dates = _is_date(at) and _is_date(bt)
        quantities = _is_quantity(at) and _is_quantity(bt)
        if not dates and not quantities and not (_ordered(at, bt) or _ordered(bt, at)):
            raise NotCompilable(f"{at} {op} {bt}")
        test: Callable[[int], bool] = {
            "<": lambda c: c < 0, "<=": lambda c: c <= 0,
            ">": lambda c: c > 0, ">=": lambda c: c >= 0,
        }[op]

        def compare(items: Coll, env: Env) -> Coll:
            x, y = a(items, env), b(items, env)
            if not x or not y:
                return []
            if len(x) > 1 or len(y) > 1:
                raise EvaluationError("comparison of several items")
            u, v = x[0], y[0]
            if u is NO_VALUE or v is NO_VALUE:
                return []
            c: int | None
            if quantities:
                c = _quantity_compare(u, v)
            elif dates:
                c = date_compare(u, v) if isinstance(u, str) and isinstance(v, str) else None
            elif isinstance(u, str) and isinstance(v, str):
                c = (u > v) - (u < v)
            else:
                nu, nv = _num(u), _num(v)
                if nu is None or nv is None:
                    return []
                c = (nu > nv) - (nu < nv)
            return [] if c is None else [test(c)]
        return compare, BOOL

    def membership(self, node: dict[str, Any], t: SType) -> tuple[Fn, SType]:
        kids = _kids(node)
        a, at = self.coll(kids[0], t)
        if not (at.kind == "prim" and at.code in STRING_LIKE):
            raise NotCompilable("in on a non-string")
        right = kids[1]
        while right.get("type") in ("TermExpression", "ParenthesizedTerm") and \
                _kids(right)[0].get("type") != "LiteralTerm":
            right = _kids(right)[0]
        values = frozenset(self.literal_union(right))

        def member_of(items: Coll, env: Env) -> Coll:
            x = a(items, env)
            if not x:
                return []
            if len(x) > 1:
                raise EvaluationError("'in' on several items")
            v = x[0]
            return [v in values] if isinstance(v, str | int | float | Decimal) else []
        return member_of, BOOL

    def literal_union(self, node: dict[str, Any]) -> list[Any]:
        kind = node.get("type")
        if kind == "UnionExpression":
            out: list[Any] = []
            for k in _kids(node):
                out.extend(self.literal_union(k))
            return out
        if kind in ("TermExpression", "ParenthesizedTerm"):
            inner = _kids(node)[0]
            if inner.get("type") == "LiteralTerm":
                fn, st = self.term(inner, ANY)
                if st.kind not in ("str", "num", "bool"):
                    raise NotCompilable("non-literal in a union")
                return list(fn([], Env(None, None)))
            return self.literal_union(inner)
        raise NotCompilable(f"union of {kind}")

    def is_type(self, node: dict[str, Any], t: SType) -> tuple[Fn, SType]:
        left, spec = _kids(node)
        inv = left
        while inv.get("type") in ("TermExpression", "InvocationTerm"):
            inv = _kids(inv)[0]
        if inv.get("type") != "MemberInvocation" or t.kind != "node":
            raise NotCompilable("'is' on a computed value")
        m = t.table.member(_identifier(_kids(inv)[0]))
        if m is None:
            raise NotCompilable("'is' on an unknown member")
        wanted = _identifier(_kids(_kids(spec)[0])[-1])
        keys = [(key, code) for (key, _), code in zip(m.keys, m.types, strict=True)]

        def is_type(items: Coll, env: Env) -> Coll:
            found: list[str] = []
            for it in items:
                if type(it) is not dict:
                    continue
                for key, code in keys:
                    v = it.get(key, it.get("_" + key))
                    if v is not None:
                        found.extend([code] * (len(v) if type(v) is list else 1))
            if not found:
                return []
            if len(found) > 1:
                raise EvaluationError("'is' on several items")
            code = found[0]
            return [code == wanted or (code[:1].islower() and code.lower() == wanted.lower())]
        return is_type, BOOL

    def as_type(self, node: dict[str, Any], t: SType) -> tuple[Fn, SType]:
        left, spec = _kids(node)
        fn, lt = self.coll(left, t)
        wanted = _identifier(_kids(_kids(spec)[0])[-1])
        if lt.kind == "prim":
            same = lt.code == wanted or (lt.code[:1].islower() and
                                         lt.code.lower() == wanted.lower())
        elif lt.kind == "node":
            same = getattr(lt.table, "path", None) == wanted
        else:
            raise NotCompilable(f"'as' on {lt.kind}")
        if same:
            return fn, lt
        target = wanted[:1].lower() + wanted[1:]
        return (lambda items, env: []), (SType("prim", code=target) if target in PRIMITIVES
                                         else ANY)

    # -- booleans with fallback -----------------------------------------------------

    def logic(self, node: dict[str, Any], t: SType) -> Callable[[Coll, Env], bool | None]:
        kind, op = node.get("type"), _op(node)
        kids = _kids(node)
        a, b = self.boolean(kids[0], t), self.boolean(kids[1], t)
        if kind == "AndExpression":
            def and_(items: Coll, env: Env) -> bool | None:
                x = a(items, env)
                if x is False:
                    return False
                y = b(items, env)
                if y is False:
                    return False
                return True if x is True and y is True else None
            return and_
        if kind == "OrExpression" and op == "or":
            def or_(items: Coll, env: Env) -> bool | None:
                x = a(items, env)
                if x is True:
                    return True
                y = b(items, env)
                if y is True:
                    return True
                return False if x is False and y is False else None
            return or_
        if kind == "OrExpression" and op == "xor":
            def xor(items: Coll, env: Env) -> bool | None:
                x, y = a(items, env), b(items, env)
                return None if x is None or y is None else x != y
            return xor
        if kind == "ImpliesExpression":
            def implies(items: Coll, env: Env) -> bool | None:
                x = a(items, env)
                if x is False:
                    return True
                y = b(items, env)
                if y is True:
                    return True
                return False if x is True and y is False else None
            return implies
        raise NotCompilable(f"{kind} {op}")

    def presence(self, node: dict[str, Any], t: SType
                 ) -> Callable[[Coll, Env], bool | None] | None:
        """``child.exists()`` / ``child.empty()`` on the focus: a key lookup, no collection."""
        if t.kind != "node":
            return None
        left, inv = _kids(node)
        if inv.get("type") != "FunctionInvocation":
            return None
        parts = _kids(_kids(inv)[0])
        name = _identifier(parts[0])
        if name not in ("exists", "empty") or len(parts) > 1:
            return None
        term = left
        if term.get("type") != "TermExpression":
            return None
        term = _kids(term)[0]
        if term.get("type") != "InvocationTerm":
            return None
        member = _kids(term)[0]
        if member.get("type") != "MemberInvocation":
            return None
        m = t.table.member(_identifier(_kids(member)[0]))
        if m is None:
            return None
        keys = tuple(k for key, prim in m.keys for k in ((key, "_" + key) if prim else (key,)))
        want = name == "exists"

        def present(items: Coll, env: Env) -> bool | None:
            for it in items:
                if type(it) is dict:
                    for k in keys:
                        if k in it:
                            return want
            return not want
        return present

    def boolean(self, node: dict[str, Any], t: SType) -> Callable[[Coll, Env], bool | None]:
        """A Boolean-valued sub-expression: compiled, else fhirpathpy on that sub-tree."""
        kind = node.get("type")
        if kind in ("AndExpression", "OrExpression", "ImpliesExpression"):
            return self.logic(node, t)
        if kind == "TermExpression" and _kids(node)[0].get("type") == "ParenthesizedTerm":
            return self.boolean(_kids(_kids(node)[0])[0], t)
        if kind == "InvocationExpression":
            presence = self.presence(node, t)
            if presence is not None:
                return presence
            inv = _kids(node)[1]
            if inv.get("type") == "FunctionInvocation":
                parts = _kids(_kids(inv)[0])
                if _identifier(parts[0]) == "not" and len(parts) == 1:
                    inner_node = _kids(node)[0]
                    inner = self.boolean(inner_node, t)

                    def negate(items: Coll, env: Env) -> bool | None:
                        v = inner(items, env)
                        return None if v is None else not v
                    return negate
        try:
            fn, st = self.coll(node, t)
            if st.kind not in ("bool",) and not (st.kind == "prim" and st.code == "boolean"):
                raise NotCompilable(f"{st.kind} used as Boolean")
            return lambda items, env: truth(fn(items, env))
        except NotCompilable:
            if t.kind not in ("node", "prim"):
                raise
            self.fallbacks += 1
            return _fallback(node, self.type_path)


def _comparable(a: SType, b: SType) -> bool:
    strings = {"str"}
    if a.kind == "str" or (a.kind == "prim" and a.code in STRING_LIKE):
        return b.kind in strings or (b.kind == "prim" and b.code in STRING_LIKE)
    if a.kind in ("num", "int") or (a.kind == "prim" and a.code in NUMERIC):
        return b.kind in ("num", "int") or (b.kind == "prim" and b.code in NUMERIC)
    if a.kind == "bool" or (a.kind == "prim" and a.code == "boolean"):
        return b.kind == "bool" or (b.kind == "prim" and b.code == "boolean")
    return False


def _ordered(a: SType, b: SType) -> bool:
    if a.kind == "bool" or b.kind == "bool" or (a.kind == "prim" and a.code == "boolean"):
        return False
    return _comparable(a, b)


def _is_date(t: SType) -> bool:
    return t.kind == "prim" and t.code in DATE_TYPES


def _is_quantity(t: SType) -> bool:
    return t.kind == "node" and getattr(t.table, "path", None) in ("Quantity", "Age",
                                                                  "Duration", "Distance",
                                                                  "Count")


def _quantity_compare(a: Any, b: Any) -> int | None:
    """Quantities compare when they carry the same unit (no UCUM conversion)."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return None
    x, y = _num(a.get("value")), _num(b.get("value"))
    if x is None or y is None:
        return None
    same = (a.get("system"), a.get("code")) == (b.get("system"), b.get("code")) \
        if "code" in a or "code" in b else a.get("unit") == b.get("unit")
    if not same:
        return None
    return (x > y) - (x < y)


def _deep_equal(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_deep_equal(x, y) for x, y in zip(a, b, strict=True))
    r = _item_eq(a, b)
    return bool(r)


def _root_type(t: SType) -> SType:
    # arguments of intersect() are evaluated against the same focus as the expression;
    # here they always start from %resource, so the focus type does not matter
    return t


def _box(v: bool | None) -> Coll:
    return [] if v is None else [v]


# ----------------------------------------------------------------------------------
# fhirpathpy for what is not compiled


def _has_value(inputs: list[Any]) -> bool:
    return len(inputs) == 1 and inputs[0] is not None and not isinstance(inputs[0], dict)


def _quiet_trace(label: str, value: Any) -> None:
    """``trace()`` in an invariant must not print (fhirpathpy's default)."""


_OPTIONS = {"userInvocationTable": {"hasValue": {"fn": _has_value}}, "traceFn": _quiet_trace}


def _fallback(node: dict[str, Any], type_path: str) -> Callable[[Coll, Env], bool | None]:
    parsed = {"children": [node]}

    def run(items: Coll, env: Env) -> bool | None:
        focus = items[0] if items else None
        try:
            result = _apply_parsed_path(
                _create_node(focus, type_path), parsed,
                {"resource": env.resource, "rootResource": env.root, "context": focus},
                _MODEL, _OPTIONS,
            )
        except Exception as exc:  # fhirpathpy raises plain exceptions of many kinds
            raise EvaluationError(f"{type(exc).__name__}: {str(exc)[:120]}") from None
        return truth(result if isinstance(result, list) else [result])

    return run


@dataclass(frozen=True, slots=True)
class Compiled:
    evaluate: Evaluator
    #: sub-expressions left to fhirpathpy (0: fully compiled)
    fallbacks: int


def compile_invariant(expression: str, focus: TypeTable | str, type_path: str,
                      resource: TypeTable | None = None) -> Compiled:
    """Compile ``expression`` for a focus of the given type.

    ``focus`` is the focus element's :class:`TypeTable` (complex types and
    backbone elements) or its primitive type code. ``type_path`` is the FHIR
    type name or backbone element path fhirpathpy needs for choice elements.
    """
    tree = _parse(expression)
    root = _kids(tree)[0]
    t = SType("prim", code=focus) if isinstance(focus, str) else SType("node", focus)
    c = _Compiler(type_path, resource)
    fn = c.boolean(root, t)

    def evaluate(item: Any, env: Env) -> bool | None:
        return fn([item], env)

    return Compiled(evaluate, c.fallbacks)


def reference_evaluator(expression: str, type_path: str) -> Evaluator:
    """The same expression evaluated by fhirpathpy alone (for tests and ``warn`` checks)."""
    tree = _parse(expression)
    run = _fallback(_kids(tree)[0], type_path)
    return lambda item, env: run([item], env)


__all__ = [
    "NO_VALUE", "Compiled", "Env", "EvaluationError", "compile_invariant", "date_compare",
    "reference_evaluator", "truth",
]
