"""Fixtures for the tests of ``profiles/``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.profiles.helpers import PROFILES, load_json


@pytest.fixture(scope="session")
def trimmed_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's trimmed R4 definitions laid out like the npm package.

    Enough for snapshot generation (ids, paths, cardinality, types, slicing,
    bindings, constraints), so the generator can be tested without the package.
    """
    out = tmp_path_factory.mktemp("r4-package")
    bundle = load_json(PROFILES / "r4" / "Bundle-r4-structure-definitions.json")
    for entry in bundle["entry"]:
        sd = entry["resource"]
        (out / f"StructureDefinition-{sd['id']}.json").write_text(json.dumps(sd),
                                                                   encoding="utf-8")
    return out
