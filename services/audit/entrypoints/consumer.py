"""The audit ingest loop: a durable pull consumer on CRM_EVENTS that writes change events in
batches and acknowledges them only after the batch has committed.

Redelivery is harmless (the insert is idempotent on the event id); an event that can never be
stored is copied to the dead-letter subject and terminated, so it does not block the stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncpg
import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.audit.adapters.store import UndecodableEvent, audit_row, write_batch
from shared.events import STREAM_NAME
from shared.logging import get_logger

log = get_logger(__name__)

CHANGE_SUBJECTS = "crm.events.>"
DEAD_LETTER_SUBJECT = "crm.deadletter.audit"


class AuditIngest:
    def __init__(
        self,
        pool: Callable[[], asyncpg.Pool],
        jetstream: Callable[[], JetStreamContext],
        durable: str,
        batch_size: int,
    ) -> None:
        self._pool = pool
        self._jetstream = jetstream
        self._durable = durable
        self._batch_size = batch_size
        self.ingested_total = 0

    async def run(self) -> None:
        js = self._jetstream()
        subscription = await js.pull_subscribe(
            CHANGE_SUBJECTS,
            durable=self._durable,
            stream=STREAM_NAME,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=30,
                max_deliver=-1,
                max_ack_pending=10_000,
            ),
        )
        while True:
            try:
                messages = await subscription.fetch(self._batch_size, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except (nats.errors.ConnectionClosedError, nats.errors.NoServersError) as exc:
                log.warning("audit consumer lost NATS; retrying", error=str(exc))
                await asyncio.sleep(0.5)
                continue
            await self._handle(js, messages)

    async def _handle(self, js: JetStreamContext, messages: list[Msg]) -> None:
        rows, good, poison = [], [], []
        for message in messages:
            try:
                rows.append(audit_row(message.data))
                good.append(message)
            except UndecodableEvent as exc:
                poison.append((message, str(exc)))
        for message, reason in poison:
            log.error(
                "dead-lettering an event the audit log cannot store", subject=message.subject, reason=reason
            )
            await js.publish(
                DEAD_LETTER_SUBJECT,
                message.data,
                headers={"Crm-Dead-Letter-Reason": reason, "Crm-Original-Subject": message.subject},
            )
            await message.term()
        if not rows:
            return
        try:
            await write_batch(self._pool(), rows)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # Transient: the messages come back after a short delay and the write is retried.
            log.warning("audit batch failed; will be redelivered", error=str(exc), size=len(rows))
            for message in good:
                await message.nak(delay=1.0)
            return
        for message in good:
            await message.ack()
        self.ingested_total += len(rows)
