"""Wires the audit service: database runtime, ingest consumers, partition upkeep, the retention
and archive schedules, the owners' DataAdminService client, and the servicer."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import asyncpg
import grpc

from crm.v1 import audit_pb2, audit_pb2_grpc
from services.audit import SCHEMA, SERVICE
from services.audit.adapters.owners import Owners
from services.audit.entrypoints.consumer import ALL_KINDS, StreamIngest
from services.audit.entrypoints.grpc_api import AuditServicer
from services.audit.service_layer import operations
from shared.config import AuditSettings
from shared.db import asyncpg_dsn
from shared.grpc_server import ServiceApp
from shared.logging import get_logger
from shared.runtime import DatabaseRuntime

MIGRATIONS = Path(__file__).parent / "migrations"
PARTITION_UPKEEP_SECONDS = 6 * 3600
FIRST_SCHEDULED_RUN_SECONDS = 300.0
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
    owners = Owners(
        settings.tenant_address,
        settings.internal_token.get_secret_value(),
        settings.owner_call_timeout_seconds,
    )

    def pool() -> asyncpg.Pool:
        return pools["main"]

    async def open_pool() -> None:
        pools["main"] = await asyncpg.create_pool(
            asyncpg_dsn(settings.db_url.get_secret_value()), min_size=1, max_size=settings.db_pool_size
        )

    async def close_pool() -> None:
        await owners.close()
        if "main" in pools:
            await pools["main"].close()

    consumers = [
        StreamIngest(
            kind,
            pool,
            lambda: runtime.js,
            settings.consumer_name,
            settings.ingest_batch_size,
            settings.consumer_deliver_from,
        )
        for kind in ALL_KINDS
    ]

    async def ensure_consumers() -> None:
        for consumer in consumers:
            await consumer.ensure_consumer()

    async def partition_upkeep() -> None:
        while True:
            async with pool().acquire() as conn:
                created = await conn.fetchval("SELECT audit.ensure_audit_partitions(2)")
                created += await conn.fetchval("SELECT audit.ensure_api_partitions(3)")
            if created:
                log.info("created audit partitions", count=created)
            await asyncio.sleep(PARTITION_UPKEEP_SECONDS)

    # Schedules run first a few minutes after start, then every interval: a service restarted
    # more often than the interval would otherwise never run them. Both are idempotent.
    def first_delay(interval: float) -> float:
        return min(interval, FIRST_SCHEDULED_RUN_SECONDS)

    async def retention_schedule() -> None:
        await asyncio.sleep(first_delay(settings.retention_interval_seconds))
        while True:
            await operations.run_scheduled_retention(pool(), owners)
            await asyncio.sleep(settings.retention_interval_seconds)

    async def archive_schedule() -> None:
        await asyncio.sleep(first_delay(settings.archive_interval_seconds))
        while True:
            before = dt.datetime.now(dt.UTC) - dt.timedelta(days=settings.archive_after_days)
            await operations.archive_audit_logs(pool(), before)
            await asyncio.sleep(settings.archive_interval_seconds)

    def register(server: grpc.aio.Server) -> None:
        audit_pb2_grpc.add_AuditServiceServicer_to_server(AuditServicer(pool, owners), server)

    app.startup += [open_pool, ensure_consumers]
    app.background += [consumer.run for consumer in consumers]
    app.background.append(partition_upkeep)
    if settings.retention_interval_seconds > 0:
        app.background.append(retention_schedule)
    if settings.archive_interval_seconds > 0:
        app.background.append(archive_schedule)
    app.shutdown.insert(0, close_pool)
    app.registrars.append(register)
    return app
