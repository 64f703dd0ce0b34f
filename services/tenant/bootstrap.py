"""Wires the tenant service: database runtime, use cases and servicers."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import grpc

from crm.v1 import directory_pb2, directory_pb2_grpc, tenant_pb2, tenant_pb2_grpc
from services.tenant import SCHEMA, SERVICE
from services.tenant.adapters.pipeline import GrpcPipelineProvisioner, NoPipelineService, PipelineProvisioner
from services.tenant.adapters.secrets_box import SecretBox
from services.tenant.entrypoints.grpc_api import DirectoryServicer, TenantServicer
from services.tenant.service_layer.configuration import ConfigurationUseCases
from services.tenant.service_layer.shards import ShardUseCases
from services.tenant.service_layer.tenants import TenantUseCases
from services.tenant.service_layer.users import AuthSettings, UserUseCases
from shared.config import TenantSettings
from shared.grpc_server import ServiceApp
from shared.runtime import DatabaseRuntime

MIGRATIONS = Path(__file__).parent / "migrations"


def build_app(settings: TenantSettings, pipelines: PipelineProvisioner | None = None) -> ServiceApp:
    runtime = DatabaseRuntime(SERVICE, [SCHEMA], MIGRATIONS, settings)
    app = ServiceApp(
        name=SERVICE,
        settings=settings,
        service_names=[
            tenant_pb2.DESCRIPTOR.services_by_name["TenantService"].full_name,
            directory_pb2.DESCRIPTOR.services_by_name["DirectoryService"].full_name,
        ],
    )
    runtime.attach(app)
    box = SecretBox(settings.encryption_key.get_secret_value(), settings.internal_token.get_secret_value())
    grpc_pipelines = GrpcPipelineProvisioner(
        settings.internal_token.get_secret_value(), settings.onboarding_call_seconds
    )
    provisioner: PipelineProvisioner = pipelines or (
        grpc_pipelines if settings.onboarding_pipeline else NoPipelineService()
    )
    holder: dict[str, ShardUseCases] = {}

    def shard_cases() -> ShardUseCases:
        if "shards" not in holder:
            holder["shards"] = ShardUseCases(runtime.session_maker(), box)
        return holder["shards"]

    async def register_bootstrap_shards() -> None:
        await shard_cases().check_encryption_key()
        await shard_cases().register_bootstrap_shards(json.loads(settings.bootstrap_shards))
        await shard_cases().fail_interrupted_moves()

    def register(server: grpc.aio.Server) -> None:
        # Registrars run after start-up hooks, so the database is connected by now.
        sessions = runtime.session_maker()
        cases = TenantUseCases(sessions, shard_cases(), provisioner, settings.credential_cache_seconds)
        users = UserUseCases(
            sessions,
            AuthSettings(
                session_ttl=dt.timedelta(seconds=settings.session_ttl_seconds),
                lockout_threshold=settings.lockout_threshold,
                lockout=dt.timedelta(seconds=settings.lockout_seconds),
            ),
        )
        tenant_pb2_grpc.add_TenantServiceServicer_to_server(
            TenantServicer(cases, users, ConfigurationUseCases(sessions, box), shard_cases()), server
        )
        directory_pb2_grpc.add_DirectoryServiceServicer_to_server(
            DirectoryServicer(cases, settings.credential_cache_seconds), server
        )

    app.startup.append(register_bootstrap_shards)
    app.shutdown.append(grpc_pipelines.close)
    app.registrars.append(register)
    return app
