"""Small helpers every use case of the audit service shares: the caller's tenant, a
tenant-scoped transaction on the asyncpg pool, request validation, and keyset paging."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from shared import paging
from shared.context import current_call
from shared.db import TENANT_SETTING
from shared.errors import FieldViolation, InvalidArgument, PermissionDenied, invalid


def caller_tenant() -> str:
    tenant_id = current_call().tenant_id
    if not tenant_id:
        raise PermissionDenied("audit calls need a tenant credential")
    return tenant_id


@asynccontextmanager
async def tenant_transaction(
    pool: asyncpg.Pool, tenant_id: str, *, readonly: bool = False
) -> AsyncIterator[asyncpg.Connection]:
    """One transaction scoped to one tenant (the setting dies with the transaction)."""
    async with pool.acquire() as conn, conn.transaction(readonly=readonly):
        await conn.execute("SELECT set_config($1, $2, true)", TENANT_SETTING, tenant_id)
        yield conn


class Violations:
    """Collects every bad field of a request, so the caller hears about all of them at once."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field_name: str, rule: str) -> None:
        self.items.append(FieldViolation(field_name, rule))

    def uuid(self, value: str, field_name: str, *, required: bool = False) -> uuid.UUID | None:
        if not value:
            if required:
                self.add(field_name, "is required")
            return None
        try:
            return uuid.UUID(value)
        except ValueError:
            self.add(field_name, "must be a UUID")
            return None

    def text(self, value: str, field_name: str, *, required: bool = False, limit: int = 255) -> str:
        stripped = value.strip()
        if required and not stripped:
            self.add(field_name, "is required")
        elif len(stripped) > limit:
            self.add(field_name, f"must be at most {limit} characters")
        elif "\x00" in stripped:
            self.add(field_name, "must not contain NUL characters")
        return stripped

    def time_range(self, start: dt.datetime | None, end: dt.datetime | None) -> None:
        if start is not None and end is not None and end <= start:
            self.add("end_time", "must be after start_time")

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(self.items)


@dataclass
class Where:
    """A WHERE clause with bound parameters; only fixed SQL fragments are ever added."""

    conditions: list[str] = field(default_factory=list)
    params: list[Any] = field(default_factory=list)

    def bind(self, fragment: str, value: Any) -> None:
        self.params.append(value)
        self.conditions.append(fragment.format(f"${len(self.params)}"))

    def sql(self) -> str:
        return " AND ".join(self.conditions) if self.conditions else "true"

    def next_param(self, value: Any) -> str:
        self.params.append(value)
        return f"${len(self.params)}"


def keyset_after(
    where: Where, token: str, fingerprint: str, time_column: str, *, descending: bool = True
) -> None:
    """Adds the "after the last row of the previous page" condition for (time, id) ordering."""
    cursor = paging.decode_token(token, fingerprint)
    if cursor is None:
        return
    try:
        after_time, after_id = dt.datetime.fromisoformat(cursor[0]), uuid.UUID(cursor[1])
    except (ValueError, IndexError, TypeError) as exc:
        raise invalid("page_token", "is not a token this method issued") from exc
    op = "<" if descending else ">"
    time_param = where.next_param(after_time)
    id_param = where.next_param(after_id)
    where.conditions.append(f"({time_column}, id) {op} ({time_param}, {id_param})")


def page_of(
    rows: list[dict[str, Any]], size: int, fingerprint: str, time_column: str
) -> tuple[list[dict[str, Any]], str]:
    if len(rows) <= size:
        return rows, ""
    rows = rows[:size]
    last = rows[-1]
    return rows, paging.encode_token([last[time_column].isoformat(), str(last["id"])], fingerprint)


async def fetch_page(
    pool: asyncpg.Pool,
    tenant_id: str,
    relation: str,
    where: Where,
    page_token: str,
    fingerprint: str,
    time_column: str,
    size: int,
) -> tuple[list[dict[str, Any]], str]:
    """One newest-first page of a tenant's rows, keyset-paged on (time, id). `relation` is a
    fixed table name or union chosen by the caller, never client text."""
    keyset_after(where, page_token, fingerprint, time_column)
    limit = where.next_param(size + 1)
    sql = f"SELECT * FROM {relation} WHERE {where.sql()} ORDER BY {time_column} DESC, id DESC LIMIT {limit}"
    async with tenant_transaction(pool, tenant_id, readonly=True) as conn:
        rows = [dict(row) for row in await conn.fetch(sql, *where.params)]
    return page_of(rows, size, fingerprint, time_column)
