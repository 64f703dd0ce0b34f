"""Directory: tenants, shards and the tenant-to-shard map, users, API keys, outbox.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from alembic import op

from shared.db import rls_statements
from shared.outbox import outbox_ddl

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Platform tables (tenants, shards, tenant_shards, api_key_directory) are read before a tenant
# is known (routing, sign-in by subdomain, API key lookup by prefix) and hold no tenant data
# beyond the tenant's own row; tenant tables (users, api_keys) get forced row-level security.
STATEMENTS = [
    """CREATE TABLE tenant.tenants (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        name varchar(255) NOT NULL,
        subdomain varchar(100) NOT NULL,
        plan_type varchar(50) NOT NULL DEFAULT 'basic',
        status varchar(20) NOT NULL DEFAULT 'active',
        settings jsonb NOT NULL DEFAULT '{}',
        version bigint NOT NULL DEFAULT 1,
        create_request_id uuid,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT uq_tenants_subdomain UNIQUE (subdomain),
        CONSTRAINT uq_tenants_create_request_id UNIQUE (create_request_id),
        CONSTRAINT ck_tenants_name_not_blank CHECK (btrim(name) <> ''),
        CONSTRAINT ck_tenants_plan_type CHECK (plan_type IN ('basic', 'professional', 'enterprise')),
        CONSTRAINT ck_tenants_status CHECK (status IN ('active', 'suspended', 'cancelled')),
        CONSTRAINT ck_tenants_subdomain CHECK (subdomain ~ '^[a-z0-9][a-z0-9-]*[a-z0-9]$')
    )""",
    "CREATE INDEX ix_tenants_status ON tenant.tenants (status)",
    """CREATE TABLE tenant.shards (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        name varchar(100) NOT NULL,
        core_entity_address varchar(255) NOT NULL,
        custom_object_address varchar(255) NOT NULL,
        max_tenants integer NOT NULL DEFAULT 1000,
        is_active boolean NOT NULL DEFAULT true,
        is_dedicated boolean NOT NULL DEFAULT false,
        created_at timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT uq_shards_name UNIQUE (name),
        CONSTRAINT ck_shards_max_tenants CHECK (max_tenants > 0)
    )""",
    """CREATE TABLE tenant.tenant_shards (
        tenant_id uuid PRIMARY KEY REFERENCES tenant.tenants (id) ON DELETE CASCADE,
        shard_id uuid NOT NULL REFERENCES tenant.shards (id),
        epoch bigint NOT NULL DEFAULT 1,
        assigned_at timestamptz NOT NULL DEFAULT now()
    )""",
    "CREATE INDEX ix_tenant_shards_shard ON tenant.tenant_shards (shard_id)",
    """CREATE TABLE tenant.users (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        tenant_id uuid NOT NULL REFERENCES tenant.tenants (id) ON DELETE CASCADE,
        email varchar(255) NOT NULL,
        first_name varchar(100) NOT NULL DEFAULT '',
        last_name varchar(100) NOT NULL DEFAULT '',
        role varchar(20) NOT NULL DEFAULT 'member',
        is_active boolean NOT NULL DEFAULT true,
        password_hash text NOT NULL,
        failed_login_count integer NOT NULL DEFAULT 0,
        locked_until timestamptz,
        last_login_at timestamptz,
        version bigint NOT NULL DEFAULT 1,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT uq_users_tenant_id UNIQUE (tenant_id, id),
        CONSTRAINT ck_users_role CHECK (role IN ('admin', 'member', 'read_only'))
    )""",
    "CREATE UNIQUE INDEX uq_users_tenant_email ON tenant.users (tenant_id, lower(email))",
    """CREATE TABLE tenant.api_keys (
        id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        tenant_id uuid NOT NULL REFERENCES tenant.tenants (id) ON DELETE CASCADE,
        user_id uuid NOT NULL,
        name varchar(100) NOT NULL,
        prefix varchar(16) NOT NULL,
        salt varchar(64) NOT NULL,
        key_hash varchar(128) NOT NULL,
        scopes text[] NOT NULL DEFAULT ARRAY['read', 'write'],
        version bigint NOT NULL DEFAULT 1,
        created_at timestamptz NOT NULL DEFAULT now(),
        last_used_at timestamptz,
        revoked_at timestamptz,
        CONSTRAINT uq_api_keys_prefix UNIQUE (prefix),
        CONSTRAINT fk_api_keys_user FOREIGN KEY (tenant_id, user_id) REFERENCES tenant.users (tenant_id, id)
            ON DELETE CASCADE
    )""",
    "CREATE INDEX ix_api_keys_tenant ON tenant.api_keys (tenant_id)",
    # Maps a key's public prefix to its tenant, so the gateway can find the tenant before the
    # tenant context (and so the RLS-protected key row) is known. Holds no secret.
    """CREATE TABLE tenant.api_key_directory (
        prefix varchar(16) PRIMARY KEY,
        tenant_id uuid NOT NULL REFERENCES tenant.tenants (id) ON DELETE CASCADE
    )""",
    *rls_statements("tenant", "users"),
    *rls_statements("tenant", "api_keys"),
    *outbox_ddl("tenant"),
]


def upgrade() -> None:
    for statement in STATEMENTS:
        op.execute(statement)


def downgrade() -> None:
    for table in ("outbox", "api_key_directory", "api_keys", "users", "tenant_shards", "shards", "tenants"):
        op.execute(f"DROP TABLE IF EXISTS tenant.{table} CASCADE")
