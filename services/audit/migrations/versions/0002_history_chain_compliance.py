"""Hash chain, field history, record versions, auth and API audit, tenant-marked sensitive
fields, compliance registers, and the archive schema.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from alembic import context, op

from shared.db import CURRENT_TENANT_SQL, identifier, rls_statements

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TENANT_TABLES = [
    "audit_chain_heads",
    "field_audit_logs",
    "record_versions",
    "sensitive_fields",
    "data_processing_activities",
    "consent_records",
    "data_retention_policies",
    "data_deletion_logs",
]

STATEMENTS = [
    # --- hash chain ---------------------------------------------------------------------------
    # chain_seq orders a tenant's entries (dense, 1-based); entry_hash covers the canonical content
    # and prev_hash. The digests are filled only when a data subject's values are erased, so the
    # chain still verifies without the erased values.
    "ALTER TABLE audit.audit_logs ADD COLUMN chain_seq bigint",
    "ALTER TABLE audit.audit_logs ADD COLUMN prev_hash varchar(64)",
    "ALTER TABLE audit.audit_logs ADD COLUMN entry_hash varchar(64)",
    "ALTER TABLE audit.audit_logs ADD COLUMN erased_at timestamptz",
    "ALTER TABLE audit.audit_logs ADD COLUMN old_values_digest varchar(64)",
    "ALTER TABLE audit.audit_logs ADD COLUMN new_values_digest varchar(64)",
    "CREATE INDEX ix_audit_logs_chain ON audit.audit_logs (tenant_id, chain_seq)",
    "CREATE INDEX ix_audit_logs_event ON audit.audit_logs (event_id)",
    # The head row is locked FOR UPDATE by the ingest transaction: one tenant's entries are
    # chained one batch at a time, in a deterministic order, even with several consumers.
    """CREATE TABLE audit.audit_chain_heads (
        tenant_id uuid PRIMARY KEY,
        last_seq bigint NOT NULL DEFAULT 0,
        last_hash varchar(64) NOT NULL DEFAULT '',
        updated_at timestamptz NOT NULL DEFAULT now()
    )""",
    # --- field-level history --------------------------------------------------------------------
    # Not a foreign key to the partitioned audit_logs: whole partitions are detached into the
    # archive, and a reference would pin them.
    """CREATE TABLE audit.field_audit_logs (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        tenant_id uuid NOT NULL,
        audit_log_id uuid NOT NULL,
        event_id uuid NOT NULL,
        table_name varchar(100) NOT NULL,
        record_id uuid NOT NULL,
        field_name varchar(200) NOT NULL,
        old_value text,
        new_value text,
        field_type varchar(50),
        is_sensitive boolean NOT NULL DEFAULT false,
        changed_at timestamptz NOT NULL,
        CONSTRAINT uq_field_audit_logs_event_field UNIQUE (event_id, field_name)
    )""",
    "CREATE INDEX ix_field_audit_logs_audit ON audit.field_audit_logs (tenant_id, audit_log_id)",
    "CREATE INDEX ix_field_audit_logs_field ON audit.field_audit_logs (tenant_id, field_name, changed_at DESC)",
    "CREATE INDEX ix_field_audit_logs_record ON audit.field_audit_logs (tenant_id, table_name, record_id)",
    # --- record versions ------------------------------------------------------------------------
    """CREATE TABLE audit.record_versions (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        tenant_id uuid NOT NULL,
        service varchar(50) NOT NULL,
        table_name varchar(100) NOT NULL,
        record_id uuid NOT NULL,
        version_number bigint NOT NULL,
        record_data jsonb NOT NULL,
        operation varchar(10) NOT NULL,
        event_id uuid NOT NULL,
        created_by uuid,
        created_at timestamptz NOT NULL,
        is_current boolean NOT NULL DEFAULT false,
        CONSTRAINT uq_record_versions_version UNIQUE (tenant_id, table_name, record_id, version_number),
        CONSTRAINT uq_record_versions_event UNIQUE (event_id),
        CONSTRAINT ck_record_versions_operation CHECK (operation IN ('INSERT', 'UPDATE', 'DELETE', 'RESTORE')),
        CONSTRAINT ck_record_versions_number CHECK (version_number >= 1)
    )""",
    # The seed's UNIQUE (..., is_current) would allow only one non-current version; a partial
    # unique index says what is meant: at most one current version per record.
    """CREATE UNIQUE INDEX uq_record_versions_current ON audit.record_versions
       (tenant_id, table_name, record_id) WHERE is_current""",
    """CREATE INDEX ix_record_versions_record ON audit.record_versions
       (tenant_id, table_name, record_id, version_number DESC)""",
    "CREATE INDEX ix_record_versions_created ON audit.record_versions (tenant_id, created_at DESC)",
    # --- auth audit ---------------------------------------------------------------------------
    # Sign-in attempts with an unknown subdomain and gateway calls without a tenant belong to no
    # tenant: they are stored under the nil UUID (no tenant can have it), so the ordinary policy
    # covers them and no tenant ever reads them.
    """CREATE TABLE audit.auth_audit_logs (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        event_id uuid NOT NULL,
        tenant_id uuid,
        user_id uuid,
        email varchar(255),
        event_type varchar(50) NOT NULL,
        success boolean NOT NULL,
        failure_reason varchar(255),
        ip_address inet,
        user_agent text,
        session_id varchar(255),
        mfa_used boolean NOT NULL DEFAULT false,
        location_country varchar(2),
        location_city varchar(100),
        created_at timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT uq_auth_audit_logs_event UNIQUE (event_id),
        CONSTRAINT ck_auth_audit_logs_event_type CHECK (event_type IN (
            'login_attempt', 'login_success', 'login_failure', 'logout',
            'password_change', 'password_reset', 'mfa_setup', 'mfa_verification',
            'account_locked', 'account_unlocked', 'session_expired'
        ))
    )""",
    "CREATE INDEX ix_auth_audit_tenant_time ON audit.auth_audit_logs (tenant_id, created_at DESC)",
    """CREATE INDEX ix_auth_audit_user ON audit.auth_audit_logs (user_id, created_at DESC)
       WHERE user_id IS NOT NULL""",
    "CREATE INDEX ix_auth_audit_events ON audit.auth_audit_logs (tenant_id, event_type, created_at DESC)",
    """CREATE INDEX ix_auth_audit_failures ON audit.auth_audit_logs (tenant_id, success, created_at DESC)
       WHERE success = false""",
    *rls_statements("audit", "auth_audit_logs"),
    # --- API audit, partitioned by day --------------------------------------------------------
    """CREATE TABLE audit.api_audit_logs (
        id uuid NOT NULL DEFAULT gen_random_uuid(),
        event_id uuid NOT NULL,
        tenant_id uuid,
        user_id uuid,
        api_key_id uuid,
        endpoint varchar(500) NOT NULL,
        http_method varchar(10) NOT NULL DEFAULT 'POST',
        request_size integer,
        response_status integer,
        status_code varchar(32),
        response_size integer,
        response_time_ms integer,
        ip_address inet,
        user_agent text,
        request_id varchar(100),
        error_message text,
        created_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (id, created_at),
        CONSTRAINT uq_api_audit_logs_event UNIQUE (event_id, created_at)
    ) PARTITION BY RANGE (created_at)""",
    "CREATE TABLE audit.api_audit_logs_default PARTITION OF audit.api_audit_logs DEFAULT",
    *rls_statements("audit", "api_audit_logs_default"),
    "CREATE INDEX ix_api_audit_tenant_time ON audit.api_audit_logs (tenant_id, created_at DESC)",
    """CREATE INDEX ix_api_audit_user ON audit.api_audit_logs (user_id, created_at DESC)
       WHERE user_id IS NOT NULL""",
    "CREATE INDEX ix_api_audit_endpoint ON audit.api_audit_logs (tenant_id, endpoint, created_at DESC)",
    """CREATE INDEX ix_api_audit_errors ON audit.api_audit_logs (tenant_id, response_status, created_at DESC)
       WHERE response_status >= 400""",
    *rls_statements("audit", "api_audit_logs"),
    # Same shape as ensure_audit_partitions: owner-run, takes only a count, and puts the tenant
    # policy on each new partition (policies are not inherited by direct reads of a partition).
    """CREATE FUNCTION audit.ensure_api_partitions(days_ahead integer) RETURNS integer
       LANGUAGE plpgsql SECURITY DEFINER SET search_path = audit, pg_temp AS $$
    DECLARE
        day_start date := (now() AT TIME ZONE 'UTC')::date;
        part_start date;
        part_name text;
        created integer := 0;
        tenant_expr text := $q$@TENANT_EXPR@$q$;
    BEGIN
        IF days_ahead < 0 OR days_ahead > 60 THEN
            RAISE EXCEPTION 'days_ahead must be between 0 and 60';
        END IF;
        FOR i IN 0..days_ahead LOOP
            part_start := day_start + i;
            part_name := 'api_audit_logs_' || to_char(part_start, 'YYYY_MM_DD');
            IF to_regclass('audit.' || part_name) IS NULL THEN
                EXECUTE format(
                    'CREATE TABLE audit.%I PARTITION OF audit.api_audit_logs FOR VALUES FROM (%L) TO (%L)',
                    part_name, part_start::timestamp AT TIME ZONE 'UTC',
                    (part_start + 1)::timestamp AT TIME ZONE 'UTC');
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
    "SELECT audit.ensure_api_partitions(3)",
    # --- tenant-marked sensitive fields -----------------------------------------------------
    """CREATE TABLE audit.sensitive_fields (
        tenant_id uuid NOT NULL,
        table_name varchar(100) NOT NULL,
        field_name varchar(200) NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (tenant_id, table_name, field_name)
    )""",
    # --- compliance registers (the seed's tables, tenant-scoped) ----------------------------
    """CREATE TABLE audit.data_processing_activities (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        tenant_id uuid NOT NULL,
        activity_name varchar(255) NOT NULL,
        purpose varchar(500) NOT NULL,
        legal_basis varchar(100) NOT NULL,
        data_categories text[] NOT NULL DEFAULT '{}',
        data_subjects text[] NOT NULL DEFAULT '{}',
        recipients text[] NOT NULL DEFAULT '{}',
        retention_period interval,
        cross_border_transfers boolean NOT NULL DEFAULT false,
        security_measures text[] NOT NULL DEFAULT '{}',
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT ck_data_processing_activities_legal_basis CHECK (legal_basis IN (
            'consent', 'contract', 'legal_obligation', 'vital_interests',
            'public_task', 'legitimate_interests'
        )),
        CONSTRAINT uq_data_processing_activities_name UNIQUE (tenant_id, activity_name)
    )""",
    # contact_id / lead_id reference records of another service (another database), so they
    # cannot be foreign keys; erasure removes them through EraseDataSubject.
    """CREATE TABLE audit.consent_records (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        tenant_id uuid NOT NULL,
        contact_id uuid,
        lead_id uuid,
        consent_type varchar(100) NOT NULL,
        consent_given boolean NOT NULL,
        consent_date timestamptz NOT NULL,
        consent_method varchar(100),
        consent_evidence jsonb,
        withdrawn_date timestamptz,
        withdrawal_method varchar(100),
        ip_address inet,
        user_agent text,
        created_at timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT ck_consent_records_contact_or_lead CHECK (
            (contact_id IS NOT NULL AND lead_id IS NULL) OR (contact_id IS NULL AND lead_id IS NOT NULL)
        )
    )""",
    "CREATE INDEX ix_consent_records_contact ON audit.consent_records (tenant_id, contact_id)",
    "CREATE INDEX ix_consent_records_lead ON audit.consent_records (tenant_id, lead_id)",
    "CREATE INDEX ix_consent_records_type ON audit.consent_records (tenant_id, consent_type)",
    """CREATE TABLE audit.data_retention_policies (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        tenant_id uuid NOT NULL,
        policy_name varchar(255) NOT NULL,
        table_name varchar(100) NOT NULL,
        retention_period interval NOT NULL,
        deletion_method varchar(50) NOT NULL DEFAULT 'soft_delete',
        conditions jsonb NOT NULL DEFAULT '{}',
        is_active boolean NOT NULL DEFAULT true,
        last_run_at timestamptz,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT ck_data_retention_policies_method
            CHECK (deletion_method IN ('soft_delete', 'hard_delete', 'anonymize')),
        CONSTRAINT uq_data_retention_policies_name UNIQUE (tenant_id, table_name, policy_name)
    )""",
    # record_id is empty for bulk and erasure entries; original_data is never filled with the
    # removed values (the log says what was removed without repeating it): summary holds counts.
    """CREATE TABLE audit.data_deletion_logs (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        tenant_id uuid NOT NULL,
        table_name varchar(100) NOT NULL,
        record_id uuid,
        deletion_reason varchar(255),
        deletion_method varchar(50) NOT NULL,
        deleted_by uuid,
        deleted_at timestamptz NOT NULL DEFAULT now(),
        record_count bigint NOT NULL DEFAULT 1,
        summary jsonb NOT NULL DEFAULT '{}',
        CONSTRAINT ck_data_deletion_logs_method
            CHECK (deletion_method IN ('retention_policy', 'user_request', 'gdpr_erasure', 'manual'))
    )""",
    "CREATE INDEX ix_data_deletion_logs_tenant ON audit.data_deletion_logs (tenant_id, deleted_at DESC)",
    "CREATE INDEX ix_data_deletion_logs_table ON audit.data_deletion_logs (tenant_id, table_name)",
    *[statement for table in TENANT_TABLES for statement in rls_statements("audit", table)],
    # The retention scheduler must find the tenants that have active policies before it can
    # act as any of them. Only the owner (through this SECURITY DEFINER function, which returns
    # tenant ids and nothing else) may read across tenants; the app role still sees only its
    # current tenant.
    "CREATE POLICY owner_scheduler ON audit.data_retention_policies FOR SELECT TO CURRENT_USER USING (true)",
    """CREATE FUNCTION audit.tenants_with_active_retention() RETURNS SETOF uuid
       LANGUAGE sql STABLE SECURITY DEFINER SET search_path = audit, pg_temp AS $$
        SELECT DISTINCT tenant_id FROM audit.data_retention_policies WHERE is_active ORDER BY 1
    $$""",
    # --- archive ----------------------------------------------------------------------------
    "CREATE SCHEMA IF NOT EXISTS audit_archive",
    # Detached monthly partitions are attached here, so archived entries stay queryable (and
    # protected by the same policy) through one parent.
    """CREATE TABLE audit_archive.audit_logs
       (LIKE audit.audit_logs INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
       PARTITION BY RANGE (changed_at)""",
    "CREATE INDEX ix_archive_audit_logs_tenant_time ON audit_archive.audit_logs (tenant_id, changed_at DESC)",
    "CREATE INDEX ix_archive_audit_logs_chain ON audit_archive.audit_logs (tenant_id, chain_seq)",
    "CREATE INDEX ix_archive_audit_logs_record ON audit_archive.audit_logs (tenant_id, table_name, record_id)",
    *rls_statements("audit_archive", "audit_logs"),
    "CREATE TABLE audit_archive.field_audit_logs (LIKE audit.field_audit_logs INCLUDING ALL)",
    *rls_statements("audit_archive", "field_audit_logs"),
    # Owner-run: detaches every monthly partition that ends at or before `before`, moves it to
    # the archive schema, attaches it to the archive parent, and checks the row count did not
    # change on the way. Forced RLS hides rows from the owner too, so the counts run with
    # FORCE lifted inside this transaction (the partition is ACCESS EXCLUSIVE locked meanwhile).
    """CREATE FUNCTION audit.archive_audit_partitions(before timestamptz)
       RETURNS TABLE (partition_name text, row_count bigint)
       LANGUAGE plpgsql SECURITY DEFINER SET search_path = audit, pg_temp AS $$
    DECLARE
        part record;
        part_end timestamptz;
        counted_before bigint;
        counted_after bigint;
        moved_fields_until timestamptz := NULL;
    BEGIN
        FOR part IN
            SELECT c.relname FROM pg_inherits i
            JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = 'audit.audit_logs'::regclass
              AND c.relname ~ '^audit_logs_[0-9]{4}_[0-9]{2}$'
            ORDER BY c.relname
        LOOP
            part_end := (to_date(substr(part.relname, 12), 'YYYY_MM') + interval '1 month')::timestamp
                        AT TIME ZONE 'UTC';
            CONTINUE WHEN part_end > before;
            EXECUTE format('ALTER TABLE audit.%I NO FORCE ROW LEVEL SECURITY', part.relname);
            EXECUTE format('SELECT count(*) FROM audit.%I', part.relname) INTO counted_before;
            EXECUTE format('ALTER TABLE audit.audit_logs DETACH PARTITION audit.%I', part.relname);
            EXECUTE format('ALTER TABLE audit.%I SET SCHEMA audit_archive', part.relname);
            EXECUTE format(
                'ALTER TABLE audit_archive.audit_logs ATTACH PARTITION audit_archive.%I '
                'FOR VALUES FROM (%L) TO (%L)',
                part.relname, part_end - interval '1 month', part_end);
            EXECUTE format('SELECT count(*) FROM audit_archive.%I', part.relname) INTO counted_after;
            EXECUTE format('ALTER TABLE audit_archive.%I FORCE ROW LEVEL SECURITY', part.relname);
            IF counted_before <> counted_after THEN
                RAISE EXCEPTION 'archive of % counted % rows before and % after',
                    part.relname, counted_before, counted_after;
            END IF;
            moved_fields_until := greatest(moved_fields_until, part_end);
            partition_name := part.relname;
            row_count := counted_after;
            RETURN NEXT;
        END LOOP;
        IF moved_fields_until IS NOT NULL THEN
            ALTER TABLE audit.field_audit_logs NO FORCE ROW LEVEL SECURITY;
            ALTER TABLE audit_archive.field_audit_logs NO FORCE ROW LEVEL SECURITY;
            WITH moved AS (
                DELETE FROM audit.field_audit_logs WHERE changed_at < moved_fields_until RETURNING *
            )
            INSERT INTO audit_archive.field_audit_logs SELECT * FROM moved;
            ALTER TABLE audit.field_audit_logs FORCE ROW LEVEL SECURITY;
            ALTER TABLE audit_archive.field_audit_logs FORCE ROW LEVEL SECURITY;
        END IF;
    END $$""",
]


def upgrade() -> None:
    app_role = identifier(context.config.attributes["app_role"])
    for statement in STATEMENTS:
        op.execute(statement)
    # The runner grants on the service schema only; the archive schema is read (and erased in)
    # by the app role through the archive parents.
    op.execute(f"GRANT USAGE ON SCHEMA audit_archive TO {app_role}")
    op.execute(f"GRANT SELECT, UPDATE ON ALL TABLES IN SCHEMA audit_archive TO {app_role}")
    op.execute(
        f"ALTER DEFAULT PRIVILEGES IN SCHEMA audit_archive GRANT SELECT, UPDATE ON TABLES TO {app_role}"
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS audit.archive_audit_partitions(timestamptz)")
    op.execute("DROP FUNCTION IF EXISTS audit.tenants_with_active_retention()")
    op.execute("DROP SCHEMA IF EXISTS audit_archive CASCADE")
    op.execute("DROP FUNCTION IF EXISTS audit.ensure_api_partitions(integer)")
    for table in ["api_audit_logs", "auth_audit_logs", *reversed(TENANT_TABLES)]:
        op.execute(f"DROP TABLE IF EXISTS audit.{table} CASCADE")
    for column in (
        "new_values_digest",
        "old_values_digest",
        "erased_at",
        "entry_hash",
        "prev_hash",
        "chain_seq",
    ):
        op.execute(f"ALTER TABLE audit.audit_logs DROP COLUMN IF EXISTS {column}")
