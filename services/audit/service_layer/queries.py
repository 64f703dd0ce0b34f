"""Read side of the audit service, always scoped to the caller's tenant: audit log, record
history with field-level changes, record versions, user activity, auth and API audit, and the
hash-chain verification."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg

from services.audit.domain.rules import OPERATIONS, ChainVerifier
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
from shared.errors import NotFound, invalid

LIVE_LOGS = "audit.audit_logs"
# The archive parent is created LIKE the live table, so the two unite column for column.
WITH_ARCHIVE_LOGS = "(SELECT * FROM audit.audit_logs UNION ALL SELECT * FROM audit_archive.audit_logs) AS a"
LIVE_FIELDS = "audit.field_audit_logs"
WITH_ARCHIVE_FIELDS = (
    "(SELECT * FROM audit.field_audit_logs UNION ALL SELECT * FROM audit_archive.field_audit_logs) AS f"
)


def _logs(include_archive: bool) -> str:
    return WITH_ARCHIVE_LOGS if include_archive else LIVE_LOGS


@dataclass(frozen=True, slots=True)
class AuditLogQuery:
    page_size: int = 0
    page_token: str = ""
    table_name: str = ""
    record_id: str = ""
    user_id: str = ""
    operation: str = ""
    start_time: dt.datetime | None = None
    end_time: dt.datetime | None = None
    include_archive: bool = False


async def list_audit_logs(pool: asyncpg.Pool, query: AuditLogQuery) -> tuple[list[dict[str, Any]], str]:
    tenant_id = caller_tenant()
    size = paging.page_size(query.page_size)
    check = Violations()
    record_id = check.uuid(query.record_id, "record_id")
    user_id = check.uuid(query.user_id, "user_id")
    table_name = check.text(query.table_name, "table_name", limit=100)
    if query.operation and query.operation not in OPERATIONS:
        check.add("operation", "must be INSERT, UPDATE, DELETE or RESTORE")
    check.time_range(query.start_time, query.end_time)
    check.raise_if_any()
    where = Where()
    where.bind("tenant_id = {}", uuid.UUID(tenant_id))
    if table_name:
        where.bind("table_name = {}", table_name)
    if record_id:
        where.bind("record_id = {}", record_id)
    if user_id:
        where.bind("user_id = {}", user_id)
    if query.operation:
        where.bind("operation = {}", query.operation)
    if query.start_time is not None:
        where.bind("changed_at >= {}", query.start_time)
    if query.end_time is not None:
        where.bind("changed_at < {}", query.end_time)
    fingerprint = paging.query_fingerprint(
        "audit_logs",
        table_name,
        query.record_id,
        query.user_id,
        query.operation,
        query.start_time,
        query.end_time,
        query.include_archive,
    )
    return await fetch_page(
        pool,
        tenant_id,
        _logs(query.include_archive),
        where,
        query.page_token,
        fingerprint,
        "changed_at",
        size,
    )


def _record_key(table_name: str, record_id: str) -> tuple[str, uuid.UUID]:
    check = Violations()
    table = check.text(table_name, "table_name", required=True, limit=100)
    record = check.uuid(record_id, "record_id", required=True)
    check.raise_if_any()
    assert record is not None
    return table, record


async def record_history(
    pool: asyncpg.Pool,
    table_name: str,
    record_id: str,
    page_size: int,
    page_token: str,
    include_archive: bool,
) -> tuple[list[tuple[dict[str, Any], list[dict[str, Any]]]], str]:
    """The record's entries oldest first, each with its field-level changes."""
    tenant_id = caller_tenant()
    table, record = _record_key(table_name, record_id)
    size = paging.page_size(page_size)
    where = Where()
    where.bind("tenant_id = {}", uuid.UUID(tenant_id))
    where.bind("table_name = {}", table)
    where.bind("record_id = {}", record)
    fingerprint = paging.query_fingerprint("history", table, str(record), include_archive)
    keyset_after(where, page_token, fingerprint, "changed_at", descending=False)
    limit = where.next_param(size + 1)
    async with tenant_transaction(pool, tenant_id, readonly=True) as conn:
        rows = [
            dict(row)
            for row in await conn.fetch(
                f"SELECT * FROM {_logs(include_archive)} WHERE {where.sql()} "
                f"ORDER BY changed_at, id LIMIT {limit}",
                *where.params,
            )
        ]
        rows, token = page_of(rows, size, fingerprint, "changed_at")
        fields_source = WITH_ARCHIVE_FIELDS if include_archive else LIVE_FIELDS
        changes = await conn.fetch(
            f"SELECT * FROM {fields_source} WHERE tenant_id = $1 AND audit_log_id = ANY($2::uuid[]) "
            "ORDER BY field_name",
            uuid.UUID(tenant_id),
            [row["id"] for row in rows],
        )
    by_entry: dict[uuid.UUID, list[dict[str, Any]]] = {}
    for change in changes:
        by_entry.setdefault(change["audit_log_id"], []).append(dict(change))
    return [(row, by_entry.get(row["id"], [])) for row in rows], token


async def list_record_versions(
    pool: asyncpg.Pool, table_name: str, record_id: str, page_size: int, page_token: str
) -> tuple[list[dict[str, Any]], str]:
    tenant_id = caller_tenant()
    table, record = _record_key(table_name, record_id)
    size = paging.page_size(page_size)
    fingerprint = paging.query_fingerprint("versions", table, str(record))
    cursor = paging.decode_token(page_token, fingerprint)
    below = None
    if cursor is not None:
        if not cursor or not isinstance(cursor[0], int):
            raise invalid("page_token", "is not a token this method issued")
        below = cursor[0]
    async with tenant_transaction(pool, tenant_id, readonly=True) as conn:
        rows = [
            dict(row)
            for row in await conn.fetch(
                "SELECT * FROM audit.record_versions WHERE tenant_id = $1 AND table_name = $2 "
                "AND record_id = $3 AND ($4::bigint IS NULL OR version_number < $4) "
                "ORDER BY version_number DESC LIMIT $5",
                uuid.UUID(tenant_id),
                table,
                record,
                below,
                size + 1,
            )
        ]
    token = ""
    if len(rows) > size:
        rows = rows[:size]
        token = paging.encode_token([int(rows[-1]["version_number"])], fingerprint)
    return rows, token


async def get_record_version(
    pool: asyncpg.Pool, table_name: str, record_id: str, version_number: int
) -> dict[str, Any]:
    tenant_id = caller_tenant()
    check = Violations()
    table = check.text(table_name, "table_name", required=True, limit=100)
    record = check.uuid(record_id, "record_id", required=True)
    if version_number < 1:
        check.add("version_number", "must be at least 1")
    check.raise_if_any()
    async with tenant_transaction(pool, tenant_id, readonly=True) as conn:
        row = await conn.fetchrow(
            "SELECT * FROM audit.record_versions WHERE tenant_id = $1 AND table_name = $2 "
            "AND record_id = $3 AND version_number = $4",
            uuid.UUID(tenant_id),
            table,
            record,
            version_number,
        )
    if row is None:
        raise NotFound(f"version {version_number} of {table} {record} not found")
    return dict(row)


async def user_activity_summary(
    pool: asyncpg.Pool, user_id: str, start: dt.datetime | None, end: dt.datetime | None
) -> list[dict[str, Any]]:
    tenant_id = caller_tenant()
    check = Violations()
    user = check.uuid(user_id, "user_id", required=True)
    end = end or dt.datetime.now(dt.UTC)
    start = start or end - dt.timedelta(days=30)
    check.time_range(start, end)
    check.raise_if_any()
    async with tenant_transaction(pool, tenant_id, readonly=True) as conn:
        rows = await conn.fetch(
            "SELECT table_name, operation, count(*) AS count, max(changed_at) AS last_activity "
            "FROM audit.audit_logs WHERE tenant_id = $1 AND user_id = $2 "
            "AND changed_at >= $3 AND changed_at < $4 "
            "GROUP BY table_name, operation ORDER BY last_activity DESC, table_name, operation",
            uuid.UUID(tenant_id),
            user,
            start,
            end,
        )
    return [dict(row) for row in rows]


@dataclass(frozen=True, slots=True)
class AuthQuery:
    page_size: int = 0
    page_token: str = ""
    failures_only: bool = False
    user_id: str = ""
    event_type: str = ""
    start_time: dt.datetime | None = None
    end_time: dt.datetime | None = None


async def list_auth_events(pool: asyncpg.Pool, query: AuthQuery) -> tuple[list[dict[str, Any]], str]:
    from services.audit.adapters.store import AUTH_EVENT_TYPES

    tenant_id = caller_tenant()
    size = paging.page_size(query.page_size)
    check = Violations()
    user = check.uuid(query.user_id, "user_id")
    if query.event_type and query.event_type not in AUTH_EVENT_TYPES:
        check.add("event_type", "must be one of " + ", ".join(sorted(AUTH_EVENT_TYPES)))
    check.time_range(query.start_time, query.end_time)
    check.raise_if_any()
    where = Where()
    where.bind("tenant_id = {}", uuid.UUID(tenant_id))
    if query.failures_only:
        where.conditions.append("success = false")
    if user:
        where.bind("user_id = {}", user)
    if query.event_type:
        where.bind("event_type = {}", query.event_type)
    if query.start_time is not None:
        where.bind("created_at >= {}", query.start_time)
    if query.end_time is not None:
        where.bind("created_at < {}", query.end_time)
    fingerprint = paging.query_fingerprint(
        "auth", query.failures_only, query.user_id, query.event_type, query.start_time, query.end_time
    )
    return await fetch_page(
        pool, tenant_id, "audit.auth_audit_logs", where, query.page_token, fingerprint, "created_at", size
    )


@dataclass(frozen=True, slots=True)
class ApiCallQuery:
    page_size: int = 0
    page_token: str = ""
    errors_only: bool = False
    endpoint: str = ""
    user_id: str = ""
    start_time: dt.datetime | None = None
    end_time: dt.datetime | None = None


async def list_api_calls(pool: asyncpg.Pool, query: ApiCallQuery) -> tuple[list[dict[str, Any]], str]:
    tenant_id = caller_tenant()
    size = paging.page_size(query.page_size)
    check = Violations()
    user = check.uuid(query.user_id, "user_id")
    endpoint = check.text(query.endpoint, "endpoint", limit=500)
    check.time_range(query.start_time, query.end_time)
    check.raise_if_any()
    where = Where()
    where.bind("tenant_id = {}", uuid.UUID(tenant_id))
    if query.errors_only:
        where.conditions.append("response_status >= 400")
    if endpoint:
        where.bind("endpoint = {}", endpoint)
    if user:
        where.bind("user_id = {}", user)
    if query.start_time is not None:
        where.bind("created_at >= {}", query.start_time)
    if query.end_time is not None:
        where.bind("created_at < {}", query.end_time)
    fingerprint = paging.query_fingerprint(
        "api", query.errors_only, endpoint, query.user_id, query.start_time, query.end_time
    )
    return await fetch_page(
        pool, tenant_id, "audit.api_audit_logs", where, query.page_token, fingerprint, "created_at", size
    )


@dataclass(frozen=True, slots=True)
class ChainReport:
    valid: bool
    checked: int
    erased: int
    broken_sequence: int
    broken_entry_id: str
    reason: str
    head_sequence: int
    head_hash: str


VERIFY_PAGE = 1000


async def verify_chain(pool: asyncpg.Pool, include_archive: bool) -> ChainReport:
    """Recomputes every entry's hash in chain order and checks each links to the one before;
    finally checks the chain head, so entries removed from the end are caught too."""
    tenant_id = caller_tenant()
    tenant = uuid.UUID(tenant_id)
    verifier = ChainVerifier()
    source = _logs(include_archive)
    last_seq = 0
    # REPEATABLE READ: the pages and the head are read from one snapshot while ingest goes on.
    async with pool.acquire() as conn, conn.transaction(readonly=True, isolation="repeatable_read"):
        await conn.execute("SELECT set_config('app.current_tenant_id', $1, true)", tenant_id)
        # Live entries continue where the archive ends; an entry missing at the start of the
        # live range is a gap like any other.
        archived_until = 0
        if not include_archive:
            archived_until = int(
                await conn.fetchval(
                    "SELECT coalesce(max(chain_seq), 0) FROM audit_archive.audit_logs WHERE tenant_id = $1",
                    tenant,
                )
            )
        verifier.expected_seq = archived_until + 1
        if archived_until == 0:
            verifier.previous_hash = ""
        while verifier.broken is None:
            rows = await conn.fetch(
                f"SELECT * FROM {source} WHERE tenant_id = $1 AND chain_seq > $2 ORDER BY chain_seq LIMIT $3",
                tenant,
                last_seq,
                VERIFY_PAGE,
            )
            if not rows:
                break
            verifier.feed(rows)
            last_seq = int(rows[-1]["chain_seq"])
        head = await conn.fetchrow(
            "SELECT last_seq, last_hash FROM audit.audit_chain_heads WHERE tenant_id = $1", tenant
        )
    head_seq = int(head["last_seq"]) if head else 0
    head_hash = str(head["last_hash"]) if head else ""
    broken = verifier.broken
    if broken is None and (verifier.expected_seq or 1) - 1 != head_seq:
        return ChainReport(
            False,
            verifier.checked,
            verifier.erased,
            (verifier.expected_seq or 1),
            "",
            "entries at the end of the chain are missing",
            head_seq,
            head_hash,
        )
    if broken is None and head_seq and verifier.previous_hash != head_hash:
        return ChainReport(
            False,
            verifier.checked,
            verifier.erased,
            head_seq,
            "",
            "the chain head does not match",
            head_seq,
            head_hash,
        )
    if broken is not None:
        return ChainReport(
            False,
            verifier.checked,
            verifier.erased,
            broken.sequence,
            broken.entry_id,
            broken.reason,
            head_seq,
            head_hash,
        )
    return ChainReport(True, verifier.checked, verifier.erased, 0, "", "", head_seq, head_hash)
