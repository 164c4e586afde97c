"""Runtime configuration. The only module that reads the environment.

Every setting has an environment variable ``CAREPATH_<NAME>``; the CLI may
override some of them with flags.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str = "sqlite:///./carepath.db"
    #: PostgreSQL schema to use (``search_path``); default: the server's default
    database_schema: str | None = None
    redis_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    base_path: str = "/fhir"
    #: public base URL used in Location headers and Bundle links; derived from
    #: the request when unset.
    public_base_url: str | None = None
    max_request_bytes: int = 10 * 1024 * 1024
    max_bundle_entries: int = 5000
    max_json_depth: int = 64
    default_page_size: int = 20
    max_page_size: int = 1000
    #: largest number of matches a search keeps for stable paging
    max_search_results: int = 100_000
    db_pool_size: int = 10

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        base = cls()
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = os.environ.get(f"CAREPATH_{f.name.upper()}")
            if raw is None:
                continue
            current = getattr(base, f.name)
            values[f.name] = int(raw) if isinstance(current, int) else raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return replace(base, **values)
