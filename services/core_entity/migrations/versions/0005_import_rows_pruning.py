"""Lets the service find the tenants whose imports are old enough to forget.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25

`core.import_rows` records which rows of each import id landed, so a retried import creates
nothing twice; the service forgets imports older than `CRM_IMPORT_RETRY_DAYS`. Row-level security
lets the app role see one tenant at a time, so it cannot find on its own which tenants have old
rows. As in the audit service's retention scheduler, only the owner may read across tenants,
through a SECURITY DEFINER function that returns tenant ids and nothing else; the deletes then
run as the app role, tenant by tenant, under the tenant policy.
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "CREATE POLICY owner_import_pruner ON core.import_rows FOR SELECT TO CURRENT_USER USING (true)"
    )
    op.execute(
        """CREATE FUNCTION core.tenants_with_imports_before(before timestamptz) RETURNS SETOF uuid
           LANGUAGE sql STABLE SECURITY DEFINER SET search_path = core, pg_temp AS $$
            SELECT DISTINCT tenant_id FROM core.import_rows WHERE created_at < before ORDER BY 1
        $$"""
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS core.tenants_with_imports_before(timestamptz)")
    op.execute("DROP POLICY IF EXISTS owner_import_pruner ON core.import_rows")
