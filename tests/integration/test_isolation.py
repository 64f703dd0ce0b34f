"""Row-level security as the second wall, checked on the suite's real databases with the
service's own app role."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from cli.stack import Stack
from shared.db import UnsafeDatabaseRole, assert_safe_app_role, asyncpg_dsn
from tests.conftest import create_tenant

pytestmark = pytest.mark.integration

# Tables that are read before any tenant is known (routing, sign-in, key lookup); they hold no
# tenant data beyond the tenant's own directory entry.
PLATFORM_TABLES = {("tenant", "tenant_shards"), ("tenant", "api_key_directory")}


def app_dsn(suite: Stack, database: str) -> str:
    return suite.db_urls(suite.database(database))["CRM_DB_URL"]


async def test_every_tenant_table_forces_row_level_security(suite: Stack) -> None:
    for database in ("directory", "audit", "shard_0", "shard_1"):
        conn = await asyncpg.connect(asyncpg_dsn(suite.db_urls(suite.database(database))["CRM_DB_OWNER_URL"]))
        try:
            rows = await conn.fetch(
                """SELECT n.nspname AS schema, c.relname AS table, c.relrowsecurity, c.relforcerowsecurity
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                   JOIN pg_attribute a
                     ON a.attrelid = c.oid AND a.attname = 'tenant_id' AND NOT a.attisdropped
                   WHERE c.relkind IN ('r', 'p') AND n.nspname IN ('tenant', 'audit', 'core', 'custom')"""
            )
        finally:
            await conn.close()
        for row in rows:
            if (row["schema"], row["table"]) in PLATFORM_TABLES:
                continue
            assert row["relrowsecurity"] and row["relforcerowsecurity"], f"{row['schema']}.{row['table']}"


async def test_no_tenant_context_sees_nothing_and_a_tenant_sees_only_itself(
    suite: Stack, gateway: object
) -> None:
    tenant_a = await create_tenant(gateway, suite.platform_admin_key)  # type: ignore[arg-type]
    tenant_b = await create_tenant(gateway, suite.platform_admin_key)  # type: ignore[arg-type]
    conn = await asyncpg.connect(asyncpg_dsn(app_dsn(suite, "directory")))
    try:
        assert await conn.fetchval("SELECT count(*) FROM tenant.users") == 0
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.current_tenant_id', $1, true)", tenant_a.tenant.id)
            tenants_seen = {
                str(r["tenant_id"]) for r in await conn.fetch("SELECT tenant_id FROM tenant.users")
            }
            assert tenants_seen == {tenant_a.tenant.id}
            # Writing a row for another tenant is refused by the policy's WITH CHECK.
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                async with conn.transaction():
                    await conn.execute(
                        "INSERT INTO tenant.users (tenant_id, email, password_hash) "
                        "VALUES ($1, 'x@y.io', 'h')",
                        uuid.UUID(tenant_b.tenant.id),
                    )
        # The setting was transaction-local: a pooled connection reused afterwards sees nothing.
        assert await conn.fetchval("SELECT count(*) FROM tenant.users") == 0
    finally:
        await conn.close()


async def test_app_role_cannot_read_audit_partitions_directly(suite: Stack) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(app_dsn(suite, "audit")))
    try:
        partitions = [
            r["relname"]
            for r in await conn.fetch(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = 'audit.audit_logs'::regclass"
            )
        ]
        assert partitions, "expected monthly and default partitions"
        for partition in partitions:
            assert await conn.fetchval(f"SELECT count(*) FROM audit.{partition}") == 0
    finally:
        await conn.close()


async def test_services_refuse_unsafe_roles(suite: Stack, backends: object) -> None:
    # The admin URL is a superuser: a service must refuse to run as it.
    with pytest.raises(UnsafeDatabaseRole):
        await assert_safe_app_role(backends.database_url, ["tenant"])  # type: ignore[attr-defined]
    # The owner owns the tables: refused too.
    with pytest.raises(UnsafeDatabaseRole):
        await assert_safe_app_role(suite.db_urls(suite.database("directory"))["CRM_DB_OWNER_URL"], ["tenant"])
    await assert_safe_app_role(app_dsn(suite, "directory"), ["tenant"])
