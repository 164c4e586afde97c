"""Behind a reverse proxy: ``X-Forwarded-*`` from a trusted proxy shape the links the
gateway writes and the address it audits; from anyone else they change nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.settings import Settings
from tests.api.helpers import FHIR
from tests.conftest import RunningServer
from tests.security.test_audit import records

PROXIED = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "fhir.example.org",
           "X-Forwarded-Prefix": "/gateway", "X-Forwarded-For": "203.0.113.7, 127.0.0.1",
           "Content-Type": FHIR}
PUBLIC = "https://fhir.example.org/gateway/fhir"


def _server(tmp: Path, **kw: str) -> RunningServer:
    return RunningServer(Settings(database_url=f"sqlite:///{tmp / 'g.db'}", **kw))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trusting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Loopback is trusted by default: the test client stands in for the proxy."""
    with _server(tmp_path_factory.mktemp("fwd")) as running:
        yield running


def test_the_links_name_the_base_the_client_used(trusting: RunningServer) -> None:
    made = httpx.post(f"{trusting.url}/Patient", json={"resourceType": "Patient"},
                      headers=PROXIED)
    assert made.status_code == 201, made.text
    pid = made.json()["id"]
    assert made.headers["Location"] == f"{PUBLIC}/Patient/{pid}/_history/1"
    found = httpx.get(f"{trusting.url}/Patient", params={"_id": pid}, headers=PROXIED).json()
    assert found["link"][0]["url"].startswith(f"{PUBLIC}/Patient?")
    assert found["entry"][0]["fullUrl"] == f"{PUBLIC}/Patient/{pid}"
    smart = httpx.get(f"{trusting.url}/.well-known/smart-configuration", headers=PROXIED)
    assert smart.json()["token_endpoint"] == f"{PUBLIC}/auth/token"
    # a reference written with the public base is this server's own
    observation = {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                   "subject": {"reference": f"{PUBLIC}/Patient/{pid}"}}
    stored = httpx.post(f"{trusting.url}/Observation", json=observation, headers=PROXIED)
    assert stored.json()["subject"]["reference"] == f"Patient/{pid}"
    # the client's address, not the proxy's, is audited
    audited = [r for r in records(trusting.settings)
               if any(e.get("what", {}).get("reference") == f"Patient/{pid}"
                      for e in r.get("entity", []))]
    addresses = {a.get("network", {}).get("address") for r in audited for a in r["agent"]}
    assert "203.0.113.7" in addresses and "127.0.0.1" not in addresses, addresses


def test_a_port_and_what_cannot_be_a_host_or_path(trusting: RunningServer) -> None:
    def location(**headers: str) -> str:
        made = httpx.post(f"{trusting.url}/Patient", json={"resourceType": "Patient"},
                          headers={"Content-Type": FHIR, **headers})
        assert made.status_code == 201, made.text
        return made.headers["Location"].split("/Patient/", 1)[0]

    assert location(**{"X-Forwarded-Proto": "https", "X-Forwarded-Host": "h.example",
                       "X-Forwarded-Port": "8443"}) == "https://h.example:8443/fhir"
    assert location(**{"X-Forwarded-Proto": "https", "X-Forwarded-Host": "h.example",
                       "X-Forwarded-Port": "443"}) == "https://h.example/fhir"
    # a chain of proxies: the first one's, nearest the client
    assert location(**{"X-Forwarded-Host": "a.example, b.internal"}) == "http://a.example/fhir"
    own = trusting.url.removesuffix("/fhir")
    for bad in ({"X-Forwarded-Host": "evil.example/x?"}, {"X-Forwarded-Host": "a b"},
                {"X-Forwarded-Prefix": "/../admin"}, {"X-Forwarded-Prefix": "gateway"},
                {"X-Forwarded-Proto": "javascript"}):
        assert location(**bad) == f"{own}/fhir", bad


def test_headers_from_a_proxy_not_trusted_change_nothing(tmp_path: Path) -> None:
    with _server(tmp_path, forwarded_allow_ips="10.0.0.0/8") as running:
        made = httpx.post(f"{running.url}/Patient", json={"resourceType": "Patient"},
                          headers=PROXIED)
        assert made.headers["Location"].startswith(f"{running.url}/Patient/")
        agents = [a for r in records(running.settings) for a in r["agent"]]
        assert "203.0.113.7" not in {a.get("network", {}).get("address") for a in agents}

