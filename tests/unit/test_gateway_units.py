"""Gateway pieces without a network: token buckets, routing table, API audit queue."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest

from crm.v1 import events_pb2
from gateway.api_audit import ApiAuditPublisher
from gateway.fairness import TenantConcurrency
from gateway.proxy import Proxy, _Call
from gateway.ratelimit import RateLimiter
from gateway.routing import Access, Backend, build_routes

pytestmark = pytest.mark.unit


def test_buckets_are_per_tenant_and_refill() -> None:
    limiter = RateLimiter({"basic": (10.0, 5.0)})
    assert [limiter.try_acquire("a", "basic") for _ in range(5)] == [0.0] * 5
    wait = limiter.try_acquire("a", "basic")
    assert 0 < wait <= 0.1
    assert limiter.try_acquire("b", "basic") == 0.0  # another tenant is untouched
    time.sleep(0.12)
    assert limiter.try_acquire("a", "basic") == 0.0


def test_unknown_plans_get_the_basic_limit_and_settings_override() -> None:
    limiter = RateLimiter.from_setting('{"enterprise": [1, 1]}')
    assert limiter.try_acquire("t", "enterprise") == 0.0
    assert limiter.try_acquire("t", "enterprise") > 0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_tenant_over_its_concurrency_waits_in_order_while_others_pass() -> None:
    clock = Clock()
    slots = TenantConcurrency(2, alone_limit=3, clock=clock)
    release = asyncio.Event()
    entered: list[str] = []

    async def call(tenant: str, name: str) -> None:
        async with slots.slot(tenant):
            entered.append(name)
            await release.wait()

    async with slots.slot("b"):  # the neighbour called a moment ago: the backends are shared
        pass
    flood = [asyncio.create_task(call("a", f"a{i}")) for i in range(5)]
    await asyncio.sleep(0.01)
    assert entered == ["a0", "a1"]
    assert slots.in_flight("a") == 5  # two in the backends, three waiting
    neighbour = asyncio.create_task(call("b", "b0"))
    await asyncio.sleep(0.01)
    assert entered[-1] == "b0"  # not queued behind the flood
    release.set()
    await asyncio.gather(*flood, neighbour)
    assert [name for name in entered if name.startswith("a")] == ["a0", "a1", "a2", "a3", "a4"]
    assert slots.in_flight("a") == slots.in_flight("b") == 0


async def test_a_tenant_alone_gets_the_larger_limit_until_a_neighbour_calls() -> None:
    clock = Clock()
    slots = TenantConcurrency(2, alone_limit=4, window=1.0, clock=clock)
    assert slots.limit_for("a") == 4
    async with slots.slot("b"):
        assert slots.limit_for("a") == 2  # b is in the backends
    assert slots.limit_for("a") == 2  # and called within the window
    assert slots.limit_for("b") == 4  # b alone, as far as b is concerned
    clock.now += 1.5
    assert slots.limit_for("a") == 4  # b has gone quiet


async def test_a_cancelled_wait_gives_up_its_place_and_leaves_nothing_behind() -> None:
    slots = TenantConcurrency(1, alone_limit=1)
    release = asyncio.Event()

    async def call() -> None:
        async with slots.slot("a"):
            await release.wait()

    holder = asyncio.create_task(call())
    await asyncio.sleep(0.01)
    waiter = asyncio.create_task(call())  # a client whose deadline passes while it waits
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert slots.in_flight("a") == 1
    release.set()
    await holder
    assert slots.in_flight("a") == 0
    async with slots.slot("a"):  # the slot came back
        pass


async def test_a_slot_handed_over_as_the_wait_is_cancelled_passes_to_the_next() -> None:
    slots = TenantConcurrency(1, alone_limit=1)
    release = asyncio.Event()
    finished: list[str] = []

    async def call(name: str) -> None:
        async with slots.slot("a"):
            await release.wait()
            finished.append(name)

    holder = asyncio.create_task(call("holder"))
    await asyncio.sleep(0.01)
    unlucky = asyncio.create_task(call("unlucky"))
    patient = asyncio.create_task(call("patient"))
    await asyncio.sleep(0.01)
    release.set()
    await asyncio.sleep(0)  # the holder releases and hands its slot to the first waiter...
    unlucky.cancel()  # ...whose client gives up before it runs
    await asyncio.gather(holder, unlucky, patient, return_exceptions=True)
    assert finished == ["holder", "patient"]
    assert slots.in_flight("a") == 0


class AbortingContext:
    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    async def abort(self, code: grpc.StatusCode, details: str, trailing: Any = ()) -> None:
        self.aborted = (code, details)
        raise grpc.aio.AbortError()


@pytest.mark.parametrize(
    ("backend_code", "client_code"),
    [
        # A backend stopping with calls in flight cancels them: retryable for the client.
        (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE),
        (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE),
        (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_backend_answers_reach_the_client_and_a_backend_cancel_is_retryable(
    backend_code: grpc.StatusCode, client_code: grpc.StatusCode
) -> None:
    proxy = object.__new__(Proxy)  # _fail needs none of the proxy's parts
    call = _Call(build_routes()["/crm.v1.AuditService/ListAuditLogs"])
    context = AbortingContext()
    error = grpc.aio.AioRpcError(
        backend_code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="from the backend"
    )
    with pytest.raises(grpc.aio.AbortError):
        await proxy._fail(call, context, error)  # type: ignore[arg-type]
    assert context.aborted is not None and context.aborted[0] == client_code
    assert "from the backend" in context.aborted[1]
    assert call.code == client_code


def test_a_concurrency_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        TenantConcurrency(0)


def test_routes_know_access_and_backend() -> None:
    routes = build_routes()
    assert routes["/crm.v1.TenantService/CreateTenant"].access is Access.PLATFORM
    assert routes["/crm.v1.TenantService/GetTenant"].access is Access.EITHER
    assert routes["/crm.v1.AuditService/ListAuditLogs"].access is Access.TENANT
    assert routes["/crm.v1.AuditService/ListAuditLogs"].backend is Backend.AUDIT
    assert not any(path.startswith("/crm.v1.DirectoryService/") for path in routes)


def test_api_audit_queue_is_bounded_and_counts_drops() -> None:
    publisher = ApiAuditPublisher(lambda: None, capacity=3)
    for i in range(5):
        publisher.record(events_pb2.ApiCallEvent(request_id=str(i)))
    assert publisher.backlog == 3 and publisher.dropped_total == 2
