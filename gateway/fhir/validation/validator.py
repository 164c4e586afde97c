"""The validator: base R4 validation plus the profiles a resource claims.

:class:`FhirValidator` implements ``gateway.interactions.base.Validator``.
``validate(resource, profile=None)`` returns issues (errors, warnings,
information); the resource is never changed.

* Base validation (``walker``) always runs.
* Extensions whose URL is one of R4's own definitions are checked against it,
  wherever they occur (``extensions``).
* Profiles: ``profile=`` if given, else the resource's ``meta.profile`` (and
  those of resources nested in it). A known profile is checked as an overlay of
  what it adds to the base (``profiles``); an unknown one gives a warning. A
  profile whose canonical URL is in ``warn_only`` reports its errors as
  warnings (configured by ``CAREPATH_VALIDATION_WARN_ONLY``).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from gateway.fhir.outcome import Code, Findings, Issue
from gateway.fhir.validation.extensions import CoreExtensions
from gateway.fhir.validation.loader import Definitions, load_definitions
from gateway.fhir.validation.model import Model, value_sets_index
from gateway.fhir.validation.profiles import ProfileSet
from gateway.fhir.validation.snapshot import ProfileError, complete_structure_definition
from gateway.fhir.validation.walker import Loc, Walker, render


class ValidationSettings(Protocol):
    """The settings the validator reads (``gateway.settings.Settings`` has them)."""

    @property
    def max_json_depth(self) -> int: ...
    @property
    def validation_max_resource_depth(self) -> int: ...
    @property
    def validation_warn_only(self) -> str: ...


_SHARED: dict[tuple[str, int], tuple[Definitions, Model, ProfileSet, CoreExtensions]] = {}
_SHARED_LOCK = threading.Lock()


def _urls(value: str | Iterable[str]) -> frozenset[str]:
    items = re.split(r"[\s,]+", value) if isinstance(value, str) else list(value)
    return frozenset(u.split("|", 1)[0] for u in items if u)


class FhirValidator:
    def __init__(self, definitions: Definitions, *, max_depth: int = 64,
                 max_nesting: int = 6, warn_only: str | Iterable[str] = (),
                 _compiled: tuple[Model, ProfileSet] | None = None,
                 _extensions: CoreExtensions | None = None) -> None:
        self.definitions = definitions
        if _compiled is None:
            model = Model(definitions.structure_definitions,
                          value_sets_index(definitions.value_sets))
            _compiled = model, ProfileSet(model, definitions.profiles,
                                          value_sets_index(definitions.value_sets))
        self.model, self.profiles = _compiled
        self.extensions = _extensions or CoreExtensions(
            self.model, definitions.extensions, value_sets_index(definitions.value_sets))
        self.max_depth = max_depth
        self.max_nesting = max_nesting
        self.warn_only = _urls(warn_only)
        #: invariant evaluations of the last call (tests check linearity with it)
        self.last_evaluations = 0

    @classmethod
    def load(cls, root: Path, structure_definitions: list[dict[str, Any]],
             settings: ValidationSettings) -> FhirValidator:
        """The validator for ``root`` (``profiles/``); the compiled tables are shared
        by every validator of the process over the same definitions."""
        key = (str(root.resolve()), id(structure_definitions))
        with _SHARED_LOCK:
            shared = _SHARED.get(key)
            if shared is None:
                defs = load_definitions(root, structure_definitions)
                model = Model(defs.structure_definitions, value_sets_index(defs.value_sets))
                index = value_sets_index(defs.value_sets)
                shared = _SHARED[key] = (defs, model, ProfileSet(model, defs.profiles, index),
                                         CoreExtensions(model, defs.extensions, index))
        defs, model, profiles, extensions = shared
        return cls(defs, max_depth=settings.max_json_depth,
                   max_nesting=settings.validation_max_resource_depth,
                   warn_only=settings.validation_warn_only, _compiled=(model, profiles),
                   _extensions=extensions)

    def knows_profile(self, url: str) -> bool:
        return self.profiles.get(url) is not None

    def with_stored(self, structure_definitions: Iterable[dict[str, Any]],
                    value_sets: Mapping[str, frozenset[tuple[str, str]]]) -> ProfileSet:
        """The gateway's profiles and ``structure_definitions`` (constraint
        StructureDefinitions stored on the server; one without a snapshot gets one
        made from its differential, ``snapshot``), compiled on first use; their
        required bindings checked against ``value_sets`` (expansions by canonical URL)
        and the gateway's own. A URL the gateway defines keeps the gateway's
        definition."""
        bases = _Bases(self, {sd["url"]: sd for sd in structure_definitions})
        raw: dict[str, dict[str, Any]] = {}
        unusable: dict[str, str] = {}
        for url in bases.stored:
            try:
                raw[url] = bases.get(url)
            except ProfileError as exc:  # no snapshot, and none can be made: not used
                unusable[url] = str(exc)
        raw.update(self.profiles.raw)
        own = self.definitions.value_sets
        return ProfileSet(self.model, raw, value_sets_index({**value_sets, **own}),
                          {u: why for u, why in unusable.items() if u not in raw})

    def snapshot(self, structure_definition: dict[str, Any],
                 stored: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
        """``structure_definition`` with a snapshot made from its differential, over
        ``stored`` (profiles by URL it may build on), the gateway's own and R4's
        definitions; :class:`ProfileError` when none can be made."""
        given = {k: v for k, v in structure_definition.items() if k != "snapshot"}
        url = given.get("url")
        if not isinstance(url, str):
            raise ProfileError("the StructureDefinition has no url")
        return _Bases(self, {**stored, url: given}).get(url)

    def validate(self, resource: dict[str, Any], *, profile: str | None = None,
                 profiles: ProfileSet | None = None) -> list[Issue]:
        """Issues of ``resource``; ``profiles`` (:meth:`with_stored`) instead of the
        gateway's own."""
        walker = Walker(self.model, max_depth=self.max_depth, max_nesting=self.max_nesting,
                        extensions=self.extensions.urls)
        walker.resource(resource)
        found = walker.found
        evaluations = walker.evaluations
        if isinstance(resource, dict):
            if walker.extensions:
                more, evals = self.extensions.check(resource, walker.extensions)
                found.absorb(more)
                evaluations += evals
            claims: list[tuple[dict[str, Any], Loc, list[str]]] = []
            rt = resource.get("resourceType")
            root_loc: Loc = (None, rt if isinstance(rt, str) else "Resource", None)
            if profile is not None:
                claims.append((resource, root_loc, [profile]))
            else:
                claims.append((resource, root_loc, _claimed(resource)))
            for nested, loc in walker.nested:
                claims.append((nested, loc, _claimed(nested)))
            for target, loc, urls in claims:
                for url in urls:
                    more, evals = self._profile(target, loc, url, profiles or self.profiles)
                    found.absorb(more)
                    evaluations += evals
        self.last_evaluations = evaluations
        return found.listed()

    def _profile(self, resource: dict[str, Any], loc: Loc, url: str,
                 profiles: ProfileSet) -> tuple[Findings, int]:
        canonical = url.split("|", 1)[0]
        compiled = profiles.get(canonical)
        if compiled is None:
            why = profiles.unusable.get(canonical)
            said = "is not known here" if why is None else \
                f"is stored here but cannot be used: {why[:300]}"
            if why is None and canonical in profiles.raw:
                said = "is stored here but cannot be used: its definition does not compile"
            return _one(Issue(Code.UNKNOWN_PROFILE,
                              f"profile {url[:200]} {said}; validated against the base "
                              "definition only", (render((loc, "meta", None)),),
                              "warning")), 0
        if compiled.type != resource.get("resourceType"):
            return _one(Issue(Code.UNKNOWN_PROFILE,
                              f"profile {url[:200]} constrains {compiled.type}, not "
                              f"{resource.get('resourceType')}", (render(loc),))), 0
        found, evaluations = compiled.check(resource, loc)
        if canonical in self.warn_only:
            warned = Findings()
            for i in found.issues:
                warned.add(replace(i, severity="warning") if i.severity in ("error", "fatal")
                           else i)
            warned.others += found.errors + found.others - len(found.issues)
            found = warned
        return found, evaluations


def _one(issue: Issue) -> Findings:
    found = Findings()
    found.add(issue)
    return found


def _claimed(resource: dict[str, Any]) -> list[str]:
    meta = resource.get("meta")
    if not isinstance(meta, dict):
        return []
    urls = meta.get("profile")
    if not isinstance(urls, list):
        return []
    return [u for u in urls if isinstance(u, str)]


_R4 = "http://hl7.org/fhir/StructureDefinition/"


class _Bases:
    """The definitions a stored profile's snapshot is made from: other stored
    profiles (their snapshots made first, where they have none), the gateway's own
    and R4's core profiles, and R4's types."""

    def __init__(self, validator: FhirValidator, stored: dict[str, dict[str, Any]]) -> None:
        self.stored = stored
        self.own = validator.profiles.raw
        self.types = validator.model.by_type
        self._done: dict[str, dict[str, Any]] = {}
        self._busy: set[str] = set()

    def get(self, url: str) -> dict[str, Any]:
        url = url.split("|", 1)[0]
        done = self._done.get(url)
        if done is not None:
            return done
        sd = self.stored.get(url) or self.own.get(url)
        if sd is None:
            if url.startswith(_R4) and url[len(_R4):] in self.types:
                return self.types[url[len(_R4):]]
            raise ProfileError(f"unknown StructureDefinition {url}")
        if not (sd.get("snapshot") or {}).get("element"):
            if url in self._busy:
                raise ProfileError(f"{url} depends on itself")
            self._busy.add(url)
            try:
                sd = complete_structure_definition(sd, self)
            except ProfileError:
                raise
            except Exception as exc:  # a differential that makes no sense
                raise ProfileError(f"{url}: no snapshot can be made ({exc})") from exc
            finally:
                self._busy.discard(url)
        self._done[url] = sd
        return sd

    def type_definition(self, code: str) -> dict[str, Any]:
        return self.get(code if "/" in code else _R4 + code)
