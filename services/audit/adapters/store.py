"""Writes audit entries in batches, idempotently on the event id, and chains them per tenant.

Ingest uses asyncpg directly: it is the audit service's hot path and executemany of prepared
INSERTs per tenant group is several times faster than going through the ORM.

Per tenant group, inside one transaction: lock the tenant's chain head (FOR UPDATE, tenants in
id order so two writers never deadlock), drop events already stored (a redelivery or a
re-publish), mask sensitive values, assign the next chain positions and hashes, then write the
entries, their field-level changes and the record versions, and move the head.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from crm.v1 import events_pb2
from services.audit.domain import rules
from shared.db import TENANT_SETTING
from shared.events import OPERATION_NAMES

INSERT_AUDIT_LOG = """
INSERT INTO audit.audit_logs (
    id, event_id, tenant_id, service, table_name, record_id, operation, old_values, new_values,
    changed_fields, record_version, user_id, user_email, session_id, ip_address, user_agent,
    api_endpoint, request_id, changed_at, chain_seq, prev_hash, entry_hash
) VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9::jsonb, $10, $11, $12, $13, $14, $15::inet, $16,
          $17, $18, $19, $20, $21, $22)
ON CONFLICT (event_id, changed_at) DO NOTHING
"""

INSERT_FIELD_CHANGE = """
INSERT INTO audit.field_audit_logs (
    tenant_id, audit_log_id, event_id, table_name, record_id, field_name, old_value, new_value,
    field_type, is_sensitive, changed_at
) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
ON CONFLICT DO NOTHING
"""

INSERT_VERSION = """
INSERT INTO audit.record_versions (
    tenant_id, service, table_name, record_id, version_number, record_data, operation, event_id,
    created_by, created_at
) VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9, $10)
ON CONFLICT DO NOTHING
"""

# Two statements, not one: a non-deferrable unique index is checked row by row, so clearing the
# old current flag and setting the new one in one UPDATE could trip over itself.
CLEAR_CURRENT = """
UPDATE audit.record_versions SET is_current = false
WHERE tenant_id = $1 AND table_name = $2 AND record_id = $3 AND is_current
  AND version_number <> (SELECT max(version_number) FROM audit.record_versions
                         WHERE tenant_id = $1 AND table_name = $2 AND record_id = $3)
"""
SET_CURRENT = """
UPDATE audit.record_versions SET is_current = true
WHERE tenant_id = $1 AND table_name = $2 AND record_id = $3 AND NOT is_current
  AND version_number = (SELECT max(version_number) FROM audit.record_versions
                        WHERE tenant_id = $1 AND table_name = $2 AND record_id = $3)
"""

INSERT_AUTH = """
INSERT INTO audit.auth_audit_logs (
    event_id, tenant_id, user_id, email, event_type, success, failure_reason, ip_address,
    user_agent, session_id, created_at
) VALUES ($1, $2, $3, $4, $5, $6, $7, $8::inet, $9, $10, $11)
ON CONFLICT (event_id) DO NOTHING
"""

INSERT_API_CALL = """
INSERT INTO audit.api_audit_logs (
    event_id, tenant_id, user_id, api_key_id, endpoint, http_method, request_size, response_status,
    status_code, response_size, response_time_ms, ip_address, user_agent, request_id, error_message,
    created_at
) VALUES ($1, $2, $3, $4, $5, 'POST', $6, $7, $8, $9, $10, $11::inet, $12, $13, $14, $15)
ON CONFLICT (event_id, created_at) DO NOTHING
"""

AUTH_EVENT_TYPES = frozenset(
    {
        "login_attempt",
        "login_success",
        "login_failure",
        "logout",
        "password_change",
        "password_reset",
        "mfa_setup",
        "mfa_verification",
        "account_locked",
        "account_unlocked",
        "session_expired",
    }
)

# gRPC status -> the HTTP status it maps to (google.rpc.Code's documented mapping), so the seed's
# response_status column and its ">= 400" error index keep their meaning for gRPC calls.
GRPC_TO_HTTP = {
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}
INT32_MAX = 2**31 - 1
# Auth and API events that belong to no tenant are kept under this id, which no tenant has.
NO_TENANT = uuid.UUID(int=0)


class UndecodableEvent(ValueError):
    """An event that can never be stored (bad bytes or impossible values): dead-letter it."""


# --- decoding --------------------------------------------------------------------------------


def _uuid_or_none(value: str, field: str, required: bool = False) -> uuid.UUID | None:
    if not value:
        if required:
            raise UndecodableEvent(f"{field} is missing")
        return None
    try:
        return uuid.UUID(value)
    except ValueError as exc:
        raise UndecodableEvent(f"{field} is not a UUID") from exc


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _json_object(text: str, field: str) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        # ValueError covers bad JSON and integers beyond Python's digit limit; RecursionError
        # absurd nesting. Either would otherwise crash the loop and come back forever.
        value = json.loads(text)
        if not isinstance(value, dict):
            raise UndecodableEvent(f"{field} is not a JSON object")
        # PostgreSQL's jsonb refuses NUL characters; refusing them here keeps one bad event from
        # failing a whole batch.
        if _has_nul(value):
            raise UndecodableEvent(f"{field} contains a NUL character")
        # A lone surrogate (\ud800) parses in Python but is not UTF-8: jsonb and the hash refuse it.
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError as exc:
        raise UndecodableEvent(f"{field} is not valid Unicode") from exc
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, UndecodableEvent):
            raise
        raise UndecodableEvent(f"{field} is not JSON this log can store") from exc
    return value


def _text(value: str, limit: int) -> str | None:
    if "\x00" in value:
        raise UndecodableEvent("a text field contains a NUL character")
    return value[:limit] or None


def _valid_ip(value: str) -> str | None:
    if not value:
        return None
    try:
        return str(ipaddress.ip_address(value.split("%")[0]))
    except ValueError:
        return None


def _time(event: Any, field: str) -> dt.datetime:
    if not event.HasField(field):
        raise UndecodableEvent(f"{field} is missing")
    try:
        return getattr(event, field).ToDatetime(tzinfo=dt.UTC)  # type: ignore[no-any-return]
    except (ValueError, OverflowError) as exc:
        raise UndecodableEvent(f"{field} is out of range") from exc


@dataclass(frozen=True, slots=True)
class ChangeRow:
    """One decoded change event, values still unmasked (masking needs the tenant's rules)."""

    event_id: uuid.UUID
    tenant_id: uuid.UUID
    service: str
    table_name: str
    record_id: uuid.UUID
    operation: str
    old_values: dict[str, Any] | None
    new_values: dict[str, Any] | None
    changed_fields: tuple[str, ...]
    record_version: int
    user_id: uuid.UUID | None
    user_email: str | None
    session_id: str | None
    ip_address: str | None
    user_agent: str | None
    api_endpoint: str | None
    request_id: str | None
    changed_at: dt.datetime
    #: A soft delete's state after the change (new values are not kept on a DELETE entry).
    deleted_state: dict[str, Any] | None = None


def decode_change(payload: bytes) -> ChangeRow:
    """Decodes one ChangeEvent, or raises UndecodableEvent."""
    try:
        event = events_pb2.ChangeEvent.FromString(payload)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise UndecodableEvent("not a ChangeEvent") from exc
    operation = OPERATION_NAMES.get(event.operation)
    if operation is None:
        raise UndecodableEvent("operation is not set")
    old = _json_object(event.old_values_json, "old_values")
    new = _json_object(event.new_values_json, "new_values")
    # The seed's values_consistency rule, checked before the database would refuse the batch.
    # A soft delete may carry the deleted state as new values: the entry keeps the seed's shape
    # (no new values) and the deleted state becomes the record's last version.
    deleted_state = None
    if operation == "DELETE" and old is not None and new is not None:
        deleted_state, new = new, None
    if (
        (operation == "INSERT" and (old is not None or new is None))
        or (operation == "DELETE" and (old is None or new is not None))
        or (operation in ("UPDATE", "RESTORE") and (old is None or new is None))
    ):
        raise UndecodableEvent(f"old/new values do not fit a {operation}")
    if not event.table_name or not event.service:
        raise UndecodableEvent("table_name and service are required")
    if event.record_version < 0:
        raise UndecodableEvent("record_version is negative")
    actor = event.actor
    event_id = _uuid_or_none(event.event_id, "event_id", required=True)
    tenant_id = _uuid_or_none(event.tenant_id, "tenant_id", required=True)
    record_id = _uuid_or_none(event.record_id, "record_id", required=True)
    assert event_id is not None and tenant_id is not None and record_id is not None
    return ChangeRow(
        event_id=event_id,
        tenant_id=tenant_id,
        service=_text(event.service, 50) or "",
        table_name=_text(event.table_name, 100) or "",
        record_id=record_id,
        operation=operation,
        old_values=old,
        new_values=new,
        changed_fields=tuple(f[:200] for f in event.changed_fields if "\x00" not in f),
        record_version=event.record_version,
        user_id=_uuid_or_none(actor.user_id, "actor.user_id"),
        user_email=_text(actor.email, 255),
        session_id=_text(actor.session_id, 255),
        ip_address=_valid_ip(actor.ip_address),
        user_agent=_text(actor.user_agent, 2000),
        api_endpoint=_text(event.api_endpoint, 500),
        request_id=_text(event.request_id, 100),
        changed_at=_time(event, "occur_time"),
        deleted_state=deleted_state,
    )


def decode_auth(payload: bytes) -> tuple[Any, ...]:
    """Decodes one AuthEvent into the INSERT's parameters, or raises UndecodableEvent."""
    try:
        event = events_pb2.AuthEvent.FromString(payload)
    except Exception as exc:
        raise UndecodableEvent("not an AuthEvent") from exc
    if event.event_type not in AUTH_EVENT_TYPES:
        raise UndecodableEvent(f"event_type {event.event_type[:50]!r} is not an auth event type")
    return (
        _uuid_or_none(event.event_id, "event_id", required=True),
        _uuid_or_none(event.tenant_id, "tenant_id"),
        _uuid_or_none(event.user_id, "user_id"),
        _text(event.email, 255),
        event.event_type,
        event.success,
        _text(event.failure_reason, 255),
        _valid_ip(event.ip_address),
        _text(event.user_agent, 2000),
        _text(event.session_id, 255),
        _time(event, "occur_time"),
    )


def decode_api_call(payload: bytes) -> tuple[Any, ...]:
    """Decodes one ApiCallEvent into the INSERT's parameters, or raises UndecodableEvent."""
    try:
        event = events_pb2.ApiCallEvent.FromString(payload)
    except Exception as exc:
        raise UndecodableEvent("not an ApiCallEvent") from exc
    if not event.endpoint:
        raise UndecodableEvent("endpoint is missing")
    status = event.status_code.upper() or "OK"
    if status not in GRPC_TO_HTTP:
        raise UndecodableEvent(f"status_code {status[:40]!r} is not a gRPC status")
    return (
        _uuid_or_none(event.event_id, "event_id", required=True),
        _uuid_or_none(event.tenant_id, "tenant_id"),
        _uuid_or_none(event.user_id, "user_id"),
        _uuid_or_none(event.api_key_id, "api_key_id"),
        _text(event.endpoint, 500),
        min(max(event.request_size, 0), INT32_MAX),
        GRPC_TO_HTTP[status],
        status,
        min(max(event.response_size, 0), INT32_MAX),
        min(max(event.duration_ms, 0), INT32_MAX),
        _valid_ip(event.ip_address),
        _text(event.user_agent, 2000),
        _text(event.request_id, 100),
        _text(event.error_message, 4000),
        _time(event, "occur_time"),
    )


# --- writing ---------------------------------------------------------------------------------


def _dump(values: dict[str, Any] | None) -> str | None:
    if values is None:
        return None
    return json.dumps(values, sort_keys=True, separators=(",", ":"))


async def tenant_rules(conn: asyncpg.Connection, tenant_id: uuid.UUID) -> rules.SensitiveFields:
    marked = await conn.fetch(
        "SELECT table_name, field_name FROM audit.sensitive_fields WHERE tenant_id = $1", tenant_id
    )
    return rules.SensitiveFields(frozenset((r["table_name"], r["field_name"]) for r in marked))


async def _write_tenant_changes(conn: asyncpg.Connection, tenant_id: uuid.UUID, rows: list[ChangeRow]) -> int:
    await conn.execute("SELECT set_config($1, $2, true)", TENANT_SETTING, str(tenant_id))
    await conn.execute(
        "INSERT INTO audit.audit_chain_heads (tenant_id) VALUES ($1) ON CONFLICT DO NOTHING", tenant_id
    )
    head = await conn.fetchrow(
        "SELECT last_seq, last_hash FROM audit.audit_chain_heads WHERE tenant_id = $1 FOR UPDATE", tenant_id
    )
    assert head is not None
    # Under the head lock nobody else writes this tenant, so check-then-insert is safe.
    stored = {
        r["event_id"]
        for r in await conn.fetch(
            "SELECT event_id FROM audit.audit_logs WHERE tenant_id = $1 AND event_id = ANY($2::uuid[])",
            tenant_id,
            [row.event_id for row in rows],
        )
    }
    fresh: dict[uuid.UUID, ChangeRow] = {}
    for row in sorted(rows, key=lambda r: (r.changed_at, str(r.event_id))):
        if row.event_id not in stored and row.event_id not in fresh:
            fresh[row.event_id] = row
    if not fresh:
        return 0
    sensitive = await tenant_rules(conn, tenant_id)
    seq, previous = int(head["last_seq"]), str(head["last_hash"])
    entries, fields, versions = [], [], []
    next_version: dict[tuple[str, uuid.UUID], int] = {}
    for row in fresh.values():
        entry_id = uuid.uuid4()
        old = rules.mask_values(row.old_values, row.table_name, sensitive)
        new = rules.mask_values(row.new_values, row.table_name, sensitive)
        old_text, new_text = _dump(old), _dump(new)
        changed = list(row.changed_fields)
        if row.operation in ("UPDATE", "RESTORE"):
            # By value, over the unmasked values; the publisher's list is kept as well since it
            # may name secret columns it stripped from the values.
            changed = sorted({*changed, *rules.changed_fields(row.old_values, row.new_values)})
            for change in rules.field_changes(row.old_values, row.new_values, row.table_name, sensitive):
                fields.append(
                    (
                        tenant_id,
                        entry_id,
                        row.event_id,
                        row.table_name,
                        row.record_id,
                        change.field_name,
                        change.old_value,
                        change.new_value,
                        change.field_type,
                        change.is_sensitive,
                        row.changed_at,
                    )
                )
        seq += 1
        entry: dict[str, Any] = {
            "chain_seq": seq,
            "prev_hash": previous,
            "event_id": row.event_id,
            "tenant_id": tenant_id,
            "service": row.service,
            "table_name": row.table_name,
            "record_id": row.record_id,
            "operation": row.operation,
            "changed_fields": changed,
            "record_version": row.record_version,
            "user_id": row.user_id,
            "user_email": row.user_email,
            "session_id": row.session_id,
            "ip_address": row.ip_address,
            "user_agent": row.user_agent,
            "api_endpoint": row.api_endpoint,
            "request_id": row.request_id,
            "changed_at": row.changed_at,
        }
        digest_old = rules.values_digest(rules.parse_json(old_text))
        digest_new = rules.values_digest(rules.parse_json(new_text))
        entry_hash = rules.entry_hash(entry, digest_old, digest_new)
        entries.append(
            (
                entry_id,
                row.event_id,
                tenant_id,
                row.service,
                row.table_name,
                row.record_id,
                row.operation,
                old_text,
                new_text,
                changed,
                row.record_version,
                row.user_id,
                row.user_email,
                row.session_id,
                row.ip_address,
                row.user_agent,
                row.api_endpoint,
                row.request_id,
                row.changed_at,
                seq,
                previous,
                entry_hash,
            )
        )
        previous = entry_hash
        version = row.record_version
        key = (row.table_name, row.record_id)
        if version <= 0:
            # A publisher without record versions: number them in arrival order.
            if key not in next_version:
                latest = await conn.fetchval(
                    "SELECT max(version_number) FROM audit.record_versions "
                    "WHERE tenant_id = $1 AND table_name = $2 AND record_id = $3",
                    tenant_id,
                    row.table_name,
                    row.record_id,
                )
                next_version[key] = int(latest or 0)
            next_version[key] += 1
            version = next_version[key]
        else:
            next_version[key] = max(next_version.get(key, 0), version)
        if row.deleted_state is not None:
            state_text = _dump(rules.mask_values(row.deleted_state, row.table_name, sensitive))
        else:
            state_text = new_text if new_text is not None else old_text
        versions.append(
            (
                tenant_id,
                row.service,
                row.table_name,
                row.record_id,
                version,
                state_text,
                row.operation,
                row.event_id,
                row.user_id,
                row.changed_at,
            )
        )
    await conn.executemany(INSERT_AUDIT_LOG, entries)
    if fields:
        await conn.executemany(INSERT_FIELD_CHANGE, fields)
    await conn.executemany(INSERT_VERSION, versions)
    touched = [(tenant_id, table, record) for table, record in next_version]
    await conn.executemany(CLEAR_CURRENT, touched)
    await conn.executemany(SET_CURRENT, touched)
    await conn.execute(
        "UPDATE audit.audit_chain_heads SET last_seq = $2, last_hash = $3, updated_at = now() "
        "WHERE tenant_id = $1",
        tenant_id,
        seq,
        previous,
    )
    return len(entries)


async def write_changes(pool: asyncpg.Pool, rows: Sequence[ChangeRow]) -> int:
    """Writes change events of many tenants in one transaction; returns how many were new."""
    by_tenant: dict[uuid.UUID, list[ChangeRow]] = defaultdict(list)
    for row in rows:
        by_tenant[row.tenant_id].append(row)
    written = 0
    async with pool.acquire() as conn, conn.transaction():
        # Tenants in a fixed order: two writers locking two heads never wait on each other in a cycle.
        for tenant_id in sorted(by_tenant, key=str):
            written += await _write_tenant_changes(conn, tenant_id, by_tenant[tenant_id])
    return written


async def _write_simple(pool: asyncpg.Pool, sql: str, rows: Sequence[tuple[Any, ...]]) -> int:
    # Forced row-level security checks each row against the transaction's tenant, so rows are
    # written per tenant; rows without a tenant go under the nil UUID (see migration 0002).
    by_tenant: dict[uuid.UUID, list[tuple[Any, ...]]] = defaultdict(list)
    for row in rows:
        tenant_id = row[1] or NO_TENANT
        by_tenant[tenant_id].append((row[0], tenant_id, *row[2:]))
    async with pool.acquire() as conn, conn.transaction():
        for tenant_id, tenant_rows in by_tenant.items():
            await conn.execute("SELECT set_config($1, $2, true)", TENANT_SETTING, str(tenant_id))
            await conn.executemany(sql, tenant_rows)
    return len(rows)


async def write_auth_events(pool: asyncpg.Pool, rows: Sequence[tuple[Any, ...]]) -> int:
    return await _write_simple(pool, INSERT_AUTH, rows)


async def write_api_calls(pool: asyncpg.Pool, rows: Sequence[tuple[Any, ...]]) -> int:
    return await _write_simple(pool, INSERT_API_CALL, rows)
