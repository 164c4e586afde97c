"""Compile the FHIRPath subset used by R4 SearchParameter expressions.

A search parameter's ``expression`` is compiled once into plain Python closures
that walk the parsed JSON (dicts and lists), so indexing a resource never
interprets FHIRPath text again.

The compiler is type-aware: it follows the StructureDefinition snapshots to know
that ``Observation.value`` means the JSON keys ``valueQuantity``,
``valueCodeableConcept``, ... and which FHIR type each key holds.  A compiled
expression is a list of :class:`Branch` objects, each with a ``run`` function
(``[resource] -> list of values``, or starting from the values of one top-level
key, see :attr:`Branch.key`) and the static FHIR type of those values (``None``
when it can only be known at run time).

Supported: member access, choice elements (``value[x]``), contentReference,
``|``, ``as``/``is``, ``.as()``, ``.ofType()``, ``.where()``, ``.exists()``,
``.empty()``, ``.not()``, ``.first()``, ``[n]``, ``.extension('url')``,
``.hasExtension('url')``, ``resolve()`` (only as ``resolve() is Type``), ``=``,
``!=``, ``and``, ``or``, string/boolean/number literals.  Anything else raises
:class:`CompileError` (the caller falls back to an interpreter).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

Values = list[Any]
Step = Callable[[Values], Values]

# Pseudo-type of the values produced by ``resolve()``: the target's type name.
RESOLVED = "__resolved__"

_SYSTEM_TYPES = {
    "http://hl7.org/fhirpath/System.String": "string",
    "http://hl7.org/fhirpath/System.Boolean": "boolean",
    "http://hl7.org/fhirpath/System.Integer": "integer",
    "http://hl7.org/fhirpath/System.Decimal": "decimal",
    "http://hl7.org/fhirpath/System.Date": "date",
    "http://hl7.org/fhirpath/System.DateTime": "dateTime",
    "http://hl7.org/fhirpath/System.Time": "time",
}

_REF_TAIL = re.compile(
    r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$"
)


class CompileError(Exception):
    """The expression uses FHIRPath this compiler does not translate."""


class LiteralOutOfRange(CompileError):
    """A number literal FHIRPath itself does not allow: not an expression at all."""


#: FHIRPath's Integer is a 32-bit signed integer (a literal is written without sign)
MAX_INTEGER = 2**31 - 1


# --------------------------------------------------------------------------- model


@dataclass(frozen=True, slots=True)
class Child:
    key: str  # JSON property name
    type: str  # FHIR type code of the values
    ctx: str  # element path under which the value's own children are defined


class Model:
    """Element types from StructureDefinition snapshots."""

    def __init__(self, structure_definitions: Iterable[dict[str, Any]]) -> None:
        self._types: dict[str, tuple[str, ...]] = {}
        self._content_ref: dict[str, str] = {}
        self._has_children: set[str] = set()
        self._base: dict[str, str] = {}
        resources: set[str] = set()
        abstract: set[str] = set()
        for sd in structure_definitions:
            if not isinstance(sd, dict) or sd.get("derivation") == "constraint":
                continue
            name = sd.get("type") or sd.get("id")
            if not isinstance(name, str):
                continue
            base = sd.get("baseDefinition")
            if isinstance(base, str):
                self._base[name] = base.rsplit("/", 1)[-1]
            if sd.get("kind") == "resource":
                resources.add(name)
                if sd.get("abstract"):
                    abstract.add(name)
            for el in (sd.get("snapshot") or {}).get("element") or ():
                path = el.get("path")
                if not isinstance(path, str):
                    continue
                if "." in path:
                    self._has_children.add(path.rsplit(".", 1)[0])
                ref = el.get("contentReference")
                if isinstance(ref, str):
                    self._content_ref[path] = ref.lstrip("#").split("#")[-1]
                codes: list[str] = []
                for t in el.get("type") or ():
                    code = t.get("code") if isinstance(t, dict) else None
                    if isinstance(code, str):
                        codes.append(_SYSTEM_TYPES.get(code, code))
                if codes:
                    self._types[path] = tuple(codes)
        self.resource_types: frozenset[str] = frozenset(resources - abstract)
        self.domain_resource_types: frozenset[str] = frozenset(
            r for r in self.resource_types if self.is_subtype(r, "DomainResource")
        )
        all_types = set(self._base) | {t for ts in self._types.values() for t in ts}
        # JSON suffix of a choice element ("valueDateTime") -> type code ("dateTime").
        self.type_by_suffix: dict[str, str] = {t[:1].upper() + t[1:]: t for t in all_types}
        self._children_cache: dict[tuple[str, str], tuple[Child, ...] | None] = {}

    def is_type_name(self, name: str) -> bool:
        return name in self._base or name in ("Resource", "Element")

    def is_subtype(self, sub: str, sup: str) -> bool:
        seen = 0
        t: str | None = sub
        while t is not None and seen < 20:
            if t == sup:
                return True
            t = self._base.get(t)
            seen += 1
        return False

    def children(self, ctx: str, name: str) -> tuple[Child, ...] | None:
        """The JSON keys that element ``name`` of ``ctx`` maps to, or None if unknown."""
        key = (ctx, name)
        try:
            return self._children_cache[key]
        except KeyError:
            pass
        result = self._children(ctx, name)
        self._children_cache[key] = result
        return result

    def child(self, ctx: str, key: str) -> tuple[str, Child] | None:
        """The element (its name, without ``[x]``) and the Child that JSON key ``key``
        under ``ctx`` holds: ``multipleBirthBoolean`` is ``multipleBirth`` as a boolean."""
        cuts = [len(key), *(i for i in range(len(key) - 1, 0, -1) if key[i].isupper())]
        for cut in cuts:
            for child in self.children(ctx, key[:cut]) or ():
                if child.key == key:
                    return key[:cut], child
        return None

    def _children(self, ctx: str, name: str) -> tuple[Child, ...] | None:
        path = f"{ctx}.{name}"
        ref = self._content_ref.get(path)
        if ref is not None:
            return (Child(name, "BackboneElement", ref),)
        types = self._types.get(path)
        if types is not None:
            if len(types) != 1:
                return None
            t = types[0]
            if t in ("BackboneElement", "Element") and path in self._has_children:
                return (Child(name, t, path),)
            return (Child(name, t, t),)
        types = self._types.get(path + "[x]")
        if types is not None:
            return tuple(Child(name + t[:1].upper() + t[1:], t, t) for t in types)
        return None


# --------------------------------------------------------------------------- parser

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<str>'(?:[^'\\]|\\.)*')
    | (?P<num>\d+(?:\.\d+)?)
    | (?P<id>[A-Za-z_][A-Za-z0-9_]*|`[^`]+`|\$this)
    | (?P<op>!=|<=|>=|!~|[.()\[\]|=,<>~+\-&*/%$])
    )""",
    re.VERBOSE,
)


@dataclass(frozen=True, slots=True)
class Ident:
    name: str


@dataclass(frozen=True, slots=True)
class Member:
    base: Node
    name: str


@dataclass(frozen=True, slots=True)
class Call:
    base: Node | None
    name: str
    args: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Index:
    base: Node
    index: Node


@dataclass(frozen=True, slots=True)
class TypeOp:
    base: Node
    op: str  # "as" | "is"
    type: str


@dataclass(frozen=True, slots=True)
class Union:
    items: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Binary:
    op: str
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class Literal:
    value: Any


Node = Ident | Member | Call | Index | TypeOp | Union | Binary | Literal


def tokenize(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise CompileError(f"cannot tokenize {text[pos:pos + 20]!r}")
        pos = m.end()
        kind = m.lastgroup
        assert kind is not None
        tokens.append((kind, m.group(kind)))
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = tokenize(text)
        self.pos = 0

    def peek(self, offset: int = 0) -> tuple[str, str] | None:
        i = self.pos + offset
        return self.tokens[i] if i < len(self.tokens) else None

    def at(self, value: str, kind: str | None = None) -> bool:
        tok = self.peek()
        return tok is not None and tok[1] == value and (kind is None or tok[0] == kind)

    def expect(self, value: str) -> None:
        if not self.at(value):
            raise CompileError(f"expected {value!r} at token {self.pos}")
        self.pos += 1

    def parse(self) -> Node:
        node = self.expr_or()
        if self.pos != len(self.tokens):
            raise CompileError(f"unexpected token {self.tokens[self.pos][1]!r}")
        return node

    def expr_or(self) -> Node:
        node = self.expr_and()
        while self.at("or", "id"):
            self.pos += 1
            node = Binary("or", node, self.expr_and())
        return node

    def expr_and(self) -> Node:
        node = self.expr_eq()
        while self.at("and", "id"):
            self.pos += 1
            node = Binary("and", node, self.expr_eq())
        return node

    def expr_eq(self) -> Node:
        node = self.expr_union()
        tok = self.peek()
        if tok is not None and tok[0] == "op" and tok[1] in ("=", "!="):
            self.pos += 1
            node = Binary(tok[1], node, self.expr_union())
        return node

    def expr_union(self) -> Node:
        items = [self.expr_type()]
        while self.at("|", "op"):
            self.pos += 1
            items.append(self.expr_type())
        return items[0] if len(items) == 1 else Union(tuple(items))

    def expr_type(self) -> Node:
        node = self.expr_postfix()
        while self.at("as", "id") or self.at("is", "id"):
            op = self.tokens[self.pos][1]
            self.pos += 1
            node = TypeOp(node, op, self.type_spec())
        return node

    def type_spec(self) -> str:
        tok = self.peek()
        if tok is None or tok[0] != "id":
            raise CompileError("expected a type name")
        self.pos += 1
        name = tok[1].strip("`")
        while self.at(".", "op"):  # FHIR.Quantity / System.String
            self.pos += 1
            nxt = self.peek()
            if nxt is None or nxt[0] != "id":
                raise CompileError("expected a type name")
            self.pos += 1
            name = nxt[1].strip("`")
        return name

    def expr_postfix(self) -> Node:
        node = self.term()
        while True:
            if self.at(".", "op"):
                self.pos += 1
                tok = self.peek()
                if tok is None or tok[0] != "id":
                    raise CompileError("expected a name after '.'")
                self.pos += 1
                name = tok[1].strip("`")
                node = Call(node, name, self.args()) if self.at("(", "op") else Member(node, name)
            elif self.at("[", "op"):
                self.pos += 1
                index = self.expr_or()
                self.expect("]")
                node = Index(node, index)
            else:
                return node

    def args(self) -> tuple[Node, ...]:
        self.expect("(")
        args: list[Node] = []
        if not self.at(")", "op"):
            args.append(self.expr_or())
            while self.at(",", "op"):
                self.pos += 1
                args.append(self.expr_or())
        self.expect(")")
        return tuple(args)

    def term(self) -> Node:
        tok = self.peek()
        if tok is None:
            raise CompileError("unexpected end of expression")
        kind, text = tok
        self.pos += 1
        if kind == "str":
            return Literal(_unescape(text[1:-1]))
        if kind == "num":
            return Literal(_number(text))
        if kind == "id":
            if text in ("true", "false"):
                return Literal(text == "true")
            name = text.strip("`")
            if self.at("(", "op"):
                return Call(None, name, self.args())
            return Ident(name)
        if text == "(":
            node = self.expr_or()
            self.expect(")")
            return node
        raise CompileError(f"unsupported token {text!r}")


def _number(text: str) -> int | Decimal:
    """A number literal: an Integer (FHIRPath's are 32-bit) or a Decimal."""
    if "." in text:
        return Decimal(text)
    # (whatever its length: Python reads no more than 4,300 digits as an int)
    if len(text.lstrip("0")) > len(str(MAX_INTEGER)) or int(text) > MAX_INTEGER:
        raise LiteralOutOfRange(f"the integer {text[:20]}{'…' if len(text) > 20 else ''}"
                                f" is beyond FHIRPath's Integer (at most {MAX_INTEGER})")
    return int(text)


def _unescape(text: str) -> str:
    if "\\" not in text:
        return text
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t", "r": "\r"}.get(m[1], m[1]), text)


def parse(text: str) -> Node:
    return _Parser(text).parse()


def split_union(expression: str) -> list[str]:
    """Split ``a | b | (c | d)`` into its top-level parts (text level).

    Only splits when ``|`` is the loosest operator at the top level (no
    ``=``/``and``/``or``... outside parentheses), so each part keeps its meaning.
    """
    try:
        tokenize(expression)
    except CompileError:
        return [expression]
    depth = 0
    cuts: list[int] = []
    for m in _TOKEN.finditer(expression):
        kind = m.lastgroup
        if kind is None:
            continue
        text = m.group(kind)
        if kind == "op":
            if text in ("(", "["):
                depth += 1
            elif text in (")", "]"):
                depth -= 1
            elif depth == 0 and text == "|":
                cuts.append(m.start(kind))
            elif depth == 0 and text in ("=", "!=", "<", ">", "<=", ">=", "~", "!~"):
                return [expression]
        elif kind == "id" and depth == 0 and text in ("and", "or", "xor", "implies"):
            return [expression]
    parts: list[str] = []
    start = 0
    for cut in cuts:
        parts.append(expression[start:cut].strip())
        start = cut + 1
    parts.append(expression[start:].strip())
    return [p for p in parts if p]


def root_name(part: str) -> str | None:
    """The leading identifier of a path expression (``(Observation.value as X)`` -> Observation)."""
    m = re.match(r"[\s(]*([A-Za-z_][A-Za-z0-9_]*)", part)
    return m.group(1) if m else None


# --------------------------------------------------------------------------- compiler


@dataclass(frozen=True, slots=True)
class _B:
    """A compile-time branch: steps from the focus list, static type, element context."""

    steps: tuple[str | Step, ...]
    type: str | None
    ctx: str | None


@dataclass(frozen=True, slots=True)
class Branch:
    """A compiled expression part: ``run([resource])`` -> values of FHIR type ``type``."""

    run: Step
    type: str | None
    #: When set, ``run`` starts from the values of this top-level key instead of
    #: ``[resource]`` (lets the caller skip absent keys cheaply).
    key: str | None = None


def _keys_step(keys: Sequence[str]) -> Step:
    if len(keys) == 1:
        (key,) = keys

        def one(vals: Values) -> Values:
            out: Values = []
            for v in vals:
                if isinstance(v, dict):
                    x = v.get(key)
                    if x is not None:
                        if isinstance(x, list):
                            out.extend(x)
                        else:
                            out.append(x)
            return out

        return one

    keys = tuple(keys)

    def many(vals: Values) -> Values:
        for key in keys:
            out: Values = []
            for v in vals:
                if isinstance(v, dict):
                    x = v.get(key)
                    if x is not None:
                        if isinstance(x, list):
                            out.extend(x)
                        else:
                            out.append(x)
            if not out:
                return out
            vals = out
        return vals

    return many


def _fuse(steps: Sequence[str | Step]) -> list[Step]:
    fused: list[Step] = []
    keys: list[str] = []
    for s in steps:
        if isinstance(s, str):
            keys.append(s)
            continue
        if keys:
            fused.append(_keys_step(keys))
            keys = []
        fused.append(s)
    if keys:
        fused.append(_keys_step(keys))
    return fused


def chain(steps: Sequence[str | Step]) -> Step:
    """One function running ``steps`` in order over a list of values."""
    fused = _fuse(steps)
    if not fused:
        return lambda vals: vals
    if len(fused) == 1:
        return fused[0]
    if len(fused) == 2:
        a, b = fused

        def two(vals: Values) -> Values:
            vals = a(vals)
            return b(vals) if vals else vals

        return two
    fused_t = tuple(fused)

    def run(vals: Values) -> Values:
        for s in fused_t:
            vals = s(vals)
            if not vals:
                return vals
        return vals

    return run


def reference_target_type(value: Any, resource_types: frozenset[str]) -> str | None:
    """The resource type a Reference (or canonical/uri string) points to, if evident."""
    if isinstance(value, dict):
        if isinstance(value.get("resourceType"), str):
            return str(value["resourceType"])
        ref = value.get("reference")
        if isinstance(ref, str):
            if ref.startswith("#"):
                return None
            t = reference_target_type(ref, resource_types)
            if t is not None:
                return t
        declared = value.get("type")
        if isinstance(declared, str):
            declared = declared.rsplit("/", 1)[-1]
            return declared if declared in resource_types else None
        return None
    if isinstance(value, str):
        m = _REF_TAIL.search(value.split("|", 1)[0])
        if m and m.group(1) in resource_types:
            return m.group(1)
    return None


def _eq1(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a is b
    return bool(a == b)


def _equal(left: Values, right: Values) -> Values:
    if not left or not right:
        return []
    if len(left) != len(right):
        return [False]
    return [all(_eq1(a, b) for a, b in zip(left, right, strict=True))]


def _as_bool(vals: Values) -> bool | None:
    if len(vals) != 1:
        return None if not vals else True
    v = vals[0]
    return v if isinstance(v, bool) else True


#: FHIRPath system types written where the FHIR primitive is meant
#: (R4's ``value.as(DateTime)`` in Observation's code-value-date)
_SYSTEM_TYPES = {"DateTime": "dateTime", "Date": "date", "Time": "time", "String": "string",
                 "Boolean": "boolean", "Integer": "integer", "Decimal": "decimal"}


class Compiler:
    """Compiles expressions for one resource type against a :class:`Model`."""

    def __init__(self, model: Model, resource_type: str) -> None:
        self.model = model
        self.resource_type = resource_type

    # ---- public

    def compile(self, expression: str) -> list[Branch]:
        return [b for b, _ctx in self.compile_elements(expression)]

    def compile_elements(self, expression: str) -> list[tuple[Branch, str | None]]:
        """Like :meth:`compile`, with each branch's element context (``Observation``,
        ``Observation.component``…: what :meth:`compile_relative` takes)."""
        node = parse(expression)
        root = _B((), self.resource_type, self.resource_type)
        out: list[tuple[Branch, str | None]] = []
        for b in self._compile(node, [root], top=True):
            first = b.steps[0] if b.steps else None
            if isinstance(first, str):
                out.append((Branch(chain(b.steps[1:]), b.type, first), b.ctx))
            else:
                out.append((Branch(chain(b.steps), b.type), b.ctx))
        return out

    def compile_relative(self, expression: str, ctx: str) -> list[Branch]:
        """``expression`` evaluated on elements of context ``ctx`` (the components of a
        composite search parameter): ``run([element])``."""
        node = parse(expression)
        root = _B((), ctx, ctx)
        return [Branch(chain(b.steps), b.type) for b in self._compile(node, [root], top=False)]

    # ---- helpers

    def _merge(self, branches: list[_B]) -> _B:
        if len(branches) == 1:
            return branches[0]
        if not branches:
            return _B((lambda vals: [],), None, None)
        runs = tuple(chain(b.steps) for b in branches)

        def merged(vals: Values) -> Values:
            out: Values = []
            for r in runs:
                out.extend(r(vals))
            return out

        types = {b.type for b in branches}
        ctxs = {b.ctx for b in branches}
        return _B(
            (merged,),
            types.pop() if len(types) == 1 else None,
            ctxs.pop() if len(ctxs) == 1 else None,
        )

    def _member(self, branches: list[_B], name: str) -> list[_B]:
        out: list[_B] = []
        for b in branches:
            if b.ctx is None:
                raise CompileError(f"cannot navigate to {name!r} from an untyped value")
            children = self.model.children(b.ctx, name)
            if children is None:
                raise CompileError(f"unknown element {b.ctx}.{name}")
            out.extend(_B((*b.steps, c.key), c.type, c.ctx) for c in children)
        return out

    def _type_filter(self, branches: list[_B], type_name: str) -> list[_B]:
        out: list[_B] = []
        model = self.model
        type_name = _SYSTEM_TYPES.get(type_name, type_name)
        for b in branches:
            if b.type is not None and (
                b.type == type_name or model.is_subtype(b.type, type_name)
            ):
                out.append(b)
            elif type_name in model.resource_types and (
                b.type is None or b.type in ("Resource", "DomainResource")
            ):

                def only(vals: Values, t: str = type_name) -> Values:
                    return [v for v in vals if isinstance(v, dict) and v.get("resourceType") == t]

                out.append(_B((*b.steps, only), type_name, type_name))
            elif b.type is None:
                raise CompileError(f"cannot filter untyped values by {type_name}")
        return out

    def _boolean(self, step: Step) -> _B:
        return _B((step,), "boolean", None)

    def _compile(self, node: Node, inputs: list[_B], top: bool) -> list[_B]:
        if isinstance(node, Ident):
            name = node.name
            if name == "$this":
                return inputs
            if top and name[:1].isupper() and self.model.is_type_name(name):
                rt = self.resource_type
                if name == rt or name == "Resource" or (
                    name == "DomainResource" and rt in self.model.domain_resource_types
                ):
                    return inputs
                return []  # a branch of a shared expression for another type
            return self._member(inputs, name)
        if isinstance(node, Member):
            return self._member(self._compile(node.base, inputs, top), node.name)
        if isinstance(node, Union):
            out: list[_B] = []
            for item in node.items:
                out.extend(self._compile(item, inputs, top))
            return out
        if isinstance(node, TypeOp):
            base = self._compile(node.base, inputs, top)
            if node.op == "as":
                return self._type_filter(base, node.type)
            return self._is(base, node.type)
        if isinstance(node, Literal):
            value = node.value
            t = (
                "boolean"
                if isinstance(value, bool)
                else "string"
                if isinstance(value, str)
                else "integer"
                if isinstance(value, int)
                else "decimal"
            )

            def literal(vals: Values) -> Values:
                return [value]

            return [_B((literal,), t, None)]
        if isinstance(node, Index):
            if not isinstance(node.index, Literal) or not isinstance(node.index.value, int):
                raise CompileError("only literal integer indexes are supported")
            n = node.index.value
            indexed = self._merge(self._compile(node.base, inputs, top))

            def index(vals: Values) -> Values:
                return vals[n : n + 1]

            return [_B((*indexed.steps, index), indexed.type, indexed.ctx)]
        if isinstance(node, Binary):
            return [self._binary(node, inputs, top)]
        if isinstance(node, Call):
            base = inputs if node.base is None else self._compile(node.base, inputs, top)
            return self._call(node, base, top)
        raise CompileError(f"unsupported node {node!r}")

    def _is(self, base: list[_B], type_name: str) -> list[_B]:
        merged = self._merge(base)
        if merged.type == RESOLVED:
            run = chain(merged.steps)

            def is_target(vals: Values) -> Values:
                got = run(vals)
                return [all(t == type_name for t in got)] if got else []

            return [self._boolean(is_target)]
        if merged.type is not None and merged.type not in ("Resource", "DomainResource"):
            static = merged.type == type_name or self.model.is_subtype(merged.type, type_name)
            run = chain(merged.steps)
            return [self._boolean(lambda vals: [static] if run(vals) else [])]
        run = chain(merged.steps)

        def is_resource(vals: Values) -> Values:
            got = run(vals)
            if not got:
                return []
            return [all(isinstance(v, dict) and v.get("resourceType") == type_name for v in got)]

        return [self._boolean(is_resource)]

    def _binary(self, node: Binary, inputs: list[_B], top: bool) -> _B:
        left = chain(self._merge(self._compile(node.left, inputs, top)).steps)
        right = chain(self._merge(self._compile(node.right, inputs, top)).steps)
        op = node.op
        if op in ("=", "!="):
            negate = op == "!="

            def eq(vals: Values) -> Values:
                r = _equal(left(vals), right(vals))
                return [not r[0]] if r and negate else r

            return self._boolean(eq)
        if op in ("and", "or"):
            is_and = op == "and"

            def logic(vals: Values) -> Values:
                a = _as_bool(left(vals))
                b = _as_bool(right(vals))
                if is_and:
                    if a is False or b is False:
                        return [False]
                    return [True] if a and b else []
                if a is True or b is True:
                    return [True]
                return [False] if a is False and b is False else []

            return self._boolean(logic)
        raise CompileError(f"unsupported operator {op!r}")

    def _simple_equality(self, pred: Node, b: _B) -> Step | None:
        """``where(key = 'literal')`` on a plain (non-choice) element, as one filter."""
        if not (
            isinstance(pred, Binary)
            and pred.op == "="
            and isinstance(pred.left, Ident)
            and isinstance(pred.right, Literal)
            and isinstance(pred.right.value, str)
            and b.ctx is not None
        ):
            return None
        children = self.model.children(b.ctx, pred.left.name)
        if children is None or len(children) != 1:
            return None
        key, literal = children[0].key, pred.right.value

        def where_eq(vals: Values) -> Values:
            return [v for v in vals if isinstance(v, dict) and v.get(key) == literal]

        return where_eq

    def _call(self, node: Call, base: list[_B], top: bool) -> list[_B]:
        name, args = node.name, node.args
        if name in ("as", "ofType") and len(args) == 1:
            arg = args[0]
            if not isinstance(arg, Ident):
                raise CompileError(f"{name}() needs a type name")
            return self._type_filter(base, arg.name)
        if name == "is" and len(args) == 1 and isinstance(args[0], Ident):
            return self._is(base, args[0].name)
        if name == "where" and len(args) == 1:
            out: list[_B] = []
            for b in base:
                fast = self._simple_equality(args[0], b)
                if fast is not None:
                    out.append(_B((*b.steps, fast), b.type, b.ctx))
                    continue
                focus = [_B((), b.type, b.ctx)]
                pred = chain(self._merge(self._compile(args[0], focus, False)).steps)

                def where(vals: Values, p: Step = pred) -> Values:
                    return [v for v in vals if p([v]) == [True]]

                out.append(_B((*b.steps, where), b.type, b.ctx))
            return out
        if name == "extension" and len(args) == 1:
            arg = args[0]
            if not isinstance(arg, Literal) or not isinstance(arg.value, str):
                raise CompileError("extension() needs a literal url")
            url = arg.value

            def ext(vals: Values) -> Values:
                return [v for v in vals if isinstance(v, dict) and v.get("url") == url]

            out = []
            for b in self._member(base, "extension"):
                out.append(_B((*b.steps, ext), "Extension", "Extension"))
            return out
        if name == "hasExtension" and len(args) == 1:
            arg = args[0]
            if not isinstance(arg, Literal) or not isinstance(arg.value, str):
                raise CompileError("hasExtension() needs a literal url")
            url = arg.value
            run = chain(self._merge(base).steps)

            def has_ext(vals: Values) -> Values:
                for v in run(vals):
                    if isinstance(v, dict):
                        exts = v.get("extension")
                        if isinstance(exts, list) and any(
                            isinstance(e, dict) and e.get("url") == url for e in exts
                        ):
                            return [True]
                return [False]

            return [self._boolean(has_ext)]
        if name == "resolve" and not args:
            types = self.model.resource_types
            out = []
            for b in base:

                def resolve(vals: Values) -> Values:
                    got = (reference_target_type(v, types) for v in vals)
                    return [t for t in got if t is not None]

                out.append(_B((*b.steps, resolve), RESOLVED, None))
            return out
        if name in ("exists", "empty") and len(args) <= 1:
            src = base
            if args:
                src = self._call(Call(None, "where", args), base, top)
            run = chain(self._merge(src).steps)
            want = name == "exists"
            return [self._boolean(lambda vals: [bool(run(vals)) is want])]
        if name == "not" and not args:
            run = chain(self._merge(base).steps)

            def negate(vals: Values) -> Values:
                b = _as_bool(run(vals))
                return [] if b is None else [not b]

            return [self._boolean(negate)]
        if name == "first" and not args:
            m = self._merge(base)
            return [_B((*m.steps, lambda vals: vals[:1]), m.type, m.ctx)]
        raise CompileError(f"unsupported function {name}()")
