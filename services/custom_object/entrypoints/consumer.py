"""Follows deletions in the core-entity service: when an account, contact, lead, deal or
activity is deleted, custom records that depend on it follow the relationship rules (master-
detail children and cascading lookups are deleted, other lookups become empty, many-to-many
links are removed), exactly as when a custom record is deleted here.

A durable pull consumer per shard on `crm.events.*.core_entity.*.DELETE`: the same shard's
core-entity service publishes its tenants' deletions, another shard's tenants find no rows here
and are acknowledged. Acknowledged after the commit; transient failures are retried with a
delay; an event that cannot be decoded is dropped with a log line (nothing here depends on it).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from crm.v1 import events_pb2
from services.custom_object.service_layer.records import RecordUseCases
from shared import context as callctx
from shared.errors import CrmError, Unavailable
from shared.events import STREAM_NAME
from shared.logging import get_logger
from shared.shard_guard import TenantNotServed

log = get_logger(__name__)

SUBJECT = "crm.events.*.core_entity.*.DELETE"
#: Core tables whose records custom fields may reference, by the object type they hold.
CORE_TABLES = {
    "accounts": "account",
    "contacts": "contact",
    "leads": "lead",
    "deals": "deal",
    "activities": "activity",
}


class CoreDeletionConsumer:
    def __init__(
        self,
        records: Callable[[], RecordUseCases],
        jetstream: Callable[[], JetStreamContext],
        durable: str,
        batch_size: int = 64,
    ) -> None:
        self._records = records
        self._jetstream = jetstream
        self._durable = durable
        self._batch_size = batch_size
        self.handled_total = 0

    async def run(self) -> None:
        subscription = await self._jetstream().pull_subscribe(
            SUBJECT,
            durable=self._durable,
            stream=STREAM_NAME,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                # Created with the service, before any custom record can depend on a core one.
                deliver_policy=DeliverPolicy.NEW,
                ack_wait=60,
                max_deliver=50,
                # A consumer nobody pulls from for as long as the stream keeps events goes away
                # (its shard database was retired); a live service recreates it on start.
                inactive_threshold=7 * 24 * 3600,
            ),
        )
        try:
            while True:
                try:
                    messages = await subscription.fetch(self._batch_size, timeout=1.0)
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                except (nats.errors.ConnectionClosedError, nats.errors.NoServersError) as exc:
                    log.warning("core deletion consumer lost NATS; retrying", error=str(exc))
                    await asyncio.sleep(0.5)
                    continue
                for message in messages:
                    await self.handle(message)
        finally:
            # Without this, draining the connection at shutdown waits for the pending pull.
            try:
                await subscription.unsubscribe()
            except Exception as exc:  # the connection may be gone already
                log.debug("unsubscribe failed", error=str(exc))

    async def handle(self, message: Msg) -> None:
        try:
            event = events_pb2.ChangeEvent.FromString(message.data)
            record_id = uuid.UUID(event.record_id)
            uuid.UUID(event.tenant_id)
        except Exception as exc:  # undecodable: nothing here can act on it
            log.error("dropping an undecodable core deletion event", subject=message.subject, error=str(exc))
            await message.term()
            return
        object_type = CORE_TABLES.get(event.table_name)
        if object_type is None:
            await message.ack()
            return
        token = callctx.set_call(
            callctx.CallContext(
                request_id=event.request_id or event.event_id,
                method="custom_object:core_record_deleted",
                tenant_id=event.tenant_id,
                user_id=event.actor.user_id or None,
            )
        )
        try:
            outcome = await self._records().core_record_deleted(object_type, record_id)
        except TenantNotServed as exc:
            if exc.reason == "TENANT_WRITE_BLOCKED":
                await message.nak(delay=2.0)  # a move is under way; its target shard takes over
            else:
                await message.ack()  # another shard's tenant
            return
        except (Unavailable, OSError) as exc:
            log.warning("core deletion not applied yet; will retry", error=str(exc))
            await message.nak(delay=2.0)
            return
        except CrmError as exc:
            log.error("core deletion cannot be applied", record_id=str(record_id), error=exc.message)
            await message.term()
            return
        except Exception as exc:
            log.warning("core deletion failed; will retry", error=str(exc), exc_info=exc)
            await message.nak(delay=2.0)
            return
        finally:
            callctx.reset_call(token)
        await message.ack()
        self.handled_total += 1
        if outcome.cascaded or outcome.cleared:
            log.info(
                "followed a core deletion",
                object_type=object_type,
                record_id=str(record_id),
                deleted=len(outcome.cascaded),
                cleared=outcome.cleared,
            )
