"""FHIRPath Patch: https://hl7.org/fhir/R4/fhirpatch.html.

A ``Parameters`` resource with one ``operation`` per change, applied in order:

* ``add`` (``path``, ``name``, ``value``): a new element ``name`` in the element
  at ``path``; appended when it repeats, an error when it does not and is there;
* ``insert`` (``path``, ``index``, ``value``): into the list ``path`` names;
* ``delete`` (``path``): the one element ``path`` finds (none found: nothing);
* ``replace`` (``path``, ``value``): the one element ``path`` finds;
* ``move`` (``path``, ``source``, ``destination``): within the list ``path`` names.

A value is ``value[x]`` or, for an element of a complex or backbone type,
``part``s named after its children. Paths are the navigational part of
FHIRPath, which is what patches use: ``Type.a.b``, ``[n]``, ``first()``,
``last()`` and ``where(…)`` over ``=``/``!=`` comparisons of children with
literals joined by ``and``/``or``. Anything else is rejected with a clear
error. Element names, cardinality and choice types come from the R4 model
(:class:`gateway.fhir.validation.model.Model`); the patched resource is
validated by the caller as any other write.

The walk is bounded: the paths of all operations of a patch together examine at
most :data:`MAX_VISITS` elements (413 beyond), whatever the resource and the paths.

Pure: neither the caller's resource nor the operations are modified (a value an
operation adds is a copy, which later operations may change; a write that runs
again applies the same operations). Each operation adds no more than its value
carries (``move`` moves, nothing copies), so the patched resource exceeds the
stored one by at most the patch's own length.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from gateway.fhir.budget import Visits
from gateway.fhir.outcome import Code, FhirError
from gateway.fhir.paths import Binary, Call, CompileError, Ident, Index, Literal, Member, parse
from gateway.fhir.paths import Node as PathNode
from gateway.fhir.validation.model import Model, Node

OPERATIONS = ("add", "insert", "delete", "replace", "move")
#: elements the paths of one patch may examine together (an element a step reaches,
#: a ``where()`` comparison and each value it looks at): about a second of work
MAX_VISITS = 1_000_000


def _bad(message: str) -> FhirError:
    return FhirError(Code.INVALID_PATCH, f"FHIRPath Patch: {message}")


@dataclass(slots=True)
class _Loc:
    """Where a value sits: ``container[key]`` or ``container[key][index]``."""

    container: dict[str, Any] | None  # None: the resource itself
    key: str
    index: int | None
    value: Any
    node: Node | None  # the value's model node (complex values)
    parent: Node | None = None  # the container's model node


@dataclass(slots=True)
class _Slot:
    """A child ``name`` of one element: what ``add``, ``insert`` and ``move`` work on."""

    element: dict[str, Any]
    node: Node
    name: str


def is_fhirpath_patch(body: Any) -> bool:
    return isinstance(body, dict) and body.get("resourceType") == "Parameters"


def check(parameters: dict[str, Any]) -> list[dict[str, Any]]:
    """The operations of a FHIRPath Patch ``Parameters``, each as {part name: part}."""
    ops = []
    for p in _array(parameters.get("parameter"), "Parameters.parameter"):
        if not isinstance(p, dict) or p.get("name") != "operation":
            raise _bad("every parameter must be an 'operation'")
        parts: dict[str, Any] = {}
        for part in _array(p.get("part"), "an operation's part"):
            if not isinstance(part, dict) or not isinstance(part.get("name"), str):
                raise _bad("an operation's parts need names")
            parts[part["name"]] = part
        kind = _string(parts, "type")
        if kind not in OPERATIONS:
            raise _bad(f"unknown operation type {kind!r} (one of {', '.join(OPERATIONS)})")
        _string(parts, "path")
        ops.append(parts)
    if not ops:
        raise _bad("no operations")
    return ops


def _array(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad(f"{what} must be an array")
    return value


def apply(resource: dict[str, Any], ops: list[dict[str, Any]], model: Model) -> dict[str, Any]:
    """``resource`` with ``ops`` (from :func:`check`) applied, as a new object."""
    root = model.resource_node(str(resource.get("resourceType")))
    if root is None:
        raise _bad(f"unknown resource type {resource.get('resourceType')!r}")
    doc = copy.deepcopy(resource)
    visits = Visits(MAX_VISITS, f"FHIRPath Patch: the paths would examine more than"
                                f" {MAX_VISITS} elements of the resource; send fewer"
                                " operations or more precise paths")
    for n, parts in enumerate(ops, start=1):
        try:
            _apply_one(doc, root, parts, visits)
        except FhirError as exc:
            raise FhirError(exc.code, f"operation {n}: {exc.diagnostics}") from None
        except RecursionError:  # a path that reads but nests deeper than it can be followed
            raise _bad(f"operation {n}: the path nests too deeply") from None
    return doc


# -- operations ----------------------------------------------------------------


def _apply_one(doc: dict[str, Any], root: Node, parts: dict[str, Any],
               visits: Visits) -> None:
    kind = _string(parts, "type")
    path = _path(_string(parts, "path"))
    if kind == "add":
        name = _string(parts, "name")
        slot = _slot_in(doc, root, path, name, visits)
        key, value = _value(parts, slot.node, name)
        child = slot.node.children.get(key)
        assert child is not None
        if child.array:
            slot.element.setdefault(key, []).append(value)
        elif key in slot.element or _group_taken(slot, key):
            raise _bad(f"{name!r} is already there and does not repeat (use replace)")
        else:
            slot.element[key] = value
    elif kind == "insert":
        slot, items = _list_slot(doc, root, path, visits)
        index = _integer(parts, "index")
        if not 0 <= index <= len(items):
            raise _bad(f"index {index} is outside 0..{len(items)}")
        _key, value = _value(parts, slot.node, slot.name)
        items.insert(index, value)
        slot.element[slot.name] = items
    elif kind == "move":
        slot, items = _list_slot(doc, root, path, visits)
        source, destination = _integer(parts, "source"), _integer(parts, "destination")
        if not (0 <= source < len(items) and 0 <= destination < len(items)):
            raise _bad(f"source and destination must be within 0..{len(items) - 1}")
        items.insert(destination, items.pop(source))
    elif kind == "delete":
        found = _eval(doc, root, path, visits)
        if len(found) > 1:
            raise _bad(f"the path finds {len(found)} elements; delete takes one")
        if found:
            _remove(doc, found[0])
    else:  # replace
        found = _eval(doc, root, path, visits)
        if len(found) != 1:
            raise _bad(f"the path finds {len(found)} elements; replace takes one")
        loc = found[0]
        if loc.container is None or loc.parent is None:
            raise _bad("the resource itself cannot be replaced")
        child = loc.parent.children[loc.key]
        key, value = _value(parts, loc.parent, child.group or loc.key)
        if loc.index is not None:
            if key != loc.key:
                raise _bad("a repeating element keeps its type")
            loc.container[loc.key][loc.index] = value
        else:
            del loc.container[loc.key]
            loc.container.pop("_" + loc.key, None)
            loc.container[key] = value


def _group_taken(slot: _Slot, key: str) -> bool:
    """Another type of the same choice element already there."""
    child = slot.node.children[key]
    if child.group is None:
        return False
    return any(k in slot.element for k, c in slot.node.children.items()
               if c.group == child.group)


def _remove(doc: dict[str, Any], loc: _Loc) -> None:
    if loc.container is None:
        raise _bad("the resource itself cannot be deleted")
    if loc.index is None:
        del loc.container[loc.key]
        loc.container.pop("_" + loc.key, None)
        return
    items = loc.container[loc.key]
    del items[loc.index]
    ext = loc.container.get("_" + loc.key)
    if isinstance(ext, list) and loc.index < len(ext):
        del ext[loc.index]
    if not items:
        del loc.container[loc.key]
        loc.container.pop("_" + loc.key, None)


def _slot_in(doc: dict[str, Any], root: Node, path: PathNode, name: str,
             visits: Visits) -> _Slot:
    found = _eval(doc, root, path, visits)
    if len(found) != 1 or not isinstance(found[0].value, dict) or found[0].node is None:
        raise _bad(f"the path must find one element to add {name!r} to, not {len(found)}")
    node = found[0].node
    if node.member(name) is None:
        raise _bad(f"{node.path} has no element {name!r}")
    return _Slot(found[0].value, node, name)


def _list_slot(doc: dict[str, Any], root: Node, path: PathNode,
               visits: Visits) -> tuple[_Slot, list[Any]]:
    """The element holding the list ``path`` names (``….name``), and the list."""
    if not isinstance(path, Member):
        raise _bad("insert and move take the path of a repeating element (….name)")
    slot = _slot_in(doc, root, path.base, path.name, visits)
    info = slot.node.member(path.name)
    assert info is not None
    if len(info.children) != 1 or not info.children[0].array:
        raise _bad(f"{path.name!r} does not repeat")
    items = slot.element.get(path.name, [])
    if not isinstance(items, list):
        raise _bad(f"{path.name!r} is not a list")
    return slot, items


# -- values --------------------------------------------------------------------


def _value(parts: dict[str, Any], node: Node, name: str) -> tuple[str, Any]:
    """(JSON key, value) for element ``name`` of ``node`` from the ``value`` part."""
    part = parts.get("value")
    if part is None:
        raise _bad("the operation needs a value")
    info = node.member(name)
    if info is None:
        raise _bad(f"{node.path} has no element {name!r}")
    given = [(k, v) for k, v in part.items() if k.startswith("value")]
    if given:
        (vkey, v), = given[:1]
        suffix = vkey[len("value"):]
        for child in info.children:
            if child.group is None or child.key == name + suffix:
                return child.key, copy.deepcopy(v)
        raise _bad(f"{name!r} cannot take a {suffix}")
    if "part" in part:
        if len(info.children) != 1 or info.children[0].node is None:
            raise _bad(f"{name!r} is not a complex element; give value[x]")
        return info.children[0].key, _from_parts(part["part"], info.children[0].node)
    raise _bad("the value part has neither value[x] nor parts")


def _from_parts(parts: Any, node: Node) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not isinstance(parts, list):
        raise _bad("parts must be a list")
    for part in parts:
        if not isinstance(part, dict) or not isinstance(part.get("name"), str):
            raise _bad("a value's parts need names")
        key, value = _value({"value": part}, node, part["name"])
        child = node.children[key]
        if child.array:
            out.setdefault(key, []).append(value)
        elif key in out:
            raise _bad(f"{key!r} given twice")
        else:
            out[key] = value
    return out


def _string(parts: dict[str, Any], name: str) -> str:
    part = parts.get(name)
    value = next((v for k, v in part.items() if k.startswith("value")), None) if part else None
    if not isinstance(value, str) or not value:
        raise _bad(f"the operation needs a {name!r}")
    return value


def _integer(parts: dict[str, Any], name: str) -> int:
    part = parts.get(name)
    value = part.get("valueInteger") if part else None
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(f"the operation needs an integer {name!r}")
    return value


# -- paths ---------------------------------------------------------------------


def _path(text: str) -> PathNode:
    try:
        return parse(text)
    except (CompileError, RecursionError) as exc:
        raise _bad(f"cannot read the path {text[:200]!r}: {exc}") from None


def _eval(doc: dict[str, Any], root: Node, node: PathNode, visits: Visits) -> list[_Loc]:
    if isinstance(node, Ident):
        if node.name in (doc.get("resourceType"), "Resource", "DomainResource"):
            return [_Loc(None, "", None, doc, root)]
        return _children([_Loc(None, "", None, doc, root)], node.name, visits)
    if isinstance(node, Member):
        return _children(_eval(doc, root, node.base, visits), node.name, visits)
    if isinstance(node, Index):
        if not isinstance(node.index, Literal) or not isinstance(node.index.value, int):
            raise _bad("an index must be a literal integer")
        found = _eval(doc, root, node.base, visits)
        i = node.index.value
        return found[i:i + 1] if i >= 0 else []
    if isinstance(node, Call) and node.base is not None:
        found = _eval(doc, root, node.base, visits)
        if node.name == "first" and not node.args:
            return found[:1]
        if node.name == "last" and not node.args:
            return found[-1:]
        if node.name == "where" and len(node.args) == 1:
            return [loc for loc in found if _holds(loc, node.args[0], visits)]
    raise _bad(f"the path uses {type(node).__name__.lower()} "
               f"{getattr(node, 'name', '')!r}, which FHIRPath Patch paths here do not")


def _children(locs: list[_Loc], name: str, visits: Visits) -> list[_Loc]:
    visits.spend(len(locs))
    out: list[_Loc] = []
    for loc in locs:
        if not isinstance(loc.value, dict) or loc.node is None:
            continue
        info = loc.node.member(name)
        if info is None:
            raise _bad(f"{loc.node.path} has no element {name!r}")
        for child in info.children:
            if child.key not in loc.value:
                continue
            value = loc.value[child.key]
            if isinstance(value, list):
                visits.spend(len(value))
                out.extend(_Loc(loc.value, child.key, i, v, child.node, loc.node)
                           for i, v in enumerate(value))
            else:
                out.append(_Loc(loc.value, child.key, None, value, child.node, loc.node))
    return out


def _holds(loc: _Loc, pred: PathNode, visits: Visits) -> bool:
    if isinstance(pred, Binary) and pred.op in ("and", "or"):
        left, right = _holds(loc, pred.left, visits), _holds(loc, pred.right, visits)
        return (left and right) if pred.op == "and" else (left or right)
    if isinstance(pred, Binary) and pred.op in ("=", "!="):
        if not isinstance(pred.right, Literal):
            raise _bad("where() compares an element with a literal")
        values = [x.value for x in _relative(loc, pred.left, visits)]
        visits.spend(1 + len(values))
        equal = pred.right.value in values
        return equal if pred.op == "=" else (bool(values) and not equal)
    raise _bad("where() takes comparisons (=, !=) joined by and/or")


def _relative(loc: _Loc, node: PathNode, visits: Visits) -> list[_Loc]:
    if isinstance(node, Ident):
        return _children([loc], node.name, visits)
    if isinstance(node, Member):
        return _children(_relative(loc, node.base, visits), node.name, visits)
    raise _bad("where() compares a child element (a.b), nothing else")
