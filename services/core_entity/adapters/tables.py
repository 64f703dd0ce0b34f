"""Table models of the core schema (the migrations are the source of truth for DDL)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    Uuid,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData(schema="core")


def _audit_columns(soft_delete: bool = True) -> list[Column[object]]:
    columns: list[Column[object]] = [
        Column("version", BigInteger, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
        Column("created_by", Uuid, nullable=False),
        Column("updated_by", Uuid, nullable=False),
    ]
    if soft_delete:
        columns.append(Column("deleted_at", DateTime(timezone=True)))
    return columns


accounts = Table(
    "accounts",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("tenant_id", Uuid, nullable=False),
    Column("name", String(255), nullable=False),
    Column("account_type", String(50), nullable=False),
    Column("industry", String(100)),
    Column("website", String(255)),
    Column("phone", String(50)),
    Column("billing_address", JSONB),
    Column("shipping_address", JSONB),
    Column("parent_account_id", Uuid),
    Column("annual_revenue", Numeric(15, 2)),
    Column("employee_count", Integer),
    Column("description", Text),
    Column("custom_fields", JSONB, nullable=False),
    *_audit_columns(),
)

contacts = Table(
    "contacts",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("tenant_id", Uuid, nullable=False),
    Column("account_id", Uuid),
    Column("first_name", String(100), nullable=False),
    Column("last_name", String(100), nullable=False),
    Column("email", String(255)),
    Column("phone", String(50)),
    Column("mobile", String(50)),
    Column("title", String(100)),
    Column("department", String(100)),
    Column("mailing_address", JSONB),
    Column("lead_source", String(100)),
    Column("contact_status", String(50), nullable=False),
    Column("do_not_call", Boolean, nullable=False),
    Column("do_not_email", Boolean, nullable=False),
    Column("email_opt_out", Boolean, nullable=False),
    Column("description", Text),
    Column("custom_fields", JSONB, nullable=False),
    *_audit_columns(),
)

leads = Table(
    "leads",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("tenant_id", Uuid, nullable=False),
    Column("first_name", String(100), nullable=False),
    Column("last_name", String(100), nullable=False),
    Column("email", String(255)),
    Column("phone", String(50)),
    Column("company", String(255)),
    Column("title", String(100)),
    Column("lead_source", String(100)),
    Column("lead_status", String(50), nullable=False),
    Column("lead_score", Integer, nullable=False),
    Column("rating", String(20)),
    Column("industry", String(100)),
    Column("annual_revenue", Numeric(15, 2)),
    Column("employee_count", Integer),
    Column("website", String(255)),
    Column("mailing_address", JSONB),
    Column("description", Text),
    Column("converted", Boolean, nullable=False),
    Column("converted_date", DateTime(timezone=True)),
    Column("converted_contact_id", Uuid),
    Column("converted_account_id", Uuid),
    Column("converted_deal_id", Uuid),
    Column("custom_fields", JSONB, nullable=False),
    *_audit_columns(),
)

pipelines = Table(
    "pipelines",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("tenant_id", Uuid, nullable=False),
    Column("name", String(255), nullable=False),
    Column("description", Text),
    Column("is_default", Boolean, nullable=False),
    Column("is_active", Boolean, nullable=False),
    *_audit_columns(),
)

pipeline_stages = Table(
    "pipeline_stages",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("tenant_id", Uuid, nullable=False),
    Column("pipeline_id", Uuid, nullable=False),
    Column("name", String(255), nullable=False),
    Column("stage_order", Integer, nullable=False),
    Column("probability", Numeric(5, 2), nullable=False),
    Column("is_closed", Boolean, nullable=False),
    Column("is_won", Boolean, nullable=False),
    *_audit_columns(soft_delete=False),
)

deals = Table(
    "deals",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("tenant_id", Uuid, nullable=False),
    Column("account_id", Uuid),
    Column("contact_id", Uuid),
    Column("pipeline_id", Uuid, nullable=False),
    Column("stage_id", Uuid, nullable=False),
    Column("name", String(255), nullable=False),
    Column("amount", Numeric(15, 2)),
    Column("currency", String(3), nullable=False),
    Column("probability", Numeric(5, 2)),
    Column("expected_close_date", Date),
    Column("actual_close_date", Date),
    Column("deal_type", String(50)),
    Column("lead_source", String(100)),
    Column("next_step", Text),
    Column("description", Text),
    Column("is_closed", Boolean, nullable=False),
    Column("is_won", Boolean, nullable=False),
    Column("custom_fields", JSONB, nullable=False),
    *_audit_columns(),
)

activities = Table(
    "activities",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("tenant_id", Uuid, primary_key=True),
    Column("account_id", Uuid),
    Column("contact_id", Uuid),
    Column("lead_id", Uuid),
    Column("deal_id", Uuid),
    Column("activity_type", String(50), nullable=False),
    Column("subject", String(255), nullable=False),
    Column("description", Text),
    Column("status", String(20), nullable=False),
    Column("priority", String(20), nullable=False),
    Column("due_date", DateTime(timezone=True)),
    Column("completed_date", DateTime(timezone=True)),
    Column("duration_minutes", Integer),
    Column("location", String(255)),
    Column("is_all_day", Boolean, nullable=False),
    Column("reminder_minutes", Integer),
    Column("custom_fields", JSONB, nullable=False),
    *_audit_columns(),
    Column("assigned_to", Uuid, nullable=False),
)

tenant_currencies = Table(
    "tenant_currencies",
    metadata,
    Column("tenant_id", Uuid, primary_key=True),
    Column("currency_code", String(3), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

import_rows = Table(
    "import_rows",
    metadata,
    Column("tenant_id", Uuid, primary_key=True),
    Column("import_id", Uuid, primary_key=True),
    Column("row_index", BigInteger, primary_key=True),
    Column("entity_type", String(20), nullable=False),
    Column("record_id", Uuid, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
