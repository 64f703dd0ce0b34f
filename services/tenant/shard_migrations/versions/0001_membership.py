"""Shard membership: which tenants this shard serves, at which epoch, and whether their writes
are blocked (tenant moves). Read by every backend of the shard through shared.shard_guard.

Revision ID: shard_0001
Revises:
Create Date: 2026-11-25
"""

from alembic import op

from shared.db import rls_statements

revision = "shard_0001"
down_revision = None
branch_labels = None
depends_on = None

STATEMENTS = [
    """CREATE TABLE shard.tenants (
        tenant_id uuid PRIMARY KEY,
        epoch bigint NOT NULL,
        state varchar(20) NOT NULL DEFAULT 'active',
        updated_at timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT ck_tenants_state CHECK (state IN ('active', 'blocked', 'incoming', 'moved_out'))
    )""",
    *rls_statements("shard", "tenants"),
]


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS shard.tenants")
