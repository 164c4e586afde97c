"""Where a limit leaves part of a search's result out, the searchset says so: a
warning (GW-1033) in its OperationOutcome, as HAPI FHIR gives one when a page's
includes pass its limit, never a page that looks whole."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.helpers import FHIR, patient, post
from tests.conftest import BACKENDS, RunningServer, backend_settings, unique


def _outcome(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [i for e in bundle.get("entry", []) if e["search"]["mode"] == "outcome"
            for i in e["resource"]["issue"]]


def _codes(bundle: dict[str, Any]) -> list[str]:
    return [i["details"]["coding"][0]["code"] for i in _outcome(bundle)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_limits_are_said(backend: str, tmp_path: Path, new_schema: Any) -> None:
    # includes: ten times the largest page (20); matches: 3 can be paged through
    settings = backend_settings(backend, tmp_path, new_schema, max_page_size=2,
                                max_search_results=3)
    family = unique("Limit")
    with RunningServer(settings) as running, httpx.Client(base_url=running.url) as http:
        ids = [post(http, patient(unique("mrn"), family)).json()["id"] for _ in range(2)]
        for i in range(25):
            answer = http.post("/Observation", headers={"Content-Type": FHIR}, json={
                "resourceType": "Observation", "status": "final", "code": {"text": family},
                "subject": {"reference": f"Patient/{ids[i % 2]}"}})
            assert answer.status_code == 201, answer.text

        # 13 and 12 Observations: one patient's fit, both patients' do not
        one = http.get("/Patient", params={"_id": ids[0], "_revinclude": "Observation:subject"})
        assert one.status_code == 200
        assert len([e for e in one.json()["entry"] if e["search"]["mode"] == "include"]) == 13
        assert _codes(one.json()) == []
        both = http.get("/Patient", params={"family": family, "_count": "2",
                                            "_revinclude": "Observation:subject"}).json()
        assert len([e for e in both["entry"] if e["search"]["mode"] == "include"]) == 20
        assert _codes(both) == ["GW-1033"]
        issue = _outcome(both)[0]
        assert issue["severity"] == "warning" and issue["code"] == "too-costly"
        assert "20" in issue["diagnostics"]
        # with an unknown parameter, each warning keeps its own code
        mixed = http.get("/Patient", params={"family": family, "_count": "2", "nonsense": "1",
                                             "_revinclude": "Observation:subject"}).json()
        assert sorted(_codes(mixed)) == ["GW-1014", "GW-1033"]

        # more matches than can be paged through (_offset pages, and kept results)
        for params in ({"code:text": family, "_count": "2"},
                       {"code:text": family, "_count": "2", "_offset": "2"}):
            found = http.get("/Observation", params=params).json()
            assert _codes(found) == ["GW-1033"], (params, found)
            assert "only the first 3 matches" in _outcome(found)[0]["diagnostics"]
