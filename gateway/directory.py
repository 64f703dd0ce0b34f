"""The gateway's cached view of the directory: who a credential belongs to, where a tenant
lives, and the shards' backends. Entries expire after seconds and are dropped at once on
control events (tenant moved or suspended, key revoked)."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc

from crm.v1 import directory_pb2, directory_pb2_grpc
from shared.errors import NotFound, Unauthenticated, Unavailable
from shared.grpc_server import internal_metadata

T = TypeVar("T")

ROUTE_CACHE_SECONDS = 5.0
SHARD_CACHE_SECONDS = 10.0


class TtlCache(Generic[T]):
    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, T]] = {}

    def get(self, key: str) -> T | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires < time.monotonic():
            self._entries.pop(key, None)
            return None
        return value

    def put(self, key: str, value: T, seconds: float) -> None:
        if seconds > 0:
            self._entries[key] = (time.monotonic() + seconds, value)

    def drop(self, key: str) -> None:
        self._entries.pop(key, None)

    def drop_where(self, predicate: object) -> None:
        for key, (_, value) in list(self._entries.items()):
            if predicate(value):  # type: ignore[operator]
                self._entries.pop(key, None)


@dataclass(frozen=True, slots=True)
class Principal:
    platform_admin: bool
    tenant_id: str = ""
    user_id: str = ""
    api_key_id: str = ""
    session_id: str = ""
    email: str = ""
    scopes: tuple[str, ...] = ()


PLATFORM_ADMIN = Principal(platform_admin=True)


class Directory:
    def __init__(self, channel: grpc.aio.Channel, internal_token: str, platform_admin_key: str) -> None:
        self._stub = directory_pb2_grpc.DirectoryServiceStub(channel)
        self._metadata = internal_metadata(internal_token)
        self._platform_admin_key = platform_admin_key.encode()
        self.credentials: TtlCache[Principal] = TtlCache()
        self.routes: TtlCache[directory_pb2.TenantRoute] = TtlCache()
        self._shards: dict[str, directory_pb2.ShardRoute] = {}
        self._shards_expire = 0.0

    async def authenticate(self, credential: str) -> Principal:
        if hmac.compare_digest(credential.encode(), self._platform_admin_key):
            return PLATFORM_ADMIN
        cached = self.credentials.get(credential)
        if cached is not None:
            return cached
        try:
            reply = await self._stub.ResolveCredential(
                directory_pb2.ResolveCredentialRequest(credential=credential),
                metadata=self._metadata,
                timeout=5,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.UNAUTHENTICATED:
                raise Unauthenticated("invalid, expired or revoked credential") from exc
            raise Unavailable("the directory is unavailable; retry") from exc
        principal = Principal(
            platform_admin=False,
            tenant_id=reply.tenant_id,
            user_id=reply.user_id,
            api_key_id=reply.api_key_id,
            session_id=reply.session_id,
            email=reply.email,
            scopes=tuple(reply.scopes),
        )
        self.credentials.put(credential, principal, reply.cache_seconds)
        return principal

    async def route(self, tenant_id: str, refresh: bool = False) -> directory_pb2.TenantRoute:
        cached = None if refresh else self.routes.get(tenant_id)
        if cached is not None:
            return cached
        try:
            route = await self._stub.GetTenantRoute(
                directory_pb2.GetTenantRouteRequest(tenant_id=tenant_id), metadata=self._metadata, timeout=5
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.NOT_FOUND:
                raise NotFound("tenant not found") from exc
            raise Unavailable("the directory is unavailable; retry") from exc
        self.routes.put(tenant_id, route, ROUTE_CACHE_SECONDS)
        return route  # type: ignore[no-any-return]

    async def shard(self, shard_id: str) -> directory_pb2.ShardRoute:
        if shard_id not in self._shards or self._shards_expire < time.monotonic():
            await self.refresh_shards()
        shard = self._shards.get(shard_id)
        if shard is None:
            raise Unavailable(f"shard {shard_id} is not registered")
        return shard

    async def refresh_shards(self) -> list[directory_pb2.ShardRoute]:
        try:
            reply = await self._stub.ListShardRoutes(
                directory_pb2.ListShardRoutesRequest(), metadata=self._metadata, timeout=5
            )
        except grpc.aio.AioRpcError as exc:
            raise Unavailable("the directory is unavailable; retry") from exc
        self._shards = {shard.shard_id: shard for shard in reply.shards}
        self._shards_expire = time.monotonic() + SHARD_CACHE_SECONDS
        return list(reply.shards)

    def forget_tenant(self, tenant_id: str) -> None:
        self.routes.drop(tenant_id)
        self.credentials.drop_where(lambda p: p.tenant_id == tenant_id)

    def forget_api_key(self, api_key_id: str) -> None:
        self.credentials.drop_where(lambda p: p.api_key_id == api_key_id)
