"""Composition root: picks the concrete store and wires the HTTP app.

``create_app`` is what ``uvicorn gateway.main:create_app --factory`` (and
``carepath serve``) runs; tests call it with their own settings.
"""

from __future__ import annotations

import logging
from typing import Protocol

from fastapi import FastAPI

from gateway.api.app import create_api
from gateway.interactions.base import Context
from gateway.interactions.operation_table import OPERATIONS
from gateway.registry import Registry
from gateway.settings import Settings
from gateway.storage.db import open_database
from gateway.storage.sql import SqlStore

log = logging.getLogger("carepath")

_REGISTRY: Registry | None = None


def registry() -> Registry:
    """Loaded once per process (the definitions are read-only)."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = Registry.load()
    return _REGISTRY


class Service(Protocol):
    """Background work started with the app and stopped with it (relays, deliveries)."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...


def build_store(settings: Settings, reg: Registry) -> SqlStore:
    db = open_database(settings.database_url, pool_size=settings.db_pool_size,
                       schema=settings.database_schema)
    return SqlStore(db, reg.indexer)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    reg = registry()
    store = build_store(settings, reg)
    ctx = Context(store=store, registry=reg, settings=settings, operations=dict(OPERATIONS))
    services: list[Service] = []

    async def startup() -> None:
        await store.open()
        for service in services:
            await service.start()
        log.info("carepath-gateway ready on %s (%s)", settings.base_path, store.dialect)

    async def shutdown() -> None:
        for service in reversed(services):
            await service.stop()
        await store.close()

    app = create_api(ctx, startup, shutdown)
    app.state.context = ctx
    return app
