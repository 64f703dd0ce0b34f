"""Core entities through the gateway: a tenant's records on its shard, field violations that
arrive intact, another tenant's records invisible, conversion, import/export streams, and the
audit trail of a core change."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import field_mask_pb2

from cli.stack import Stack
from crm.v1 import core_entity_pb2 as pb
from crm.v1 import core_entity_pb2_grpc as pb_grpc
from tests.conftest import bearer, create_tenant
from tests.e2e.test_thin_slice import field_violations, wait_for_audit

pytestmark = pytest.mark.e2e


async def default_pipeline(channel: grpc.aio.Channel, key: str) -> pb.Pipeline:
    """The tenant's default pipeline: onboarding makes it; made here when onboarding did not."""
    stub = pb_grpc.PipelineServiceStub(channel)
    found = await stub.ListPipelines(
        pb.ListPipelinesRequest(filter="is_default = true"), metadata=bearer(key), timeout=10
    )
    if found.pipelines:
        return found.pipelines[0]
    stages = [
        pb.PipelineStage(name="Prospecting", probability="10"),
        pb.PipelineStage(name="Closed Won", probability="100", is_closed=True, is_won=True),
    ]
    return await stub.CreatePipeline(  # type: ignore[no-any-return]
        pb.CreatePipelineRequest(pipeline=pb.Pipeline(name="Sales Pipeline", is_default=True, stages=stages)),
        metadata=bearer(key),
        timeout=10,
    )


async def test_account_lifecycle_through_the_gateway(suite: Stack, gateway: grpc.aio.Channel) -> None:
    tenant = await create_tenant(gateway, suite.platform_admin_key)
    accounts = pb_grpc.AccountServiceStub(gateway)
    key = bearer(tenant.api_key)
    created = await accounts.CreateAccount(
        pb.CreateAccountRequest(account=pb.Account(name="Acme", website="https://acme.example")), metadata=key
    )
    assert created.created_by == tenant.admin_user_id
    created.name = "Acme Corp"
    updated = await accounts.UpdateAccount(
        pb.UpdateAccountRequest(account=created, update_mask=field_mask_pb2.FieldMask(paths=["name"])),
        metadata=key,
    )
    assert updated.etag == 'W/"2"'
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await accounts.UpdateAccount(
            pb.UpdateAccountRequest(account=created, update_mask=field_mask_pb2.FieldMask(paths=["name"])),
            metadata=key,
        )
    assert caught.value.code() is grpc.StatusCode.ABORTED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await accounts.CreateAccount(
            pb.CreateAccountRequest(account=pb.Account(name=" ", website="x", employee_count=-1)),
            metadata=key,
        )
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(caught.value)) == {
        "account.name",
        "account.website",
        "account.employee_count",
    }
    listed = await accounts.ListAccounts(pb.ListAccountsRequest(filter='name = "Acme Corp"'), metadata=key)
    assert [a.id for a in listed.accounts] == [created.id] and listed.total_size == 1

    entries = await wait_for_audit(gateway, tenant.api_key, 2, table_name="accounts")
    assert {e.record_id for e in entries} == {created.id}
    change = next(e for e in entries if e.operation == 2)
    assert json.loads(change.old_values_json)["name"] == "Acme"
    assert json.loads(change.new_values_json)["name"] == "Acme Corp"


async def test_onboarding_creates_the_default_pipeline(suite: Stack, gateway: grpc.aio.Channel) -> None:
    tenant = await create_tenant(gateway, suite.platform_admin_key)
    found = await pb_grpc.PipelineServiceStub(gateway).ListPipelines(
        pb.ListPipelinesRequest(), metadata=bearer(tenant.api_key), timeout=10
    )
    (pipeline,) = found.pipelines
    assert pipeline.name == "Sales Pipeline" and pipeline.is_default
    assert [s.name for s in pipeline.stages] == [
        "Prospecting",
        "Qualification",
        "Proposal",
        "Negotiation",
        "Closed Won",
        "Closed Lost",
    ]
    deal = await pb_grpc.DealServiceStub(gateway).CreateDeal(
        pb.CreateDealRequest(deal=pb.Deal(name="First")), metadata=bearer(tenant.api_key)
    )
    assert deal.pipeline_id == pipeline.id and deal.probability == "10.00"


async def test_another_tenants_records_are_not_found(suite: Stack, gateway: grpc.aio.Channel) -> None:
    tenant_a = await create_tenant(gateway, suite.platform_admin_key)
    tenant_b = await create_tenant(gateway, suite.platform_admin_key)
    accounts = pb_grpc.AccountServiceStub(gateway)
    theirs = await accounts.CreateAccount(
        pb.CreateAccountRequest(account=pb.Account(name="B's secret")), metadata=bearer(tenant_b.api_key)
    )
    for call in (
        accounts.GetAccount(pb.GetAccountRequest(id=theirs.id), metadata=bearer(tenant_a.api_key)),
        accounts.CreateAccount(
            pb.CreateAccountRequest(account=pb.Account(name="Child", parent_account_id=theirs.id)),
            metadata=bearer(tenant_a.api_key),
        ),
        pb_grpc.ContactServiceStub(gateway).CreateContact(
            pb.CreateContactRequest(contact=pb.Contact(first_name="A", last_name="B", account_id=theirs.id)),
            metadata=bearer(tenant_a.api_key),
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND
        assert "secret" not in (caught.value.details() or "")


async def test_convert_lead_and_move_the_deal(suite: Stack, gateway: grpc.aio.Channel) -> None:
    tenant = await create_tenant(gateway, suite.platform_admin_key)
    key = bearer(tenant.api_key)
    pipeline = await default_pipeline(gateway, tenant.api_key)
    leads = pb_grpc.LeadServiceStub(gateway)
    lead = await leads.CreateLead(
        pb.CreateLeadRequest(lead=pb.Lead(first_name="Peter", last_name="Gibbons", company="Initech")),
        metadata=key,
    )
    converted = await leads.ConvertLead(pb.ConvertLeadRequest(id=lead.id, create_deal=True), metadata=key)
    assert converted.lead.converted and converted.deal.stage_id == pipeline.stages[0].id
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await leads.ConvertLead(pb.ConvertLeadRequest(id=lead.id), metadata=key)
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    won_stage = next(s for s in pipeline.stages if s.is_won)
    moved = await pb_grpc.DealServiceStub(gateway).MoveDealStage(
        pb.MoveDealStageRequest(id=converted.deal.id, stage_id=won_stage.id), metadata=key
    )
    assert moved.is_won and moved.is_closed and moved.HasField("actual_close_date")


async def test_import_and_export_stream_through_the_gateway(suite: Stack, gateway: grpc.aio.Channel) -> None:
    tenant = await create_tenant(gateway, suite.platform_admin_key)
    key = bearer(tenant.api_key)
    import_id = str(uuid.uuid4())

    async def rows() -> AsyncIterator[pb.ImportRecordsRequest]:
        yield pb.ImportRecordsRequest(
            import_id=import_id,
            entity_type=pb.ENTITY_TYPE_LEAD,
            rows=[
                pb.RecordRow(values={"first_name": "Ok", "last_name": "One", "lead_score": "50"}),
                pb.RecordRow(values={"first_name": "Bad", "last_name": "Score", "lead_score": "500"}),
            ],
        )
        yield pb.ImportRecordsRequest(rows=[pb.RecordRow(values={"first_name": "Ok", "last_name": "Two"})])

    stub = pb_grpc.ImportServiceStub(gateway)
    reply = await stub.ImportRecords(rows(), metadata=key, timeout=30)
    assert (reply.success_count, reply.error_count) == (2, 1)
    assert reply.row_errors[0].row_index == 1 and reply.row_errors[0].errors[0].field == "lead_score"
    again = await stub.ImportRecords(rows(), metadata=key, timeout=30)
    assert dict(again.record_ids) == dict(reply.record_ids)
    exported = [
        row
        async for batch in stub.ExportRecords(
            pb.ExportRecordsRequest(entity_type=pb.ENTITY_TYPE_LEAD), metadata=key, timeout=30
        )
        for row in batch.rows
    ]
    assert sorted(r.values["last_name"] for r in exported) == ["One", "Two"]


def run_cli(*args: str) -> tuple[int, str]:
    from typer.testing import CliRunner

    from cli.main import app

    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


async def test_cli_records_import_and_export(
    suite: Stack, gateway: grpc.aio.Channel, tmp_path: object
) -> None:
    import asyncio
    from pathlib import Path

    tenant = await create_tenant(gateway, suite.platform_admin_key)
    common = ("--key", tenant.api_key, "--gateway", suite.gateway_address)
    code, output = await asyncio.to_thread(
        run_cli, "account", "create", "--set", "name=Cli Co", "--set", "billing_address.city=Oslo", *common
    )
    assert code == 0, output
    account_id = json.loads(output)["id"]
    code, output = await asyncio.to_thread(
        run_cli, "account", "update", account_id, "--set", "industry=Tea", *common
    )
    assert code == 0 and json.loads(output)["industry"] == "Tea", output
    code, output = await asyncio.to_thread(run_cli, "account", "create", "--set", "website=nope", *common)
    assert code == 1 and "INVALID_ARGUMENT" in output
    csv_file = Path(str(tmp_path)) / "contacts.csv"
    csv_file.write_text("first_name,last_name,email\nAda,Lovelace,ada@example.com\n,Nameless,bad\n")
    code, output = await asyncio.to_thread(run_cli, "import", "contact", str(csv_file), *common)
    assert code == 2 and "1 imported, 1 failed" in output, output
    out_file = Path(str(tmp_path)) / "out.csv"
    code, output = await asyncio.to_thread(run_cli, "export", "contact", "-o", str(out_file), *common)
    assert code == 0, output
    assert "ada@example.com" in out_file.read_text()
