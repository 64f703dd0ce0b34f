"""Wires the gateway: routes, directory client, backend channels, control-event listener."""

from __future__ import annotations

from pathlib import Path

import grpc
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from crm.v1 import events_pb2
from gateway.directory import Directory
from gateway.proxy import Backends, Proxy
from gateway.routing import build_routes, service_names
from shared import events
from shared.config import GatewaySettings
from shared.grpc_server import ServiceApp, insecure_channel
from shared.logging import get_logger

log = get_logger(__name__)


def build_app(settings: GatewaySettings) -> ServiceApp:
    routes = build_routes()
    backends = Backends(settings.tenant_address, settings.audit_address, settings.max_message_bytes)
    holder: dict[str, object] = {}
    app = ServiceApp(name="gateway", settings=settings, service_names=service_names(), interceptors=[])
    if settings.tls_cert_file:
        app.server_credentials = grpc.ssl_server_credentials(
            [(Path(settings.tls_key_file).read_bytes(), Path(settings.tls_cert_file).read_bytes())]
        )

    directory_ref: list[Directory] = []

    async def connect() -> None:
        # Channels are created here, inside the running loop, never at import time.
        directory = Directory(
            insecure_channel(settings.tenant_address),
            settings.internal_token.get_secret_value(),
            settings.platform_admin_key.get_secret_value(),
        )
        directory_ref.append(directory)
        app.generic_handlers.append(
            Proxy(
                routes,
                directory,
                backends,
                settings.internal_token.get_secret_value(),
                settings.default_deadline_seconds,
            )
        )
        nats_client = await events.connect(settings.nats_url, name="crm-gateway")
        holder["nats"] = nats_client
        await nats_client.subscribe("crm.control.>", cb=on_control_event)

    async def on_control_event(message: Msg) -> None:
        try:
            event = events_pb2.ControlEvent.FromString(message.data)
        except Exception:
            log.warning("ignoring an undecodable control event", subject=message.subject)
            return
        directory = directory_ref[0]
        if event.kind == events_pb2.CONTROL_EVENT_KIND_API_KEY_REVOKED:
            directory.forget_api_key(event.resource_id)
        if event.tenant_id:
            directory.forget_tenant(event.tenant_id)

    async def close() -> None:
        await backends.close()
        nats_client = holder.get("nats")
        if isinstance(nats_client, NatsClient) and nats_client.is_connected:
            await nats_client.drain()

    app.startup.append(connect)
    app.shutdown.append(close)
    return app
