"""Creates the suite's databases and its two roles on a PostgreSQL server the caller administers
(the embedded one, or an existing server given by CRM_DATABASE_URL).

The owner role owns every schema and table and runs migrations; the app role, which services
connect as, owns nothing, so forced row-level security applies to it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from shared.db import asyncpg_dsn, identifier


@dataclass(frozen=True, slots=True)
class Roles:
    owner: str
    owner_password: str
    app: str
    app_password: str


def dsn_for(admin_dsn: str, database: str, user: str, password: str) -> str:
    parts = urlsplit(asyncpg_dsn(admin_dsn))
    host = parts.hostname or "127.0.0.1"
    netloc = f"{quote(user)}:{quote(password)}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(("postgresql", netloc, f"/{database}", parts.query, ""))


async def ensure_roles(admin_dsn: str, roles: Roles) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(admin_dsn))
    try:
        for name, password in ((roles.owner, roles.owner_password), (roles.app, roles.app_password)):
            exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", name)
            verb = "ALTER" if exists else "CREATE"
            # Passwords cannot be bound parameters in DDL; quote_literal keeps them a literal.
            literal = await conn.fetchval("SELECT quote_literal($1)", password)
            await conn.execute(
                f"{verb} ROLE {identifier(name)} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEROLE "
                f"PASSWORD {literal}"
            )
    finally:
        await conn.close()


async def ensure_database(admin_dsn: str, database: str, roles: Roles) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(admin_dsn))
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database):
            await conn.execute(f"CREATE DATABASE {identifier(database)} OWNER {identifier(roles.owner)}")
        await conn.execute(
            f"GRANT CONNECT, TEMPORARY ON DATABASE {identifier(database)} TO {identifier(roles.app)}"
        )
    finally:
        await conn.close()


async def drop_database(admin_dsn: str, database: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(admin_dsn))
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {identifier(database)} WITH (FORCE)")
    finally:
        await conn.close()


async def trust_field_readers(admin_dsn: str, database: str, functions: Iterable[str]) -> list[str]:
    """Marks the services' typed custom-field readers (`schema.name(jsonb, text)`) LEAKPROOF in
    one database, so row-level security lets filters on custom fields use their expression
    indexes. Only a superuser may do it; it is safe because the readers never raise and return
    nothing but their result. Returns the functions marked (those not created yet are skipped)."""
    conn = await asyncpg.connect(asyncpg_dsn(dsn_for_database(admin_dsn, database)))
    marked = []
    try:
        for function in functions:
            schema, _, name = function.partition(".")
            signature = f"{identifier(schema)}.{identifier(name)}(jsonb, text)"
            if await conn.fetchval("SELECT to_regprocedure($1) IS NOT NULL", signature):
                await conn.execute(f"ALTER FUNCTION {signature} LEAKPROOF")
                marked.append(function)
    finally:
        await conn.close()
    return marked


def dsn_for_database(dsn: str, database: str) -> str:
    """The same server and credentials, another database."""
    parts = urlsplit(asyncpg_dsn(dsn))
    return urlunsplit((parts.scheme, parts.netloc, f"/{identifier(database)}", parts.query, ""))
