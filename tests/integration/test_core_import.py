# ruff: noqa: F811  (fixtures are imported from test_core_support, then used as arguments)
"""ImportRecords with valid and invalid rows mixed, retries with the same import id, and
ExportRecords streaming the rows back in the same shape."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
import pytest

from crm.v1 import core_entity_pb2 as pb
from shared.fieldtypes import FieldDefinition
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
