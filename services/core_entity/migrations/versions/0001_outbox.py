"""The core schema and its outbox.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from alembic import op

from shared.outbox import outbox_ddl

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    for statement in outbox_ddl("core"):
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS core.outbox")
