"""Sessions, tenant configuration, system metadata, shard connection settings, tenant moves.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from alembic import op

from shared.db import CURRENT_TENANT_SQL, rls_statements

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# A tenant is 'provisioning' while onboarding runs its steps on other services: the directory
# hides it (no route, no credential resolves) until every step succeeded, so a failure half-way
# never leaves a half-made tenant visible.
STATEMENTS = [
    "ALTER TABLE tenant.tenants DROP CONSTRAINT ck_tenants_status",
    """ALTER TABLE tenant.tenants ADD CONSTRAINT ck_tenants_status
        CHECK (status IN ('provisioning', 'active', 'suspended', 'cancelled'))""",
    # The default pipeline made on the tenant's shard during onboarding, so a resumed
    # onboarding does not make a second one.
    "ALTER TABLE tenant.tenants ADD COLUMN default_pipeline_id uuid",
    # Connection settings of a shard database are secrets: stored Fernet-encrypted.
    "ALTER TABLE tenant.shards ADD COLUMN database_url_encrypted text",
    "ALTER TABLE tenant.shards ADD COLUMN owner_database_url_encrypted text",
    "ALTER TABLE tenant.api_keys ADD CONSTRAINT ck_api_keys_scopes "
    "CHECK (scopes <@ ARRAY['read', 'write', 'admin']::text[] AND cardinality(scopes) > 0)",
    # Sessions: tokens are 256-bit random secrets, so a salted SHA-256 suffices (as for API
    # keys); their public prefix is registered in api_key_directory, which is the directory of
    # every bearer credential, so the tenant is found before the RLS-protected row is read.
    """CREATE TABLE tenant.sessions (
        id uuid PRIMARY KEY,
        tenant_id uuid NOT NULL REFERENCES tenant.tenants (id) ON DELETE CASCADE,
        user_id uuid NOT NULL,
        prefix varchar(16) NOT NULL,
        salt varchar(64) NOT NULL,
        token_hash varchar(128) NOT NULL,
        ip_address varchar(64),
        user_agent text,
        expires_at timestamptz NOT NULL,
        revoked_at timestamptz,
        created_at timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT uq_sessions_prefix UNIQUE (prefix),
        CONSTRAINT fk_sessions_user FOREIGN KEY (tenant_id, user_id) REFERENCES tenant.users (tenant_id, id)
            ON DELETE CASCADE
    )""",
    "CREATE INDEX ix_sessions_user ON tenant.sessions (tenant_id, user_id)",
    *rls_statements("tenant", "sessions"),
    """CREATE TABLE tenant.tenant_configurations (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        tenant_id uuid NOT NULL REFERENCES tenant.tenants (id) ON DELETE CASCADE,
        config_category varchar(100) NOT NULL,
        config_key varchar(100) NOT NULL,
        config_value jsonb,
        encrypted_value text,
        is_encrypted boolean NOT NULL DEFAULT false,
        version bigint NOT NULL DEFAULT 1,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT uq_tenant_configurations_key UNIQUE (tenant_id, config_category, config_key),
        CONSTRAINT ck_tenant_configurations_encryption CHECK (
            (is_encrypted AND encrypted_value IS NOT NULL AND config_value IS NULL)
            OR (NOT is_encrypted AND config_value IS NOT NULL AND encrypted_value IS NULL))
    )""",
    *rls_statements("tenant", "tenant_configurations"),
    """CREATE TABLE tenant.system_metadata (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        tenant_id uuid REFERENCES tenant.tenants (id) ON DELETE CASCADE,
        metadata_type varchar(100) NOT NULL,
        metadata_key varchar(200) NOT NULL,
        metadata_value jsonb NOT NULL,
        description text NOT NULL DEFAULT '',
        is_system boolean NOT NULL DEFAULT false,
        version bigint NOT NULL DEFAULT 1,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        created_by uuid,
        updated_by uuid
    )""",
    # NULLS NOT DISTINCT: a global entry (tenant_id NULL) is unique per type and key too.
    "CREATE UNIQUE INDEX uq_system_metadata_key ON tenant.system_metadata "
    "(tenant_id, metadata_type, metadata_key) NULLS NOT DISTINCT",
    "CREATE INDEX ix_system_metadata_type ON tenant.system_metadata (tenant_id, metadata_type)",
    # Global entries (tenant_id NULL) are readable by every tenant; a tenant's own only by it.
    "ALTER TABLE tenant.system_metadata ENABLE ROW LEVEL SECURITY",
    "ALTER TABLE tenant.system_metadata FORCE ROW LEVEL SECURITY",
    f"""CREATE POLICY tenant_isolation ON tenant.system_metadata
        USING (tenant_id IS NULL OR tenant_id = {CURRENT_TENANT_SQL})
        WITH CHECK (tenant_id IS NULL OR tenant_id = {CURRENT_TENANT_SQL})""",
    """INSERT INTO tenant.system_metadata (tenant_id, metadata_type, metadata_key, metadata_value,
            description, is_system) VALUES
        (NULL, 'system_config', 'max_file_upload_size', '{"value": 10485760, "unit": "bytes"}',
         'Largest file upload accepted', true),
        (NULL, 'system_config', 'supported_currencies', '["USD", "EUR", "GBP", "CAD", "AUD"]',
         'Currencies the platform supports', true),
        (NULL, 'system_config', 'password_policy',
         '{"min_length": 8, "require_uppercase": true, "require_numbers": true}',
         'Rules every password must satisfy', true)""",
    # Moves are platform operations; a move is readable in its tenant's context or in the
    # platform scope the tenant service sets for platform calls (app.directory_scope).
    """CREATE TABLE tenant.tenant_moves (
        id uuid PRIMARY KEY,
        tenant_id uuid NOT NULL REFERENCES tenant.tenants (id) ON DELETE CASCADE,
        source_shard_id uuid NOT NULL REFERENCES tenant.shards (id),
        target_shard_id uuid NOT NULL REFERENCES tenant.shards (id),
        phase varchar(20) NOT NULL,
        rows_copied bigint NOT NULL DEFAULT 0,
        rows_total bigint NOT NULL DEFAULT 0,
        errors jsonb NOT NULL DEFAULT '[]',
        verified_tables jsonb NOT NULL DEFAULT '[]',
        write_block_ms bigint NOT NULL DEFAULT 0,
        epoch bigint NOT NULL DEFAULT 0,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT ck_tenant_moves_phase CHECK (phase IN ('pending', 'copying', 'catching_up', 'blocked',
            'cleaning_up', 'completed', 'failed'))
    )""",
    # One unfinished move per tenant at a time.
    "CREATE UNIQUE INDEX uq_tenant_moves_running ON tenant.tenant_moves (tenant_id) "
    "WHERE phase NOT IN ('completed', 'failed')",
    "ALTER TABLE tenant.tenant_moves ENABLE ROW LEVEL SECURITY",
    "ALTER TABLE tenant.tenant_moves FORCE ROW LEVEL SECURITY",
    f"""CREATE POLICY tenant_isolation ON tenant.tenant_moves
        USING (tenant_id = {CURRENT_TENANT_SQL}
               OR current_setting('app.directory_scope', true) = 'platform')
        WITH CHECK (tenant_id = {CURRENT_TENANT_SQL}
               OR current_setting('app.directory_scope', true) = 'platform')""",
]


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    for table in ("tenant_moves", "system_metadata", "tenant_configurations", "sessions"):
        op.execute(f"DROP TABLE IF EXISTS tenant.{table} CASCADE")
    op.execute("ALTER TABLE tenant.api_keys DROP CONSTRAINT IF EXISTS ck_api_keys_scopes")
    op.execute("ALTER TABLE tenant.shards DROP COLUMN IF EXISTS owner_database_url_encrypted")
    op.execute("ALTER TABLE tenant.shards DROP COLUMN IF EXISTS database_url_encrypted")
    op.execute("ALTER TABLE tenant.tenants DROP COLUMN IF EXISTS default_pipeline_id")
    op.execute("ALTER TABLE tenant.tenants DROP CONSTRAINT ck_tenants_status")
    op.execute(
        "ALTER TABLE tenant.tenants ADD CONSTRAINT ck_tenants_status "
        "CHECK (status IN ('active', 'suspended', 'cancelled'))"
    )
