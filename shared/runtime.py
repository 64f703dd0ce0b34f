"""The resources every database-owning service holds (engine, NATS, outbox relay) and their
start-up and shutdown order, so each service's bootstrap only adds what is its own."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from shared import events
from shared.config import DatabaseSettings
from shared.db import assert_safe_app_role, create_engine, role_of, session_factory
from shared.grpc_server import ServiceApp
from shared.migrations import upgrade
from shared.observability import OUTBOX_DEPTH, OUTBOX_OLDEST_SECONDS, pool_usage
from shared.outbox import OutboxRelay

SAMPLE_SECONDS = 5.0


@dataclass
class DatabaseRuntime:
    service: str
    schemas: list[str]
    migrations: Path
    settings: DatabaseSettings
    engine: AsyncEngine | None = None
    sessions: async_sessionmaker[AsyncSession] | None = None
    nats: NatsClient | None = None
    relay: OutboxRelay | None = None
    _js: JetStreamContext | None = field(default=None, repr=False)

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None, "NATS is not connected yet"
        return self._js

    def session_maker(self) -> async_sessionmaker[AsyncSession]:
        assert self.sessions is not None, "the database is not connected yet"
        return self.sessions

    async def start(self) -> None:
        db_url = self.settings.db_url.get_secret_value()
        if self.settings.migrate_on_start:
            await upgrade(
                self.migrations,
                self.settings.db_owner_url.get_secret_value(),
                self.schemas[0],
                role_of(db_url),
            )
        await assert_safe_app_role(db_url, self.schemas)
        self.engine = create_engine(db_url, self.settings.db_pool_size)
        self.sessions = session_factory(self.engine)
        self.nats = await events.connect(self.settings.nats_url, name=f"crm-{self.service}")
        self._js = self.nats.jetstream()
        await events.ensure_stream(self._js, self.settings.nats_stream_replicas)
        self.relay = OutboxRelay(
            db_url, self.schemas[0], lambda: self.js, poll_seconds=self.settings.outbox_poll_seconds
        )

    async def run_relay(self) -> None:
        assert self.relay is not None
        await self.relay.run()

    async def sample_metrics(self) -> None:
        """Outbox depth and age and pool usage, sampled for Prometheus."""
        assert self.engine is not None
        while True:
            async with self.engine.connect() as conn:
                depth, oldest = (
                    await conn.execute(
                        text(
                            f"SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0) "
                            f"FROM {self.schemas[0]}.outbox"
                        )
                    )
                ).one()
            OUTBOX_DEPTH.labels(self.service).set(depth)
            OUTBOX_OLDEST_SECONDS.labels(self.service).set(float(oldest))
            pool_usage(self.service, self.engine.pool)
            await asyncio.sleep(SAMPLE_SECONDS)

    async def stop(self) -> None:
        if self.nats is not None and self.nats.is_connected:
            await self.nats.drain()
        if self.engine is not None:
            await self.engine.dispose()

    def attach(self, app: ServiceApp) -> None:
        app.startup.insert(0, self.start)
        app.background.append(self.run_relay)
        if self.settings.metrics_port:
            app.background.append(self.sample_metrics)
        app.shutdown.append(self.stop)
