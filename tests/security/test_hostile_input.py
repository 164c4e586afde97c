"""Hostile input: XML entity attacks in narrative, deep and oversized JSON — refused fast,
memory flat, never a server error."""

from __future__ import annotations

import resource
import time

import httpx

from tests.api.helpers import FHIR

BILLION_LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    + "".join(f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">'
              for i in range(1, 10))
    + ']><div xmlns="http://www.w3.org/1999/xhtml">&lol9;</div>'
)
XXE = ('<!DOCTYPE div [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
       '<div xmlns="http://www.w3.org/1999/xhtml">&xxe;</div>')
XXE_NET = ('<!DOCTYPE div [<!ENTITY % ext SYSTEM "http://127.0.0.1:9/x.dtd"> %ext;]>'
           '<div xmlns="http://www.w3.org/1999/xhtml">x</div>')
SCRIPT = ('<div xmlns="http://www.w3.org/1999/xhtml"><p>x</p>'
          '<a href=" jav&#x09;ascript:alert(1)">x</a></div>')


def _patient(div: str) -> dict[str, object]:
    return {"resourceType": "Patient", "text": {"status": "generated", "div": div}}


def _max_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def test_entity_attacks_in_narrative_are_refused_fast_with_flat_memory(
    client: httpx.Client,
) -> None:
    before = _max_rss_kib()
    for div in (BILLION_LAUGHS, XXE, XXE_NET, SCRIPT):
        started = time.perf_counter()
        response = client.post("/Patient", json=_patient(div), headers={"Content-Type": FHIR})
        elapsed = time.perf_counter() - started
        assert response.status_code == 422, response.text
        assert "root:" not in response.text  # nothing of /etc/passwd comes back
        assert elapsed < 2.0
    # the server runs in this process: its peak memory grew by less than 50 MB
    assert _max_rss_kib() - before < 50 * 1024


def test_deep_json_is_refused_before_anything_else(client: httpx.Client) -> None:
    depth = 100_000
    body = b'{"resourceType":"Patient","extension":' + b"[" * depth + b"]" * depth + b"}"
    started = time.perf_counter()
    response = client.post("/Patient", content=body, headers={"Content-Type": FHIR})
    assert response.status_code == 400
    assert time.perf_counter() - started < 5.0
