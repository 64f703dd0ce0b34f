"""Audit log partitioned by month, with a default partition and partition upkeep; outbox.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from alembic import op

from shared.db import CURRENT_TENANT_SQL, rls_statements
from shared.outbox import outbox_ddl

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

STATEMENTS = [
    # The event id is unique together with the partition key (a unique index on a partitioned
    # table must include it); an event's change time never changes, so a redelivered event
    # always conflicts with its first copy.
    """CREATE TABLE audit.audit_logs (
        id uuid NOT NULL DEFAULT gen_random_uuid(),
        event_id uuid NOT NULL,
        tenant_id uuid NOT NULL,
        service varchar(50) NOT NULL,
        table_name varchar(100) NOT NULL,
        record_id uuid NOT NULL,
        operation varchar(10) NOT NULL,
        old_values jsonb,
        new_values jsonb,
        changed_fields text[] NOT NULL DEFAULT '{}',
        record_version bigint NOT NULL DEFAULT 0,
        user_id uuid,
        user_email varchar(255),
        session_id varchar(255),
        ip_address inet,
        user_agent text,
        api_endpoint varchar(500),
        request_id varchar(100),
        changed_at timestamptz NOT NULL,
        ingested_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (id, changed_at),
        CONSTRAINT uq_audit_logs_event UNIQUE (event_id, changed_at),
        CONSTRAINT ck_audit_logs_operation CHECK (operation IN ('INSERT', 'UPDATE', 'DELETE', 'RESTORE')),
        CONSTRAINT ck_audit_logs_values_consistency CHECK (
            (operation = 'INSERT' AND old_values IS NULL AND new_values IS NOT NULL) OR
            (operation = 'UPDATE' AND old_values IS NOT NULL AND new_values IS NOT NULL) OR
            (operation = 'DELETE' AND old_values IS NOT NULL AND new_values IS NULL) OR
            (operation = 'RESTORE' AND old_values IS NOT NULL AND new_values IS NOT NULL)
        )
    ) PARTITION BY RANGE (changed_at)""",
    # Nothing is ever refused for want of a partition.
    "CREATE TABLE audit.audit_logs_default PARTITION OF audit.audit_logs DEFAULT",
    # Policies are not inherited: a partition read directly would bypass the parent's policy.
    *rls_statements("audit", "audit_logs_default"),
    "CREATE INDEX ix_audit_logs_tenant_time ON audit.audit_logs (tenant_id, changed_at DESC)",
    "CREATE INDEX ix_audit_logs_table_record ON audit.audit_logs (tenant_id, table_name, record_id)",
    "CREATE INDEX ix_audit_logs_user ON audit.audit_logs (tenant_id, user_id, changed_at DESC)",
    "CREATE INDEX ix_audit_logs_operation ON audit.audit_logs (tenant_id, operation, changed_at DESC)",
    "CREATE INDEX ix_audit_logs_session ON audit.audit_logs (session_id) WHERE session_id IS NOT NULL",
    *rls_statements("audit", "audit_logs"),
    # The app role owns nothing and cannot run DDL; this owner-run function creates the monthly
    # partitions ahead of time. It takes only a count, so it cannot be steered into other DDL.
    """CREATE FUNCTION audit.ensure_audit_partitions(months_ahead integer) RETURNS integer
       LANGUAGE plpgsql SECURITY DEFINER SET search_path = audit, pg_temp AS $$
    DECLARE
        month_start date := date_trunc('month', now())::date;
        part_start date;
        part_name text;
        created integer := 0;
        tenant_expr text := $q$@TENANT_EXPR@$q$;
    BEGIN
        IF months_ahead < 0 OR months_ahead > 24 THEN
            RAISE EXCEPTION 'months_ahead must be between 0 and 24';
        END IF;
        FOR i IN 0..months_ahead LOOP
            part_start := (month_start + make_interval(months => i))::date;
            part_name := 'audit_logs_' || to_char(part_start, 'YYYY_MM');
            IF to_regclass('audit.' || part_name) IS NULL THEN
                EXECUTE format(
                    'CREATE TABLE audit.%I PARTITION OF audit.audit_logs FOR VALUES FROM (%L) TO (%L)',
                    part_name, part_start, (part_start + interval '1 month')::date);
                EXECUTE format('ALTER TABLE audit.%I ENABLE ROW LEVEL SECURITY', part_name);
                EXECUTE format('ALTER TABLE audit.%I FORCE ROW LEVEL SECURITY', part_name);
                EXECUTE format(
                    'CREATE POLICY tenant_isolation ON audit.%I USING (tenant_id = %s) WITH CHECK (tenant_id = %s)',
                    part_name, tenant_expr, tenant_expr);
                created := created + 1;
            END IF;
        END LOOP;
        RETURN created;
    END $$""".replace("@TENANT_EXPR@", CURRENT_TENANT_SQL),
    "SELECT audit.ensure_audit_partitions(2)",
    *outbox_ddl("audit"),
]


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS audit.ensure_audit_partitions(integer)")
    op.execute("DROP TABLE IF EXISTS audit.audit_logs CASCADE")
    op.execute("DROP TABLE IF EXISTS audit.outbox")
