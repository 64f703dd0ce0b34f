# ruff: noqa: F811  (fixtures are imported from test_core_support, then used as arguments)
"""Custom field indexes on core tables, on a real PostgreSQL: the service builds them in the
background when it first loads a tenant's definitions, lists sort (and, with LEAKPROOF readers,
filter) through them under row-level security, activities get theirs on the tenant's partition,
and a failed build leaves nothing behind that a later build does not clean up."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from sqlalchemy import select
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg

from crm.v1 import common_pb2
from crm.v1 import core_entity_pb2 as pb
from services.core_entity.adapters import tables
from services.core_entity.adapters.indexes import (
    READER_FUNCTIONS,
    IndexBuilder,
    IndexBuildFailed,
    IndexedFieldDefinition,
    specs_for,
)
from services.core_entity.domain.model import CONTACT
from services.core_entity.service_layer.listing import field_set
from shared.db import asyncpg_dsn
from tests.backends import Backends
from tests.integration.test_core_support import (  # noqa: F401
    CoreService,
    Tenant,
    channel,
    core_service,
    tenant,
)

pytestmark = pytest.mark.integration
DIALECT = PGDialect_asyncpg()  # type: ignore[no-untyped-call]


def indexed(name: str, field_type: str, **extra: object) -> IndexedFieldDefinition:
    values: dict[str, object] = {"field_id": str(uuid.uuid4()), "is_indexed": True}
    values.update(extra)
    return IndexedFieldDefinition(name, field_type, **values)  # type: ignore[arg-type]


def index_of(definition: IndexedFieldDefinition) -> str:
    return f"ix_cf_{uuid.UUID(definition.field_id).hex}"


@pytest.fixture
async def owner(core_service: CoreService) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(asyncpg_dsn(core_service.owner_dsn))
    yield conn
    await conn.close()


@pytest.fixture
async def superuser(backends: Backends, core_service: CoreService) -> AsyncIterator[asyncpg.Connection]:
    parts = urlsplit(asyncpg_dsn(backends.database_url))
    database = urlsplit(core_service.owner_dsn).path
    conn = await asyncpg.connect(urlunsplit((parts.scheme, parts.netloc, database, parts.query, "")))
    yield conn
    await conn.close()


async def valid_index(conn: asyncpg.Connection, name: str, seconds: float = 60.0) -> asyncpg.Record:
    """Waits for the background build: the index's table and definition once it is valid."""
    for _ in range(int(seconds * 10)):
        found = await conn.fetchrow(
            "SELECT p.tablename, p.indexdef FROM pg_indexes p JOIN pg_index i "
            "ON i.indexrelid = to_regclass(p.schemaname || '.' || p.indexname) "
            "WHERE p.schemaname = 'core' AND p.indexname = $1 AND i.indisvalid",
            name,
        )
        if found is not None:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name} was not built")


def list_sql(tenant: Tenant, filter_text: str = "", order_by: str = "") -> str:
    """ListContacts' statement for one page, built by the service's own listing code."""
    table = tables.contacts
    fields = field_set(CONTACT, {"region": "text", "seats": "number"})
    order = fields.order_by(order_by, default=[("create_time", False)])
    stmt = (
        select(table.c.id)
        .where(
            table.c.tenant_id == uuid.UUID(tenant.id),
            fields.filter(filter_text),
            table.c.deleted_at.is_(None),
        )
        .order_by(*fields.order_clauses(order))
        .limit(51)
    )
    return str(stmt.compile(dialect=DIALECT, compile_kwargs={"literal_binds": True}))


async def explain(core_service: CoreService, tenant: Tenant, sql: str) -> str:
    """The plan as the service's app role gets it: row-level security applies."""
    conn = await asyncpg.connect(asyncpg_dsn(core_service.app_dsn))
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.current_tenant_id', $1, true)", tenant.id)
            rows = await conn.fetch("EXPLAIN " + sql)
    finally:
        await conn.close()
    return "\n".join(r[0] for r in rows)


async def test_an_indexed_field_gets_an_index_that_lists_use(
    core_service: CoreService,
    tenant: Tenant,
    owner: asyncpg.Connection,
    superuser: asyncpg.Connection,
) -> None:
    region = indexed("region", "text")
    seats = indexed("seats", "number", is_indexed=False, unique=True)  # unique fields get one too
    core_service.definitions.fields[(tenant.id, "contact")] = [region, seats]
    # The first call that loads the tenant's contact definitions starts the builds; it does not
    # wait for them.
    await tenant.contact(
        custom_fields={
            "region": common_pb2.FieldValue(string_value="r0000"),
            "seats": common_pb2.FieldValue(int_value=0),
        }
    )
    found = await valid_index(owner, index_of(region))
    assert found["tablename"] == "contacts"
    assert found["indexdef"] == (
        f"CREATE INDEX {index_of(region)} ON core.contacts USING btree "
        f"(tenant_id, core.field_text(custom_fields, 'region'::text)) WHERE (tenant_id = '{tenant.id}'::uuid)"
    )
    found = await valid_index(owner, index_of(seats))
    assert "core.field_bigint(custom_fields, 'seats'::text)" in found["indexdef"]
    # The index is partial, so PostgreSQL takes no statistics from it: the builder adds
    # extended statistics on the expression, which the planner's row estimates need.
    for _ in range(100):
        expressions = await owner.fetchval(
            "SELECT string_agg(pg_get_statisticsobjdef_expressions(oid)::text, ' ') "
            "FROM pg_statistic_ext WHERE stxrelid = 'core.contacts'::regclass"
        )
        if expressions and "'seats'" in expressions and "'region'" in expressions:
            break
        await asyncio.sleep(0.1)
    assert "core.field_text(custom_fields, 'region'::text)" in expressions, expressions

    async with owner.transaction():
        await owner.execute("SELECT set_config('app.current_tenant_id', $1, true)", tenant.id)
        await owner.execute(
            "INSERT INTO core.contacts "
            "(tenant_id, first_name, last_name, custom_fields, created_by, updated_by) "
            "SELECT $1::uuid, 'Ada', 'L' || i, jsonb_build_object('region', 'r' || lpad(i::text, 4, '0'), "
            "'seats', i), $2::uuid, $2::uuid FROM generate_series(1, 3000) AS i",
            tenant.id,
            uuid.UUID(tenant.user_id),
        )
    await owner.execute("ANALYZE core.contacts")

    # Sorting (ORDER BY ... LIMIT, how pages are read) walks the index under row-level security.
    sorted_plan = await explain(core_service, tenant, list_sql(tenant, order_by="custom_fields.region"))
    assert index_of(region) in sorted_plan, sorted_plan
    sorted_plan = await explain(core_service, tenant, list_sql(tenant, order_by="custom_fields.seats desc"))
    assert index_of(seats) in sorted_plan, sorted_plan

    # Filters reach the index as an index condition once a superuser marked the readers
    # LEAKPROOF (row-level security otherwise evaluates the tenant policy first).
    for function in READER_FUNCTIONS:
        await superuser.execute(f"ALTER FUNCTION core.{function}(jsonb, text) LEAKPROOF")
    filtered = await explain(core_service, tenant, list_sql(tenant, 'custom_fields.region = "r0042"'))
    assert index_of(region) in filtered and "Index Cond" in filtered, filtered
    assert "core.field_text(custom_fields, 'region'::text) = 'r0042'" in filtered, filtered

    # The service's own lists give the same answers through the index.
    page = await tenant.call(
        tenant.contacts,
        "ListContacts",
        pb.ListContactsRequest(filter='custom_fields.region = "r0042" OR custom_fields.seats >= 2999'),
    )
    assert sorted(c.last_name for c in page.contacts) == ["L2999", "L3000", "L42"]
    page = await tenant.call(
        tenant.contacts,
        "ListContacts",
        pb.ListContactsRequest(order_by="custom_fields.region desc", page_size=2),
    )
    assert [c.custom_fields["region"].string_value for c in page.contacts] == ["r3000", "r2999"]


async def test_activities_get_the_index_on_the_tenants_partition(
    core_service: CoreService, tenant: Tenant, owner: asyncpg.Connection
) -> None:
    outcome = indexed("outcome", "picklist", options=())
    core_service.definitions.fields[(tenant.id, "activity")] = [outcome]
    account = await tenant.account()
    await tenant.call(
        tenant.activities,
        "ListActivities",
        pb.ListActivitiesRequest(filter=f'account_id = "{account.id}"'),
    )
    found = await valid_index(owner, index_of(outcome))
    async with owner.transaction():
        await owner.execute("SELECT set_config('app.current_tenant_id', $1, true)", tenant.id)
        await owner.execute(
            "INSERT INTO core.activities (tenant_id, account_id, activity_type, subject, assigned_to, "
            "created_by, updated_by) VALUES ($1::uuid, $2::uuid, 'task', 'x', $3::uuid, $3::uuid, $3::uuid)",
            tenant.id,
            uuid.UUID(account.id),
            uuid.UUID(tenant.user_id),
        )
        partition = await owner.fetchval(
            "SELECT tableoid::regclass::text FROM core.activities WHERE tenant_id = $1::uuid LIMIT 1",
            tenant.id,
        )
    assert partition == f"core.{found['tablename']}" and found["tablename"].startswith("activities_p")
    assert "core.field_text(custom_fields, 'outcome'::text)" in found["indexdef"]


async def test_a_failed_build_leaves_no_invalid_index(
    core_service: CoreService, owner: asyncpg.Connection
) -> None:
    tenant_id = str(uuid.uuid4())
    (spec,) = specs_for(tenant_id, "lead", [indexed("source", "text")])
    # A writer that stays open keeps CREATE INDEX CONCURRENTLY waiting past its timeout, after
    # it has already entered the (still invalid) index in the catalog.
    writer = await asyncpg.connect(asyncpg_dsn(core_service.owner_dsn))
    try:
        transaction = writer.transaction()
        await transaction.start()
        await writer.execute("LOCK TABLE core.leads IN ROW EXCLUSIVE MODE")
        with pytest.raises(IndexBuildFailed):
            await IndexBuilder(core_service.owner_dsn, statement_timeout_seconds=1).build(spec)
        await transaction.rollback()
    finally:
        await writer.close()
    # Whatever the failure left (the drop may time out behind the same writer) is invalid, and
    # the next build removes it and builds the index.
    valid = await owner.fetchval(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)", f"core.{spec.name}"
    )
    assert valid is not True
    builder = IndexBuilder(core_service.owner_dsn)
    assert await builder.missing([spec]) == [spec]
    assert await builder.build(spec) is True
    assert await builder.missing([spec]) == []
    await owner.execute(f"DROP INDEX core.{spec.name}")
