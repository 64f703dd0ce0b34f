"""The transactional outbox: a change and its event commit together, and a relay publishes
committed events to JetStream afterwards, so a broker that is down delays audit but never loses it.

The relay claims unpublished rows with `FOR UPDATE SKIP LOCKED` (never "ids above the last one
seen": transactions commit out of id order and such a cursor skips events), publishes each with
`Nats-Msg-Id` = event id so JetStream drops a re-publish after a crash, and deletes the rows only
once the stream has acknowledged them.
"""

from __future__ import annotations

import asyncio
import functools
import json
import uuid
from collections.abc import Mapping
from typing import Any, Protocol

import asyncpg
from google.protobuf.message import Message
from nats.js import JetStreamContext
from sqlalchemy.ext.asyncio import AsyncSession

from shared.db import asyncpg_dsn, driver_connection, identifier
from shared.events import build_change_event, change_subject
from shared.logging import get_logger
from shared.observability import OUTBOX_PUBLISHED, inject_headers

log = get_logger(__name__)


def outbox_ddl(schema: str) -> list[str]:
    s = identifier(schema)
    return [
        f"""CREATE TABLE {s}.outbox (
            id uuid PRIMARY KEY,
            subject text NOT NULL,
            payload bytea NOT NULL,
            created_at timestamptz NOT NULL DEFAULT clock_timestamp()
        )""",
        f"CREATE INDEX ix_outbox_created_at ON {s}.outbox (created_at)",
    ]


def outbox_headers_ddl(schema: str) -> list[str]:
    """Event headers (the trace context) travel with the outbox row to the NATS message."""
    return [f"ALTER TABLE {identifier(schema)}.outbox ADD COLUMN IF NOT EXISTS headers jsonb"]


def notify_channel(schema: str) -> str:
    return f"{identifier(schema)}_outbox"


async def add_to_outbox(
    session: AsyncSession, schema: str, subject: str, event_id: str, event: Message
) -> None:
    """Adds an event to the caller's open transaction; it is published only if that commits.
    The current trace context goes with it, so the consumer's span joins the writer's trace.
    NOTIFY (delivered at commit) wakes the relay without polling latency; it rides in the same
    statement, on the driver, because every write of every service comes through here."""
    headers = inject_headers({})
    conn = await driver_connection(session)
    await conn.execute(
        _outbox_insert_sql(schema),
        uuid.UUID(event_id),
        subject,
        event.SerializeToString(),
        json.dumps(headers) if headers else None,
        notify_channel(schema),
    )


@functools.cache
def _outbox_insert_sql(schema: str) -> str:
    return (
        f"WITH added AS (INSERT INTO {identifier(schema)}.outbox (id, subject, payload, headers) "
        "VALUES ($1, $2, $3, $4::jsonb) RETURNING 1) SELECT pg_notify($5, '') FROM added"
    )


def _stored_headers(stored: str | None) -> dict[str, str]:
    if not stored:
        return {}
    decoded = json.loads(stored)
    return {str(k): str(v) for k, v in decoded.items()} if isinstance(decoded, dict) else {}


class JetStreamProvider(Protocol):
    def __call__(self) -> JetStreamContext: ...


class OutboxRelay:
    """Publishes committed outbox rows of one schema; safe to run in several processes at once."""

    def __init__(
        self,
        dsn: str,
        schema: str,
        jetstream: JetStreamProvider,
        *,
        batch_size: int = 1024,
        poll_seconds: float = 0.5,
        publish_timeout: float = 5.0,
    ) -> None:
        self._dsn = asyncpg_dsn(dsn)
        self._schema = identifier(schema)
        self._jetstream = jetstream
        self._batch_size = batch_size
        self._poll_seconds = poll_seconds
        self._publish_timeout = publish_timeout
        self._wake = asyncio.Event()
        self.published_total = 0

    async def run(self) -> None:
        backoff = 0.2
        while True:
            try:
                conn = await asyncpg.connect(self._dsn)
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("outbox relay cannot reach the database", schema=self._schema, error=str(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            try:
                await conn.add_listener(notify_channel(self._schema), self._on_notify)
                await self._loop(conn)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning(
                    "outbox relay lost the database; reconnecting", schema=self._schema, error=str(exc)
                )
                await asyncio.sleep(backoff)
            finally:
                await conn.close(timeout=2)

    def _on_notify(self, *_: object) -> None:
        self._wake.set()

    async def _loop(self, conn: asyncpg.Connection) -> None:
        backoff = 0.2
        while True:
            self._wake.clear()
            try:
                published = await self.relay_once(conn)
                backoff = 0.2
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                raise
            except Exception as exc:  # broker down or slow: rows stay, try again later
                log.warning("outbox publish failed; will retry", schema=self._schema, error=str(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if published >= self._batch_size:
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), self._poll_seconds)
            except TimeoutError:
                pass

    async def relay_once(self, conn: asyncpg.Connection) -> int:
        """Publishes one batch; returns how many rows it published and removed. Rows the stream
        acknowledged are removed even when others of the batch failed; the first failure is then
        raised, and the rest are published again later (the same Nats-Msg-Id: no duplicates)."""
        async with conn.transaction():
            rows = await conn.fetch(
                f"SELECT id, subject, payload, headers FROM {self._schema}.outbox "
                "ORDER BY created_at LIMIT $1 FOR UPDATE SKIP LOCKED",
                self._batch_size,
            )
            if not rows:
                return 0
            published, failure = await self._publish(rows)
            if published:
                await conn.execute(f"DELETE FROM {self._schema}.outbox WHERE id = ANY($1::uuid[])", published)
        if published:
            self.published_total += len(published)
            OUTBOX_PUBLISHED.labels(self._schema).inc(len(published))
        if failure is not None:
            raise failure
        return len(published)

    async def _publish(self, rows: list[asyncpg.Record]) -> tuple[list[uuid.UUID], BaseException | None]:
        """Sends every row without waiting for each acknowledgement (JetStream stores a batch
        in flight far faster than one message per round trip), then waits for all of them."""
        js = self._jetstream()
        # The rows of one writer's batch carry the same headers: decode each distinct text once.
        decoded: dict[str | None, dict[str, str]] = {}
        acks: list[asyncio.Future[Any]] = []
        try:
            for row in rows:
                stored = row["headers"]
                headers = decoded.get(stored)
                if headers is None:
                    headers = decoded[stored] = _stored_headers(stored)
                acks.append(
                    await js.publish_async(
                        row["subject"], row["payload"], headers={**headers, "Nats-Msg-Id": str(row["id"])}
                    )
                )
            _, waiting = await asyncio.wait(acks, timeout=self._publish_timeout)
        except BaseException:
            for ack in acks:
                ack.cancel()
            raise
        failure: BaseException | None = None
        if waiting:
            for ack in waiting:
                ack.cancel()
            failure = TimeoutError(
                f"{len(waiting)} of {len(acks)} events unacknowledged after {self._publish_timeout}s"
            )
        published = []
        for row, ack in zip(rows, acks, strict=True):
            if ack.cancelled():
                continue
            if (error := ack.exception()) is None:
                published.append(row["id"])
            elif failure is None:
                failure = error
        return published, failure


async def record_change(
    session: AsyncSession,
    *,
    schema: str,
    service: str,
    table: str,
    tenant_id: str,
    record_id: str,
    operation: str,
    old: Mapping[str, Any] | None,
    new: Mapping[str, Any] | None,
    version: int,
) -> str:
    """Adds the change event of one write to the same transaction; returns the event id."""
    event = build_change_event(
        tenant_id=tenant_id,
        service=service,
        table=table,
        record_id=record_id,
        operation=operation,
        old=old,
        new=new,
        version=version,
    )
    await add_to_outbox(
        session, schema, change_subject(tenant_id, service, table, operation), event.event_id, event
    )
    return event.event_id
