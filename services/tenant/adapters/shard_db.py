"""Direct access to shard databases for the tenant service: the membership table the backends'
shard guard reads, running a new shard's migrations, and the row copying of tenant moves.

asyncpg directly (not the ORM): tables and columns are discovered from the catalog at run time,
so moves keep working as the core-entity and custom-object services add tables. Every statement
runs as the shard's app role inside a transaction scoped to the one tenant with
`set_config('app.current_tenant_id', ..., true)`, so row-level security holds here too.
Identifiers come from the catalog and are quoted; values are always bound parameters.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg

from services.tenant.domain.moves import TableInfo, copy_order
from shared.db import TENANT_SETTING, asyncpg_dsn, role_of
from shared.migrations import upgrade

SHARD_MIGRATIONS = Path(__file__).resolve().parent.parent / "shard_migrations"
SERVICES = Path(__file__).resolve().parent.parent.parent
DATA_SCHEMAS = ("core", "custom")
# COPY hands rows over in pieces as they arrive; a few buffered between the shards keep both
# busy without holding the table in memory.
_CHUNKS_IN_FLIGHT = 8
# Row digests and keys are read through a cursor, so a large tenant's rows are never all
# held as records at once on top of the map built from them.
_CURSOR_PREFETCH = 5_000


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def qualified(table: TableInfo) -> str:
    return f"{quote(table.schema)}.{quote(table.name)}"


async def migrate_shard(owner_dsn: str, app_dsn: str, include_services: bool) -> None:
    """The membership schema, and for a new shard the core-entity and custom-object schemas."""
    role = role_of(app_dsn)
    if include_services:
        for service, schema in (("core_entity", "core"), ("custom_object", "custom")):
            await upgrade(SERVICES / service / "migrations", owner_dsn, schema, role)
    await upgrade(SHARD_MIGRATIONS, owner_dsn, "shard", role)


@asynccontextmanager
async def tenant_transaction(
    dsn: str, tenant_id: str, *, isolation: str = "read_committed", readonly: bool = False
) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(asyncpg_dsn(dsn))
    try:
        async with conn.transaction(isolation=isolation, readonly=readonly):
            await conn.execute("SELECT set_config($1, $2, true)", TENANT_SETTING, tenant_id)
            # Row digests render timestamps in the session's time zone: pin it, so two shards
            # with different server defaults still agree on equal rows.
            await conn.execute("SET LOCAL TimeZone = 'UTC'")
            yield conn
    finally:
        await conn.close()


async def set_membership(
    dsn: str, tenant_id: str, epoch: int, state: str, *, lock_timeout_ms: int = 10_000
) -> None:
    """Upserts the tenant's membership row. Setting 'blocked' waits (up to the lock timeout) for
    the tenant's writes in flight, which hold a share lock on the row until they commit."""
    async with tenant_transaction(dsn, tenant_id) as conn:
        await conn.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}")
        await conn.execute(
            """INSERT INTO shard.tenants (tenant_id, epoch, state, updated_at)
               VALUES ($1::uuid, $2, $3, now())
               ON CONFLICT (tenant_id) DO UPDATE
               SET epoch = EXCLUDED.epoch, state = EXCLUDED.state, updated_at = now()""",
            tenant_id,
            epoch,
            state,
        )


async def delete_membership(dsn: str, tenant_id: str) -> None:
    async with tenant_transaction(dsn, tenant_id) as conn:
        await conn.execute("DELETE FROM shard.tenants WHERE tenant_id = $1::uuid", tenant_id)


async def membership(dsn: str, tenant_id: str) -> tuple[int, str] | None:
    async with tenant_transaction(dsn, tenant_id, readonly=True) as conn:
        row = await conn.fetchrow(
            "SELECT epoch, state FROM shard.tenants WHERE tenant_id = $1::uuid", tenant_id
        )
    return (int(row["epoch"]), str(row["state"])) if row is not None else None


async def tenant_tables(conn: asyncpg.Connection) -> list[TableInfo]:
    """Every table of the data schemas that has a tenant_id column, parents first."""
    rows = await conn.fetch(
        """SELECT n.nspname AS schema, c.relname AS name, c.oid,
                  array_agg(a.attname::text ORDER BY a.attnum) AS columns
           FROM pg_class c
           JOIN pg_namespace n ON n.oid = c.relnamespace
           JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                AND a.attgenerated = ''
           WHERE n.nspname = ANY($1::text[]) AND c.relkind IN ('r', 'p') AND NOT c.relispartition
           GROUP BY n.nspname, c.relname, c.oid
           HAVING bool_or(a.attname = 'tenant_id')""",
        list(DATA_SCHEMAS),
    )
    tables = []
    for row in rows:
        pk = await conn.fetchval(
            """SELECT array_agg(a.attname::text ORDER BY k.ord)
               FROM pg_constraint con
               CROSS JOIN LATERAL unnest(con.conkey) WITH ORDINALITY AS k(attnum, ord)
               JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum
               WHERE con.conrelid = $1 AND con.contype = 'p'""",
            row["oid"],
        )
        deps = await conn.fetch(
            """SELECT rn.nspname || '.' || r.relname AS target
               FROM pg_constraint con JOIN pg_class r ON r.oid = con.confrelid
               JOIN pg_namespace rn ON rn.oid = r.relnamespace
               WHERE con.conrelid = $1 AND con.contype = 'f'""",
            row["oid"],
        )
        tables.append(
            TableInfo(
                schema=row["schema"],
                name=row["name"],
                columns=tuple(row["columns"]),
                primary_key=tuple(pk or ()),
                depends_on=frozenset(d["target"] for d in deps),
            )
        )
    return copy_order(tables)


def _row_json(table: TableInfo) -> str:
    cols = ", ".join(quote(c) for c in table.columns)
    return f"(SELECT to_jsonb(r) FROM (SELECT {cols}) r)"


def _row_text(table: TableInfo) -> str:
    """The row as text, for digests: a row constructor renders fast and the same on every
    server with the same column types (time zone pinned to UTC per transaction)."""
    return "ROW(" + ", ".join(f"t.{quote(c)}" for c in table.columns) + ")::text"


def _key_expr(table: TableInfo, alias: str = "") -> str:
    prefix = f"{alias}." if alias else ""
    return "concat_ws('|', " + ", ".join(f"{prefix}{quote(c)}::text" for c in table.primary_key) + ")"


async def digests(
    conn: asyncpg.Connection,
    table: TableInfo,
    tenant_id: str,
    *,
    keys: list[str] | None = None,
    written_since: int | None = None,
) -> dict[str, str]:
    """Primary key -> md5 of the row, for the tenant's rows of one table: all of them, those
    with the given keys, or those written since a horizon (see `horizon`)."""
    where, args = "tenant_id = $1::uuid", list[Any]([tenant_id])
    if keys is not None:
        where += f" AND {_key_expr(table, 't')} = ANY($2::text[])"
        args.append(keys)
    if written_since is not None:
        # xmin is the 32-bit id of the transaction that wrote the row version; compared modulo
        # 2^32 like PostgreSQL does, so it holds across xid wraparound. Ids below 3 are the
        # special frozen and bootstrap ids: written long ago.
        where += (
            " AND t.xmin::text::bigint >= 3"
            f" AND ((t.xmin::text::bigint - ${len(args) + 1}::bigint) & 4294967295) < 2147483648"
        )
        args.append(written_since & 0xFFFFFFFF)
    query = (
        f"SELECT {_key_expr(table, 't')} AS k, md5({_row_text(table)}) AS d "
        f"FROM {qualified(table)} t WHERE {where}"
    )
    return {r["k"]: r["d"] async for r in conn.cursor(query, *args, prefetch=_CURSOR_PREFETCH)}


async def horizon(conn: asyncpg.Connection) -> int:
    """The oldest transaction id still running when this REPEATABLE READ transaction's snapshot
    was taken. Every row version the snapshot cannot see was written by that transaction or a
    later one, and so was every row version written after it (a subtransaction's id is always
    above its parent's), so `digests(written_since=...)` with it finds every change since the
    snapshot. Transactions that committed while it ran are found too, and copied again
    unchanged: harmless."""
    return int(await conn.fetchval("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint"))


async def keys(conn: asyncpg.Connection, table: TableInfo, tenant_id: str) -> set[str]:
    query = f"SELECT {_key_expr(table, 't')} AS k FROM {qualified(table)} t WHERE tenant_id = $1::uuid"
    return {r["k"] async for r in conn.cursor(query, tenant_id, prefetch=_CURSOR_PREFETCH)}


async def row_count(conn: asyncpg.Connection, table: TableInfo, tenant_id: str) -> int:
    return int(
        await conn.fetchval(f"SELECT count(*) FROM {qualified(table)} WHERE tenant_id = $1::uuid", tenant_id)
    )


async def checksum(conn: asyncpg.Connection, table: TableInfo, tenant_id: str) -> tuple[int, str]:
    """Row count and an order-independent checksum of the tenant's rows of one table."""
    row = await conn.fetchrow(
        f"SELECT count(*) AS n, coalesce(md5(string_agg(d, '' ORDER BY d COLLATE \"C\")), '') AS sum "
        f"FROM (SELECT md5({_row_text(table)}) AS d FROM {qualified(table)} t "
        f"WHERE tenant_id = $1::uuid) x",
        tenant_id,
    )
    assert row is not None
    return int(row["n"]), str(row["sum"])


async def fetch_rows_json(
    conn: asyncpg.Connection, table: TableInfo, tenant_id: str, keys: list[str] | None = None
) -> tuple[str, int]:
    """The tenant's rows (or those with the given keys) as one JSON array, and their count."""
    where = "tenant_id = $1::uuid" + (
        f" AND {_key_expr(table, 't')} = ANY($2::text[])" if keys is not None else ""
    )
    args: list[Any] = [tenant_id] if keys is None else [tenant_id, keys]
    row = await conn.fetchrow(
        f"SELECT coalesce(jsonb_agg({_row_json(table)}), '[]'::jsonb)::text AS rows, count(*) AS n "
        f"FROM {qualified(table)} t WHERE {where}",
        *args,
    )
    assert row is not None
    return str(row["rows"]), int(row["n"])


async def stream_rows(
    source: asyncpg.Connection, target: asyncpg.Connection, table: TableInfo, tenant_id: str
) -> int:
    """Copies all the tenant's rows of one table from source to target with binary COPY, a few
    chunks in flight at a time, so the move's memory does not grow with the tenant.

    PostgreSQL refuses COPY FROM into a table with row-level security, so the rows land in a
    temporary table first and one INSERT ... SELECT moves them: the tenant policy still checks
    every row, and foreign keys within the table (an account tree) are checked once, at the end
    of that statement."""
    cols = ", ".join(quote(c) for c in table.columns)
    staging_name = f"move_{table.schema}_{table.name}"
    staging = quote(staging_name)
    await target.execute(
        f"CREATE TEMPORARY TABLE {staging} ON COMMIT DROP "
        f"AS SELECT {cols} FROM {qualified(table)} WITH NO DATA"
    )
    chunks: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=_CHUNKS_IN_FLIGHT)

    async def read() -> None:
        await source.copy_from_query(
            f"SELECT {cols} FROM {qualified(table)} WHERE tenant_id = $1::uuid",
            tenant_id,
            output=chunks.put,
            format="binary",
        )
        await chunks.put(None)

    async def received() -> AsyncIterator[bytes]:
        while (chunk := await chunks.get()) is not None:
            yield chunk

    # If either side fails, the group cancels the other and the move rolls back.
    async with asyncio.TaskGroup() as group:
        group.create_task(read())
        group.create_task(target.copy_to_table(staging_name, source=received(), format="binary"))
    status = await target.execute(f"INSERT INTO {qualified(table)} ({cols}) SELECT {cols} FROM {staging}")
    await target.execute(f"DROP TABLE {staging}")
    return int(status.split()[-1])


async def insert_rows_json(conn: asyncpg.Connection, table: TableInfo, rows_json: str, upsert: bool) -> None:
    """Inserts a JSON array of rows in one statement, so foreign keys within the batch (a parent
    account and its children) are checked once, at the end of the statement."""
    cols = ", ".join(quote(c) for c in table.columns)
    sql = (
        f"INSERT INTO {qualified(table)} ({cols}) "
        f"SELECT {cols} FROM jsonb_populate_recordset(NULL::{qualified(table)}, $1::jsonb)"
    )
    if upsert and table.primary_key:
        updates = [c for c in table.columns if c not in table.primary_key]
        conflict = ", ".join(quote(c) for c in table.primary_key)
        sql += f" ON CONFLICT ({conflict}) DO " + (
            "UPDATE SET " + ", ".join(f"{quote(c)} = EXCLUDED.{quote(c)}" for c in updates)
            if updates
            else "NOTHING"
        )
    await conn.execute(sql, rows_json)


async def delete_rows(
    conn: asyncpg.Connection, table: TableInfo, tenant_id: str, keys: list[str] | None
) -> int:
    where = "tenant_id = $1::uuid" + (
        f" AND {_key_expr(table)} = ANY($2::text[])" if keys is not None else ""
    )
    args: list[Any] = [tenant_id] if keys is None else [tenant_id, keys]
    status = await conn.execute(f"DELETE FROM {qualified(table)} WHERE {where}", *args)
    return int(status.split()[-1])


async def purge_tenant(dsn: str, tenant_id: str) -> int:
    """Deletes every row of the tenant from the shard's data schemas, children first."""
    async with tenant_transaction(dsn, tenant_id) as conn:
        tables = await tenant_tables(conn)
        deleted = 0
        for table in reversed(tables):
            deleted += await delete_rows(conn, table, tenant_id, None)
    return deleted


def as_json(value: Any) -> str:
    return json.dumps(value)
