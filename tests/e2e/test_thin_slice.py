"""The foundation's thin slice through real processes: a client call through the gateway to the
tenant service, its database write, the change event over JetStream, and the audit entry."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from cli.stack import Stack
from crm.v1 import audit_pb2, audit_pb2_grpc, tenant_pb2, tenant_pb2_grpc
from tests.conftest import bearer, create_tenant, new_subdomain, unique_prefix

pytestmark = pytest.mark.e2e


async def audit_entries(channel: grpc.aio.Channel, api_key: str, **filters: str) -> list[audit_pb2.AuditLog]:
    reply = await audit_pb2_grpc.AuditServiceStub(channel).ListAuditLogs(
        audit_pb2.ListAuditLogsRequest(page_size=1000, **filters), metadata=bearer(api_key), timeout=10
    )
    return list(reply.audit_logs)


async def wait_for_audit(
    channel: grpc.aio.Channel, api_key: str, expected: int, timeout: float = 15.0, **filters: str
) -> list[audit_pb2.AuditLog]:
    deadline = time.monotonic() + timeout
    entries: list[audit_pb2.AuditLog] = []
    while time.monotonic() < deadline:
        try:
            entries = await audit_entries(channel, api_key, **filters)
        except grpc.aio.AioRpcError as exc:
            # A backend restarted by the test may still be reconnecting.
            if exc.code() is not grpc.StatusCode.UNAVAILABLE:
                raise
        if len(entries) >= expected:
            return entries
        await asyncio.sleep(0.2)
    raise AssertionError(f"expected {expected} audit entries within {timeout}s, saw {len(entries)}")


def table_counts(entries: list[audit_pb2.AuditLog]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry.table_name] = counts.get(entry.table_name, 0) + 1
    return counts


async def settled_entries(
    channel: grpc.aio.Channel, api_key: str, timeout: float = 30.0
) -> list[audit_pb2.AuditLog]:
    """A tenant's onboarding entries once no new one has arrived for two seconds (onboarding
    writes through several services: tenants, users, keys, configurations, the default pipeline)."""
    deadline = time.monotonic() + timeout
    entries = await wait_for_audit(channel, api_key, 3, timeout=timeout)
    stable_since = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - stable_since < 2.0:
        await asyncio.sleep(0.3)
        latest = await audit_entries(channel, api_key)
        if len(latest) != len(entries):
            entries, stable_since = latest, time.monotonic()
    return entries


async def wait_for_same_tables(
    channel: grpc.aio.Channel, api_key: str, expected: dict[str, int], timeout: float = 45.0
) -> list[audit_pb2.AuditLog]:
    deadline = time.monotonic() + timeout
    entries: list[audit_pb2.AuditLog] = []
    while time.monotonic() < deadline:
        try:
            entries = await audit_entries(channel, api_key)
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.UNAVAILABLE:
                raise
        if table_counts(entries) == expected:
            return entries
        await asyncio.sleep(0.3)
    raise AssertionError(f"expected {expected}, saw {table_counts(entries)}")


def field_violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "the error carries no google.rpc.Status"
    violations: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations.update({v.field: v.description for v in bad_request.field_violations})
    return violations


async def test_create_tenant_reaches_the_audit_log(suite: Stack, gateway: grpc.aio.Channel) -> None:
    created = await create_tenant(gateway, suite.platform_admin_key)
    tenant = created.tenant
    assert uuid.UUID(tenant.id)
    assert tenant.status == tenant_pb2.TENANT_STATUS_ACTIVE
    assert tenant.plan_type == tenant_pb2.PLAN_TYPE_BASIC
    assert tenant.shard_id
    assert created.api_key.startswith("crm_")

    entries = await wait_for_audit(gateway, created.api_key, 1, table_name="tenants")
    (insert,) = entries
    assert insert.operation == 1  # OPERATION_INSERT
    assert insert.record_id == tenant.id
    assert insert.tenant_id == tenant.id
    new_values = json.loads(insert.new_values_json)
    assert new_values["name"] == "Test Tenant"
    assert new_values["subdomain"] == tenant.subdomain
    assert insert.old_values_json == ""
    assert insert.api_endpoint == "/crm.v1.TenantService/CreateTenant"
    assert insert.request_id


async def test_secrets_never_reach_the_audit_log(suite: Stack, gateway: grpc.aio.Channel) -> None:
    created = await create_tenant(gateway, suite.platform_admin_key, admin_password="An0therSecret")
    entries = await settled_entries(gateway, created.api_key)
    dumped = " ".join(e.new_values_json for e in entries)
    assert "password_hash" not in dumped and "key_hash" not in dumped and "salt" not in dumped
    assert "An0therSecret" not in dumped
    assert created.api_key.split("_")[2] not in dumped


async def test_retry_with_same_request_id_creates_one_tenant(suite: Stack, gateway: grpc.aio.Channel) -> None:
    request_id = str(uuid.uuid4())
    subdomain = new_subdomain()
    first = await create_tenant(
        gateway,
        suite.platform_admin_key,
        request_id=request_id,
        tenant=tenant_pb2.Tenant(name="Retry", subdomain=subdomain),
    )
    second = await create_tenant(
        gateway,
        suite.platform_admin_key,
        request_id=request_id,
        tenant=tenant_pb2.Tenant(name="Retry", subdomain=subdomain),
    )
    assert second.tenant.id == first.tenant.id
    assert second.api_key == ""  # shown once only


async def test_bad_subdomain_names_the_field(suite: Stack, gateway: grpc.aio.Channel) -> None:
    for subdomain in ("Upper", "-leading", "trailing-", "a", "x" * 101, "bad_char"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await create_tenant(
                gateway, suite.platform_admin_key, tenant=tenant_pb2.Tenant(name="X", subdomain=subdomain)
            )
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT, subdomain
        assert "tenant.subdomain" in field_violations(caught.value), subdomain


async def test_every_bad_field_is_reported_at_once(suite: Stack, gateway: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create_tenant(
            gateway,
            suite.platform_admin_key,
            tenant=tenant_pb2.Tenant(name="  ", subdomain="ok-name"),
            admin_email="not-an-email",
            admin_password="weak",
        )
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(caught.value)) == {"tenant.name", "admin_email", "admin_password"}


async def test_taken_subdomain_is_already_exists(suite: Stack, gateway: grpc.aio.Channel) -> None:
    created = await create_tenant(gateway, suite.platform_admin_key)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create_tenant(
            gateway,
            suite.platform_admin_key,
            tenant=tenant_pb2.Tenant(name="Dup", subdomain=created.tenant.subdomain),
        )
    assert caught.value.code() is grpc.StatusCode.ALREADY_EXISTS


async def test_calls_without_valid_credentials_are_refused(suite: Stack, gateway: grpc.aio.Channel) -> None:
    stub = audit_pb2_grpc.AuditServiceStub(gateway)
    for metadata in (
        (),
        (("authorization", "Basic abc"),),
        bearer("crm_000000000000_nope"),
        bearer("garbage"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListAuditLogs(audit_pb2.ListAuditLogsRequest(), metadata=metadata, timeout=10)
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_platform_and_tenant_credentials_stay_in_their_lanes(
    suite: Stack, gateway: grpc.aio.Channel
) -> None:
    created = await create_tenant(gateway, suite.platform_admin_key)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create_tenant(gateway, created.api_key)
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await audit_entries(gateway, suite.platform_admin_key)
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED


async def test_a_tenant_cannot_see_another_tenant(suite: Stack, gateway: grpc.aio.Channel) -> None:
    tenant_a = await create_tenant(gateway, suite.platform_admin_key)
    tenant_b = await create_tenant(gateway, suite.platform_admin_key)
    await wait_for_audit(gateway, tenant_b.api_key, 3)
    stub = tenant_pb2_grpc.TenantServiceStub(gateway)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetTenant(
            tenant_pb2.GetTenantRequest(id=tenant_b.tenant.id), metadata=bearer(tenant_a.api_key)
        )
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    own = await stub.GetTenant(
        tenant_pb2.GetTenantRequest(id=tenant_a.tenant.id), metadata=bearer(tenant_a.api_key)
    )
    assert own.id == tenant_a.tenant.id
    # Forged tenant headers are replaced by the gateway's own.
    forged = (
        *bearer(tenant_a.api_key),
        ("x-crm-tenant-id", tenant_b.tenant.id),
        ("x-crm-platform-admin", "true"),
    )
    reply = await audit_pb2_grpc.AuditServiceStub(gateway).ListAuditLogs(
        audit_pb2.ListAuditLogsRequest(page_size=1000), metadata=forged, timeout=10
    )
    assert reply.audit_logs and {e.tenant_id for e in reply.audit_logs} == {tenant_a.tenant.id}
    assert tenant_b.tenant.id not in {e.record_id for e in await audit_entries(gateway, tenant_a.api_key)}


async def test_backends_refuse_calls_without_the_internal_credential(suite: Stack) -> None:
    tenant_address = suite.services["tenant"].address
    audit_address = suite.services["audit"].address
    async with grpc.aio.insecure_channel(tenant_address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await tenant_pb2_grpc.TenantServiceStub(channel).CreateTenant(
                tenant_pb2.CreateTenantRequest(tenant=tenant_pb2.Tenant(name="x", subdomain=new_subdomain())),
                metadata=(("x-crm-platform-admin", "true"), ("x-crm-internal-token", "guess")),
            )
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    async with grpc.aio.insecure_channel(audit_address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await audit_pb2_grpc.AuditServiceStub(channel).ListAuditLogs(
                audit_pb2.ListAuditLogsRequest(), metadata=(("x-crm-tenant-id", str(uuid.uuid4())),)
            )
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_request_id_is_returned(suite: Stack, gateway: grpc.aio.Channel) -> None:
    created = await create_tenant(gateway, suite.platform_admin_key)
    call = audit_pb2_grpc.AuditServiceStub(gateway).ListAuditLogs(
        audit_pb2.ListAuditLogsRequest(),
        metadata=(*bearer(created.api_key), ("x-request-id", "req-123")),
        timeout=10,
    )
    await call
    assert ("x-request-id", "req-123") in tuple(await call.initial_metadata())


async def test_audit_pages_are_stable_and_tokens_bound_to_their_filter(
    suite: Stack, gateway: grpc.aio.Channel
) -> None:
    created = await create_tenant(gateway, suite.platform_admin_key)
    everything = await settled_entries(gateway, created.api_key)
    stub = audit_pb2_grpc.AuditServiceStub(gateway)
    seen, token = [], ""
    while True:
        page = await stub.ListAuditLogs(
            audit_pb2.ListAuditLogsRequest(page_size=1, page_token=token), metadata=bearer(created.api_key)
        )
        seen += [e.id for e in page.audit_logs]
        token = page.next_page_token
        if not token:
            break
    assert seen == [e.id for e in everything]
    first = await stub.ListAuditLogs(
        audit_pb2.ListAuditLogsRequest(page_size=1), metadata=bearer(created.api_key)
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListAuditLogs(
            audit_pb2.ListAuditLogsRequest(page_size=1, page_token=first.next_page_token, table_name="users"),
            metadata=bearer(created.api_key),
        )
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def chaos_suite(backends: object) -> object:
    """A suite with a NATS of its own, so a test may kill the broker without disturbing others."""
    stack = Stack(
        home=Path(tempfile.mkdtemp(prefix="crm-chaos-")),
        database_url=backends.database_url,  # type: ignore[attr-defined]
        nats_url=None,
        prefix=unique_prefix(),
        shards=1,
        gateway_port=0,
        log_level="warning",
    )
    stack.start()
    yield stack
    stack.stop()


async def test_no_audit_entry_is_lost_while_nats_is_down(chaos_suite: Stack) -> None:
    stack = chaos_suite
    assert stack.nats is not None
    async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
        reference = table_counts(
            await settled_entries(channel, (await create_tenant(channel, stack.platform_admin_key)).api_key)
        )
        stack.nats.kill()
        try:
            created = [await create_tenant(channel, stack.platform_admin_key) for _ in range(3)]
            await asyncio.sleep(1.0)
        finally:
            stack.nats.start()
        for tenant in created:
            entries = await wait_for_same_tables(channel, tenant.api_key, reference)
            assert len({e.event_id for e in entries}) == len(entries)


async def test_no_audit_entry_is_lost_when_the_audit_service_is_killed(chaos_suite: Stack) -> None:
    stack = chaos_suite
    async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
        reference = table_counts(
            await settled_entries(channel, (await create_tenant(channel, stack.platform_admin_key)).api_key)
        )
        stack.services["audit"].kill()
        created = [await create_tenant(channel, stack.platform_admin_key) for _ in range(3)]
        stack.services["audit"].start()
        stack.wait_healthy(["audit"])
        for tenant in created:
            entries = await wait_for_same_tables(channel, tenant.api_key, reference)
            assert len({e.event_id for e in entries}) == len(entries)


async def test_kill_between_commit_and_publish_loses_nothing(chaos_suite: Stack) -> None:
    """The tenant service is killed with NATS down, so its outbox rows are committed but
    unpublished; the restarted service's relay publishes them."""
    stack = chaos_suite
    assert stack.nats is not None
    async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
        reference = table_counts(
            await settled_entries(channel, (await create_tenant(channel, stack.platform_admin_key)).api_key)
        )
        stack.nats.kill()
        try:
            created = await create_tenant(channel, stack.platform_admin_key)
            stack.services["tenant"].kill()
        finally:
            stack.nats.start()
        stack.services["tenant"].start()
        stack.wait_healthy(["tenant"])
        entries = await wait_for_same_tables(channel, created.api_key, reference)
        assert len({e.event_id for e in entries}) == len(entries)
