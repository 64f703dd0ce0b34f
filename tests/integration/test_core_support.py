"""The core-entity service in-process on a scratch shard database, shared by the core
integration tests (imported by them; this module holds no tests of its own).

Each test makes its own tenant id, so tests never see each other's rows."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from crm.v1 import core_entity_pb2 as pb
from crm.v1 import core_entity_pb2_grpc as pb_grpc
from services.core_entity.bootstrap import build_app
from services.core_entity.settings import CoreEntitySettings
from shared.fieldtypes import FieldDefinition
from shared.grpc_server import ServiceApp
from shared.provisioning import Roles, drop_database, dsn_for, ensure_database, ensure_roles
from tests.backends import Backends

TOKEN = "core-test-token"


@dataclass
class FakeDefinitions:
    """Custom field definitions by (tenant, entity type), as the custom-object service would
    answer; `calls` counts lookups so tests can see the cache."""

    fields: dict[tuple[str, str], list[FieldDefinition]] = field(default_factory=dict)
    calls: int = 0

    async def definitions(self, tenant_id: str, entity_type: str) -> list[FieldDefinition]:
        self.calls += 1
        return list(self.fields.get((tenant_id, entity_type), []))


@dataclass
class CoreService:
    app: ServiceApp
    address: str
    owner_dsn: str
    app_dsn: str
    definitions: FakeDefinitions


@pytest.fixture(scope="session")
async def core_service(backends: Backends) -> AsyncIterator[CoreService]:
    prefix = "crmt" + secrets.token_hex(4)
    roles = Roles(f"{prefix}_owner", "owner-pw", f"{prefix}_app", "app-pw")
    database = f"{prefix}_core"
    await ensure_roles(backends.database_url, roles)
    await ensure_database(backends.database_url, database, roles)
    owner = dsn_for(backends.database_url, database, roles.owner, roles.owner_password)
    app_dsn = dsn_for(backends.database_url, database, roles.app, roles.app_password)
    settings = CoreEntitySettings(
        db_url=app_dsn,  # type: ignore[arg-type]
        db_owner_url=owner,  # type: ignore[arg-type]
        internal_token=TOKEN,  # type: ignore[arg-type]
        nats_url=backends.nats_url,
        port=0,
        custom_object_address="",
        log_level="warning",
    )
    definitions = FakeDefinitions()
    app = build_app(settings, definitions=definitions)
    port = await app.start()
    yield CoreService(app, f"127.0.0.1:{port}", owner, app_dsn, definitions)
    await app.stop()
    await drop_database(backends.database_url, database)


class Tenant:
    """Stubs that call as one tenant (and user), with the internal credential."""

    def __init__(self, channel: grpc.aio.Channel, tenant_id: str | None = None) -> None:
        self.id = tenant_id or str(uuid.uuid4())
        self.user_id = str(uuid.uuid4())
        self.metadata = (
            ("x-crm-internal-token", TOKEN),
            ("x-crm-tenant-id", self.id),
            ("x-crm-user-id", self.user_id),
        )
        self.accounts = pb_grpc.AccountServiceStub(channel)
        self.contacts = pb_grpc.ContactServiceStub(channel)
        self.leads = pb_grpc.LeadServiceStub(channel)
        self.deals = pb_grpc.DealServiceStub(channel)
        self.pipelines = pb_grpc.PipelineServiceStub(channel)
        self.activities = pb_grpc.ActivityServiceStub(channel)
        self.imports = pb_grpc.ImportServiceStub(channel)

    async def call(self, stub: Any, method: str, request: Any) -> Any:
        return await getattr(stub, method)(request, metadata=self.metadata, timeout=20)

    async def account(self, **fields: Any) -> pb.Account:
        fields.setdefault("name", "Acme " + secrets.token_hex(3))
        return await self.call(
            self.accounts, "CreateAccount", pb.CreateAccountRequest(account=pb.Account(**fields))
        )

    async def contact(self, **fields: Any) -> pb.Contact:
        fields.setdefault("first_name", "Ada")
        fields.setdefault("last_name", "Lovelace")
        return await self.call(
            self.contacts, "CreateContact", pb.CreateContactRequest(contact=pb.Contact(**fields))
        )

    async def lead(self, **fields: Any) -> pb.Lead:
        fields.setdefault("first_name", "Grace")
        fields.setdefault("last_name", "Hopper")
        return await self.call(self.leads, "CreateLead", pb.CreateLeadRequest(lead=pb.Lead(**fields)))

    async def pipeline(self, default: bool = True, name: str = "Sales Pipeline") -> pb.Pipeline:
        stages = [
            pb.PipelineStage(name="Prospecting", probability="10"),
            pb.PipelineStage(name="Qualification", probability="25"),
            pb.PipelineStage(name="Proposal", probability="50"),
            pb.PipelineStage(name="Negotiation", probability="75"),
            pb.PipelineStage(name="Closed Won", probability="100", is_closed=True, is_won=True),
            pb.PipelineStage(name="Closed Lost", probability="0", is_closed=True),
        ]
        return await self.call(
            self.pipelines,
            "CreatePipeline",
            pb.CreatePipelineRequest(pipeline=pb.Pipeline(name=name, is_default=default, stages=stages)),
        )

    async def deal(self, **fields: Any) -> pb.Deal:
        fields.setdefault("name", "Big deal")
        return await self.call(self.deals, "CreateDeal", pb.CreateDealRequest(deal=pb.Deal(**fields)))


@pytest.fixture
async def channel(core_service: CoreService) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(core_service.address) as opened:
        yield opened


@pytest.fixture
def tenant(channel: grpc.aio.Channel) -> Tenant:
    return Tenant(channel)


@pytest.fixture
def other_tenant(channel: grpc.aio.Channel) -> Tenant:
    return Tenant(channel)


def violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "the error carries no google.rpc.Status"
    found: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.update({v.field: v.description for v in bad.field_violations})
        if detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            failure = error_details_pb2.PreconditionFailure()
            detail.Unpack(failure)
            found.update({v.subject: v.type for v in failure.violations})
    return found


async def fails(code: grpc.StatusCode, call: Any) -> grpc.aio.AioRpcError:
    """Awaits `call` and returns its error, asserting the status code."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() is code, f"{caught.value.code()}: {caught.value.details()}"
    return caught.value
