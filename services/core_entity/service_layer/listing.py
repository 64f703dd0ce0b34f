"""List methods: AIP-160 filters and order_by over a resource's indexed columns and its custom
fields, keyset pages with opaque tokens bound to their query, and the total count.

The whitelist comes from the entity specs (the indexed fields) and from the tenant's custom
field definitions (typed readers of the JSONB values, so `custom_fields.budget > 100` compares
numbers, not text, and uses the field's index when it has one). Parsing and compiling is
shared.filters' job; nothing here assembles SQL text.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select

from services.core_entity.adapters import repository as repo
from services.core_entity.adapters.indexes import is_field_name, typed_value
from services.core_entity.adapters.repository import Row, Tx
from services.core_entity.domain import rules
from services.core_entity.domain.model import EntitySpec, Kind
from shared import paging
from shared.db import fetch_rows
from shared.filters import Field, FieldSet, FieldType

_TYPES = {
    Kind.TEXT: FieldType.STRING,
    Kind.DECIMAL: FieldType.DECIMAL,
    Kind.INT: FieldType.INTEGER,
    Kind.BOOL: FieldType.BOOLEAN,
    Kind.UUID: FieldType.UUID,
    Kind.TIMESTAMP: FieldType.TIMESTAMP,
    Kind.DATE: FieldType.DATE,
}

# Columns with a fixed set of values filter as enums, so a typo is INVALID_ARGUMENT.
_CHOICES: dict[str, tuple[str, ...]] = {
    "account_type": rules.ACCOUNT_TYPES,
    "contact_status": rules.CONTACT_STATUSES,
    "lead_status": rules.LEAD_STATUSES,
    "activity_type": rules.ACTIVITY_TYPES,
    "status": rules.ACTIVITY_STATUSES,
}


@dataclass(frozen=True, slots=True)
class ListQuery:
    page_size: int = 0
    page_token: str = ""
    filter: str = ""
    order_by: str = ""
    show_deleted: bool = False


@dataclass(frozen=True, slots=True)
class ListResult:
    rows: list[Row]
    next_page_token: str
    total_size: int


def _custom_field(spec: EntitySpec, name: str, field_type: str) -> Field:
    # The same reader calls as the custom field indexes (adapters.indexes), so PostgreSQL can
    # use them; a value not in the stored canonical form reads as NULL instead of failing.
    value = typed_value(repo.table_of(spec), name, field_type)
    api = f"custom_fields.{name}"
    if field_type in ("decimal", "currency", "percent"):
        return Field(api, FieldType.DECIMAL, value)
    if field_type == "number":
        return Field(api, FieldType.INTEGER, value)
    if field_type == "boolean":
        return Field(api, FieldType.BOOLEAN, value)
    if field_type == "date":
        return Field(api, FieldType.DATE, value)
    if field_type == "datetime":
        return Field(api, FieldType.TIMESTAMP, value)
    if field_type == "multipicklist":
        return Field(api, FieldType.STRING_LIST, value, sortable=False)
    return Field(api, FieldType.STRING, value)


def field_set(spec: EntitySpec, custom_types: Mapping[str, str]) -> FieldSet:
    table = repo.table_of(spec)
    fields = []
    for f in spec.indexed:
        choices = _CHOICES.get(f.col)
        if choices is not None and f.kind is Kind.TEXT:
            fields.append(Field(f.api, FieldType.ENUM, table.c[f.col], choices=frozenset(choices)))
        else:
            fields.append(Field(f.api, _TYPES[f.kind], table.c[f.col]))
    # A name that is no api name cannot be addressed by a filter and must not reach SQL text.
    fields += [
        _custom_field(spec, name, kind) for name, kind in sorted(custom_types.items()) if is_field_name(name)
    ]
    return FieldSet(fields, tiebreaker=table.c.id)


def _by_api(spec: EntitySpec, row: Row) -> dict[str, Any]:
    out = {f.api: row.get(f.col) for f in spec.fields}
    for name, value in (row.get("custom_fields") or {}).items():
        out[f"custom_fields.{name}"] = value
    return out


async def list_rows(
    tx: Tx, spec: EntitySpec, query: ListQuery, custom_types: Mapping[str, str]
) -> ListResult:
    table = repo.table_of(spec)
    fields = field_set(spec, custom_types)
    size = paging.page_size(query.page_size)
    condition = fields.filter(query.filter)
    order = fields.order_by(query.order_by, default=[("create_time", False)])
    fingerprint = paging.query_fingerprint(spec.table, query.filter, query.order_by, query.show_deleted)
    cursor = paging.decode_token(query.page_token, fingerprint)
    scope = [table.c.tenant_id == tx.tenant_id, condition]
    if spec.soft_delete and not query.show_deleted:
        scope.append(table.c.deleted_at.is_(None))
    (counted,) = await fetch_rows(
        tx.session, select(func.count().label("total")).select_from(table).where(*scope)
    )
    total = int(counted["total"])
    stmt = select(table).where(*scope)
    if cursor is not None:
        stmt = stmt.where(fields.after(order, cursor))
    stmt = stmt.order_by(*fields.order_clauses(order)).limit(size + 1)
    rows = await fetch_rows(tx.session, stmt)
    next_token = ""
    if len(rows) > size:
        rows = rows[:size]
        next_token = paging.encode_token(fields.cursor_of(order, _by_api(spec, rows[-1])), fingerprint)
    return ListResult(rows, next_token, total)
