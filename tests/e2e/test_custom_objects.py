"""Custom objects through the gateway on the whole suite: the seed's Project and Product catalog
examples (with a real account and deal from the core-entity service), typed queries, bad values
and tenant isolation."""

from __future__ import annotations

import uuid

import grpc
import pytest
from google.protobuf import field_mask_pb2

from cli.stack import Stack
from crm.v1 import common_pb2, core_entity_pb2, core_entity_pb2_grpc, custom_object_pb2_grpc
from crm.v1 import custom_object_pb2 as pb
from tests.conftest import bearer, create_tenant
from tests.e2e.test_thin_slice import field_violations

pytestmark = pytest.mark.e2e

STATUSES = ["planning", "in_progress", "on_hold", "completed", "cancelled"]


class Client:
    """CustomObjectService calls with one tenant's API key."""

    def __init__(self, channel: grpc.aio.Channel, api_key: str) -> None:
        self.channel = channel
        self.stub = custom_object_pb2_grpc.CustomObjectServiceStub(channel)
        self.md = bearer(api_key)

    async def __call__(self, method: str, request: object) -> object:
        return await getattr(self.stub, method)(request, metadata=self.md, timeout=30)

    async def core(self, stub_type: type, method: str, request: object) -> object | None:
        """A core-entity call, or None while the core-entity service does not serve it yet."""
        try:
            return await getattr(stub_type(self.channel), method)(request, metadata=self.md, timeout=30)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAVAILABLE):
                return None
            raise


async def tenant_client(suite: Stack, gateway: grpc.aio.Channel) -> Client:
    created = await create_tenant(gateway, suite.platform_admin_key)
    return Client(gateway, created.api_key)


def s(v: str) -> common_pb2.FieldValue:
    return common_pb2.FieldValue(string_value=v)


def d(v: str) -> common_pb2.FieldValue:
    return common_pb2.FieldValue(decimal_value=v)


def day(y: int, m: int, dd: int) -> common_pb2.FieldValue:
    value = common_pb2.FieldValue()
    value.date_value.year, value.date_value.month, value.date_value.day = y, m, dd
    return value


async def define(client: Client, object_type: str, name: str, field_type: str, **extra: object) -> None:
    await client(
        "CreateCustomField",
        pb.CreateCustomFieldRequest(
            field=pb.CustomField(
                object_type=object_type, field_name=name, field_label=name.replace("_", " ").title(),
                field_type=field_type, **extra,
            )
        ),
    )  # fmt: skip


async def test_project_example_through_the_gateway(suite: Stack, gateway: grpc.aio.Channel) -> None:
    client = await tenant_client(suite, gateway)
    await client(
        "CreateCustomObject",
        pb.CreateCustomObjectRequest(
            custom_object=pb.CustomObject(
                name="project", label="Project", plural_label="Projects", api_name="project__c",
                description="Custom object to track client projects and deliverables",
                icon="project", color="#4CAF50",
            )
        ),
    )  # fmt: skip
    await define(client, "project__c", "project_name", "text", is_required=True,
                 validation_rules=pb.ValidationRules(max_length=255))  # fmt: skip
    await define(client, "project__c", "start_date", "date", is_required=True, is_indexed=True)
    await define(client, "project__c", "end_date", "date")
    await define(client, "project__c", "budget", "currency", is_indexed=True,
                 validation_rules=pb.ValidationRules(min_value="0"))  # fmt: skip
    await define(
        client, "project__c", "status", "picklist", is_required=True,
        options=[pb.PicklistOption(value=v, label=v.replace("_", " ").title(), order=i + 1, is_default=i == 0)
                 for i, v in enumerate(STATUSES)],
    )  # fmt: skip
    await client(
        "UpdateCustomObject",
        pb.UpdateCustomObjectRequest(
            custom_object=pb.CustomObject(id="project__c", record_name_field="project_name"),
            update_mask=field_mask_pb2.FieldMask(paths=["record_name_field"]),
        ),
    )
    await client(
        "CreateCustomRelationship",
        pb.CreateCustomRelationshipRequest(
            relationship=pb.CustomRelationship(
                relationship_name="project_account", from_object_type="project__c", to_object_type="account",
                relationship_type="lookup", cardinality="many_to_one", is_required=True, field_name="account",
            )
        ),
    )  # fmt: skip
    account = await client.core(
        core_entity_pb2_grpc.AccountServiceStub,
        "CreateAccount",
        core_entity_pb2.CreateAccountRequest(account=core_entity_pb2.Account(name="Acme")),
    )
    if account is None:
        pytest.skip("the core-entity service does not serve AccountService yet")
    account_id = account.id  # type: ignore[attr-defined]

    def new_project(
        name: str, budget: str, month: int, account_ref: str, **more: common_pb2.FieldValue
    ) -> object:
        fields = {"project_name": s(name), "budget": d(budget), "start_date": day(2026, month, 1),
                  "account": common_pb2.FieldValue(reference_value=account_ref), **more}  # fmt: skip
        return client(
            "CreateRecord", pb.CreateRecordRequest(record=pb.Record(object_type="project__c", fields=fields))
        )

    apollo = await new_project("Apollo", "1500.5", 1, account_id)
    assert apollo.display_name == "Apollo"  # type: ignore[attr-defined]
    assert apollo.fields["status"].string_value == "planning"  # type: ignore[attr-defined]
    await new_project("Gemini", "99999", 3, account_id, status=s("in_progress"))
    await new_project("Mercury", "200", 5, account_id, status=s("completed"))

    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await new_project("Bad", "-1", 1, account_id, status=s("unknown"))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(bad.value)
    assert "min_value" in violations["record.fields.budget"]
    assert "record.fields.status" in violations
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await new_project("Orphan", "1", 1, str(uuid.uuid4()))
    assert missing.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "record.fields.account" in field_violations(missing.value)

    listed = await client(
        "ListRecords",
        pb.ListRecordsRequest(object_type="project__c", filter="budget > 500 AND start_date >= 2026-02-01",
                              order_by="budget desc"),
    )  # fmt: skip
    assert [r.display_name for r in listed.records] == ["Gemini"]  # type: ignore[attr-defined]
    ordered = await client("ListRecords", pb.ListRecordsRequest(object_type="project__c", order_by="budget"))
    assert [r.display_name for r in ordered.records] == ["Mercury", "Apollo", "Gemini"]  # type: ignore[attr-defined]
    with pytest.raises(grpc.aio.AioRpcError) as injected:
        await client(
            "ListRecords", pb.ListRecordsRequest(object_type="project__c", order_by="budget; DROP TABLE x")
        )
    assert injected.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_product_catalog_and_deal_products(suite: Stack, gateway: grpc.aio.Channel) -> None:
    client = await tenant_client(suite, gateway)
    await client(
        "CreateCustomObject",
        pb.CreateCustomObjectRequest(
            custom_object=pb.CustomObject(
                name="product", label="Product", plural_label="Products", api_name="product__c",
                allow_activities=False, record_name_field="", icon="package", color="#FF9800",
            )
        ),
    )  # fmt: skip
    await define(client, "product__c", "product_name", "text", is_required=True)
    await define(client, "product__c", "sku", "text", is_required=True, is_unique=True,
                 validation_rules=pb.ValidationRules(max_length=50))  # fmt: skip
    await define(client, "product__c", "price", "currency", is_required=True,
                 validation_rules=pb.ValidationRules(min_value="0"))  # fmt: skip
    categories = [pb.PicklistOption(value="hardware", order=1), pb.PicklistOption(value="services", order=2)]
    await define(client, "product__c", "category", "picklist", is_required=True, options=categories)
    await define(client, "product__c", "description", "textarea",
                 validation_rules=pb.ValidationRules(max_length=2000))  # fmt: skip
    await define(client, "product__c", "is_active", "boolean", is_required=True)
    await client(
        "CreateCustomRelationship",
        pb.CreateCustomRelationshipRequest(
            relationship=pb.CustomRelationship(
                relationship_name="deal_products", from_object_type="deal", to_object_type="product__c",
                relationship_type="many_to_many", cardinality="many_to_many",
                description="Products associated with deals",
            )
        ),
    )  # fmt: skip

    def product(sku: str, price: str) -> pb.CreateRecordRequest:
        return pb.CreateRecordRequest(
            record=pb.Record(
                object_type="product__c",
                fields={"product_name": s(f"Product {sku}"), "sku": s(sku), "price": d(price),
                        "category": s("hardware"), "is_active": common_pb2.FieldValue(bool_value=True)},
            )
        )  # fmt: skip

    widget = await client("CreateRecord", product("W-1", "19.99"))
    await client("CreateRecord", product("W-2", "5"))
    with pytest.raises(grpc.aio.AioRpcError) as duplicate:
        await client("CreateRecord", product("W-1", "1"))
    assert duplicate.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.aio.AioRpcError) as negative:
        await client("CreateRecord", product("W-3", "-0.01"))
    assert "record.fields.price" in field_violations(negative.value)
    cheap = await client(
        "ListRecords",
        pb.ListRecordsRequest(object_type="product__c", filter="price < 10 AND is_active = true"),
    )
    assert [r.fields["sku"].string_value for r in cheap.records] == ["W-2"]  # type: ignore[attr-defined]
    fields = await client("ListCustomFields", pb.ListCustomFieldsRequest(object_type="product__c"))
    assert {f.field_name for f in fields.fields} >= {"sku", "price", "category"}  # type: ignore[attr-defined]

    deal = await client.core(
        core_entity_pb2_grpc.DealServiceStub,
        "CreateDeal",
        core_entity_pb2.CreateDealRequest(deal=core_entity_pb2.Deal(name="Big deal")),
    )
    if deal is None:
        pytest.skip("the core-entity service does not serve DealService yet")
    link = await client(
        "LinkRecords",
        pb.LinkRecordsRequest(
            relationship="deal_products", from_record_id=deal.id, to_record_id=widget.id,  # type: ignore[attr-defined]
            data={"quantity": common_pb2.FieldValue(int_value=2)},
        ),
    )  # fmt: skip
    assert link.data["quantity"].int_value == 2  # type: ignore[attr-defined]
    linked = await client(
        "ListLinkedRecords",
        pb.ListLinkedRecordsRequest(relationship="deal_products", record_id=deal.id),  # type: ignore[attr-defined]
    )
    assert [x.to_record_id for x in linked.links] == [widget.id]  # type: ignore[attr-defined]


async def test_tenants_cannot_see_each_others_definitions_or_records(
    suite: Stack, gateway: grpc.aio.Channel
) -> None:
    owner, stranger = await tenant_client(suite, gateway), await tenant_client(suite, gateway)
    await owner(
        "CreateCustomObject",
        pb.CreateCustomObjectRequest(
            custom_object=pb.CustomObject(
                name="secret", label="Secret", plural_label="Secrets", api_name="secret__c"
            )
        ),
    )
    await define(owner, "secret__c", "code", "text")
    record = await owner(
        "CreateRecord",
        pb.CreateRecordRequest(record=pb.Record(object_type="secret__c", fields={"code": s("x")})),
    )
    for method, request in [
        ("GetRecord", pb.GetRecordRequest(id=record.id)),  # type: ignore[attr-defined]
        ("GetCustomObject", pb.GetCustomObjectRequest(id="secret__c")),
        ("ListRecords", pb.ListRecordsRequest(object_type="secret__c")),
        ("DeleteRecord", pb.DeleteRecordRequest(id=record.id)),  # type: ignore[attr-defined]
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stranger(method, request)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND, method
    listed = await stranger("ListCustomObjects", pb.ListCustomObjectsRequest())
    assert listed.total_size == 0  # type: ignore[attr-defined]


async def test_cli_defines_fills_and_queries_an_object(suite: Stack, gateway: grpc.aio.Channel) -> None:
    import asyncio
    import json

    from typer.testing import CliRunner

    from cli.main import app

    created = await create_tenant(gateway, suite.platform_admin_key)
    runner = CliRunner()
    common = ["--key", created.api_key, "--gateway", suite.gateway_address]

    def crm(*args: str) -> dict[str, object]:
        result = runner.invoke(app, [*args, *common])
        assert result.exit_code == 0, result.output
        return json.loads(result.output) if result.output.strip() else {}

    async def run(*args: str) -> dict[str, object]:
        # The CLI is synchronous; keep the test's event loop free while it runs.
        return await asyncio.to_thread(crm, *args)

    await run("object", "create", "ticket__c", "--label", "Ticket", "--plural-label", "Tickets",
              "--record-name-field", "")  # fmt: skip
    await run("field", "add", "ticket__c", "title", "text", "--required", "--rules", '{"maxLength": 80}')
    await run("field", "add", "ticket__c", "points", "number", "--indexed")
    await run("field", "add", "ticket__c", "cost", "currency", "--rules", '{"minValue": "0"}')
    await run("field", "add", "ticket__c", "state", "picklist", "--option", "open", "--option", "done",
              "--default-option", "open")  # fmt: skip
    for title, points, cost in [("a", 3, "10.5"), ("b", 13, "2"), ("c", 8, "7.25")]:
        await run("record", "create", "ticket__c", "--values",
                  json.dumps({"title": title, "points": points, "cost": float(cost)}))  # fmt: skip
    listed = await run("record", "list", "ticket__c", "--filter", "points > 5", "--order-by", "points desc")
    assert [r["fields"]["title"]["string_value"] for r in listed["records"]] == ["b", "c"]  # type: ignore[index, union-attr]
    first = listed["records"][0]  # type: ignore[index]
    updated = await run(
        "record", "update", first["id"], "--values", '{"state": "done"}', "--etag", first["etag"]
    )
    assert updated["fields"]["state"]["string_value"] == "done"  # type: ignore[index]
    fields = await run("field", "list", "ticket__c")
    assert len(fields["fields"]) == 4  # type: ignore[arg-type]
    result = await asyncio.to_thread(
        runner.invoke, app, ["record", "create", "ticket__c", "--values", '{"cost": -1}', *common]
    )
    assert result.exit_code == 1 and "INVALID_ARGUMENT" in result.output
    await run("object", "delete", "ticket__c", "--force")


async def test_deleting_a_core_master_deletes_its_custom_details(
    suite: Stack, gateway: grpc.aio.Channel
) -> None:
    import asyncio

    client = await tenant_client(suite, gateway)
    await client(
        "CreateCustomObject",
        pb.CreateCustomObjectRequest(
            custom_object=pb.CustomObject(name="site", label="Site", plural_label="Sites", api_name="site__c")
        ),
    )
    await define(client, "site__c", "city", "text")
    await client(
        "CreateCustomRelationship",
        pb.CreateCustomRelationshipRequest(
            relationship=pb.CustomRelationship(
                relationship_name="account", from_object_type="site__c", to_object_type="account",
                relationship_type="master_detail", cardinality="many_to_one",
            )
        ),
    )  # fmt: skip
    account = await client.core(
        core_entity_pb2_grpc.AccountServiceStub,
        "CreateAccount",
        core_entity_pb2.CreateAccountRequest(account=core_entity_pb2.Account(name="Acme")),
    )
    if account is None:
        pytest.skip("the core-entity service does not serve AccountService yet")
    site = await client(
        "CreateRecord",
        pb.CreateRecordRequest(
            record=pb.Record(
                object_type="site__c",
                fields={"city": s("Oslo"), "account": common_pb2.FieldValue(reference_value=account.id)},  # type: ignore[attr-defined]
            )
        ),
    )
    await client.core(
        core_entity_pb2_grpc.AccountServiceStub,
        "DeleteAccount",
        core_entity_pb2.DeleteAccountRequest(id=account.id),  # type: ignore[attr-defined]
    )
    for _ in range(100):
        try:
            await client("GetRecord", pb.GetRecordRequest(id=site.id))  # type: ignore[attr-defined]
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND
            return
        await asyncio.sleep(0.2)
    raise AssertionError("the site outlived its deleted account")
