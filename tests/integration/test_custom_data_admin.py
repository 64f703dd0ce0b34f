# ruff: noqa: F811  (fixtures are imported from test_custom_objects, then used as arguments)
"""The internal DataAdminService of custom-object on a real PostgreSQL and NATS: restore of an
earlier state (and of a deleted record) published as RESTORE, retention purges with the
master-detail cascade, anonymisation of personal fields, erasure of one person, counts, and
tenant isolation."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid

import grpc
import nats
import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from crm.v1 import common_pb2, events_pb2
from crm.v1 import custom_object_pb2 as pb
from crm.v1 import data_admin_pb2 as da
from crm.v1 import data_admin_pb2_grpc as da_grpc
from shared import events
from tests.integration.test_custom_objects import (  # noqa: F401
    Service,
    Tenant,
    d,
    fails,
    make_field,
    make_object,
    ref,
    s,
    service,
    tenant,
)

pytestmark = pytest.mark.integration

RECORDS = "custom_object_records"


def admin(t: Tenant) -> da_grpc.DataAdminServiceStub:
    return da_grpc.DataAdminServiceStub(t.service.channel)


def stamp(delta: dt.timedelta) -> timestamp_pb2.Timestamp:
    value = timestamp_pb2.Timestamp()
    value.FromDatetime(dt.datetime.now(dt.UTC) + delta)
    return value


LATER = dt.timedelta(minutes=1)


async def create(t: Tenant, object_type: str, **fields: common_pb2.FieldValue) -> pb.Record:
    return await t.call(  # type: ignore[return-value]
        "CreateRecord", pb.CreateRecordRequest(record=pb.Record(object_type=object_type, fields=fields))
    )


async def get(t: Tenant, record_id: str) -> pb.Record:
    return await t.call("GetRecord", pb.GetRecordRequest(id=record_id))  # type: ignore[return-value]


async def gone(t: Tenant, record_id: str) -> bool:
    try:
        await get(t, record_id)
    except grpc.aio.AioRpcError as error:
        return error.code() == grpc.StatusCode.NOT_FOUND
    return False


async def relate(t: Tenant, name: str, holder: str, target: str, kind: str, **extra: object) -> None:
    await t.call(
        "CreateCustomRelationship",
        pb.CreateCustomRelationshipRequest(
            relationship=pb.CustomRelationship(
                relationship_name=name, from_object_type=holder, to_object_type=target,
                relationship_type=kind,
                cardinality="many_to_many" if kind == "many_to_many" else "many_to_one",
                **extra,
            )
        ),
    )  # fmt: skip


class Changes:
    """The tenant's record change events, read from JetStream as they are published."""

    def __init__(self, t: Tenant) -> None:
        self.tenant = t
        self.seen: list[events_pb2.ChangeEvent] = []

    async def __aenter__(self) -> Changes:
        self.client = await nats.connect(self.tenant.service.nats_url)
        js = self.client.jetstream()
        await events.ensure_stream(js)
        self.subscription = await js.pull_subscribe(
            f"crm.events.{self.tenant.id}.custom_object.>", stream=events.STREAM_NAME,
            config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.NEW),
        )  # fmt: skip
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()

    async def wait_for(self, operation: int, record_id: str) -> events_pb2.ChangeEvent:
        deadline = asyncio.get_running_loop().time() + 10
        while asyncio.get_running_loop().time() < deadline:
            for event in self.seen:
                if event.operation == operation and event.record_id == record_id:
                    return event
            try:
                for message in await self.subscription.fetch(50, timeout=0.5):
                    self.seen.append(events_pb2.ChangeEvent.FromString(message.data))
            except nats.errors.TimeoutError:
                pass
        raise AssertionError(f"no {operation} event for {record_id}")


async def make_person_objects(t: Tenant) -> None:
    """contact_note__c: a lookup to contact, an email, a phone, a required text and a number."""
    await make_object(t, "contact_note__c")
    await make_field(t, "contact_note__c", "subject", "text", is_required=True)
    await make_field(t, "contact_note__c", "email", "email")
    await make_field(t, "contact_note__c", "phone", "phone")
    await make_field(t, "contact_note__c", "score", "number")
    await make_field(t, "contact_note__c", "amount", "currency")


async def test_restore_writes_an_earlier_state_back_as_restore(tenant: Tenant) -> None:
    await make_person_objects(tenant)
    record = await create(tenant, "contact_note__c", subject=s("Original"), phone=s("+47 1234 5678"),
                          score=common_pb2.FieldValue(int_value=1))  # fmt: skip
    changed = await tenant.call(
        "UpdateRecord",
        pb.UpdateRecordRequest(
            record=pb.Record(id=record.id, etag=record.etag, fields={"subject": s("Changed")}),
            update_mask=field_mask_pb2.FieldMask(paths=["fields.subject"]),
        ),
    )
    assert changed.etag == 'W/"2"'  # type: ignore[attr-defined]
    earlier = {"id": record.id, "version": 1, "record_data": {"subject": "Original", "phone": "***",
               "score": 1, "gone_field": "x"}}  # fmt: skip
    code, _ = await fails(
        admin(tenant).RestoreRecord(
            da.RestoreRecordRequest(
                table_name=RECORDS, record_id=record.id, values_json=json.dumps(earlier), expected_version=1
            ),
            metadata=tenant.md,
        )
    )
    assert code == grpc.StatusCode.ABORTED
    async with Changes(tenant) as changes:
        reply = await admin(tenant).RestoreRecord(
            da.RestoreRecordRequest(
                table_name=RECORDS, record_id=record.id, values_json=json.dumps(earlier), expected_version=2
            ),
            metadata=tenant.md,
        )
        assert reply.new_version == 3
        event = await changes.wait_for(common_pb2.OPERATION_RESTORE, record.id)
    assert event.table_name == RECORDS and event.record_version == 3
    assert json.loads(event.old_values_json)["record_data"]["subject"] == "Changed"
    assert json.loads(event.new_values_json)["record_data"]["subject"] == "Original"
    now = await get(tenant, record.id)
    # The masked phone kept its current value; the deleted field was dropped.
    assert (
        now.fields["subject"].string_value == "Original"
        and now.fields["phone"].string_value == "+47 1234 5678"
    )
    assert now.etag == 'W/"3"' and "gone_field" not in now.fields
    # force overrides a stale expected version.
    forced = await admin(tenant).RestoreRecord(
        da.RestoreRecordRequest(
            table_name=RECORDS, record_id=record.id, values_json=json.dumps(earlier), expected_version=1,
            force=True,
        ),
        metadata=tenant.md,
    )  # fmt: skip
    assert forced.new_version == 4


async def test_restore_recreates_a_deleted_record_and_validates(tenant: Tenant) -> None:
    await make_person_objects(tenant)
    record = await create(tenant, "contact_note__c", subject=s("Kept"), amount=d("10"))
    await tenant.call("DeleteRecord", pb.DeleteRecordRequest(id=record.id))
    state = {"id": record.id, "custom_object_id": record.custom_object_id, "version": 1,
             "record_data": {"subject": "Kept", "amount": "10.00"}}  # fmt: skip
    stub = admin(tenant)
    bad = {**state, "record_data": {"subject": "x" * 300, "amount": "abc"}}
    code, violations = await fails(
        stub.RestoreRecord(
            da.RestoreRecordRequest(table_name=RECORDS, record_id=record.id, values_json=json.dumps(bad)),
            metadata=tenant.md,
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert {"values_json.record_data.subject", "values_json.record_data.amount"} <= set(violations)
    for values, path in (("[1]", "values_json"), ("{}", "values_json.record_data"),
                         (json.dumps({"record_data": {}}), "values_json.custom_object_id")):  # fmt: skip
        code, violations = await fails(
            stub.RestoreRecord(
                da.RestoreRecordRequest(table_name=RECORDS, record_id=record.id, values_json=values),
                metadata=tenant.md,
            )
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and path in violations
    code, violations = await fails(
        stub.RestoreRecord(
            da.RestoreRecordRequest(table_name="contacts", record_id=record.id, values_json="{}"),
            metadata=tenant.md,
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "table_name" in violations
    code, violations = await fails(
        stub.RestoreRecord(
            da.RestoreRecordRequest(table_name=RECORDS, record_id="nope", values_json="{}"),
            metadata=tenant.md,
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "record_id" in violations
    reply = await stub.RestoreRecord(
        da.RestoreRecordRequest(
            table_name=RECORDS, record_id=record.id, values_json=json.dumps(state), expected_version=1
        ),
        metadata=tenant.md,
    )
    assert reply.new_version == 2  # after the versions the record had
    back = await get(tenant, record.id)
    assert back.fields["amount"].decimal_value == "10.00" and back.etag == 'W/"2"'


async def test_other_tenants_can_neither_restore_nor_count_or_purge(service: Service) -> None:
    owner, other = Tenant(str(uuid.uuid4()), service), Tenant(str(uuid.uuid4()), service)
    await make_person_objects(owner)
    await make_person_objects(other)
    record = await create(owner, "contact_note__c", subject=s("Mine"))
    state = {"custom_object_id": record.custom_object_id, "record_data": {"subject": "Stolen"}}
    code, _ = await fails(
        admin(other).RestoreRecord(
            da.RestoreRecordRequest(table_name=RECORDS, record_id=record.id, values_json=json.dumps(state)),
            metadata=other.md,
        )
    )
    # The other tenant's object id is not theirs, so there is nothing to re-create it in.
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    # With an object of their own, the id is still taken (the row stays invisible to them).
    theirs = await create(other, "contact_note__c", subject=s("Theirs"))
    state["custom_object_id"] = theirs.custom_object_id
    code, _ = await fails(
        admin(other).RestoreRecord(
            da.RestoreRecordRequest(table_name=RECORDS, record_id=record.id, values_json=json.dumps(state)),
            metadata=other.md,
        )
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS
    count = await admin(other).CountRecords(da.CountRecordsRequest(table_name=RECORDS), metadata=other.md)
    assert count.count == 1
    purged = await admin(other).PurgeRecords(
        da.PurgeRecordsRequest(
            table_name=RECORDS, older_than=stamp(LATER), method=da.PURGE_METHOD_HARD_DELETE
        ),
        metadata=other.md,
    )
    assert list(purged.record_ids) == [theirs.id]
    assert (await get(owner, record.id)).fields["subject"].string_value == "Mine"
    count = await admin(owner).CountRecords(
        da.CountRecordsRequest(table_name="custom_records"), metadata=owner.md
    )
    assert count.count == 1
    code, violations = await fails(
        admin(owner).CountRecords(da.CountRecordsRequest(table_name="custom_fields"), metadata=owner.md)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "table_name" in violations


async def test_purge_follows_the_master_detail_cascade(tenant: Tenant) -> None:
    await make_object(tenant, "invoice__c")
    await make_field(tenant, "invoice__c", "number", "text")
    await make_field(tenant, "invoice__c", "total", "decimal")
    await make_object(tenant, "line__c")
    await make_field(tenant, "line__c", "amount", "decimal")
    await make_object(tenant, "memo__c")
    await make_field(tenant, "memo__c", "text", "text")
    await make_object(tenant, "pin__c")
    await relate(tenant, "invoice", "line__c", "invoice__c", "master_detail")
    await relate(tenant, "about_invoice", "memo__c", "invoice__c", "lookup")
    await relate(tenant, "pinned", "pin__c", "invoice__c", "lookup", is_required=True)
    doomed = await create(tenant, "invoice__c", number=s("INV-1"), total=d("1.5"))
    kept = await create(tenant, "invoice__c", number=s("INV-2"), total=d("2"))
    pinned = await create(tenant, "invoice__c", number=s("INV-3"), total=d("1.5"))
    await create(tenant, "pin__c", pinned=ref(pinned.id))
    lines = [await create(tenant, "line__c", amount=d("1"), invoice=ref(doomed.id)) for _ in range(2)]
    memo = await create(tenant, "memo__c", text=s("hello"), about_invoice=ref(doomed.id))
    stub = admin(tenant)
    for conditions in ('{"nope": 1}', '{"object_type": "nope__c"}', '{"total": "abc"}', "[]", "{"):
        code, violations = await fails(
            stub.PurgeRecords(
                da.PurgeRecordsRequest(
                    table_name=RECORDS, conditions_json=conditions, method=da.PURGE_METHOD_HARD_DELETE
                ),
                metadata=tenant.md,
            )
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "conditions_json" in violations, conditions
    code, violations = await fails(
        stub.PurgeRecords(
            da.PurgeRecordsRequest(table_name=RECORDS, method=da.PURGE_METHOD_SOFT_DELETE), metadata=tenant.md
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "method" in violations
    # Nothing was changed before that time.
    early = await stub.PurgeRecords(
        da.PurgeRecordsRequest(
            table_name=RECORDS, older_than=stamp(-dt.timedelta(hours=1)), method=da.PURGE_METHOD_HARD_DELETE
        ),
        metadata=tenant.md,
    )
    assert early.affected_count == 0
    async with Changes(tenant) as changes:
        reply = await stub.PurgeRecords(
            da.PurgeRecordsRequest(
                table_name=RECORDS,
                older_than=stamp(LATER),
                # Typed: 1.5 matches the stored "1.50".
                conditions_json=json.dumps({"object_type": "invoice__c", "total": 1.5}),
                method=da.PURGE_METHOD_HARD_DELETE,
            ),
            metadata=tenant.md,
        )
        # INV-3 is held by a required lookup that does not cascade: skipped, like DeleteRecord.
        assert set(reply.record_ids) == {doomed.id, *(line.id for line in lines)}
        assert reply.affected_count == 3
        await changes.wait_for(common_pb2.OPERATION_DELETE, lines[0].id)
    assert all([await gone(tenant, i) for i in reply.record_ids])
    assert not await gone(tenant, kept.id) and not await gone(tenant, pinned.id)
    assert "about_invoice" not in (await get(tenant, memo.id)).fields
    # A detail cannot come back without its master.
    code, violations = await fails(
        stub.RestoreRecord(
            da.RestoreRecordRequest(
                table_name=RECORDS,
                record_id=lines[0].id,
                values_json=json.dumps(
                    {"custom_object_id": lines[0].custom_object_id,
                     "record_data": {"amount": "1.00", "invoice": doomed.id}}
                ),
            ),
            metadata=tenant.md,
        )
    )  # fmt: skip
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "values_json.record_data.invoice" in violations


async def test_anonymize_replaces_personal_values(tenant: Tenant) -> None:
    await make_person_objects(tenant)
    record = await create(tenant, "contact_note__c", subject=s("Call Erin"), email=s("erin@example.com"),
                          phone=s("+47 1234 5678"), score=common_pb2.FieldValue(int_value=5))  # fmt: skip
    other = await create(
        tenant, "contact_note__c", subject=s("Other"), score=common_pb2.FieldValue(int_value=6)
    )
    stub = admin(tenant)
    async with Changes(tenant) as changes:
        reply = await stub.AnonymizeRecords(
            da.AnonymizeRecordsRequest(
                table_name=RECORDS, older_than=stamp(LATER), conditions_json=json.dumps({"score": 5})
            ),
            metadata=tenant.md,
        )
        assert list(reply.record_ids) == [record.id]
        event = await changes.wait_for(common_pb2.OPERATION_UPDATE, record.id)
    assert "erin@example.com" not in event.new_values_json
    now = await get(tenant, record.id)
    assert now.fields["subject"].string_value == "Anonymized"  # required: a placeholder
    assert "email" not in now.fields and "phone" not in now.fields
    assert now.fields["score"].int_value == 5 and now.etag == 'W/"2"'
    assert (await get(tenant, other.id)).fields["subject"].string_value == "Other"
    code, violations = await fails(
        stub.AnonymizeRecords(
            da.AnonymizeRecordsRequest(table_name=RECORDS, conditions_json='{"ssn": "1"}'), metadata=tenant.md
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "conditions_json" in violations


async def test_erase_subject_deletes_details_and_anonymizes_references(tenant: Tenant) -> None:
    await make_person_objects(tenant)
    await relate(tenant, "about_contact", "contact_note__c", "contact", "lookup")
    await make_object(tenant, "consent__c")
    await make_field(tenant, "consent__c", "purpose", "text")
    await relate(tenant, "consent_contact", "consent__c", "contact", "master_detail")
    await make_object(tenant, "consent_line__c")
    await make_field(tenant, "consent_line__c", "detail", "text")
    await relate(tenant, "consent", "consent_line__c", "consent__c", "master_detail")
    await make_object(tenant, "event__c")
    await make_field(tenant, "event__c", "title", "text")
    await relate(tenant, "event_contacts", "event__c", "contact", "many_to_many")
    contact = tenant.service.core.add()
    bystander = tenant.service.core.add()
    note = await create(tenant, "contact_note__c", subject=s("Met"), about_contact=ref(contact),
                        score=common_pb2.FieldValue(int_value=3))  # fmt: skip
    by_mail = await create(tenant, "contact_note__c", subject=s("Mail"), email=s("Erin@Example.com"))
    unrelated = await create(tenant, "contact_note__c", subject=s("Keep"), about_contact=ref(bystander),
                             email=s("someone@example.com"))  # fmt: skip
    consent = await create(tenant, "consent__c", purpose=s("marketing"), consent_contact=ref(contact))
    line = await create(tenant, "consent_line__c", detail=s("x"), consent=ref(consent.id))
    event_record = await create(tenant, "event__c", title=s("Fair"))
    link = await tenant.call(
        "LinkRecords",
        pb.LinkRecordsRequest(
            relationship="event_contacts", from_record_id=event_record.id, to_record_id=contact
        ),
    )
    stub = admin(tenant)
    code, violations = await fails(stub.EraseSubject(da.EraseSubjectRequest(), metadata=tenant.md))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "email" in violations
    code, violations = await fails(
        stub.EraseSubject(da.EraseSubjectRequest(contact_id="x"), metadata=tenant.md)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "contact_id" in violations
    reply = await stub.EraseSubject(
        da.EraseSubjectRequest(email="erin@example.com", contact_id=contact), metadata=tenant.md
    )
    assert {c.table_name: c.count for c in reply.counts} == {
        "custom_object_records.contact_note__c": 2,
        "custom_object_records.consent__c": 1,
        "custom_object_records.consent_line__c": 1,
        "custom_relationship_data": 1,
    }
    assert {(r.table_name, r.record_id) for r in reply.records} == {
        (RECORDS, note.id), (RECORDS, by_mail.id), (RECORDS, consent.id), (RECORDS, line.id),
        ("custom_relationship_data", link.id),  # type: ignore[attr-defined]
    }  # fmt: skip
    assert await gone(tenant, consent.id) and await gone(tenant, line.id)
    noted = await get(tenant, note.id)
    assert "about_contact" not in noted.fields and noted.fields["subject"].string_value == "Anonymized"
    assert noted.fields["score"].int_value == 3
    assert "email" not in (await get(tenant, by_mail.id)).fields
    kept = await get(tenant, unrelated.id)
    assert kept.fields["subject"].string_value == "Keep" and kept.fields["about_contact"].reference_value
    assert (await get(tenant, event_record.id)).fields["title"].string_value == "Fair"
    # A second run finds nothing left.
    again = await stub.EraseSubject(da.EraseSubjectRequest(contact_id=contact), metadata=tenant.md)
    assert {c.table_name: c.count for c in again.counts} == {}
