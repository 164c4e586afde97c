"""Composition root: picks the concrete store and wires the HTTP app.

``create_app`` is what ``uvicorn gateway.main:create_app --factory`` (and
``carepath serve``) runs; tests call it with their own settings.
"""

from __future__ import annotations

import gc
import logging
from typing import Protocol

from fastapi import FastAPI

from gateway.api.app import create_api
from gateway.api.health import Health
from gateway.events import EventRuntime
from gateway.fhir.indexer import Indexer, set_local_timezone
from gateway.fhir.validation import FhirValidator
from gateway.interactions import capabilities
from gateway.interactions.base import Context
from gateway.interactions.install import install_conformance
from gateway.interactions.operation_table import OPERATIONS
from gateway.interactions.search_parameters import StoredSearchParameters
from gateway.registry import Registry, profiles_dir
from gateway.security.audit import AuditChainer, AuditWriter
from gateway.security.auth import Authenticator
from gateway.security.policy import AccessPolicy, PolicyIndexer, load_rules
from gateway.settings import Settings
from gateway.storage.commit_hooks import HookedSqlStore
from gateway.storage.db import open_database
from gateway.storage.planner import PlannerStatistics
from gateway.storage.retention import Retention
from gateway.subscriptions import SubscriptionService
from gateway.subscriptions.service import SERVER_CAPABILITIES, WEBSOCKET_PATH
from gateway.subscriptions.topics import TopicRegistry

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


def build_store(settings: Settings, reg: Registry, access: AccessPolicy) -> HookedSqlStore:
    # dates without a zone, indexed and searched for, are the deployment's local time
    set_local_timezone(settings.local_timezone)
    db = open_database(settings.database_url, pool_size=settings.db_pool_size,
                       schema=settings.database_schema,
                       statement_timeout_ms=settings.db_statement_timeout_ms)
    return HookedSqlStore(db, PolicyIndexer(reg.indexer, access))


def stored_search_parameters(settings: Settings, reg: Registry,
                             store: HookedSqlStore) -> StoredSearchParameters:
    """The search parameters of ``store``: R4's, the gateway's own and those stored
    in its database, written with the store's indexer."""
    writer = store.indexer
    assert isinstance(writer, PolicyIndexer)

    def install(indexer: Indexer) -> None:
        writer.indexer = indexer

    bases = tuple(f"{b.rstrip('/')}/" for b in (settings.public_base_url,) if b)
    return StoredSearchParameters(reg, store, install, local_bases=bases,
                                  refresh_s=settings.search_parameter_refresh_s)


def freeze_startup_objects() -> None:
    """Keep what startup built (the registry, compiled profiles and validator, about
    150,000 objects) out of the cyclic collector's full passes.

    They live as long as the process, yet each full pass walked all of them:
    about 90 ms here, during which no request and no delivery moves. That
    pause, every few seconds under load, was the tail of the latency figures.
    Once per process: later app instances (tests) add little.
    """
    if gc.get_freeze_count() == 0:
        gc.collect()
        gc.freeze()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    reg = registry()
    access = AccessPolicy(load_rules(settings.jurisdiction), reg.indexer)
    store = build_store(settings, reg, access)
    audit = AuditWriter(store.db, durable=settings.audit_durable_reads)
    events = EventRuntime(store.db, settings)  # outbox relay and bus
    store.after_commit.append(events.relay.wake)
    subscriptions = SubscriptionService(store.db, store, settings, events,
                                        base_url=settings.own_base,
                                        topics=TopicRegistry.load(
                                            implied=reg.indexer.implied_system))
    subscriptions.matcher.access_rules = access.rules  # notifications obey the compartment
    validator = subscriptions.checks(
        FhirValidator.load(profiles_dir(), reg.structure_definitions, settings))
    subscriptions.dispatcher.xml_model = validator.model  # for XML notification payloads
    operations = {**OPERATIONS, **{op.name: op for op in subscriptions.operations()}}
    search_parameters = stored_search_parameters(settings, reg, store)
    store.after_commit.append(search_parameters.committed)
    ctx = Context(store=store, registry=search_parameters.registry, settings=settings,
                  operations=operations, access=access, audit=audit, validator=validator,
                  search_parameters=search_parameters)
    search_parameters.on_change.append(lambda: capabilities.forget(ctx))
    capabilities.contribute(ctx, "Subscription", subscriptions.subscription_extensions)
    capabilities.contribute(ctx, None, subscriptions.rest_extensions)
    capabilities.declare(ctx, profiles={"Subscription": [subscriptions.supported_profile]},
                         instantiates=[SERVER_CAPABILITIES])
    retention = Retention(store.db, outbox_hours=settings.outbox_retention_hours,
                          subscription_event_hours=settings.subscription_event_retention_hours)
    services: list[Service] = [search_parameters, audit, AuditChainer(store.db), events,
                               subscriptions, retention]
    statistics = PlannerStatistics(store.db)
    store.after_commit.append(statistics.wake)
    services.append(statistics)
    auth = Authenticator(store.db, settings)

    started: list[Service] = []

    async def startup() -> None:
        await store.open()
        try:
            installed = await install_conformance(store, reg)
            if installed:
                log.info("installed %d of the gateway's conformance resources", installed)
            await auth.start(settings.own_base)
            for service in services:
                await service.start()
                started.append(service)
        except BaseException:
            # the server will not run: what started stops, and the database's
            # connections (threads, on SQLite) close, so that the process can exit
            await shutdown()
            raise
        freeze_startup_objects()
        log.info("carepath-gateway ready on %s (%s)", settings.base_path, store.dialect)

    async def shutdown() -> None:
        while started:
            await started.pop().stop()
        await store.close()

    health = Health(store.db, audit, events)
    app = create_api(ctx, startup, shutdown, auth, health)
    app.router.add_websocket_route(f"{settings.base_path}{WEBSOCKET_PATH}", subscriptions.websocket)
    app.state.context = ctx
    return app
