"""The ``carepath`` command."""

from __future__ import annotations

import asyncio
import logging
import sys

import typer
from rich.console import Console

from gateway.settings import Settings

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
    """Run the FHIR server (``http://HOST:PORT/fhir``)."""
    import os

    import uvicorn

    settings = Settings.from_env(host=host, port=port, workers=workers,
                                 database_url=database_url)
    # workers re-read the environment: hand the effective settings down that way
    os.environ["CAREPATH_DATABASE_URL"] = settings.database_url
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

    asyncio.run(prepare())
    registry()
    console.print(f"carepath-gateway on [bold]http://{settings.host}:{settings.port}"
                  f"{settings.base_path}[/bold] ({settings.database_url.split(':')[0]})")
    uvicorn.run("gateway.main:create_app", factory=True, host=settings.host, port=settings.port,
                workers=settings.workers, log_level="info", access_log=False)


@app.command("migrate")
def migrate_cmd(
    database_url: str = typer.Option(None, "--db", help="sqlite:///… or postgresql://…"),
) -> None:
    """Create or upgrade the database schema and exit."""
    from gateway.storage.db import open_database
    from gateway.storage.migrate import migrate

    settings = Settings.from_env(database_url=database_url)

    async def run() -> list[int]:
        db = open_database(settings.database_url, pool_size=1, schema=settings.database_schema)
        await db.open()
        try:
            return await migrate(db)
        finally:
            await db.close()

    applied = asyncio.run(run())
    console.print(f"applied migrations: {applied or 'none (up to date)'}")


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())
