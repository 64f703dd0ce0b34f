"""What platform teams watch: Prometheus metrics on each service's metrics port, and one trace
per call that spans the gateway and the backend it reached."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import grpc
import pytest

from cli.stack import Stack
from crm.v1 import tenant_pb2, tenant_pb2_grpc
from tests.conftest import bearer, create_tenant
from tests.otlp import OtlpReceiver

pytestmark = pytest.mark.e2e


def scrape(suite: Stack, service: str) -> str:
    port = suite.state[f"metrics:{service}"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


async def test_services_expose_call_and_outbox_metrics(suite: Stack, gateway: grpc.aio.Channel) -> None:
    await create_tenant(gateway, suite.platform_admin_key)
    tenant_metrics = await asyncio.to_thread(scrape, suite, "tenant")
    assert (
        'crm_grpc_calls_total{code="OK",method="/crm.v1.TenantService/CreateTenant",service="tenant"}'
        in tenant_metrics
    )
    assert "crm_grpc_call_seconds_bucket" in tenant_metrics
    deadline = time.monotonic() + 10
    while "crm_outbox_depth{" not in tenant_metrics and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        tenant_metrics = await asyncio.to_thread(scrape, suite, "tenant")
    assert 'crm_outbox_depth{service="tenant"}' in tenant_metrics
    assert 'crm_db_pool_checked_out{service="tenant"}' in tenant_metrics
    gateway_metrics = await asyncio.to_thread(scrape, suite, "gateway")
    assert 'method="/crm.v1.TenantService/CreateTenant",service="gateway"' in gateway_metrics
    assert "crm_api_audit_backlog" in gateway_metrics


async def test_one_trace_spans_gateway_and_backend(
    suite: Stack, gateway: grpc.aio.Channel, otlp: OtlpReceiver
) -> None:
    created = await create_tenant(gateway, suite.platform_admin_key)
    await tenant_pb2_grpc.TenantServiceStub(gateway).GetTenant(
        tenant_pb2.GetTenantRequest(id=created.tenant.id), metadata=bearer(created.api_key)
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        spans = otlp.snapshot()
        gateway_spans = {
            s.span_id: s
            for s in spans
            if s.service == "crm-gateway" and s.name == "/crm.v1.TenantService/GetTenant"
        }
        children = [
            s
            for s in spans
            if s.service == "crm-tenant"
            and s.parent_span_id in gateway_spans
            and s.trace_id == gateway_spans[s.parent_span_id].trace_id
        ]
        if children:
            return
        await asyncio.sleep(0.3)
    raise AssertionError(f"no tenant-service span under a gateway span; saw {len(otlp.snapshot())} spans")


async def test_the_trace_continues_through_events_into_the_audit_ingest(
    suite: Stack, gateway: grpc.aio.Channel, otlp: OtlpReceiver
) -> None:
    call = tenant_pb2_grpc.TenantServiceStub(gateway).CreateTenant(
        tenant_pb2.CreateTenantRequest(
            tenant=tenant_pb2.Tenant(name="Traced", subdomain=f"t-{time.time_ns()}"),
            admin_email="admin@example.com",
            admin_password="Sup3rSecret",
        ),
        metadata=bearer(suite.platform_admin_key),
        timeout=30,
    )
    await call
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        spans = otlp.snapshot()
        gateway_traces = {
            s.trace_id
            for s in spans
            if s.service == "crm-gateway" and s.name == "/crm.v1.TenantService/CreateTenant"
        }
        ingested = {
            s.trace_id for s in spans if s.service == "crm-audit" and s.name.startswith("audit ingest")
        }
        if gateway_traces & ingested:
            break
        await asyncio.sleep(0.3)
    else:
        raise AssertionError("no audit ingest span joined a CreateTenant trace")
    audit_metrics = await asyncio.to_thread(scrape, suite, "audit")
    assert "crm_audit_consumer_pending" in audit_metrics and "crm_audit_ingested_total" in audit_metrics
