# ruff: noqa: F811  (fixtures are imported from test_core_support, then used as arguments)
"""Lead conversion (and its atomicity), change events through the outbox, lists with filters,
order and pages, and custom fields against the tenant's definitions."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import grpc
import nats
import pytest
from google.protobuf import field_mask_pb2
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from crm.v1 import common_pb2, events_pb2
from crm.v1 import core_entity_pb2 as pb
from shared import events
from shared.db import asyncpg_dsn
from shared.fieldtypes import FieldDefinition, PicklistOption
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
INVALID = grpc.StatusCode.INVALID_ARGUMENT


async def count_rows(core: CoreService, tenant_id: str, table: str) -> int:
    # The owner connection with the tenant set: RLS is forced, so it sees only that tenant.
    conn = await asyncpg.connect(asyncpg_dsn(core.owner_dsn))
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.current_tenant_id', $1, true)", tenant_id)
            return int(await conn.fetchval(f"SELECT count(*) FROM core.{table}"))
    finally:
        await conn.close()


# --- ConvertLead ------------------------------------------------------------------------------


async def test_convert_lead_creates_contact_account_and_deal(tenant: Tenant) -> None:
    pipeline = await tenant.pipeline()
    lead = await tenant.lead(company="Initech", email="peter@initech.example", industry="Software")
    result = await tenant.call(
        tenant.leads,
        "ConvertLead",
        pb.ConvertLeadRequest(id=lead.id, create_deal=True, deal=pb.Deal(amount="5000")),
    )
    assert result.account.name == "Initech" and result.account.industry == "Software"
    assert result.contact.email == "peter@initech.example" and result.contact.account_id == result.account.id
    assert result.deal.stage_id == pipeline.stages[0].id and result.deal.amount == "5000.00"
    assert result.deal.contact_id == result.contact.id and result.deal.name == "Initech deal"
    converted = result.lead
    assert converted.converted and converted.lead_status == "converted"
    assert converted.converted_contact_id == result.contact.id
    assert converted.converted_account_id == result.account.id
    assert converted.converted_deal_id == result.deal.id
    assert converted.HasField("converted_time")
    error = await fails(
        grpc.StatusCode.FAILED_PRECONDITION,
        tenant.call(tenant.leads, "ConvertLead", pb.ConvertLeadRequest(id=lead.id)),
    )
    assert violations(error) == {"id": "LEAD_ALREADY_CONVERTED"}


async def test_convert_into_existing_account(tenant: Tenant, other_tenant: Tenant) -> None:
    account = await tenant.account(name="Existing")
    lead = await tenant.lead()
    theirs = await other_tenant.account()
    await fails(
        grpc.StatusCode.NOT_FOUND,
        tenant.call(tenant.leads, "ConvertLead", pb.ConvertLeadRequest(id=lead.id, account_id=theirs.id)),
    )
    result = await tenant.call(
        tenant.leads, "ConvertLead", pb.ConvertLeadRequest(id=lead.id, account_id=account.id)
    )
    assert result.account.id == account.id and not result.HasField("deal")


async def test_failed_conversion_leaves_nothing_behind(core_service: CoreService, tenant: Tenant) -> None:
    # No default pipeline: the deal fails after the account and contact were written.
    lead = await tenant.lead(company="Halfway Ltd")
    await fails(
        grpc.StatusCode.FAILED_PRECONDITION,
        tenant.call(tenant.leads, "ConvertLead", pb.ConvertLeadRequest(id=lead.id, create_deal=True)),
    )
    # A duplicate e-mail fails the contact after the account was written.
    await tenant.contact(email="dup@example.com")
    dup_lead = await tenant.lead(email="dup@example.com")
    await fails(
        grpc.StatusCode.ALREADY_EXISTS,
        tenant.call(tenant.leads, "ConvertLead", pb.ConvertLeadRequest(id=dup_lead.id)),
    )
    for lead_id in (lead.id, dup_lead.id):
        again = await tenant.call(tenant.leads, "GetLead", pb.GetLeadRequest(id=lead_id))
        assert not again.converted and again.lead_status == "new" and again.etag == 'W/"1"'
    assert await count_rows(core_service, tenant.id, "accounts") == 0
    assert await count_rows(core_service, tenant.id, "contacts") == 1
    assert await count_rows(core_service, tenant.id, "deals") == 0


async def test_convert_reports_bad_account_fields(tenant: Tenant) -> None:
    lead = await tenant.lead()
    error = await fails(
        INVALID,
        tenant.call(
            tenant.leads,
            "ConvertLead",
            pb.ConvertLeadRequest(id=lead.id, account=pb.Account(website="nope", annual_revenue="-1")),
        ),
    )
    assert {"account.website", "account.annual_revenue"} <= set(violations(error))


# --- change events ----------------------------------------------------------------------------


async def fetch_events(nats_url: str, subject: str, expected: int) -> list[events_pb2.ChangeEvent]:
    client = await nats.connect(nats_url)
    try:
        sub = await client.jetstream().pull_subscribe(
            subject,
            stream=events.STREAM_NAME,
            config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL),
        )
        found: list[events_pb2.ChangeEvent] = []
        deadline = asyncio.get_running_loop().time() + 15
        while len(found) < expected and asyncio.get_running_loop().time() < deadline:
            try:
                found += [
                    events_pb2.ChangeEvent.FromString(m.data) for m in await sub.fetch(100, timeout=0.5)
                ]
            except nats.errors.TimeoutError:
                pass
        await sub.unsubscribe()
        return found
    finally:
        await client.close()


async def test_every_change_publishes_old_and_new_values(backends: Backends, tenant: Tenant) -> None:
    account = await tenant.account(name="Evented")
    account.name = "Renamed"
    await tenant.accounts.UpdateAccount(
        pb.UpdateAccountRequest(account=account, update_mask=field_mask_pb2.FieldMask(paths=["name"])),
        metadata=(*tenant.metadata, ("x-crm-request-id", "req-core-1")),
    )
    await tenant.call(tenant.accounts, "DeleteAccount", pb.DeleteAccountRequest(id=account.id))
    found = await fetch_events(backends.nats_url, f"crm.events.{tenant.id}.core_entity.accounts.>", 3)
    by_op = {common_pb2.Operation.Name(e.operation): e for e in found}
    assert set(by_op) == {"OPERATION_INSERT", "OPERATION_UPDATE", "OPERATION_DELETE"}
    update = by_op["OPERATION_UPDATE"]
    assert json.loads(update.old_values_json)["name"] == "Evented"
    assert json.loads(update.new_values_json)["name"] == "Renamed"
    assert "name" in update.changed_fields and update.record_version == 2
    assert update.actor.user_id == tenant.user_id and update.request_id == "req-core-1"
    assert update.api_endpoint == "/crm.v1.AccountService/UpdateAccount"
    deleted = by_op["OPERATION_DELETE"]
    assert deleted.new_values_json == "" and deleted.record_version == 3
    assert json.loads(deleted.old_values_json)["name"] == "Renamed"


# --- lists ------------------------------------------------------------------------------------


async def test_filter_order_and_pages(tenant: Tenant) -> None:
    for i in range(7):
        await tenant.account(
            name=f"Company {i}", account_type="customer" if i % 2 else "prospect", annual_revenue=str(i * 10)
        )
    request = pb.ListAccountsRequest(filter='account_type = "customer"', order_by="name desc", page_size=2)
    seen: list[str] = []
    while True:
        page = await tenant.call(tenant.accounts, "ListAccounts", request)
        assert page.total_size == 3
        seen += [a.name for a in page.accounts]
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    assert seen == ["Company 5", "Company 3", "Company 1"]
    page = await tenant.call(
        tenant.accounts, "ListAccounts", pb.ListAccountsRequest(filter='name : "company 6"')
    )
    assert [a.name for a in page.accounts] == ["Company 6"]


async def test_page_token_is_bound_to_its_query_and_stable_under_inserts(tenant: Tenant) -> None:
    for i in range(4):
        await tenant.account(name=f"Stable {i}")
    first = await tenant.call(
        tenant.accounts, "ListAccounts", pb.ListAccountsRequest(page_size=2, order_by="name")
    )
    await tenant.account(name="Stable 0a")  # sorts into the first page, after it was served
    second = await tenant.call(
        tenant.accounts,
        "ListAccounts",
        pb.ListAccountsRequest(page_size=2, order_by="name", page_token=first.next_page_token),
    )
    assert [a.name for a in second.accounts] == ["Stable 2", "Stable 3"]
    error = await fails(
        INVALID,
        tenant.call(
            tenant.accounts,
            "ListAccounts",
            pb.ListAccountsRequest(page_size=2, order_by="name desc", page_token=first.next_page_token),
        ),
    )
    assert "page_token" in violations(error)


@pytest.mark.parametrize(
    ("filter_text", "order_by"),
    [
        ("name = 'x' OR 1=1; DROP TABLE core.accounts --", ""),
        ("description = 'x'", ""),  # not indexed, not filterable
        ("tenant_id = '00000000-0000-0000-0000-000000000000'", ""),
        ("annual_revenue > 'lots'", ""),
        ('account_type = "friend"', ""),
        ('name = "x") UNION SELECT * FROM core.accounts --', ""),
        ("", "name; DROP TABLE core.accounts"),
        ("", "description"),
        ("", "name sideways"),
    ],
)
async def test_bad_filters_are_invalid_argument(tenant: Tenant, filter_text: str, order_by: str) -> None:
    error = await fails(
        INVALID,
        tenant.call(
            tenant.accounts, "ListAccounts", pb.ListAccountsRequest(filter=filter_text, order_by=order_by)
        ),
    )
    assert set(violations(error)) <= {"filter", "order_by"}


async def test_lists_never_show_another_tenant(tenant: Tenant, other_tenant: Tenant) -> None:
    await other_tenant.account(name="Theirs")
    mine = await tenant.account(name="Mine")
    page = await tenant.call(tenant.accounts, "ListAccounts", pb.ListAccountsRequest())
    assert [a.id for a in page.accounts] == [mine.id] and page.total_size == 1


async def test_other_resources_list_with_filters(tenant: Tenant) -> None:
    await tenant.pipeline()
    lead = await tenant.lead(lead_score=80)
    await tenant.lead(lead_score=20)
    hot = await tenant.call(tenant.leads, "ListLeads", pb.ListLeadsRequest(filter="lead_score >= 50"))
    assert [x.id for x in hot.leads] == [lead.id]
    await tenant.deal(amount="10")
    big = await tenant.deal(amount="1000")
    deals = await tenant.call(tenant.deals, "ListDeals", pb.ListDealsRequest(order_by="amount desc"))
    assert deals.deals[0].id == big.id
    pipelines = await tenant.call(
        tenant.pipelines, "ListPipelines", pb.ListPipelinesRequest(filter="is_default = true")
    )
    assert len(pipelines.pipelines) == 1 and len(pipelines.pipelines[0].stages) == 6
    activities = await tenant.call(
        tenant.activities, "ListActivities", pb.ListActivitiesRequest(filter=f'lead_id = "{lead.id}"')
    )
    assert activities.total_size == 0


# --- custom fields ----------------------------------------------------------------------------


def define(core: CoreService, tenant: Tenant, entity: str, *fields: FieldDefinition) -> None:
    core.definitions.fields[(tenant.id, entity)] = list(fields)


async def test_custom_fields_are_checked_defaulted_and_typed(
    core_service: CoreService, tenant: Tenant
) -> None:
    define(
        core_service,
        tenant,
        "account",
        FieldDefinition("budget", "currency", rules={"min_value": "0"}),
        FieldDefinition(
            "tier", "picklist", options=(PicklistOption("gold", is_default=True), PicklistOption("silver"))
        ),
        FieldDefinition("region", "text", required=True),
    )
    created = await tenant.account(
        custom_fields={
            "budget": common_pb2.FieldValue(decimal_value="1500.5"),
            "region": common_pb2.FieldValue(string_value="EMEA"),
        }
    )
    assert created.custom_fields["budget"].decimal_value == "1500.50"
    assert created.custom_fields["tier"].string_value == "gold"
    error = await fails(
        INVALID,
        tenant.account(
            custom_fields={
                "budget": common_pb2.FieldValue(decimal_value="-1"),
                "tier": common_pb2.FieldValue(string_value="bronze"),
                "nope": common_pb2.FieldValue(string_value="x"),
            }
        ),
    )
    assert {
        "account.custom_fields.budget",
        "account.custom_fields.tier",
        "account.custom_fields.nope",
        "account.custom_fields.region",
    } <= set(violations(error))
    # A single key is patched through its own mask path; clearing a required one is refused.
    patch = pb.Account(id=created.id, custom_fields={"budget": common_pb2.FieldValue(decimal_value="99")})
    patched = await tenant.call(
        tenant.accounts,
        "UpdateAccount",
        pb.UpdateAccountRequest(
            account=patch, update_mask=field_mask_pb2.FieldMask(paths=["custom_fields.budget"])
        ),
    )
    assert patched.custom_fields["budget"].decimal_value == "99.00"
    assert patched.custom_fields["region"].string_value == "EMEA"
    error = await fails(
        INVALID,
        tenant.call(
            tenant.accounts,
            "UpdateAccount",
            pb.UpdateAccountRequest(
                account=pb.Account(id=created.id),
                update_mask=field_mask_pb2.FieldMask(paths=["custom_fields.region"]),
            ),
        ),
    )
    assert "account.custom_fields.region" in violations(error)
    # Filters and order compare custom fields by type (numbers, not text).
    await tenant.account(
        custom_fields={
            "budget": common_pb2.FieldValue(decimal_value="200"),
            "region": common_pb2.FieldValue(string_value="APAC"),
        }
    )
    page = await tenant.call(
        tenant.accounts, "ListAccounts", pb.ListAccountsRequest(filter="custom_fields.budget > 100")
    )
    assert [a.custom_fields["budget"].decimal_value for a in page.accounts] == ["200.00"]
    page = await tenant.call(
        tenant.accounts,
        "ListAccounts",
        pb.ListAccountsRequest(order_by="custom_fields.budget desc", page_size=1),
    )
    budgets = [a.custom_fields["budget"].decimal_value for a in page.accounts]
    page = await tenant.call(
        tenant.accounts,
        "ListAccounts",
        pb.ListAccountsRequest(
            order_by="custom_fields.budget desc", page_size=1, page_token=page.next_page_token
        ),
    )
    budgets += [a.custom_fields["budget"].decimal_value for a in page.accounts]
    assert budgets == ["200.00", "99.00"]


async def test_unique_custom_fields(core_service: CoreService, tenant: Tenant) -> None:
    define(core_service, tenant, "contact", FieldDefinition("badge", "text", unique=True))
    first = await tenant.contact(custom_fields={"badge": common_pb2.FieldValue(string_value="B-1")})
    error = await fails(
        grpc.StatusCode.ALREADY_EXISTS,
        tenant.contact(
            first_name="Other", custom_fields={"badge": common_pb2.FieldValue(string_value="B-1")}
        ),
    )
    assert "custom_fields.badge" in (error.details() or "")
    # Updating the holder itself keeps its value.
    first.last_name = "Renamed"
    await tenant.call(
        tenant.contacts,
        "UpdateContact",
        pb.UpdateContactRequest(contact=first, update_mask=field_mask_pb2.FieldMask(paths=["last_name"])),
    )


async def test_definitions_are_cached_and_dropped_on_change_events(
    backends: Backends, core_service: CoreService, tenant: Tenant
) -> None:
    await tenant.account()
    await tenant.account()
    calls = core_service.definitions.calls
    await tenant.account()
    assert core_service.definitions.calls == calls  # served from the cache
    define(core_service, tenant, "account", FieldDefinition("segment", "text", required=True))
    client = await nats.connect(backends.nats_url)
    try:
        event = events_pb2.ControlEvent(
            event_id="e1", kind=events_pb2.CONTROL_EVENT_KIND_CUSTOM_FIELD_CHANGED, tenant_id=tenant.id
        )
        await client.publish(events.control_subject(event.kind), event.SerializeToString())
        await client.flush()
    finally:
        await client.close()
    for _ in range(50):
        try:
            await tenant.account()
        except grpc.aio.AioRpcError as exc:
            assert "account.custom_fields.segment" in violations(exc)
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the new required field was never enforced")


async def test_unknown_custom_fields_are_rejected_without_definitions(tenant: Tenant) -> None:
    error = await fails(INVALID, tenant.contact(custom_fields={"x": common_pb2.FieldValue(int_value=1)}))
    assert "contact.custom_fields.x" in violations(error)
