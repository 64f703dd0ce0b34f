"""GatewayService: the gateway's own view of its backends, served by the gateway itself."""

from __future__ import annotations

import asyncio
import hmac

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crm.v1 import gateway_pb2, gateway_pb2_grpc
from gateway.api_audit import ApiAuditPublisher
from gateway.directory import Directory
from gateway.proxy import Backends


class GatewayStatusServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(
        self, directory: Directory, backends: Backends, api_audit: ApiAuditPublisher, platform_admin_key: str
    ) -> None:
        self._directory = directory
        self._backends = backends
        self._api_audit = api_audit
        self._platform_admin_key = platform_admin_key.encode()

    async def GetGatewayStatus(
        self, request: gateway_pb2.GetGatewayStatusRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GatewayStatus:
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        scheme, _, credential = metadata.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            credential.strip().encode(), self._platform_admin_key
        ):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, "this call needs the platform admin credential"
            )
        backends = [
            gateway_pb2.BackendStatus(kind="tenant", address=self._backends.fixed_address_of("tenant")),
            gateway_pb2.BackendStatus(kind="audit", address=self._backends.fixed_address_of("audit")),
        ]
        for shard in await self._directory.refresh_shards():
            for kind, address in (
                ("core_entity", shard.core_entity_address),
                ("custom_object", shard.custom_object_address),
            ):
                backends.append(
                    gateway_pb2.BackendStatus(
                        kind=kind,
                        address=address,
                        shard_name=shard.name,
                        shard_id=shard.shard_id,
                        shard_active=shard.active,
                    )
                )
        healths = await asyncio.gather(*(self._health(b.address) for b in backends))
        for backend, health in zip(backends, healths, strict=True):
            backend.health = health
        return gateway_pb2.GatewayStatus(
            backends=backends,
            api_audit_backlog=self._api_audit.backlog,
            api_audit_dropped=self._api_audit.dropped_total,
        )

    async def _health(self, address: str) -> str:
        stub = health_pb2_grpc.HealthStub(self._backends.channel(address))
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.aio.AioRpcError:
            return "UNREACHABLE"
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
