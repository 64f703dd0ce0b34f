"""Wires the custom_object service of one shard: database runtime and outbox relay, the index
builder (schema owner, for CREATE INDEX CONCURRENTLY) and keeper, the shard guard, the
core-entity client for lookups to core records, the consumer that follows core deletions, the
field usage counter and the CustomObjectService servicer."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from urllib.parse import urlsplit

import grpc

from crm.v1 import custom_object_pb2, custom_object_pb2_grpc, data_admin_pb2_grpc
from services.custom_object import SCHEMA, SERVICE
from services.custom_object.adapters.core_entities import CoreEntityClient, CoreRecords
from services.custom_object.adapters.indexes import IndexBuilder, IndexKeeper
from services.custom_object.adapters.usage import UsageTracker
from services.custom_object.entrypoints.consumer import CoreDeletionConsumer
from services.custom_object.entrypoints.grpc_api import CustomObjectServicer
from services.custom_object.service_layer.data_admin import DataAdmin
from services.custom_object.service_layer.definitions import DefinitionUseCases
from services.custom_object.service_layer.records import RecordUseCases
from shared.config import ShardServiceSettings
from shared.data_admin import DataAdminServicer
from shared.db import asyncpg_dsn
from shared.grpc_server import ServiceApp
from shared.runtime import DatabaseRuntime
from shared.shard_guard import MembershipGuard

MIGRATIONS = Path(__file__).parent / "migrations"
#: Seconds between flushes of the in-memory field usage counts.
USAGE_FLUSH_SECONDS = 5.0


def deletion_consumer_name(settings: ShardServiceSettings) -> str:
    """One durable consumer per shard database: named after the shard and a digest of the
    database's address, so deployments (or test suites) sharing a NATS server never share it."""
    location = urlsplit(asyncpg_dsn(settings.db_url.get_secret_value()))
    digest = hashlib.sha256(f"{location.hostname}:{location.port}{location.path}".encode()).hexdigest()[:12]
    return f"custom-object-{re.sub(r'[^A-Za-z0-9_-]', '_', settings.shard_name)}-{digest}"


def build_app(settings: ShardServiceSettings, core_records: CoreRecords | None = None) -> ServiceApp:
    """The service process; tests may pass a fake `core_records` instead of the gRPC client."""
    runtime = DatabaseRuntime(SERVICE, [SCHEMA], MIGRATIONS, settings)
    app = ServiceApp(
        name=f"{SERVICE}[{settings.shard_name}]",
        settings=settings,
        service_names=[custom_object_pb2.DESCRIPTOR.services_by_name["CustomObjectService"].full_name],
    )
    runtime.attach(app)
    usage = UsageTracker()
    core_client = CoreEntityClient(settings.core_entity_address, settings.internal_token.get_secret_value())
    core = core_records if core_records is not None else core_client
    indexes = IndexBuilder(settings.db_owner_url.get_secret_value())
    keeper = IndexKeeper(indexes)

    built: list[RecordUseCases] = []

    def register(server: grpc.aio.Server) -> None:
        # Registrars run after start-up hooks, so the database is connected by now.
        sessions = runtime.session_maker()
        guard = MembershipGuard()
        records = RecordUseCases(sessions, core, usage, guard, keeper)
        built.append(records)
        servicer = CustomObjectServicer(DefinitionUseCases(sessions, indexes, usage, guard, keeper), records)
        custom_object_pb2_grpc.add_CustomObjectServiceServicer_to_server(servicer, server)
        # Internal (the audit service's restore, retention and erasure); not in service_names,
        # as the gateway never routes it.
        data_admin_pb2_grpc.add_DataAdminServiceServicer_to_server(
            DataAdminServicer(DataAdmin(sessions, core, usage, guard, keeper)), server
        )

    deletions = CoreDeletionConsumer(
        lambda: built[0],
        lambda: runtime.js,
        durable=deletion_consumer_name(settings),
    )

    async def flush_usage() -> None:
        await usage.run(runtime.session_maker(), USAGE_FLUSH_SECONDS)

    async def close_core_client() -> None:
        await keeper.wait()
        await core_client.close()

    app.registrars.append(register)
    app.background.append(flush_usage)
    app.background.append(deletions.run)
    # Before the runtime's own shutdown (which disposes the engine) so the last flush lands.
    app.shutdown.insert(0, close_core_client)
    return app
