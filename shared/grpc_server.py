"""One boot sequence for every service: an aio server with the call-context interceptor,
the service's servicers, health and reflection; SERVING once started; on SIGTERM health goes
NOT_SERVING first, in-flight calls get a grace period, then background tasks and resources stop.
"""

from __future__ import annotations

import asyncio
import hmac
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status
from structlog.contextvars import bound_contextvars

from shared import context as callctx
from shared.config import CommonSettings
from shared.errors import CrmError, internal_status, translate_database_error
from shared.logging import get_logger
from shared.observability import mark_error, observe_call, server_span, setup_tracing, start_metrics_server

log = get_logger(__name__)

# Calls that probes and tools make without the gateway's credential.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

# Keepalive is set on both sides together: a client pinging more often than the server permits
# is sent GOAWAY "too_many_pings".
SERVER_KEEPALIVE_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
]
CLIENT_KEEPALIVE_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # A restarted backend must be reachable again within a second or two, not after gRPC's
    # default backoff (which grows to two minutes).
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


def message_size_options(max_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_bytes), ("grpc.max_send_message_length", max_bytes)]


async def abort_with(context: grpc.aio.ServicerContext, status: Any) -> None:
    rich = rpc_status.to_status(status)
    await context.abort(rich.code, rich.details, rich.trailing_metadata)


def _metadata_value(metadata: Mapping[str, str | bytes], key: str) -> str | None:
    value = metadata.get(key)
    if value is None or value == "":
        return None
    return value.decode() if isinstance(value, bytes) else value


class CallContextInterceptor(grpc.aio.ServerInterceptor):
    """Checks the internal credential, puts the caller into a ContextVar, maps errors to
    statuses and writes the access log, for every method of a backend."""

    def __init__(self, internal_token: str | None, service_name: str = "") -> None:
        # None means "no credential required" (the gateway's own server).
        self._internal_token = internal_token.encode() if internal_token is not None else None
        self._service_name = service_name

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method
        metadata = dict(handler_call_details.invocation_metadata or ())
        open_method = method.startswith(OPEN_METHOD_PREFIXES)
        return _wrap_handler(
            handler, lambda ctx: self._enter(method, metadata, ctx, open_method), method, self._service_name
        )

    async def _enter(
        self,
        method: str,
        metadata: Mapping[str, str | bytes],
        context: grpc.aio.ServicerContext,
        open_method: bool,
    ) -> callctx.CallContext:
        if self._internal_token is not None and not open_method:
            presented = _metadata_value(metadata, callctx.INTERNAL_TOKEN_KEY)
            if presented is None or not hmac.compare_digest(presented.encode(), self._internal_token):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid internal credential")
        request_id = (
            _metadata_value(metadata, callctx.REQUEST_ID_KEY)
            or _metadata_value(metadata, callctx.CLIENT_REQUEST_ID_KEY)
            or str(uuid.uuid4())
        )
        epoch = _metadata_value(metadata, callctx.SHARD_EPOCH_KEY)
        return callctx.CallContext(
            request_id=request_id,
            method=method,
            tenant_id=_metadata_value(metadata, callctx.TENANT_ID_KEY),
            user_id=_metadata_value(metadata, callctx.USER_ID_KEY),
            api_key_id=_metadata_value(metadata, callctx.API_KEY_ID_KEY),
            session_id=_metadata_value(metadata, callctx.SESSION_ID_KEY),
            email=_metadata_value(metadata, callctx.USER_EMAIL_KEY),
            ip_address=_metadata_value(metadata, callctx.CLIENT_IP_KEY),
            user_agent=_metadata_value(metadata, callctx.USER_AGENT_KEY),
            shard_epoch=int(epoch) if epoch and epoch.isdigit() else None,
            platform_admin=_metadata_value(metadata, callctx.PLATFORM_ADMIN_KEY) == "true",
        )


async def _map_error(exc: BaseException, context: grpc.aio.ServicerContext, method: str) -> None:
    if isinstance(exc, CrmError):
        await abort_with(context, exc.to_status())
    translated = translate_database_error(exc)
    if translated is not None:
        await abort_with(context, translated.to_status())
    log.error("unhandled error", method=method, exc_info=exc)
    await abort_with(context, internal_status())


_PASS_THROUGH = (grpc.aio.AbortError, asyncio.CancelledError)


def _text_metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}


def _code_name(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    return str(code.name) if isinstance(code, grpc.StatusCode) else "ABORTED"


def _code_of(exc: BaseException) -> str:
    if isinstance(exc, CrmError):
        return str(exc.code.name)
    translated = translate_database_error(exc)
    return str(translated.code.name) if translated is not None else "INTERNAL"


def _wrap_handler(
    handler: grpc.RpcMethodHandler,
    enter: Callable[[grpc.aio.ServicerContext], Awaitable[callctx.CallContext]],
    method: str,
    service_name: str,
) -> grpc.RpcMethodHandler:
    """Wraps whichever of the four behaviours the handler has in the same enter/map/log shell."""

    async def call_unary(behavior: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        ctx = await enter(context)
        token = callctx.set_call(ctx)
        started = time.perf_counter()
        code = "OK"
        # Every log line written during the call carries its request id and tenant.
        with (
            server_span(method, _text_metadata(context)) as span,
            bound_contextvars(request_id=ctx.request_id, tenant_id=ctx.tenant_id or "", method=method),
        ):
            try:
                return await behavior(request, context)
            except _PASS_THROUGH:
                code = _code_name(context)
                raise
            except Exception as exc:
                code = _code_of(exc)
                await _map_error(exc, context, method)
            finally:
                callctx.reset_call(token)
                mark_error(span, code)
                observe_call(service_name, method, code, time.perf_counter() - started)

    async def call_streaming(
        behavior: Any, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        ctx = await enter(context)
        token = callctx.set_call(ctx)
        started = time.perf_counter()
        code = "OK"
        # Every log line written during the call carries its request id and tenant.
        with (
            server_span(method, _text_metadata(context)) as span,
            bound_contextvars(request_id=ctx.request_id, tenant_id=ctx.tenant_id or "", method=method),
        ):
            try:
                async for item in behavior(request, context):
                    yield item
            except _PASS_THROUGH:
                code = _code_name(context)
                raise
            except Exception as exc:
                code = _code_of(exc)
                await _map_error(exc, context, method)
            finally:
                callctx.reset_call(token)
                mark_error(span, code)
                observe_call(service_name, method, code, time.perf_counter() - started)

    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    # grpc.aio inspects the behaviour's kind (coroutine or async generator function), so each
    # wrapper must be a real `async def`, not a lambda returning a coroutine.
    if handler.unary_unary or handler.stream_unary:
        unary_behavior = handler.unary_unary or handler.stream_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await call_unary(unary_behavior, request, context)

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(unary, **serializers)
        return grpc.stream_unary_rpc_method_handler(unary, **serializers)

    streaming_behavior = handler.unary_stream or handler.stream_stream

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for item in call_streaming(streaming_behavior, request, context):
            yield item

    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, **serializers)
    return grpc.stream_stream_rpc_method_handler(streaming, **serializers)


Registrar = Callable[[grpc.aio.Server], None]
Hook = Callable[[], Awaitable[None]]


@dataclass
class ServiceApp:
    """A service process: what to register on the server and what runs beside it."""

    name: str
    settings: CommonSettings
    registrars: list[Registrar] = field(default_factory=list)
    service_names: list[str] = field(default_factory=list)
    startup: list[Hook] = field(default_factory=list)
    background: list[Hook] = field(default_factory=list)
    shutdown: list[Hook] = field(default_factory=list)
    interceptors: list[grpc.aio.ServerInterceptor] | None = None
    generic_handlers: list[grpc.GenericRpcHandler] = field(default_factory=list)
    server_credentials: grpc.ServerCredentials | None = None

    port: int = 0
    _server: grpc.aio.Server | None = None
    _health: health.aio.HealthServicer | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> int:
        start_metrics_server(self.settings.metrics_port)
        setup_tracing(self.name, self.settings.otlp_endpoint)
        for hook in self.startup:
            await hook()
        interceptors = (
            self.interceptors
            if self.interceptors is not None
            else [CallContextInterceptor(self.settings.internal_token.get_secret_value(), self.name)]
        )
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[*message_size_options(self.settings.max_message_bytes), *SERVER_KEEPALIVE_OPTIONS],
        )
        for register in self.registrars:
            register(server)
        if self.generic_handlers:
            server.add_generic_rpc_handlers(tuple(self.generic_handlers))
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [
                *self.service_names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        address = f"{self.settings.listen_host}:{self.settings.port}"
        if self.server_credentials is not None:
            self.port = server.add_secure_port(address, self.server_credentials)
        else:
            self.port = server.add_insecure_port(address)
        await server.start()
        self._server = server
        for name in ["", *self.service_names]:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._tasks = [asyncio.create_task(_supervise(self.name, hook)) for hook in self.background]
        log.info("serving", service=self.name, port=self.port)
        return self.port

    async def stop(self) -> None:
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(self.settings.shutdown_grace_seconds)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for hook in self.shutdown:
            try:
                await hook()
            except Exception as exc:  # a failing close must not keep the others from running
                log.warning("shutdown hook failed", service=self.name, error=str(exc))
        log.info("stopped", service=self.name)

    async def run_until_signal(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        await stop.wait()
        await self.stop()


async def _supervise(name: str, hook: Hook) -> None:
    """Keeps a background loop (relay, consumer) alive: it restarts after an unexpected error."""
    while True:
        try:
            await hook()
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("background task failed; restarting", service=name, error=str(exc), exc_info=exc)
            await asyncio.sleep(1.0)


def insecure_channel(target: str, max_message_bytes: int = 4 * 1024 * 1024) -> grpc.aio.Channel:
    """A pooled client channel with keepalive matching the servers; create it inside the loop."""
    return grpc.aio.insecure_channel(
        target, options=[*message_size_options(max_message_bytes), *CLIENT_KEEPALIVE_OPTIONS]
    )


def internal_metadata(token: str, pairs: Iterable[tuple[str, str]] = ()) -> tuple[tuple[str, str], ...]:
    return ((callctx.INTERNAL_TOKEN_KEY, token), *pairs)
