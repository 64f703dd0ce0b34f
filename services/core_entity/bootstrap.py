"""Wires the core-entity service of one shard: database runtime and outbox relay, the custom
field definitions (read from the shard's custom-object service, dropped on definition-change
events), the custom field index keeper (builds as the schema owner, for CREATE INDEX
CONCURRENTLY), the use cases and the servicers."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from pathlib import Path

import grpc
from nats.aio.msg import Msg

from crm.v1 import core_entity_pb2, core_entity_pb2_grpc, data_admin_pb2_grpc, events_pb2
from services.core_entity import SCHEMA, SERVICE
from services.core_entity.adapters.custom_object_client import GrpcDefinitionSource
from services.core_entity.adapters.indexes import IndexBuilder, IndexKeeper
from services.core_entity.entrypoints import grpc_api
from services.core_entity.entrypoints.imports import ImportServicer
from services.core_entity.service_layer.custom_fields import CustomFields, DefinitionSource, NoDefinitions
from services.core_entity.service_layer.data_admin import DataAdmin
from services.core_entity.service_layer.entities import CoreEntities
from services.core_entity.service_layer.imports import prune_import_rows
from services.core_entity.settings import CoreEntitySettings
from shared.config import ShardServiceSettings
from shared.data_admin import DataAdminServicer
from shared.events import control_subject
from shared.grpc_server import ServiceApp
from shared.logging import get_logger
from shared.runtime import DatabaseRuntime
from shared.shard_guard import MembershipGuard

MIGRATIONS = Path(__file__).parent / "migrations"
FIRST_PRUNE_SECONDS = 300.0
log = get_logger(__name__)
SERVICE_NAMES = [
    core_entity_pb2.DESCRIPTOR.services_by_name[name].full_name
    for name in (
        "AccountService",
        "ContactService",
        "LeadService",
        "DealService",
        "PipelineService",
        "ActivityService",
        "ImportService",
    )
]


def build_app(settings: ShardServiceSettings, definitions: DefinitionSource | None = None) -> ServiceApp:
    """The service; `definitions` replaces the custom-object client (tests pass a fake)."""
    own = CoreEntitySettings.from_shard(settings)
    # The migration that creates the activity partitions reads the count from the environment.
    os.environ.setdefault("CRM_ACTIVITY_PARTITIONS", str(own.activity_partitions))
    runtime = DatabaseRuntime(SERVICE, [SCHEMA], MIGRATIONS, own)
    app = ServiceApp(name=f"{SERVICE}[{own.shard_name}]", settings=own, service_names=list(SERVICE_NAMES))
    runtime.attach(app)

    source: DefinitionSource = definitions or (
        GrpcDefinitionSource(own.custom_object_address, own.internal_token.get_secret_value())
        if own.custom_object_address
        else NoDefinitions()
    )
    # The app role owns no table and cannot create indexes (by design); the builder connects
    # with the owner DSN, the one migrations use.
    keeper = IndexKeeper(
        IndexBuilder(own.db_owner_url.get_secret_value(), own.custom_field_index_timeout_seconds)
        if own.custom_field_indexes
        else None
    )
    custom_fields = CustomFields(source, ttl_seconds=own.custom_field_cache_seconds, indexes=keeper)

    async def on_definition_change(message: Msg) -> None:
        event = events_pb2.ControlEvent()
        try:
            event.ParseFromString(message.data)
        except Exception:  # a malformed event must not stop the subscription; drop everything
            custom_fields.forget()
            return
        custom_fields.forget(event.tenant_id or None)

    async def subscribe_to_definition_changes() -> None:
        assert runtime.nats is not None
        # Plain (not durable) subscription: every replica keeps its own cache, and a missed
        # event only lasts until the cache entry expires.
        await runtime.nats.subscribe(
            control_subject(events_pb2.CONTROL_EVENT_KIND_CUSTOM_FIELD_CHANGED), cb=on_definition_change
        )

    async def close_source() -> None:
        if isinstance(source, GrpcDefinitionSource):
            await source.close()

    def register(server: grpc.aio.Server) -> None:
        entities = CoreEntities(
            runtime.session_maker(),
            custom_fields,
            retention_days=own.undelete_retention_days,
            guard=MembershipGuard(own.shard_membership_check),
        )
        core_entity_pb2_grpc.add_AccountServiceServicer_to_server(grpc_api.AccountServicer(entities), server)
        core_entity_pb2_grpc.add_ContactServiceServicer_to_server(grpc_api.ContactServicer(entities), server)
        core_entity_pb2_grpc.add_LeadServiceServicer_to_server(grpc_api.LeadServicer(entities), server)
        core_entity_pb2_grpc.add_DealServiceServicer_to_server(grpc_api.DealServicer(entities), server)
        core_entity_pb2_grpc.add_PipelineServiceServicer_to_server(
            grpc_api.PipelineServicer(entities), server
        )
        core_entity_pb2_grpc.add_ActivityServiceServicer_to_server(
            grpc_api.ActivityServicer(entities), server
        )
        core_entity_pb2_grpc.add_ImportServiceServicer_to_server(ImportServicer(entities), server)
        data_admin_pb2_grpc.add_DataAdminServiceServicer_to_server(
            DataAdminServicer(DataAdmin(entities)), server
        )

    async def import_rows_schedule() -> None:
        # First run a few minutes after start: a service restarted more often than the interval
        # would otherwise never prune. A failed run ends the task, which the app restarts.
        await asyncio.sleep(min(own.import_prune_interval_seconds, FIRST_PRUNE_SECONDS))
        while True:
            pruned = await prune_import_rows(
                runtime.session_maker(), dt.timedelta(days=own.import_retry_days)
            )
            log.info("forgot rows of older imports", rows=pruned)
            await asyncio.sleep(own.import_prune_interval_seconds)

    app.startup.append(subscribe_to_definition_changes)
    if own.import_prune_interval_seconds > 0:
        app.background.append(import_rows_schedule)
    app.registrars.append(register)
    app.shutdown.insert(0, close_source)
    # Before the runtime's own shutdown; a build cut short is redone by a later process.
    app.shutdown.insert(0, keeper.close)
    return app
