"""Typed expressions over `custom_fields` and the per-tenant indexes built on them.

A custom field defined `is_indexed` or `is_unique` on a core entity type gets a B-tree index
`(tenant_id, core.field_<type>(custom_fields, '<name>'))` on the type's table, partial on the
tenant (`WHERE tenant_id = '<uuid>'`), so an index holds one tenant's values of one field and
costs other tenants nothing. Lists filter and sort with exactly the same expression
(`typed_value`), so PostgreSQL can use the index. A unique field gets a plain index: uniqueness
is enforced by the service's own check under an advisory lock, among live records only.

Soft-deleted rows stay in the index (no `deleted_at IS NULL` in the predicate): then one index
serves lists with and without `show_deleted` (and Undelete's reads), and deleted rows are usually
few next to live ones, so an ordered scan skips them cheaply. A predicate on `deleted_at` would
also make every soft delete and undelete move the row in or out of the index.

`core.activities` is hash-partitioned by tenant: a tenant's rows all live in one partition, so the
index is built on that partition only (PostgreSQL prunes the others from every tenant-scoped
query, and CREATE INDEX CONCURRENTLY cannot run on a partitioned table anyway).

Why the builder connects as the schema owner: CREATE INDEX CONCURRENTLY (which does not block
other tenants' writes) cannot run inside a transaction block, so neither a transaction nor a
SECURITY DEFINER function can run it, and the service's app role owns no table and cannot create
indexes (by design: row-level security). The builder therefore opens a short autocommit
connection with the owner DSN (the one migrations use) and runs statements assembled only from
validated parts: a table from a fixed map, an index name derived from the field's UUID, the field
name re-checked against the api-name pattern, a reader chosen from a fixed map by field type, and
the tenant's UUID. Nothing a client typed reaches that text unchecked.

When: lazily (`IndexKeeper`). The first time a process loads a tenant's definitions of an entity
type, it checks the catalog once for the indexes they ask for and builds what is missing in the
background, off the request path. That covers new fields (a definition change makes the cache
forget, so the next call loads the new set), builds a restart interrupted, and tenants moved
here from another shard (rows move, indexes do not). A build that fails drops its INVALID index
and is logged; it never fails a call, and the next load of the definitions tries again.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import asyncpg
from sqlalchemy import BigInteger, Boolean, Date, DateTime, Numeric, Table, Text, literal_column
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import func

from services.core_entity import SCHEMA
from services.core_entity.domain.model import ENTITIES
from shared.db import asyncpg_dsn
from shared.fieldtypes import INDEX_READERS, FieldDefinition
from shared.logging import get_logger

log = get_logger(__name__)

#: The custom-object service's api-name pattern (its field names pass it before they are
#: stored); it admits no quote, backslash, space or newline, so a name can be a SQL literal.
FIELD_NAME: Final = re.compile(r"[a-z][a-z0-9_]*[a-z0-9]")
MAX_FIELD_NAME: Final = 63

#: The SQL reader of each indexable field type (migration 0004 creates them in `core`).
_READERS: Final = INDEX_READERS
_RESULT_TYPES: Final[Mapping[str, Any]] = {
    "field_bigint": BigInteger,
    "field_numeric": Numeric,
    "field_date": Date,
    "field_timestamptz": DateTime(timezone=True),
    "field_boolean": Boolean,
    "field_text": Text,
}
#: Every reader function, for docs and the LEAKPROOF mark a superuser may set.
READER_FUNCTIONS: Final = tuple(sorted(set(_READERS.values())))

#: Entity type -> its table in schema `core`, for the types that carry custom fields.
TABLES: Final[Mapping[str, str]] = {
    spec.name: spec.table for spec in ENTITIES.values() if spec.has_custom_fields
}
#: The partitions migration 0002 creates (`activities_p0`...).
_PARTITION: Final = re.compile(r"[a-z]+_p[0-9]{1,3}")
_HASH_BOUND: Final = re.compile(r"FOR VALUES WITH \(modulus ([0-9]{1,3}), remainder ([0-9]{1,3})\)")


def is_field_name(name: str) -> bool:
    return len(name) <= MAX_FIELD_NAME and FIELD_NAME.fullmatch(name) is not None


def checked_field_name(name: str) -> str:
    """A field name that may appear as a SQL string literal. Raises ValueError otherwise (it
    never should: the custom-object service validates names before storing them)."""
    if not is_field_name(name):
        raise ValueError(f"not a field api name: {name!r}")
    return name


def _key(name: str) -> ColumnElement[Any]:
    # A literal, as the index expression has it: a bound parameter would not match the index.
    return literal_column(f"'{checked_field_name(name)}'", type_=Text)


def reader_of(field_type: str) -> str:
    """The reader filters and sorts use for a field type; text for the unindexable text types."""
    return _READERS.get(field_type, "field_text")


def typed_value(table: Table, name: str, field_type: str) -> ColumnElement[Any]:
    """The field's value as its SQL type, for filters and sorting: the same reader call as the
    field's index, `core.field_x(custom_fields, '<name>')`. A multipicklist stays its JSON array."""
    doc = table.c.custom_fields
    if field_type == "multipicklist":
        return doc[_key(name)]
    reader = reader_of(field_type)
    function = getattr(getattr(func, SCHEMA), reader)
    return function(doc, _key(name), type_=_RESULT_TYPES[reader])  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class IndexedFieldDefinition(FieldDefinition):
    """A definition with what the index builder needs besides what the validator does: the
    field's id (the index is named after it) and its `is_indexed` flag. A definition source
    returns these where it knows them (the custom-object client); plain definitions get none."""

    #: The field's UUID as the custom-object service reports it.
    field_id: str = ""
    is_indexed: bool = False


@dataclass(frozen=True, slots=True)
class IndexSpec:
    """One custom field index: which tenant's values of which field, in which table, typed how."""

    field_id: uuid.UUID
    tenant_id: uuid.UUID
    table: str
    field_name: str
    field_type: str

    @property
    def name(self) -> str:
        return index_name(self.field_id)


def index_name(field_id: uuid.UUID) -> str:
    return f"ix_cf_{uuid.UUID(str(field_id)).hex}"


def specs_for(tenant_id: str, entity_type: str, definitions: Iterable[FieldDefinition]) -> list[IndexSpec]:
    """The indexes a tenant's definitions of one entity type ask for: active fields marked
    indexed or unique, of an indexable type, with a valid name and id. Anything else is skipped
    (an odd definition must not break the call that loaded it)."""
    table = TABLES.get(entity_type)
    if table is None:
        return []
    try:
        tenant = uuid.UUID(tenant_id)
    except ValueError:
        return []
    specs = []
    for definition in definitions:
        if not isinstance(definition, IndexedFieldDefinition) or not definition.is_active:
            continue
        if not (definition.is_indexed or definition.unique) or definition.field_type not in _READERS:
            continue
        try:
            field_id = uuid.UUID(definition.field_id)
            name = checked_field_name(definition.name)
        except ValueError:
            log.warning(
                "custom field not indexable", field=repr(definition.name)[:80], entity_type=entity_type
            )
            continue
        specs.append(IndexSpec(field_id, tenant, table, name, definition.field_type))
    return specs


def _identifier(name: str) -> str:
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,62}", name):
        raise ValueError(f"not a plain identifier: {name!r}")
    return name


def create_index_sql(spec: IndexSpec, relation: str) -> str:
    """The CREATE INDEX CONCURRENTLY statement, from validated parts only. `relation` is the
    spec's table or, for a partitioned table, the partition that holds the tenant."""
    if spec.table not in TABLES.values():
        raise ValueError(f"{spec.table!r} has no custom fields")
    if spec.field_type not in _READERS:
        raise ValueError(f"{spec.field_type} fields are not indexable")
    expression = index_expression(spec)
    tenant = uuid.UUID(str(spec.tenant_id))
    return (
        f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {spec.name} ON {SCHEMA}.{_identifier(relation)} "
        f"(tenant_id, ({expression})) WHERE tenant_id = '{tenant}'::uuid"
    )


def index_expression(spec: IndexSpec) -> str:
    return f"{SCHEMA}.{_READERS[spec.field_type]}(custom_fields, '{checked_field_name(spec.field_name)}')"


def statistics_sql(spec: IndexSpec) -> str:
    """Extended statistics on the field's expression. The index is partial (one tenant), and
    PostgreSQL takes no statistics from a partial index: without these it assumes 0.5% of the
    rows match any value, and at 1M rows prefers walking the sort column's index over the
    filter's (measured: 2.6 s against 26 ms for a page). One object per table and expression,
    shared by the tenants that have a field of that name and type."""
    expression = index_expression(spec)
    digest = hashlib.sha256(f"{spec.table}:{expression}".encode()).hexdigest()[:32]
    return (
        f"CREATE STATISTICS IF NOT EXISTS {SCHEMA}.st_cf_{digest} ON ({expression}) "
        f"FROM {SCHEMA}.{spec.table}"
    )


def drop_index_sql(field_id: uuid.UUID) -> str:
    return f"DROP INDEX CONCURRENTLY IF EXISTS {SCHEMA}.{index_name(field_id)}"


class IndexBuildFailed(Exception):
    """The index could not be built."""


class IndexBuilder:
    """Checks the catalog for custom field indexes and builds missing ones, on short autocommit
    connections as the schema owner."""

    def __init__(self, owner_dsn: str, statement_timeout_seconds: float = 1800.0) -> None:
        self._dsn = asyncpg_dsn(owner_dsn)
        self._timeout_ms = max(1, int(statement_timeout_seconds * 1000))

    async def _connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(
            self._dsn,
            server_settings={
                "statement_timeout": f"{self._timeout_ms}ms",
                "application_name": "crm-core-index",
            },
        )

    async def missing(self, specs: Sequence[IndexSpec]) -> list[IndexSpec]:
        """The specs with no valid index of their name."""
        conn = await self._connect()
        try:
            found = await conn.fetch(
                "SELECT c.relname FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = $1 AND c.relname = ANY($2::text[]) AND i.indisvalid",
                SCHEMA,
                [s.name for s in specs],
            )
        finally:
            await conn.close()
        present = {r["relname"] for r in found}
        return [s for s in specs if s.name not in present]

    async def build(self, spec: IndexSpec) -> bool:
        """Builds the index unless it exists and is valid. False when another process is
        building it right now (it holds the index's advisory lock); raises IndexBuildFailed
        after dropping what a failed build left."""
        conn = await self._connect()
        try:
            # One builder per index across the shard's processes: a second CREATE INDEX
            # CONCURRENTLY would find the first one's still-invalid index and take it for a
            # crashed build's leftover.
            locked = await conn.fetchval(
                "SELECT pg_try_advisory_lock(hashtextextended($1, 0))",
                f"{SCHEMA}.custom_field_index:{spec.name}",
            )
            if not locked:
                return False
            valid = await conn.fetchval(
                "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)", f"{SCHEMA}.{spec.name}"
            )
            if valid:
                return True
            try:
                if valid is False:  # an interrupted build's leftover: the lock says nobody builds it
                    await conn.execute(drop_index_sql(spec.field_id))
                await conn.execute(create_index_sql(spec, await self._relation(conn, spec)))
            except (asyncpg.PostgresError, ValueError) as exc:
                await self._drop_quietly(conn, spec)
                raise IndexBuildFailed(f"{spec.name}: {exc}") from exc
            await self._gather_statistics(conn, spec)
            return True
        except asyncio.CancelledError:
            conn.terminate()  # shutdown: the server cancels the build; the next process rebuilds
            raise
        finally:
            if not conn.is_closed():
                await conn.close(timeout=10)

    @staticmethod
    async def _gather_statistics(conn: asyncpg.Connection, spec: IndexSpec) -> None:
        # Plans, not correctness: a failure is logged and the index still serves.
        try:
            await conn.execute(statistics_sql(spec))
            await conn.execute(f"ANALYZE {SCHEMA}.{spec.table}")
        except asyncpg.PostgresError as exc:
            log.warning("custom field statistics failed", index=spec.name, error=str(exc))

    @staticmethod
    async def _drop_quietly(conn: asyncpg.Connection, spec: IndexSpec) -> None:
        # A failed concurrent build leaves an INVALID index that writes still maintain.
        try:
            await conn.execute(drop_index_sql(spec.field_id))
        except asyncpg.PostgresError as exc:  # left for the next build, which drops it first
            log.warning("dropping a failed custom field index failed", index=spec.name, error=str(exc))

    @staticmethod
    async def _relation(conn: asyncpg.Connection, spec: IndexSpec) -> str:
        """The table to index: the spec's table, or the partition of it that holds the tenant."""
        kind = await conn.fetchval(
            "SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)", f"{SCHEMA}.{spec.table}"
        )
        if kind == "r":
            return spec.table
        if kind != "p":
            raise IndexBuildFailed(f"{SCHEMA}.{spec.table} is not a table")
        partitions = await conn.fetch(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass($1)",
            f"{SCHEMA}.{spec.table}",
        )
        for partition in partitions:
            bound = _HASH_BOUND.fullmatch(partition["bound"] or "")
            if bound is None or not _PARTITION.fullmatch(partition["relname"]):
                continue
            holds = await conn.fetchval(
                "SELECT satisfies_hash_partition(to_regclass($1)::oid, $2::int, $3::int, $4::uuid)",
                f"{SCHEMA}.{spec.table}",
                int(bound[1]),
                int(bound[2]),
                spec.tenant_id,
            )
            if holds:
                return str(partition["relname"])
        raise IndexBuildFailed(f"no hash partition of {SCHEMA}.{spec.table} holds tenant {spec.tenant_id}")


_Key = tuple[str, str, frozenset[str]]


class IndexKeeper:
    """Notices custom field indexes that should exist but do not, and builds them in the
    background: once per (tenant, entity type, set of indexes) and process, when that set is
    first loaded (`ensure`, called by `CustomFields` on every load of definitions)."""

    def __init__(self, builder: IndexBuilder | None, concurrent_builds: int = 1) -> None:
        self._builder = builder
        # Builds scan the whole table (every tenant's rows); one at a time spares the shard.
        self._builds = asyncio.Semaphore(concurrent_builds)
        self._verified: set[_Key] = set()
        self._pending: set[_Key] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def ensure(self, tenant_id: str, entity_type: str, definitions: Iterable[FieldDefinition]) -> None:
        """Schedules the check (and builds) for these definitions unless done or under way."""
        if self._builder is None:
            return
        try:
            specs = specs_for(tenant_id, entity_type, definitions)
            if not specs:
                return
            key: _Key = (tenant_id, entity_type, frozenset(s.name for s in specs))
            if key in self._verified or key in self._pending:
                return
            task = asyncio.create_task(self._keep(key, specs), name=f"custom-field-indexes:{entity_type}")
        except Exception as exc:  # indexes are an optimisation: never fail the call that loaded
            log.warning("scheduling custom field indexes failed", entity_type=entity_type, error=str(exc))
            return
        self._pending.add(key)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _keep(self, key: _Key, specs: Sequence[IndexSpec]) -> None:
        assert self._builder is not None
        complete = True
        try:
            for spec in await self._builder.missing(specs):
                async with self._builds:
                    try:
                        built = await self._builder.build(spec)
                    except IndexBuildFailed as exc:
                        complete = False
                        log.warning("building a custom field index failed", index=spec.name, error=str(exc))
                        continue
                if built:
                    log.info(
                        "built a custom field index", index=spec.name, table=spec.table, field=spec.field_name
                    )
                else:
                    complete = False  # another process is building it; check again on a later load
            if complete:
                self._verified.add(key)
        except Exception as exc:  # logged; the next load of the definitions checks again
            log.warning("checking custom field indexes failed", entity_type=key[1], error=str(exc))
        finally:
            self._pending.discard(key)

    def forget(self, tenant_id: str | None = None) -> None:
        """Checks again on the next load (after a definition change for the tenant)."""
        self._verified = {k for k in self._verified if tenant_id is not None and k[0] != tenant_id}

    async def wait(self) -> None:
        """Waits for the background checks and builds (tests)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        """Shutdown: stops running builds (an interrupted one is rebuilt by a later process)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
