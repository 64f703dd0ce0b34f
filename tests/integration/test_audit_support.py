"""Support for the audit integration tests (no tests here): an in-process audit service on a
scratch database and the real NATS, plus a stand-in owning service: a real gRPC server
implementing DirectoryService and DataAdminService over a real scratch table
(`fake_owner.contacts`), publishing change events like an owner would.

No owning service implements DataAdminService yet; this stand-in pins down the contract the
audit service relies on (see protos/crm/v1/data_admin.proto)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from crm.v1 import (
    audit_pb2_grpc,
    common_pb2,
    data_admin_pb2,
    data_admin_pb2_grpc,
    directory_pb2,
    directory_pb2_grpc,
    events_pb2,
)
from services.audit.bootstrap import build_app
from shared.config import AuditSettings
from shared.db import asyncpg_dsn
from shared.events import OPERATIONS, STREAM_NAME, change_subject, ensure_stream, timestamp_now
from shared.grpc_server import ServiceApp
from shared.provisioning import Roles, drop_database, dsn_for, ensure_database, ensure_roles
from tests.backends import Backends

T = TypeVar("T")
TOKEN = "it-internal-" + secrets.token_hex(4)
OWNED_COLUMNS = ("email", "first_name", "last_name", "ssn")

FAKE_DDL = [
    "CREATE SCHEMA IF NOT EXISTS fake_owner",
    """CREATE TABLE fake_owner.contacts (
        tenant_id uuid NOT NULL,
        id uuid NOT NULL,
        email text,
        first_name text,
        last_name text,
        ssn text,
        version bigint NOT NULL DEFAULT 1,
        updated_at timestamptz NOT NULL DEFAULT now(),
        deleted_at timestamptz,
        PRIMARY KEY (tenant_id, id)
    )""",
]


def _tenant(context: grpc.aio.ServicerContext) -> str:
    return str(dict(context.invocation_metadata() or ())["x-crm-tenant-id"])


def _public(row: asyncpg.Record | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {
        "id": str(row["id"]),
        "tenant_id": str(row["tenant_id"]),
        "email": row["email"],
        "first_name": row["first_name"],
        "last_name": row["last_name"],
        "ssn": row["ssn"],
        "version": row["version"],
    }


class FakeOwner(directory_pb2_grpc.DirectoryServiceServicer, data_admin_pb2_grpc.DataAdminServiceServicer):
    """The owner of `contacts` on every shard, and the directory that says so."""

    def __init__(self, dsn: str, js: Callable[[], JetStreamContext]) -> None:
        self.dsn = dsn
        self._js = js
        self.address = ""
        self.pool: asyncpg.Pool | None = None
        self.calls: list[str] = []

    async def _guard(self, context: grpc.aio.ServicerContext, name: str) -> None:
        self.calls.append(name)
        metadata = dict(context.invocation_metadata() or ())
        if metadata.get("x-crm-internal-token") != TOKEN:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no internal credential")

    # --- the owner's own writes, each publishing a change event ---------------------------

    async def publish(
        self, tenant_id: str, record_id: str, operation: str, old: Any, new: Any, version: int
    ) -> str:
        event = contact_change_event(
            tenant_id,
            record_id,
            operation,
            version,
            old=old,
            new=new,
            email="owner@example.com",
            endpoint="/crm.v1.ContactService/UpdateContact",
        )
        event.occur_time.CopyFrom(timestamp_now())
        await self._js().publish(
            change_subject(tenant_id, "core_entity", "contacts", operation),
            event.SerializeToString(),
            headers={"Nats-Msg-Id": event.event_id},
        )
        return event.event_id

    async def create(self, tenant_id: str, **values: Any) -> str:
        assert self.pool is not None
        record_id = str(uuid.uuid4())
        row = await self.pool.fetchrow(
            "INSERT INTO fake_owner.contacts (tenant_id, id, email, first_name, last_name, ssn) "
            "VALUES ($1, $2, $3, $4, $5, $6) RETURNING *",
            uuid.UUID(tenant_id),
            uuid.UUID(record_id),
            values.get("email"),
            values.get("first_name"),
            values.get("last_name"),
            values.get("ssn"),
        )
        await self.publish(tenant_id, record_id, "INSERT", None, _public(row), 1)
        return record_id

    async def update(self, tenant_id: str, record_id: str, *, publish: bool = True, **values: Any) -> int:
        assert self.pool is not None
        async with self.pool.acquire() as conn, conn.transaction():
            old = await conn.fetchrow(
                "SELECT * FROM fake_owner.contacts WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
                uuid.UUID(tenant_id),
                uuid.UUID(record_id),
            )
            assert old is not None
            merged = {c: values.get(c, old[c]) for c in OWNED_COLUMNS}
            new = await conn.fetchrow(
                "UPDATE fake_owner.contacts SET email = $3, first_name = $4, last_name = $5, ssn = $6, "
                "version = version + 1, updated_at = now() WHERE tenant_id = $1 AND id = $2 RETURNING *",
                uuid.UUID(tenant_id),
                uuid.UUID(record_id),
                *[merged[c] for c in OWNED_COLUMNS],
            )
            assert new is not None
            # Published after the row lock is taken and before it is released, as an outbox
            # insert in the same transaction would be ordered.
            if publish:
                await self.publish(tenant_id, record_id, "UPDATE", _public(old), _public(new), new["version"])
        return int(new["version"])

    async def set_updated_at(self, tenant_id: str, record_id: str, when: dt.datetime) -> None:
        assert self.pool is not None
        await self.pool.execute(
            "UPDATE fake_owner.contacts SET updated_at = $3 WHERE tenant_id = $1 AND id = $2",
            uuid.UUID(tenant_id),
            uuid.UUID(record_id),
            when,
        )

    # --- DirectoryService -------------------------------------------------------------------

    async def ResolveCredential(
        self, request: directory_pb2.ResolveCredentialRequest, context: grpc.aio.ServicerContext
    ) -> directory_pb2.ResolveCredentialResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the audit service never resolves credentials")
        raise AssertionError("unreachable")

    async def GetTenantRoute(
        self, request: directory_pb2.GetTenantRouteRequest, context: grpc.aio.ServicerContext
    ) -> directory_pb2.TenantRoute:
        await self._guard(context, "GetTenantRoute")
        return directory_pb2.TenantRoute(tenant_id=request.tenant_id, shard_id="s1", epoch=1, status="active")

    async def ListShardRoutes(
        self, request: directory_pb2.ListShardRoutesRequest, context: grpc.aio.ServicerContext
    ) -> directory_pb2.ListShardRoutesResponse:
        await self._guard(context, "ListShardRoutes")
        return directory_pb2.ListShardRoutesResponse(
            shards=[
                directory_pb2.ShardRoute(
                    shard_id="s1",
                    name="shard-0",
                    core_entity_address=self.address,
                    custom_object_address=self.address,
                    active=True,
                )
            ]
        )

    # --- DataAdminService -------------------------------------------------------------------

    async def RestoreRecord(
        self, request: data_admin_pb2.RestoreRecordRequest, context: grpc.aio.ServicerContext
    ) -> data_admin_pb2.RestoreRecordResponse:
        await self._guard(context, "RestoreRecord")
        tenant_id = _tenant(context)
        assert self.pool is not None
        values = json.loads(request.values_json)
        async with self.pool.acquire() as conn, conn.transaction():
            old = await conn.fetchrow(
                "SELECT * FROM fake_owner.contacts WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
                uuid.UUID(tenant_id),
                uuid.UUID(request.record_id),
            )
            if old is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, "no such contact")
            assert old is not None
            if request.expected_version and not request.force and old["version"] != request.expected_version:
                await context.abort(grpc.StatusCode.ABORTED, "the contact changed since")
            merged = {
                c: (old[c] if values.get(c) == "***" or c not in values else values[c]) for c in OWNED_COLUMNS
            }
            new = await conn.fetchrow(
                "UPDATE fake_owner.contacts SET email = $3, first_name = $4, last_name = $5, ssn = $6, "
                "version = version + 1, updated_at = now(), deleted_at = NULL "
                "WHERE tenant_id = $1 AND id = $2 RETURNING *",
                uuid.UUID(tenant_id),
                uuid.UUID(request.record_id),
                *[merged[c] for c in OWNED_COLUMNS],
            )
            assert new is not None
            await self.publish(
                tenant_id, request.record_id, "RESTORE", _public(old), _public(new), new["version"]
            )
        return data_admin_pb2.RestoreRecordResponse(new_version=new["version"])

    async def _matching(
        self, conn: asyncpg.Connection, tenant_id: str, older_than: dt.datetime, conditions: str
    ) -> list[asyncpg.Record]:
        filters = json.loads(conditions or "{}")
        rows = await conn.fetch(
            "SELECT * FROM fake_owner.contacts WHERE tenant_id = $1 AND updated_at < $2 "
            "AND deleted_at IS NULL FOR UPDATE",
            uuid.UUID(tenant_id),
            older_than,
        )
        return [r for r in rows if all(r[k] == v for k, v in filters.items())]

    async def PurgeRecords(
        self, request: data_admin_pb2.PurgeRecordsRequest, context: grpc.aio.ServicerContext
    ) -> data_admin_pb2.PurgeRecordsResponse:
        await self._guard(context, "PurgeRecords")
        if request.table_name != "contacts":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "unknown table")
        tenant_id = _tenant(context)
        assert self.pool is not None
        ids = []
        async with self.pool.acquire() as conn, conn.transaction():
            for row in await self._matching(
                conn, tenant_id, request.older_than.ToDatetime(tzinfo=dt.UTC), request.conditions_json
            ):
                await conn.execute(
                    "DELETE FROM fake_owner.contacts WHERE tenant_id = $1 AND id = $2",
                    row["tenant_id"],
                    row["id"],
                )
                await self.publish(
                    tenant_id, str(row["id"]), "DELETE", _public(row), None, row["version"] + 1
                )
                ids.append(str(row["id"]))
        return data_admin_pb2.PurgeRecordsResponse(affected_count=len(ids), record_ids=ids)

    async def AnonymizeRecords(
        self, request: data_admin_pb2.AnonymizeRecordsRequest, context: grpc.aio.ServicerContext
    ) -> data_admin_pb2.AnonymizeRecordsResponse:
        await self._guard(context, "AnonymizeRecords")
        return data_admin_pb2.AnonymizeRecordsResponse()

    async def EraseSubject(
        self, request: data_admin_pb2.EraseSubjectRequest, context: grpc.aio.ServicerContext
    ) -> data_admin_pb2.EraseSubjectResponse:
        await self._guard(context, "EraseSubject")
        tenant_id = _tenant(context)
        assert self.pool is not None
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "DELETE FROM fake_owner.contacts WHERE tenant_id = $1 AND "
                "(($2 <> '' AND lower(email) = lower($2)) OR id::text = $3) RETURNING *",
                uuid.UUID(tenant_id),
                request.email,
                request.contact_id,
            )
            for row in rows:
                await self.publish(
                    tenant_id, str(row["id"]), "DELETE", _public(row), None, row["version"] + 1
                )
        return data_admin_pb2.EraseSubjectResponse(
            counts=[data_admin_pb2.TableCount(table_name="contacts", count=len(rows))] if rows else [],
            records=[data_admin_pb2.RecordRef(table_name="contacts", record_id=str(r["id"])) for r in rows],
        )

    async def CountRecords(
        self, request: data_admin_pb2.CountRecordsRequest, context: grpc.aio.ServicerContext
    ) -> data_admin_pb2.CountRecordsResponse:
        await self._guard(context, "CountRecords")
        if request.table_name != "contacts":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "unknown table")
        assert self.pool is not None
        count = await self.pool.fetchval(
            "SELECT count(*) FROM fake_owner.contacts WHERE tenant_id = $1 AND deleted_at IS NULL",
            uuid.UUID(_tenant(context)),
        )
        return data_admin_pb2.CountRecordsResponse(count=count)


@dataclass
class AuditHarness:
    admin_dsn: str
    owner_dsn: str
    app_dsn: str
    app: ServiceApp
    fake: FakeOwner
    nc: NatsClient
    js: JetStreamContext
    channel: grpc.aio.Channel
    durable: str
    cleanups: list[Callable[[], Awaitable[Any]]] = field(default_factory=list)

    @property
    def stub(self) -> audit_pb2_grpc.AuditServiceStub:
        return audit_pb2_grpc.AuditServiceStub(self.channel)

    @staticmethod
    def meta(
        tenant_id: str | None, *, platform: bool = False, user_id: str = ""
    ) -> tuple[tuple[str, str], ...]:
        pairs = [("x-crm-internal-token", TOKEN)]
        if tenant_id:
            pairs.append(("x-crm-tenant-id", tenant_id))
        if platform:
            pairs.append(("x-crm-platform-admin", "true"))
        if user_id:
            pairs.append(("x-crm-user-id", user_id))
        return tuple(pairs)

    async def admin_sql(self, sql: str, *args: Any) -> Any:
        """As the server's superuser (bypasses row-level security): for tampering and set-up."""
        conn = await asyncpg.connect(asyncpg_dsn(self.admin_dsn))
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    async def admin_script(self, sql: str) -> None:
        """Several statements as the server's superuser."""
        conn = await asyncpg.connect(asyncpg_dsn(self.admin_dsn))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def eventually(
        self, probe: Callable[[], Awaitable[T]], ok: Callable[[T], bool], timeout: float = 20
    ) -> T:
        deadline = time.monotonic() + timeout
        value = await probe()
        while not ok(value):
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout}s; last value: {value!r}")
            await asyncio.sleep(0.2)
            value = await probe()
        return value


async def start_harness(database_url: str, nats_url: str) -> AuditHarness:
    prefix = "crmt" + secrets.token_hex(4)
    roles = Roles(f"{prefix}_owner", "owner-pw", f"{prefix}_app", "app-pw")
    database = f"{prefix}_audit"
    await ensure_roles(database_url, roles)
    await ensure_database(database_url, database, roles)
    owner_dsn = dsn_for(database_url, database, roles.owner, roles.owner_password)
    # The admin DSN keeps the server's own credentials but points at the scratch database.
    parts = urlsplit(asyncpg_dsn(database_url))
    admin_dsn = urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, ""))
    conn = await asyncpg.connect(asyncpg_dsn(owner_dsn))
    try:
        for statement in FAKE_DDL:
            await conn.execute(statement)
    finally:
        await conn.close()
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await ensure_stream(js)
    fake = FakeOwner(owner_dsn, lambda: js)
    fake.pool = await asyncpg.create_pool(asyncpg_dsn(owner_dsn), min_size=1, max_size=30)
    fake_server = grpc.aio.server()
    directory_pb2_grpc.add_DirectoryServiceServicer_to_server(fake, fake_server)
    data_admin_pb2_grpc.add_DataAdminServiceServicer_to_server(fake, fake_server)
    fake_port = fake_server.add_insecure_port("127.0.0.1:0")
    await fake_server.start()
    fake.address = f"127.0.0.1:{fake_port}"
    durable = f"{prefix}-audit"
    app_dsn = dsn_for(database_url, database, roles.app, roles.app_password)
    settings = AuditSettings(
        internal_token=TOKEN,
        db_url=app_dsn,
        db_owner_url=owner_dsn,
        nats_url=nats_url,
        consumer_name=durable,
        # The shared test NATS holds every other run's events; this service needs only its own.
        consumer_deliver_from="new",
        tenant_address=fake.address,
        retention_interval_seconds=0,
        archive_interval_seconds=0,
        port=0,
        log_level="warning",
    )
    app = build_app(settings)
    await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    harness = AuditHarness(admin_dsn, owner_dsn, app_dsn, app, fake, nc, js, channel, durable)

    async def stop() -> None:
        await channel.close()
        await app.stop()
        await fake_server.stop(0)
        assert fake.pool is not None
        await fake.pool.close()
        for suffix in ("", "-auth", "-api"):
            try:
                await js.delete_consumer(STREAM_NAME, durable + suffix)
            except Exception:  # already gone
                pass
        await nc.close()
        await drop_database(database_url, database)

    harness.cleanups.append(stop)
    return harness


def contact_change_event(
    tenant_id: str,
    record_id: str,
    operation: str,
    version: int,
    *,
    old: Any,
    new: Any,
    email: str,
    endpoint: str,
) -> events_pb2.ChangeEvent:
    """A contact's change event as core-entity publishes it (occur_time left to the caller)."""
    return events_pb2.ChangeEvent(
        event_id=str(uuid.uuid4()),
        tenant_id=tenant_id,
        service="core_entity",
        table_name="contacts",
        record_id=record_id,
        operation=OPERATIONS[operation],
        old_values_json=json.dumps(old) if old is not None else "",
        new_values_json=json.dumps(new) if new is not None else "",
        record_version=version,
        actor=common_pb2.Actor(user_id=str(uuid.UUID(int=7)), email=email),
        request_id=str(uuid.uuid4()),
        api_endpoint=endpoint,
    )


@pytest.fixture(scope="module")
async def audit(backends: Backends) -> AsyncIterator[AuditHarness]:
    """The audit service on its own database, once per test module."""
    harness = await start_harness(backends.database_url, backends.nats_url)
    yield harness
    for cleanup in harness.cleanups:
        await cleanup()
