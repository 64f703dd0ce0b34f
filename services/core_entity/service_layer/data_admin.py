"""The internal data operations the audit service asks of core-entity (DataAdminService):
restore a record to an earlier state, retention purges and anonymisation, erasure of one
person, counts. Every write goes through the same repository as the public calls, so it is
published through the outbox like any other change."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, func, or_

from services.core_entity.adapters import repository as repo
from services.core_entity.adapters.repository import Row, Tx
from services.core_entity.domain import model
from services.core_entity.domain.model import EntitySpec, Kind
from services.core_entity.service_layer.entities import CoreEntities, check_etag, validate
from shared.errors import FieldViolation, InvalidArgument

MASKED = "***"
ANONYMIZED = "Anonymized"
# Columns that describe a person, replaced by anonymisation and erasure.
PERSONAL_COLUMNS: dict[str, dict[str, Any]] = {
    "contacts": {
        "first_name": ANONYMIZED,
        "last_name": ANONYMIZED,
        "email": None,
        "phone": None,
        "mobile": None,
        "title": None,
        "department": None,
        "mailing_address": None,
        "description": None,
        "custom_fields": {},
    },
    "leads": {
        "first_name": ANONYMIZED,
        "last_name": ANONYMIZED,
        "email": None,
        "phone": None,
        "title": None,
        "mailing_address": None,
        "description": None,
        "custom_fields": {},
    },
    "activities": {"description": None, "location": None},
    "accounts": {"phone": None, "description": None},
    "deals": {"description": None, "next_step": None},
}
# Columns a restore never writes: identity, version and bookkeeping belong to the service.
_NOT_RESTORED = frozenset(
    {"id", "tenant_id", "version", "created_at", "updated_at", "created_by", "updated_by"}
)


@dataclass
class Erasure:
    counts: dict[str, int]
    records: list[tuple[str, str]]


def spec_for(table_name: str) -> EntitySpec:
    spec = model.BY_TABLE.get(table_name)
    if spec is None:
        raise InvalidArgument(
            [FieldViolation("table_name", "must be one of " + ", ".join(sorted(model.BY_TABLE)))]
        )
    return spec


def _column_value(kind: Kind, value: Any, column: str) -> Any:
    if value is None:
        return None
    try:
        if kind is Kind.UUID:
            return uuid.UUID(str(value))
        if kind is Kind.DECIMAL:
            return decimal.Decimal(str(value))
        if kind is Kind.DATE:
            return dt.date.fromisoformat(str(value))
        if kind is Kind.TIMESTAMP:
            return dt.datetime.fromisoformat(str(value))
        if kind is Kind.INT:
            return int(value)
    except (ValueError, decimal.InvalidOperation) as exc:
        raise InvalidArgument([FieldViolation(f"values_json.{column}", "has the wrong type")]) from exc
    return value


def _conditions(spec: EntitySpec, conditions_json: str) -> Any:
    table = repo.table_of(spec)
    try:
        given = json.loads(conditions_json) if conditions_json.strip() else {}
    except json.JSONDecodeError as exc:
        raise InvalidArgument([FieldViolation("conditions_json", "must be a JSON object")]) from exc
    if not isinstance(given, dict):
        raise InvalidArgument([FieldViolation("conditions_json", "must be a JSON object")])
    kinds = {f.col: f.kind for f in spec.fields}
    parts = []
    for column, value in given.items():
        if column not in kinds or column == "tenant_id":
            raise InvalidArgument(
                [FieldViolation("conditions_json", f"{column!r} is not a column of {spec.table}")]
            )
        parts.append(table.c[column] == _column_value(kinds[column], value, column))
    return and_(*parts) if parts else None


class DataAdmin:
    def __init__(self, entities: CoreEntities) -> None:
        self._entities = entities

    async def restore(
        self, table_name: str, record_id: uuid.UUID, values_json: str, expected_version: int, force: bool
    ) -> int:
        spec = spec_for(table_name)
        try:
            given = json.loads(values_json)
        except json.JSONDecodeError as exc:
            raise InvalidArgument([FieldViolation("values_json", "must be a JSON object")]) from exc
        if not isinstance(given, dict):
            raise InvalidArgument([FieldViolation("values_json", "must be a JSON object")])
        kinds = {f.col: f.kind for f in spec.fields}
        async with self._entities.transaction(write=True) as (uow, tx):
            current = await repo.load(tx, spec, record_id, for_update=True, include_deleted=True)
            if current is not None and expected_version and not force:
                check_etag(expected_version, current, spec)
            values = {
                column: _column_value(kinds[column], value, column)
                for column, value in given.items()
                if column in kinds and column not in _NOT_RESTORED and value != MASKED
            }
            if current is None:
                record = {**spec.defaults, **values, "id": record_id}
                if spec.has_custom_fields:
                    record.setdefault("custom_fields", {})
                violations = validate(spec, record, spec.name, creating=False)
                if violations:
                    raise InvalidArgument(violations)
                await self._entities.check(tx, spec, record, None, spec.name)
                row = await repo.insert_row(tx, spec, record)
                version = int(row["version"])
            else:
                record = {**current, **values}
                violations = validate(spec, record, spec.name, creating=False)
                if violations:
                    raise InvalidArgument(violations)
                await self._entities.check(tx, spec, record, current, spec.name)
                changes = {k: v for k, v in record.items() if current.get(k) != v}
                row = await repo.update_row(tx, spec, current, changes, operation="RESTORE")
                version = int(row["version"])
            await uow.commit()
        return version

    async def purge(
        self, table_name: str, older_than: dt.datetime | None, conditions_json: str, hard: bool
    ) -> list[str]:
        spec = spec_for(table_name)
        table = repo.table_of(spec)
        condition = _conditions(spec, conditions_json)
        parts = [c for c in (condition,) if c is not None]
        if older_than is not None:
            parts.append(table.c.updated_at < older_than)
        where = and_(*parts) if parts else table.c.id.is_not(None)
        async with self._entities.transaction(write=True) as (uow, tx):
            if hard:
                removed = [str(r["id"]) for r in await repo.purge(tx, spec, where)]
            else:
                if not spec.soft_delete:
                    raise InvalidArgument([FieldViolation("method", f"{spec.table} has no soft delete")])
                live = and_(where, table.c.deleted_at.is_(None))
                ids = [
                    r["id"] for r in await repo.update_where(tx, spec, live, {"deleted_at": tx.now}, "DELETE")
                ]
                await repo.soft_delete_cascade(tx, spec, ids)
                removed = [str(i) for i in ids]
            await uow.commit()
        return removed

    async def _anonymize(self, tx: Tx, spec: EntitySpec, where: Any) -> list[Row]:
        replacement = PERSONAL_COLUMNS.get(spec.table)
        if not replacement:
            return []
        return await repo.update_where(tx, spec, where, replacement)

    async def anonymize(
        self, table_name: str, older_than: dt.datetime | None, conditions_json: str
    ) -> list[str]:
        spec = spec_for(table_name)
        table = repo.table_of(spec)
        condition = _conditions(spec, conditions_json)
        parts = [c for c in (condition,) if c is not None]
        if older_than is not None:
            parts.append(table.c.updated_at < older_than)
        where = and_(*parts) if parts else table.c.id.is_not(None)
        async with self._entities.transaction(write=True) as (uow, tx):
            rows = await self._anonymize(tx, spec, where)
            await uow.commit()
        return [str(r["id"]) for r in rows]

    async def erase_subject(
        self, email: str, contact_id: uuid.UUID | None, lead_id: uuid.UUID | None
    ) -> Erasure:
        if not (email or contact_id or lead_id):
            raise InvalidArgument(
                [FieldViolation("email", "give an e-mail address, a contact id or a lead id")]
            )
        c, ld, a = repo.TABLES["contacts"].c, repo.TABLES["leads"].c, repo.TABLES["activities"].c
        contact_match = or_(
            *([func.lower(c.email) == email.lower()] if email else []),
            *([c.id == contact_id] if contact_id else []),
        )
        lead_match = or_(
            *([func.lower(ld.email) == email.lower()] if email else []),
            *([ld.id == lead_id] if lead_id else []),
        )
        async with self._entities.transaction(write=True) as (uow, tx):
            contacts = (
                await self._anonymize(tx, model.CONTACT, contact_match) if (email or contact_id) else []
            )
            leads = await self._anonymize(tx, model.LEAD, lead_match) if (email or lead_id) else []
            # Notes and meetings about the person may hold anything: they go entirely.
            activities = await repo.purge(
                tx,
                model.ACTIVITY,
                or_(a.contact_id.in_([r["id"] for r in contacts]), a.lead_id.in_([r["id"] for r in leads])),
            )
            await uow.commit()
        records = [("contacts", str(r["id"])) for r in contacts]
        records += [("leads", str(r["id"])) for r in leads]
        records += [("activities", str(r["id"])) for r in activities]
        return Erasure(
            {"contacts": len(contacts), "leads": len(leads), "activities": len(activities)}, records
        )

    async def count(self, table_name: str) -> int:
        spec = spec_for(table_name)
        table = repo.table_of(spec)
        async with self._entities.transaction(write=False) as (_, tx):
            return await repo.count(tx, spec, table.c.deleted_at.is_(None) if spec.soft_delete else None)
