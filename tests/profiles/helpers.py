"""Helpers for the tests of ``profiles/`` and ``tests/profiles/examples``."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ROOT / "profiles"
EXAMPLES = Path(__file__).resolve().parent / "examples"
BASE = "https://carepath-gateway.org/fhir"


def load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def conformance() -> dict[str, dict[str, Any]]:
    """``profiles/*.json`` by file name."""
    return {p.name: load_json(p) for p in sorted(PROFILES.glob("*.json"))}


def of_type(resource_type: str) -> list[dict[str, Any]]:
    return [r for r in conformance().values() if r["resourceType"] == resource_type]


def by_url() -> dict[str, dict[str, Any]]:
    return {r["url"]: r for r in conformance().values()}


def manifest() -> dict[str, list[dict[str, Any]]]:
    return load_json(EXAMPLES / "manifest.json")  # type: ignore[no-any-return]


def build_script() -> ModuleType:
    """``scripts/build_profiles.py`` as a module (scripts/ is not a package)."""
    name = "carepath_build_profiles"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "build_profiles.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
