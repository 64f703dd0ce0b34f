"""The shard guard in front of every transaction: refuses a tenant this shard does not serve
(or at a stale epoch, or whose writes a move has paused), through shared.shard_guard.

The membership table belongs to the tenant service, which creates it when it provisions the
shard; until it exists (a shard provisioned by an older tenant service) the guard stands aside
and looks again every few seconds."""

from __future__ import annotations

import time

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from shared.context import current_call
from shared.shard_guard import MEMBERSHIP_TABLE, check_membership

RECHECK_SECONDS = 10.0


class MembershipGuard:
    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled
        self._present = False
        self._checked_at = float("-inf")

    async def __call__(self, session: AsyncSession, tenant_id: str, is_write: bool) -> None:
        if not self._enabled:
            return
        if not self._present and time.monotonic() - self._checked_at > RECHECK_SECONDS:
            self._present = bool(
                await session.scalar(text("SELECT to_regclass(:t) IS NOT NULL"), {"t": MEMBERSHIP_TABLE})
            )
            self._checked_at = time.monotonic()
        if self._present:
            await check_membership(session, tenant_id, current_call().shard_epoch, is_write)
