"""The custom-object service in-process on a real PostgreSQL and NATS (a fresh shard database
per module), called over gRPC with the gateway's metadata: the seed's Project and Product
examples end to end, typed filters on indexes, injection attempts, cross-tenant isolation,
etags, size limits, the master-detail cascade, many-to-many links, type changes and events."""

from __future__ import annotations

import asyncio
import random
import secrets
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import nats
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from crm.v1 import common_pb2, custom_object_pb2_grpc, events_pb2
from crm.v1 import custom_object_pb2 as pb
from services.custom_object.adapters.indexes import READER_FUNCTIONS
from services.custom_object.adapters.usage import UsageTracker
from services.custom_object.bootstrap import build_app
from shared import events
from shared.config import ShardServiceSettings
from shared.context import INTERNAL_TOKEN_KEY, TENANT_ID_KEY, USER_ID_KEY
from shared.db import asyncpg_dsn, create_engine, session_factory
from shared.grpc_server import ServiceApp
from shared.provisioning import Roles, drop_database, dsn_for, ensure_database, ensure_roles
from tests.backends import Backends

pytestmark = pytest.mark.integration

TOKEN = "test-internal-token"


class FakeCore:
    """Core records that exist, whatever the tenant (the real check is tested end to end)."""

    def __init__(self) -> None:
        self.known: set[str] = set()

    def add(self) -> str:
        record_id = str(uuid.uuid4())
        self.known.add(record_id)
        return record_id

    async def missing(self, object_type: str, ids: Iterable[str]) -> set[str]:
        return {i for i in ids if i not in self.known}


@dataclass
class Service:
    app: ServiceApp
    channel: grpc.aio.Channel
    core: FakeCore
    owner_dsn: str
    app_dsn: str
    admin_dsn: str
    nats_url: str

    def stub(self) -> custom_object_pb2_grpc.CustomObjectServiceStub:
        return custom_object_pb2_grpc.CustomObjectServiceStub(self.channel)


@dataclass
class Tenant:
    id: str
    service: Service

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return ((INTERNAL_TOKEN_KEY, TOKEN), (TENANT_ID_KEY, self.id), (USER_ID_KEY, str(uuid.uuid4())))

    async def call(self, method: str, request: object) -> object:
        return await getattr(self.service.stub(), method)(request, metadata=self.md, timeout=30)


@pytest.fixture(scope="module")
async def service(backends: Backends) -> AsyncIterator[Service]:
    prefix = "crmt" + secrets.token_hex(4)
    roles = Roles(f"{prefix}_owner", "owner-pw", f"{prefix}_app", "app-pw")
    database = f"{prefix}_custom"
    await ensure_roles(backends.database_url, roles)
    await ensure_database(backends.database_url, database, roles)
    owner = dsn_for(backends.database_url, database, roles.owner, roles.owner_password)
    settings = ShardServiceSettings(
        db_url=dsn_for(backends.database_url, database, roles.app, roles.app_password),  # type: ignore[arg-type]
        db_owner_url=owner,  # type: ignore[arg-type]
        nats_url=backends.nats_url,
        internal_token=TOKEN,  # type: ignore[arg-type]
        outbox_poll_seconds=0.1,
    )
    core = FakeCore()
    app = build_app(settings, core_records=core)
    port = await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    admin = urlunsplit(urlsplit(backends.database_url)._replace(path=f"/{database}"))
    yield Service(app, channel, core, owner, settings.db_url.get_secret_value(), admin, backends.nats_url)
    await channel.close()
    await app.stop()
    await drop_database(backends.database_url, database)


@pytest.fixture
def tenant(service: Service) -> Tenant:
    return Tenant(str(uuid.uuid4()), service)


def status_of(error: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, dict[str, str]]:
    """The status code and the BadRequest field violations (field -> description)."""
    violations: dict[str, str] = {}
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations.update({v.field: v.description for v in bad.field_violations})
    return error.code(), violations


async def fails(call: object) -> tuple[grpc.StatusCode, dict[str, str]]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return status_of(caught.value)


def s(v: str) -> common_pb2.FieldValue:
    return common_pb2.FieldValue(string_value=v)


def d(v: str) -> common_pb2.FieldValue:
    return common_pb2.FieldValue(decimal_value=v)


def ref(v: str) -> common_pb2.FieldValue:
    return common_pb2.FieldValue(reference_value=v)


def day(iso: str) -> common_pb2.FieldValue:
    y, m, dd = (int(x) for x in iso.split("-"))
    value = common_pb2.FieldValue()
    value.date_value.year, value.date_value.month, value.date_value.day = y, m, dd
    return value


async def make_object(t: Tenant, api_name: str, **extra: object) -> pb.CustomObject:
    label = api_name.removesuffix("__c").title()
    return await t.call(  # type: ignore[return-value]
        "CreateCustomObject",
        pb.CreateCustomObjectRequest(
            custom_object=pb.CustomObject(
                name=api_name.removesuffix("__c"),
                label=label,
                plural_label=label + "s",
                api_name=api_name,
                **extra,
            )
        ),
    )


async def make_field(
    t: Tenant, object_type: str, name: str, field_type: str, **extra: object
) -> pb.CustomField:
    return await t.call(  # type: ignore[return-value]
        "CreateCustomField",
        pb.CreateCustomFieldRequest(
            field=pb.CustomField(
                object_type=object_type,
                field_name=name,
                field_label=name.title(),
                field_type=field_type,
                **extra,
            )
        ),
    )


STATUSES = ["planning", "in_progress", "on_hold", "completed", "cancelled"]


async def make_project(t: Tenant) -> None:
    """The seed's Project object: fields, the status picklist and the required account lookup."""
    await make_object(t, "project__c", record_name_field="", icon="project", color="#4CAF50")
    await make_field(t, "project__c", "project_name", "text", is_required=True,
                     validation_rules=pb.ValidationRules(max_length=255))  # fmt: skip
    await make_field(t, "project__c", "start_date", "date", is_required=True, is_indexed=True)
    await make_field(t, "project__c", "end_date", "date")
    await make_field(t, "project__c", "budget", "currency", is_indexed=True,
                     validation_rules=pb.ValidationRules(min_value="0"))  # fmt: skip
    await make_field(
        t, "project__c", "status", "picklist", is_required=True,
        options=[pb.PicklistOption(value=v, label=v.replace("_", " ").title(), order=i + 1, is_default=i == 0)
                 for i, v in enumerate(STATUSES)],
    )  # fmt: skip
    await t.call(
        "CreateCustomRelationship",
        pb.CreateCustomRelationshipRequest(
            relationship=pb.CustomRelationship(
                relationship_name="project_account", from_object_type="project__c", to_object_type="account",
                relationship_type="lookup", cardinality="many_to_one", is_required=True, field_name="account",
                description="Each project belongs to an account",
            )
        ),
    )  # fmt: skip


async def project(t: Tenant, name: str, budget: str, start: str, account: str, **more: object) -> pb.Record:
    fields = {"project_name": s(name), "budget": d(budget), "start_date": day(start), "account": ref(account)}
    fields.update(more)  # type: ignore[arg-type]
    return await t.call(  # type: ignore[return-value]
        "CreateRecord", pb.CreateRecordRequest(record=pb.Record(object_type="project__c", fields=fields))
    )


async def list_names(t: Tenant, filter_text: str = "", order_by: str = "") -> list[str]:
    response = await t.call(
        "ListRecords", pb.ListRecordsRequest(object_type="project__c", filter=filter_text, order_by=order_by)
    )
    return [r.fields["project_name"].string_value for r in response.records]  # type: ignore[attr-defined]


async def test_project_example_end_to_end(tenant: Tenant) -> None:
    await make_project(tenant)
    account = tenant.service.core.add()
    created = await project(tenant, "Apollo", "1500.5", "2026-01-05", account)
    assert created.fields["budget"].decimal_value == "1500.50"
    assert created.fields["status"].string_value == "planning"  # the default option
    assert created.fields["account"].reference_value == account
    got = await tenant.call("GetRecord", pb.GetRecordRequest(id=created.id))
    assert got == created

    code, violations = await fails(project(tenant, "Bad", "-1", "2026-01-05", account, status=s("unknown")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "min_value" in violations["record.fields.budget"]
    assert "option" in violations["record.fields.status"]

    code, violations = await fails(project(tenant, "Orphan", "10", "2026-01-05", str(uuid.uuid4())))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "no account record" in violations["record.fields.account"]

    code, violations = await fails(
        tenant.call("CreateRecord", pb.CreateRecordRequest(record=pb.Record(object_type="project__c")))
    )
    assert {"record.fields.project_name", "record.fields.start_date", "record.fields.account"} <= set(
        violations
    )

    fields = await tenant.call("ListCustomFields", pb.ListCustomFieldsRequest(object_type="project__c"))
    by_name = {f.field_name: f for f in fields.fields}  # type: ignore[attr-defined]
    assert by_name["account"].field_type == "lookup" and by_name["account"].is_required
    assert by_name["account"].reference_object_type == "account"
    assert [o.value for o in by_name["status"].options] == STATUSES
    assert by_name["budget"].data_type == "decimal"
    assert by_name["budget"].metadata.created_version == "1.0.0"
    assert by_name["budget"].metadata.usage_count >= 2  # counted in memory, shown before a flush
    assert by_name["budget"].metadata.performance_impact == "medium"


async def test_typed_filters_sort_and_page_use_numbers_and_dates(tenant: Tenant) -> None:
    await make_project(tenant)
    account = tenant.service.core.add()
    for name, budget, start in [("A", "200", "2026-03-01"), ("B", "1000.50", "2025-12-31"),
                                ("C", "99999", "2026-01-15"), ("D", "5", "2024-06-30")]:  # fmt: skip
        await project(tenant, name, budget, start, account)
    # Text comparison would put "99999" below "200"; numbers compare as numbers.
    assert sorted(await list_names(tenant, "budget > 500")) == ["B", "C"]
    assert await list_names(tenant, order_by="budget desc") == ["C", "B", "A", "D"]
    assert await list_names(tenant, "start_date >= 2026-01-01", "start_date") == ["C", "A"]
    assert await list_names(
        tenant, 'status = planning AND (budget < 10 OR project_name = "C")', "budget"
    ) == [
        "D",
        "C",
    ]
    assert await list_names(tenant, 'project_name:"a"') == ["A"]

    seen: list[str] = []
    token = ""
    while True:
        page = await tenant.call(
            "ListRecords",
            pb.ListRecordsRequest(
                object_type="project__c", order_by="budget desc", page_size=1, page_token=token
            ),
        )
        seen += [r.fields["project_name"].string_value for r in page.records]  # type: ignore[attr-defined]
        assert page.total_size == 4  # type: ignore[attr-defined]
        token = page.next_page_token  # type: ignore[attr-defined]
        if not token:
            break
    assert seen == ["C", "B", "A", "D"]
    code, _ = await fails(
        tenant.call(
            "ListRecords",
            pb.ListRecordsRequest(
                object_type="project__c", order_by="budget", page_size=1, page_token=token or "x"
            ),
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_indexes_are_built_and_used(tenant: Tenant) -> None:
    await make_project(tenant)
    fields = await tenant.call("ListCustomFields", pb.ListCustomFieldsRequest(object_type="project__c"))
    by_name = {f.field_name: f for f in fields.fields}  # type: ignore[attr-defined]
    budget, start = by_name["budget"], by_name["start_date"]
    budget_index, start_index = (f"ix_cf_{uuid.UUID(f.id).hex}" for f in (budget, start))
    object_id = budget.custom_object_id
    conn = await asyncpg.connect(asyncpg_dsn(tenant.service.owner_dsn))
    admin = await asyncpg.connect(asyncpg_dsn(tenant.service.admin_dsn))
    try:
        definition = await conn.fetchval("SELECT indexdef FROM pg_indexes WHERE indexname = $1", budget_index)
        assert definition is not None and "field_numeric" in definition and object_id in definition
        valid = await conn.fetchval(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)", f"custom.{budget_index}"
        )
        assert valid is True
        # Partial indexes give the planner no statistics; the builder adds extended statistics
        # on the expression (built right after the index, in the same call).
        expressions = await conn.fetchval(
            "SELECT string_agg(pg_get_statisticsobjdef_expressions(oid)::text, ' ') "
            "FROM pg_statistic_ext WHERE stxrelid = 'custom.custom_object_records'::regclass"
        )
        assert "custom.field_numeric(record_data, 'budget'::text)" in expressions, expressions
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.current_tenant_id', $1, true)", tenant.id)
            await conn.execute(
                "INSERT INTO custom.custom_object_records (tenant_id, custom_object_id, record_data) "
                "SELECT $1::uuid, $2::uuid, jsonb_build_object('budget', i || '.00', 'start_date', "
                "to_char(date '2000-01-01' + i, 'YYYY-MM-DD')) FROM generate_series(1, 3000) AS i",
                tenant.id,
                object_id,
            )
        await conn.execute("ANALYZE custom.custom_object_records")

        async def plan(sql: str) -> str:
            async with conn.transaction():
                await conn.execute("SELECT set_config('app.current_tenant_id', $1, true)", tenant.id)
                rows = await conn.fetch("EXPLAIN " + sql)
            return "\n".join(r[0] for r in rows)

        scope = f"FROM custom.custom_object_records WHERE custom_object_id = '{object_id}'::uuid"
        # Sorting (ORDER BY ... LIMIT, as ListRecords pages) walks the index under row-level security.
        sorted_plan = await plan(
            f"SELECT id {scope} ORDER BY custom.field_numeric(record_data, 'budget') DESC LIMIT 5"
        )
        assert budget_index in sorted_plan, sorted_plan
        # Filters reach the index once a superuser marked the readers LEAKPROOF (RLS otherwise
        # evaluates the tenant policy first); see docs/custom-objects.md.
        for function in READER_FUNCTIONS:
            await admin.execute(f"ALTER FUNCTION custom.{function}(jsonb, text) LEAKPROOF")
        filtered = await plan(
            f"SELECT id {scope} AND custom.field_date(record_data, 'start_date') > '2008-01-01'"
        )
        assert start_index in filtered, filtered
    finally:
        await conn.close()
        await admin.close()


INJECTIONS = [
    "'; DROP TABLE custom.custom_object_records; --",
    "x' OR '1'='1",
    'project_name = "a" OR 1=1 --',
    "budget > 0; SELECT pg_sleep(10)",
    "record_data->>'budget' > 0",
    "budget > (SELECT 1)",
    "\\x00",
    "budget > 1e999999",
]


@pytest.mark.parametrize("attack", INJECTIONS)
async def test_injection_in_filters_is_invalid_or_empty(tenant: Tenant, attack: str) -> None:
    await make_project(tenant)
    await project(tenant, "A", "10", "2026-01-01", tenant.service.core.add())
    for filter_text in (
        attack,
        f'project_name = "{attack}"',
        f"project_name = '{attack}'",
        f"budget > {attack}",
    ):
        try:
            names = await list_names(tenant, filter_text)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (filter_text, error.details())
        else:
            assert names == [], filter_text
    code, _ = await fails(list_names(tenant, order_by=attack))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, violations = await fails(make_field(tenant, "project__c", attack, "text"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "field.field_name" in violations
    code, _ = await fails(
        tenant.call(
            "CreateRecord",
            pb.CreateRecordRequest(record=pb.Record(object_type="project__c", fields={attack: s("x")})),
        )
    )
    assert code in (grpc.StatusCode.INVALID_ARGUMENT,)
    code, _ = await fails(tenant.call("ListRecords", pb.ListRecordsRequest(object_type=attack)))
    assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)


async def test_product_catalog_unique_sku_and_deal_products(tenant: Tenant) -> None:
    await make_object(tenant, "product__c", allow_activities=False, color="#FF9800", icon="package")
    await make_field(tenant, "product__c", "product_name", "text", is_required=True)
    await make_field(tenant, "product__c", "sku", "text", is_required=True, is_unique=True,
                     validation_rules=pb.ValidationRules(max_length=50))  # fmt: skip
    await make_field(tenant, "product__c", "price", "currency", is_required=True,
                     validation_rules=pb.ValidationRules(min_value="0"))  # fmt: skip
    categories = [pb.PicklistOption(value="hardware", order=1), pb.PicklistOption(value="software", order=2)]
    await make_field(tenant, "product__c", "category", "picklist", is_required=True, options=categories)
    await make_field(tenant, "product__c", "description", "textarea",
                     validation_rules=pb.ValidationRules(max_length=2000))  # fmt: skip
    await make_field(tenant, "product__c", "is_active", "boolean", is_required=True)
    obj = await tenant.call("GetCustomObject", pb.GetCustomObjectRequest(id="product__c"))
    assert obj.allow_activities is False and obj.allow_reports is True  # type: ignore[attr-defined]

    def product(sku: str) -> pb.CreateRecordRequest:
        return pb.CreateRecordRequest(
            record=pb.Record(
                object_type="product__c",
                fields={"product_name": s("Widget"), "sku": s(sku), "price": d("9.99"),
                        "category": s("hardware"), "is_active": common_pb2.FieldValue(bool_value=True)},
            )
        )  # fmt: skip

    widget = await tenant.call("CreateRecord", product("W-1"))
    code, _ = await fails(tenant.call("CreateRecord", product("W-1")))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    gadget = await tenant.call("CreateRecord", product("G-1"))
    # Changing a record onto a taken sku is refused too.
    code, _ = await fails(
        tenant.call(
            "UpdateRecord",
            pb.UpdateRecordRequest(
                record=pb.Record(id=gadget.id, fields={"sku": s("W-1")}),  # type: ignore[attr-defined]
                update_mask=field_mask_pb2.FieldMask(paths=["fields.sku"]),
            ),
        )
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS

    await tenant.call(
        "CreateCustomRelationship",
        pb.CreateCustomRelationshipRequest(
            relationship=pb.CustomRelationship(
                relationship_name="deal_products", from_object_type="deal", to_object_type="product__c",
                relationship_type="many_to_many", cardinality="many_to_many",
            )
        ),
    )  # fmt: skip
    deal = tenant.service.core.add()
    link = await tenant.call(
        "LinkRecords",
        pb.LinkRecordsRequest(
            relationship="deal_products", from_record_id=deal, to_record_id=widget.id,  # type: ignore[attr-defined]
            data={"quantity": common_pb2.FieldValue(int_value=3), "discount": d("0.10")},
        ),
    )  # fmt: skip
    assert link.data["quantity"].int_value == 3  # type: ignore[attr-defined]
    code, _ = await fails(
        tenant.call(
            "LinkRecords",
            pb.LinkRecordsRequest(relationship="deal_products", from_record_id=deal, to_record_id=widget.id),  # type: ignore[attr-defined]
        )
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS
    code, violations = await fails(
        tenant.call(
            "LinkRecords",
            pb.LinkRecordsRequest(
                relationship="deal_products", from_record_id=str(uuid.uuid4()), to_record_id=widget.id
            ),  # type: ignore[attr-defined]
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "from_record_id" in violations
    await tenant.call(
        "LinkRecords",
        pb.LinkRecordsRequest(relationship="deal_products", from_record_id=deal, to_record_id=gadget.id),  # type: ignore[attr-defined]
    )
    linked = await tenant.call(
        "ListLinkedRecords", pb.ListLinkedRecordsRequest(relationship="deal_products", record_id=deal)
    )
    assert {x.to_record_id for x in linked.links} == {widget.id, gadget.id}  # type: ignore[attr-defined]
    await tenant.call(
        "UnlinkRecords",
        pb.UnlinkRecordsRequest(relationship="deal_products", from_record_id=deal, to_record_id=gadget.id),  # type: ignore[attr-defined]
    )
    # Deleting a product removes its links.
    await tenant.call("DeleteRecord", pb.DeleteRecordRequest(id=widget.id))  # type: ignore[attr-defined]
    linked = await tenant.call(
        "ListLinkedRecords", pb.ListLinkedRecordsRequest(relationship="deal_products", record_id=deal)
    )
    assert linked.total_size == 0  # type: ignore[attr-defined]


async def test_other_tenants_see_nothing(service: Service) -> None:
    owner, stranger = Tenant(str(uuid.uuid4()), service), Tenant(str(uuid.uuid4()), service)
    await make_project(owner)
    record = await project(owner, "Secret", "1", "2026-01-01", service.core.add())
    code, _ = await fails(stranger.call("GetRecord", pb.GetRecordRequest(id=record.id)))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = await fails(stranger.call("GetCustomObject", pb.GetCustomObjectRequest(id="project__c")))
    assert code == grpc.StatusCode.NOT_FOUND
    listed = await stranger.call("ListCustomFields", pb.ListCustomFieldsRequest())
    assert listed.total_size == 0  # type: ignore[attr-defined]
    code, _ = await fails(stranger.call("DeleteRecord", pb.DeleteRecordRequest(id=record.id)))
    assert code == grpc.StatusCode.NOT_FOUND
    # The same api_name is free in another tenant.
    await make_project(stranger)
    assert await list_names(stranger) == []
    # Without a tenant there is nothing to see.
    code, _ = await fails(
        service.stub().ListCustomObjects(
            pb.ListCustomObjectsRequest(), metadata=((INTERNAL_TOKEN_KEY, TOKEN),)
        )
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED


async def test_concurrent_updates_with_one_etag_let_one_win(tenant: Tenant) -> None:
    await make_project(tenant)
    record = await project(tenant, "Race", "1", "2026-01-01", tenant.service.core.add())

    def update(budget: str) -> object:
        return tenant.call(
            "UpdateRecord",
            pb.UpdateRecordRequest(
                record=pb.Record(id=record.id, etag=record.etag, fields={"budget": d(budget)}),
                update_mask=field_mask_pb2.FieldMask(paths=["fields.budget"]),
            ),
        )

    results = await asyncio.gather(update("2"), update("3"), return_exceptions=True)
    winners = [r for r in results if isinstance(r, pb.Record)]
    losers = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(winners) == 1 and len(losers) == 1
    assert losers[0].code() == grpc.StatusCode.ABORTED
    assert winners[0].etag == 'W/"2"'
    # Clearing a required field is refused and names it.
    code, violations = await fails(
        tenant.call(
            "UpdateRecord",
            pb.UpdateRecordRequest(
                record=pb.Record(id=record.id),
                update_mask=field_mask_pb2.FieldMask(paths=["fields.project_name"]),
            ),
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "record.fields.project_name" in violations


async def test_limits_and_oversize_records(tenant: Tenant) -> None:
    await make_object(tenant, "note__c")
    for i in range(3):
        await make_field(tenant, "note__c", f"body_{i}", "textarea")
    big = "x" * 30000
    code, violations = await fails(
        tenant.call(
            "CreateRecord",
            pb.CreateRecordRequest(
                record=pb.Record(object_type="note__c", fields={f"body_{i}": s(big) for i in range(3)})
            ),
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "bytes" in violations["record.fields"]
    code, violations = await fails(make_field(tenant, "note__c", "body_x", "textarea", is_indexed=True))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "field.is_indexed" in violations
    code, _ = await fails(make_field(tenant, "note__c", "body_0", "text"))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    code, violations = await fails(make_field(tenant, "note__c", "amount", "number", data_type="varchar"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "field.data_type" in violations
    code, violations = await fails(
        make_field(tenant, "note__c", "code", "text", validation_rules=pb.ValidationRules(pattern="(a)\\1"))
    )
    assert "field.validation_rules.pattern" in violations
    code, violations = await fails(make_field(tenant, "note__c", "kind", "picklist"))
    assert "field.options" in violations
    code, _ = await fails(make_object(tenant, "note__c"))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    code, violations = await fails(make_object(tenant, "Bad-Name", color="red"))
    assert {"custom_object.api_name", "custom_object.color"} <= set(violations)


async def test_master_detail_cascade_and_lookup_clearing(tenant: Tenant) -> None:
    await make_object(tenant, "invoice__c")
    await make_field(tenant, "invoice__c", "number", "text")
    await make_object(tenant, "line__c")
    await make_field(tenant, "line__c", "amount", "decimal")
    await make_object(tenant, "memo__c")
    await make_field(tenant, "memo__c", "text", "text")

    async def relate(name: str, child: str, master: str, kind: str) -> None:
        await tenant.call(
            "CreateCustomRelationship",
            pb.CreateCustomRelationshipRequest(
                relationship=pb.CustomRelationship(
                    relationship_name=name, from_object_type=child, to_object_type=master,
                    relationship_type=kind, cardinality="many_to_one",
                )
            ),
        )  # fmt: skip

    await relate("invoice", "line__c", "invoice__c", "master_detail")
    await relate("about_invoice", "memo__c", "invoice__c", "lookup")

    async def create(object_type: str, **fields: common_pb2.FieldValue) -> pb.Record:
        return await tenant.call(  # type: ignore[return-value]
            "CreateRecord", pb.CreateRecordRequest(record=pb.Record(object_type=object_type, fields=fields))
        )

    invoice = await create("invoice__c", number=s("INV-1"))
    lines = [await create("line__c", amount=d("1"), invoice=ref(invoice.id)) for _ in range(3)]
    memo = await create("memo__c", text=s("hello"), about_invoice=ref(invoice.id))
    code, violations = await fails(create("line__c", amount=d("1")))
    assert "record.fields.invoice" in violations  # master_detail is always required
    outcome = await tenant.call("DeleteRecord", pb.DeleteRecordRequest(id=invoice.id))
    assert set(outcome.cascaded_record_ids) == {line.id for line in lines}  # type: ignore[attr-defined]
    assert outcome.cleared_reference_count == 1  # type: ignore[attr-defined]
    for line in lines:
        code, _ = await fails(tenant.call("GetRecord", pb.GetRecordRequest(id=line.id)))
        assert code == grpc.StatusCode.NOT_FOUND
    memo_now = await tenant.call("GetRecord", pb.GetRecordRequest(id=memo.id))
    assert "about_invoice" not in memo_now.fields  # type: ignore[attr-defined]
    # one_to_one references are unique.
    await tenant.call(
        "CreateCustomRelationship",
        pb.CreateCustomRelationshipRequest(
            relationship=pb.CustomRelationship(
                relationship_name="twin", from_object_type="memo__c", to_object_type="invoice__c",
                relationship_type="lookup", cardinality="one_to_one",
            )
        ),
    )  # fmt: skip
    other = await create("invoice__c", number=s("INV-2"))
    await create("memo__c", twin=ref(other.id))
    code, _ = await fails(create("memo__c", twin=ref(other.id)))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    code, violations = await fails(
        tenant.call(
            "CreateCustomRelationship",
            pb.CreateCustomRelationshipRequest(
                relationship=pb.CustomRelationship(
                    relationship_name="bad", from_object_type="memo__c", to_object_type="invoice__c",
                    relationship_type="lookup", cardinality="many_to_many",
                )
            ),
        )
    )  # fmt: skip
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "relationship.cardinality" in violations


async def test_field_type_change_follows_values_or_is_refused(tenant: Tenant) -> None:
    await make_object(tenant, "thing__c")
    code_field = await make_field(
        tenant, "thing__c", "code", "text", validation_rules=pb.ValidationRules(max_length=20)
    )
    for value in ("12", "13"):
        await tenant.call(
            "CreateRecord",
            pb.CreateRecordRequest(record=pb.Record(object_type="thing__c", fields={"code": s(value)})),
        )

    def change(field: pb.CustomField, field_type: str) -> object:
        return tenant.call(
            "UpdateCustomField",
            pb.UpdateCustomFieldRequest(
                field=pb.CustomField(id=field.id, etag=field.etag, field_type=field_type),
                update_mask=field_mask_pb2.FieldMask(paths=["field_type"]),
            ),
        )

    changed = await change(code_field, "number")
    assert changed.data_type == "integer" and changed.metadata.last_modified_version == "1.0.1"  # type: ignore[attr-defined]
    listed = await tenant.call(
        "ListRecords", pb.ListRecordsRequest(object_type="thing__c", filter="code > 12")
    )
    assert [r.fields["code"].int_value for r in listed.records] == [13]  # type: ignore[attr-defined]
    await tenant.call(
        "CreateRecord",
        pb.CreateRecordRequest(
            record=pb.Record(object_type="thing__c", fields={"code": common_pb2.FieldValue(int_value=-5)})
        ),
    )
    code, _ = await fails(change(changed, "date"))  # type: ignore[arg-type]
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    code, _ = await fails(change(code_field, "text"))  # a stale etag
    assert code == grpc.StatusCode.ABORTED


async def test_definition_changes_publish_change_and_control_events(tenant: Tenant) -> None:
    client = await nats.connect(tenant.service.nats_url)
    try:
        js = client.jetstream()
        await events.ensure_stream(js)
        control = await js.pull_subscribe(
            "crm.control.custom_field_changed", stream=events.STREAM_NAME,
            config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.NEW),
        )  # fmt: skip
        changes = await js.pull_subscribe(
            f"crm.events.{tenant.id}.custom_object.custom_fields.>", stream=events.STREAM_NAME,
            config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.NEW),
        )  # fmt: skip
        await make_object(tenant, "evt__c")
        field = await make_field(tenant, "evt__c", "size", "number")
        seen_control: list[events_pb2.ControlEvent] = []
        seen_change: list[events_pb2.ChangeEvent] = []
        deadline = asyncio.get_running_loop().time() + 10
        while asyncio.get_running_loop().time() < deadline and (len(seen_control) < 2 or not seen_change):
            try:
                for message in await control.fetch(50, timeout=0.5):
                    event = events_pb2.ControlEvent.FromString(message.data)
                    if event.tenant_id == tenant.id:
                        seen_control.append(event)
            except nats.errors.TimeoutError:
                pass
            try:
                for message in await changes.fetch(50, timeout=0.2):
                    seen_change.append(events_pb2.ChangeEvent.FromString(message.data))
            except nats.errors.TimeoutError:
                pass
        assert {e.resource_id for e in seen_control} >= {field.id}
        assert all(e.kind == events_pb2.CONTROL_EVENT_KIND_CUSTOM_FIELD_CHANGED for e in seen_control)
        assert seen_change[0].record_id == field.id and seen_change[0].table_name == "custom_fields"
    finally:
        await client.close()


async def test_required_field_on_object_with_records_needs_a_default(tenant: Tenant) -> None:
    await make_object(tenant, "crate__c")
    await make_field(tenant, "crate__c", "label_text", "text")
    await tenant.call(
        "CreateRecord",
        pb.CreateRecordRequest(record=pb.Record(object_type="crate__c", fields={"label_text": s("a")})),
    )
    code, _ = await fails(make_field(tenant, "crate__c", "weight", "number", is_required=True))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    await make_field(
        tenant,
        "crate__c",
        "weight",
        "number",
        is_required=True,
        default_value=common_pb2.FieldValue(int_value=7),
    )
    listed = await tenant.call(
        "ListRecords", pb.ListRecordsRequest(object_type="crate__c", filter="weight = 7")
    )
    assert listed.total_size == 1  # type: ignore[attr-defined]
    # Deleting the object needs force while it has records.
    code, _ = await fails(tenant.call("DeleteCustomObject", pb.DeleteCustomObjectRequest(id="crate__c")))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    await tenant.call("DeleteCustomObject", pb.DeleteCustomObjectRequest(id="crate__c", force=True))
    code, _ = await fails(tenant.call("ListRecords", pb.ListRecordsRequest(object_type="crate__c")))
    assert code == grpc.StatusCode.NOT_FOUND


async def test_missing_indexes_are_rebuilt_on_first_use(tenant: Tenant) -> None:
    """What a tenant moved to this shard looks like: definitions and rows, no field indexes."""
    await make_project(tenant)
    fields = await tenant.call("ListCustomFields", pb.ListCustomFieldsRequest(object_type="project__c"))
    budget = next(f for f in fields.fields if f.field_name == "budget")  # type: ignore[attr-defined]
    name = f"ix_cf_{uuid.UUID(budget.id).hex}"
    conn = await asyncpg.connect(asyncpg_dsn(tenant.service.owner_dsn))
    try:
        await conn.execute(f"DROP INDEX custom.{name}")
        assert await list_names(tenant, "budget > 1") == []
        for _ in range(100):
            if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"custom.{name}"):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the index was not rebuilt")
    finally:
        await conn.close()


async def test_core_deletions_cascade_to_custom_records(tenant: Tenant) -> None:
    """A deleted account takes its master-detail children with it and empties lookups to it."""
    await make_object(tenant, "site__c")
    await make_field(tenant, "site__c", "city", "text")
    await make_object(tenant, "visit__c")
    await make_field(tenant, "visit__c", "note", "text")
    for name, holder, kind in (("account", "site__c", "master_detail"), ("customer", "visit__c", "lookup")):
        await tenant.call(
            "CreateCustomRelationship",
            pb.CreateCustomRelationshipRequest(
                relationship=pb.CustomRelationship(
                    relationship_name=name, from_object_type=holder, to_object_type="account",
                    relationship_type=kind, cardinality="many_to_one",
                )
            ),
        )  # fmt: skip
    account = tenant.service.core.add()

    async def create(object_type: str, **fields: common_pb2.FieldValue) -> pb.Record:
        return await tenant.call(  # type: ignore[return-value]
            "CreateRecord", pb.CreateRecordRequest(record=pb.Record(object_type=object_type, fields=fields))
        )

    site = await create("site__c", city=s("Oslo"), account=ref(account))
    visit = await create("visit__c", note=s("hi"), customer=ref(account))
    client = await nats.connect(tenant.service.nats_url)
    try:
        event = events_pb2.ChangeEvent(
            event_id=str(uuid.uuid4()), tenant_id=tenant.id, service="core_entity", table_name="accounts",
            record_id=account, operation=common_pb2.OPERATION_DELETE,
        )  # fmt: skip
        await client.jetstream().publish(
            events.change_subject(tenant.id, "core_entity", "accounts", "DELETE"), event.SerializeToString()
        )
    finally:
        await client.close()
    for _ in range(100):
        try:
            await tenant.call("GetRecord", pb.GetRecordRequest(id=site.id))
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the master-detail child outlived its core master")
    kept = await tenant.call("GetRecord", pb.GetRecordRequest(id=visit.id))
    assert "customer" not in kept.fields  # type: ignore[attr-defined]


async def test_every_type_round_trips_and_filters_by_its_type(tenant: Tenant) -> None:
    await make_object(tenant, "gadget__c")
    tags = [pb.PicklistOption(value=v, order=i) for i, v in enumerate(["red", "green", "blue"])]
    await make_field(tenant, "gadget__c", "tags", "multipicklist", options=tags,
                     validation_rules=pb.ValidationRules(max_selections=2))  # fmt: skip
    await make_field(tenant, "gadget__c", "seen_at", "datetime", is_indexed=True)
    await make_field(tenant, "gadget__c", "share", "percent")
    await make_field(tenant, "gadget__c", "contact", "email", is_unique=True)
    await make_field(tenant, "gadget__c", "site", "url")
    await make_field(tenant, "gadget__c", "phone", "phone")
    await make_field(tenant, "gadget__c", "count", "number", is_indexed=True)
    await make_field(tenant, "gadget__c", "ok", "boolean", is_indexed=True)

    def stamp(iso: str) -> common_pb2.FieldValue:
        value = common_pb2.FieldValue()
        value.timestamp_value.FromJsonString(iso)
        return value

    def choose(*values: str) -> common_pb2.FieldValue:
        value = common_pb2.FieldValue()
        value.string_list_value.values.extend(values)
        return value

    rows = [
        ("a@example.com", ["red"], "2026-01-01T10:00:00Z", "12.5", 1, True),
        ("b@example.com", ["green", "blue"], "2026-06-01T10:00:00Z", "100", 20, False),
        ("c@example.com", [], "2025-06-01T23:59:59.5Z", "0", 300, True),
    ]
    for email, chosen, seen, share, count, ok in rows:
        created = await tenant.call(
            "CreateRecord",
            pb.CreateRecordRequest(
                record=pb.Record(
                    object_type="gadget__c",
                    fields={"contact": s(email), "tags": choose(*chosen), "seen_at": stamp(seen),
                            "share": d(share), "count": common_pb2.FieldValue(int_value=count),
                            "ok": common_pb2.FieldValue(bool_value=ok), "site": s("https://example.com"),
                            "phone": s("+47 22 33 44 55")},
                )
            ),
        )  # fmt: skip
        assert created.fields["seen_at"].timestamp_value.ToJsonString().startswith(seen[:19])  # type: ignore[attr-defined]

    async def emails(filter_text: str, order_by: str = "count") -> list[str]:
        reply = await tenant.call(
            "ListRecords",
            pb.ListRecordsRequest(object_type="gadget__c", filter=filter_text, order_by=order_by),
        )
        return [r.fields["contact"].string_value for r in reply.records]  # type: ignore[attr-defined]

    assert await emails("tags:blue") == ["b@example.com"]
    assert await emails("seen_at > 2025-12-31T00:00:00Z") == ["a@example.com", "b@example.com"]
    assert await emails("count >= 20 AND ok = true") == ["c@example.com"]
    assert await emails("share = 100") == ["b@example.com"]
    assert await emails("", order_by="seen_at desc") == ["b@example.com", "a@example.com", "c@example.com"]
    assert await emails('contact = "a@example.com"') == ["a@example.com"]
    code, _ = await fails(emails("tags > red"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = await fails(emails("", order_by="tags"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, violations = await fails(
        tenant.call(
            "CreateRecord",
            pb.CreateRecordRequest(
                record=pb.Record(
                    object_type="gadget__c",
                    fields={"contact": s("a@example.com"), "tags": choose("red", "green", "blue"),
                            "share": d("100.5"), "site": s("ftp://x"), "phone": s("abc")},
                )
            ),
        )
    )  # fmt: skip
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert {"record.fields.tags", "record.fields.share", "record.fields.site", "record.fields.phone"} <= set(
        violations
    )


async def test_concurrent_duplicates_meet_the_unique_index(tenant: Tenant) -> None:
    await make_object(tenant, "badge__c")
    await make_field(tenant, "badge__c", "code", "text", is_unique=True)

    def create() -> object:
        return tenant.call(
            "CreateRecord",
            pb.CreateRecordRequest(record=pb.Record(object_type="badge__c", fields={"code": s("X-1")})),
        )

    results = await asyncio.gather(*(create() for _ in range(6)), return_exceptions=True)
    assert sum(isinstance(r, pb.Record) for r in results) == 1
    errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert {e.code() for e in errors} == {grpc.StatusCode.ALREADY_EXISTS}


async def test_links_and_lookups_cannot_reach_another_tenant(service: Service) -> None:
    owner, stranger = Tenant(str(uuid.uuid4()), service), Tenant(str(uuid.uuid4()), service)
    for t in (owner, stranger):
        await make_object(t, "part__c")
        await make_field(t, "part__c", "code", "text")
        await t.call(
            "CreateCustomRelationship",
            pb.CreateCustomRelationshipRequest(
                relationship=pb.CustomRelationship(
                    relationship_name="parts_parts", from_object_type="part__c", to_object_type="part__c",
                    relationship_type="many_to_many", cardinality="many_to_many",
                )
            ),
        )  # fmt: skip
        await t.call(
            "CreateCustomRelationship",
            pb.CreateCustomRelationshipRequest(
                relationship=pb.CustomRelationship(
                    relationship_name="parent", from_object_type="part__c", to_object_type="part__c",
                    relationship_type="lookup", cardinality="many_to_one",
                )
            ),
        )  # fmt: skip
    theirs = await owner.call(
        "CreateRecord",
        pb.CreateRecordRequest(record=pb.Record(object_type="part__c", fields={"code": s("a")})),
    )
    mine = await stranger.call(
        "CreateRecord",
        pb.CreateRecordRequest(record=pb.Record(object_type="part__c", fields={"code": s("b")})),
    )
    code, violations = await fails(
        stranger.call(
            "LinkRecords",
            pb.LinkRecordsRequest(relationship="parts_parts", from_record_id=mine.id, to_record_id=theirs.id),  # type: ignore[attr-defined]
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "to_record_id" in violations
    code, violations = await fails(
        stranger.call(
            "CreateRecord",
            pb.CreateRecordRequest(
                record=pb.Record(object_type="part__c", fields={"parent": ref(theirs.id)})
            ),  # type: ignore[attr-defined]
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "record.fields.parent" in violations


async def test_usage_counts_are_flushed_to_the_definitions(tenant: Tenant) -> None:
    await make_object(tenant, "meter__c")
    field = await make_field(tenant, "meter__c", "reading", "number")
    tracker = UsageTracker()
    tracker.record(tenant.id, [uuid.UUID(field.id)] * 3)
    engine = create_engine(tenant.service.app_dsn, pool_size=1)
    try:
        assert await tracker.flush(session_factory(engine)) == 1
    finally:
        await engine.dispose()
    listed = await tenant.call("ListCustomFields", pb.ListCustomFieldsRequest(object_type="meter__c"))
    (shown,) = listed.fields  # type: ignore[attr-defined]
    assert shown.metadata.usage_count == 3
    assert shown.metadata.last_used_time.seconds > 0
    assert tracker.pending(tenant.id, uuid.UUID(field.id)) == 0


FUZZ_WORDS = [
    "budget", "start_date", "status", "project_name", "id", "create_time", "nope", "record_data", "AND", "OR",
    "NOT", "(", ")", "=", "!=", "<", ">=", ":", "-", "null", "true", "1e400", "-5", "2026-13-01",
    "2026-02-28",
    '"x\\"', "'", '"', "planning", "00000000-0000-0000-0000-000000000000", "1.005", "--", ";", "*", "%", "_",
]  # fmt: skip


async def test_random_filters_and_orders_never_fail_inside(tenant: Tenant) -> None:
    """Whatever a client sends as filter or order_by is answered OK or INVALID_ARGUMENT."""
    await make_project(tenant)
    await project(tenant, "A", "10", "2026-01-01", tenant.service.core.add())
    rng = random.Random(20261125)
    for _ in range(150):
        filter_text = " ".join(rng.choice(FUZZ_WORDS) for _ in range(rng.randint(1, 9)))
        order_by = ", ".join(
            f"{rng.choice(FUZZ_WORDS)}{rng.choice(['', ' desc', ' asc', ' sideways'])}"
            for _ in range(rng.randint(0, 3))
        )
        try:
            await list_names(tenant, filter_text, order_by)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (filter_text, order_by, error.details())


async def test_tenant_limits_answer_resource_exhausted(
    tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.custom_object.domain import rules

    monkeypatch.setattr(rules, "MAX_OBJECTS_PER_TENANT", 2)
    monkeypatch.setattr(rules, "MAX_FIELDS_PER_OBJECT", 1)
    await make_object(tenant, "one__c")
    await make_object(tenant, "two__c")
    code, _ = await fails(make_object(tenant, "three__c"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    await make_field(tenant, "one__c", "first", "text")
    code, _ = await fails(make_field(tenant, "one__c", "second", "text"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
