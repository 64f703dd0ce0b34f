"""Reads and writes of core rows inside the caller's unit of work, each write with its change
event in the same transaction. Every statement filters by tenant_id as well as relying on
row-level security; repositories never commit."""

from __future__ import annotations

import datetime as dt
import functools
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy import Table, and_, func, select, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession

from services.core_entity import SCHEMA, SERVICE
from services.core_entity.adapters import tables
from services.core_entity.domain.model import BY_TABLE, EntitySpec
from shared.outbox import record_change

TABLES: dict[str, Table] = {
    table.name: table
    for table in (
        tables.accounts,
        tables.contacts,
        tables.leads,
        tables.pipelines,
        tables.pipeline_stages,
        tables.deals,
        tables.activities,
    )
}

# Nobody: the actor of writes made without a user (internal calls such as onboarding).
SYSTEM_ACTOR = uuid.UUID(int=0)

Row = dict[str, Any]


@dataclass
class Tx:
    """One transaction of one tenant: the session, who acts, one clock for every row, and the
    transaction's asyncpg connection for the hot paths (single-row insert and load)."""

    session: AsyncSession
    tenant_id: uuid.UUID
    actor: uuid.UUID
    now: dt.datetime
    conn: asyncpg.Connection


class UniqueViolation(Exception):
    """An insert hit a unique index; `constraint` names it, for the caller to name the field."""

    def __init__(self, constraint: str) -> None:
        super().__init__(constraint)
        self.constraint = constraint


@functools.cache
def _json_columns(table_name: str) -> frozenset[str]:
    return frozenset(c.name for c in TABLES[table_name].columns if isinstance(c.type, JSONB))


@functools.cache
def _insert_sql(table_name: str, columns: tuple[str, ...]) -> str:
    # Column names come from the table model, never from a caller's input.
    json_columns = _json_columns(table_name)
    values = ", ".join(
        f"${i}::jsonb" if column in json_columns else f"${i}" for i, column in enumerate(columns, 1)
    )
    return f"INSERT INTO {SCHEMA}.{table_name} ({', '.join(columns)}) VALUES ({values}) RETURNING *"


@functools.cache
def _load_sql(table_name: str, live_only: bool) -> str:
    live = " AND deleted_at IS NULL" if live_only else ""
    return f"SELECT * FROM {SCHEMA}.{table_name} WHERE tenant_id = $1 AND id = $2{live}"


def table_of(spec: EntitySpec) -> Table:
    return TABLES[spec.table]


def as_row(mapping: Any) -> Row:
    return dict(mapping)


async def load(
    tx: Tx,
    spec: EntitySpec,
    record_id: uuid.UUID,
    *,
    for_update: bool = False,
    include_deleted: bool = False,
) -> Row | None:
    sql = _load_sql(spec.table, spec.soft_delete and not include_deleted)
    found = await tx.conn.fetchrow(f"{sql} FOR UPDATE" if for_update else sql, tx.tenant_id, record_id)
    return dict(found.items()) if found is not None else None


async def exists(tx: Tx, spec: EntitySpec, record_id: uuid.UUID) -> bool:
    """Whether a live record of the tenant has this id. Another tenant's id is simply absent."""
    table = table_of(spec)
    stmt = select(table.c.id).where(table.c.tenant_id == tx.tenant_id, table.c.id == record_id)
    if spec.soft_delete:
        stmt = stmt.where(table.c.deleted_at.is_(None))
    # FOR SHARE: a concurrent purge cannot remove the target before this transaction commits.
    return (await tx.session.execute(stmt.with_for_update(read=True))).first() is not None


async def publish(
    tx: Tx, spec: EntitySpec, operation: str, old: Row | None, new: Row | None, version: int | None = None
) -> None:
    current = new if new is not None else old
    assert current is not None
    await record_change(
        tx.session,
        schema=SCHEMA,
        service=SERVICE,
        table=spec.table,
        tenant_id=str(tx.tenant_id),
        record_id=str(current["id"]),
        operation=operation,
        old=old,
        new=new,
        version=int(version if version is not None else current["version"]),
    )


async def insert_row(tx: Tx, spec: EntitySpec, values: Mapping[str, Any]) -> Row:
    """Inserts one record and its INSERT event. A unique index refusing the row raises
    `UniqueViolation` (the transaction is then aborted: the caller answers and rolls back)."""
    row = {
        **values,
        "id": values.get("id") or uuid.uuid4(),
        "tenant_id": tx.tenant_id,
        "version": 1,
        "created_at": tx.now,
        "updated_at": tx.now,
        "created_by": tx.actor,
        "updated_by": tx.actor,
    }
    columns = tuple(row)
    unknown = set(columns) - set(TABLES[spec.table].c.keys())
    if unknown:
        raise ValueError(f"not columns of {spec.table}: {sorted(unknown)}")
    json_columns = _json_columns(spec.table)
    try:
        stored = await tx.conn.fetchrow(
            _insert_sql(spec.table, columns),
            *(json.dumps(row[c]) if c in json_columns and row[c] is not None else row[c] for c in columns),
        )
    except asyncpg.UniqueViolationError as exc:
        raise UniqueViolation(exc.constraint_name or "") from exc
    assert stored is not None
    new = dict(stored.items())
    await publish(tx, spec, "INSERT", None, new)
    return new


async def update_row(
    tx: Tx, spec: EntitySpec, old: Row, changes: Mapping[str, Any], operation: str = "UPDATE"
) -> Row:
    """Writes `changes` over `old`, bumps the version and publishes old and new values. A soft
    delete publishes DELETE with the old values only (the record is gone for readers), at the
    new version."""
    table = table_of(spec)
    stmt = (
        update(table)
        .where(table.c.tenant_id == tx.tenant_id, table.c.id == old["id"])
        .values(**changes, version=table.c.version + 1, updated_at=tx.now, updated_by=tx.actor)
        .returning(table)
    )
    new = as_row((await tx.session.execute(stmt)).mappings().one())
    if operation == "DELETE":
        await publish(tx, spec, operation, old, None, version=new["version"])
    else:
        await publish(tx, spec, operation, old, new)
    return new


async def update_where(
    tx: Tx, spec: EntitySpec, condition: Any, changes: Mapping[str, Any], operation: str = "UPDATE"
) -> list[Row]:
    """Updates every row of the tenant matching `condition`, one event per row."""
    table = table_of(spec)
    olds = [
        as_row(r)
        for r in (
            await tx.session.execute(
                select(table).where(table.c.tenant_id == tx.tenant_id, condition).with_for_update()
            )
        ).mappings()
    ]
    news = []
    for old in olds:
        news.append(await update_row(tx, spec, old, changes, operation))
    return news


async def delete_rows(tx: Tx, spec: EntitySpec, condition: Any) -> list[Row]:
    """Hard-deletes the tenant's rows matching `condition`, publishing a DELETE for each."""
    table = table_of(spec)
    stmt = table.delete().where(table.c.tenant_id == tx.tenant_id, condition).returning(table)
    removed = [as_row(r) for r in (await tx.session.execute(stmt)).mappings()]
    for row in removed:
        await publish(tx, spec, "DELETE", row, None)
    return removed


async def count(tx: Tx, spec: EntitySpec, condition: Any = None) -> int:
    table = table_of(spec)
    stmt = select(func.count()).select_from(table).where(table.c.tenant_id == tx.tenant_id)
    if condition is not None:
        stmt = stmt.where(condition)
    return int((await tx.session.execute(stmt)).scalar_one())


# What happens to other records when one is removed, as the seed's ON DELETE rules say:
# "null" clears the reference (SET NULL), "delete" removes the dependant (CASCADE).
DEPENDANTS: dict[str, Sequence[tuple[str, str, str]]] = {
    "accounts": (
        ("activities", "account_id", "delete"),
        ("contacts", "account_id", "null"),
        ("deals", "account_id", "null"),
        ("accounts", "parent_account_id", "null"),
        ("leads", "converted_account_id", "null"),
    ),
    "contacts": (
        ("activities", "contact_id", "delete"),
        ("deals", "contact_id", "null"),
        ("leads", "converted_contact_id", "null"),
    ),
    "leads": (("activities", "lead_id", "delete"),),
    "deals": (("activities", "deal_id", "delete"), ("leads", "converted_deal_id", "null")),
}


async def soft_delete_cascade(tx: Tx, spec: EntitySpec, ids: Iterable[uuid.UUID]) -> list[Row]:
    """Soft-deletes the records that the seed would cascade-delete with these (activities),
    stamped with the same time so Undelete can bring exactly them back."""
    id_list = list(ids)
    touched: list[Row] = []
    for table_name, column, action in DEPENDANTS.get(spec.table, ()):
        if action != "delete":
            continue
        dependant = BY_TABLE[table_name]
        table = TABLES[table_name]
        touched += await update_where(
            tx,
            dependant,
            and_(table.c[column].in_(id_list), table.c.deleted_at.is_(None)),
            {"deleted_at": tx.now},
            operation="DELETE",
        )
    return touched


async def undelete_cascade(tx: Tx, spec: EntitySpec, ids: Iterable[uuid.UUID], deleted_at: Any) -> None:
    id_list = list(ids)
    for table_name, column, action in DEPENDANTS.get(spec.table, ()):
        if action != "delete":
            continue
        table = TABLES[table_name]
        await update_where(
            tx,
            BY_TABLE[table_name],
            and_(table.c[column].in_(id_list), table.c.deleted_at == deleted_at),
            {"deleted_at": None},
            operation="RESTORE",
        )


async def purge(tx: Tx, spec: EntitySpec, condition: Any) -> list[Row]:
    """Hard-deletes matching records. The database would apply the seed's ON DELETE rules by
    itself, silently; doing them here first publishes an event for every record they touch."""
    table = table_of(spec)
    ids = [
        r[0]
        for r in await tx.session.execute(
            select(table.c.id).where(table.c.tenant_id == tx.tenant_id, condition).with_for_update()
        )
    ]
    if not ids:
        return []
    for table_name, column, action in DEPENDANTS.get(spec.table, ()):
        dependant = BY_TABLE[table_name]
        dependant_table = TABLES[table_name]
        if action == "delete":
            await purge(tx, dependant, dependant_table.c[column].in_(ids))
        else:
            await update_where(
                tx,
                dependant,
                and_(dependant_table.c[column].in_(ids), dependant_table.c.id.not_in(ids)),
                {column: None},
            )
    return await delete_rows(tx, spec, table.c.id.in_(ids))
