"""Gateway pieces without a network: token buckets, routing table, API audit queue."""

from __future__ import annotations

import time

import pytest

from crm.v1 import events_pb2
from gateway.api_audit import ApiAuditPublisher
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
