"""The audit trail through the gateway: versions, history, the hash chain and tenant scoping
on the real suite; and with a suite of its own, the chain and versions stay whole (every change
once, chain valid) when the audit service or NATS is killed while writes go on."""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cli.stack import Stack
from crm.v1 import audit_pb2, audit_pb2_grpc, common_pb2
from tests.backends import Backends
from tests.conftest import bearer, create_tenant, unique_prefix
from tests.e2e.test_thin_slice import field_violations, wait_for_audit

pytestmark = pytest.mark.e2e


ONBOARDING_TABLES = {"tenants", "users", "api_keys"}


async def onboarding_entries(
    channel: grpc.aio.Channel, api_key: str, timeout: float = 40
) -> list[audit_pb2.AuditLog]:
    """The tenant's entries once onboarding's own writes (not only the shard's) have arrived."""
    deadline = asyncio.get_running_loop().time() + timeout
    entries: list[audit_pb2.AuditLog] = []
    while asyncio.get_running_loop().time() < deadline:
        entries = await wait_for_audit(channel, api_key, 3, timeout=timeout)
        if ONBOARDING_TABLES <= {e.table_name for e in entries}:
            return entries
        await asyncio.sleep(0.3)
    raise AssertionError(f"onboarding entries missing; saw {sorted({e.table_name for e in entries})}")


async def chain_of(channel: grpc.aio.Channel, api_key: str) -> audit_pb2.VerifyAuditChainResponse:
    return await audit_pb2_grpc.AuditServiceStub(channel).VerifyAuditChain(  # type: ignore[no-any-return]
        audit_pb2.VerifyAuditChainRequest(), metadata=bearer(api_key), timeout=10
    )


async def test_a_new_tenant_has_versions_history_and_a_valid_chain(
    suite: Stack, gateway: grpc.aio.Channel
) -> None:
    created = await create_tenant(gateway, suite.platform_admin_key)
    entries = await onboarding_entries(gateway, created.api_key)
    stub = audit_pb2_grpc.AuditServiceStub(gateway)
    key = bearer(created.api_key)
    report = await chain_of(gateway, created.api_key)
    # Onboarding writes at least the tenant, its admin and its key (the tenant service may add
    # more); every one of them is chained.
    assert report.valid and report.entries_checked == report.head_sequence >= len(entries) >= 3
    versions = await stub.ListRecordVersions(
        audit_pb2.ListRecordVersionsRequest(table_name="tenants", record_id=created.tenant.id), metadata=key
    )
    assert len(versions.record_versions) == 1 and versions.record_versions[0].is_current
    assert versions.record_versions[0].operation == common_pb2.OPERATION_INSERT
    history = await stub.GetRecordHistory(
        audit_pb2.GetRecordHistoryRequest(table_name="tenants", record_id=created.tenant.id), metadata=key
    )
    assert [e.audit_log.event_id for e in history.entries] == [
        e.event_id for e in entries if e.table_name == "tenants"
    ]
    user_id = next(e.record_id for e in entries if e.table_name == "users")
    assert user_id
    # Tenant scoping: another tenant sees none of it.
    other = await create_tenant(gateway, suite.platform_admin_key)
    foreign = await stub.ListRecordVersions(
        audit_pb2.ListRecordVersionsRequest(table_name="tenants", record_id=created.tenant.id),
        metadata=bearer(other.api_key),
    )
    assert list(foreign.record_versions) == []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetRecordVersion(
            audit_pb2.GetRecordVersionRequest(
                table_name="tenants", record_id=created.tenant.id, version_number=1
            ),
            metadata=bearer(other.api_key),
        )
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND


async def test_bad_audit_requests_through_the_gateway_name_their_fields(
    suite: Stack, gateway: grpc.aio.Channel
) -> None:
    created = await create_tenant(gateway, suite.platform_admin_key)
    stub = audit_pb2_grpc.AuditServiceStub(gateway)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetRecordHistory(
            audit_pb2.GetRecordHistoryRequest(table_name="", record_id="not-a-uuid"),
            metadata=bearer(created.api_key),
        )
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(caught.value)) == {"table_name", "record_id"}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RecordConsent(
            audit_pb2.RecordConsentRequest(consent_record=audit_pb2.ConsentRecord(consent_type="email")),
            metadata=bearer(created.api_key),
        )
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "consent_record.contact_id" in field_violations(caught.value)


async def test_compliance_registers_through_the_gateway(suite: Stack, gateway: grpc.aio.Channel) -> None:
    created = await create_tenant(gateway, suite.platform_admin_key)
    stub = audit_pb2_grpc.AuditServiceStub(gateway)
    key = bearer(created.api_key)
    contact = str(uuid.uuid4())
    consent = await stub.RecordConsent(
        audit_pb2.RecordConsentRequest(
            consent_record=audit_pb2.ConsentRecord(
                contact_id=contact, consent_type="newsletter", consent_given=True
            )
        ),
        metadata=key,
    )
    await stub.WithdrawConsent(audit_pb2.WithdrawConsentRequest(id=consent.id), metadata=key)
    listed = await stub.ListConsents(audit_pb2.ListConsentsRequest(contact_id=contact), metadata=key)
    assert [c.id for c in listed.consent_records] == [consent.id]
    assert listed.consent_records[0].HasField("withdraw_time")
    other = await create_tenant(gateway, suite.platform_admin_key)
    assert (
        list(
            (
                await stub.ListConsents(audit_pb2.ListConsentsRequest(), metadata=bearer(other.api_key))
            ).consent_records
        )
        == []
    )


@pytest.fixture(scope="module")
def audit_chaos_suite(backends: Backends) -> Iterator[Stack]:
    """A suite with a NATS of its own, so the test may kill the broker without disturbing others."""
    stack = Stack(
        home=Path(tempfile.mkdtemp(prefix="crm-audit-chaos-")),
        database_url=backends.database_url,
        nats_url=None,
        prefix=unique_prefix(),
        shards=1,
        gateway_port=0,
        log_level="warning",
    )
    stack.start()
    yield stack
    stack.stop()


async def test_the_chain_and_versions_stay_whole_through_audit_and_nats_outages(
    audit_chaos_suite: Stack,
) -> None:
    stack = audit_chaos_suite
    assert stack.nats is not None
    async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
        stack.services["audit"].kill()
        created = [await create_tenant(channel, stack.platform_admin_key) for _ in range(2)]
        stack.services["audit"].start()
        stack.wait_healthy(["audit"])
        stack.nats.kill()
        try:
            created += [await create_tenant(channel, stack.platform_admin_key) for _ in range(2)]
            await asyncio.sleep(1.0)
        finally:
            stack.nats.start()
        for tenant in created:
            entries = await onboarding_entries(channel, tenant.api_key)
            assert len({e.event_id for e in entries}) == len(entries)
            report = await chain_of(channel, tenant.api_key)
            assert report.valid and report.entries_checked == report.head_sequence >= len(entries), report
            versions = await audit_pb2_grpc.AuditServiceStub(channel).ListRecordVersions(
                audit_pb2.ListRecordVersionsRequest(table_name="tenants", record_id=tenant.tenant.id),
                metadata=bearer(tenant.api_key),
            )
            assert [v.version_number for v in versions.record_versions] == [1]


async def test_contact_history_restore_and_erasure_through_the_real_owner(
    suite: Stack, gateway: grpc.aio.Channel
) -> None:
    """Field history and versions of a real contact, restored and erased by core-entity's
    DataAdminService. Needs the audit service to know the tenant service's address."""
    if "CRM_TENANT_ADDRESS" not in suite.services["audit"].env:
        pytest.skip("cli/stack.py does not pass CRM_TENANT_ADDRESS to the audit service yet")
    from google.protobuf import field_mask_pb2

    from crm.v1 import core_entity_pb2, core_entity_pb2_grpc

    created = await create_tenant(gateway, suite.platform_admin_key)
    key = bearer(created.api_key)
    contacts = core_entity_pb2_grpc.ContactServiceStub(gateway)
    email = f"erin-{uuid.uuid4().hex[:8]}@example.com"
    contact = await contacts.CreateContact(
        core_entity_pb2.CreateContactRequest(
            contact=core_entity_pb2.Contact(first_name="Erin", last_name="Original", email=email)
        ),
        metadata=key,
        timeout=30,
    )
    changed = core_entity_pb2.Contact(id=contact.id, last_name="Changed", etag=contact.etag)
    await contacts.UpdateContact(
        core_entity_pb2.UpdateContactRequest(
            contact=changed, update_mask=field_mask_pb2.FieldMask(paths=["last_name"])
        ),
        metadata=key,
        timeout=30,
    )
    stub = audit_pb2_grpc.AuditServiceStub(gateway)
    await wait_for_audit(gateway, created.api_key, 2, record_id=contact.id)
    history = await stub.GetRecordHistory(
        audit_pb2.GetRecordHistoryRequest(table_name="contacts", record_id=contact.id), metadata=key
    )
    update = history.entries[-1]
    change = next(c for c in update.field_changes if c.field_name == "last_name")
    assert (change.old_value, change.new_value) == ("Original", "Changed")
    restored = await stub.RestoreRecordVersion(
        audit_pb2.RestoreRecordVersionRequest(table_name="contacts", record_id=contact.id, version_number=1),
        metadata=key,
        timeout=30,
    )
    assert restored.new_version == 3
    again = await contacts.GetContact(core_entity_pb2.GetContactRequest(id=contact.id), metadata=key)
    assert again.last_name == "Original"
    restores = await wait_for_audit(
        gateway,
        created.api_key,
        1,
        record_id=contact.id,
        operation=common_pb2.OPERATION_RESTORE,  # type: ignore[arg-type]
    )
    assert restores[0].record_version == 3
    erased = await stub.EraseDataSubject(
        audit_pb2.EraseDataSubjectRequest(email=email, reason="test"), metadata=key, timeout=60
    )
    assert ("contacts", 1) in {(c.table_name, c.count) for c in erased.counts}
    await asyncio.sleep(2.0)  # the owner's change events for the erasure arrive meanwhile
    await stub.EraseDataSubject(
        audit_pb2.EraseDataSubjectRequest(contact_id=contact.id, reason="test"), metadata=key, timeout=60
    )
    everything = await stub.ListAuditLogs(
        audit_pb2.ListAuditLogsRequest(page_size=1000, record_id=contact.id), metadata=key
    )
    assert all(email not in e.old_values_json + e.new_values_json for e in everything.audit_logs)
    assert (await chain_of(gateway, created.api_key)).valid


async def test_sign_in_failures_and_api_calls_reach_their_audit_logs(
    suite: Stack, gateway: grpc.aio.Channel
) -> None:
    from crm.v1 import tenant_pb2, tenant_pb2_grpc

    created = await create_tenant(gateway, suite.platform_admin_key)
    tenants = tenant_pb2_grpc.TenantServiceStub(gateway)
    with pytest.raises(grpc.aio.AioRpcError):
        await tenants.Authenticate(
            tenant_pb2.AuthenticateRequest(
                subdomain=created.tenant.subdomain, email="admin@example.com", password="Wr0ngPassword"
            ),
            timeout=10,
        )
    await tenants.Authenticate(
        tenant_pb2.AuthenticateRequest(
            subdomain=created.tenant.subdomain, email="admin@example.com", password="Sup3rSecret"
        ),
        timeout=10,
    )
    stub = audit_pb2_grpc.AuditServiceStub(gateway)
    key = bearer(created.api_key)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.ListAuditLogs(audit_pb2.ListAuditLogsRequest(record_id="bad"), metadata=key)

    async def settled(method: str, request: object, attribute: str, count: int) -> list[object]:
        deadline = asyncio.get_running_loop().time() + 30
        found: list[object] = []
        while asyncio.get_running_loop().time() < deadline:
            found = list(getattr(await getattr(stub, method)(request, metadata=key), attribute))
            if len(found) >= count:
                return found
            await asyncio.sleep(0.3)
        raise AssertionError(f"{method}: expected {count}, saw {len(found)}")

    failures = await settled(
        "ListAuthEvents", audit_pb2.ListAuthEventsRequest(failures_only=True), "auth_events", 1
    )
    assert all(not e.success for e in failures)  # type: ignore[attr-defined]
    assert "Wr0ngPassword" not in str(failures)
    everything = await settled("ListAuthEvents", audit_pb2.ListAuthEventsRequest(), "auth_events", 2)
    assert any(e.success for e in everything)  # type: ignore[attr-defined]
    errors = await settled("ListApiCalls", audit_pb2.ListApiCallsRequest(errors_only=True), "api_calls", 1)
    bad = [e for e in errors if e.endpoint == "/crm.v1.AuditService/ListAuditLogs"]  # type: ignore[attr-defined]
    assert bad and bad[0].status_code == "INVALID_ARGUMENT" and bad[0].response_status == 400  # type: ignore[attr-defined]
    # Another tenant sees none of it.
    other = await create_tenant(gateway, suite.platform_admin_key)
    theirs = await stub.ListAuthEvents(
        audit_pb2.ListAuthEventsRequest(failures_only=True), metadata=bearer(other.api_key)
    )
    assert list(theirs.auth_events) == []
    their_calls = await stub.ListApiCalls(
        audit_pb2.ListApiCallsRequest(errors_only=True), metadata=bearer(other.api_key)
    )
    assert list(their_calls.api_calls) == []


async def test_a_row_altered_in_the_database_is_reported_by_verify(
    suite: Stack, gateway: grpc.aio.Channel
) -> None:
    from urllib.parse import urlsplit, urlunsplit

    import asyncpg

    from shared.db import asyncpg_dsn

    created = await create_tenant(gateway, suite.platform_admin_key)
    entries = await onboarding_entries(gateway, created.api_key)
    assert (await chain_of(gateway, created.api_key)).valid
    target = next(e for e in entries if e.table_name == "users")
    # As the server's superuser on the suite's audit database: what an intruder with SQL could do.
    parts = urlsplit(asyncpg_dsn(suite.admin_dsn))
    conn = await asyncpg.connect(
        urlunsplit((parts.scheme, parts.netloc, f"/{suite.database('audit')}", parts.query, ""))
    )
    try:
        await conn.execute(
            "UPDATE audit.audit_logs SET user_email = 'someone-else@example.com' WHERE id = $1",
            uuid.UUID(target.id),
        )
    finally:
        await conn.close()
    report = await chain_of(gateway, created.api_key)
    assert not report.valid
    assert report.first_broken_entry_id == target.id
    assert report.reason == "content does not match its hash"
