# ruff: noqa: F811  (fixtures are imported from test_core_support, then used as arguments)
"""The internal DataAdminService of core-entity: restore, retention purge (soft and hard, with
the seed's ON DELETE effects), anonymisation, erasure of one person, counts."""

from __future__ import annotations

import datetime as dt
import json

import grpc
import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2

from crm.v1 import core_entity_pb2 as pb
from crm.v1 import data_admin_pb2 as da
from crm.v1 import data_admin_pb2_grpc as da_grpc
from tests.integration.test_core_support import (  # noqa: F401
    Tenant,
    channel,
    core_service,
    fails,
    other_tenant,
    tenant,
    violations,
)

pytestmark = pytest.mark.integration


def admin(
    tenant: Tenant, channel: grpc.aio.Channel
) -> tuple[da_grpc.DataAdminServiceStub, tuple[tuple[str, str], ...]]:
    return da_grpc.DataAdminServiceStub(channel), tenant.metadata


def later() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1))
    return stamp


async def test_restore_writes_an_earlier_state_back(tenant: Tenant, channel: grpc.aio.Channel) -> None:
    stub, md = admin(tenant, channel)
    account = await tenant.account(name="Original", industry="Retail")
    account.name = "Changed"
    changed = await tenant.call(
        tenant.accounts,
        "UpdateAccount",
        pb.UpdateAccountRequest(account=account, update_mask=field_mask_pb2.FieldMask(paths=["name"])),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RestoreRecord(
            da.RestoreRecordRequest(
                table_name="accounts",
                record_id=account.id,
                values_json=json.dumps({"name": "x"}),
                expected_version=1,
            ),
            metadata=md,
        )
    assert caught.value.code() is grpc.StatusCode.ABORTED
    reply = await stub.RestoreRecord(
        da.RestoreRecordRequest(
            table_name="accounts",
            record_id=account.id,
            values_json=json.dumps({"name": "Original", "industry": "***", "version": 99}),
            expected_version=2,
        ),
        metadata=md,
    )
    assert reply.new_version == 3
    now = await tenant.call(tenant.accounts, "GetAccount", pb.GetAccountRequest(id=account.id))
    assert (now.name, now.industry, now.etag) == ("Original", "Retail", 'W/"3"')
    assert changed.etag == 'W/"2"'


async def test_hard_purge_applies_on_delete_rules(tenant: Tenant, channel: grpc.aio.Channel) -> None:
    stub, md = admin(tenant, channel)
    account = await tenant.account(name="Doomed")
    contact = await tenant.contact(account_id=account.id)
    await tenant.call(
        tenant.activities,
        "CreateActivity",
        pb.CreateActivityRequest(
            activity=pb.Activity(subject="x", activity_type="task", account_id=account.id)
        ),
    )
    reply = await stub.PurgeRecords(
        da.PurgeRecordsRequest(
            table_name="accounts",
            older_than=later(),
            conditions_json=json.dumps({"name": "Doomed"}),
            method=da.PURGE_METHOD_HARD_DELETE,
        ),
        metadata=md,
    )
    assert list(reply.record_ids) == [account.id]
    kept = await tenant.call(tenant.contacts, "GetContact", pb.GetContactRequest(id=contact.id))
    assert kept.account_id == ""  # ON DELETE SET NULL
    count = await stub.CountRecords(da.CountRecordsRequest(table_name="activities"), metadata=md)
    assert count.count == 0  # ON DELETE CASCADE
    await fails(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.PurgeRecords(
            da.PurgeRecordsRequest(table_name="accounts", conditions_json='{"tenant_id": "x"}', method=2),
            metadata=md,
        ),
    )
    await fails(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.CountRecords(da.CountRecordsRequest(table_name="pg_roles"), metadata=md),
    )


async def test_erase_subject_anonymises_and_removes_activities(
    tenant: Tenant, channel: grpc.aio.Channel
) -> None:
    stub, md = admin(tenant, channel)
    contact = await tenant.contact(first_name="Erin", last_name="Erase", email="erin@example.com")
    lead = await tenant.lead(email="ERIN@example.com")
    await tenant.call(
        tenant.activities,
        "CreateActivity",
        pb.CreateActivityRequest(
            activity=pb.Activity(subject="x", activity_type="note", contact_id=contact.id)
        ),
    )
    reply = await stub.EraseSubject(da.EraseSubjectRequest(email="erin@example.com"), metadata=md)
    assert {c.table_name: c.count for c in reply.counts} == {"contacts": 1, "leads": 1, "activities": 1}
    now = await tenant.call(tenant.contacts, "GetContact", pb.GetContactRequest(id=contact.id))
    assert (now.first_name, now.email) == ("Anonymized", "")
    assert (await tenant.call(tenant.leads, "GetLead", pb.GetLeadRequest(id=lead.id))).email == ""


async def test_soft_purge_is_undoable(tenant: Tenant, channel: grpc.aio.Channel) -> None:
    stub, md = admin(tenant, channel)
    lead = await tenant.lead()
    reply = await stub.PurgeRecords(
        da.PurgeRecordsRequest(table_name="leads", older_than=later(), method=da.PURGE_METHOD_SOFT_DELETE),
        metadata=md,
    )
    assert list(reply.record_ids) == [lead.id]
    await tenant.call(tenant.leads, "UndeleteLead", pb.UndeleteLeadRequest(id=lead.id))
