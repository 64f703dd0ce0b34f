"""gRPC servicers of the tenant service: translate messages to use-case calls and back."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from crm.v1 import directory_pb2, directory_pb2_grpc, tenant_pb2, tenant_pb2_grpc
from services.tenant.service_layer.configuration import ConfigurationUseCases
from services.tenant.service_layer.shards import ShardSpec, ShardUseCases
from services.tenant.service_layer.tenants import NewTenant, TenantUseCases
from services.tenant.service_layer.users import UserUseCases
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
STATUS_FROM_PROTO = {value: key for key, value in STATUS_TO_PROTO.items()}
ROLE_TO_PROTO = {
    "admin": tenant_pb2.USER_ROLE_ADMIN,
    "member": tenant_pb2.USER_ROLE_MEMBER,
    "read_only": tenant_pb2.USER_ROLE_READ_ONLY,
}
ROLE_FROM_PROTO = {value: key for key, value in ROLE_TO_PROTO.items()}
PHASE_TO_PROTO = {
    "pending": tenant_pb2.TENANT_MOVE_PHASE_PENDING,
    "copying": tenant_pb2.TENANT_MOVE_PHASE_COPYING,
    "catching_up": tenant_pb2.TENANT_MOVE_PHASE_CATCHING_UP,
    "blocked": tenant_pb2.TENANT_MOVE_PHASE_BLOCKED,
    "cleaning_up": tenant_pb2.TENANT_MOVE_PHASE_CLEANING_UP,
    "completed": tenant_pb2.TENANT_MOVE_PHASE_COMPLETED,
    "failed": tenant_pb2.TENANT_MOVE_PHASE_FAILED,
}


def json_value(value: Any) -> struct_pb2.Value:
    message = struct_pb2.Value()
    json_format.ParseDict(value, message)
    return message


def from_json_value(message: struct_pb2.Value, present: bool) -> Any:
    """The Python value of a google.protobuf.Value; None when the field was not sent."""
    if not present:
        return None
    return json_format.MessageToDict(message)


def user_message(row: dict[str, Any]) -> tenant_pb2.User:
    return tenant_pb2.User(
        id=row["id"],
        email=row["email"],
        first_name=row["first_name"],
        last_name=row["last_name"],
        role=ROLE_TO_PROTO[row["role"]],
        active=row["is_active"],
        locked_until=protoconv.timestamp(row.get("locked_until")),
        last_login_time=protoconv.timestamp(row.get("last_login_at")),
        create_time=protoconv.timestamp(row["created_at"]),
        update_time=protoconv.timestamp(row["updated_at"]),
        etag=protoconv.etag(row["version"]),
    )


def api_key_message(row: dict[str, Any]) -> tenant_pb2.ApiKey:
    return tenant_pb2.ApiKey(
        id=row["id"],
        name=row["name"],
        prefix=row["prefix"],
        scopes=list(row["scopes"]),
        user_id=row["user_id"],
        create_time=protoconv.timestamp(row["created_at"]),
        revoke_time=protoconv.timestamp(row.get("revoked_at")),
    )


def configuration_message(row: dict[str, Any]) -> tenant_pb2.Configuration:
    return tenant_pb2.Configuration(
        category=row["config_category"],
        key=row["config_key"],
        value=json_value(row["config_value"]),
        is_encrypted=row["is_encrypted"],
        create_time=protoconv.timestamp(row["created_at"]),
        update_time=protoconv.timestamp(row["updated_at"]),
        etag=protoconv.etag(row["version"]),
    )


def metadata_message(row: dict[str, Any]) -> tenant_pb2.SystemMetadata:
    return tenant_pb2.SystemMetadata(
        id=row["id"],
        tenant_id=str(row.get("tenant_id") or ""),
        metadata_type=row["metadata_type"],
        metadata_key=row["metadata_key"],
        value=json_value(row["metadata_value"]),
        description=row.get("description") or "",
        is_system=row["is_system"],
        create_time=protoconv.timestamp(row["created_at"]),
        update_time=protoconv.timestamp(row["updated_at"]),
    )


def shard_message(row: dict[str, Any]) -> tenant_pb2.Shard:
    return tenant_pb2.Shard(
        id=row["id"],
        name=row["name"],
        core_entity_address=row["core_entity_address"],
        custom_object_address=row["custom_object_address"],
        max_tenants=row["max_tenants"],
        active=row["is_active"],
        dedicated=row["is_dedicated"],
        tenant_count=int(row.get("tenant_count") or 0),
        create_time=protoconv.timestamp(row["created_at"]),
        has_database_url=bool(row.get("has_database_url")),
    )


def move_message(row: dict[str, Any]) -> tenant_pb2.TenantMove:
    return tenant_pb2.TenantMove(
        id=row["id"],
        tenant_id=row["tenant_id"],
        source_shard_id=row["source_shard_id"],
        target_shard_id=row["target_shard_id"],
        phase=PHASE_TO_PROTO[row["phase"]],
        rows_copied=row["rows_copied"],
        rows_total=row["rows_total"],
        errors=[str(e) for e in row["errors"]],
        write_block_ms=row["write_block_ms"],
        epoch=row["epoch"],
        create_time=protoconv.timestamp(row["created_at"]),
        update_time=protoconv.timestamp(row["updated_at"]),
        verified_tables=[str(v) for v in row["verified_tables"]],
    )


def shard_spec(shard: tenant_pb2.Shard) -> ShardSpec:
    return ShardSpec(
        name=shard.name,
        core_entity_address=shard.core_entity_address,
        custom_object_address=shard.custom_object_address,
        database_url=shard.database_url,
        owner_database_url=shard.owner_database_url,
        max_tenants=shard.max_tenants,
        active=shard.active,
        dedicated=shard.dedicated,
    )


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
    def __init__(
        self,
        use_cases: TenantUseCases,
        users: UserUseCases,
        configuration: ConfigurationUseCases,
        shards: ShardUseCases,
    ) -> None:
        self._use_cases = use_cases
        self._users = users
        self._configuration = configuration
        self._shards = shards

    # --- tenants -------------------------------------------------------------------------------

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
            ),
            dedicated=request.dedicated_shard,
        )
        return tenant_pb2.CreateTenantResponse(
            tenant=tenant_message(onboarded.tenant),
            admin_user_id=onboarded.admin_user_id,
            api_key_id=onboarded.api_key_id,
            api_key=onboarded.api_key,
            default_pipeline_id=onboarded.default_pipeline_id,
        )

    async def GetTenant(
        self, request: tenant_pb2.GetTenantRequest, context: grpc.aio.ServicerContext
    ) -> tenant_pb2.Tenant:
        return tenant_message(await self._use_cases.get_tenant(request.id))

    async def ListTenants(
        self, request: tenant_pb2.ListTenantsRequest, context: grpc.aio.ServicerContext
    ) -> tenant_pb2.ListTenantsResponse:
        rows, token, total = await self._use_cases.list_tenants(
            request.page_size, request.page_token, request.filter
        )
        return tenant_pb2.ListTenantsResponse(
            tenants=[tenant_message(r) for r in rows], next_page_token=token, total_size=total
        )

    async def UpdateTenant(
        self, request: tenant_pb2.UpdateTenantRequest, context: grpc.aio.ServicerContext
    ) -> tenant_pb2.Tenant:
        tenant = request.tenant
        changes = {
            "name": tenant.name,
            "plan_type": PLAN_FROM_PROTO.get(tenant.plan_type, "?"),
            "status": STATUS_FROM_PROTO.get(tenant.status, "?"),
            "settings": protoconv.from_struct(tenant.settings),
        }
        return tenant_message(
            await self._use_cases.update_tenant(
                tenant.id, tenant.etag, list(request.update_mask.paths), changes
            )
        )

    async def DeleteTenant(
        self, request: tenant_pb2.DeleteTenantRequest, context: grpc.aio.ServicerContext
    ) -> tenant_pb2.Tenant:
        return tenant_message(await self._use_cases.delete_tenant(request.id, request.etag))

    # --- users and sign-in ----------------------------------------------------------------------

    async def CreateUser(
        self, request: tenant_pb2.CreateUserRequest, context: grpc.aio.ServicerContext
    ) -> tenant_pb2.User:
        user = request.user
        role = ROLE_FROM_PROTO.get(user.role, "member" if user.role == 0 else "?")
        return user_message(
            await self._users.create_user(user.email, user.first_name, user.last_name, role, request.password)
        )

    async def ListUsers(
        self, request: tenant_pb2.ListUsersRequest, context: grpc.aio.ServicerContext
    ) -> tenant_pb2.ListUsersResponse:
        rows, token, total = await self._users.list_users(request.page_size, request.page_token)
        return tenant_pb2.ListUsersResponse(
            users=[user_message(r) for r in rows], next_page_token=token, total_size=total
        )

    async def UpdateUser(
        self, request: tenant_pb2.UpdateUserRequest, context: grpc.aio.ServicerContext
    ) -> tenant_pb2.User:
        user = request.user
        changes = {
            "first_name": user.first_name,
            "last_name": user.last_name,
            "role": ROLE_FROM_PROTO.get(user.role, "?"),
            "active": user.active,
        }
        return user_message(
            await self._users.update_user(
                user.id, user.etag, list(request.update_mask.paths), changes, request.password
            )
        )

    async def Authenticate(
        self, request: tenant_pb2.AuthenticateRequest, context: grpc.aio.ServicerContext
    ) -> tenant_pb2.AuthenticateResponse:
        signed_in = await self._users.authenticate(request.subdomain, request.email, request.password)
        return tenant_pb2.AuthenticateResponse(
            session_token=signed_in.token,
            expire_time=protoconv.timestamp(signed_in.expires_at),
            session_id=signed_in.session_id,
            user=user_message(signed_in.user),
            tenant_id=signed_in.tenant_id,
        )

    async def Logout(
        self, request: tenant_pb2.LogoutRequest, context: grpc.aio.ServicerContext
    ) -> tenant_pb2.LogoutResponse:
        return tenant_pb2.LogoutResponse(session_id=await self._users.logout())

    # --- API keys ----------------------------------------------------------------------------------

    async def CreateApiKey(
        self, request: tenant_pb2.CreateApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> tenant_pb2.CreateApiKeyResponse:
        issued = await self._users.create_api_key(request.api_key.name, list(request.api_key.scopes))
        return tenant_pb2.CreateApiKeyResponse(api_key=api_key_message(issued.api_key), key=issued.plaintext)

    async def ListApiKeys(
        self, request: tenant_pb2.ListApiKeysRequest, context: grpc.aio.ServicerContext
    ) -> tenant_pb2.ListApiKeysResponse:
        rows, token, total = await self._users.list_api_keys(request.page_size, request.page_token)
        return tenant_pb2.ListApiKeysResponse(
            api_keys=[api_key_message(r) for r in rows], next_page_token=token, total_size=total
        )

    async def RevokeApiKey(
        self, request: tenant_pb2.RevokeApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> tenant_pb2.ApiKey:
        return api_key_message(await self._users.revoke_api_key(request.id))

    # --- configuration and metadata ----------------------------------------------------------

    async def GetConfiguration(
        self, request: tenant_pb2.GetConfigurationRequest, context: grpc.aio.ServicerContext
    ) -> tenant_pb2.Configuration:
        return configuration_message(await self._configuration.get(request.category, request.key))

    async def SetConfiguration(
        self, request: tenant_pb2.SetConfigurationRequest, context: grpc.aio.ServicerContext
    ) -> tenant_pb2.Configuration:
        config = request.configuration
        value = from_json_value(config.value, config.HasField("value"))
        return configuration_message(
            await self._configuration.set(
                config.category, config.key, value, config.is_encrypted, config.etag
            )
        )

    async def ListConfigurations(
        self, request: tenant_pb2.ListConfigurationsRequest, context: grpc.aio.ServicerContext
    ) -> tenant_pb2.ListConfigurationsResponse:
        rows, token, total = await self._configuration.list_configurations(
            request.category, request.page_size, request.page_token
        )
        return tenant_pb2.ListConfigurationsResponse(
            configurations=[configuration_message(r) for r in rows], next_page_token=token, total_size=total
        )

    async def ListSystemMetadata(
        self, request: tenant_pb2.ListSystemMetadataRequest, context: grpc.aio.ServicerContext
    ) -> tenant_pb2.ListSystemMetadataResponse:
        rows, token, total = await self._configuration.list_metadata(
            request.metadata_type, request.tenant_id, request.page_size, request.page_token
        )
        return tenant_pb2.ListSystemMetadataResponse(
            system_metadata=[metadata_message(r) for r in rows], next_page_token=token, total_size=total
        )

    async def SetSystemMetadata(
        self, request: tenant_pb2.SetSystemMetadataRequest, context: grpc.aio.ServicerContext
    ) -> tenant_pb2.SystemMetadata:
        entry = request.system_metadata
        return metadata_message(
            await self._configuration.set_metadata(
                entry.tenant_id,
                entry.metadata_type,
                entry.metadata_key,
                from_json_value(entry.value, entry.HasField("value")),
                entry.description,
            )
        )

    # --- shards and moves ----------------------------------------------------------------------

    async def CreateShard(
        self, request: tenant_pb2.CreateShardRequest, context: grpc.aio.ServicerContext
    ) -> tenant_pb2.Shard:
        return shard_message(await self._shards.create_shard(shard_spec(request.shard)))

    async def ListShards(
        self, request: tenant_pb2.ListShardsRequest, context: grpc.aio.ServicerContext
    ) -> tenant_pb2.ListShardsResponse:
        return tenant_pb2.ListShardsResponse(
            shards=[shard_message(r) for r in await self._shards.list_shards()]
        )

    async def UpdateShard(
        self, request: tenant_pb2.UpdateShardRequest, context: grpc.aio.ServicerContext
    ) -> tenant_pb2.Shard:
        return shard_message(
            await self._shards.update_shard(
                request.shard.id, list(request.update_mask.paths), shard_spec(request.shard)
            )
        )

    async def MoveTenant(
        self, request: tenant_pb2.MoveTenantRequest, context: grpc.aio.ServicerContext
    ) -> tenant_pb2.TenantMove:
        return move_message(await self._shards.move_tenant(request.tenant_id, request.target_shard_id))

    async def GetTenantMove(
        self, request: tenant_pb2.GetTenantMoveRequest, context: grpc.aio.ServicerContext
    ) -> tenant_pb2.TenantMove:
        return move_message(await self._shards.get_move(request.id))


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
            session_id=resolved.session_id,
            scopes=resolved.scopes,
            email=resolved.email,
            cache_seconds=min(self._cache_seconds, resolved.cache_seconds),
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
