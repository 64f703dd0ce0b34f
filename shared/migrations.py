"""Runs a service's Alembic migrations as the schema owner.

Each service keeps its own Alembic environment (`services/<name>/migrations`) and its own version
table inside its schema, so services migrate independently. Every env.py delegates here, so the
async plumbing, the advisory lock and the app role's grants are written once.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from shared.db import identifier, schema_setup_statements, sqlalchemy_url


def alembic_config(script_location: Path, owner_dsn: str, schema: str, app_role: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(script_location))
    config.attributes.update({"owner_dsn": owner_dsn, "schema": schema, "app_role": app_role})
    return config


async def upgrade(
    script_location: Path, owner_dsn: str, schema: str, app_role: str, revision: str = "head"
) -> None:
    # Alembic's commands are synchronous and env.py runs its own loop; a thread keeps ours free.
    config = alembic_config(script_location, owner_dsn, schema, app_role)
    await asyncio.to_thread(command.upgrade, config, revision)


def run_env(context: Any) -> None:
    """The body of every service's env.py (online mode only: migrations need a live database)."""
    attributes = context.config.attributes
    schema = identifier(attributes["schema"])
    app_role = attributes["app_role"]

    def do_run(connection: Any) -> None:
        context.configure(connection=connection, version_table_schema=schema, target_metadata=None)
        with context.begin_transaction():
            context.run_migrations()

    async def run_async() -> None:
        engine = create_async_engine(sqlalchemy_url(attributes["owner_dsn"]), poolclass=NullPool)
        try:
            async with engine.connect() as connection:
                # Two replicas starting together must not both migrate.
                await connection.execute(
                    text("SELECT pg_advisory_lock(hashtext(:s))"), {"s": f"migrate:{schema}"}
                )
                try:
                    for statement in schema_setup_statements(schema, app_role):
                        await connection.execute(text(statement))
                    await connection.commit()
                    await connection.run_sync(do_run)
                    await connection.commit()
                finally:
                    await connection.execute(
                        text("SELECT pg_advisory_unlock(hashtext(:s))"), {"s": f"migrate:{schema}"}
                    )
                    await connection.commit()
        finally:
            await engine.dispose()

    asyncio.run(run_async())
