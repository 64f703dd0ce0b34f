"""Creates the suite's databases and its two roles on a PostgreSQL server the caller administers
(the embedded one, or an existing server given by CRM_DATABASE_URL).

The owner role owns every schema and table and runs migrations; the app role, which services
connect as, owns nothing, so forced row-level security applies to it.
"""

from __future__ import annotations

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
