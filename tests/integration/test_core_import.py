# ruff: noqa: F811  (fixtures are imported from test_core_support, then used as arguments)
"""ImportRecords with valid and invalid rows mixed, retries with the same import id, one change
event per imported record, batches the database refuses midway, and ExportRecords streaming the
rows back in the same shape."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import nats
import nats.errors
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from crm.v1 import common_pb2, events_pb2
from crm.v1 import core_entity_pb2 as pb
from services.core_entity.entrypoints.imports import BATCH_ROWS
from services.core_entity.service_layer import imports
from shared import events
from shared.db import asyncpg_dsn, create_engine, session_factory
from shared.fieldtypes import FieldDefinition
from tests.backends import Backends
from tests.integration.test_core_support import (  # noqa: F401
    CoreService,
    Tenant,
    channel,
    core_service,
    fails,
    other_tenant,
    tenant,
    violations,
)

pytestmark = pytest.mark.integration


async def stream(
    import_id: str, entity_type: int, batches: list[list[dict[str, str]]]
) -> AsyncIterator[pb.ImportRecordsRequest]:
    for i, batch in enumerate(batches):
        yield pb.ImportRecordsRequest(
            import_id=import_id if i == 0 else "",
            entity_type=entity_type if i == 0 else 0,
            rows=[pb.RecordRow(values=row) for row in batch],
        )


async def run_import(
    tenant: Tenant, import_id: str, entity_type: int, batches: list[list[dict[str, str]]]
) -> pb.ImportRecordsResponse:
    return await tenant.imports.ImportRecords(  # type: ignore[no-any-return]
        stream(import_id, entity_type, batches), metadata=tenant.metadata, timeout=30
    )


async def test_valid_rows_land_and_invalid_rows_are_reported(tenant: Tenant, other_tenant: Tenant) -> None:
    account = await tenant.account(name="Parent")
    theirs = await other_tenant.account()
    batches = [
        [
            {
                "first_name": "Ada",
                "last_name": "Lovelace",
                "email": "ada@example.com",
                "account_id": account.id,
            },
            {"first_name": "", "last_name": "Nobody", "email": "bad-email"},
            {
                "first_name": "Alan",
                "last_name": "Turing",
                "mailing_address.city": "London",
                "do_not_call": "yes",
            },
        ],
        [
            {"first_name": "Dup", "last_name": "Mail", "email": "ADA@example.com"},
            {"first_name": "Cross", "last_name": "Tenant", "account_id": theirs.id},
            {"first_name": "Odd", "last_name": "Key", "shoe_size": "42"},
            {"first_name": "Grace", "last_name": "Hopper", "contact_status": "inactive"},
        ],
    ]
    import_id = str(uuid.uuid4())
    reply = await run_import(tenant, import_id, pb.ENTITY_TYPE_CONTACT, batches)
    assert (reply.success_count, reply.error_count) == (3, 4)
    errors = {e.row_index: {f.field: f.description for f in e.errors} for e in reply.row_errors}
    assert set(errors) == {1, 3, 4, 5}
    assert {"first_name", "email"} <= set(errors[1])
    assert "email" in errors[3]
    assert "account_id" in errors[4] and "not found" in errors[4]["account_id"]
    assert "shoe_size" in errors[5]
    assert set(reply.record_ids) == {0, 2, 6}
    alan = await tenant.call(tenant.contacts, "GetContact", pb.GetContactRequest(id=reply.record_ids[2]))
    assert alan.mailing_address.city == "London" and alan.do_not_call

    # The same import again (a retry) creates nothing new and answers the same ids.
    again = await run_import(tenant, import_id, pb.ENTITY_TYPE_CONTACT, batches)
    assert dict(again.record_ids) == dict(reply.record_ids)
    listed = await tenant.call(tenant.contacts, "ListContacts", pb.ListContactsRequest())
    assert listed.total_size == 3


async def test_import_checks_deals_like_create(tenant: Tenant) -> None:
    pipeline = await tenant.pipeline()
    reply = await run_import(
        tenant,
        str(uuid.uuid4()),
        pb.ENTITY_TYPE_DEAL,
        [
            [
                {"name": "Fine", "amount": "100.50"},
                {"name": "Won", "stage_id": pipeline.stages[4].id},
                {"name": "Negative", "amount": "-1"},
                {"name": "Lira", "currency": "TRY"},
                {"name": "Bad date", "expected_close_date": "2026-13-01"},
            ]
        ],
    )
    assert reply.success_count == 2, reply.row_errors
    assert {e.row_index for e in reply.row_errors} == {2, 3, 4}
    won = await tenant.call(tenant.deals, "GetDeal", pb.GetDealRequest(id=reply.record_ids[1]))
    assert won.is_won and won.is_closed and won.HasField("actual_close_date")


async def test_import_needs_an_id_and_a_type(tenant: Tenant) -> None:
    error = await fails(grpc.StatusCode.INVALID_ARGUMENT, run_import(tenant, "nope", 0, [[{"name": "x"}]]))
    assert {"import_id", "entity_type"} <= set(violations(error))


async def test_export_streams_every_record_in_import_shape(tenant: Tenant, other_tenant: Tenant) -> None:
    await other_tenant.account(name="Not mine")
    for i in range(5):
        await tenant.account(
            name=f"Export {i}", annual_revenue="10.5", billing_address=pb.PostalAddress(city="Oslo")
        )
    batches = [
        reply
        async for reply in tenant.imports.ExportRecords(
            pb.ExportRecordsRequest(entity_type=pb.ENTITY_TYPE_ACCOUNT, batch_size=2),
            metadata=tenant.metadata,
        )
    ]
    assert [len(b.rows) for b in batches] == [2, 2, 1]
    assert {b.total_size for b in batches} == {5}
    rows = [dict(row.values) for b in batches for row in b.rows]
    assert [r["name"] for r in rows] == [f"Export {i}" for i in range(5)]
    assert rows[0]["annual_revenue"] == "10.50" and rows[0]["billing_address.city"] == "Oslo"
    # What export writes, import reads (into another tenant, as a copy).
    reply = await run_import(other_tenant, str(uuid.uuid4()), pb.ENTITY_TYPE_ACCOUNT, [rows])
    assert (reply.success_count, reply.error_count) == (5, 0)


async def test_import_applies_custom_field_definitions(core_service: CoreService, tenant: Tenant) -> None:
    core_service.definitions.fields[(tenant.id, "lead")] = [
        FieldDefinition("vip", "boolean"),
        FieldDefinition("code", "text", unique=True),
        FieldDefinition("size", "number", rules={"min_value": "1"}),
    ]
    reply = await run_import(
        tenant,
        str(uuid.uuid4()),
        pb.ENTITY_TYPE_LEAD,
        [
            [
                {
                    "first_name": "A",
                    "last_name": "A",
                    "custom_fields.vip": "true",
                    "custom_fields.code": "X1",
                },
                {"first_name": "B", "last_name": "B", "custom_fields.code": "X1"},
                {"first_name": "C", "last_name": "C", "custom_fields.size": "0"},
                {"first_name": "D", "last_name": "D", "custom_fields.vip": "maybe"},
                {"first_name": "E", "last_name": "E", "custom_fields.colour": "red"},
            ]
        ],
    )
    errors = {e.row_index: {f.field for f in e.errors} for e in reply.row_errors}
    assert errors == {
        1: {"custom_fields.code"},
        2: {"custom_fields.size"},
        3: {"custom_fields.vip"},
        4: {"custom_fields.colour"},
    }
    lead = await tenant.call(tenant.leads, "GetLead", pb.GetLeadRequest(id=reply.record_ids[0]))
    assert lead.custom_fields["vip"].bool_value and lead.custom_fields["code"].string_value == "X1"


# --- what an import writes ---------------------------------------------------------------------


async def change_events(nats_url: str, tenant: Tenant, wait: float = 3.0) -> list[events_pb2.ChangeEvent]:
    """Every contact INSERT event of the tenant that reached the stream within `wait` seconds."""
    client = await nats.connect(nats_url)
    try:
        sub = await client.jetstream().pull_subscribe(
            f"crm.events.{tenant.id}.core_entity.contacts.INSERT",
            stream=events.STREAM_NAME,
            config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL),
        )
        found: list[events_pb2.ChangeEvent] = []
        deadline = asyncio.get_running_loop().time() + wait
        while asyncio.get_running_loop().time() < deadline:
            try:
                found += [
                    events_pb2.ChangeEvent.FromString(m.data) for m in await sub.fetch(100, timeout=0.5)
                ]
            except (nats.errors.TimeoutError, TimeoutError):
                pass
        await sub.unsubscribe()
        return found
    finally:
        await client.close()


async def stored(core_service: CoreService, tenant: Tenant, sql: str, *args: Any) -> list[asyncpg.Record]:
    """What the tenant's rows hold, read as the app role under the tenant policy (the owner may
    read `core.import_rows` across tenants, for pruning)."""
    conn = await asyncpg.connect(asyncpg_dsn(core_service.app_dsn))
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.current_tenant_id', $1, true)", tenant.id)
            return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


def contact_rows(prefix: str, count: int) -> list[dict[str, str]]:
    return [
        {"first_name": "Row", "last_name": f"{prefix} {i}", "email": f"{prefix}{i}@example.com"}
        for i in range(count)
    ]


async def test_every_imported_record_has_one_change_event_like_create(
    backends: Backends, tenant: Tenant
) -> None:
    # More rows than one batch, in messages of uneven sizes.
    rows = contact_rows("ev", BATCH_ROWS + 5)
    reply = await run_import(tenant, str(uuid.uuid4()), pb.ENTITY_TYPE_CONTACT, [rows[:7], rows[7:]])
    assert (reply.success_count, reply.error_count) == (len(rows), 0)
    found = await change_events(backends.nats_url, tenant, wait=5.0)
    assert len(found) == len(rows) and len({e.event_id for e in found}) == len(rows)
    assert {e.record_id for e in found} == set(reply.record_ids.values())
    by_email = {json.loads(e.new_values_json)["email"]: e for e in found}
    assert set(by_email) == {row["email"] for row in rows}
    event = by_email["ev3@example.com"]
    values = json.loads(event.new_values_json)
    assert values["id"] == event.record_id == reply.record_ids[3]
    assert values["tenant_id"] == tenant.id and values["created_by"] == tenant.user_id
    assert values["version"] == 1 and values["contact_status"] == "active" and values["custom_fields"] == {}
    assert event.operation == common_pb2.OPERATION_INSERT and event.record_version == 1
    assert event.actor.user_id == tenant.user_id and event.tenant_id == tenant.id
    assert event.api_endpoint == "/crm.v1.ImportService/ImportRecords"
    contact = await tenant.call(tenant.contacts, "GetContact", pb.GetContactRequest(id=event.record_id))
    assert contact.email == "ev3@example.com" and contact.last_name == "ev 3"


async def test_an_address_another_contact_has_is_refused_by_the_unique_index(tenant: Tenant) -> None:
    await tenant.contact(first_name="Ada", last_name="Lovelace", email="taken@example.com")
    reply = await run_import(
        tenant,
        str(uuid.uuid4()),
        pb.ENTITY_TYPE_CONTACT,
        [[{"first_name": "A", "last_name": "B", "email": "TAKEN@example.com"}, *contact_rows("free", 2)]],
    )
    assert (reply.success_count, reply.error_count) == (2, 1)
    errors = {e.row_index: {f.field: f.description for f in e.errors} for e in reply.row_errors}
    assert errors == {0: {"email": "another contact already has this e-mail address"}}
    assert set(reply.record_ids) == {1, 2}


async def test_a_batch_refused_midway_is_redone_row_by_row_leaving_nothing_half_written(
    backends: Backends, core_service: CoreService, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The bookkeeping statement, the batch's last, fails for row 2 only: by then the batch's
    # records and outbox rows are written in its transaction. All of that must go, and the
    # row-by-row retry must write every row but row 2, each with its event, and row 2 nothing.
    monkeypatch.setattr(
        imports,
        "RECORD_IMPORT_ROWS",
        imports.RECORD_IMPORT_ROWS.replace(
            "$4 FROM", "$4::timestamptz + interval '0' * (1 / (landed.row_index - 2)) FROM"
        ),
    )
    import_id = str(uuid.uuid4())
    rows = contact_rows("mid", 5)
    reply = await run_import(tenant, import_id, pb.ENTITY_TYPE_CONTACT, [rows])
    assert (reply.success_count, reply.error_count) == (4, 1), reply.row_errors
    assert [e.row_index for e in reply.row_errors] == [2]
    assert set(reply.record_ids) == {0, 1, 3, 4}
    emails = {r["email"] for r in await stored(core_service, tenant, "SELECT email FROM core.contacts")}
    assert emails == {rows[i]["email"] for i in (0, 1, 3, 4)}
    landed = await stored(
        core_service,
        tenant,
        "SELECT row_index FROM core.import_rows WHERE import_id = $1",
        uuid.UUID(import_id),
    )
    assert {r["row_index"] for r in landed} == {0, 1, 3, 4}
    found = await change_events(backends.nats_url, tenant)
    assert sorted(json.loads(e.new_values_json)["email"] for e in found) == sorted(emails)

    # Retried once the database accepts it, the import writes row 2 only.
    monkeypatch.undo()
    again = await run_import(tenant, import_id, pb.ENTITY_TYPE_CONTACT, [rows])
    assert (again.success_count, again.error_count) == (5, 0)
    assert {i: again.record_ids[i] for i in (0, 1, 3, 4)} == dict(reply.record_ids)
    assert len(await change_events(backends.nats_url, tenant)) == 5


async def test_a_batch_that_fails_after_writing_leaves_nothing(
    backends: Backends, core_service: CoreService, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    write = imports.Importer._write

    async def write_then_fail(self: imports.Importer, *args: Any) -> Any:
        await write(self, *args)
        raise RuntimeError("the process died after the batch's statements")

    monkeypatch.setattr(imports.Importer, "_write", write_then_fail)
    import_id = str(uuid.uuid4())
    await fails(
        grpc.StatusCode.INTERNAL,
        run_import(tenant, import_id, pb.ENTITY_TYPE_CONTACT, [contact_rows("gone", 3)]),
    )
    assert await stored(core_service, tenant, "SELECT id FROM core.contacts") == []
    assert await stored(core_service, tenant, "SELECT row_index FROM core.import_rows") == []
    assert (
        await stored(
            core_service, tenant, "SELECT id FROM core.outbox WHERE subject LIKE $1", f"%{tenant.id}%"
        )
        == []
    )
    assert await change_events(backends.nats_url, tenant, wait=1.5) == []


async def test_imports_older_than_the_retry_window_are_forgotten_tenant_by_tenant(
    core_service: CoreService, tenant: Tenant, other_tenant: Tenant
) -> None:
    def rows(label: str) -> list[list[dict[str, str]]]:
        return [[{"name": f"{label} {i}"} for i in range(3)]]

    old, other_old, recent = (str(uuid.uuid4()) for _ in range(3))
    first_old = await run_import(tenant, old, pb.ENTITY_TYPE_ACCOUNT, rows("old"))
    await run_import(other_tenant, other_old, pb.ENTITY_TYPE_ACCOUNT, rows("theirs"))
    first_recent = await run_import(tenant, recent, pb.ENTITY_TYPE_ACCOUNT, rows("recent"))
    owner = await asyncpg.connect(asyncpg_dsn(core_service.owner_dsn))
    try:

        async def landed(tenant_id: str, import_id: str) -> int:
            async with owner.transaction():
                await owner.execute("SELECT set_config('app.current_tenant_id', $1, true)", tenant_id)
                return int(
                    await owner.fetchval(
                        "SELECT count(*) FROM core.import_rows WHERE import_id = $1", uuid.UUID(import_id)
                    )
                )

        for tenant_id, import_id in ((tenant.id, old), (other_tenant.id, other_old)):
            async with owner.transaction():
                await owner.execute("SELECT set_config('app.current_tenant_id', $1, true)", tenant_id)
                await owner.execute(
                    "UPDATE core.import_rows SET created_at = now() - interval '8 days' WHERE import_id = $1",
                    uuid.UUID(import_id),
                )
        engine = create_engine(core_service.app_dsn, pool_size=2)
        try:
            # As the app role, which sees one tenant at a time: both tenants' old rows go.
            forgotten = await imports.prune_import_rows(session_factory(engine), dt.timedelta(days=7))
        finally:
            await engine.dispose()
        assert forgotten >= 6
        assert await landed(tenant.id, old) == 0
        assert await landed(other_tenant.id, other_old) == 0
        assert await landed(tenant.id, recent) == 3
    finally:
        await owner.close()
    # A retry of the recent import still creates nothing twice; the forgotten one imports again.
    again = await run_import(tenant, recent, pb.ENTITY_TYPE_ACCOUNT, rows("recent"))
    assert dict(again.record_ids) == dict(first_recent.record_ids)
    redone = await run_import(tenant, old, pb.ENTITY_TYPE_ACCOUNT, rows("old"))
    assert len(redone.record_ids) == 3
    assert not set(redone.record_ids.values()) & set(first_old.record_ids.values())
    listed = await tenant.call(tenant.accounts, "ListAccounts", pb.ListAccountsRequest())
    assert listed.total_size == 9
