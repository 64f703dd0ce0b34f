"""Wires the custom_object service of one shard: database runtime and outbox relay."""

from __future__ import annotations

from pathlib import Path

from services.custom_object import SCHEMA, SERVICE
from shared.config import ShardServiceSettings
from shared.grpc_server import ServiceApp
from shared.runtime import DatabaseRuntime

MIGRATIONS = Path(__file__).parent / "migrations"


def build_app(settings: ShardServiceSettings) -> ServiceApp:
    runtime = DatabaseRuntime(SERVICE, [SCHEMA], MIGRATIONS, settings)
    app = ServiceApp(name=f"{SERVICE}[{settings.shard_name}]", settings=settings)
    runtime.attach(app)
    return app
