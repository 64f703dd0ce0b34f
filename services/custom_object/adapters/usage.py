"""Field usage statistics (the seed's usage_count / last_used), counted in memory and flushed
in batches, so a record read never costs a write to the definitions table."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections import defaultdict
from collections.abc import Iterable

from sqlalchemy import bindparam, func, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.custom_object.adapters.tables import custom_fields
from shared.db import UnitOfWork
from shared.logging import get_logger

log = get_logger(__name__)


class UsageTracker:
    """Counts field uses per tenant; `flush` adds the counts to custom_fields and forgets them."""

    def __init__(self) -> None:
        self._counts: dict[str, dict[uuid.UUID, int]] = defaultdict(lambda: defaultdict(int))
        self._last_used: dict[uuid.UUID, dt.datetime] = {}

    def record(self, tenant_id: str, field_ids: Iterable[uuid.UUID]) -> None:
        now = dt.datetime.now(dt.UTC)
        counts = self._counts[tenant_id]
        for field_id in field_ids:
            counts[field_id] += 1
            self._last_used[field_id] = now

    def pending(self, tenant_id: str, field_id: uuid.UUID) -> int:
        """Uses counted but not flushed yet (so a listing can show an up-to-date count)."""
        return self._counts.get(tenant_id, {}).get(field_id, 0)

    def last_used(self, field_id: uuid.UUID) -> dt.datetime | None:
        return self._last_used.get(field_id)

    async def flush(self, sessions: async_sessionmaker[AsyncSession]) -> int:
        batch, self._counts = self._counts, defaultdict(lambda: defaultdict(int))
        last_used, self._last_used = self._last_used, {}
        flushed = 0
        statement = (
            update(custom_fields)
            .where(custom_fields.c.id == bindparam("field_id"))
            .values(
                usage_count=custom_fields.c.usage_count + bindparam("uses"),
                last_used_at=func.greatest(
                    func.coalesce(custom_fields.c.last_used_at, bindparam("used_at")), bindparam("used_at")
                ),
            )
        )
        for tenant_id, counts in batch.items():
            if not counts:
                continue
            rows = [
                {
                    "field_id": field_id,
                    "uses": uses,
                    "used_at": last_used.get(field_id, dt.datetime.now(dt.UTC)),
                }
                for field_id, uses in counts.items()
            ]
            try:
                async with UnitOfWork(sessions, tenant_id) as uow:
                    # Statistics, not definition changes: no version bump and no change event.
                    await uow.session.execute(statement, rows)
                    await uow.commit()
                flushed += len(rows)
            except Exception as exc:  # a lost batch of statistics is not worth failing for
                log.warning("field usage flush failed", tenant_id=tenant_id, error=str(exc))
        return flushed

    async def run(self, sessions: async_sessionmaker[AsyncSession], interval: float = 5.0) -> None:
        try:
            while True:
                await asyncio.sleep(interval)
                await self.flush(sessions)
        finally:
            await self.flush(sessions)
