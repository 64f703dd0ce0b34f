"""Wires the tenant service: database runtime, use cases and servicers."""

from __future__ import annotations

import json
from pathlib import Path

import grpc

from crm.v1 import directory_pb2, directory_pb2_grpc, tenant_pb2, tenant_pb2_grpc
from services.tenant import SCHEMA, SERVICE
from services.tenant.domain.rules import PasswordPolicy
from services.tenant.entrypoints.grpc_api import DirectoryServicer, TenantServicer
from services.tenant.service_layer.tenants import TenantUseCases
from shared.config import TenantSettings
from shared.grpc_server import ServiceApp
from shared.runtime import DatabaseRuntime

MIGRATIONS = Path(__file__).parent / "migrations"


def build_app(settings: TenantSettings) -> ServiceApp:
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

    def use_cases() -> TenantUseCases:
        return TenantUseCases(runtime.session_maker(), PasswordPolicy())

    async def register_bootstrap_shards() -> None:
        await use_cases().register_shards(json.loads(settings.bootstrap_shards))

    def register(server: grpc.aio.Server) -> None:
        # Registrars run after start-up hooks, so the database is connected by now.
        cases = use_cases()
        tenant_pb2_grpc.add_TenantServiceServicer_to_server(TenantServicer(cases), server)
        directory_pb2_grpc.add_DirectoryServiceServicer_to_server(
            DirectoryServicer(cases, settings.credential_cache_seconds), server
        )

    app.startup.append(register_bootstrap_shards)
    app.registrars.append(register)
    return app
