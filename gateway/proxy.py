"""Pass-through forwarding: a generic handler whose (de)serialisers are identity, so request
and response bodies cross the gateway as bytes; only metadata is read and rewritten.

Per call the gateway authenticates (cached), authorises by the method's access level, checks the
tenant's status and rate limit, picks the backend (the tenant's shard for core-entity and
custom-object calls), forwards with its own x-crm-* metadata and the internal credential, and
records one API audit event off the request path. A backend that refuses a stale shard epoch
makes the gateway refresh the tenant's route and try once more.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_status import rpc_status
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.trace import Span, SpanKind

from crm.v1 import events_pb2
from gateway.api_audit import ApiAuditPublisher
from gateway.directory import Directory, Principal
from gateway.fairness import TenantConcurrency
from gateway.ratelimit import RateLimiter
from gateway.routing import Access, Backend, Route
from shared import context as callctx
from shared.errors import (
    CrmError,
    FailedPrecondition,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    error_reason,
)
from shared.grpc_server import abort_with, insecure_channel
from shared.observability import API_AUDIT_BACKLOG, mark_error, observe_call, tracer

USER_AGENT_KEY = "user-agent"
# Refusals a backend gives before touching anything (shared.shard_guard): safe to retry once
# after refreshing the tenant's route, which is how a call issued during a move lands right.
ROUTE_RETRY_REASONS = frozenset({"STALE_SHARD_EPOCH", "TENANT_NOT_ON_SHARD", "TENANT_WRITE_BLOCKED"})
WRITE_BLOCK_RETRY_DELAY = 0.25


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

    def fixed_address_of(self, kind: str) -> str:
        return self._fixed[Backend(kind)]

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

    def addresses(self) -> list[str]:
        return list(self._channels)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


def _bearer(metadata: dict[str, str]) -> str:
    header = metadata.get("authorization", "")
    scheme, _, credential = header.partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        raise Unauthenticated("send 'authorization: Bearer <api key or session token>'")
    return credential.strip()


@dataclass
class _Call:
    """What the gateway learns about one call, for routing and for its API audit record."""

    route: Route
    started: float = field(default_factory=time.perf_counter)
    request_id: str = ""
    principal: Principal | None = None
    metadata: list[tuple[str, str]] = field(default_factory=list)
    address: str = ""
    request_size: int = 0
    response_size: int = 0
    code: grpc.StatusCode = grpc.StatusCode.OK
    error: str = ""
    ip: str = ""
    user_agent: str = ""
    span: Span | None = None


class Proxy(grpc.GenericRpcHandler):
    def __init__(
        self,
        routes: dict[str, Route],
        directory: Directory,
        backends: Backends,
        internal_token: str,
        default_deadline: float,
        rate_limiter: RateLimiter,
        concurrency: TenantConcurrency,
        api_audit: ApiAuditPublisher,
    ) -> None:
        self._routes = routes
        self._directory = directory
        self._backends = backends
        self._internal_token = internal_token
        self._default_deadline = default_deadline
        self._rate_limiter = rate_limiter
        self._concurrency = concurrency
        self._api_audit = api_audit

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

    # --- per-call preparation --------------------------------------------------------------

    async def _prepare(self, call: _Call, context: grpc.aio.ServicerContext) -> None:
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        call.request_id = metadata.get(callctx.CLIENT_REQUEST_ID_KEY) or str(uuid.uuid4())
        call.ip = _peer_ip(context.peer())
        call.user_agent = metadata.get(USER_AGENT_KEY, "")
        await context.send_initial_metadata(((callctx.CLIENT_REQUEST_ID_KEY, call.request_id),))
        # Everything x-crm-* is rebuilt here; nothing the client sent under those keys passes.
        call.metadata = [
            (callctx.INTERNAL_TOKEN_KEY, self._internal_token),
            (callctx.REQUEST_ID_KEY, call.request_id),
            (callctx.CLIENT_IP_KEY, call.ip),
        ]
        if call.user_agent:
            call.metadata.append((callctx.USER_AGENT_KEY, call.user_agent))
        # One span per call, continuing the client's trace if it sent one; the backend's span
        # becomes its child through the traceparent the gateway forwards.
        call.span = tracer().start_span(call.route.path, context=extract(metadata), kind=SpanKind.SERVER)
        carrier: dict[str, str] = {}
        inject(carrier, context=trace.set_span_in_context(call.span))
        call.metadata += list(carrier.items())
        if call.route.access is Access.PUBLIC:
            call.address = self._backends.fixed_address_of(call.route.backend.value)
            return
        principal = await self._directory.authenticate(_bearer(metadata))
        call.principal = principal
        self._authorise(call.route, principal, call.metadata)
        await self._target(call, refresh=False)

    def _authorise(self, route: Route, principal: Principal, outgoing: list[tuple[str, str]]) -> None:
        if principal.platform_admin:
            if route.access is Access.TENANT:
                raise PermissionDenied(
                    "the platform admin credential carries no tenant; use a tenant credential"
                )
            outgoing.append((callctx.PLATFORM_ADMIN_KEY, "true"))
            return
        if route.access is Access.PLATFORM:
            raise PermissionDenied("this call needs the platform admin credential")
        outgoing += [(callctx.TENANT_ID_KEY, principal.tenant_id), (callctx.USER_ID_KEY, principal.user_id)]
        if principal.api_key_id:
            outgoing.append((callctx.API_KEY_ID_KEY, principal.api_key_id))
        if principal.session_id:
            outgoing.append((callctx.SESSION_ID_KEY, principal.session_id))
        if principal.email:
            outgoing.append((callctx.USER_EMAIL_KEY, principal.email))

    async def _target(self, call: _Call, refresh: bool) -> None:
        """Resolves the backend address and the shard epoch (refreshed after a stale-epoch refusal)."""
        route, principal = call.route, call.principal
        assert principal is not None
        call.metadata = [(k, v) for k, v in call.metadata if k != callctx.SHARD_EPOCH_KEY]
        fixed = self._backends.fixed_address(route.backend)
        if principal.platform_admin:
            assert fixed is not None
            call.address = fixed
            return
        tenant_route = await self._directory.route(principal.tenant_id, refresh=refresh)
        if route.access is Access.TENANT and tenant_route.status in ("suspended", "cancelled"):
            raise FailedPrecondition(
                f"tenant {tenant_route.status}", reason=f"TENANT_{tenant_route.status.upper()}"
            )
        if not refresh:
            wait = self._rate_limiter.try_acquire(principal.tenant_id, tenant_route.plan_type)
            if wait > 0:
                raise ResourceExhausted(
                    f"rate limit of the {tenant_route.plan_type} plan exceeded; retry in {wait:.2f}s",
                    reason="RATE_LIMITED",
                    retry_after=wait,
                )
        call.metadata.append((callctx.SHARD_EPOCH_KEY, str(tenant_route.epoch)))
        if fixed is not None:
            call.address = fixed
            return
        shard = await self._directory.shard(tenant_route.shard_id)
        call.address = (
            shard.core_entity_address if route.backend is Backend.CORE_ENTITY else shard.custom_object_address
        )

    def _slot(self, call: _Call) -> AbstractAsyncContextManager[None]:
        """The tenant's share of the backends for this call (none for platform calls)."""
        principal = call.principal
        if principal is None or principal.platform_admin:
            return nullcontext()
        return self._concurrency.slot(principal.tenant_id)

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        return self._default_deadline if remaining is None else max(remaining, 0.001)

    # --- the four call shapes ----------------------------------------------------------------

    def _unary(self, route: Route) -> Callable[[bytes, grpc.aio.ServicerContext], Any]:
        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            call = _Call(route, request_size=len(request))
            try:
                await self._prepare(call, context)
                async with self._slot(call):
                    for attempt in (1, 2):
                        try:
                            target = self._backends.callable(call.address, route)
                            response: bytes = await target(
                                request, metadata=call.metadata, timeout=self._timeout(context)
                            )
                            call.response_size = len(response)
                            return response
                        except grpc.aio.AioRpcError as exc:
                            reason = _route_refusal(exc)
                            if attempt == 1 and reason:
                                if reason == "TENANT_WRITE_BLOCKED":
                                    # A move holds writes for well under a second; wait for the flip.
                                    await asyncio.sleep(WRITE_BLOCK_RETRY_DELAY)
                                await self._target(call, refresh=True)
                                continue
                            raise
            except Exception as exc:
                await self._fail(call, context, exc)
            finally:
                self._record(call)
            raise AssertionError("unreachable")

        return handle

    def _client_streaming(
        self, route: Route
    ) -> Callable[[AsyncIterator[bytes], grpc.aio.ServicerContext], Any]:
        async def handle(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
            call = _Call(route)

            async def counted() -> AsyncIterator[bytes]:
                async for message in requests:
                    call.request_size += len(message)
                    yield message

            try:
                await self._prepare(call, context)
                target = self._backends.callable(call.address, route)
                async with self._slot(call):
                    response: bytes = await target(
                        counted(), metadata=call.metadata, timeout=self._timeout(context)
                    )
                call.response_size = len(response)
                return response
            except Exception as exc:
                await self._fail(call, context, exc)
            finally:
                self._record(call)
            raise AssertionError("unreachable")

        return handle

    def _server_streaming(
        self, route: Route
    ) -> Callable[[bytes, grpc.aio.ServicerContext], AsyncIterator[bytes]]:
        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            call = _Call(route, request_size=len(request))
            try:
                await self._prepare(call, context)
                target = self._backends.callable(call.address, route)
                async with self._slot(call):
                    async for response in target(
                        request, metadata=call.metadata, timeout=self._timeout(context)
                    ):
                        call.response_size += len(response)
                        yield response
            except Exception as exc:
                await self._fail(call, context, exc)
            finally:
                self._record(call)

        return handle

    def _bidi_streaming(
        self, route: Route
    ) -> Callable[[AsyncIterator[bytes], grpc.aio.ServicerContext], AsyncIterator[bytes]]:
        async def handle(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[bytes]:
            call = _Call(route)
            try:
                await self._prepare(call, context)
                target = self._backends.callable(call.address, route)
                async with self._slot(call):
                    async for response in target(
                        requests, metadata=call.metadata, timeout=self._timeout(context)
                    ):
                        call.response_size += len(response)
                        yield response
            except Exception as exc:
                await self._fail(call, context, exc)
            finally:
                self._record(call)

        return handle

    # --- errors and accounting ---------------------------------------------------------------

    async def _fail(self, call: _Call, context: grpc.aio.ServicerContext, exc: Exception) -> None:
        if isinstance(exc, CrmError):
            call.code, call.error = exc.code, exc.message
            await abort_with(context, exc.to_status())
        if isinstance(exc, grpc.aio.AioRpcError):
            code, details = exc.code(), exc.details() or ""
            if code == grpc.StatusCode.CANCELLED:
                # The client's own cancellation never gets here (it cancels this handler): this
                # is a backend stopping with calls in flight. To the client that backend went
                # away, which is retryable; CANCELLED would say the client gave up.
                code, details = grpc.StatusCode.UNAVAILABLE, f"the backend ended the call: {details}"
            call.code, call.error = code, details
            # Trailing metadata must be passed on as a tuple, or abort raises TypeError; passed
            # whole, the backend's google.rpc.Status details (field violations) arrive intact.
            await context.abort(code, details, tuple(exc.trailing_metadata() or ()))
        if isinstance(exc, grpc.aio.AbortError):
            raise exc
        call.code, call.error = grpc.StatusCode.INTERNAL, "gateway error"
        raise exc

    def _record(self, call: _Call) -> None:
        seconds = time.perf_counter() - call.started
        observe_call("gateway", call.route.path, call.code.name, seconds)
        if call.span is not None:
            mark_error(call.span, call.code.name, call.error)
            call.span.end()
        API_AUDIT_BACKLOG.set(self._api_audit.backlog)
        principal = call.principal
        self._api_audit.record(
            events_pb2.ApiCallEvent(
                tenant_id=principal.tenant_id if principal else "",
                user_id=principal.user_id if principal else "",
                api_key_id=principal.api_key_id if principal else "",
                endpoint=call.route.path,
                status_code=call.code.name,
                request_size=call.request_size,
                response_size=call.response_size,
                duration_ms=int(seconds * 1000),
                ip_address=call.ip,
                user_agent=call.user_agent,
                request_id=call.request_id,
                error_message=call.error[:500],
            )
        )


def _route_refusal(exc: grpc.aio.AioRpcError) -> str:
    """The shard guard's reason when a backend refused the call for its routing, else ''."""
    if exc.code() is not grpc.StatusCode.UNAVAILABLE:
        return ""
    status = rpc_status.from_call(exc)
    reason = error_reason(status) if status is not None else ""
    return reason if reason in ROUTE_RETRY_REASONS else ""


def _peer_ip(peer: str) -> str:
    # "ipv4:127.0.0.1:5555" or "ipv6:[::1]:5555"
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return ""
