"""gRPC servicers of the tenant service: translate messages to use-case calls and back."""

from __future__ import annotations

from typing import Any

import grpc

from crm.v1 import directory_pb2, directory_pb2_grpc, tenant_pb2, tenant_pb2_grpc
from services.tenant.service_layer.tenants import NewTenant, TenantUseCases
from shared import protoconv
from shared.context import current_call

PLAN_TO_PROTO = {
    "basic": tenant_pb2.PLAN_TYPE_BASIC,
    "professional": tenant_pb2.PLAN_TYPE_PROFESSIONAL,
    "enterprise": tenant_pb2.PLAN_TYPE_ENTERPRISE,
}
PLAN_FROM_PROTO = {value: key for key, value in PLAN_TO_PROTO.items()}
STATUS_TO_PROTO = {
    "active": tenant_pb2.TENANT_STATUS_ACTIVE,
    "suspended": tenant_pb2.TENANT_STATUS_SUSPENDED,
    "cancelled": tenant_pb2.TENANT_STATUS_CANCELLED,
}


def tenant_message(row: dict[str, Any]) -> tenant_pb2.Tenant:
    return tenant_pb2.Tenant(
        id=row["id"],
        name=row["name"],
        subdomain=row["subdomain"],
        plan_type=PLAN_TO_PROTO[row["plan_type"]],
        status=STATUS_TO_PROTO[row["status"]],
        settings=protoconv.struct(row.get("settings")),
        shard_id=str(row.get("shard_id") or ""),
        create_time=protoconv.timestamp(row["created_at"]),
        update_time=protoconv.timestamp(row["updated_at"]),
        etag=protoconv.etag(row["version"]),
    )


class TenantServicer(tenant_pb2_grpc.TenantServiceServicer):
    def __init__(self, use_cases: TenantUseCases) -> None:
        self._use_cases = use_cases

    async def CreateTenant(
        self, request: tenant_pb2.CreateTenantRequest, context: grpc.aio.ServicerContext
    ) -> tenant_pb2.CreateTenantResponse:
        plan = PLAN_FROM_PROTO.get(
            request.tenant.plan_type, "basic" if request.tenant.plan_type == 0 else "?"
        )
        onboarded = await self._use_cases.create_tenant(
            NewTenant(
                name=request.tenant.name,
                subdomain=request.tenant.subdomain,
                plan_type=plan,
                settings=protoconv.from_struct(request.tenant.settings),
                admin_email=request.admin_email,
                admin_first_name=request.admin_first_name,
                admin_last_name=request.admin_last_name,
                admin_password=request.admin_password,
                request_id=request.request_id or current_call().request_id,
            )
        )
        return tenant_pb2.CreateTenantResponse(
            tenant=tenant_message(onboarded.tenant),
            admin_user_id=onboarded.admin_user_id,
            api_key_id=onboarded.api_key_id,
            api_key=onboarded.api_key,
        )

    async def GetTenant(
        self, request: tenant_pb2.GetTenantRequest, context: grpc.aio.ServicerContext
    ) -> tenant_pb2.Tenant:
        return tenant_message(await self._use_cases.get_tenant(request.id))


class DirectoryServicer(directory_pb2_grpc.DirectoryServiceServicer):
    def __init__(self, use_cases: TenantUseCases, cache_seconds: int) -> None:
        self._use_cases = use_cases
        self._cache_seconds = cache_seconds

    async def ResolveCredential(
        self, request: directory_pb2.ResolveCredentialRequest, context: grpc.aio.ServicerContext
    ) -> directory_pb2.ResolveCredentialResponse:
        resolved = await self._use_cases.resolve_credential(request.credential)
        return directory_pb2.ResolveCredentialResponse(
            tenant_id=resolved.tenant_id,
            user_id=resolved.user_id,
            api_key_id=resolved.api_key_id,
            scopes=resolved.scopes,
            email=resolved.email,
            cache_seconds=self._cache_seconds,
        )

    async def GetTenantRoute(
        self, request: directory_pb2.GetTenantRouteRequest, context: grpc.aio.ServicerContext
    ) -> directory_pb2.TenantRoute:
        route = await self._use_cases.tenant_route(request.tenant_id)
        return directory_pb2.TenantRoute(
            tenant_id=route["id"],
            shard_id=route["shard_id"],
            epoch=route["epoch"],
            status=route["status"],
            plan_type=route["plan_type"],
        )

    async def ListShardRoutes(
        self, request: directory_pb2.ListShardRoutesRequest, context: grpc.aio.ServicerContext
    ) -> directory_pb2.ListShardRoutesResponse:
        return directory_pb2.ListShardRoutesResponse(
            shards=[
                directory_pb2.ShardRoute(
                    shard_id=row["id"],
                    name=row["name"],
                    core_entity_address=row["core_entity_address"],
                    custom_object_address=row["custom_object_address"],
                    active=row["is_active"],
                )
                for row in await self._use_cases.shard_routes()
            ]
        )
