"""Wires the gateway: routes, directory client, backend channels, rate limits, API audit and
the control-event listener that drops cached directory entries."""

from __future__ import annotations

from pathlib import Path

import grpc
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from crm.v1 import events_pb2, gateway_pb2_grpc
from gateway.api_audit import ApiAuditPublisher
from gateway.directory import Directory
from gateway.fairness import TenantConcurrency
from gateway.proxy import Backends, Proxy
from gateway.ratelimit import RateLimiter
from gateway.routing import build_routes, service_names
from gateway.status import GatewayStatusServicer
from shared import events
from shared.config import GatewaySettings
from shared.grpc_server import ServiceApp, insecure_channel
from shared.logging import get_logger

log = get_logger(__name__)


class Gateway:
    """The gateway's long-lived parts, built inside the running loop at start-up."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.routes = build_routes()
        self.backends = Backends(settings.tenant_address, settings.audit_address, settings.max_message_bytes)
        self.rate_limiter = RateLimiter.from_setting(settings.rate_limits)
        self.concurrency = TenantConcurrency(settings.tenant_concurrency)
        self.nats: NatsClient | None = None
        self.api_audit = ApiAuditPublisher(self._jetstream)
        self.directory: Directory | None = None

    def _jetstream(self) -> JetStreamContext | None:
        return self.nats.jetstream() if self.nats is not None and self.nats.is_connected else None

    async def connect(self, app: ServiceApp) -> None:
        # Channels are created here, inside the running loop, never at import time.
        self.directory = Directory(
            insecure_channel(self.settings.tenant_address),
            self.settings.internal_token.get_secret_value(),
            self.settings.platform_admin_key.get_secret_value(),
        )
        app.generic_handlers.append(
            Proxy(
                self.routes,
                self.directory,
                self.backends,
                self.settings.internal_token.get_secret_value(),
                self.settings.default_deadline_seconds,
                self.rate_limiter,
                self.concurrency,
                self.api_audit,
            )
        )
        status = GatewayStatusServicer(
            self.directory, self.backends, self.api_audit, self.settings.platform_admin_key.get_secret_value()
        )
        app.registrars.append(
            lambda server: gateway_pb2_grpc.add_GatewayServiceServicer_to_server(status, server)
        )
        self.nats = await events.connect(self.settings.nats_url, name="crm-gateway")
        await self.nats.subscribe("crm.control.>", cb=self.on_control_event)

    async def on_control_event(self, message: Msg) -> None:
        try:
            event = events_pb2.ControlEvent.FromString(message.data)
        except Exception:
            log.warning("ignoring an undecodable control event", subject=message.subject)
            return
        if self.directory is None:
            return
        if event.kind == events_pb2.CONTROL_EVENT_KIND_API_KEY_REVOKED:
            self.directory.forget_api_key(event.resource_id)
        if event.tenant_id:
            self.directory.forget_tenant(event.tenant_id)

    async def close(self) -> None:
        await self.api_audit.flush()
        await self.backends.close()
        if self.nats is not None and self.nats.is_connected:
            await self.nats.drain()


def build_app(settings: GatewaySettings) -> ServiceApp:
    gateway = Gateway(settings)
    app = ServiceApp(name="gateway", settings=settings, service_names=service_names(), interceptors=[])
    if settings.tls_cert_file:
        app.server_credentials = grpc.ssl_server_credentials(
            [(Path(settings.tls_key_file).read_bytes(), Path(settings.tls_cert_file).read_bytes())]
        )

    async def connect() -> None:
        await gateway.connect(app)

    app.startup.append(connect)
    app.background.append(gateway.api_audit.run)
    app.shutdown.append(gateway.close)
    return app
