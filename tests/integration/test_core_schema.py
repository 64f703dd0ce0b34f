# ruff: noqa: F811  (fixtures are imported from test_core_support, then used as arguments)
"""The core schema itself, as the migration left it: partitions, forced row-level security,
the seed's indexes, and the composite keys that keep references inside one tenant even for
a writer that skips the service's checks."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from shared.db import asyncpg_dsn
from tests.integration.test_core_support import CoreService, core_service  # noqa: F401

pytestmark = pytest.mark.integration

SEED_INDEXES = {
    "idx_accounts_tenant_id",
    "idx_accounts_name",
    "idx_accounts_type",
    "idx_accounts_parent",
    "idx_accounts_created_at",
    "idx_contacts_email_tenant",
    "idx_contacts_tenant_id",
    "idx_contacts_account_id",
    "idx_contacts_name",
    "idx_contacts_status",
    "idx_contacts_created_at",
    "idx_leads_tenant_id",
    "idx_leads_email",
    "idx_leads_status",
    "idx_leads_score",
    "idx_leads_converted",
    "idx_leads_created_at",
    "idx_deals_tenant_id",
    "idx_deals_account_id",
    "idx_deals_contact_id",
    "idx_deals_pipeline_stage",
    "idx_deals_amount",
    "idx_deals_close_date",
    "idx_deals_status",
    "idx_deals_created_at",
    "idx_activities_tenant_id",
    "idx_activities_account_id",
    "idx_activities_contact_id",
    "idx_activities_lead_id",
    "idx_activities_deal_id",
    "idx_activities_assigned_to",
    "idx_activities_due_date",
    "idx_activities_status",
    "idx_activities_type",
    "idx_activities_created_at",
    "idx_contacts_account_status",
    "idx_deals_account_open",
    "idx_activities_assigned_due",
    "idx_leads_score_status",
    "idx_deals_open_amount",
    "idx_activities_overdue",
    "unique_default_pipeline_per_tenant",
}


async def test_activities_are_hash_partitioned_and_every_table_forces_rls(core_service: CoreService) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(core_service.owner_dsn))
    try:
        partitions = await conn.fetch(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'core.activities'::regclass ORDER BY 1"
        )
        assert [p["relname"] for p in partitions] == [f"activities_p{i}" for i in range(4)]
        assert all("modulus 4" in p["bound"].lower() for p in partitions)
        tables = await conn.fetch(
            """SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE n.nspname = 'core' AND c.relkind IN ('r', 'p') AND c.relname <> 'outbox'
                 AND c.relname <> 'alembic_version'"""
        )
        assert len(tables) == 9 + 4
        unforced = [t["relname"] for t in tables if not (t["relrowsecurity"] and t["relforcerowsecurity"])]
        assert unforced == []
        indexes = {
            r["indexname"]
            for r in await conn.fetch("SELECT indexname FROM pg_indexes WHERE schemaname = 'core'")
        }
        assert SEED_INDEXES <= indexes, SEED_INDEXES - indexes
    finally:
        await conn.close()


async def test_composite_keys_refuse_references_across_tenants(core_service: CoreService) -> None:
    """Even a writer that skips the service (here: the app role with raw SQL) cannot point a
    contact at another tenant's account or a deal at a stage of another pipeline."""
    tenant_a, tenant_b, user = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    conn = await asyncpg.connect(asyncpg_dsn(core_service.app_dsn))
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.current_tenant_id', $1, true)", str(tenant_b))
            account_b = await conn.fetchval(
                "INSERT INTO core.accounts (tenant_id, name, created_by, updated_by) "
                "VALUES ($1, 'B', $2, $2) RETURNING id",
                tenant_b,
                user,
            )
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            async with conn.transaction():
                await conn.execute("SELECT set_config('app.current_tenant_id', $1, true)", str(tenant_a))
                await conn.execute(
                    "INSERT INTO core.contacts (tenant_id, account_id, first_name, last_name, created_by, "
                    "updated_by) VALUES ($1, $2, 'A', 'B', $3, $3)",
                    tenant_a,
                    account_b,
                    user,
                )
        with pytest.raises(asyncpg.CheckViolationError):
            async with conn.transaction():
                await conn.execute("SELECT set_config('app.current_tenant_id', $1, true)", str(tenant_a))
                await conn.execute(
                    "INSERT INTO core.activities (tenant_id, activity_type, subject, created_by, updated_by, "
                    "assigned_to) VALUES ($1, 'call', 'orphan', $2, $2, $2)",
                    tenant_a,
                    user,
                )
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.current_tenant_id', $1, true)", str(tenant_a))
            pipeline = await conn.fetchval(
                "INSERT INTO core.pipelines (tenant_id, name, created_by, updated_by) "
                "VALUES ($1, 'P', $2, $2) RETURNING id",
                tenant_a,
                user,
            )
            other = await conn.fetchval(
                "INSERT INTO core.pipelines (tenant_id, name, created_by, updated_by) "
                "VALUES ($1, 'Q', $2, $2) RETURNING id",
                tenant_a,
                user,
            )
            stage_of_other = await conn.fetchval(
                "INSERT INTO core.pipeline_stages (tenant_id, pipeline_id, name, stage_order, created_by, "
                "updated_by) VALUES ($1, $2, 'S', 1, $3, $3) RETURNING id",
                tenant_a,
                other,
                user,
            )
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            async with conn.transaction():
                await conn.execute("SELECT set_config('app.current_tenant_id', $1, true)", str(tenant_a))
                await conn.execute(
                    "INSERT INTO core.deals (tenant_id, pipeline_id, stage_id, name, created_by, updated_by) "
                    "VALUES ($1, $2, $3, 'D', $4, $4)",
                    tenant_a,
                    pipeline,
                    stage_of_other,
                    user,
                )
        # Without a tenant context the app role sees nothing at all.
        assert await conn.fetchval("SELECT count(*) FROM core.accounts") == 0
    finally:
        await conn.close()
