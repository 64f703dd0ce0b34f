"""API audit off the request path: each call's record goes into a bounded in-memory queue and a
background task publishes them to JetStream (`crm.api.<tenant_id>`) in batches.

The gateway has no database, so this is not an outbox: if NATS stays down longer than the queue
lasts, the oldest records are dropped and counted (`dropped_total`, logged) rather than slowing
or failing client calls. Change events, which must never be lost, go through the services' outboxes.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import Callable

from nats.js import JetStreamContext

from crm.v1 import events_pb2
from shared.events import timestamp_now
from shared.logging import get_logger

log = get_logger(__name__)

PLATFORM_SUBJECT_TOKEN = "platform"


class ApiAuditPublisher:
    def __init__(
        self, jetstream: Callable[[], JetStreamContext | None], capacity: int = 50_000, batch_size: int = 200
    ) -> None:
        self._jetstream = jetstream
        self._queue: deque[events_pb2.ApiCallEvent] = deque(maxlen=capacity)
        self._capacity = capacity
        self._batch_size = batch_size
        self._wake = asyncio.Event()
        self.dropped_total = 0
        self.published_total = 0

    def record(self, event: events_pb2.ApiCallEvent) -> None:
        if len(self._queue) == self._capacity:
            self.dropped_total += 1
        if not event.event_id:
            event.event_id = str(uuid.uuid4())
        if not event.HasField("occur_time"):
            event.occur_time.CopyFrom(timestamp_now())
        self._queue.append(event)
        if len(self._queue) >= self._batch_size:
            self._wake.set()

    @property
    def backlog(self) -> int:
        return len(self._queue)

    async def run(self, interval: float = 0.25) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), interval)
            except TimeoutError:
                pass
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        js = self._jetstream()
        while self._queue and js is not None:
            batch = [self._queue.popleft() for _ in range(min(self._batch_size, len(self._queue)))]
            try:
                await asyncio.gather(
                    *(
                        js.publish(
                            f"crm.api.{event.tenant_id or PLATFORM_SUBJECT_TOKEN}",
                            event.SerializeToString(),
                            headers={"Nats-Msg-Id": event.event_id},
                            timeout=5,
                        )
                        for event in batch
                    )
                )
                self.published_total += len(batch)
            except Exception as exc:  # broker down: put the batch back and try later
                self._queue.extendleft(reversed(batch))
                log.warning("api audit publish failed; will retry", error=str(exc), backlog=len(self._queue))
                return
