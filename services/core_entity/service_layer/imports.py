"""Bulk import and export of core records as text rows (the shape of a CSV line).

Import checks every row with the same rules as Create (parsing, field rules, custom fields,
references, uniqueness) and writes a batch in one transaction, with one event per record like
Create. A batch is prepared first, outside any transaction: the rules that need no database, and
each row built with its INSERT event (`prepare`). Then its transaction runs the rules that need
the database and writes it with a few statements on the transaction's asyncpg connection
(`write`): the records with one INSERT ... SELECT FROM unnest (PostgreSQL refuses COPY into a
table with row-level security; this goes through the tenant policy), the events with COPY into
the outbox, and `core.import_rows`, which records which row indexes of an import id have landed,
so a retried import skips them instead of creating them twice; a lock on the import id makes
concurrent retries take turns.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import json
import os
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii
from typing import Any

import asyncpg
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from crm.v1 import events_pb2
from services.core_entity import SCHEMA, SERVICE
from services.core_entity.adapters import repository as repo
from services.core_entity.adapters.repository import Row, Tx
from services.core_entity.domain import model
from services.core_entity.domain.model import EntitySpec, FieldSpec, Kind
from services.core_entity.entrypoints.codec import ADDRESS_PARTS
from services.core_entity.service_layer.entities import CoreEntities, validate
from shared.context import current_call
from shared.db import UnitOfWork
from shared.errors import CrmError, FieldViolation, InvalidArgument
from shared.events import SECRET_COLUMNS, _json_default, build_change_event, change_subject
from shared.observability import inject_headers
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


@dataclass(frozen=True, slots=True)
class _Columns:
    """What parsing a text row needs to know of a spec, worked out once per spec."""

    writable: dict[str, FieldSpec]
    ignored: frozenset[str]
    flags: tuple[str, ...]


_COLUMNS: dict[str, _Columns] = {}


def _columns_of(spec: EntitySpec) -> _Columns:
    found = _COLUMNS.get(spec.name)
    if found is None:
        writable = {f.api: f for f in spec.writable}
        found = _COLUMNS[spec.name] = _Columns(
            writable=writable,
            ignored=OUTPUT_ONLY | {f.api for f in spec.fields if f.api not in writable},
            # Like an unset proto bool: a missing flag is false, never NULL.
            flags=tuple(f.col for f in spec.writable if f.kind is Kind.BOOL and not f.presence),
        )
    return found


def parse_text_row(
    spec: EntitySpec, values: Mapping[str, str], custom_types: Mapping[str, str]
) -> tuple[dict[str, Any], list[FieldViolation]]:
    """A text row as column values; every unparsable or unknown key is a violation."""
    out: dict[str, Any] = {}
    custom: dict[str, Any] = {}
    violations: list[FieldViolation] = []
    columns = _columns_of(spec)
    writable = columns.writable
    for key, raw in values.items():
        text_value = raw.strip()
        head, _, part = key.partition(".")
        if key in columns.ignored:
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
    for flag in columns.flags:
        out.setdefault(flag, False)
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


# The import's statements run on the transaction's asyncpg connection (STYLE #14): SQLAlchemy's
# execution layer costs about 0.5 ms of CPU per statement here, and its executemany of a batch's
# rows far more than one array-valued statement or COPY.
LOCK_IMPORT = "SELECT pg_advisory_xact_lock(hashtextextended('core.import:' || $1::text, 0))"
LANDED_ROWS = (
    f"SELECT row_index, record_id FROM {SCHEMA}.import_rows "
    "WHERE tenant_id = $1 AND import_id = $2 AND row_index = ANY($3::bigint[])"
)
RECORD_IMPORT_ROWS = (
    f"INSERT INTO {SCHEMA}.import_rows "
    "(tenant_id, import_id, row_index, entity_type, record_id, created_at) "
    "SELECT $1, $2, landed.row_index, $3, landed.record_id, $4 "
    "FROM unnest($5::bigint[], $6::uuid[]) AS landed (row_index, record_id)"
)
COLUMN_TYPES = (
    "SELECT attname, format_type(atttypid, NULL) FROM pg_attribute "
    "WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped"
)
NOTIFY = "SELECT pg_notify($1, '')"
OUTBOX_COLUMNS = ("id", "subject", "payload", "headers")
EMAIL_TAKEN = "another contact already has this e-mail address"
CONFLICT = "conflicts with a record written meanwhile"


@dataclass(frozen=True, slots=True)
class InsertStatement:
    """One table's batch INSERT: its columns, which of them are JSONB, and the statement."""

    columns: list[str]
    json_columns: frozenset[str]
    sql: str


_INSERTS: dict[str, InsertStatement] = {}


async def _insert_statement(conn: asyncpg.Connection, spec: EntitySpec) -> InsertStatement:
    """`INSERT ... SELECT FROM unnest(<one array per column>) ON CONFLICT DO NOTHING`:
    a whole batch in one statement. PostgreSQL refuses COPY into a table with row-level security;
    this goes through the tenant policy like any INSERT. A row a unique index refuses (an e-mail
    address taken since the batch was checked, even by a transaction still open: the insert
    waits for it) is skipped and reported, not a failed batch. Arrays are cast to the columns'
    types without length or precision, so an over-long value fails as on COPY instead of being cut."""
    found = _INSERTS.get(spec.table)
    if found is None:
        types = {r[0]: r[1] for r in await conn.fetch(COLUMN_TYPES, f"{SCHEMA}.{spec.table}")}
        columns = [c.name for c in repo.table_of(spec).columns]
        arrays = ", ".join(f"${i}::{types[c]}[]" for i, c in enumerate(columns, 1))
        found = _INSERTS[spec.table] = InsertStatement(
            columns,
            frozenset(c for c in columns if types[c] == "jsonb"),
            f"INSERT INTO {SCHEMA}.{spec.table} ({', '.join(columns)}) SELECT * FROM unnest({arrays}) "
            "ON CONFLICT DO NOTHING",
        )
    return found


def event_prefix(tenant_id: str, spec: EntitySpec) -> bytes:
    """The serialized part every INSERT event of one batch shares (tenant, table, actor, call,
    time), built by `build_change_event` like any other change. A serialized protobuf message
    followed by another parses as their merge, so each row only appends its own fields."""
    shared = build_change_event(
        tenant_id=tenant_id,
        service=SERVICE,
        table=spec.table,
        record_id="",
        operation="INSERT",
        old=None,
        new=None,
        version=1,
    )
    shared.ClearField("event_id")
    return shared.SerializeToString()


# Kinds JSON has no type for, which shared.events writes as text.
TEXT_KINDS = frozenset({uuid.UUID, decimal.Decimal, dt.date, dt.datetime})


class EventValues:
    """`shared.events.to_json` of the new rows of a batch, byte for byte (a test holds the two
    equal), at a fraction of the cost: keys and the values every row of the batch shares (tenant,
    actor, clock) are written once into a template, and each row encodes only its own values."""

    def __init__(self, columns: Sequence[str], shared: Mapping[str, Any]) -> None:
        self._encoder = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=_json_default)
        parts = []
        self._own: list[str] = []
        for key in sorted(c for c in columns if c not in SECRET_COLUMNS):
            if key in shared:
                parts.append(
                    f"{encode_basestring_ascii(key)}:{self._encoder.encode(shared[key])}".replace("%", "%%")
                )
            else:
                parts.append(f"{encode_basestring_ascii(key)}:%s")
                self._own.append(key)
        self._template = "{" + ",".join(parts) + "}"

    def __call__(self, row: Row) -> str:
        return self._template % tuple([self._value(row[key]) for key in self._own])

    def _value(self, value: Any) -> str:
        # Each kind as json.dumps writes it, without the encoder's set-up where it is not needed.
        kind = type(value)
        if kind is str:
            return encode_basestring_ascii(value)
        if value is None:
            return "null"
        if kind is bool:
            return "true" if value else "false"
        if kind is int:
            return int.__repr__(value)
        if kind is dict or kind is list:
            return self._encoder.encode(value) if value else ("{}" if kind is dict else "[]")
        if kind in TEXT_KINDS:
            return encode_basestring_ascii(_json_default(value))
        return self._encoder.encode(value)


def insert_event(prefix: bytes, event_id: str, record_id: str, values_json: str) -> bytes:
    """The INSERT event of one imported row: the batch's shared part plus this row's fields."""
    own = events_pb2.ChangeEvent(event_id=event_id, record_id=record_id, new_values_json=values_json)
    return prefix + own.SerializeToString()


# Random ids made at a time (each row takes two: the record's and its event's).
ID_BATCH = 512
# Rows prepared between two yields to the event loop, so that the previous batch's statements
# are answered promptly while the next batch is prepared.
PREPARE_SLICE = 64


@dataclass(slots=True)
class PreparedRow:
    """A row that passed the rules needing no database, built into its stored row and event."""

    index: int
    #: The record as checked so far; the database checks may still fill values (`check`).
    record: dict[str, Any]
    #: The record as `row` and `outbox` were built from.
    built_from: dict[str, Any]
    row: Row
    #: The outbox row: id, subject, payload (the INSERT event) and headers.
    outbox: tuple[Any, ...]


@dataclass
class PreparedBatch:
    """A batch after the checks that need no database: its rows, ready to write, and the rows
    those checks refused. Prepared outside the transaction (and while the previous batch is being
    written), so the database checks and the writes are all the transaction holds."""

    spec: EntitySpec
    tenant_id: uuid.UUID
    actor: uuid.UUID
    rows: list[PreparedRow]
    errors: dict[int, list[FieldViolation]]
    #: Builds a stored row and its outbox row from a checked record.
    build: RowBuilder


class RowBuilder:
    """Turns checked records of one batch into stored rows and their INSERT events. What every
    row of the batch shares (tenant, actor, clock, the event's call fields) is worked out once."""

    def __init__(self, spec: EntitySpec, tenant_id: uuid.UUID, actor: uuid.UUID, now: dt.datetime) -> None:
        self._columns = [c.name for c in repo.table_of(spec).columns]
        self._shared = {
            "tenant_id": tenant_id,
            "version": 1,
            "created_at": now,
            "updated_at": now,
            "created_by": actor,
            "updated_by": actor,
        }
        self._subject = change_subject(str(tenant_id), SERVICE, spec.table, "INSERT")
        self._prefix = event_prefix(str(tenant_id), spec)
        self._values_json = EventValues(self._columns, self._shared)
        # The call's trace context, the same for every event of the batch.
        trace = inject_headers({})
        self._headers = json.dumps(trace) if trace else None
        self._ids: list[str] = []

    def __call__(
        self, record: Mapping[str, Any], record_id: str | None = None
    ) -> tuple[Row, tuple[Any, ...]]:
        if len(self._ids) < 2:
            self._ids = random_uuids(2 * ID_BATCH)
        row = {column: record.get(column) for column in self._columns}
        row.update(self._shared)
        row["id"] = record_id = record_id or self._ids.pop()
        if "custom_fields" in row and row["custom_fields"] is None:
            row["custom_fields"] = {}
        event_id = self._ids.pop()
        event = insert_event(self._prefix, event_id, record_id, self._values_json(row))
        return row, (event_id, self._subject, event, self._headers)


# Hex digit -> the RFC 4122 variant digit (10xx) keeping the digit's two low random bits.
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def random_uuids(count: int) -> list[str]:
    """Random (version 4) UUIDs as text, from one read of the system's randomness: uuid.uuid4
    reads it once per id and builds an object we only ever turn into text (as asyncpg takes it)."""
    digits = os.urandom(16 * count).hex()
    made = []
    for start in range(0, 32 * count, 32):
        h = digits[start : start + 32]
        made.append(f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}")
    return made


def call_actor() -> uuid.UUID:
    """Who acts, named as `CoreEntities.transaction` names it (the write checks they agree)."""
    user_id = current_call().user_id
    try:
        return uuid.UUID(user_id) if user_id else repo.SYSTEM_ACTOR
    except ValueError:
        return repo.SYSTEM_ACTOR


TENANTS_WITH_OLD_IMPORTS = f"SELECT * FROM {SCHEMA}.tenants_with_imports_before($1)"
PRUNE_IMPORT_ROWS = f"DELETE FROM {SCHEMA}.import_rows WHERE tenant_id = $1::uuid AND created_at < $2"


async def prune_import_rows(sessions: async_sessionmaker[AsyncSession], kept_for: dt.timedelta) -> int:
    """Forgets which rows of imports older than `kept_for` landed (a retry of such an import
    would create its rows again): without this `core.import_rows` keeps a row for every row
    ever imported. The tenants with old rows come from the owner's function (migration 0005);
    each tenant's rows are deleted in its own transaction, under the tenant policy."""
    before = dt.datetime.now(dt.UTC) - kept_for
    async with UnitOfWork(sessions, tenant_id=None) as uow:
        tenants = [str(row[0]) for row in await uow.conn.fetch(TENANTS_WITH_OLD_IMPORTS, before)]
    deleted = 0
    for tenant in tenants:
        async with UnitOfWork(sessions, tenant_id=tenant) as uow:
            status = await uow.conn.execute(PRUNE_IMPORT_ROWS, tenant, before)
            await uow.commit()
        deleted += int(status.split()[-1])
    return deleted


class Importer:
    def __init__(self, entities: CoreEntities) -> None:
        self._entities = entities

    async def import_batch(
        self, spec: EntitySpec, import_id: uuid.UUID, rows: Sequence[tuple[int, Mapping[str, str]]]
    ) -> BatchResult:
        return await self.write(import_id, await self.prepare(spec, rows))

    async def prepare(self, spec: EntitySpec, rows: Sequence[tuple[int, Mapping[str, str]]]) -> PreparedBatch:
        """Parses the rows and checks them with Create's rules that need no database."""
        custom_types = await self._entities.custom_types(spec)
        tenant_id, actor, now = uuid.UUID(self._entities.tenant()), call_actor(), dt.datetime.now(dt.UTC)
        build = RowBuilder(spec, tenant_id, actor, now)
        batch = PreparedBatch(spec, tenant_id, actor, [], {}, build)
        defined = await self._has_custom_fields(spec, str(tenant_id))
        for position, (index, values) in enumerate(rows, 1):
            try:
                record = await self._parse(spec, str(tenant_id), values, custom_types, defined)
            except CrmError as exc:
                batch.errors[index] = _error_field(exc)
            else:
                row, outbox = build(record)
                batch.rows.append(PreparedRow(index, record, dict(record), row, outbox))
            if position % PREPARE_SLICE == 0:
                await asyncio.sleep(0)
        return batch

    async def write(self, import_id: uuid.UUID, batch: PreparedBatch) -> BatchResult:
        """Checks what needs the database and writes the batch in one transaction."""
        try:
            return await self._write_batch(import_id, batch, one_by_one=False)
        except (DBAPIError, asyncpg.PostgresError):
            # The database refused the batch (say, a referenced record removed since the check):
            # redo it row by row, so only the refused rows fail.
            return await self._write_batch(import_id, batch, one_by_one=True)

    async def _write_batch(
        self, import_id: uuid.UUID, batch: PreparedBatch, *, one_by_one: bool
    ) -> BatchResult:
        spec = batch.spec
        result = BatchResult()
        async with self._entities.transaction(write=True) as (uow, tx):
            if (tx.tenant_id, tx.actor) != (batch.tenant_id, batch.actor):
                raise RuntimeError("an import batch was prepared for another tenant or actor")
            conn = tx.conn
            # Retries of one import take turns; what the other one committed is visible to the
            # statements after the lock.
            await conn.execute(LOCK_IMPORT, str(import_id))
            indexes = sorted([*batch.errors, *(item.index for item in batch.rows)])
            landed_before = await conn.fetch(LANDED_ROWS, tx.tenant_id, import_id, indexes)
            done = {int(index): str(record_id) for index, record_id in landed_before}
            result.record_ids.update(done)
            result.errors.update(
                {index: errors for index, errors in batch.errors.items() if index not in done}
            )
            valid = await self._checked(tx, batch, done, result)
            landed: list[PreparedRow] = []
            if one_by_one:
                for item in valid:
                    try:
                        async with conn.transaction():  # a savepoint: a refused row undoes only itself
                            landed += await self._write(tx, spec, import_id, [item], result)
                    except asyncpg.PostgresError:
                        result.errors[item.index] = [FieldViolation("row", CONFLICT)]
            else:
                landed = await self._write(tx, spec, import_id, valid, result)
            if landed:
                # Delivered at commit: wakes the outbox relay.
                await conn.execute(NOTIFY, notify_channel(SCHEMA))
            await uow.commit()
        result.record_ids.update({item.index: str(item.row["id"]) for item in landed})
        return result

    async def _checked(
        self, tx: Tx, batch: PreparedBatch, done: Mapping[int, str], result: BatchResult
    ) -> list[PreparedRow]:
        """The prepared rows not landed before that pass the rules needing the database (as
        Create checks them) and do not repeat an e-mail address or unique custom value of an
        earlier row of the batch; the others go to result.errors. E-mail addresses other
        contacts already have are left to the unique index (`_write`)."""
        spec = batch.spec
        valid: list[PreparedRow] = []
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
        for item in batch.rows:
            index, record = item.index, item.record
            if index in done:
                continue
            try:
                await self._entities.check(tx, spec, record, None, ROW, check_email=False)
            except CrmError as exc:
                result.errors[index] = _error_field(exc)
                continue
            if record != item.built_from:
                # The checks filled derived values: the row and its event are built again.
                item.row, item.outbox = batch.build(record, item.row["id"])
                item.built_from = dict(record)
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
            valid.append(item)
        return valid

    async def _has_custom_fields(self, spec: EntitySpec, tenant_id: str) -> bool:
        if not spec.has_custom_fields:
            return False
        try:
            return bool(await self._entities.custom_fields.definitions(tenant_id, spec.name))
        except CrmError:
            return True  # each row's check then reports the failure, as Create does

    async def _parse(
        self,
        spec: EntitySpec,
        tenant_id: str,
        values: Mapping[str, str],
        custom_types: Mapping[str, str],
        defined: bool,
    ) -> dict[str, Any]:
        """A row checked like Create with the rules that need no database (raises on the first
        failing kind of rule, like Create)."""
        record, violations = parse_text_row(spec, values, custom_types)
        record = {k: v for k, v in record.items() if v is not None}
        for column, default in spec.defaults.items():
            record.setdefault(column, default)
        violations += validate(spec, record, ROW, creating=True)
        given = record.get("custom_fields") or {}
        if spec.has_custom_fields and (given or defined):
            cleaned, bad = await self._entities.custom_fields.clean(
                tenant_id, spec.name, given, None, f"{ROW}.custom_fields"
            )
            record["custom_fields"] = cleaned
            violations += bad
        elif spec.has_custom_fields:
            record["custom_fields"] = {}  # nothing given, nothing defined: nothing to check
        if violations:
            raise InvalidArgument(violations)
        return record

    async def _write(
        self, tx: Tx, spec: EntitySpec, import_id: uuid.UUID, valid: list[PreparedRow], result: BatchResult
    ) -> list[PreparedRow]:
        """Writes the records, then the outbox and import bookkeeping rows of those a unique
        index did not refuse (which go to result.errors); returns the written ones."""
        if not valid:
            return []
        conn = tx.conn
        insert = await _insert_statement(conn, spec)
        arrays = [
            [json.dumps(v) if v is not None else None for v in (item.row[c] for item in valid)]
            if c in insert.json_columns
            else [item.row[c] for item in valid]
            for c in insert.columns
        ]
        status = await conn.execute(insert.sql, *arrays)
        landed = valid
        if int(status.rsplit(" ", 1)[1]) < len(valid):
            stored = {
                str(r[0])
                for r in await conn.fetch(
                    f"SELECT id FROM {SCHEMA}.{spec.table} WHERE id = ANY($1::uuid[])",
                    [item.row["id"] for item in valid],
                )
            }
            landed = [item for item in valid if item.row["id"] in stored]
            # Only contacts have a unique index that a new row can meet (their e-mail address).
            field, message = ("email", EMAIL_TAKEN) if spec is model.CONTACT else ("row", CONFLICT)
            for item in valid:
                if item.row["id"] not in stored:
                    result.errors[item.index] = [FieldViolation(field, message)]
        if not landed:
            return []
        # The outbox has no row-level security: COPY straight in.
        await conn.copy_records_to_table(
            "outbox", schema_name=SCHEMA, columns=OUTBOX_COLUMNS, records=[item.outbox for item in landed]
        )
        await conn.execute(
            RECORD_IMPORT_ROWS,
            tx.tenant_id,
            import_id,
            spec.name,
            tx.now,
            [item.index for item in landed],
            [item.row["id"] for item in landed],
        )
        return landed

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
