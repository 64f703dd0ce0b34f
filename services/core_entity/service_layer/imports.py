"""Bulk import and export of core records as text rows (the shape of a CSV line).

Import checks every row with the same rules as Create (parsing, field rules, custom fields,
references, uniqueness), then writes the valid rows of a batch with COPY. PostgreSQL refuses
COPY FROM into a table with row-level security, so rows are copied into a temporary staging
table first and moved with one INSERT ... SELECT, which the tenant policy still checks.
`core.import_rows` records which row indexes of an import id have landed, so a retried import
skips them instead of creating them twice; a lock on the import id makes concurrent retries
take turns.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from sqlalchemy import insert, select, text
from sqlalchemy.exc import DBAPIError

from services.core_entity import SCHEMA, SERVICE
from services.core_entity.adapters import repository as repo
from services.core_entity.adapters import tables
from services.core_entity.adapters.repository import Row, Tx
from services.core_entity.domain import model
from services.core_entity.domain.model import EntitySpec, Kind
from services.core_entity.entrypoints.codec import ADDRESS_PARTS
from services.core_entity.service_layer.entities import CoreEntities, validate
from shared.errors import CrmError, FieldViolation, InvalidArgument
from shared.events import build_change_event, change_subject
from shared.outbox import notify_channel

ROW = "row"  # the field path prefix of import rows, stripped from reported field names
TRUE_WORDS = frozenset({"true", "t", "yes", "y", "1"})
FALSE_WORDS = frozenset({"false", "f", "no", "n", "0"})
OUTPUT_ONLY = frozenset(f.api for f in model.COMMON_FIELDS) | {"delete_time", "etag"}
EXPORT_BATCH = 500
MAX_EXPORT_BATCH = 5000

IMPORTABLE = {
    spec.name: spec for spec in (model.ACCOUNT, model.CONTACT, model.LEAD, model.DEAL, model.ACTIVITY)
}


@dataclass
class BatchResult:
    record_ids: dict[int, str] = field(default_factory=dict)
    errors: dict[int, list[FieldViolation]] = field(default_factory=dict)


def _strip(path: str) -> str:
    return path.removeprefix(f"{ROW}.")


def _error_field(exc: CrmError) -> list[FieldViolation]:
    if isinstance(exc, InvalidArgument):
        return [FieldViolation(_strip(v.field), v.description) for v in exc.violations]
    path = getattr(exc, "field", None)
    message = exc.message
    if path is None and message.startswith(f"{ROW}.") and ": " in message:
        path, message = message.split(": ", 1)
    elif path is not None:
        message = message.removeprefix(f"{path}: ")
    return [FieldViolation(_strip(path or "row"), message)]


def parse_text_row(
    spec: EntitySpec, values: Mapping[str, str], custom_types: Mapping[str, str]
) -> tuple[dict[str, Any], list[FieldViolation]]:
    """A text row as column values; every unparsable or unknown key is a violation."""
    out: dict[str, Any] = {}
    custom: dict[str, Any] = {}
    violations: list[FieldViolation] = []
    writable = {f.api: f for f in spec.writable}
    for key, raw in values.items():
        text_value = raw.strip()
        head, _, part = key.partition(".")
        if key in OUTPUT_ONLY or (key in {f.api for f in spec.fields} and key not in writable):
            continue  # an exported file re-imported: output-only columns are ignored
        if head == "custom_fields" and part and spec.has_custom_fields:
            custom[part] = _custom_value(text_value, custom_types.get(part), part, violations)
            continue
        target = writable.get(head)
        if target is None or (part and target.kind is not Kind.ADDRESS):
            violations.append(FieldViolation(key, "is not a field of this record type"))
            continue
        if target.kind is Kind.ADDRESS:
            if part not in ADDRESS_PARTS:
                violations.append(FieldViolation(key, "is not an address part: " + ", ".join(ADDRESS_PARTS)))
            elif text_value:
                out.setdefault(target.col, {})[part] = text_value
            continue
        if not text_value:
            continue
        try:
            out[target.col] = _typed(target.kind, text_value)
        except ValueError as exc:
            violations.append(FieldViolation(key, str(exc)))
    if custom:
        out["custom_fields"] = {k: v for k, v in custom.items() if v is not None}
    for f in spec.writable:
        # Like an unset proto bool: a missing flag is false, never NULL.
        if f.kind is Kind.BOOL and not f.presence:
            out.setdefault(f.col, False)
    return out, violations


def _typed(kind: Kind, value: str) -> Any:
    if kind is Kind.TEXT:
        return value
    if kind is Kind.DECIMAL:
        try:
            number = decimal.Decimal(value)
        except decimal.InvalidOperation as exc:
            raise ValueError('must be a decimal number such as "1234.50"') from exc
        if not number.is_finite():
            raise ValueError('must be a decimal number such as "1234.50"')
        return number
    if kind is Kind.INT:
        try:
            return int(value)
        except ValueError as exc:
            raise ValueError("must be a whole number") from exc
    if kind is Kind.BOOL:
        lowered = value.lower()
        if lowered in TRUE_WORDS | FALSE_WORDS:
            return lowered in TRUE_WORDS
        raise ValueError("must be true or false")
    if kind is Kind.UUID:
        try:
            return uuid.UUID(value)
        except ValueError as exc:
            raise ValueError("must be a UUID") from exc
    if kind is Kind.DATE:
        try:
            return dt.date.fromisoformat(value)
        except ValueError as exc:
            raise ValueError("must be a date as YYYY-MM-DD") from exc
    if kind is Kind.TIMESTAMP:
        try:
            stamp = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise ValueError("must be an RFC 3339 time such as 2026-01-31T09:00:00Z") from exc
        if stamp.tzinfo is None:
            raise ValueError("must include a time zone offset (e.g. Z)")
        return stamp
    raise ValueError("cannot be imported")


def _custom_value(value: str, field_type: str | None, name: str, violations: list[FieldViolation]) -> Any:
    if not value:
        return None
    if field_type == "boolean":
        if value.lower() in TRUE_WORDS | FALSE_WORDS:
            return value.lower() in TRUE_WORDS
        violations.append(FieldViolation(f"custom_fields.{name}", "must be true or false"))
        return None
    if field_type == "multipicklist":
        return [item.strip() for item in value.split(";") if item.strip()]
    return value


def text_row(spec: EntitySpec, row: Row) -> dict[str, str]:
    """A stored row as text columns, in the form `parse_text_row` reads."""
    out: dict[str, str] = {}
    for f in spec.fields:
        value = row.get(f.col)
        if value is None:
            continue
        if f.kind is Kind.ADDRESS:
            out.update({f"{f.api}.{k}": str(v) for k, v in value.items() if k in ADDRESS_PARTS and v})
        elif f.kind is Kind.CUSTOM:
            for key, item in value.items():
                if item is not None:
                    text_value = ";".join(map(str, item)) if isinstance(item, list) else item
                    if isinstance(text_value, bool):
                        text_value = "true" if text_value else "false"
                    out[f"custom_fields.{key}"] = str(text_value)
        elif f.kind is Kind.BOOL:
            out[f.api] = "true" if value else "false"
        elif f.kind is Kind.DECIMAL:
            out[f.api] = format(value, "f")
        elif f.kind in (Kind.DATE, Kind.TIMESTAMP):
            out[f.api] = value.isoformat()
        else:
            out[f.api] = str(value)
    out["etag"] = f'W/"{row["version"]}"'
    return out


def _copy_value(value: Any) -> Any:
    # The staging table's JSONB columns take JSON text over COPY.
    return json.dumps(value) if isinstance(value, dict | list) else value


class Importer:
    def __init__(self, entities: CoreEntities) -> None:
        self._entities = entities

    async def import_batch(
        self, spec: EntitySpec, import_id: uuid.UUID, rows: Sequence[tuple[int, Mapping[str, str]]]
    ) -> BatchResult:
        custom_types = await self._entities.custom_types(spec)
        try:
            return await self._import(spec, import_id, rows, custom_types, use_copy=True)
        except (DBAPIError, asyncpg.PostgresError):
            # A concurrent writer took a unique value between our check and the COPY: redo the
            # batch row by row, so only the conflicting rows fail.
            return await self._import(spec, import_id, rows, custom_types, use_copy=False)

    async def _import(
        self,
        spec: EntitySpec,
        import_id: uuid.UUID,
        rows: Sequence[tuple[int, Mapping[str, str]]],
        custom_types: Mapping[str, str],
        *,
        use_copy: bool,
    ) -> BatchResult:
        result = BatchResult()
        async with self._entities.transaction(write=True) as (uow, tx):
            await tx.session.execute(
                text("SELECT pg_advisory_xact_lock(hashtextextended('core.import:' || :id, 0))"),
                {"id": str(import_id)},
            )
            done = await self._landed(tx, import_id, [index for index, _ in rows])
            result.record_ids.update(done)
            valid: list[tuple[int, dict[str, Any]]] = []
            # Values that must be unique are checked against the database per row; within the
            # batch (not yet written) they are checked here.
            emails: dict[str, int] = {}
            unique_fields = (
                [
                    d.name
                    for d in await self._entities.custom_fields.definitions(str(tx.tenant_id), spec.name)
                    if d.unique and d.is_active
                ]
                if spec.has_custom_fields
                else []
            )
            seen_unique: dict[tuple[str, str], int] = {}
            for index, values in rows:
                if index in done:
                    continue
                try:
                    record = await self._prepare(tx, spec, values, custom_types)
                except CrmError as exc:
                    result.errors[index] = _error_field(exc)
                    continue
                email = (record.get("email") or "").lower() if spec is model.CONTACT else ""
                if email and email in emails:
                    result.errors[index] = [
                        FieldViolation("email", f"repeats the e-mail address of row {emails[email]}")
                    ]
                    continue
                repeated = [
                    (name, seen_unique[(name, json.dumps(record["custom_fields"][name]))])
                    for name in unique_fields
                    if record.get("custom_fields", {}).get(name) is not None
                    and (name, json.dumps(record["custom_fields"][name])) in seen_unique
                ]
                if repeated:
                    result.errors[index] = [
                        FieldViolation(f"custom_fields.{name}", f"repeats the value of row {row} (unique)")
                        for name, row in repeated
                    ]
                    continue
                if email:
                    emails[email] = index
                for name in unique_fields:
                    value = record.get("custom_fields", {}).get(name)
                    if value is not None:
                        seen_unique[(name, json.dumps(value))] = index
                valid.append((index, record))
            if spec is model.CONTACT:
                taken = await self._entities.existing_emails(
                    tx, [record["email"].lower() for _, record in valid if record.get("email")]
                )
                for index, record in valid:
                    if (record.get("email") or "").lower() in taken:
                        result.errors[index] = [
                            FieldViolation("email", "another contact already has this e-mail address")
                        ]
                valid = [(index, record) for index, record in valid if index not in result.errors]
            if use_copy:
                written = await self._copy(tx, spec, [record for _, record in valid])
            else:
                written = []
                for index, record in valid:
                    try:
                        async with tx.session.begin_nested():
                            written.append(await repo.insert_row(tx, spec, record))
                    except DBAPIError:
                        result.errors[index] = [
                            FieldViolation("row", "conflicts with a record written meanwhile")
                        ]
                        written.append({})
            landed = [(index, row) for (index, _), row in zip(valid, written, strict=True) if row]
            if landed:
                await tx.session.execute(
                    insert(tables.import_rows),
                    [
                        {
                            "tenant_id": tx.tenant_id,
                            "import_id": import_id,
                            "row_index": index,
                            "entity_type": spec.name,
                            "record_id": row["id"],
                            "created_at": tx.now,
                        }
                        for index, row in landed
                    ],
                )
            await uow.commit()
        result.record_ids.update({index: str(row["id"]) for index, row in landed})
        return result

    async def _landed(self, tx: Tx, import_id: uuid.UUID, indexes: list[int]) -> dict[int, str]:
        c = tables.import_rows.c
        found = await tx.session.execute(
            select(c.row_index, c.record_id).where(
                c.tenant_id == tx.tenant_id, c.import_id == import_id, c.row_index.in_(indexes)
            )
        )
        return {int(index): str(record_id) for index, record_id in found}

    async def _prepare(
        self, tx: Tx, spec: EntitySpec, values: Mapping[str, str], custom_types: Mapping[str, str]
    ) -> dict[str, Any]:
        """A row checked exactly like Create, ready to insert (raises on the first failing kind
        of rule, like Create)."""
        record, violations = parse_text_row(spec, values, custom_types)
        record = {k: v for k, v in record.items() if v is not None}
        for column, default in spec.defaults.items():
            record.setdefault(column, default)
        violations += validate(spec, record, ROW, creating=True)
        if spec.has_custom_fields:
            cleaned, bad = await self._entities.custom_fields.clean(
                str(tx.tenant_id), spec.name, record.get("custom_fields") or {}, None, f"{ROW}.custom_fields"
            )
            record["custom_fields"] = cleaned
            violations += bad
        if violations:
            raise InvalidArgument(violations)
        await self._entities.check(tx, spec, record, None, ROW, check_email=False)
        return record

    async def _copy(self, tx: Tx, spec: EntitySpec, records: list[dict[str, Any]]) -> list[Row]:
        if not records:
            return []
        table = repo.table_of(spec)
        columns = [c.name for c in table.columns]
        rows: list[Row] = []
        for record in records:
            row = {column: record.get(column) for column in columns}
            row.update(
                id=uuid.uuid4(),
                tenant_id=tx.tenant_id,
                version=1,
                created_at=tx.now,
                updated_at=tx.now,
                created_by=tx.actor,
                updated_by=tx.actor,
            )
            if "custom_fields" in row and row["custom_fields"] is None:
                row["custom_fields"] = {}
            rows.append(row)
        connection = await tx.session.connection()
        raw = await connection.get_raw_connection()
        driver: Any = raw.driver_connection
        staging = f"import_{spec.table}"
        # Hot path: COPY through the asyncpg connection under the session's open transaction.
        await driver.execute(f"CREATE TEMP TABLE {staging} (LIKE {SCHEMA}.{spec.table}) ON COMMIT DROP")
        await driver.copy_records_to_table(
            staging, records=[tuple(_copy_value(r[c]) for c in columns) for r in rows], columns=columns
        )
        column_list = ", ".join(columns)
        await driver.execute(
            f"INSERT INTO {SCHEMA}.{spec.table} ({column_list}) SELECT {column_list} FROM {staging}"
        )
        await driver.execute(f"DROP TABLE {staging}")
        await self._publish_inserts(tx, spec, rows)
        return rows

    async def _publish_inserts(self, tx: Tx, spec: EntitySpec, rows: list[Row]) -> None:
        """One outbox row per imported record, written in one round trip."""
        params = []
        for row in rows:
            event = build_change_event(
                tenant_id=str(tx.tenant_id),
                service=SERVICE,
                table=spec.table,
                record_id=str(row["id"]),
                operation="INSERT",
                old=None,
                new=row,
                version=1,
            )
            params.append(
                {
                    "id": uuid.UUID(event.event_id),
                    "subject": change_subject(str(tx.tenant_id), SERVICE, spec.table, "INSERT"),
                    "payload": event.SerializeToString(),
                }
            )
        await tx.session.execute(
            text(f"INSERT INTO {SCHEMA}.outbox (id, subject, payload) VALUES (:id, :subject, :payload)"),
            params,
        )
        await tx.session.execute(text("SELECT pg_notify(:channel, '')"), {"channel": notify_channel(SCHEMA)})

    async def export(
        self, spec: EntitySpec, batch_size: int
    ) -> AsyncIterator[tuple[list[dict[str, str]], int]]:
        """Every live record of the tenant in batches, with the total for progress."""
        size = min(batch_size or EXPORT_BATCH, MAX_EXPORT_BATCH)
        table = repo.table_of(spec)
        async with self._entities.transaction(write=False) as (_, tx):
            total = await repo.count(tx, spec, table.c.deleted_at.is_(None))
        after: tuple[Any, Any] | None = None
        while True:
            async with self._entities.transaction(write=False) as (_, tx):
                stmt = select(table).where(table.c.tenant_id == tx.tenant_id, table.c.deleted_at.is_(None))
                if after is not None:
                    stmt = stmt.where(
                        (table.c.created_at > after[0])
                        | ((table.c.created_at == after[0]) & (table.c.id > after[1]))
                    )
                stmt = stmt.order_by(table.c.created_at, table.c.id).limit(size)
                batch = [dict(r) for r in (await tx.session.execute(stmt)).mappings()]
            if not batch:
                return
            yield [text_row(spec, row) for row in batch], total
            after = (batch[-1]["created_at"], batch[-1]["id"])
            if len(batch) < size:
                return
