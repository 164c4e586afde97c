"""The ``carepath`` command."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from gateway.settings import Settings, SettingsError, database_label

app = typer.Typer(help="carepath-gateway: FHIR R4 gateway for cross-sector care pathways.",
                  no_args_is_help=True)
console = Console(stderr=True)


@app.command()
def serve(
    host: str = typer.Option(None, help="bind address (default 127.0.0.1)"),
    port: int = typer.Option(None, help="TCP port (default 8080)"),
    workers: int = typer.Option(None, help="worker processes (default 1)"),
    database_url: str = typer.Option(None, "--db", help="sqlite:///… or postgresql://…"),
) -> None:
    """Run the FHIR server (http://HOST:PORT/fhir)."""
    import os

    import uvicorn

    settings = _settings(host=host, port=port, workers=workers,
                                 database_url=database_url)
    # the app (in each worker) reads the environment: hand the effective settings down
    # that way. The address decides dev mode (loopback only) and the URLs the gateway
    # writes (notifications, token audiences) when no public base URL is configured.
    os.environ["CAREPATH_DATABASE_URL"] = settings.database_url
    os.environ["CAREPATH_HOST"] = settings.host
    os.environ["CAREPATH_PORT"] = str(settings.port)
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # the workers' metrics, summed in any worker's /metrics (gateway/api/metrics.py)
        import atexit
        import shutil
        import tempfile

        shared = tempfile.mkdtemp(prefix="carepath-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = shared
        atexit.register(shutil.rmtree, shared, True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from gateway.main import registry
    from gateway.storage.db import open_database
    from gateway.storage.migrate import migrate

    async def prepare() -> None:
        db = open_database(settings.database_url, pool_size=1, schema=settings.database_schema)
        await db.open()
        try:
            applied = await migrate(db)
        finally:
            await db.close()
        if applied:
            console.print(f"[green]schema migrated to version {applied[-1]}[/green]")

    from gateway.security.policy import load_rules

    try:
        load_rules(settings.jurisdiction)
    except ValueError as exc:
        console.print(f"[red]CAREPATH_JURISDICTION: {exc}[/red]", soft_wrap=True)
        raise typer.Exit(2) from None
    _with_database(settings, prepare)
    registry()
    console.print(f"carepath-gateway on [bold]http://{settings.host}:{settings.port}"
                  f"{settings.base_path}[/bold] ({settings.database_url.split(':')[0]})")
    from gateway.api.http_protocol import BoundedHeadProtocol

    uvicorn.run("gateway.main:create_app", factory=True, host=settings.host, port=settings.port,
                workers=settings.workers, log_level="info", access_log=False,
                timeout_keep_alive=settings.keep_alive_s, http=BoundedHeadProtocol,
                proxy_headers=False,  # the gateway reads them (gateway/api/forwarded.py)
                timeout_graceful_shutdown=settings.shutdown_grace_s or None)


@app.command("migrate")
def migrate_cmd(
    database_url: str = typer.Option(None, "--db", help="sqlite:///… or postgresql://…"),
) -> None:
    """Create or upgrade the database schema and exit."""
    from gateway.storage.db import open_database
    from gateway.storage.migrate import migrate

    settings = _settings(database_url=database_url)

    async def run() -> list[int]:
        db = open_database(settings.database_url, pool_size=1, schema=settings.database_schema)
        await db.open()
        try:
            return await migrate(db)
        finally:
            await db.close()

    applied = _with_database(settings, run)
    console.print(f"applied migrations: {applied or 'none (up to date)'}")


@app.command("reindex")
def reindex_cmd(
    resource_type: str = typer.Argument(None, help="only this resource type (default: all)"),
    database_url: str = typer.Option(None, "--db", help="sqlite:///… or postgresql://…"),
    local_base: list[str] = typer.Option(
        [], "--local-base", help="a base URL of this server, for references written before it"
        " was recognised (default: CAREPATH_PUBLIC_BASE_URL); repeatable"),
) -> None:
    """Rebuild the search index from the stored resources.

    After an upgrade that changed what is indexed; runs beside a serving gateway,
    in small batches."""
    from gateway.main import build_store, registry, stored_search_parameters
    from gateway.security.policy import AccessPolicy, load_rules

    settings = _existing(_settings(database_url=database_url))
    bases = tuple(dict.fromkeys(
        b.rstrip("/") + "/" for b in (*local_base, settings.public_base_url or "") if b))
    reg = registry()
    store = build_store(settings, reg, AccessPolicy(load_rules(settings.jurisdiction),
                                                    reg.indexer))
    if resource_type is not None and not reg.is_resource_type(resource_type):
        console.print(f"[red]unknown resource type {resource_type}[/red]")
        raise typer.Exit(2)

    async def run() -> int:
        await store.open()
        try:
            # the SearchParameters stored in the database are indexed too
            await stored_search_parameters(settings, reg, store).refresh()
            return await store.reindex(resource_type, bases=bases)
        finally:
            await store.close()

    count = _with_database(settings, run)
    console.print(f"[green]reindexed[/green] {count} resources")


clients_app = typer.Typer(help="Register the systems allowed to call the gateway.")
app.add_typer(clients_app, name="clients")


def _existing(settings: Settings) -> Settings:
    """``settings``, when their SQLite database exists: a maintenance command pointed
    at a mistyped path made a new, empty database there and reported on it (``audit
    verify``: intact, 0 records)."""
    from gateway.storage.db import sqlite_path

    url = settings.database_url
    if url.startswith("sqlite:"):
        path = sqlite_path(url)
        if path != ":memory:" and not Path(path).is_file():
            console.print(f"[red]there is no database at {path}[/red] (serve or migrate "
                          "makes one)", soft_wrap=True)
            raise typer.Exit(1)
    return settings


def _run_db(settings: Settings, work: Any) -> Any:
    from gateway.storage.db import open_database
    from gateway.storage.migrate import migrate

    async def run() -> Any:
        db = open_database(settings.database_url, pool_size=1, schema=settings.database_schema)
        await db.open()
        try:
            await migrate(db)
            return await work(db)
        finally:
            await db.close()

    return _with_database(settings, run)


def _with_database(settings: Settings, work: Any) -> Any:
    """``asyncio.run(work())``; a database that cannot be reached or used ends the
    command with one line saying so (exit 1), not a traceback."""
    import sqlite3

    import asyncpg

    from gateway.storage.migrate import SchemaTooNew

    try:
        return asyncio.run(work())
    except (OSError, sqlite3.Error, asyncpg.PostgresError, asyncpg.InterfaceError,
            SchemaTooNew) as exc:
        console.print(f"[red]cannot use the database {database_label(settings.database_url)}:"
                      f" {exc}[/red]", soft_wrap=True)
        raise typer.Exit(1) from None


@clients_app.command("add")
def clients_add(
    client_id: str = typer.Argument(..., help="client_id the system authenticates as"),
    organization: str = typer.Option(..., help="Organization id the client acts for"),
    scope: str = typer.Option("system/*.cruds", help="scopes the client may request"),
    jwks: Path = typer.Option(None, help="file with the client's public JWKS"),
    jwks_url: str = typer.Option(None, help="URL of the JWKS, fetched now (only now)"),
    database_url: str = typer.Option(None, "--db", help="sqlite:///… or postgresql://…"),
) -> None:
    """Register (or replace) a SMART Backend Services client."""
    import json

    import httpx

    from gateway.security.scopes import Grant, ScopeError
    from gateway.storage.security import Client, add_client

    if (jwks is None) == (jwks_url is None):
        raise typer.BadParameter("give exactly one of --jwks and --jwks-url")
    try:
        if jwks is not None:
            keys = json.loads(jwks.read_text())
        else:
            response = httpx.get(jwks_url, timeout=10, follow_redirects=False)
            response.raise_for_status()
            keys = response.json()
    except (OSError, ValueError, httpx.HTTPError) as exc:
        raise typer.BadParameter(f"cannot read the JWKS: {exc}") from None
    if not isinstance(keys, dict) or not isinstance(keys.get("keys"), list):
        raise typer.BadParameter("the JWKS is not a JSON object with a 'keys' list")
    public = [k for k in keys["keys"] if isinstance(k, dict)]
    if not public:
        raise typer.BadParameter("the JWKS needs public keys, each with a kid")
    for key in public:
        problem = _public_key_problem(key)
        if problem is not None:
            raise typer.BadParameter(f"key {str(key.get('kid'))[:40]!r}: {problem}")
    try:
        if not Grant.parse(scope).scopes:
            raise ScopeError("no system/ scope given")
    except ScopeError as exc:
        raise typer.BadParameter(str(exc)) from None
    org = organization.removeprefix("Organization/")
    client = Client(client_id, org, json.dumps({"keys": public}), jwks_url, scope, True)
    settings = _settings(database_url=database_url)
    _run_db(settings, lambda db: add_client(db, client))
    console.print(f"registered client [bold]{client_id}[/bold] for Organization/{org} "
                  f"({len(public)} key(s), scope {scope})")


#: JWK members that hold private or shared key material (RFC 7518 6.2.2, 6.3.2, 6.4)
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


def _public_key_problem(key: dict[str, Any]) -> str | None:
    """Why ``key`` cannot be a client's signing key here, None when it can: a public
    RSA or EC P-384 key (RS384/ES384, SMART Backend Services) with a kid, nothing
    secret in it (a shared secret or private key would be stored with the client)."""
    import jwt

    if "kid" not in key:
        return "a key needs a kid"
    if _PRIVATE_MEMBERS & key.keys():
        return "holds private or secret key material; register the public key only"
    if key.get("kty") not in ("RSA", "EC"):
        return f"kty {str(key.get('kty'))[:20]!r} is not RSA or EC"
    if key.get("kty") == "EC" and key.get("crv") != "P-384":
        return "an EC key must be on P-384 (ES384)"
    try:
        jwt.PyJWK.from_dict(key, algorithm="RS384" if key["kty"] == "RSA" else "ES384")
    except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
        return f"is not a usable public key ({exc})"
    return None


@clients_app.command("list")
def clients_list(
    database_url: str = typer.Option(None, "--db", help="sqlite:///… or postgresql://…"),
) -> None:
    """Show the registered clients."""
    from rich.table import Table

    from gateway.storage.security import list_clients

    settings = _existing(_settings(database_url=database_url))
    table = Table("client_id", "organization", "scope", "active")
    for c in _run_db(settings, list_clients):
        table.add_row(c.client_id, c.organization, c.scope, "yes" if c.active else "no")
    Console().print(table)


def _client_change(client_id: str, database_url: str | None, change: Any, done: str) -> None:
    settings = _existing(_settings(database_url=database_url))
    if not _run_db(settings, lambda db: change(db, client_id)):
        console.print(f"[red]there is no client {client_id!r}[/red] (carepath clients list)",
                      soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"client [bold]{client_id}[/bold] {done}")


_REVOKED = ("its tokens stop working within seconds, in every worker")


@clients_app.command("disable")
def clients_disable(
    client_id: str = typer.Argument(..., help="client_id to disable"),
    database_url: str = typer.Option(None, "--db", help="sqlite:///… or postgresql://…"),
) -> None:
    """Disable a client (a key was lost, a contract ended): the token endpoint refuses it
    and the tokens it holds are revoked. Its registration stays, for `enable`."""
    from gateway.storage.security import set_client_active

    _client_change(client_id, database_url,
                   lambda db, cid: set_client_active(db, cid, False), f"disabled; {_REVOKED}")


@clients_app.command("enable")
def clients_enable(
    client_id: str = typer.Argument(..., help="client_id to enable again"),
    database_url: str = typer.Option(None, "--db", help="sqlite:///… or postgresql://…"),
) -> None:
    """Enable a disabled client again."""
    from gateway.storage.security import set_client_active

    _client_change(client_id, database_url,
                   lambda db, cid: set_client_active(db, cid, True), "enabled")


@clients_app.command("remove")
def clients_remove(
    client_id: str = typer.Argument(..., help="client_id to remove"),
    database_url: str = typer.Option(None, "--db", help="sqlite:///… or postgresql://…"),
) -> None:
    """Remove a client's registration (its keys and grant); its tokens are revoked. The
    audit trail keeps what it did. On loopback, removing the last client turns dev mode
    on again: disable a client rather than remove it to keep tokens required."""
    from gateway.storage.security import remove_client

    _client_change(client_id, database_url, remove_client, f"removed; {_REVOKED}")


audit_app = typer.Typer(help="The hash-chained audit trail.")
app.add_typer(audit_app, name="audit")


@audit_app.command("verify")
def audit_verify(
    database_url: str = typer.Option(None, "--db", help="sqlite:///… or postgresql://…"),
) -> None:
    """Check every record of the audit chain; exit 1 at the first broken link."""
    from gateway.security.audit import filed_under
    from gateway.storage.security import verify_chain

    settings = _existing(_settings(database_url=database_url))
    report = _run_db(settings, lambda db: verify_chain(db, filed_under=filed_under))
    if report.broken_at is not None:
        console.print(f"[red]audit chain broken at record {report.broken_at}: "
                      f"{report.reason}[/red] ({report.records} records verified before it)")
        raise typer.Exit(1)
    pending = (f"; {report.pending} committed records not linked yet (an older transaction"
               " is still running)") if report.pending else ""
    console.print(f"[green]audit chain intact[/green]: {report.records} records{pending}")


def _settings(**overrides: Any) -> Settings:
    """The settings, or the command ended with what is wrong with them (exit 2)."""
    try:
        return Settings.from_env(**overrides)
    except SettingsError as exc:
        console.print(f"[red]{exc}[/red]", soft_wrap=True)
        raise typer.Exit(2) from None


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())
