"""Outbox rows carry event headers (the W3C trace context) to the NATS message.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from alembic import op

from shared.outbox import outbox_headers_ddl

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for statement in outbox_headers_ddl("core"):
        op.execute(statement)


def downgrade() -> None:
    op.execute("ALTER TABLE core.outbox DROP COLUMN IF EXISTS headers")
