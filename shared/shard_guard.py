"""The shard side of tenant placement: a backend serves a tenant only while its shard's
membership table (`shard.tenants`, kept by the tenant service) says the tenant lives here, at the
epoch the gateway routed with, and refuses the tenant's writes while a move blocks them.

Call `check_membership` at the start of every transaction, after the tenant context is set (the
table has forced row-level security like every tenant table):

    async with UnitOfWork(sessions, tenant_id) as uow:
        await check_membership(uow.session, tenant_id, current_call().shard_epoch, is_write=True)

A write takes a share lock on the tenant's membership row until its transaction ends. The tenant
service blocks a tenant by updating that row, which waits for every write in flight to commit;
writes that start later see the block. So once the block is in place no write of that tenant
can still land on the source shard, and the final delta copy misses nothing.

Every refusal is `Unavailable` (retryable): the gateway refreshes the tenant's route and retries
once, which succeeds as soon as the move has flipped the directory.
"""

from __future__ import annotations

import time

from sqlalchemy.ext.asyncio import AsyncSession

from shared.context import current_call
from shared.db import driver_connection
from shared.errors import Unavailable

MEMBERSHIP_TABLE = "shard.tenants"

ACTIVE = "active"
BLOCKED = "blocked"
INCOMING = "incoming"
MOVED_OUT = "moved_out"

_READ_SQL = f"SELECT epoch, state FROM {MEMBERSHIP_TABLE} WHERE tenant_id = $1::uuid"
_WRITE_SQL = f"{_READ_SQL} FOR SHARE"


class TenantNotServed(Unavailable):
    """The tenant is not (or not yet, or no longer) served by this shard, or the route is stale."""

    reason = "TENANT_NOT_ON_SHARD"


def decide(row: tuple[int, str] | None, epoch: int | None, is_write: bool) -> None:
    """The rule on its own, so it can be tested without a database. `epoch` None means the
    caller is an internal service that routes by the directory itself (no epoch to compare)."""
    if row is None:
        raise TenantNotServed("this shard does not serve the tenant; refresh the route and retry")
    current_epoch, state = row
    if state in (INCOMING, MOVED_OUT):
        raise TenantNotServed(
            f"the tenant is {'arriving on' if state == INCOMING else 'leaving'} this shard; "
            "refresh the route and retry"
        )
    if epoch is not None and epoch != current_epoch:
        raise TenantNotServed(
            f"stale shard epoch {epoch} (current {current_epoch}); refresh the route and retry",
            reason="STALE_SHARD_EPOCH",
        )
    if is_write and state == BLOCKED:
        raise TenantNotServed(
            "the tenant's writes are paused while it moves shards; retry shortly",
            reason="TENANT_WRITE_BLOCKED",
        )


async def check_membership(session: AsyncSession, tenant_id: str, epoch: int | None, is_write: bool) -> None:
    """Raises `Unavailable` unless this shard serves `tenant_id` at `epoch` (and accepts its
    writes, for a write). Must run inside the caller's transaction, after the tenant is set."""
    # On the driver: this runs at the start of every transaction (see shared.db).
    conn = await driver_connection(session)
    found = await conn.fetchrow(_WRITE_SQL if is_write else _READ_SQL, tenant_id)
    decide((int(found[0]), str(found[1])) if found is not None else None, epoch, is_write)


RECHECK_SECONDS = 10.0


class MembershipGuard:
    """The guard in front of every transaction of a shard backend. The membership table belongs
    to the tenant service, which creates it when it provisions the shard; until it exists (a
    database provisioned without it) the guard stands aside and looks again every few seconds."""

    def __init__(self, enabled: bool = True) -> None:
        self._enabled = enabled
        self._present = False
        self._checked_at = float("-inf")

    async def __call__(self, session: AsyncSession, tenant_id: str, is_write: bool) -> None:
        if not self._enabled:
            return
        if not self._present and time.monotonic() - self._checked_at > RECHECK_SECONDS:
            conn = await driver_connection(session)
            self._present = bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", MEMBERSHIP_TABLE))
            self._checked_at = time.monotonic()
        if self._present:
            await check_membership(session, tenant_id, current_call().shard_epoch, is_write)
