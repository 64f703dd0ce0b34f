"""Pass-through forwarding: a generic handler whose (de)serialisers are identity, so request
and response bodies cross the gateway as bytes; only metadata is read and rewritten."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from gateway.directory import Directory, Principal
from gateway.routing import Access, Backend, Route
from shared import context as callctx
from shared.errors import CrmError, FailedPrecondition, PermissionDenied, Unauthenticated
from shared.grpc_server import abort_with, insecure_channel
from shared.logging import get_logger

log = get_logger(__name__)

# Metadata a client may send that the gateway passes on (everything x-crm-* is the gateway's own).
USER_AGENT_KEY = "user-agent"


class Backends:
    """One pooled channel per backend address, created lazily inside the running loop."""

    def __init__(self, tenant_address: str, audit_address: str, max_message_bytes: int) -> None:
        self._fixed = {Backend.TENANT: tenant_address, Backend.AUDIT: audit_address}
        self._max_message_bytes = max_message_bytes
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._callables: dict[tuple[str, str], Any] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = insecure_channel(address, self._max_message_bytes)
            self._channels[address] = channel
        return channel

    def fixed_address(self, backend: Backend) -> str | None:
        return self._fixed.get(backend)

    def callable(self, address: str, route: Route) -> Any:
        key = (address, route.path)
        found = self._callables.get(key)
        if found is None:
            channel = self.channel(address)
            factory = {
                (False, False): channel.unary_unary,
                (False, True): channel.unary_stream,
                (True, False): channel.stream_unary,
                (True, True): channel.stream_stream,
            }[(route.request_streaming, route.response_streaming)]
            found = factory(route.path)  # no serialisers: bytes in, bytes out
            self._callables[key] = found
        return found

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


def _bearer(metadata: dict[str, str]) -> str:
    header = metadata.get("authorization", "")
    scheme, _, credential = header.partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        raise Unauthenticated("send 'authorization: Bearer <api key or session token>'")
    return credential.strip()


class Proxy(grpc.GenericRpcHandler):
    def __init__(
        self,
        routes: dict[str, Route],
        directory: Directory,
        backends: Backends,
        internal_token: str,
        default_deadline: float,
    ) -> None:
        self._routes = routes
        self._directory = directory
        self._backends = backends
        self._internal_token = internal_token
        self._default_deadline = default_deadline

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        route = self._routes.get(handler_call_details.method)
        if route is None:
            return None  # UNIMPLEMENTED, as for any unknown method
        if not route.request_streaming and not route.response_streaming:
            return grpc.unary_unary_rpc_method_handler(self._unary(route))
        if not route.request_streaming:
            return grpc.unary_stream_rpc_method_handler(self._server_streaming(route))
        if not route.response_streaming:
            return grpc.stream_unary_rpc_method_handler(self._client_streaming(route))
        return grpc.stream_stream_rpc_method_handler(self._bidi_streaming(route))

    async def _prepare(
        self, route: Route, context: grpc.aio.ServicerContext
    ) -> tuple[str, list[tuple[str, str]]]:
        """Authenticates, authorises and routes one call; returns the backend and its metadata."""
        metadata = {k: (v if isinstance(v, str) else "") for k, v in context.invocation_metadata() or ()}
        request_id = metadata.get(callctx.CLIENT_REQUEST_ID_KEY) or str(uuid.uuid4())
        await context.send_initial_metadata(((callctx.CLIENT_REQUEST_ID_KEY, request_id),))
        principal = await self._directory.authenticate(_bearer(metadata))
        outgoing = [
            (callctx.INTERNAL_TOKEN_KEY, self._internal_token),
            (callctx.REQUEST_ID_KEY, request_id),
            (callctx.CLIENT_IP_KEY, _peer_ip(context.peer())),
        ]
        if USER_AGENT_KEY in metadata:
            outgoing.append((callctx.USER_AGENT_KEY, metadata[USER_AGENT_KEY]))
        address = self._authorise(route, principal, outgoing)
        if principal.tenant_id:
            tenant_route = await self._directory.route(principal.tenant_id)
            if tenant_route.status == "suspended" and route.access is Access.TENANT:
                raise FailedPrecondition("tenant suspended", reason="TENANT_SUSPENDED")
            if tenant_route.status == "cancelled" and route.access is Access.TENANT:
                raise FailedPrecondition("tenant cancelled", reason="TENANT_CANCELLED")
            outgoing.append((callctx.SHARD_EPOCH_KEY, str(tenant_route.epoch)))
            if address is None:
                shard = await self._directory.shard(tenant_route.shard_id)
                address = (
                    shard.core_entity_address
                    if route.backend is Backend.CORE_ENTITY
                    else shard.custom_object_address
                )
        assert address is not None
        return address, outgoing

    def _authorise(self, route: Route, principal: Principal, outgoing: list[tuple[str, str]]) -> str | None:
        if principal.platform_admin:
            if route.access is Access.TENANT:
                raise PermissionDenied(
                    "the platform admin credential carries no tenant; use a tenant credential"
                )
            outgoing.append((callctx.PLATFORM_ADMIN_KEY, "true"))
        else:
            if route.access is Access.PLATFORM:
                raise PermissionDenied("this call needs the platform admin credential")
            outgoing += [
                (callctx.TENANT_ID_KEY, principal.tenant_id),
                (callctx.USER_ID_KEY, principal.user_id),
            ]
            if principal.api_key_id:
                outgoing.append((callctx.API_KEY_ID_KEY, principal.api_key_id))
            if principal.session_id:
                outgoing.append((callctx.SESSION_ID_KEY, principal.session_id))
            if principal.email:
                outgoing.append((callctx.USER_EMAIL_KEY, principal.email))
        return self._backends.fixed_address(route.backend)

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        return self._default_deadline if remaining is None else max(remaining, 0.001)

    def _unary(self, route: Route) -> Callable[[bytes, grpc.aio.ServicerContext], Any]:
        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                address, metadata = await self._prepare(route, context)
                call = self._backends.callable(address, route)
                return await call(request, metadata=metadata, timeout=self._timeout(context))  # type: ignore[no-any-return]
            except CrmError as exc:
                await abort_with(context, exc.to_status())
            except grpc.aio.AioRpcError as exc:
                await _relay_error(context, exc)
            raise AssertionError("unreachable")

        return handle

    def _server_streaming(
        self, route: Route
    ) -> Callable[[bytes, grpc.aio.ServicerContext], AsyncIterator[bytes]]:
        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            try:
                address, metadata = await self._prepare(route, context)
                call = self._backends.callable(address, route)
                async for response in call(request, metadata=metadata, timeout=self._timeout(context)):
                    yield response
            except CrmError as exc:
                await abort_with(context, exc.to_status())
            except grpc.aio.AioRpcError as exc:
                await _relay_error(context, exc)

        return handle

    def _client_streaming(
        self, route: Route
    ) -> Callable[[AsyncIterator[bytes], grpc.aio.ServicerContext], Any]:
        async def handle(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
            try:
                address, metadata = await self._prepare(route, context)
                call = self._backends.callable(address, route)
                return await call(requests, metadata=metadata, timeout=self._timeout(context))  # type: ignore[no-any-return]
            except CrmError as exc:
                await abort_with(context, exc.to_status())
            except grpc.aio.AioRpcError as exc:
                await _relay_error(context, exc)
            raise AssertionError("unreachable")

        return handle

    def _bidi_streaming(
        self, route: Route
    ) -> Callable[[AsyncIterator[bytes], grpc.aio.ServicerContext], AsyncIterator[bytes]]:
        async def handle(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[bytes]:
            try:
                address, metadata = await self._prepare(route, context)
                call = self._backends.callable(address, route)
                async for response in call(requests, metadata=metadata, timeout=self._timeout(context)):
                    yield response
            except CrmError as exc:
                await abort_with(context, exc.to_status())
            except grpc.aio.AioRpcError as exc:
                await _relay_error(context, exc)

        return handle


async def _relay_error(context: grpc.aio.ServicerContext, exc: grpc.aio.AioRpcError) -> None:
    # Trailing metadata must be passed on as a tuple, or abort raises TypeError; passed whole,
    # the backend's google.rpc.Status details (field violations) reach the client intact.
    trailing = tuple(exc.trailing_metadata() or ())
    await context.abort(exc.code(), exc.details() or "", trailing)


def _peer_ip(peer: str) -> str:
    # "ipv4:127.0.0.1:5555" or "ipv6:[::1]:5555"
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return ""
