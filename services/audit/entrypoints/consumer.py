"""The audit ingest loops: durable pull consumers on CRM_EVENTS that write events in batches
and acknowledge them only after the batch has committed.

Three consumers, one per kind of event (changes `crm.events.>`, sign-ins `crm.auth.>`, gateway
calls `crm.api.>`), rather than one consumer over all subjects: each kind has its own message
type and table, and a flood of API calls (the highest-volume kind) must never hold back the
change log behind it. Each keeps its own durable position and redelivery.

Redelivery is harmless (inserts are idempotent on the event id); an event that can never be
stored is copied to the dead-letter subject and terminated, so it does not block the stream. A
batch the database refuses for a data error is retried one event at a time, so only the bad
event is dead-lettered.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import asyncpg
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.audit.adapters.store import (
    UndecodableEvent,
    decode_api_call,
    decode_auth,
    decode_change,
    write_api_calls,
    write_auth_events,
    write_changes,
)
from shared.events import STREAM_NAME
from shared.logging import get_logger
from shared.observability import AUDIT_CONSUMER_PENDING, AUDIT_INGESTED, server_span

LAG_SAMPLE_SECONDS = 5.0

log = get_logger(__name__)

CHANGE_SUBJECTS = "crm.events.>"
AUTH_SUBJECTS = "crm.auth.>"
API_SUBJECTS = "crm.api.>"
DEAD_LETTER_SUBJECT = "crm.deadletter.audit"

Row = TypeVar("Row")

# Errors that mean "this data can never be stored" rather than "the database is away".
_DATA_ERRORS = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)


@dataclass(frozen=True)
class EventKind(Generic[Row]):
    """How one kind of event is consumed: its subjects, durable suffix, decoder and writer."""

    name: str
    subjects: str
    durable_suffix: str
    decode: Callable[[bytes], Row]
    write: Callable[[asyncpg.Pool, Sequence[Row]], Awaitable[int]]


CHANGES: EventKind[Any] = EventKind("changes", CHANGE_SUBJECTS, "", decode_change, write_changes)
AUTH: EventKind[Any] = EventKind("auth", AUTH_SUBJECTS, "-auth", decode_auth, write_auth_events)
API: EventKind[Any] = EventKind("api", API_SUBJECTS, "-api", decode_api_call, write_api_calls)
ALL_KINDS = (CHANGES, AUTH, API)


# The trace context headers (W3C), the only ones a span needs from an event.
TRACE_HEADERS = ("traceparent", "tracestate", "baggage")


def _trace_contexts(messages: Sequence[Msg]) -> list[dict[str, str]]:
    """The distinct trace contexts the messages carry."""
    found: dict[tuple[str, ...], dict[str, str]] = {}
    for message in messages:
        headers = message.headers or {}
        carrier = {name: headers[name] for name in TRACE_HEADERS if name in headers}
        found.setdefault(tuple(carrier.get(name, "") for name in TRACE_HEADERS), carrier)
    return list(found.values())


class StreamIngest(Generic[Row]):
    def __init__(
        self,
        kind: EventKind[Row],
        pool: Callable[[], asyncpg.Pool],
        jetstream: Callable[[], JetStreamContext],
        durable: str,
        batch_size: int,
        deliver_from: str = "all",
    ) -> None:
        self.kind = kind
        self._pool = pool
        self._jetstream = jetstream
        self.durable = durable + kind.durable_suffix
        self._batch_size = batch_size
        self._deliver = DeliverPolicy.NEW if deliver_from == "new" else DeliverPolicy.ALL
        self.ingested_total = 0

    def _config(self) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=self.durable,
            filter_subject=self.kind.subjects,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=self._deliver,
            ack_wait=30,
            max_deliver=-1,
            max_ack_pending=10_000,
        )

    async def ensure_consumer(self) -> None:
        """Creates the durable consumer at start-up, before the service reports SERVING: from
        then on every event is kept for it, whether or not the loop is running. (Where it
        starts matters only the first time; afterwards the durable keeps its position.)"""
        js = self._jetstream()
        try:
            await js.consumer_info(STREAM_NAME, self.durable)
        except nats.js.errors.NotFoundError:
            await js.add_consumer(STREAM_NAME, self._config())

    async def run(self) -> None:
        js = self._jetstream()
        subscription = await js.pull_subscribe(
            self.kind.subjects, durable=self.durable, stream=STREAM_NAME, config=self._config()
        )
        lag_sampled = 0.0
        # The next batch is fetched while this one is written (its acknowledgement wait starts at
        # delivery, and a batch takes far less than ack_wait).
        fetching: asyncio.Task[list[Msg]] | None = None
        try:
            while True:
                if self.kind is CHANGES and time.monotonic() - lag_sampled > LAG_SAMPLE_SECONDS:
                    lag_sampled = time.monotonic()
                    try:
                        AUDIT_CONSUMER_PENDING.set((await subscription.consumer_info()).num_pending or 0)
                    except Exception as exc:  # a metric must never stop ingest
                        log.debug("could not sample consumer lag", error=str(exc))
                if fetching is None:
                    fetching = asyncio.create_task(subscription.fetch(self._batch_size, timeout=1.0))
                try:
                    messages = await fetching
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                except (nats.errors.ConnectionClosedError, nats.errors.NoServersError) as exc:
                    log.warning("audit consumer lost NATS; retrying", kind=self.kind.name, error=str(exc))
                    await asyncio.sleep(0.5)
                    continue
                finally:
                    fetching = None
                fetching = asyncio.create_task(subscription.fetch(self._batch_size, timeout=1.0))
                await self.handle(js, messages)
        finally:
            if fetching is not None:
                fetching.cancel()

    async def _dead_letter(self, js: JetStreamContext, message: Msg, reason: str) -> None:
        log.error(
            "dead-lettering an event the audit log cannot store",
            kind=self.kind.name,
            subject=message.subject,
            reason=reason,
        )
        await js.publish(
            DEAD_LETTER_SUBJECT,
            message.data,
            headers={"Crm-Dead-Letter-Reason": reason[:500], "Crm-Original-Subject": message.subject},
        )
        await message.term()

    async def handle(self, js: JetStreamContext, messages: list[Msg]) -> None:
        rows: list[Row] = []
        good: list[Msg] = []
        for message in messages:
            try:
                rows.append(self.kind.decode(message.data))
                good.append(message)
            except UndecodableEvent as exc:
                await self._dead_letter(js, message, str(exc))
            except Exception as exc:  # decoding is pure: anything it raises means a bad payload
                await self._dead_letter(js, message, f"undecodable: {type(exc).__name__}")
        if not rows:
            return
        try:
            await self.kind.write(self._pool(), rows)
        except _DATA_ERRORS as exc:
            log.warning("audit batch refused; writing one by one", kind=self.kind.name, error=str(exc))
            await self._write_one_by_one(js, rows, good)
            return
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # Transient: the messages come back after a short delay and the write is retried.
            log.warning(
                "audit batch failed; will be redelivered", kind=self.kind.name, error=str(exc), size=len(rows)
            )
            for message in good:
                await message.nak(delay=1.0)
            return
        # The events' headers carry the writers' trace contexts: the ingest joins each trace once
        # per batch (an import's thousands of events share one).
        for carrier in _trace_contexts(good):
            with server_span(f"audit ingest {self.kind.name}", carrier) as span:
                span.set_attribute("messaging.batch.message_count", len(good))
        for message in good:
            await message.ack()
        self.ingested_total += len(rows)
        AUDIT_INGESTED.inc(len(rows))

    async def _write_one_by_one(self, js: JetStreamContext, rows: list[Row], messages: list[Msg]) -> None:
        for row, message in zip(rows, messages, strict=True):
            try:
                await self.kind.write(self._pool(), [row])
            except _DATA_ERRORS as exc:
                await self._dead_letter(js, message, f"refused by the database: {exc}")
                continue
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                await message.nak(delay=1.0)
                continue
            await message.ack()
            self.ingested_total += 1
