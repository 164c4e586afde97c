"""``$validate`` over HTTP names, for each invalid pathway example, the failing element
(by expression) and the profile rule; the valid ones come back clean."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.api.helpers import FHIR
from tests.profiles.helpers import EXAMPLES, load_json, manifest

INVALID = manifest()["invalid"]
VALID = manifest()["valid"]


def _validate(client: httpx.Client, resource: dict[str, Any]) -> dict[str, Any]:
    response = client.post(f"/{resource['resourceType']}/$validate", json=resource,
                           headers={"Content-Type": FHIR})
    assert response.status_code == 200, response.text
    outcome: dict[str, Any] = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    return outcome


@pytest.mark.parametrize("entry", INVALID, ids=lambda e: e["file"])
def test_validate_reports_the_element_and_rule(client: httpx.Client, entry: dict[str, Any]
                                                ) -> None:
    outcome = _validate(client, load_json(EXAMPLES / entry["file"]))
    expect = entry["expect"]
    matching = [
        i for i in outcome["issue"]
        if i["severity"] in ("error", "fatal")
        and i["details"]["coding"][0]["code"] == expect["code"]
        and expect["expression"] in i.get("expression", [])
        and expect["mentions"] in i.get("diagnostics", "")
    ]
    assert matching, (entry["breaks"], outcome["issue"])


@pytest.mark.parametrize("entry", VALID, ids=lambda e: e["file"])
def test_validate_passes_the_valid_examples(client: httpx.Client, entry: dict[str, Any]) -> None:
    outcome = _validate(client, load_json(EXAMPLES / entry["file"]))
    assert not [i for i in outcome["issue"] if i["severity"] in ("error", "fatal")], outcome
