# ruff: noqa: F811  (fixtures are imported from test_core_support, then used as arguments)
"""Contacts, leads, deals, pipelines and activities through the servicers: every rule with its
bad cases, cross-tenant references, and the stage rules of deals."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2
from google.type import date_pb2

from crm.v1 import core_entity_pb2 as pb
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
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


def stamp(delta: dt.timedelta) -> timestamp_pb2.Timestamp:
    value = timestamp_pb2.Timestamp()
    value.FromDatetime(dt.datetime.now(dt.UTC) + delta)
    return value


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


# --- contacts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "bad"),
    [
        ({"first_name": "   "}, "contact.first_name"),
        ({"last_name": ""}, "contact.last_name"),
        ({"email": "not-an-email"}, "contact.email"),
        ({"email": "a@b"}, "contact.email"),
        ({"phone": "12"}, "contact.phone"),
        ({"mobile": "+1 (555) abc"}, "contact.mobile"),
        ({"contact_status": "dead"}, "contact.contact_status"),
        ({"account_id": "42"}, "contact.account_id"),
    ],
)
async def test_contact_rules(tenant: Tenant, fields: dict[str, object], bad: str) -> None:
    error = await fails(INVALID, tenant.contact(**fields))
    assert bad in violations(error)


async def test_contact_names_are_trimmed_and_phone_formats_accepted(tenant: Tenant) -> None:
    contact = await tenant.contact(
        first_name="  Ada ", phone="+44 20 7946 0958 ext. 12", mobile="(555) 123-4567"
    )
    assert contact.first_name == "Ada"
    assert contact.contact_status == "active"


async def test_contact_email_is_unique_per_tenant_ignoring_case(tenant: Tenant, other_tenant: Tenant) -> None:
    await tenant.contact(email="Ada@Example.com")
    await fails(grpc.StatusCode.ALREADY_EXISTS, tenant.contact(email="ada@example.COM"))
    # Another tenant may use the same address.
    await other_tenant.contact(email="ada@example.com")


async def test_deleted_contact_frees_its_email_and_undelete_then_conflicts(tenant: Tenant) -> None:
    first = await tenant.contact(email="reuse@example.com")
    await tenant.call(tenant.contacts, "DeleteContact", pb.DeleteContactRequest(id=first.id))
    await tenant.contact(email="reuse@example.com")
    await fails(
        grpc.StatusCode.ALREADY_EXISTS,
        tenant.call(tenant.contacts, "UndeleteContact", pb.UndeleteContactRequest(id=first.id)),
    )


async def test_contact_account_of_another_tenant_is_not_found(tenant: Tenant, other_tenant: Tenant) -> None:
    theirs = await other_tenant.account(name="Hidden Inc")
    error = await fails(NOT_FOUND, tenant.contact(account_id=theirs.id))
    assert "Hidden Inc" not in (error.details() or "")


async def test_contact_email_change_checks_uniqueness(tenant: Tenant) -> None:
    await tenant.contact(email="one@example.com")
    other = await tenant.contact(email="two@example.com")
    other.email = "ONE@example.com"
    await fails(
        grpc.StatusCode.ALREADY_EXISTS,
        tenant.call(
            tenant.contacts,
            "UpdateContact",
            pb.UpdateContactRequest(contact=other, update_mask=mask("email")),
        ),
    )


# --- leads ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "bad"),
    [
        ({"first_name": " "}, "lead.first_name"),
        ({"lead_score": 101}, "lead.lead_score"),
        ({"lead_score": -1}, "lead.lead_score"),
        ({"email": "x@y"}, "lead.email"),
        ({"rating": "lukewarm"}, "lead.rating"),
        ({"lead_status": "lost"}, "lead.lead_status"),
        ({"lead_status": "converted"}, "lead.lead_status"),
        ({"website": "www.example.com"}, "lead.website"),
        ({"annual_revenue": "-3"}, "lead.annual_revenue"),
    ],
)
async def test_lead_rules(tenant: Tenant, fields: dict[str, object], bad: str) -> None:
    error = await fails(INVALID, tenant.lead(**fields))
    assert bad in violations(error)


async def test_lead_defaults(tenant: Tenant) -> None:
    lead = await tenant.lead(rating="hot")
    assert (lead.lead_status, lead.lead_score, lead.converted) == ("new", 0, False)


async def test_lead_cannot_be_marked_converted_by_update(tenant: Tenant) -> None:
    lead = await tenant.lead()
    lead.lead_status = "converted"
    error = await fails(
        INVALID,
        tenant.call(
            tenant.leads, "UpdateLead", pb.UpdateLeadRequest(lead=lead, update_mask=mask("lead_status"))
        ),
    )
    assert "lead.lead_status" in violations(error)
    error = await fails(
        INVALID,
        tenant.call(
            tenant.leads, "UpdateLead", pb.UpdateLeadRequest(lead=lead, update_mask=mask("converted"))
        ),
    )
    assert "update_mask" in violations(error)


# --- pipelines and deals ----------------------------------------------------------------------


async def test_pipeline_with_inline_stages(tenant: Tenant) -> None:
    pipeline = await tenant.pipeline()
    assert pipeline.is_default and pipeline.is_active
    assert [s.stage_order for s in pipeline.stages] == [1, 2, 3, 4, 5, 6]
    assert pipeline.stages[4].is_won and pipeline.stages[4].is_closed


async def test_one_default_pipeline_but_many_others(tenant: Tenant) -> None:
    await tenant.pipeline()
    await fails(grpc.StatusCode.ALREADY_EXISTS, tenant.pipeline(name="Second default"))
    await tenant.pipeline(default=False, name="Other 1")
    await tenant.pipeline(default=False, name="Other 2")


@pytest.mark.parametrize(
    ("stage", "bad"),
    [
        (pb.PipelineStage(name="", probability="10"), "pipeline.stages[1].name"),
        (pb.PipelineStage(name="X", probability="101"), "pipeline.stages[1].probability"),
        (pb.PipelineStage(name="X", probability="-1"), "pipeline.stages[1].probability"),
        (pb.PipelineStage(name="X", is_won=True), "pipeline.stages[1].is_won"),
        (pb.PipelineStage(name="A"), "pipeline.stages[1].name"),
        (pb.PipelineStage(name="X", stage_order=1), "pipeline.stages[1].stage_order"),
    ],
)
async def test_stage_rules(tenant: Tenant, stage: pb.PipelineStage, bad: str) -> None:
    request = pb.CreatePipelineRequest(
        pipeline=pb.Pipeline(name="P", stages=[pb.PipelineStage(name="A", stage_order=1), stage])
    )
    error = await fails(INVALID, tenant.call(tenant.pipelines, "CreatePipeline", request))
    assert bad in violations(error)


async def test_stage_calls(tenant: Tenant) -> None:
    pipeline = await tenant.pipeline()
    added = await tenant.call(
        tenant.pipelines,
        "CreatePipelineStage",
        pb.CreatePipelineStageRequest(pipeline_id=pipeline.id, stage=pb.PipelineStage(name="On hold")),
    )
    assert added.stage_order == 7
    await fails(
        grpc.StatusCode.ALREADY_EXISTS,
        tenant.call(
            tenant.pipelines,
            "CreatePipelineStage",
            pb.CreatePipelineStageRequest(pipeline_id=pipeline.id, stage=pb.PipelineStage(name="On hold")),
        ),
    )
    ids = [s.id for s in pipeline.stages] + [added.id]
    reordered = await tenant.call(
        tenant.pipelines,
        "ReorderPipelineStages",
        pb.ReorderPipelineStagesRequest(pipeline_id=pipeline.id, stage_ids=list(reversed(ids))),
    )
    assert [s.id for s in reordered.stages] == list(reversed(ids))
    await fails(
        INVALID,
        tenant.call(
            tenant.pipelines,
            "ReorderPipelineStages",
            pb.ReorderPipelineStagesRequest(pipeline_id=pipeline.id, stage_ids=ids[:-1]),
        ),
    )
    # The reorder bumped every moved stage's version: update with the current etag.
    added = next(s for s in reordered.stages if s.id == added.id)
    added.name = "Paused"
    added.probability = "5"
    renamed = await tenant.call(
        tenant.pipelines,
        "UpdatePipelineStage",
        pb.UpdatePipelineStageRequest(stage=added, update_mask=mask("name", "probability")),
    )
    assert renamed.name == "Paused" and renamed.probability == "5.00"
    removed = await tenant.call(
        tenant.pipelines, "DeletePipelineStage", pb.DeletePipelineStageRequest(id=added.id)
    )
    assert added.id not in [s.id for s in removed.pipeline.stages]


async def test_deal_defaults_to_first_stage_of_default_pipeline(tenant: Tenant) -> None:
    pipeline = await tenant.pipeline()
    deal = await tenant.deal(amount="100.00")
    assert deal.pipeline_id == pipeline.id and deal.stage_id == pipeline.stages[0].id
    assert deal.probability == "10.00" and deal.currency == "USD"
    assert not deal.is_closed


async def test_deal_without_default_pipeline_is_a_precondition(tenant: Tenant) -> None:
    await fails(PRECONDITION, tenant.deal())


@pytest.mark.parametrize(
    ("fields", "bad"),
    [
        ({"name": ""}, "deal.name"),
        ({"amount": "-1"}, "deal.amount"),
        ({"probability": "100.5"}, "deal.probability"),
        ({"currency": "usd"}, "deal.currency"),
        ({"currency": "EUR"}, "deal.currency"),
        ({"deal_type": "upsell"}, "deal.deal_type"),
        ({"is_won": True, "is_closed": False}, "deal.is_won"),
        ({"is_closed": True}, "deal.actual_close_date"),
        ({"expected_close_date": date_pb2.Date(year=2026, month=2, day=30)}, "deal.expected_close_date"),
    ],
)
async def test_deal_rules(tenant: Tenant, fields: dict[str, object], bad: str) -> None:
    await tenant.pipeline()
    error = await fails(INVALID, tenant.deal(**fields))
    assert bad in violations(error)


async def test_supported_currencies(tenant: Tenant) -> None:
    await tenant.pipeline()
    await fails(INVALID, tenant.deal(currency="EUR"))
    reply = await tenant.call(
        tenant.deals,
        "SetSupportedCurrencies",
        pb.SetSupportedCurrenciesRequest(currency_codes=["EUR", "USD"]),
    )
    assert list(reply.currency_codes) == ["EUR", "USD"]
    assert (await tenant.deal(currency="EUR")).currency == "EUR"
    assert (await tenant.deal()).currency == "USD"
    await tenant.call(
        tenant.deals, "SetSupportedCurrencies", pb.SetSupportedCurrenciesRequest(currency_codes=["GBP"])
    )
    assert (await tenant.deal()).currency == "GBP"  # no USD: the tenant's own default
    error = await fails(
        INVALID,
        tenant.call(
            tenant.deals, "SetSupportedCurrencies", pb.SetSupportedCurrenciesRequest(currency_codes=["eu"])
        ),
    )
    assert "currency_codes[0]" in violations(error)


async def test_stage_of_another_pipeline_is_a_precondition(tenant: Tenant) -> None:
    main = await tenant.pipeline()
    other = await tenant.pipeline(default=False, name="Other")
    error = await fails(PRECONDITION, tenant.deal(pipeline_id=main.id, stage_id=other.stages[0].id))
    assert violations(error) == {"deal.stage_id": "STAGE_NOT_IN_PIPELINE"}
    deal = await tenant.deal()
    error = await fails(
        PRECONDITION,
        tenant.call(
            tenant.deals, "MoveDealStage", pb.MoveDealStageRequest(id=deal.id, stage_id=other.stages[1].id)
        ),
    )


async def test_cross_tenant_deal_references_are_not_found(tenant: Tenant, other_tenant: Tenant) -> None:
    await tenant.pipeline()
    theirs = await other_tenant.pipeline()
    their_account = await other_tenant.account()
    their_contact = await other_tenant.contact()
    await fails(NOT_FOUND, tenant.deal(stage_id=theirs.stages[0].id))
    await fails(NOT_FOUND, tenant.deal(pipeline_id=theirs.id))
    await fails(NOT_FOUND, tenant.deal(account_id=their_account.id))
    await fails(NOT_FOUND, tenant.deal(contact_id=their_contact.id))
    deal = await tenant.deal()
    await fails(
        NOT_FOUND,
        tenant.call(
            tenant.deals, "MoveDealStage", pb.MoveDealStageRequest(id=deal.id, stage_id=theirs.stages[1].id)
        ),
    )


async def test_move_deal_stage_follows_the_stage(tenant: Tenant) -> None:
    pipeline = await tenant.pipeline()
    deal = await tenant.deal()
    moved = await tenant.call(
        tenant.deals, "MoveDealStage", pb.MoveDealStageRequest(id=deal.id, stage_id=pipeline.stages[2].id)
    )
    assert (moved.probability, moved.is_closed, moved.is_won) == ("50.00", False, False)
    won = await tenant.call(
        tenant.deals,
        "MoveDealStage",
        pb.MoveDealStageRequest(id=deal.id, stage_id=pipeline.stages[4].id, etag=moved.etag),
    )
    assert (won.probability, won.is_closed, won.is_won) == ("100.00", True, True)
    assert won.actual_close_date.year == dt.datetime.now(dt.UTC).year
    await fails(
        grpc.StatusCode.ABORTED,
        tenant.call(
            tenant.deals,
            "MoveDealStage",
            pb.MoveDealStageRequest(id=deal.id, stage_id=pipeline.stages[0].id, etag=moved.etag),
        ),
    )
    reopened = await tenant.call(
        tenant.deals, "MoveDealStage", pb.MoveDealStageRequest(id=deal.id, stage_id=pipeline.stages[0].id)
    )
    assert not reopened.is_closed and not reopened.HasField("actual_close_date")


async def test_stage_in_use_cannot_be_deleted_and_pipeline_in_use_cannot_be_deleted(tenant: Tenant) -> None:
    pipeline = await tenant.pipeline()
    await tenant.deal()
    await fails(
        PRECONDITION,
        tenant.call(
            tenant.pipelines, "DeletePipelineStage", pb.DeletePipelineStageRequest(id=pipeline.stages[0].id)
        ),
    )
    await fails(
        PRECONDITION,
        tenant.call(tenant.pipelines, "DeletePipeline", pb.DeletePipelineRequest(id=pipeline.id)),
    )


# --- activities -------------------------------------------------------------------------------


async def test_activity_rules(tenant: Tenant) -> None:
    account = await tenant.account()

    async def create(**fields: object) -> pb.Activity:
        base: dict[str, object] = {"subject": "Call", "activity_type": "call", "account_id": account.id}
        base.update(fields)
        return await tenant.call(  # type: ignore[no-any-return]
            tenant.activities, "CreateActivity", pb.CreateActivityRequest(activity=pb.Activity(**base))
        )

    created = await create(due_time=stamp(dt.timedelta(days=1)), duration_minutes=30)
    assert (created.status, created.priority, created.assigned_to) == ("planned", "medium", tenant.user_id)
    cases: list[tuple[dict[str, object], str]] = [
        ({"subject": " "}, "activity.subject"),
        ({"activity_type": "lunch"}, "activity.activity_type"),
        ({"activity_type": ""}, "activity.activity_type"),
        ({"account_id": ""}, "activity.account_id"),
        ({"due_time": stamp(-dt.timedelta(days=1))}, "activity.due_time"),
        ({"duration_minutes": 0}, "activity.duration_minutes"),
        ({"status": "completed"}, "activity.completed_time"),
        ({"completed_time": stamp(dt.timedelta(0))}, "activity.status"),
        ({"status": "done"}, "activity.status"),
        ({"priority": "critical"}, "activity.priority"),
    ]
    for fields, bad in cases:
        error = await fails(INVALID, create(**fields))
        assert bad in violations(error), fields
    done = await create(status="completed", completed_time=stamp(dt.timedelta(0)))
    assert done.status == "completed"


async def test_activity_targets_of_another_tenant_are_not_found(tenant: Tenant, other_tenant: Tenant) -> None:
    await other_tenant.pipeline()
    targets = {
        "account_id": (await other_tenant.account()).id,
        "contact_id": (await other_tenant.contact()).id,
        "lead_id": (await other_tenant.lead()).id,
        "deal_id": (await other_tenant.deal()).id,
    }
    for column, value in targets.items():
        activity = pb.Activity(subject="Call", activity_type="call", **{column: value})
        await fails(
            NOT_FOUND,
            tenant.call(tenant.activities, "CreateActivity", pb.CreateActivityRequest(activity=activity)),
        )


async def test_past_due_date_is_allowed_on_update(tenant: Tenant) -> None:
    lead = await tenant.lead()
    activity = await tenant.call(
        tenant.activities,
        "CreateActivity",
        pb.CreateActivityRequest(activity=pb.Activity(subject="Note", activity_type="note", lead_id=lead.id)),
    )
    activity.due_time.CopyFrom(stamp(-dt.timedelta(days=3)))
    updated = await tenant.call(
        tenant.activities,
        "UpdateActivity",
        pb.UpdateActivityRequest(activity=activity, update_mask=mask("due_time")),
    )
    assert updated.etag == 'W/"2"'


async def test_calls_without_tenant_or_credential_are_refused(channel: object) -> None:
    import grpc as g

    stub = Tenant(channel).accounts  # type: ignore[arg-type]
    with pytest.raises(g.aio.AioRpcError) as caught:
        await stub.ListAccounts(pb.ListAccountsRequest(), metadata=(("x-crm-tenant-id", "x"),))
    assert caught.value.code() is g.StatusCode.UNAUTHENTICATED
    with pytest.raises(g.aio.AioRpcError) as caught:
        await stub.ListAccounts(
            pb.ListAccountsRequest(), metadata=(("x-crm-internal-token", "core-test-token"),)
        )
    assert caught.value.code() is g.StatusCode.PERMISSION_DENIED
