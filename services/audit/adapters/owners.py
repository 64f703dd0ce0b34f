"""Calls to the services that own the data: where a tenant's tables live, and their internal
DataAdminService (restore, retention, erasure, counts).

The tenant service's own tables are served at its address; core-entity and custom-object
tables at the backends of the tenant's shard, found through the tenant service's
DirectoryService (cached for a few seconds, like the gateway does). Every call carries the
internal credential and the tenant and request ids in metadata.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from crm.v1 import data_admin_pb2_grpc, directory_pb2, directory_pb2_grpc
from shared import context as callctx
from shared.errors import (
    Aborted,
    AlreadyExists,
    CrmError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unavailable,
    invalid,
)
from shared.grpc_server import insecure_channel, internal_metadata

T = TypeVar("T")

TENANT = "tenant"
CORE_ENTITY = "core_entity"
CUSTOM_OBJECT = "custom_object"
OWNING_SERVICES = (TENANT, CORE_ENTITY, CUSTOM_OBJECT)

# Tables whose owner is known without looking at the audit log (a retention policy may name a
# table that has no audit entry yet). Anything else is looked up from the audit log's service.
KNOWN_OWNERS = {
    "tenants": TENANT,
    "users": TENANT,
    "api_keys": TENANT,
    "tenant_configurations": TENANT,
    "accounts": CORE_ENTITY,
    "contacts": CORE_ENTITY,
    "leads": CORE_ENTITY,
    "deals": CORE_ENTITY,
    "pipelines": CORE_ENTITY,
    "pipeline_stages": CORE_ENTITY,
    "activities": CORE_ENTITY,
    "custom_objects": CUSTOM_OBJECT,
    "custom_fields": CUSTOM_OBJECT,
    "custom_object_records": CUSTOM_OBJECT,
    "custom_records": CUSTOM_OBJECT,
    "record_links": CUSTOM_OBJECT,
}

# As the gateway: a moved tenant or a re-addressed shard is seen within seconds.
ROUTE_CACHE_SECONDS = 5.0
SHARD_CACHE_SECONDS = 10.0

_STATUS_ERRORS: dict[grpc.StatusCode, type[CrmError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
}


def _field_violations(exc: grpc.aio.AioRpcError) -> list[FieldViolation]:
    status = rpc_status.from_call(exc)
    found: list[FieldViolation] = []
    for detail in status.details if status is not None else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            found += [FieldViolation(v.field, v.description) for v in bad_request.field_violations]
    return found


def owner_error(service: str, exc: grpc.aio.AioRpcError) -> CrmError:
    """An owner's refusal, passed on with its meaning (and its field violations); anything
    else is "try again later"."""
    code = exc.code()
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        violations = _field_violations(exc)
        if violations:
            return InvalidArgument(violations)
        return invalid("table_name", f"refused by the {service} service: {exc.details()}")
    if code in _STATUS_ERRORS:
        return _STATUS_ERRORS[code](f"{service} service: {exc.details()}")
    if code is grpc.StatusCode.UNIMPLEMENTED:
        return Unavailable(f"the {service} service does not offer data administration yet")
    return Unavailable(f"the {service} service is unavailable ({code.name}); retry")


class Owners:
    """Channels to the owning services, created lazily inside the running loop."""

    def __init__(self, tenant_address: str, internal_token: str, timeout: float) -> None:
        self._tenant_address = tenant_address
        self._token = internal_token
        self.timeout = timeout
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._routes: dict[str, tuple[float, str]] = {}
        self._shards: dict[str, directory_pb2.ShardRoute] = {}
        self._shards_expire = 0.0

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = insecure_channel(address)
        return self._channels[address]

    def metadata(self, tenant_id: str) -> tuple[tuple[str, str], ...]:
        call = callctx.current_call()
        pairs = [(callctx.TENANT_ID_KEY, tenant_id), (callctx.REQUEST_ID_KEY, call.request_id or "audit")]
        if call.user_id:
            pairs.append((callctx.USER_ID_KEY, call.user_id))
        return internal_metadata(self._token, pairs)

    async def _shard_of(self, tenant_id: str) -> directory_pb2.ShardRoute:
        if not self._tenant_address:
            raise Unavailable("the audit service has no tenant service address (CRM_TENANT_ADDRESS)")
        directory = directory_pb2_grpc.DirectoryServiceStub(self._channel(self._tenant_address))
        meta = internal_metadata(self._token)
        cached = self._routes.get(tenant_id)
        try:
            if cached is None or cached[0] < time.monotonic():
                route = await directory.GetTenantRoute(
                    directory_pb2.GetTenantRouteRequest(tenant_id=tenant_id), metadata=meta, timeout=5
                )
                self._routes[tenant_id] = (time.monotonic() + ROUTE_CACHE_SECONDS, route.shard_id)
                shard_id = route.shard_id
            else:
                shard_id = cached[1]
            if shard_id not in self._shards or self._shards_expire < time.monotonic():
                reply = await directory.ListShardRoutes(
                    directory_pb2.ListShardRoutesRequest(), metadata=meta, timeout=5
                )
                self._shards = {shard.shard_id: shard for shard in reply.shards}
                self._shards_expire = time.monotonic() + SHARD_CACHE_SECONDS
        except grpc.aio.AioRpcError as exc:
            raise owner_error("tenant", exc) from exc
        shard = self._shards.get(shard_id)
        if shard is None:
            raise Unavailable(f"shard {shard_id} is not registered")
        return shard

    async def address(self, tenant_id: str, service: str) -> str:
        if service == TENANT:
            if not self._tenant_address:
                raise Unavailable("the audit service has no tenant service address (CRM_TENANT_ADDRESS)")
            return self._tenant_address
        shard = await self._shard_of(tenant_id)
        address = shard.core_entity_address if service == CORE_ENTITY else shard.custom_object_address
        if service not in (CORE_ENTITY, CUSTOM_OBJECT) or not address:
            raise Unavailable(f"no address for the {service} service")
        return address

    async def call(
        self,
        tenant_id: str,
        service: str,
        invoke: Callable[
            [data_admin_pb2_grpc.DataAdminServiceStub, tuple[tuple[str, str], ...]], Awaitable[T]
        ],
    ) -> T:
        """Calls one owner's DataAdminService; its errors come back as domain errors."""
        stub = data_admin_pb2_grpc.DataAdminServiceStub(self._channel(await self.address(tenant_id, service)))
        try:
            return await invoke(stub, self.metadata(tenant_id))
        except grpc.aio.AioRpcError as exc:
            raise owner_error(service, exc) from exc

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
