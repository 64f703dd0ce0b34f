"""Typed expressions over `record_data` and the per-field indexes built on them.

`is_indexed` builds a B-tree expression index on the field's typed value and `is_unique` a
unique one, each partial on the field's object (`WHERE custom_object_id = '<uuid>'`), so an
index holds one tenant object's values only. ListRecords compares and sorts with exactly the same
expressions (`typed_value`), so PostgreSQL can use the index.

Why the builder connects as the schema owner: indexes are built with CREATE INDEX CONCURRENTLY,
so other tenants' writes to the shared records table are never blocked, and CONCURRENTLY cannot
run inside a transaction block, so neither a transaction nor a SECURITY DEFINER function can run
it. The app role owns no table and cannot create indexes (by design: RLS). The builder therefore
opens a short autocommit connection with the owner DSN (the one migrations use) and runs one
statement assembled only from validated parts: a fixed table, an index name derived from the
field's UUID, the field name re-checked against the api-name pattern, a cast chosen from a fixed
table by field type, and the object's UUID. Nothing a client typed reaches that text unchecked.

A build that fails (duplicates under a new unique index, or a crash) leaves an INVALID index; the
builder drops it and the field's `index_state` says `failed`; a later update that sets the flag
again retries the build.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import asyncpg
from sqlalchemy import BigInteger, Boolean, Date, DateTime, Numeric, Text, literal_column, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import func

from services.custom_object.adapters.tables import custom_object_records
from services.custom_object.domain.rules import API_NAME
from shared.db import asyncpg_dsn
from shared.fieldtypes import INDEX_READERS
from shared.logging import get_logger

log = get_logger(__name__)

RECORDS_TABLE: Final = "custom.custom_object_records"

#: The SQL reader of each indexable field type (migration 0002 creates them in `custom`).
_READERS: Final = INDEX_READERS
#: Every reader function, for docs and the LEAKPROOF grant a superuser may run.
READER_FUNCTIONS: Final = tuple(sorted(set(_READERS.values())))


def checked_field_name(name: str) -> str:
    """A field name that may appear as a SQL string literal: the api-name pattern admits no quote,
    backslash or space. Raises ValueError otherwise (it never should: names are validated)."""
    if not API_NAME.match(name) or len(name) > 63:
        raise ValueError(f"not a field api name: {name!r}")
    return name


def json_text(name: str) -> ColumnElement[Any]:
    """`record_data ->> '<name>'` with the key as a literal, as the index expression has it (a
    bound parameter would not match the index)."""
    key: ColumnElement[Any] = literal_column(f"'{checked_field_name(name)}'")
    return custom_object_records.c.record_data.op("->>", return_type=Text)(key)


def _key(name: str) -> ColumnElement[Any]:
    return literal_column(f"'{checked_field_name(name)}'", type_=Text)


def typed_value(name: str, field_type: str) -> ColumnElement[Any]:
    """The field's value as its SQL type, for filters and sorting: the same reader call as the
    field's index, with the key as a literal (a bound parameter would not match the index)."""
    doc = custom_object_records.c.record_data
    if field_type == "multipicklist":
        return doc[_key(name)]
    reader = _READERS.get(field_type, "field_text")
    result_types: dict[str, Any] = {
        "field_bigint": BigInteger,
        "field_numeric": Numeric,
        "field_date": Date,
        "field_timestamptz": DateTime(timezone=True),
        "field_boolean": Boolean,
        "field_text": Text,
    }
    return getattr(func.custom, reader)(doc, _key(name), type_=result_types[reader])  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class IndexSpec:
    """One field index: which field, of which object, typed how, unique or not."""

    field_id: uuid.UUID
    custom_object_id: uuid.UUID
    field_name: str
    field_type: str
    unique: bool

    @property
    def name(self) -> str:
        return index_name(self.field_id, self.unique)


def index_name(field_id: uuid.UUID, unique: bool) -> str:
    return f"{'ux' if unique else 'ix'}_cf_{field_id.hex}"


def create_index_sql(spec: IndexSpec) -> str:
    """The CREATE INDEX CONCURRENTLY statement, from validated parts only."""
    if spec.field_type not in _READERS:
        raise ValueError(f"{spec.field_type} fields are not indexable")
    expression = index_expression(spec)
    object_id = uuid.UUID(str(spec.custom_object_id))
    unique = "UNIQUE " if spec.unique else ""
    return (
        f"CREATE {unique}INDEX CONCURRENTLY IF NOT EXISTS {spec.name} "
        f"ON {RECORDS_TABLE} (({expression})) WHERE custom_object_id = '{object_id}'::uuid"
    )


def index_expression(spec: IndexSpec) -> str:
    return f"custom.{_READERS[spec.field_type]}(record_data, '{checked_field_name(spec.field_name)}')"


def statistics_sql(spec: IndexSpec) -> str:
    """Extended statistics on the field's expression: the index is partial (one object), and
    PostgreSQL takes no statistics from a partial index, so without these it assumes 0.5% of the
    records match any value and at 1M records prefers walking the sort field's index over the
    filter's. One object per expression, shared by the objects with a field of that name and type."""
    expression = index_expression(spec)
    digest = hashlib.sha256(expression.encode()).hexdigest()[:32]
    return f"CREATE STATISTICS IF NOT EXISTS custom.st_cf_{digest} ON ({expression}) FROM {RECORDS_TABLE}"


def drop_index_sql(field_id: uuid.UUID, unique: bool) -> str:
    return f"DROP INDEX CONCURRENTLY IF EXISTS custom.{index_name(uuid.UUID(str(field_id)), unique)}"


class IndexBuildFailed(Exception):
    """The index could not be built (e.g. duplicate values under a unique index)."""


class IndexBuilder:
    """Runs index DDL on a short autocommit connection as the schema owner."""

    def __init__(self, owner_dsn: str, statement_timeout_seconds: int = 600) -> None:
        self._dsn = asyncpg_dsn(owner_dsn)
        self._timeout = statement_timeout_seconds

    async def _connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(
            self._dsn,
            server_settings={"statement_timeout": f"{self._timeout}s", "application_name": "crm-index"},
        )

    async def build(self, spec: IndexSpec) -> None:
        conn = await self._connect()
        try:
            try:
                await conn.execute(create_index_sql(spec))
            except asyncpg.PostgresError as exc:
                # A failed concurrent build leaves an INVALID index behind; remove it.
                await conn.execute(drop_index_sql(spec.field_id, spec.unique))
                raise IndexBuildFailed(str(exc)) from exc
            valid = await conn.fetchval(
                "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)", f"custom.{spec.name}"
            )
            if valid is False:  # IF NOT EXISTS found an invalid leftover of an interrupted build
                await conn.execute(drop_index_sql(spec.field_id, spec.unique))
                await conn.execute(create_index_sql(spec))
            try:  # plans, not correctness: a failure is logged and the index still serves
                await conn.execute(statistics_sql(spec))
                await conn.execute(f"ANALYZE {RECORDS_TABLE}")
            except asyncpg.PostgresError as exc:
                log.warning("custom field statistics failed", index=spec.name, error=str(exc))
        finally:
            await conn.close()

    async def drop(self, field_id: uuid.UUID) -> None:
        conn = await self._connect()
        try:
            for unique in (False, True):
                await conn.execute(drop_index_sql(field_id, unique))
        finally:
            await conn.close()


#: A build still "building" after this long was interrupted (a crash or restart mid-build).
STALE_BUILD_SECONDS = 600


def specs_of(row: Mapping[str, Any]) -> list[IndexSpec]:
    """The indexes a field row asks for (none for core entity types: their rows live elsewhere)."""
    if row["custom_object_id"] is None or row["field_type"] not in _READERS:
        return []
    specs = []
    if row["is_indexed"]:
        specs.append(
            IndexSpec(row["id"], row["custom_object_id"], row["field_name"], row["field_type"], False)
        )
    if row["is_unique"]:
        specs.append(
            IndexSpec(row["id"], row["custom_object_id"], row["field_name"], row["field_type"], True)
        )
    return specs


class IndexKeeper:
    """Notices field indexes that should exist but do not, and builds them in the background.

    Indexes are not data: a tenant moved to this shard arrives with its definitions and records
    but without the per-field indexes, and a build a restart interrupted leaves none (or an
    invalid one). The first record call that loads an object's fields in a process checks the
    catalog once for them; what is missing is rebuilt concurrently, off the request path.
    """

    def __init__(self, builder: IndexBuilder | None) -> None:
        self._builder = builder
        self._verified: set[str] = set()
        self._building: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def ensure(self, session: AsyncSession, rows: Iterable[Mapping[str, Any]]) -> None:
        if self._builder is None:
            return
        now = dt.datetime.now(dt.UTC)
        wanted: dict[str, IndexSpec] = {}
        for row in rows:
            if row["index_state"] == "failed":
                continue  # waits for the tenant to fix the values and update the field
            if (
                row["index_state"] == "building"
                and (now - row["updated_at"]).total_seconds() < STALE_BUILD_SECONDS
            ):
                continue  # a build is probably running right now
            for spec in specs_of(row):
                if spec.name not in self._verified and spec.name not in self._building:
                    wanted[spec.name] = spec
        if not wanted:
            return
        present = await session.execute(
            text(
                "SELECT c.relname FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'custom' AND c.relname = ANY(:names) AND i.indisvalid"
            ),
            {"names": list(wanted)},
        )
        found = {r[0] for r in present}
        self._verified |= found
        for name, spec in wanted.items():
            if name not in found:
                self._building.add(name)
                task = asyncio.create_task(self._build(spec))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _build(self, spec: IndexSpec) -> None:
        assert self._builder is not None
        try:
            await self._builder.build(spec)
            self._verified.add(spec.name)
            log.info("rebuilt a missing field index", index=spec.name)
        except Exception as exc:  # logged; the next process (or a field update) tries again
            log.warning("rebuilding a field index failed", index=spec.name, error=str(exc))
        finally:
            self._building.discard(spec.name)

    def forget(self, field_id: uuid.UUID) -> None:
        """After a field's indexes were dropped or rebuilt by a definition change."""
        for unique in (False, True):
            self._verified.discard(index_name(field_id, unique))

    async def wait(self) -> None:
        """Waits for the background builds (tests, shutdown)."""
        await asyncio.gather(*self._tasks, return_exceptions=True)
