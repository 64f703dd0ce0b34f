"""Wires the audit service: database runtime, ingest consumer, partition upkeep, servicer."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import grpc

from crm.v1 import audit_pb2, audit_pb2_grpc
from services.audit import SCHEMA, SERVICE
from services.audit.entrypoints.consumer import AuditIngest
from services.audit.entrypoints.grpc_api import AuditServicer
from shared.config import AuditSettings
from shared.db import asyncpg_dsn
from shared.grpc_server import ServiceApp
from shared.logging import get_logger
from shared.runtime import DatabaseRuntime

MIGRATIONS = Path(__file__).parent / "migrations"
PARTITION_UPKEEP_SECONDS = 6 * 3600
log = get_logger(__name__)


def build_app(settings: AuditSettings) -> ServiceApp:
    runtime = DatabaseRuntime(SERVICE, [SCHEMA], MIGRATIONS, settings)
    app = ServiceApp(
        name=SERVICE,
        settings=settings,
        service_names=[audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name],
    )
    runtime.attach(app)
    pools: dict[str, asyncpg.Pool] = {}

    def pool() -> asyncpg.Pool:
        return pools["main"]

    async def open_pool() -> None:
        pools["main"] = await asyncpg.create_pool(
            asyncpg_dsn(settings.db_url.get_secret_value()), min_size=1, max_size=settings.db_pool_size
        )

    async def close_pool() -> None:
        if "main" in pools:
            await pools["main"].close()

    ingest = AuditIngest(pool, lambda: runtime.js, settings.consumer_name, settings.ingest_batch_size)

    async def partition_upkeep() -> None:
        while True:
            async with pool().acquire() as conn:
                created = await conn.fetchval("SELECT audit.ensure_audit_partitions(2)")
            if created:
                log.info("created audit partitions", count=created)
            await asyncio.sleep(PARTITION_UPKEEP_SECONDS)

    def register(server: grpc.aio.Server) -> None:
        audit_pb2_grpc.add_AuditServiceServicer_to_server(AuditServicer(pool), server)

    app.startup.append(open_pool)
    app.background += [ingest.run, partition_upkeep]
    app.shutdown.insert(0, close_pool)
    app.registrars.append(register)
    return app
