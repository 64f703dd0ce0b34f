"""The tenant's compliance registers kept by the audit service: tenant-marked sensitive fields,
processing activities, consents, retention policies and the deletion log."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from services.audit.service_layer.db import (
    Violations,
    Where,
    caller_tenant,
    fetch_page,
    keyset_after,
    page_of,
    tenant_transaction,
)
from shared import paging
from shared.context import current_call
from shared.errors import AlreadyExists, FailedPrecondition, NotFound, invalid

LEGAL_BASES = (
    "consent",
    "contract",
    "legal_obligation",
    "vital_interests",
    "public_task",
    "legitimate_interests",
)
RETENTION_METHODS = ("soft_delete", "hard_delete", "anonymize")
MAX_LIST_ITEMS = 100
IDENTIFIER_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")


def _identifier(check: Violations, value: str, field_name: str, *, allow_star: bool = False) -> str:
    """Table and field names: lower-case identifiers (as the owning services name them)."""
    name = check.text(value, field_name, required=True, limit=100)
    if (
        name
        and not (allow_star and name == "*")
        and not (set(name) <= IDENTIFIER_CHARS and name[0].isalpha())
    ):
        check.add(field_name, "must be a lower-case identifier (letters, digits, underscores)")
    return name


def _string_list(check: Violations, values: list[str], field_name: str) -> list[str]:
    if len(values) > MAX_LIST_ITEMS:
        check.add(field_name, f"must have at most {MAX_LIST_ITEMS} items")
    cleaned = []
    for index, value in enumerate(values):
        text = check.text(value, f"{field_name}[{index}]", required=True, limit=255)
        cleaned.append(text)
    return cleaned


def _json_object(check: Violations, text: str, field_name: str) -> dict[str, Any]:
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        check.add(field_name, "must be a JSON object")
        return {}
    if not isinstance(value, dict):
        check.add(field_name, "must be a JSON object")
        return {}
    if "\\u0000" in text:
        check.add(field_name, "must not contain NUL characters")
    return value


def _is_unique_violation(exc: BaseException) -> bool:
    return isinstance(exc, asyncpg.UniqueViolationError)


# --- sensitive fields ------------------------------------------------------------------------


async def create_sensitive_field(pool: asyncpg.Pool, table_name: str, field_name: str) -> dict[str, Any]:
    tenant_id = caller_tenant()
    check = Violations()
    table = _identifier(check, table_name, "sensitive_field.table_name", allow_star=True)
    name = check.text(field_name, "sensitive_field.field_name", required=True, limit=200)
    check.raise_if_any()
    async with tenant_transaction(pool, tenant_id) as conn:
        row = await conn.fetchrow(
            "INSERT INTO audit.sensitive_fields (tenant_id, table_name, field_name) VALUES ($1, $2, $3) "
            "ON CONFLICT DO NOTHING RETURNING *",
            uuid.UUID(tenant_id),
            table,
            name,
        )
    if row is None:
        raise AlreadyExists(f"{table}.{name} is already marked sensitive")
    return dict(row)


async def list_sensitive_fields(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    tenant_id = caller_tenant()
    async with tenant_transaction(pool, tenant_id, readonly=True) as conn:
        rows = await conn.fetch(
            "SELECT * FROM audit.sensitive_fields WHERE tenant_id = $1 ORDER BY table_name, field_name",
            uuid.UUID(tenant_id),
        )
    return [dict(row) for row in rows]


async def delete_sensitive_field(pool: asyncpg.Pool, table_name: str, field_name: str) -> None:
    tenant_id = caller_tenant()
    check = Violations()
    table = _identifier(check, table_name, "table_name", allow_star=True)
    name = check.text(field_name, "field_name", required=True, limit=200)
    check.raise_if_any()
    async with tenant_transaction(pool, tenant_id) as conn:
        deleted = await conn.fetchval(
            "DELETE FROM audit.sensitive_fields WHERE tenant_id = $1 AND table_name = $2 AND field_name = $3 "
            "RETURNING 1",
            uuid.UUID(tenant_id),
            table,
            name,
        )
    if not deleted:
        raise NotFound(f"{table}.{name} is not marked sensitive")


# --- processing activities ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcessingActivityInput:
    activity_name: str
    purpose: str
    legal_basis: str
    data_categories: list[str] = field(default_factory=list)
    data_subjects: list[str] = field(default_factory=list)
    recipients: list[str] = field(default_factory=list)
    retention_period: dt.timedelta | None = None
    cross_border_transfers: bool = False
    security_measures: list[str] = field(default_factory=list)


async def create_processing_activity(pool: asyncpg.Pool, data: ProcessingActivityInput) -> dict[str, Any]:
    tenant_id = caller_tenant()
    check = Violations()
    prefix = "processing_activity."
    name = check.text(data.activity_name, prefix + "activity_name", required=True, limit=255)
    purpose = check.text(data.purpose, prefix + "purpose", required=True, limit=500)
    if data.legal_basis not in LEGAL_BASES:
        check.add(prefix + "legal_basis", "must be one of " + ", ".join(LEGAL_BASES))
    categories = _string_list(check, data.data_categories, prefix + "data_categories")
    subjects = _string_list(check, data.data_subjects, prefix + "data_subjects")
    recipients = _string_list(check, data.recipients, prefix + "recipients")
    measures = _string_list(check, data.security_measures, prefix + "security_measures")
    if data.retention_period is not None and data.retention_period <= dt.timedelta(0):
        check.add(prefix + "retention_period", "must be positive")
    check.raise_if_any()
    try:
        async with tenant_transaction(pool, tenant_id) as conn:
            row = await conn.fetchrow(
                "INSERT INTO audit.data_processing_activities (tenant_id, activity_name, purpose, "
                "legal_basis, data_categories, data_subjects, recipients, retention_period, "
                "cross_border_transfers, security_measures) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING *",
                uuid.UUID(tenant_id),
                name,
                purpose,
                data.legal_basis,
                categories,
                subjects,
                recipients,
                data.retention_period,
                data.cross_border_transfers,
                measures,
            )
    except asyncpg.UniqueViolationError as exc:
        raise AlreadyExists(f"a processing activity named {name!r} already exists") from exc
    assert row is not None
    return dict(row)


async def list_processing_activities(
    pool: asyncpg.Pool, page_size: int, page_token: str
) -> tuple[list[dict[str, Any]], str]:
    tenant_id = caller_tenant()
    size = paging.page_size(page_size)
    fingerprint = paging.query_fingerprint("activities")
    cursor = paging.decode_token(page_token, fingerprint)
    after = ""
    if cursor is not None:
        if not cursor or not isinstance(cursor[0], str):
            raise invalid("page_token", "is not a token this method issued")
        after = cursor[0]
    async with tenant_transaction(pool, tenant_id, readonly=True) as conn:
        rows = [
            dict(row)
            for row in await conn.fetch(
                "SELECT * FROM audit.data_processing_activities WHERE tenant_id = $1 AND activity_name > $2 "
                "ORDER BY activity_name LIMIT $3",
                uuid.UUID(tenant_id),
                after,
                size + 1,
            )
        ]
    token = ""
    if len(rows) > size:
        rows = rows[:size]
        token = paging.encode_token([rows[-1]["activity_name"]], fingerprint)
    return rows, token


async def all_processing_activities(conn: asyncpg.Connection, tenant_id: str) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT * FROM audit.data_processing_activities WHERE tenant_id = $1 ORDER BY activity_name",
        uuid.UUID(tenant_id),
    )
    return [dict(row) for row in rows]


# --- consents -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConsentInput:
    contact_id: str
    lead_id: str
    consent_type: str
    consent_given: bool
    consent_time: dt.datetime | None
    consent_method: str
    consent_evidence_json: str
    ip_address: str
    user_agent: str


def _ip(check: Violations, value: str, field_name: str) -> str | None:
    import ipaddress

    if not value:
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        check.add(field_name, "must be an IPv4 or IPv6 address")
        return None


async def record_consent(pool: asyncpg.Pool, data: ConsentInput) -> dict[str, Any]:
    tenant_id = caller_tenant()
    check = Violations()
    prefix = "consent_record."
    contact = check.uuid(data.contact_id, prefix + "contact_id")
    lead = check.uuid(data.lead_id, prefix + "lead_id")
    if bool(data.contact_id) == bool(data.lead_id):
        check.add(prefix + "contact_id", "set exactly one of contact_id and lead_id")
    consent_type = check.text(data.consent_type, prefix + "consent_type", required=True, limit=100)
    method = check.text(data.consent_method, prefix + "consent_method", limit=100)
    evidence = _json_object(check, data.consent_evidence_json, prefix + "consent_evidence_json")
    ip = _ip(check, data.ip_address, prefix + "ip_address")
    agent = check.text(data.user_agent, prefix + "user_agent", limit=2000)
    now = dt.datetime.now(dt.UTC)
    given_at = data.consent_time or now
    if given_at > now + dt.timedelta(minutes=5):
        check.add(prefix + "consent_time", "must not be in the future")
    check.raise_if_any()
    async with tenant_transaction(pool, tenant_id) as conn:
        row = await conn.fetchrow(
            "INSERT INTO audit.consent_records (tenant_id, contact_id, lead_id, consent_type, consent_given, "
            "consent_date, consent_method, consent_evidence, ip_address, user_agent) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9::inet, $10) RETURNING *",
            uuid.UUID(tenant_id),
            contact,
            lead,
            consent_type,
            data.consent_given,
            given_at,
            method or None,
            json.dumps(evidence) if evidence else None,
            ip,
            agent or None,
        )
    assert row is not None
    return dict(row)


async def withdraw_consent(
    pool: asyncpg.Pool, consent_id: str, method: str, when: dt.datetime | None
) -> dict[str, Any]:
    tenant_id = caller_tenant()
    check = Violations()
    consent = check.uuid(consent_id, "id", required=True)
    how = check.text(method, "withdrawal_method", limit=100)
    now = dt.datetime.now(dt.UTC)
    when = when or now
    if when > now + dt.timedelta(minutes=5):
        check.add("withdraw_time", "must not be in the future")
    check.raise_if_any()
    async with tenant_transaction(pool, tenant_id) as conn:
        current = await conn.fetchrow(
            "SELECT * FROM audit.consent_records WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
            uuid.UUID(tenant_id),
            consent,
        )
        if current is None:
            raise NotFound("consent record not found")
        if current["withdrawn_date"] is not None:
            raise FailedPrecondition("the consent was already withdrawn")
        if when < current["consent_date"]:
            raise invalid("withdraw_time", "must not be before the consent was given")
        row = await conn.fetchrow(
            "UPDATE audit.consent_records SET withdrawn_date = $3, withdrawal_method = $4 "
            "WHERE tenant_id = $1 AND id = $2 RETURNING *",
            uuid.UUID(tenant_id),
            consent,
            when,
            how or None,
        )
    assert row is not None
    return dict(row)


async def list_consents(
    pool: asyncpg.Pool, page_size: int, page_token: str, contact_id: str, lead_id: str, consent_type: str
) -> tuple[list[dict[str, Any]], str]:
    tenant_id = caller_tenant()
    size = paging.page_size(page_size)
    check = Violations()
    contact = check.uuid(contact_id, "contact_id")
    lead = check.uuid(lead_id, "lead_id")
    kind = check.text(consent_type, "consent_type", limit=100)
    check.raise_if_any()
    where = Where()
    where.bind("tenant_id = {}", uuid.UUID(tenant_id))
    if contact:
        where.bind("contact_id = {}", contact)
    if lead:
        where.bind("lead_id = {}", lead)
    if kind:
        where.bind("consent_type = {}", kind)
    fingerprint = paging.query_fingerprint("consents", contact_id, lead_id, kind)
    return await fetch_page(
        pool, tenant_id, "audit.consent_records", where, page_token, fingerprint, "consent_date", size
    )


# --- retention policies -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetentionPolicyInput:
    policy_name: str
    table_name: str
    retention_period: dt.timedelta | None
    deletion_method: str
    conditions_json: str
    active: bool = True


async def create_retention_policy(pool: asyncpg.Pool, data: RetentionPolicyInput) -> dict[str, Any]:
    tenant_id = caller_tenant()
    check = Violations()
    prefix = "retention_policy."
    name = check.text(data.policy_name, prefix + "policy_name", required=True, limit=255)
    table = _identifier(check, data.table_name, prefix + "table_name")
    if data.retention_period is None:
        check.add(prefix + "retention_period", "is required")
    elif data.retention_period < dt.timedelta(days=1):
        check.add(prefix + "retention_period", "must be at least one day")
    elif data.retention_period > dt.timedelta(days=365 * 100):
        check.add(prefix + "retention_period", "must be at most 100 years")
    if data.deletion_method not in RETENTION_METHODS:
        check.add(prefix + "deletion_method", "must be soft_delete, hard_delete or anonymize")
    conditions = _json_object(check, data.conditions_json, prefix + "conditions_json")
    for key, value in conditions.items():
        if not (set(key) <= IDENTIFIER_CHARS and key[:1].isalpha()):
            check.add(prefix + "conditions_json", f"key {key[:60]!r} must be a column name")
        if isinstance(value, dict | list):
            check.add(
                prefix + "conditions_json", f"value of {key[:60]!r} must be a string, number, boolean or null"
            )
    check.raise_if_any()
    try:
        async with tenant_transaction(pool, tenant_id) as conn:
            row = await conn.fetchrow(
                "INSERT INTO audit.data_retention_policies (tenant_id, policy_name, table_name, "
                "retention_period, deletion_method, conditions, is_active) "
                "VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7) RETURNING *",
                uuid.UUID(tenant_id),
                name,
                table,
                data.retention_period,
                data.deletion_method,
                json.dumps(conditions),
                data.active,
            )
    except asyncpg.UniqueViolationError as exc:
        raise AlreadyExists(f"table {table} already has a policy named {name!r}") from exc
    assert row is not None
    return dict(row)


async def list_retention_policies(
    pool: asyncpg.Pool, page_size: int, page_token: str
) -> tuple[list[dict[str, Any]], str]:
    tenant_id = caller_tenant()
    size = paging.page_size(page_size)
    fingerprint = paging.query_fingerprint("retention")
    where = Where()
    where.bind("tenant_id = {}", uuid.UUID(tenant_id))
    keyset_after(where, page_token, fingerprint, "created_at", descending=False)
    limit = where.next_param(size + 1)
    async with tenant_transaction(pool, tenant_id, readonly=True) as conn:
        rows = [
            dict(row)
            for row in await conn.fetch(
                f"SELECT * FROM audit.data_retention_policies WHERE {where.sql()} "
                f"ORDER BY created_at, id LIMIT {limit}",
                *where.params,
            )
        ]
    return page_of(rows, size, fingerprint, "created_at")


# --- deletion log -------------------------------------------------------------------------------


async def add_deletion_log(
    conn: asyncpg.Connection,
    tenant_id: str,
    *,
    table_name: str,
    method: str,
    reason: str,
    count: int,
    summary: dict[str, Any],
    record_id: uuid.UUID | None = None,
) -> uuid.UUID:
    user = current_call().user_id
    deleted_by = None
    if user:
        try:
            deleted_by = uuid.UUID(user)
        except ValueError:
            deleted_by = None
    value = await conn.fetchval(
        "INSERT INTO audit.data_deletion_logs (tenant_id, table_name, record_id, deletion_reason, "
        "deletion_method, deleted_by, record_count, summary) VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb) "
        "RETURNING id",
        uuid.UUID(tenant_id),
        table_name[:100],
        record_id,
        reason[:255] or None,
        method,
        deleted_by,
        count,
        json.dumps(summary, sort_keys=True),
    )
    return value  # type: ignore[no-any-return]


async def list_deletion_logs(
    pool: asyncpg.Pool, page_size: int, page_token: str, table_name: str
) -> tuple[list[dict[str, Any]], str]:
    tenant_id = caller_tenant()
    size = paging.page_size(page_size)
    check = Violations()
    table = check.text(table_name, "table_name", limit=100)
    check.raise_if_any()
    where = Where()
    where.bind("tenant_id = {}", uuid.UUID(tenant_id))
    if table:
        where.bind("table_name = {}", table)
    fingerprint = paging.query_fingerprint("deletions", table)
    return await fetch_page(
        pool, tenant_id, "audit.data_deletion_logs", where, page_token, fingerprint, "deleted_at", size
    )
