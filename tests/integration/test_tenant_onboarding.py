"""Onboarding stays whole when its step on the shard fails, and row-level security is forced on
every table the tenant service adds. A second tenant-service instance runs in-process on the
suite's directory database with a pipeline step that fails on demand."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from cryptography.fernet import Fernet

from cli.stack import Stack
from crm.v1 import tenant_pb2, tenant_pb2_grpc
from services.tenant.adapters.pipeline import PipelineTarget
from services.tenant.bootstrap import build_app
from services.tenant.service_layer.shards import WrongEncryptionKey
from shared import context as callctx
from shared.config import TenantSettings
from shared.db import asyncpg_dsn
from shared.grpc_server import ServiceApp
from tests.conftest import new_subdomain

pytestmark = pytest.mark.integration


class FlakyPipelines:
    """Fails while `failing` is set; counts the pipelines it made."""

    def __init__(self) -> None:
        self.failing = True
        self.made: list[str] = []

    async def create_default_pipeline(self, target: PipelineTarget) -> str:
        if self.failing:
            raise ConnectionError("core-entity is down")
        self.made.append(target.tenant_id)
        return str(uuid.uuid4())


@pytest.fixture
async def flaky_tenant_service(suite: Stack) -> AsyncIterator[tuple[ServiceApp, FlakyPipelines]]:
    urls = suite.db_urls(suite.database("directory"))
    settings = TenantSettings(
        db_url=urls["CRM_DB_URL"],
        db_owner_url=urls["CRM_DB_OWNER_URL"],
        internal_token=suite.internal_token,
        nats_url=suite.event_url,
        port=0,
        migrate_on_start=False,
        # The suite's key: shard connection settings in the directory are encrypted with it.
        encryption_key=suite.state["encryption_key"],
    )
    pipelines = FlakyPipelines()
    app = build_app(settings, pipelines=pipelines)
    await app.start()
    try:
        yield app, pipelines
    finally:
        await app.stop()


def platform_metadata(suite: Stack, request_id: str) -> tuple[tuple[str, str], ...]:
    return (
        (callctx.INTERNAL_TOKEN_KEY, suite.internal_token),
        (callctx.PLATFORM_ADMIN_KEY, "true"),
        (callctx.REQUEST_ID_KEY, request_id),
    )


async def test_a_failed_shard_step_leaves_no_tenant_and_a_retry_creates_exactly_one(
    suite: Stack, flaky_tenant_service: tuple[ServiceApp, FlakyPipelines]
) -> None:
    app, pipelines = flaky_tenant_service
    subdomain = new_subdomain()
    request_id = str(uuid.uuid4())
    request = tenant_pb2.CreateTenantRequest(
        tenant=tenant_pb2.Tenant(name="Flaky", subdomain=subdomain),
        admin_email="admin@example.com",
        admin_password="Sup3rSecret",
        request_id=request_id,
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        tenants = tenant_pb2_grpc.TenantServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await tenants.CreateTenant(request, metadata=platform_metadata(suite, request_id), timeout=30)
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE

        # Nothing of the tenant is left: not listed, and its subdomain is free.
        listed = await tenants.ListTenants(
            tenant_pb2.ListTenantsRequest(filter=f"subdomain = {subdomain}"),
            metadata=platform_metadata(suite, str(uuid.uuid4())),
        )
        assert list(listed.tenants) == []
        conn = await asyncpg.connect(asyncpg_dsn(suite.db_urls(suite.database("directory"))["CRM_DB_URL"]))
        try:
            assert (
                await conn.fetchval("SELECT count(*) FROM tenant.tenants WHERE subdomain = $1", subdomain)
                == 0
            )
        finally:
            await conn.close()

        pipelines.failing = False
        created = await tenants.CreateTenant(
            request, metadata=platform_metadata(suite, request_id), timeout=30
        )
        again = await tenants.CreateTenant(request, metadata=platform_metadata(suite, request_id), timeout=30)
        assert again.tenant.id == created.tenant.id
        assert created.default_pipeline_id and again.default_pipeline_id == created.default_pipeline_id
        assert created.tenant.status == tenant_pb2.TENANT_STATUS_ACTIVE
        assert pipelines.made == [created.tenant.id]


async def test_a_provisioning_tenant_is_resumed_by_a_retry(
    suite: Stack, flaky_tenant_service: tuple[ServiceApp, FlakyPipelines]
) -> None:
    """A crash after the directory rows were written leaves the tenant 'provisioning': hidden
    from routing and sign-in; a retry with the same request id finishes it with a fresh key."""
    app, pipelines = flaky_tenant_service
    pipelines.failing = False
    subdomain = new_subdomain()
    request_id = str(uuid.uuid4())
    request = tenant_pb2.CreateTenantRequest(
        tenant=tenant_pb2.Tenant(name="Resumed", subdomain=subdomain),
        admin_email="admin@example.com",
        admin_password="Sup3rSecret",
        request_id=request_id,
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        tenants = tenant_pb2_grpc.TenantServiceStub(channel)
        first = await tenants.CreateTenant(request, metadata=platform_metadata(suite, request_id), timeout=30)
        owner = await asyncpg.connect(
            asyncpg_dsn(suite.db_urls(suite.database("directory"))["CRM_DB_OWNER_URL"])
        )
        try:
            await owner.execute(
                "UPDATE tenant.tenants SET status = 'provisioning', default_pipeline_id = NULL WHERE id = $1",
                uuid.UUID(first.tenant.id),
            )
        finally:
            await owner.close()
        hidden = await tenants.ListTenants(
            tenant_pb2.ListTenantsRequest(filter=f"subdomain = {subdomain}"),
            metadata=platform_metadata(suite, str(uuid.uuid4())),
        )
        assert list(hidden.tenants) == []
        resumed = await tenants.CreateTenant(
            request, metadata=platform_metadata(suite, request_id), timeout=30
        )
        assert resumed.tenant.id == first.tenant.id
        assert resumed.tenant.status == tenant_pb2.TENANT_STATUS_ACTIVE
        assert resumed.api_key and resumed.api_key != first.api_key


TENANT_SERVICE_TABLES = {
    "users",
    "api_keys",
    "sessions",
    "tenant_configurations",
    "system_metadata",
    "tenant_moves",
}


async def test_row_level_security_is_forced_on_every_tenant_service_table(suite: Stack) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(suite.db_urls(suite.database("directory"))["CRM_DB_OWNER_URL"]))
    try:
        rows = await conn.fetch(
            """SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = 'tenant' AND c.relkind = 'r'"""
        )
    finally:
        await conn.close()
    forced = {r["relname"] for r in rows if r["relrowsecurity"] and r["relforcerowsecurity"]}
    assert TENANT_SERVICE_TABLES <= forced
    for database in ("shard_0", "shard_1"):
        shard = await asyncpg.connect(
            asyncpg_dsn(suite.db_urls(suite.database(database))["CRM_DB_OWNER_URL"])
        )
        try:
            exists = await shard.fetchval("SELECT to_regclass('shard.tenants') IS NOT NULL")
            if exists:
                assert await shard.fetchval(
                    "SELECT relforcerowsecurity FROM pg_class WHERE oid = 'shard.tenants'::regclass"
                )
        finally:
            await shard.close()


async def test_without_tenant_context_the_app_role_sees_no_configuration_or_session(suite: Stack) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(suite.db_urls(suite.database("directory"))["CRM_DB_URL"]))
    try:
        for table in ("tenant_configurations", "sessions", "tenant_moves"):
            assert await conn.fetchval(f"SELECT count(*) FROM tenant.{table}") == 0, table
        # Global system metadata is readable by everyone; no tenant's own entry is.
        assert (
            await conn.fetchval("SELECT count(*) FROM tenant.system_metadata WHERE tenant_id IS NOT NULL")
            == 0
        )
        assert await conn.fetchval("SELECT count(*) FROM tenant.system_metadata WHERE tenant_id IS NULL") >= 3
    finally:
        await conn.close()


async def test_a_wrong_encryption_key_stops_the_tenant_service_at_start(suite: Stack) -> None:
    """A second tenant service started with another key must refuse to start, before it could
    re-encrypt the shard settings with that key or leave a tenant half-onboarded."""
    urls = suite.db_urls(suite.database("directory"))
    admin = await asyncpg.connect(asyncpg_dsn(urls["CRM_DB_OWNER_URL"]))
    try:
        stored_before = await admin.fetch("SELECT id, database_url_encrypted FROM tenant.shards ORDER BY id")
    finally:
        await admin.close()
    assert stored_before, "the suite's directory has shards"
    settings = TenantSettings(
        db_url=urls["CRM_DB_URL"],
        db_owner_url=urls["CRM_DB_OWNER_URL"],
        internal_token=suite.internal_token,
        nats_url=suite.event_url,
        port=0,
        migrate_on_start=False,
        encryption_key=Fernet.generate_key().decode(),
        bootstrap_shards=suite.services["tenant"].env["CRM_BOOTSTRAP_SHARDS"],
    )
    app = build_app(settings)
    with pytest.raises(WrongEncryptionKey, match="CRM_ENCRYPTION_KEY"):
        await app.start()
    await app.stop()
    admin = await asyncpg.connect(asyncpg_dsn(urls["CRM_DB_OWNER_URL"]))
    try:
        stored_after = await admin.fetch("SELECT id, database_url_encrypted FROM tenant.shards ORDER BY id")
    finally:
        await admin.close()
    assert stored_after == stored_before  # nothing re-encrypted with the wrong key
