"""`shared.db.fetch_rows` runs SQLAlchemy Core statements on the asyncpg driver: every shape it
caches must give exactly what SQLAlchemy's own execution gives, whatever the bound values, list
lengths or JSON parameters of the call that reuses the cached shape."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, Text, Uuid, func, literal_column, select, text
from sqlalchemy.dialects.postgresql import JSONB

from shared.db import create_engine, fetch_rows, session_factory
from tests.backends import Backends

pytestmark = pytest.mark.integration

things = Table(
    "driver_things",
    MetaData(),
    Column("id", Uuid, primary_key=True),
    Column("name", Text),
    Column("rank", Integer),
    Column("data", JSONB),
)

IDS = [uuid.uuid4() for _ in range(5)]


def statements() -> list[Any]:
    c = things.c
    return [
        select(things).where(c.name == "b").order_by(c.id),
        select(things).where(c.name == "d").order_by(c.id),  # same shape, other value
        select(things).where(c.id.in_(IDS[:1])).order_by(c.rank),
        select(things).where(c.id.in_(IDS[1:4])).order_by(c.rank),  # same shape, longer list
        select(things).where(c.id.in_([])).order_by(c.rank),  # empty IN
        select(things).where(c.data.contains({"tag": "x"})).order_by(c.rank),  # a JSONB parameter
        select(things.c.name).where(c.data["tag"].astext == "y").order_by(c.name),
        select(func.count().label("total")).select_from(things).where(c.rank > 1),
        select(things).where(literal_column("rank") >= 2).order_by(c.rank.desc()).limit(2),
        select(things).where(c.name.like("%'; DROP TABLE driver_things; --%")),
    ]


async def test_fetch_rows_matches_sqlalchemy_execution(backends: Backends) -> None:
    engine = create_engine(backends.database_url)
    try:
        async with session_factory(engine)() as session, session.begin():
            await session.execute(
                text("CREATE TEMP TABLE driver_things (id uuid, name text, rank int, data jsonb)")
            )
            await session.execute(
                things.insert(),
                [
                    {"id": IDS[i], "name": "abcde"[i], "rank": i, "data": {"tag": "xy"[i % 2]}}
                    for i in range(5)
                ],
            )
            for statement in statements():
                expected = [dict(row) for row in (await session.execute(statement)).mappings()]
                assert await fetch_rows(session, statement) == expected, str(statement)
            # Run again: now every shape comes from the cache.
            for statement in statements():
                expected = [dict(row) for row in (await session.execute(statement)).mappings()]
                assert await fetch_rows(session, statement) == expected, str(statement)
            assert await session.scalar(text("SELECT count(*) FROM driver_things")) == 5
    finally:
        await engine.dispose()
