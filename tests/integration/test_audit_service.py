# ruff: noqa: F811  (fixtures are imported from test_audit_support, then used as arguments)
"""The audit service in-process on a real database and NATS, with a stand-in owner serving
DataAdminService on a real table: ingest (chained, masked, versioned, idempotent, poison
dead-lettered), queries and their bad cases, tampering, restore, retention, erasure, the GDPR
report and archiving."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import uuid
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from crm.v1 import audit_pb2, common_pb2, events_pb2
from shared.db import rls_statements
from shared.events import STREAM_NAME, timestamp_now
from tests.integration.test_audit_support import (  # noqa: F401  (the fixture is used as an argument)
    AuditHarness,
    audit,
)

pytestmark = pytest.mark.integration


def violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(error)
    assert status is not None
    found: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.update({v.field: v.description for v in bad.field_violations})
    return found


async def logs(audit: AuditHarness, tenant: str, **filters: Any) -> list[audit_pb2.AuditLog]:
    reply = await audit.stub.ListAuditLogs(
        audit_pb2.ListAuditLogsRequest(page_size=1000, **filters), metadata=audit.meta(tenant), timeout=10
    )
    return list(reply.audit_logs)


async def wait_logs(audit: AuditHarness, tenant: str, count: int, **filters: Any) -> list[audit_pb2.AuditLog]:
    return await audit.eventually(lambda: logs(audit, tenant, **filters), lambda found: len(found) >= count)


async def versions(audit: AuditHarness, tenant: str, record: str) -> list[audit_pb2.RecordVersion]:
    reply = await audit.stub.ListRecordVersions(
        audit_pb2.ListRecordVersionsRequest(table_name="contacts", record_id=record, page_size=1000),
        metadata=audit.meta(tenant),
    )
    return list(reply.record_versions)


async def verify(
    audit: AuditHarness, tenant: str, include_archive: bool = False
) -> audit_pb2.VerifyAuditChainResponse:
    return await audit.stub.VerifyAuditChain(  # type: ignore[no-any-return]
        audit_pb2.VerifyAuditChainRequest(include_archive=include_archive), metadata=audit.meta(tenant)
    )


def new_tenant() -> str:
    return str(uuid.uuid4())


async def test_changes_are_masked_versioned_chained_and_stored_once(audit: AuditHarness) -> None:
    tenant = new_tenant()
    await audit.stub.CreateSensitiveField(
        audit_pb2.CreateSensitiveFieldRequest(
            sensitive_field=audit_pb2.SensitiveField(table_name="contacts", field_name="last_name")
        ),
        metadata=audit.meta(tenant),
    )
    record = await audit.fake.create(
        tenant, email="ann@example.com", first_name="Ann", last_name="Lee", ssn="111"
    )
    await audit.fake.update(tenant, record, first_name="Anna", ssn="222", last_name="Li")
    entries = await wait_logs(audit, tenant, 2)
    update = next(e for e in entries if e.operation == common_pb2.OPERATION_UPDATE)
    # Changed by value (version too), and the masked fields still show as changed.
    assert list(update.changed_fields) == ["first_name", "last_name", "ssn", "version"]
    new_values = json.loads(update.new_values_json)
    assert (
        new_values["ssn"] == "***" and new_values["last_name"] == "***" and new_values["first_name"] == "Anna"
    )
    assert "111" not in update.old_values_json and "Lee" not in update.old_values_json

    history = await audit.stub.GetRecordHistory(
        audit_pb2.GetRecordHistoryRequest(table_name="contacts", record_id=record),
        metadata=audit.meta(tenant),
    )
    assert [e.audit_log.operation for e in history.entries] == [
        common_pb2.OPERATION_INSERT,
        common_pb2.OPERATION_UPDATE,
    ]
    changes = {c.field_name: c for c in history.entries[1].field_changes}
    assert changes["first_name"].old_value == "Ann" and changes["first_name"].new_value == "Anna"
    assert (
        changes["ssn"].sensitive and changes["ssn"].old_value == "***" and changes["ssn"].new_value == "***"
    )
    assert changes["last_name"].sensitive and changes["version"].field_type == "number"

    found = await versions(audit, tenant, record)
    assert [v.version_number for v in found] == [2, 1]
    assert [v.is_current for v in found] == [True, False]
    assert json.loads(found[1].record_data_json)["ssn"] == "***"
    one = await audit.stub.GetRecordVersion(
        audit_pb2.GetRecordVersionRequest(table_name="contacts", record_id=record, version_number=1),
        metadata=audit.meta(tenant),
    )
    assert json.loads(one.record_data_json)["first_name"] == "Ann"

    # A re-published event (new Nats-Msg-Id, same event id) never makes a second row.
    first = entries[-1]
    replay = events_pb2.ChangeEvent(
        event_id=first.event_id,
        tenant_id=tenant,
        service="core_entity",
        table_name="contacts",
        record_id=record,
        operation=first.operation,
        new_values_json=first.new_values_json,
        record_version=1,
        occur_time=first.change_time,
    )
    for _ in range(3):
        await audit.js.publish(
            f"crm.events.{tenant}.core_entity.contacts.INSERT",
            replay.SerializeToString(),
            headers={"Nats-Msg-Id": str(uuid.uuid4())},
        )
    marker = await audit.fake.create(tenant, email="marker@example.com")
    await wait_logs(audit, tenant, 1, record_id=marker)
    assert len(await logs(audit, tenant, record_id=record)) == 2
    report = await verify(audit, tenant)
    assert (
        report.valid
        and report.entries_checked == 3
        and report.head_sequence == 3
        and len(report.head_hash) == 64
    )


async def test_altering_a_stored_row_breaks_the_chain_at_that_entry(audit: AuditHarness) -> None:
    tenant = new_tenant()
    record = await audit.fake.create(tenant, email="t@example.com", first_name="T")
    for name in ("U", "V", "W"):
        await audit.fake.update(tenant, record, first_name=name)
    entries = await wait_logs(audit, tenant, 4)
    assert (await verify(audit, tenant)).valid
    target = sorted(entries, key=lambda e: e.record_version)[2]
    await audit.admin_sql(
        "UPDATE audit.audit_logs SET new_values = jsonb_set(new_values, '{first_name}', '\"Z\"') "
        "WHERE id = $1",
        uuid.UUID(target.id),
    )
    report = await verify(audit, tenant)
    assert not report.valid
    assert report.first_broken_entry_id == target.id
    assert report.first_broken_sequence == 3
    assert report.reason == "content does not match its hash"
    # Removing the newest entry is caught by the chain head.
    await audit.admin_sql(
        "UPDATE audit.audit_logs SET new_values = jsonb_set(new_values, '{first_name}', '\"V\"') "
        "WHERE id = $1",
        uuid.UUID(target.id),
    )
    assert (await verify(audit, tenant)).valid
    newest = max(entries, key=lambda e: e.record_version)
    await audit.admin_sql("DELETE FROM audit.audit_logs WHERE id = $1", uuid.UUID(newest.id))
    report = await verify(audit, tenant)
    assert not report.valid and report.reason == "entries at the end of the chain are missing"


async def test_concurrent_writers_on_one_record_get_dense_ordered_versions(audit: AuditHarness) -> None:
    tenant = new_tenant()
    record = await audit.fake.create(tenant, email="c@example.com", first_name="c0")
    await asyncio.gather(*(audit.fake.update(tenant, record, first_name=f"c{i}") for i in range(1, 21)))
    await wait_logs(audit, tenant, 21)
    found = await audit.eventually(lambda: versions(audit, tenant, record), lambda v: len(v) == 21)
    assert [v.version_number for v in found] == list(range(21, 0, -1))
    assert [v.is_current for v in found].count(True) == 1 and found[0].is_current
    assert (await verify(audit, tenant)).valid


async def test_a_tenant_never_sees_another_tenants_entries(audit: AuditHarness) -> None:
    tenant_a, tenant_b = new_tenant(), new_tenant()
    record = await audit.fake.create(tenant_a, email="a@example.com")
    await wait_logs(audit, tenant_a, 1)
    assert await logs(audit, tenant_b) == []
    assert await logs(audit, tenant_b, record_id=record) == []
    assert await versions(audit, tenant_b, record) == []
    history = await audit.stub.GetRecordHistory(
        audit_pb2.GetRecordHistoryRequest(table_name="contacts", record_id=record),
        metadata=audit.meta(tenant_b),
    )
    assert list(history.entries) == []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await audit.stub.GetRecordVersion(
            audit_pb2.GetRecordVersionRequest(table_name="contacts", record_id=record, version_number=1),
            metadata=audit.meta(tenant_b),
        )
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await audit.stub.RestoreRecordVersion(
            audit_pb2.RestoreRecordVersionRequest(table_name="contacts", record_id=record, version_number=1),
            metadata=audit.meta(tenant_b),
        )
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    assert (await verify(audit, tenant_b)).entries_checked == 0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await audit.stub.ListAuditLogs(audit_pb2.ListAuditLogsRequest(), metadata=audit.meta(None))
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED


def stamp(value: dt.datetime) -> timestamp_pb2.Timestamp:
    result = timestamp_pb2.Timestamp()
    result.FromDatetime(value)
    return result


async def test_bad_filters_name_the_field_and_are_never_internal(audit: AuditHarness) -> None:
    tenant = new_tenant()
    now = dt.datetime.now(dt.UTC)
    cases: list[tuple[str, Any, set[str]]] = [
        (
            "ListAuditLogs",
            audit_pb2.ListAuditLogsRequest(record_id="nope", user_id="x"),
            {"record_id", "user_id"},
        ),
        (
            "ListAuditLogs",
            audit_pb2.ListAuditLogsRequest(
                start_time=stamp(now), end_time=stamp(now - dt.timedelta(hours=1))
            ),
            {"end_time"},
        ),
        ("ListAuditLogs", audit_pb2.ListAuditLogsRequest(page_token="garbage!"), {"page_token"}),
        ("ListAuditLogs", audit_pb2.ListAuditLogsRequest(page_size=-1), {"page_size"}),
        ("ListAuditLogs", audit_pb2.ListAuditLogsRequest(operation=99), {"operation"}),  # type: ignore[arg-type]
        ("GetRecordHistory", audit_pb2.GetRecordHistoryRequest(), {"table_name", "record_id"}),
        (
            "GetRecordVersion",
            audit_pb2.GetRecordVersionRequest(table_name="contacts", record_id=str(uuid.uuid4())),
            {"version_number"},
        ),
        (
            "ListRecordVersions",
            audit_pb2.ListRecordVersionsRequest(table_name="t", record_id="1"),
            {"record_id"},
        ),
        ("GetUserActivitySummary", audit_pb2.GetUserActivitySummaryRequest(), {"user_id"}),
        ("ListAuthEvents", audit_pb2.ListAuthEventsRequest(event_type="hack"), {"event_type"}),
        ("ListApiCalls", audit_pb2.ListApiCallsRequest(user_id="u"), {"user_id"}),
        (
            "CreateProcessingActivity",
            audit_pb2.CreateProcessingActivityRequest(processing_activity=audit_pb2.ProcessingActivity()),
            {
                "processing_activity.activity_name",
                "processing_activity.purpose",
                "processing_activity.legal_basis",
            },
        ),
        (
            "RecordConsent",
            audit_pb2.RecordConsentRequest(
                consent_record=audit_pb2.ConsentRecord(
                    contact_id=str(uuid.uuid4()), lead_id=str(uuid.uuid4()), ip_address="999.1.1.1"
                )
            ),
            {"consent_record.contact_id", "consent_record.consent_type", "consent_record.ip_address"},
        ),
        (
            "CreateRetentionPolicy",
            audit_pb2.CreateRetentionPolicyRequest(
                retention_policy=audit_pb2.RetentionPolicy(
                    table_name="Bad Table;",
                    retention_period=duration_pb2.Duration(seconds=60),
                    conditions_json="[1]",
                )
            ),
            {
                "retention_policy.policy_name",
                "retention_policy.table_name",
                "retention_policy.retention_period",
                "retention_policy.deletion_method",
                "retention_policy.conditions_json",
            },
        ),
        ("EraseDataSubject", audit_pb2.EraseDataSubjectRequest(), {"email"}),
        (
            "EraseDataSubject",
            audit_pb2.EraseDataSubjectRequest(email="nope", lead_id="x"),
            {"email", "lead_id"},
        ),
        ("RunRetention", audit_pb2.RunRetentionRequest(policy_id="x"), {"policy_id"}),
    ]
    for method, request, fields in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await getattr(audit.stub, method)(request, metadata=audit.meta(tenant), timeout=10)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (method, caught.value.details())
        assert set(violations(caught.value)) == fields, method


async def test_poison_is_dead_lettered_and_does_not_block_the_stream(audit: AuditHarness) -> None:
    tenant = new_tenant()
    watcher = await audit.js.pull_subscribe(
        "crm.deadletter.audit",
        stream=STREAM_NAME,
        config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.NEW),
    )
    await audit.js.publish(f"crm.events.{tenant}.core_entity.contacts.INSERT", b"\xff not an event")
    bad_values = events_pb2.ChangeEvent(
        event_id=str(uuid.uuid4()),
        tenant_id=tenant,
        service="core_entity",
        table_name="contacts",
        record_id=str(uuid.uuid4()),
        operation=common_pb2.OPERATION_DELETE,
        new_values_json='{"a": 1}',
        occur_time=timestamp_now(),
    )
    await audit.js.publish(f"crm.events.{tenant}.core_entity.contacts.DELETE", bad_values.SerializeToString())
    await audit.js.publish(f"crm.auth.{tenant}.bogus", b"\x01\x02")
    record = await audit.fake.create(tenant, email="after@example.com")
    entries = await wait_logs(audit, tenant, 1)
    assert [e.record_id for e in entries] == [record]
    dead: list[Any] = []
    deadline = asyncio.get_running_loop().time() + 10
    while len(dead) < 3 and asyncio.get_running_loop().time() < deadline:
        try:
            dead += await watcher.fetch(10, timeout=1)
        except Exception:
            pass
    reasons = {m.headers.get("Crm-Dead-Letter-Reason") for m in dead if m.headers}
    subjects = {m.headers.get("Crm-Original-Subject") for m in dead if m.headers}
    assert f"crm.events.{tenant}.core_entity.contacts.INSERT" in subjects
    assert f"crm.auth.{tenant}.bogus" in subjects
    assert "old/new values do not fit a DELETE" in reasons
    await watcher.unsubscribe()


async def test_auth_and_api_audit_with_their_filters(audit: AuditHarness) -> None:
    tenant, other = new_tenant(), new_tenant()
    user = str(uuid.uuid4())
    for event_type, success, owner in (
        ("login_success", True, tenant),
        ("login_failure", False, tenant),
        ("account_locked", False, tenant),
        ("login_failure", False, other),
        ("login_failure", False, ""),  # unknown subdomain: no tenant
    ):
        event = events_pb2.AuthEvent(
            event_id=str(uuid.uuid4()),
            tenant_id=owner,
            user_id=user,
            email="u@example.com",
            event_type=event_type,
            success=success,
            ip_address="10.1.2.3",
            occur_time=timestamp_now(),
        )
        await audit.js.publish(f"crm.auth.{owner or 'none'}.{event_type}", event.SerializeToString())
    for status, endpoint in (
        ("OK", "/crm.v1.A/Get"),
        ("NOT_FOUND", "/crm.v1.A/Get"),
        ("INTERNAL", "/crm.v1.A/Put"),
    ):
        call = events_pb2.ApiCallEvent(
            event_id=str(uuid.uuid4()),
            tenant_id=tenant,
            user_id=user,
            endpoint=endpoint,
            status_code=status,
            duration_ms=5,
            occur_time=timestamp_now(),
        )
        await audit.js.publish(f"crm.api.{tenant}", call.SerializeToString())

    async def auth(**filters: Any) -> list[audit_pb2.AuthAuditLog]:
        reply = await audit.stub.ListAuthEvents(
            audit_pb2.ListAuthEventsRequest(**filters), metadata=audit.meta(tenant)
        )
        return list(reply.auth_events)

    assert len(await audit.eventually(auth, lambda found: len(found) == 3)) == 3
    failures = await auth(failures_only=True)
    assert {e.event_type for e in failures} == {"login_failure", "account_locked"}
    assert [e.event_type for e in await auth(event_type="account_locked")] == ["account_locked"]

    async def api(**filters: Any) -> list[audit_pb2.ApiAuditLog]:
        reply = await audit.stub.ListApiCalls(
            audit_pb2.ListApiCallsRequest(**filters), metadata=audit.meta(tenant)
        )
        return list(reply.api_calls)

    assert len(await audit.eventually(api, lambda found: len(found) == 3)) == 3
    errors = await api(errors_only=True)
    assert sorted(e.response_status for e in errors) == [404, 500]
    assert {e.status_code for e in errors} == {"NOT_FOUND", "INTERNAL"}
    assert [e.endpoint for e in await api(endpoint="/crm.v1.A/Put")] == ["/crm.v1.A/Put"]
    # Paging walks every entry once.
    first = await audit.stub.ListApiCalls(
        audit_pb2.ListApiCallsRequest(page_size=2), metadata=audit.meta(tenant)
    )
    second = await audit.stub.ListApiCalls(
        audit_pb2.ListApiCallsRequest(page_size=2, page_token=first.next_page_token),
        metadata=audit.meta(tenant),
    )
    assert len(first.api_calls) == 2 and len(second.api_calls) == 1 and not second.next_page_token


async def test_user_activity_summary_counts_per_table_and_operation(audit: AuditHarness) -> None:
    tenant = new_tenant()
    record = await audit.fake.create(tenant, email="s@example.com")
    await audit.fake.update(tenant, record, first_name="x")
    await audit.fake.update(tenant, record, first_name="y")
    await wait_logs(audit, tenant, 3)
    reply = await audit.stub.GetUserActivitySummary(
        audit_pb2.GetUserActivitySummaryRequest(user_id=str(uuid.UUID(int=7))), metadata=audit.meta(tenant)
    )
    summary = {(a.table_name, a.operation): a.count for a in reply.activities}
    assert summary == {
        ("contacts", common_pb2.OPERATION_INSERT): 1,
        ("contacts", common_pb2.OPERATION_UPDATE): 2,
    }


async def test_restore_goes_through_the_owner_and_refuses_stale_unless_forced(audit: AuditHarness) -> None:
    tenant = new_tenant()
    record = await audit.fake.create(tenant, email="r@example.com", first_name="Original", ssn="123")
    await audit.fake.update(tenant, record, first_name="Changed")
    await wait_logs(audit, tenant, 2)
    await audit.eventually(lambda: versions(audit, tenant, record), lambda v: len(v) == 2)
    restored = await audit.stub.RestoreRecordVersion(
        audit_pb2.RestoreRecordVersionRequest(table_name="contacts", record_id=record, version_number=1),
        metadata=audit.meta(tenant),
    )
    assert restored.new_version == 3 and restored.restored_version == 1
    entries = await wait_logs(audit, tenant, 1, operation=common_pb2.OPERATION_RESTORE)
    assert json.loads(entries[0].new_values_json)["first_name"] == "Original"
    # The masked ssn was not written back as "***".
    row = await audit.admin_sql("SELECT ssn FROM fake_owner.contacts WHERE id = $1", uuid.UUID(record))
    assert row[0]["ssn"] == "123"
    # A change the audit log has not seen yet: ABORTED, unless forced.
    await audit.eventually(lambda: versions(audit, tenant, record), lambda v: len(v) == 3)
    await audit.fake.update(tenant, record, publish=False, first_name="Unseen")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await audit.stub.RestoreRecordVersion(
            audit_pb2.RestoreRecordVersionRequest(table_name="contacts", record_id=record, version_number=2),
            metadata=audit.meta(tenant),
        )
    assert caught.value.code() is grpc.StatusCode.ABORTED
    forced = await audit.stub.RestoreRecordVersion(
        audit_pb2.RestoreRecordVersionRequest(
            table_name="contacts", record_id=record, version_number=2, force=True
        ),
        metadata=audit.meta(tenant),
    )
    assert forced.new_version == 5
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await audit.stub.RestoreRecordVersion(
            audit_pb2.RestoreRecordVersionRequest(table_name="contacts", record_id=record, version_number=42),
            metadata=audit.meta(tenant),
        )
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND


async def test_retention_removes_through_the_owner_and_logs_each_removal(audit: AuditHarness) -> None:
    tenant = new_tenant()
    old = await audit.fake.create(tenant, email="old@example.com", first_name="keepme")
    fresh = await audit.fake.create(tenant, email="fresh@example.com", first_name="keepme")
    other = await audit.fake.create(tenant, email="other@example.com", first_name="other")
    for record in (old, other):
        await audit.fake.set_updated_at(tenant, record, dt.datetime.now(dt.UTC) - dt.timedelta(days=40))
    policy = await audit.stub.CreateRetentionPolicy(
        audit_pb2.CreateRetentionPolicyRequest(
            retention_policy=audit_pb2.RetentionPolicy(
                policy_name="old contacts",
                table_name="contacts",
                retention_period=duration_pb2.Duration(seconds=30 * 86400),
                deletion_method=audit_pb2.DELETION_METHOD_HARD_DELETE,
                conditions_json='{"first_name": "keepme"}',
            )
        ),
        metadata=audit.meta(tenant),
    )
    assert policy.active
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await audit.stub.CreateRetentionPolicy(
            audit_pb2.CreateRetentionPolicyRequest(
                retention_policy=audit_pb2.RetentionPolicy(
                    policy_name="old contacts",
                    table_name="contacts",
                    retention_period=duration_pb2.Duration(seconds=30 * 86400),
                    deletion_method=audit_pb2.DELETION_METHOD_SOFT_DELETE,
                )
            ),
            metadata=audit.meta(tenant),
        )
    assert caught.value.code() is grpc.StatusCode.ALREADY_EXISTS
    run = await audit.stub.RunRetention(audit_pb2.RunRetentionRequest(), metadata=audit.meta(tenant))
    assert [(r.table_name, r.affected_count, r.error) for r in run.results] == [("contacts", 1, "")]
    deletions = await audit.stub.ListDeletionLogs(
        audit_pb2.ListDeletionLogsRequest(table_name="contacts"), metadata=audit.meta(tenant)
    )
    assert [(d.record_id, d.deletion_method) for d in deletions.deletion_logs] == [(old, "retention_policy")]
    entries = await wait_logs(audit, tenant, 1, operation=common_pb2.OPERATION_DELETE)
    assert [e.record_id for e in entries] == [old]
    remaining = await audit.admin_sql(
        "SELECT id FROM fake_owner.contacts WHERE tenant_id = $1 ORDER BY email", uuid.UUID(tenant)
    )
    assert {str(r["id"]) for r in remaining} == {fresh, other}
    listed = await audit.stub.ListRetentionPolicies(
        audit_pb2.ListRetentionPoliciesRequest(), metadata=audit.meta(tenant)
    )
    assert listed.retention_policies[0].HasField("last_run_time")


async def test_erasure_reaches_owners_consents_and_audit_values_and_keeps_the_chain(
    audit: AuditHarness,
) -> None:
    tenant = new_tenant()
    email = f"subject-{uuid.uuid4().hex[:6]}@example.com"
    subject = await audit.fake.create(tenant, email=email, first_name="Erin", last_name="Subject")
    await audit.fake.update(tenant, subject, first_name="Erina")
    bystander = await audit.fake.create(tenant, email="by@example.com", first_name="By")
    consent = await audit.stub.RecordConsent(
        audit_pb2.RecordConsentRequest(
            consent_record=audit_pb2.ConsentRecord(
                contact_id=subject,
                consent_type="marketing_email",
                consent_given=True,
                consent_method="web_form",
                consent_evidence_json='{"form": "signup"}',
                ip_address="192.0.2.1",
            )
        ),
        metadata=audit.meta(tenant),
    )
    await audit.stub.RecordConsent(
        audit_pb2.RecordConsentRequest(
            consent_record=audit_pb2.ConsentRecord(
                contact_id=bystander, consent_type="marketing_email", consent_given=True
            )
        ),
        metadata=audit.meta(tenant),
    )
    await wait_logs(audit, tenant, 3)
    erased = await audit.stub.EraseDataSubject(
        audit_pb2.EraseDataSubjectRequest(email=email.upper(), reason="article 17 request"),
        metadata=audit.meta(tenant),
    )
    assert [(c.table_name, c.count) for c in erased.counts] == [("contacts", 1)]
    assert erased.consents_removed == 1 and erased.audit_entries_anonymized >= 4
    assert list(erased.incomplete_services) == []
    # The owner's DELETE arrives too; then nothing in the audit log names the subject.
    await wait_logs(audit, tenant, 1, operation=common_pb2.OPERATION_DELETE)
    await audit.stub.EraseDataSubject(
        audit_pb2.EraseDataSubjectRequest(contact_id=subject), metadata=audit.meta(tenant)
    )
    everything = await logs(audit, tenant)
    dumped = " ".join(e.old_values_json + e.new_values_json for e in everything)
    assert email not in dumped and "Erin" not in dumped and "by@example.com" in dumped
    history = await audit.stub.GetRecordHistory(
        audit_pb2.GetRecordHistoryRequest(table_name="contacts", record_id=subject),
        metadata=audit.meta(tenant),
    )
    assert all("Erin" not in c.old_value + c.new_value for e in history.entries for c in e.field_changes)
    assert all("Erin" not in v.record_data_json for v in await versions(audit, tenant, subject))
    consents = await audit.stub.ListConsents(audit_pb2.ListConsentsRequest(), metadata=audit.meta(tenant))
    assert [c.contact_id for c in consents.consent_records] == [bystander]
    assert consent.id not in {c.id for c in consents.consent_records}
    deletions = await audit.stub.ListDeletionLogs(
        audit_pb2.ListDeletionLogsRequest(), metadata=audit.meta(tenant)
    )
    entry = next(d for d in deletions.deletion_logs if d.id == erased.deletion_log_id)
    assert entry.deletion_method == "gdpr_erasure" and email not in entry.summary_json.lower()
    assert json.loads(entry.summary_json)["tables"] == {"contacts": 1}
    report = await verify(audit, tenant)
    assert report.valid and report.erased_entries >= 3


async def test_consents_and_processing_activities_and_the_gdpr_report(audit: AuditHarness) -> None:
    tenant = new_tenant()
    await audit.fake.create(tenant, email="g1@example.com")
    await audit.fake.create(tenant, email="g2@example.com")
    activity = await audit.stub.CreateProcessingActivity(
        audit_pb2.CreateProcessingActivityRequest(
            processing_activity=audit_pb2.ProcessingActivity(
                activity_name="Newsletter",
                purpose="Send product news",
                legal_basis=audit_pb2.LEGAL_BASIS_CONSENT,
                data_categories=["contacts", "marketing_preferences"],
                retention_period=duration_pb2.Duration(seconds=365 * 86400),
            )
        ),
        metadata=audit.meta(tenant),
    )
    assert activity.legal_basis == audit_pb2.LEGAL_BASIS_CONSENT
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await audit.stub.CreateProcessingActivity(
            audit_pb2.CreateProcessingActivityRequest(
                processing_activity=audit_pb2.ProcessingActivity(
                    activity_name="Newsletter", purpose="again", legal_basis=audit_pb2.LEGAL_BASIS_CONTRACT
                )
            ),
            metadata=audit.meta(tenant),
        )
    assert caught.value.code() is grpc.StatusCode.ALREADY_EXISTS
    lead = str(uuid.uuid4())
    consent = await audit.stub.RecordConsent(
        audit_pb2.RecordConsentRequest(
            consent_record=audit_pb2.ConsentRecord(lead_id=lead, consent_type="calls", consent_given=True)
        ),
        metadata=audit.meta(tenant),
    )
    withdrawn = await audit.stub.WithdrawConsent(
        audit_pb2.WithdrawConsentRequest(id=consent.id, withdrawal_method="phone"),
        metadata=audit.meta(tenant),
    )
    assert withdrawn.HasField("withdraw_time") and withdrawn.withdrawal_method == "phone"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await audit.stub.WithdrawConsent(
            audit_pb2.WithdrawConsentRequest(id=consent.id), metadata=audit.meta(tenant)
        )
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await audit.stub.WithdrawConsent(
            audit_pb2.WithdrawConsentRequest(id=consent.id), metadata=audit.meta(new_tenant())
        )
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    await audit.eventually(
        lambda: audit.admin_sql("SELECT 1 FROM fake_owner.contacts WHERE tenant_id = $1", uuid.UUID(tenant)),
        lambda rows: len(rows) == 2,
    )
    report = await audit.stub.GetGdprReport(audit_pb2.GetGdprReportRequest(), metadata=audit.meta(tenant))
    (only,) = report.activities
    assert only.processing_activity.activity_name == "Newsletter"
    assert [(c.table_name, c.count) for c in only.table_counts] == [
        ("contacts", 2)
    ] and only.record_count == 2
    assert (
        report.withdrawn_consents == 1 and report.active_consents == 0 and list(report.uncounted_tables) == []
    )
    listed = await audit.stub.ListProcessingActivities(
        audit_pb2.ListProcessingActivitiesRequest(), metadata=audit.meta(tenant)
    )
    assert [a.activity_name for a in listed.processing_activities] == ["Newsletter"]


async def test_archiving_moves_whole_old_partitions_and_queries_can_include_them(audit: AuditHarness) -> None:
    tenant = new_tenant()
    owner = (await audit.admin_sql("SELECT tableowner FROM pg_tables WHERE tablename = 'audit_chain_heads'"))[
        0
    ][0]
    # A month of its own: the shared stream may replay old-dated events of earlier runs, which
    # sit in the default partition, and a partition cannot be created over rows it would own.
    while True:
        month = dt.datetime(random.randint(1990, 2020), random.randint(1, 12), 1, tzinfo=dt.UTC)
        month_end = (month + dt.timedelta(days=32)).replace(day=1)
        clash = await audit.admin_sql(
            "SELECT 1 FROM audit.audit_logs WHERE changed_at >= $1 AND changed_at < $2 LIMIT 1",
            month,
            month_end,
        )
        if not clash:
            break
    partition = f"audit_logs_{month:%Y_%m}"
    await audit.admin_script(
        f"SET ROLE {owner}; CREATE TABLE audit.{partition} PARTITION OF audit.audit_logs "
        f"FOR VALUES FROM ('{month:%Y-%m-%d}') TO ('{month_end:%Y-%m-%d}'); "
        + "; ".join(rls_statements("audit", partition))
    )
    old_time = timestamp_pb2.Timestamp()
    old_time.FromDatetime(month + dt.timedelta(days=14))
    record = str(uuid.uuid4())
    old_event = events_pb2.ChangeEvent(
        event_id=str(uuid.uuid4()),
        tenant_id=tenant,
        service="core_entity",
        table_name="contacts",
        record_id=record,
        operation=common_pb2.OPERATION_INSERT,
        new_values_json='{"email": "old@example.com"}',
        record_version=1,
        occur_time=old_time,
    )
    await audit.js.publish(f"crm.events.{tenant}.core_entity.contacts.INSERT", old_event.SerializeToString())
    await wait_logs(audit, tenant, 1)
    await audit.fake.create(tenant, email="new@example.com")
    await wait_logs(audit, tenant, 2)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await audit.stub.ArchiveAuditLogs(audit_pb2.ArchiveAuditLogsRequest(), metadata=audit.meta(tenant))
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await audit.stub.ArchiveAuditLogs(
            audit_pb2.ArchiveAuditLogsRequest(before=stamp(dt.datetime.now(dt.UTC) + dt.timedelta(days=3))),
            metadata=audit.meta(None, platform=True),
        )
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    archived = await audit.stub.ArchiveAuditLogs(
        audit_pb2.ArchiveAuditLogsRequest(before=stamp(month_end)),
        metadata=audit.meta(None, platform=True),
    )
    assert [p.name for p in archived.partitions] == [partition]
    assert archived.partitions[0].row_count >= 1
    live = await logs(audit, tenant)
    assert [e.record_id for e in live if e.record_id == record] == []
    with_archive = await logs(audit, tenant, include_archive=True)
    assert record in {e.record_id for e in with_archive} and len(with_archive) == 2
    assert (await verify(audit, tenant)).valid
    full = await verify(audit, tenant, include_archive=True)
    assert full.valid and full.entries_checked == 2
    history = await audit.stub.GetRecordHistory(
        audit_pb2.GetRecordHistoryRequest(table_name="contacts", record_id=record, include_archive=True),
        metadata=audit.meta(tenant),
    )
    assert len(history.entries) == 1
    # Nothing older is left: a second run archives nothing.
    again = await audit.stub.ArchiveAuditLogs(
        audit_pb2.ArchiveAuditLogsRequest(before=stamp(month_end)),
        metadata=audit.meta(None, platform=True),
    )
    assert list(again.partitions) == []


async def test_every_audit_table_and_partition_forces_row_level_security(audit: AuditHarness) -> None:
    rows = await audit.admin_sql(
        """SELECT n.nspname AS schema, c.relname AS table, c.relrowsecurity, c.relforcerowsecurity
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'tenant_id' AND NOT a.attisdropped
           WHERE c.relkind IN ('r', 'p') AND n.nspname IN ('audit', 'audit_archive')"""
    )
    names = {row["table"] for row in rows}
    assert {"auth_audit_logs", "api_audit_logs_default", "record_versions", "consent_records"} <= names
    assert any(name.startswith("api_audit_logs_2") for name in names)
    for row in rows:
        assert row["relrowsecurity"] and row["relforcerowsecurity"], f"{row['schema']}.{row['table']}"


async def test_the_retention_scheduler_finds_tenants_without_seeing_their_policies(
    audit: AuditHarness,
) -> None:
    import asyncpg

    from shared.db import asyncpg_dsn

    tenant = new_tenant()
    await audit.stub.CreateRetentionPolicy(
        audit_pb2.CreateRetentionPolicyRequest(
            retention_policy=audit_pb2.RetentionPolicy(
                policy_name="leads",
                table_name="leads",
                retention_period=duration_pb2.Duration(seconds=400 * 86400),
                deletion_method=audit_pb2.DELETION_METHOD_ANONYMIZE,
            )
        ),
        metadata=audit.meta(tenant),
    )
    conn = await asyncpg.connect(asyncpg_dsn(audit.app_dsn))
    try:
        tenants = {str(r[0]) for r in await conn.fetch("SELECT * FROM audit.tenants_with_active_retention()")}
        assert tenant in tenants
        # The app role with no tenant selected still reads no policy rows.
        assert await conn.fetchval("SELECT count(*) FROM audit.data_retention_policies") == 0
    finally:
        await conn.close()


async def test_sensitive_field_marks_are_per_tenant_and_checked(audit: AuditHarness) -> None:
    tenant, other = new_tenant(), new_tenant()
    mark = audit_pb2.CreateSensitiveFieldRequest(
        sensitive_field=audit_pb2.SensitiveField(table_name="*", field_name="salary")
    )
    await audit.stub.CreateSensitiveField(mark, metadata=audit.meta(tenant))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await audit.stub.CreateSensitiveField(mark, metadata=audit.meta(tenant))
    assert caught.value.code() is grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await audit.stub.CreateSensitiveField(
            audit_pb2.CreateSensitiveFieldRequest(
                sensitive_field=audit_pb2.SensitiveField(table_name="DROP TABLE", field_name="")
            ),
            metadata=audit.meta(tenant),
        )
    assert set(violations(caught.value)) == {"sensitive_field.table_name", "sensitive_field.field_name"}
    listed = await audit.stub.ListSensitiveFields(
        audit_pb2.ListSensitiveFieldsRequest(), metadata=audit.meta(tenant)
    )
    assert [(f.table_name, f.field_name) for f in listed.sensitive_fields] == [("*", "salary")]
    theirs = await audit.stub.ListSensitiveFields(
        audit_pb2.ListSensitiveFieldsRequest(), metadata=audit.meta(other)
    )
    assert list(theirs.sensitive_fields) == []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await audit.stub.DeleteSensitiveField(
            audit_pb2.DeleteSensitiveFieldRequest(table_name="*", field_name="salary"),
            metadata=audit.meta(other),
        )
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    await audit.stub.DeleteSensitiveField(
        audit_pb2.DeleteSensitiveFieldRequest(table_name="*", field_name="salary"),
        metadata=audit.meta(tenant),
    )


async def test_the_scheduled_retention_runs_each_tenants_policies_as_that_tenant(audit: AuditHarness) -> None:
    import asyncpg

    from services.audit.adapters.owners import Owners
    from services.audit.service_layer.operations import run_scheduled_retention
    from shared.db import asyncpg_dsn
    from tests.integration.test_audit_support import TOKEN

    tenants = [new_tenant(), new_tenant()]
    records = []
    for tenant in tenants:
        record = await audit.fake.create(tenant, email=f"{tenant[:8]}@example.com")
        await audit.fake.set_updated_at(tenant, record, dt.datetime.now(dt.UTC) - dt.timedelta(days=90))
        records.append(record)
        await audit.stub.CreateRetentionPolicy(
            audit_pb2.CreateRetentionPolicyRequest(
                retention_policy=audit_pb2.RetentionPolicy(
                    policy_name="quarterly",
                    table_name="contacts",
                    retention_period=duration_pb2.Duration(seconds=60 * 86400),
                    deletion_method=audit_pb2.DELETION_METHOD_HARD_DELETE,
                )
            ),
            metadata=audit.meta(tenant),
        )
    pool = await asyncpg.create_pool(asyncpg_dsn(audit.app_dsn), min_size=1, max_size=2)
    owners = Owners(audit.fake.address, TOKEN, 10)
    try:
        assert await run_scheduled_retention(pool, owners) >= 2
    finally:
        await owners.close()
        await pool.close()
    for tenant, record in zip(tenants, records, strict=True):
        left = await audit.admin_sql("SELECT 1 FROM fake_owner.contacts WHERE id = $1", uuid.UUID(record))
        assert left == []
        deletions = await audit.stub.ListDeletionLogs(
            audit_pb2.ListDeletionLogsRequest(), metadata=audit.meta(tenant)
        )
        assert [d.record_id for d in deletions.deletion_logs] == [record]


async def test_value_digests_survive_postgresql_jsonb_for_any_json(audit: AuditHarness) -> None:
    """The chain hashes what ingest stored and verification reads back from jsonb; whatever
    jsonb normalises (number forms, key order, whitespace, duplicate keys) must not change it."""
    import asyncpg
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from services.audit.domain import rules
    from shared.db import asyncpg_dsn

    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(10**30), max_value=10**30)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(
            alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=20
        )
    )
    documents = st.dictionaries(
        st.text(max_size=8).filter(lambda k: "\x00" not in k),
        st.recursive(
            scalars,
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(max_size=5).filter(lambda k: "\x00" not in k), inner, max_size=3)
            ),
            max_leaves=10,
        ),
        max_size=6,
    )
    samples: list[dict[str, Any]] = []

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(documents)
    def collect(document: dict[str, Any]) -> None:
        samples.append(document)

    collect()
    conn = await asyncpg.connect(asyncpg_dsn(audit.owner_dsn))
    try:
        for document in samples:
            stored = json.dumps(document, sort_keys=True, separators=(",", ":"))
            returned = await conn.fetchval("SELECT $1::jsonb::text", stored)
            assert rules.values_digest(rules.parse_json(returned)) == rules.values_digest(
                rules.parse_json(stored)
            ), (stored, returned)
    finally:
        await conn.close()
