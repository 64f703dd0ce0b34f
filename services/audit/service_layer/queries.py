"""Read side of the audit log, always scoped to the caller's tenant."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg

from shared import paging
from shared.context import current_call
from shared.db import TENANT_SETTING
from shared.errors import PermissionDenied, invalid


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


def _uuid(value: str, field: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError as exc:
        raise invalid(field, "must be a UUID") from exc


def caller_tenant() -> str:
    tenant_id = current_call().tenant_id
    if not tenant_id:
        raise PermissionDenied("audit queries need a tenant credential")
    return tenant_id


async def list_audit_logs(pool: asyncpg.Pool, query: AuditLogQuery) -> tuple[list[dict[str, Any]], str]:
    tenant_id = caller_tenant()
    size = paging.page_size(query.page_size)
    conditions = ["tenant_id = $1"]
    params: list[Any] = [_uuid(tenant_id, "tenant")]

    def bind(fragment: str, value: Any) -> None:
        params.append(value)
        conditions.append(fragment.format(f"${len(params)}"))

    if query.table_name:
        bind("table_name = {}", query.table_name)
    if query.record_id:
        bind("record_id = {}", _uuid(query.record_id, "record_id"))
    if query.user_id:
        bind("user_id = {}", _uuid(query.user_id, "user_id"))
    if query.operation:
        bind("operation = {}", query.operation)
    if query.start_time is not None:
        bind("changed_at >= {}", query.start_time)
    if query.end_time is not None:
        if query.start_time is not None and query.end_time <= query.start_time:
            raise invalid("end_time", "must be after start_time")
        bind("changed_at < {}", query.end_time)
    fingerprint = paging.query_fingerprint(
        "audit_logs",
        query.table_name,
        query.record_id,
        query.user_id,
        query.operation,
        query.start_time,
        query.end_time,
    )
    cursor = paging.decode_token(query.page_token, fingerprint)
    if cursor is not None:
        try:
            after_time, after_id = dt.datetime.fromisoformat(cursor[0]), uuid.UUID(cursor[1])
        except (ValueError, IndexError, TypeError) as exc:
            raise invalid("page_token", "is not a token this method issued") from exc
        params.extend([after_time, after_id])
        conditions.append(f"(changed_at, id) < (${len(params) - 1}, ${len(params)})")
    params.append(size + 1)
    sql = (
        "SELECT * FROM audit.audit_logs WHERE "
        + " AND ".join(conditions)
        + f" ORDER BY changed_at DESC, id DESC LIMIT ${len(params)}"
    )
    async with pool.acquire() as conn, conn.transaction(readonly=True):
        await conn.execute("SELECT set_config($1, $2, true)", TENANT_SETTING, tenant_id)
        rows = [dict(row) for row in await conn.fetch(sql, *params)]
    next_token = ""
    if len(rows) > size:
        rows = rows[:size]
        last = rows[-1]
        next_token = paging.encode_token([last["changed_at"].isoformat(), str(last["id"])], fingerprint)
    return rows, next_token
