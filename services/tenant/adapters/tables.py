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
