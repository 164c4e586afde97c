"""SubscriptionTopics as data (``mappings/topics``), compiled once at start.

R5 SubscriptionTopic, as the R4 Subscriptions Backport IG uses it:
https://hl7.org/fhir/uv/subscriptions-backport/components.html. A topic has
resource triggers (resource type, interactions, a FHIRPath criterion over
``%previous`` and ``%current``) and the filters a Subscription may narrow it
with (``canFilterBy``; how each is evaluated is in two gateway extensions,
see ``mappings/topics/README.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from fhirpathpy import compile as fhirpath

import gateway
from gateway.security import guard

BASE = "https://carepath-gateway.org/fhir"
FILTER_EXPRESSION = f"{BASE}/StructureDefinition/topic-filter-expression"
FILTER_TYPE = f"{BASE}/StructureDefinition/topic-filter-type"
FILTER_KINDS = ("reference", "token", "string")
INTERACTIONS = ("create", "update", "delete")

Compiled = Callable[[Any, dict[str, Any]], list[Any]]


def topics_dir() -> Path:
    """``mappings/topics`` inside an installed wheel, else the source tree's."""
    here = Path(gateway.__file__).resolve().parent
    packaged = here / "_data" / "mappings" / "topics"
    return packaged if packaged.is_dir() else here.parent / "mappings" / "topics"


def _type_of(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True, slots=True)
class Trigger:
    resource_type: str
    interactions: frozenset[str]
    expression: str
    _criterion: Compiled

    def fires(self, interaction: str, previous: Any, current: Any) -> bool:
        if interaction not in self.interactions:
            return False
        result = self._criterion({}, {"previous": previous, "current": current})
        return result == [True]


#: the code system a ``code`` element's binding implies, by the element's path
Implied = Callable[[str], "str | None"]


@dataclass(frozen=True, slots=True)
class FilterDef:
    name: str
    resource_type: str
    kind: str  # reference | token | string
    expression: str
    _values: Compiled
    #: a token filter on a ``code`` element: the system its binding implies
    #: (``Task.status``: task-status), so that ``system|code`` matches as in a search
    system: str | None = None

    def values(self, resource: dict[str, Any]) -> list[Any]:
        return self._values(resource, {})


@dataclass(frozen=True, slots=True)
class Topic:
    url: str
    id: str
    version: str
    title: str
    triggers: tuple[Trigger, ...]
    filters: dict[tuple[str, str], FilterDef]  # (resource type, parameter) -> filter
    resource: dict[str, Any]

    @property
    def resource_types(self) -> frozenset[str]:
        return frozenset(t.resource_type for t in self.triggers)

    def filter(self, resource_type: str, name: str) -> FilterDef | None:
        return self.filters.get((resource_type, name))

    def fires(self, resource_type: str, interaction: str, previous: Any, current: Any) -> bool:
        return any(
            t.resource_type == resource_type and t.fires(interaction, previous, current)
            for t in self.triggers
        )


def require_scopes(topic: Topic) -> None:
    """The caller's scopes allow searching every type ``topic`` delivers (403 otherwise):
    a notification carries what a search would, to whoever subscribes, replays
    (``$events``), resends or binds a websocket."""
    for resource_type in sorted(topic.resource_types):
        guard.require(resource_type, "search")


def _extension(element: dict[str, Any], url: str, key: str) -> Any:
    for ext in element.get("extension", []) or []:
        if ext.get("url") == url:
            return ext.get(key)
    return None


def compile_topic(resource: dict[str, Any], implied: Implied | None = None) -> Topic:
    """Compile one SubscriptionTopic; ``ValueError`` when it is not usable. ``implied``:
    the code system a ``code`` element's binding implies (by its path)."""
    url = resource.get("url")
    if not isinstance(url, str) or not url:
        raise ValueError("SubscriptionTopic.url is required")
    triggers = []
    for trig in resource.get("resourceTrigger", []):
        expression = trig.get("fhirPathCriteria")
        if not isinstance(expression, str):
            raise ValueError(f"{url}: each resourceTrigger needs fhirPathCriteria")
        interactions = frozenset(trig.get("supportedInteraction") or INTERACTIONS)
        if not interactions <= set(INTERACTIONS):
            raise ValueError(f"{url}: unknown supportedInteraction {sorted(interactions)}")
        triggers.append(Trigger(_type_of(trig["resource"]), interactions, expression,
                                fhirpath(expression)))
    if not triggers:
        raise ValueError(f"{url}: a topic needs at least one resourceTrigger")
    filters: dict[tuple[str, str], FilterDef] = {}
    for can in resource.get("canFilterBy", []):
        expression = _extension(can, FILTER_EXPRESSION, "valueString")
        kind = _extension(can, FILTER_TYPE, "valueCode")
        name = can.get("filterParameter")
        if not isinstance(expression, str) or kind not in FILTER_KINDS or not name:
            raise ValueError(f"{url}: filter {name!r} needs an expression and a type")
        rt = _type_of(can["resource"])
        system = implied(expression) if implied is not None and kind == "token" else None
        filters[(rt, name)] = FilterDef(name, rt, kind, expression, fhirpath(expression),
                                        system)
    return Topic(url, resource.get("id", _type_of(url)), resource.get("version", ""),
                 resource.get("title", ""), tuple(triggers), filters, resource)


class TopicRegistry:
    """The topics this gateway offers, by canonical URL."""

    def __init__(self, topics: list[Topic]) -> None:
        self.topics = {t.url: t for t in topics}
        self._by_type: dict[str, list[Topic]] = {}
        for topic in topics:
            for rt in topic.resource_types:
                self._by_type.setdefault(rt, []).append(topic)

    @classmethod
    def load(cls, directory: Path | None = None,
             implied: Implied | None = None) -> TopicRegistry:
        folder = directory or topics_dir()
        return cls([compile_topic(orjson.loads(p.read_bytes()), implied)
                    for p in sorted(folder.glob("SubscriptionTopic-*.json"))])

    def get(self, canonical: str) -> Topic | None:
        """The topic of ``url`` or ``url|version`` (the version must match when given)."""
        url, _, version = canonical.partition("|")
        topic = self.topics.get(url)
        if topic is None or (version and version != topic.version):
            return None
        return topic

    def for_type(self, resource_type: str) -> list[Topic]:
        return self._by_type.get(resource_type, [])

    @property
    def canonicals(self) -> list[str]:
        return sorted(self.topics)
