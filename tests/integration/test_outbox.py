"""The outbox relay against real PostgreSQL and NATS: only committed events go out, none is
skipped when transactions commit out of order, and a re-publish after a crash is de-duplicated."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import nats
import nats.js.errors
import pytest
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from sqlalchemy import text

from crm.v1 import events_pb2
from shared import events
from shared.db import UnitOfWork, asyncpg_dsn, create_engine, schema_setup_statements, session_factory
from shared.outbox import OutboxRelay, add_to_outbox, outbox_ddl, outbox_headers_ddl
from shared.provisioning import Roles, drop_database, dsn_for, ensure_database, ensure_roles
from tests.backends import Backends

pytestmark = pytest.mark.integration


class Scratch:
    def __init__(self, owner_dsn: str, app_dsn: str, schema: str) -> None:
        self.owner_dsn, self.app_dsn, self.schema = owner_dsn, app_dsn, schema


@pytest.fixture
async def scratch(backends: Backends) -> AsyncIterator[Scratch]:
    prefix = "crmt" + secrets.token_hex(4)
    roles = Roles(f"{prefix}_owner", "owner-pw", f"{prefix}_app", "app-pw")
    database = f"{prefix}_outbox"
    await ensure_roles(backends.database_url, roles)
    await ensure_database(backends.database_url, database, roles)
    owner = dsn_for(backends.database_url, database, roles.owner, roles.owner_password)
    conn = await asyncpg.connect(asyncpg_dsn(owner))
    try:
        for statement in [
            *schema_setup_statements("scratch", roles.app),
            *outbox_ddl("scratch"),
            *outbox_headers_ddl("scratch"),
        ]:
            await conn.execute(statement)
    finally:
        await conn.close()
    yield Scratch(owner, dsn_for(backends.database_url, database, roles.app, roles.app_password), "scratch")
    await drop_database(backends.database_url, database)


async def published_ids(nats_url: str, subject: str, expected: int, timeout: float = 10) -> list[str]:
    client = await nats.connect(nats_url)
    try:
        js = client.jetstream()
        sub = await js.pull_subscribe(
            subject,
            stream=events.STREAM_NAME,
            config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL),
        )
        ids: list[str] = []
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            try:
                for message in await sub.fetch(100, timeout=0.5):
                    ids.append(events_pb2.ChangeEvent.FromString(message.data).event_id)
            except TimeoutError:  # nats' own, or asyncio's when the deadline runs out mid-fetch
                if len(ids) >= expected:
                    break
        await sub.unsubscribe()
        return ids
    finally:
        await client.close()


def event(tenant: str) -> events_pb2.ChangeEvent:
    return events_pb2.ChangeEvent(
        event_id=str(uuid.uuid4()), tenant_id=tenant, service="test", table_name="things"
    )


async def test_only_committed_events_are_published_and_none_is_skipped(
    backends: Backends, scratch: Scratch
) -> None:
    client = await events.connect(backends.nats_url, "test")
    js = client.jetstream()
    await events.ensure_stream(js)
    tenant = str(uuid.uuid4())
    subject = events.change_subject(tenant, "test", "things", "INSERT")
    engine = create_engine(scratch.app_dsn)
    sessions = session_factory(engine)
    committed: list[str] = []
    try:
        # Rolled back: must never be published.
        async with UnitOfWork(sessions, None) as uow:
            await add_to_outbox(uow.session, "scratch", subject, (rolled := event(tenant)).event_id, rolled)
        # Out of order: the first transaction to insert commits last.
        early = UnitOfWork(sessions, None)
        await early.__aenter__()
        first = event(tenant)
        await add_to_outbox(early.session, "scratch", subject, first.event_id, first)
        for _ in range(5):
            async with UnitOfWork(sessions, None) as uow:
                later = event(tenant)
                await add_to_outbox(uow.session, "scratch", subject, later.event_id, later)
                await uow.commit()
                committed.append(later.event_id)

        relay = OutboxRelay(scratch.app_dsn, "scratch", lambda: js, poll_seconds=0.1)
        task = asyncio.create_task(relay.run())
        await asyncio.sleep(0.5)
        await early.commit()
        await early.__aexit__(None, None, None)
        committed.append(first.event_id)

        ids = await published_ids(backends.nats_url, subject, len(committed))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert sorted(ids) == sorted(committed)
        assert rolled.event_id not in ids
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT count(*) FROM scratch.outbox"))).scalar() == 0
    finally:
        await engine.dispose()
        await client.close()


async def test_republish_after_a_crash_is_deduplicated(backends: Backends, scratch: Scratch) -> None:
    client = await events.connect(backends.nats_url, "test")
    js = client.jetstream()
    await events.ensure_stream(js)
    tenant = str(uuid.uuid4())
    subject = events.change_subject(tenant, "test", "things", "UPDATE")
    engine = create_engine(scratch.app_dsn)
    try:
        async with UnitOfWork(session_factory(engine), None) as uow:
            crashed = event(tenant)
            await add_to_outbox(uow.session, "scratch", subject, crashed.event_id, crashed)
            await uow.commit()
        # A relay that published but died before deleting its rows:
        await js.publish(subject, crashed.SerializeToString(), headers={"Nats-Msg-Id": crashed.event_id})
        relay = OutboxRelay(scratch.app_dsn, "scratch", lambda: js)
        conn = await asyncpg.connect(asyncpg_dsn(scratch.app_dsn))
        try:
            assert await relay.relay_once(conn) == 1
        finally:
            await conn.close()
        assert await published_ids(backends.nats_url, subject, 1) == [crashed.event_id]
    finally:
        await engine.dispose()
        await client.close()


class HalfDownJetStream:
    """JetStream that refuses every other message (as when the stream hits a limit mid-batch),
    and stores the rest through the real one."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self._calls = 0
        self.refused: list[str] = []

    async def publish_async(
        self, subject: str, payload: bytes, headers: dict[str, str]
    ) -> asyncio.Future[Any]:
        self._calls += 1
        if self._calls % 2:
            return await self._js.publish_async(subject, payload, headers=headers)
        self.refused.append(headers["Nats-Msg-Id"])
        refused: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        refused.set_exception(nats.js.errors.APIError(description="maximum messages exceeded"))
        return refused


async def test_a_partly_refused_batch_removes_what_was_stored_and_retries_the_rest(
    backends: Backends, scratch: Scratch
) -> None:
    client = await events.connect(backends.nats_url, "test")
    js = client.jetstream()
    await events.ensure_stream(js)
    tenant = str(uuid.uuid4())
    subject = events.change_subject(tenant, "test", "things", "INSERT")
    engine = create_engine(scratch.app_dsn)
    written: list[str] = []
    try:
        async with UnitOfWork(session_factory(engine), None) as uow:
            for _ in range(20):
                added = event(tenant)
                await add_to_outbox(uow.session, "scratch", subject, added.event_id, added)
                written.append(added.event_id)
            await uow.commit()
        flaky = HalfDownJetStream(js)
        conn = await asyncpg.connect(asyncpg_dsn(scratch.app_dsn))
        try:
            with pytest.raises(nats.js.errors.APIError):
                await OutboxRelay(scratch.app_dsn, "scratch", lambda: flaky).relay_once(conn)  # type: ignore[arg-type]
            left = {str(r["id"]) for r in await conn.fetch("SELECT id FROM scratch.outbox")}
            assert left == set(flaky.refused) and len(left) == 10
            # The next round publishes the rest; nothing is published twice.
            assert await OutboxRelay(scratch.app_dsn, "scratch", lambda: js).relay_once(conn) == len(left)
            assert await conn.fetchval("SELECT count(*) FROM scratch.outbox") == 0
        finally:
            await conn.close()
        ids = await published_ids(backends.nats_url, subject, len(written))
        assert sorted(ids) == sorted(written)
    finally:
        await engine.dispose()
        await client.close()
