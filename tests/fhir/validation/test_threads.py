"""The validator's compiled tables are shared by the event loop and the threads that
validate large resources and compile stored profiles (gateway.interactions.offload):
a table is built under the model's lock, so that no one sees one half built."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.fhir.validation import Definitions
from gateway.fhir.validation.model import Model, value_sets_index


def test_a_profile_constraint_builds_its_resource_table_under_the_lock(
        definitions: Definitions, monkeypatch: pytest.MonkeyPatch) -> None:
    """A profile's constraint is compiled against its resource type's table: the
    first use of that type by a profile builds the table, registering its nodes
    before they are complete (types refer to themselves); built without the lock, a
    validation on the loop finds them half built, and keeps them."""
    model = Model(definitions.structure_definitions, value_sets_index({}))
    built = model.node
    locked: list[bool] = []

    def node(sd: dict[str, Any], path: str) -> Any:
        locked.append(model._lock._is_owned())  # type: ignore[attr-defined]
        return built(sd, path)

    monkeypatch.setattr(model, "node", node)
    compiled = model.compile("name.exists() or identifier.exists()", "Patient", "Patient",
                             "Patient")
    assert compiled is not None
    assert locked and all(locked)
    assert model.type_node("Patient") is not None
