"""Table models of the custom schema (the migrations are the source of truth for DDL)."""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, DateTime, Integer, MetaData, String, Table, Text, Uuid
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData(schema="custom")


def _audit_columns() -> list[Column[object]]:
    return [
        Column("version", BigInteger, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
        Column("created_by", Uuid),
        Column("updated_by", Uuid),
    ]


custom_objects = Table(
    "custom_objects",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("tenant_id", Uuid, nullable=False),
    Column("name", String(100), nullable=False),
    Column("label", String(255), nullable=False),
    Column("plural_label", String(255), nullable=False),
    Column("description", Text, nullable=False),
    Column("api_name", String(100), nullable=False),
    Column("is_active", Boolean, nullable=False),
    Column("allow_reports", Boolean, nullable=False),
    Column("allow_activities", Boolean, nullable=False),
    Column("record_name_field", String(100)),
    Column("icon", String(50)),
    Column("color", String(7)),
    *_audit_columns(),
)

custom_fields = Table(
    "custom_fields",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("tenant_id", Uuid, nullable=False),
    Column("object_type", String(100), nullable=False),
    Column("custom_object_id", Uuid),
    Column("field_name", String(63), nullable=False),
    Column("field_label", String(255), nullable=False),
    Column("field_type", String(50), nullable=False),
    Column("data_type", String(50), nullable=False),
    Column("is_required", Boolean, nullable=False),
    Column("is_unique", Boolean, nullable=False),
    Column("is_indexed", Boolean, nullable=False),
    Column("default_value", JSONB(none_as_null=True)),
    Column("help_text", Text, nullable=False),
    Column("field_order", Integer, nullable=False),
    Column("validation_rules", JSONB, nullable=False),
    Column("display_options", JSONB, nullable=False),
    Column("is_active", Boolean, nullable=False),
    Column("reference_object_type", String(100)),
    Column("relationship_id", Uuid),
    Column("metadata", JSONB, nullable=False),
    Column("usage_count", BigInteger, nullable=False),
    Column("last_used_at", DateTime(timezone=True)),
    Column("index_state", String(20), nullable=False),
    *_audit_columns(),
)

custom_field_options = Table(
    "custom_field_options",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("tenant_id", Uuid, nullable=False),
    Column("custom_field_id", Uuid, nullable=False),
    Column("option_value", String(255), nullable=False),
    Column("option_label", String(255), nullable=False),
    Column("option_order", Integer, nullable=False),
    Column("is_default", Boolean, nullable=False),
    Column("is_active", Boolean, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

custom_relationships = Table(
    "custom_relationships",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("tenant_id", Uuid, nullable=False),
    Column("relationship_name", String(100), nullable=False),
    Column("from_object_type", String(100), nullable=False),
    Column("from_custom_object_id", Uuid),
    Column("to_object_type", String(100), nullable=False),
    Column("to_custom_object_id", Uuid),
    Column("relationship_type", String(50), nullable=False),
    Column("cardinality", String(20), nullable=False),
    Column("cascade_delete", Boolean, nullable=False),
    Column("is_required", Boolean, nullable=False),
    Column("description", Text, nullable=False),
    Column("holder_object_type", String(100)),
    Column("field_id", Uuid),
    *_audit_columns(),
)

custom_object_records = Table(
    "custom_object_records",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("tenant_id", Uuid, nullable=False),
    Column("custom_object_id", Uuid, nullable=False),
    Column("record_data", JSONB, nullable=False),
    *_audit_columns(),
)

custom_relationship_data = Table(
    "custom_relationship_data",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("tenant_id", Uuid, nullable=False),
    Column("relationship_id", Uuid, nullable=False),
    Column("from_record_id", Uuid, nullable=False),
    Column("to_record_id", Uuid, nullable=False),
    Column("relationship_data", JSONB, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("created_by", Uuid),
)
