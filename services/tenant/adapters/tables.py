"""Table models of the tenant schema (the migrations are the source of truth for DDL)."""

from __future__ import annotations

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    Uuid,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData(schema="tenant")

tenants = Table(
    "tenants",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("name", String(255), nullable=False),
    Column("subdomain", String(100), nullable=False),
    Column("plan_type", String(50), nullable=False),
    Column("status", String(20), nullable=False),
    Column("settings", JSONB, nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("create_request_id", Uuid),
    Column("default_pipeline_id", Uuid),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

shards = Table(
    "shards",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("name", String(100), nullable=False),
    Column("core_entity_address", String(255), nullable=False),
    Column("custom_object_address", String(255), nullable=False),
    Column("max_tenants", Integer, nullable=False),
    Column("is_active", Boolean, nullable=False),
    Column("is_dedicated", Boolean, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("database_url_encrypted", Text),
    Column("owner_database_url_encrypted", Text),
)

tenant_shards = Table(
    "tenant_shards",
    metadata,
    Column("tenant_id", Uuid, primary_key=True),
    Column("shard_id", Uuid, nullable=False),
    Column("epoch", BigInteger, nullable=False),
    Column("assigned_at", DateTime(timezone=True), nullable=False),
)

users = Table(
    "users",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("tenant_id", Uuid, nullable=False),
    Column("email", String(255), nullable=False),
    Column("first_name", String(100), nullable=False),
    Column("last_name", String(100), nullable=False),
    Column("role", String(20), nullable=False),
    Column("is_active", Boolean, nullable=False),
    Column("password_hash", Text, nullable=False),
    Column("failed_login_count", Integer, nullable=False),
    Column("locked_until", DateTime(timezone=True)),
    Column("last_login_at", DateTime(timezone=True)),
    Column("version", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("tenant_id", Uuid, nullable=False),
    Column("user_id", Uuid, nullable=False),
    Column("name", String(100), nullable=False),
    Column("prefix", String(16), nullable=False),
    Column("salt", String(64), nullable=False),
    Column("key_hash", String(128), nullable=False),
    Column("scopes", ARRAY(Text), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("last_used_at", DateTime(timezone=True)),
    Column("revoked_at", DateTime(timezone=True)),
)

api_key_directory = Table(
    "api_key_directory",
    metadata,
    Column("prefix", String(16), primary_key=True),
    Column("tenant_id", Uuid, nullable=False),
)

sessions = Table(
    "sessions",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("tenant_id", Uuid, nullable=False),
    Column("user_id", Uuid, nullable=False),
    Column("prefix", String(16), nullable=False),
    Column("salt", String(64), nullable=False),
    Column("token_hash", String(128), nullable=False),
    Column("ip_address", String(64)),
    Column("user_agent", Text),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True)),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

tenant_configurations = Table(
    "tenant_configurations",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("tenant_id", Uuid, nullable=False),
    Column("config_category", String(100), nullable=False),
    Column("config_key", String(100), nullable=False),
    Column("config_value", JSONB(none_as_null=True)),
    Column("encrypted_value", Text),
    Column("is_encrypted", Boolean, nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

system_metadata = Table(
    "system_metadata",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("tenant_id", Uuid),
    Column("metadata_type", String(100), nullable=False),
    Column("metadata_key", String(200), nullable=False),
    Column("metadata_value", JSONB, nullable=False),
    Column("description", Text, nullable=False),
    Column("is_system", Boolean, nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("created_by", Uuid),
    Column("updated_by", Uuid),
)

tenant_moves = Table(
    "tenant_moves",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("tenant_id", Uuid, nullable=False),
    Column("source_shard_id", Uuid, nullable=False),
    Column("target_shard_id", Uuid, nullable=False),
    Column("phase", String(20), nullable=False),
    Column("rows_copied", BigInteger, nullable=False),
    Column("rows_total", BigInteger, nullable=False),
    Column("errors", JSONB, nullable=False),
    Column("verified_tables", JSONB, nullable=False),
    Column("write_block_ms", BigInteger, nullable=False),
    Column("epoch", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
