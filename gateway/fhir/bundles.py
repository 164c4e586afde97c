"""Assemble response Bundles (searchset, history, batch/transaction-response).

Stored resources are embedded as raw JSON bytes (``orjson.Fragment``), so a
search page is written without parsing the resources it returns.
"""

from __future__ import annotations

from typing import Any

import orjson


def raw(content: bytes) -> orjson.Fragment:
    return orjson.Fragment(content)


def bundle(
    type_: str,
    entries: list[dict[str, Any]],
    *,
    total: int | None = None,
    links: list[tuple[str, str]] | None = None,
    id: str | None = None,
    timestamp: str | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {"resourceType": "Bundle"}
    if id:
        out["id"] = id
    out["type"] = type_
    if timestamp:
        out["timestamp"] = timestamp
    if total is not None:
        out["total"] = total
    if links:
        out["link"] = [{"relation": rel, "url": url} for rel, url in links]
    out["entry"] = entries
    if not entries:
        del out["entry"]
    return out
