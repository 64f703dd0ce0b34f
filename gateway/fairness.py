"""Per-tenant limits on calls in flight. The rate limiter bounds how many calls a tenant may
start per second; this bounds how many of them the backends work on at once. A tenant flooding
within its rate would otherwise fill every queue behind the gateway (the backends' event loops,
their connection pools, PostgreSQL), and a neighbour's call would wait behind all of it. Calls
over the limit wait here, in arrival order, costing nothing but a waiting coroutine; the
client's deadline still applies to the wait."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class _Slots:
    __slots__ = ("semaphore", "users")

    def __init__(self, limit: int) -> None:
        self.semaphore = asyncio.Semaphore(limit)
        self.users = 0  # calls holding or waiting for a slot


class TenantConcurrency:
    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the per-tenant concurrency limit must be at least 1")
        self._limit = limit
        self._tenants: dict[str, _Slots] = {}

    @asynccontextmanager
    async def slot(self, tenant_id: str) -> AsyncIterator[None]:
        slots = self._tenants.get(tenant_id)
        if slots is None:
            slots = self._tenants[tenant_id] = _Slots(self._limit)
        slots.users += 1
        try:
            async with slots.semaphore:
                yield
        finally:
            slots.users -= 1
            # An idle tenant's entry goes, so the map holds only tenants with calls.
            if slots.users == 0:
                del self._tenants[tenant_id]

    def in_flight(self, tenant_id: str) -> int:
        """Calls of the tenant in the backends or waiting for a slot."""
        slots = self._tenants.get(tenant_id)
        return slots.users if slots is not None else 0
