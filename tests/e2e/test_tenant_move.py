"""Moving a tenant between shards online, the hard way: about 20,000 rows across every core
entity and custom-object table, one writer creating and updating the moving tenant's records the
whole time and another writing for a second tenant on the same source shard.

The writers stand in for the shard backends: each write is one transaction that runs the
backend protocol of shared.shard_guard (tenant context, membership check with the routed epoch,
business row and its outbox event) and, when refused with UNAVAILABLE, refreshes the tenant's
route from the directory and retries, as the gateway does."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from cli.stack import Stack
from crm.v1 import tenant_pb2, tenant_pb2_grpc
from shared.db import UnitOfWork, asyncpg_dsn, create_engine, session_factory
from shared.errors import Unavailable
from shared.outbox import record_change
from shared.provisioning import ensure_database
from shared.shard_guard import check_membership
from tests.conftest import bearer, create_tenant

pytestmark = pytest.mark.e2e


def stub(channel: grpc.aio.Channel) -> tenant_pb2_grpc.TenantServiceStub:
    return tenant_pb2_grpc.TenantServiceStub(channel)


@dataclass
class Shards:
    """Shard name -> (id, app DSN, owner DSN) for the suite's shards and the test's own."""

    by_name: dict[str, tuple[str, str, str]] = field(default_factory=dict)

    def dsn(self, shard_id: str) -> str:
        return next(dsn for sid, dsn, _ in self.by_name.values() if sid == shard_id)

    def owner_dsn(self, shard_id: str) -> str:
        return next(owner for sid, _, owner in self.by_name.values() if sid == shard_id)

    def id(self, name: str) -> str:
        return self.by_name[name][0]


async def register_shards(suite: Stack, gateway: grpc.aio.Channel, names: list[str]) -> Shards:
    """Gives the suite's shards their connection settings and registers new, inactive shards
    (no automatic placement) on fresh databases; CreateShard runs their migrations."""
    admin = bearer(suite.platform_admin_key)
    shards = Shards()
    listed = await stub(gateway).ListShards(tenant_pb2.ListShardsRequest(), metadata=admin)
    for shard in listed.shards:
        if shard.name in ("shard-0", "shard-1"):
            urls = suite.db_urls(suite.database(shard.name.replace("-", "_")))
            if not shard.has_database_url:
                await stub(gateway).UpdateShard(
                    tenant_pb2.UpdateShardRequest(
                        shard=tenant_pb2.Shard(
                            id=shard.id,
                            database_url=urls["CRM_DB_URL"],
                            owner_database_url=urls["CRM_DB_OWNER_URL"],
                        ),
                        update_mask=field_mask_pb2.FieldMask(paths=["database_url", "owner_database_url"]),
                    ),
                    metadata=admin,
                    timeout=60,
                )
            shards.by_name[shard.name] = (shard.id, urls["CRM_DB_URL"], urls["CRM_DB_OWNER_URL"])
    for name in names:
        database = f"{suite.prefix}_{name.replace('-', '_')}"
        await ensure_database(suite.admin_dsn, database, suite.roles)
        urls = suite.db_urls(database)
        created = await stub(gateway).CreateShard(
            tenant_pb2.CreateShardRequest(
                shard=tenant_pb2.Shard(
                    name=name,
                    core_entity_address="127.0.0.1:9",
                    custom_object_address="127.0.0.1:9",
                    database_url=urls["CRM_DB_URL"],
                    owner_database_url=urls["CRM_DB_OWNER_URL"],
                    max_tenants=10,
                    active=False,
                )
            ),
            metadata=admin,
            timeout=120,
        )
        assert created.has_database_url and not created.active and created.tenant_count == 0
        shards.by_name[name] = (created.id, urls["CRM_DB_URL"], urls["CRM_DB_OWNER_URL"])
    return shards


async def move(
    gateway: grpc.aio.Channel, suite: Stack, tenant_id: str, target: str, timeout: float = 120
) -> Any:
    admin = bearer(suite.platform_admin_key)
    started = await stub(gateway).MoveTenant(
        tenant_pb2.MoveTenantRequest(tenant_id=tenant_id, target_shard_id=target), metadata=admin
    )
    deadline = time.monotonic() + timeout
    while True:
        state = await stub(gateway).GetTenantMove(
            tenant_pb2.GetTenantMoveRequest(id=started.id), metadata=admin
        )
        if state.phase in (tenant_pb2.TENANT_MOVE_PHASE_COMPLETED, tenant_pb2.TENANT_MOVE_PHASE_FAILED):
            return state
        assert time.monotonic() < deadline, f"the move is stuck in phase {state.phase}"
        await asyncio.sleep(0.05)


SEED_SQL = [
    # 4,000 accounts, every fourth one a child of the account before it.
    """INSERT INTO core.accounts (id, tenant_id, name, industry, annual_revenue, created_by, updated_by,
           custom_fields)
       SELECT md5($1::text || ':a' || g)::uuid, $1::uuid, 'Account ' || g,
              'Software', g * 10.5, $2::uuid, $2::uuid, jsonb_build_object('tier', g % 3)
       FROM generate_series(1, 4000) g""",
    """UPDATE core.accounts SET parent_account_id = md5($1::text || ':a' || (g - 1))::uuid
       FROM generate_series(2, 4000, 4) g
       WHERE id = md5($1::text || ':a' || g)::uuid""",
    """INSERT INTO core.contacts (tenant_id, account_id, first_name, last_name, email, created_by, updated_by)
       SELECT $1::uuid, md5($1::text || ':a' || (1 + g % 4000))::uuid,
              'First' || g, 'Last' || g, 'c' || g || '@example.com', $2::uuid, $2::uuid
       FROM generate_series(1, 5000) g""",
    """INSERT INTO core.leads (tenant_id, first_name, last_name, company, lead_score,
           created_by, updated_by)
       SELECT $1::uuid, 'Lead' || g, 'Person', 'Co ' || g, g % 100, $2::uuid, $2::uuid
       FROM generate_series(1, 3000) g""",
    """INSERT INTO core.pipelines (id, tenant_id, name, created_by, updated_by)
       VALUES (md5($1::text || ':pipeline')::uuid, $1::uuid, 'Seeded pipeline', $2::uuid, $2::uuid)""",
    """INSERT INTO core.pipeline_stages (id, tenant_id, pipeline_id, name, stage_order, probability,
           created_by, updated_by)
       VALUES (md5($1::text || ':stage')::uuid, $1::uuid, md5($1::text || ':pipeline')::uuid,
               'Open', 1, 10, $2::uuid, $2::uuid)""",
    """INSERT INTO core.deals (tenant_id, account_id, pipeline_id, stage_id, name, amount,
           created_by, updated_by)
       SELECT $1::uuid, md5($1::text || ':a' || (1 + g % 4000))::uuid,
              md5($1::text || ':pipeline')::uuid, md5($1::text || ':stage')::uuid,
              'Deal ' || g, g * 100.25, $2::uuid, $2::uuid
       FROM generate_series(1, 3000) g""",
    """INSERT INTO core.activities (tenant_id, account_id, activity_type, subject, created_by, updated_by,
           assigned_to)
       SELECT $1::uuid, md5($1::text || ':a' || (1 + g % 4000))::uuid, 'call',
              'Call ' || g, $2::uuid, $2::uuid, $2::uuid
       FROM generate_series(1, 2500) g""",
    """INSERT INTO custom.custom_objects (id, tenant_id, name, label, plural_label, api_name)
       VALUES (md5($1::text || ':object')::uuid, $1::uuid, 'project', 'Project',
               'Projects', 'project__c')""",
    """INSERT INTO custom.custom_fields (id, tenant_id, object_type, custom_object_id, field_name,
           field_label, field_type, data_type)
       VALUES (md5($1::text || ':field')::uuid, $1::uuid, 'project__c', md5($1::text || ':object')::uuid,
               'budget', 'Budget', 'currency', 'decimal')""",
    """INSERT INTO custom.custom_object_records (tenant_id, custom_object_id, record_data, created_by)
       SELECT $1::uuid, md5($1::text || ':object')::uuid,
              jsonb_build_object('name', 'Project ' || g, 'budget', (g * 3.5)::text), $2::uuid
       FROM generate_series(1, 2500) g""",
]


async def seed(dsn: str, tenant_id: str, user_id: str) -> int:
    conn = await asyncpg.connect(asyncpg_dsn(dsn))
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.current_tenant_id', $1, true)", tenant_id)
            for statement in SEED_SQL:
                await conn.execute(statement, *([tenant_id, user_id] if "$2" in statement else [tenant_id]))
        return await tenant_row_count(conn, tenant_id)
    finally:
        await conn.close()


async def tenant_row_count(conn: asyncpg.Connection, tenant_id: str) -> int:
    tables = await conn.fetch(
        """SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'tenant_id'
           WHERE n.nspname IN ('core', 'custom') AND c.relkind IN ('r', 'p') AND NOT c.relispartition"""
    )
    total = 0
    async with conn.transaction():
        await conn.execute("SELECT set_config('app.current_tenant_id', $1, true)", tenant_id)
        for row in tables:
            total += await conn.fetchval(
                f'SELECT count(*) FROM "{row["nspname"]}"."{row["relname"]}" WHERE tenant_id = $1',
                uuid.UUID(tenant_id),
            )
    return total


async def count_on(dsn: str, tenant_id: str) -> int:
    conn = await asyncpg.connect(asyncpg_dsn(dsn))
    try:
        return await tenant_row_count(conn, tenant_id)
    finally:
        await conn.close()


class Writer:
    """Creates an account, renames an earlier one and every third time deletes another, again
    and again, for one tenant, routed by the directory and refused by the shard guard exactly as
    a backend would be."""

    def __init__(self, suite: Stack, shards: Shards, tenant_id: str, user_id: str) -> None:
        self.suite = suite
        self.shards = shards
        self.tenant_id = tenant_id
        self.user_id = user_id
        self.acked: dict[str, str] = {}  # account id -> last acknowledged name
        self.deleted: set[str] = set()  # acknowledged deletions
        self.events = 0
        self.refusals = 0
        self.longest_stall = 0.0
        self._engines: dict[str, tuple[AsyncEngine, async_sessionmaker[AsyncSession]]] = {}
        self._route: tuple[str, int] | None = None

    async def route(self) -> tuple[str, int]:
        conn = await asyncpg.connect(
            asyncpg_dsn(self.suite.db_urls(self.suite.database("directory"))["CRM_DB_URL"])
        )
        try:
            row = await conn.fetchrow(
                "SELECT shard_id, epoch FROM tenant.tenant_shards WHERE tenant_id = $1",
                uuid.UUID(self.tenant_id),
            )
        finally:
            await conn.close()
        assert row is not None
        return str(row["shard_id"]), int(row["epoch"])

    def sessions(self, shard_id: str) -> async_sessionmaker[AsyncSession]:
        if shard_id not in self._engines:
            engine = create_engine(self.shards.dsn(shard_id), pool_size=2)
            self._engines[shard_id] = (engine, session_factory(engine))
        return self._engines[shard_id][1]

    async def write_once(self, step: int) -> None:
        last_ok = time.perf_counter()
        while True:
            if self._route is None:
                self._route = await self.route()
            shard_id, epoch = self._route
            try:
                await self._write(shard_id, epoch, step)
                self.longest_stall = max(self.longest_stall, time.perf_counter() - last_ok)
                return
            except Unavailable:
                self.refusals += 1
                self._route = None  # refresh the route and retry, as the gateway does
                await asyncio.sleep(0.01)

    async def _write(self, shard_id: str, epoch: int, step: int) -> None:
        account_id = str(uuid.uuid4())
        name = f"live {step}"
        async with UnitOfWork(self.sessions(shard_id), self.tenant_id) as uow:
            await check_membership(uow.session, self.tenant_id, epoch, is_write=True)
            await uow.session.execute(
                text(
                    "INSERT INTO core.accounts (id, tenant_id, name, created_by, updated_by) "
                    "VALUES (:id, :tenant, :name, :user, :user)"
                ),
                {"id": account_id, "tenant": self.tenant_id, "name": name, "user": self.user_id},
            )
            await self._event(uow.session, account_id, "INSERT", None, {"id": account_id, "name": name}, 1)
            renamed: tuple[str, str] | None = None
            if self.acked:
                earlier = secrets.choice(sorted(self.acked))
                new_name = f"renamed {step}"
                result = await uow.session.execute(
                    text("UPDATE core.accounts SET name = :name, version = version + 1 WHERE id = :id"),
                    {"name": new_name, "id": earlier},
                )
                assert result.rowcount == 1, "an acknowledged account is missing"  # type: ignore[attr-defined]
                await self._event(
                    uow.session, earlier, "UPDATE", {"name": self.acked[earlier]}, {"name": new_name}, 2
                )
                renamed = (earlier, new_name)
            deleted: str | None = None
            others = sorted(set(self.acked) - {renamed[0] if renamed else ""})
            if step % 3 == 0 and others:
                deleted = secrets.choice(others)
                result = await uow.session.execute(
                    text("DELETE FROM core.accounts WHERE id = :id"), {"id": deleted}
                )
                assert result.rowcount == 1, "an acknowledged account is missing"  # type: ignore[attr-defined]
                await self._event(uow.session, deleted, "DELETE", {"name": self.acked[deleted]}, None, 3)
            await uow.commit()
        # Acknowledged only once committed.
        self.acked[account_id] = name
        self.events += 1
        if renamed is not None:
            self.acked[renamed[0]] = renamed[1]
            self.events += 1
        if deleted is not None:
            del self.acked[deleted]
            self.deleted.add(deleted)
            self.events += 1

    async def _event(
        self,
        session: AsyncSession,
        account_id: str,
        operation: str,
        old: dict[str, str] | None,
        new: dict[str, str] | None,
        version: int,
    ) -> None:
        """The change event of one account write, in the write's transaction, as a backend adds it."""
        await record_change(
            session,
            schema="core",
            service="core_entity",
            table="accounts",
            tenant_id=self.tenant_id,
            record_id=account_id,
            operation=operation,
            old=old,
            new=new,
            version=version,
        )

    async def run(self, stop: asyncio.Event) -> None:
        step = 0
        while not stop.is_set():
            step += 1
            await self.write_once(step)
            await asyncio.sleep(0.002)

    async def close(self) -> None:
        for engine, _ in self._engines.values():
            await engine.dispose()


async def outbox_events(dsn: str, tenant_id: str) -> int:
    conn = await asyncpg.connect(asyncpg_dsn(dsn))
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM core.outbox WHERE subject LIKE $1",
                f"crm.events.{tenant_id}.core_entity.accounts.%",
            )
        )
    finally:
        await conn.close()


async def accounts_named(dsn: str, tenant_id: str) -> dict[str, str]:
    conn = await asyncpg.connect(asyncpg_dsn(dsn))
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.current_tenant_id', $1, true)", tenant_id)
            rows = await conn.fetch(
                "SELECT id::text, name FROM core.accounts WHERE tenant_id = $1", uuid.UUID(tenant_id)
            )
    finally:
        await conn.close()
    return {r["id"]: r["name"] for r in rows}


async def test_tenants_placed_before_a_shard_got_its_urls_stay_served(
    suite: Stack, gateway: grpc.aio.Channel
) -> None:
    """Setting a shard's database URLs creates its membership table, which its backends then
    enforce: every tenant already placed there is made a member in the same call."""
    from crm.v1 import core_entity_pb2, core_entity_pb2_grpc

    earlier = await create_tenant(gateway, suite.platform_admin_key)
    await register_shards(suite, gateway, [])
    pipelines = await core_entity_pb2_grpc.PipelineServiceStub(gateway).ListPipelines(
        core_entity_pb2.ListPipelinesRequest(), metadata=bearer(earlier.api_key), timeout=30
    )
    assert [p.name for p in pipelines.pipelines] == ["Sales Pipeline"]


async def test_a_tenant_moves_online_with_writers_on_both_tenants(
    suite: Stack, gateway: grpc.aio.Channel
) -> None:
    suffix = secrets.token_hex(3)
    shards = await register_shards(suite, gateway, [f"move-a-{suffix}", f"move-b-{suffix}"])
    source, target = shards.id(f"move-a-{suffix}"), shards.id(f"move-b-{suffix}")
    moving = await create_tenant(gateway, suite.platform_admin_key)
    neighbour = await create_tenant(gateway, suite.platform_admin_key)
    # Both start on the test's source shard (an empty tenant moves in a blink).
    for tenant in (moving, neighbour):
        arrived = await move(gateway, suite, tenant.tenant.id, source)
        assert arrived.phase == tenant_pb2.TENANT_MOVE_PHASE_COMPLETED, list(arrived.errors)

    seeded = await seed(shards.dsn(source), moving.tenant.id, moving.admin_user_id)
    await seed(shards.dsn(source), neighbour.tenant.id, neighbour.admin_user_id)
    assert seeded >= 20_000

    writer = Writer(suite, shards, moving.tenant.id, moving.admin_user_id)
    other = Writer(suite, shards, neighbour.tenant.id, neighbour.admin_user_id)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(writer.run(stop)), asyncio.create_task(other.run(stop))]
    try:
        await asyncio.sleep(0.5)
        result = await move(gateway, suite, moving.tenant.id, target)
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await writer.close()
        await other.close()

    assert result.phase == tenant_pb2.TENANT_MOVE_PHASE_COMPLETED, list(result.errors)
    assert result.rows_copied >= seeded
    assert result.epoch >= 3
    assert result.verified_tables and all(line.endswith(" ok") for line in result.verified_tables)
    print(
        f"\nmoved {result.rows_total} rows (+{result.rows_copied - result.rows_total} delta); "
        f"write block {result.write_block_ms} ms; moving writer: {len(writer.acked)} records, "
        f"{writer.refusals} refusals, longest stall {writer.longest_stall * 1000:.0f} ms; "
        f"neighbour writer: {len(other.acked)} records, {other.refusals} refusals"
    )

    # Every acknowledged write is on the target with its last acknowledged value...
    on_target = await accounts_named(shards.dsn(target), moving.tenant.id)
    missing = {k: v for k, v in writer.acked.items() if on_target.get(k) != v}
    assert not missing, f"{len(missing)} acknowledged writes are not on the target"
    assert len(writer.acked) > 20
    # ...no acknowledged deletion came back...
    assert writer.deleted and not writer.deleted & set(on_target)
    # ...nothing of the tenant remains on the source...
    assert await count_on(shards.dsn(source), moving.tenant.id) == 0
    assert await count_on(shards.dsn(target), moving.tenant.id) >= seeded
    # ...the neighbour was never refused and its data stayed where it was...
    assert other.refusals == 0
    neighbour_rows = await accounts_named(shards.dsn(source), neighbour.tenant.id)
    assert all(neighbour_rows.get(k) == v for k, v in other.acked.items())
    # ...and every acknowledged write has its change event in a shard's outbox (no gap).
    events = await outbox_events(shards.dsn(source), moving.tenant.id) + await outbox_events(
        shards.dsn(target), moving.tenant.id
    )
    assert events == writer.events

    listed = await stub(gateway).ListShards(
        tenant_pb2.ListShardsRequest(), metadata=bearer(suite.platform_admin_key)
    )
    counts = {s.id: s.tenant_count for s in listed.shards}
    assert counts[source] == 1 and counts[target] == 1


async def test_a_failed_move_leaves_the_tenant_whole_and_writable_on_its_source(
    suite: Stack, gateway: grpc.aio.Channel
) -> None:
    suffix = secrets.token_hex(3)
    shards = await register_shards(suite, gateway, [f"fail-a-{suffix}", f"fail-b-{suffix}"])
    source, target = shards.id(f"fail-a-{suffix}"), shards.id(f"fail-b-{suffix}")
    tenant = await create_tenant(gateway, suite.platform_admin_key)
    assert (
        await move(gateway, suite, tenant.tenant.id, source)
    ).phase == tenant_pb2.TENANT_MOVE_PHASE_COMPLETED
    seeded = await seed(shards.dsn(source), tenant.tenant.id, tenant.admin_user_id)
    # The target silently alters what it stores, so verification (after the write block) fails.
    owner = await asyncpg.connect(asyncpg_dsn(shards.owner_dsn(target)))
    try:
        await owner.execute(
            """CREATE FUNCTION core.corrupt() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN NEW.company := NEW.company || '~'; RETURN NEW; END $$"""
        )
        await owner.execute(
            "CREATE TRIGGER corrupt BEFORE INSERT ON core.leads FOR EACH ROW EXECUTE FUNCTION core.corrupt()"
        )
    finally:
        await owner.close()

    result = await move(gateway, suite, tenant.tenant.id, target)
    assert result.phase == tenant_pb2.TENANT_MOVE_PHASE_FAILED
    assert any("verification failed for core.leads" in e for e in result.errors), list(result.errors)

    # The tenant is whole on the source, still routed there, and writable again.
    assert await count_on(shards.dsn(source), tenant.tenant.id) == seeded
    assert await count_on(shards.dsn(target), tenant.tenant.id) == 0
    writer = Writer(suite, shards, tenant.tenant.id, tenant.admin_user_id)
    try:
        assert (await writer.route())[0] == source
        await writer.write_once(1)
        assert writer.refusals == 0
    finally:
        await writer.close()

    # Deleting the tenant purges its rows from its shard too.
    await stub(gateway).DeleteTenant(
        tenant_pb2.DeleteTenantRequest(id=tenant.tenant.id), metadata=bearer(suite.platform_admin_key)
    )
    assert await count_on(shards.dsn(source), tenant.tenant.id) == 0


async def test_bad_moves_are_refused(suite: Stack, gateway: grpc.aio.Channel) -> None:
    admin = bearer(suite.platform_admin_key)
    tenant = await create_tenant(gateway, suite.platform_admin_key)
    for request, code in (
        (
            tenant_pb2.MoveTenantRequest(tenant_id="nope", target_shard_id=""),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            tenant_pb2.MoveTenantRequest(tenant_id=tenant.tenant.id, target_shard_id=tenant.tenant.shard_id),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        (
            tenant_pb2.MoveTenantRequest(tenant_id=tenant.tenant.id, target_shard_id=str(uuid.uuid4())),
            grpc.StatusCode.NOT_FOUND,
        ),
        (
            tenant_pb2.MoveTenantRequest(tenant_id=str(uuid.uuid4()), target_shard_id=tenant.tenant.shard_id),
            grpc.StatusCode.NOT_FOUND,
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub(gateway).MoveTenant(request, metadata=admin)
        assert caught.value.code() is code, request
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(gateway).MoveTenant(
            tenant_pb2.MoveTenantRequest(tenant_id=tenant.tenant.id, target_shard_id=tenant.tenant.shard_id),
            metadata=bearer(tenant.api_key),
        )
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(gateway).GetTenantMove(
            tenant_pb2.GetTenantMoveRequest(id=str(uuid.uuid4())), metadata=admin
        )
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND


async def test_crm_tenant_move_shows_progress_and_reports_the_block(
    suite: Stack, gateway: grpc.aio.Channel
) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    suffix = secrets.token_hex(3)
    shards = await register_shards(suite, gateway, [f"cli-{suffix}"])
    tenant = await create_tenant(gateway, suite.platform_admin_key)
    result = CliRunner().invoke(
        app,
        [
            "tenant",
            "move",
            tenant.tenant.id,
            "--to",
            shards.id(f"cli-{suffix}"),
            "--gateway",
            suite.gateway_address,
            "--key",
            suite.platform_admin_key,
        ],
    )
    assert result.exit_code == 0, result.output
    assert "moved; writes were blocked for" in result.output
    moved = await stub(gateway).GetTenant(
        tenant_pb2.GetTenantRequest(id=tenant.tenant.id), metadata=bearer(suite.platform_admin_key)
    )
    assert moved.shard_id == shards.id(f"cli-{suffix}")


async def test_a_move_failing_inside_the_write_block_unblocks_the_source(
    suite: Stack, gateway: grpc.aio.Channel
) -> None:
    """A write held open delays the block until the test has seen the BLOCKED phase; the row it
    then commits is copied by the round inside the block, where the target refuses it."""
    suffix = secrets.token_hex(3)
    shards = await register_shards(suite, gateway, [f"blk-a-{suffix}", f"blk-b-{suffix}"])
    source, target = shards.id(f"blk-a-{suffix}"), shards.id(f"blk-b-{suffix}")
    tenant = await create_tenant(gateway, suite.platform_admin_key)
    assert (
        await move(gateway, suite, tenant.tenant.id, source)
    ).phase == tenant_pb2.TENANT_MOVE_PHASE_COMPLETED
    seeded = await seed(shards.dsn(source), tenant.tenant.id, tenant.admin_user_id)
    owner = await asyncpg.connect(asyncpg_dsn(shards.owner_dsn(target)))
    try:
        await owner.execute(
            """CREATE FUNCTION core.refuse_poison() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN IF NEW.company = 'poison' THEN RAISE EXCEPTION 'poisoned row'; END IF;
               RETURN NEW; END $$"""
        )
        await owner.execute(
            "CREATE TRIGGER refuse_poison BEFORE INSERT OR UPDATE ON core.leads "
            "FOR EACH ROW EXECUTE FUNCTION core.refuse_poison()"
        )
    finally:
        await owner.close()

    admin = bearer(suite.platform_admin_key)
    writer = Writer(suite, shards, tenant.tenant.id, tenant.admin_user_id)
    try:
        _, epoch = await writer.route()
        async with UnitOfWork(writer.sessions(source), tenant.tenant.id) as uow:
            await check_membership(uow.session, tenant.tenant.id, epoch, is_write=True)
            started = await stub(gateway).MoveTenant(
                tenant_pb2.MoveTenantRequest(tenant_id=tenant.tenant.id, target_shard_id=target),
                metadata=admin,
            )
            deadline = time.monotonic() + 60
            while True:
                state = await stub(gateway).GetTenantMove(
                    tenant_pb2.GetTenantMoveRequest(id=started.id), metadata=admin
                )
                if state.phase == tenant_pb2.TENANT_MOVE_PHASE_BLOCKED:
                    break
                assert state.phase != tenant_pb2.TENANT_MOVE_PHASE_FAILED, list(state.errors)
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            await uow.session.execute(
                text(
                    "INSERT INTO core.leads (tenant_id, first_name, last_name, company, created_by, "
                    "updated_by) VALUES (:tenant, 'Late', 'Lead', 'poison', :user, :user)"
                ),
                {"tenant": tenant.tenant.id, "user": tenant.admin_user_id},
            )
            await uow.commit()
        deadline = time.monotonic() + 60
        while state.phase not in (
            tenant_pb2.TENANT_MOVE_PHASE_COMPLETED,
            tenant_pb2.TENANT_MOVE_PHASE_FAILED,
        ):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
            state = await stub(gateway).GetTenantMove(
                tenant_pb2.GetTenantMoveRequest(id=started.id), metadata=admin
            )
        assert state.phase == tenant_pb2.TENANT_MOVE_PHASE_FAILED
        assert any("poisoned row" in e for e in state.errors), list(state.errors)
        assert state.write_block_ms > 0

        # Whole (with the late write) and writable on the source; nothing on the target.
        assert await count_on(shards.dsn(source), tenant.tenant.id) == seeded + 1
        assert await count_on(shards.dsn(target), tenant.tenant.id) == 0
        assert (await writer.route())[0] == source
        await writer.write_once(1)
        assert writer.refusals == 0
    finally:
        await writer.close()
