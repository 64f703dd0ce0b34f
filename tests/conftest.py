"""Session-wide backends and a running suite, shared by the integration and e2e tests.

Every test makes its own tenants (random subdomains) or databases, so tests never see each
other's data even though the backends are shared."""

from __future__ import annotations

import secrets
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from cli.stack import Stack
from crm.v1 import tenant_pb2, tenant_pb2_grpc
from tests.backends import Backends, find_backends
from tests.otlp import OtlpReceiver


@pytest.fixture(scope="session")
def backends() -> Iterator[Backends]:
    with find_backends() as found:
        yield found


def unique_prefix() -> str:
    return "crmt" + secrets.token_hex(4)


@pytest.fixture(scope="session")
def otlp() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    receiver.start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="session")
def suite(backends: Backends, otlp: OtlpReceiver) -> Iterator[Stack]:
    """The whole suite as separate processes on the session's backends, two shards, exporting
    traces to the session's OTLP receiver."""
    stack = Stack(
        otlp_endpoint=otlp.endpoint,
        home=Path(tempfile.mkdtemp(prefix="crm-suite-")),
        database_url=backends.database_url,
        nats_url=backends.nats_url,
        prefix=unique_prefix(),
        shards=2,
        gateway_port=0,
        log_level="warning",
    )
    stack.start()
    yield stack
    stack.stop()


@pytest.fixture
async def gateway(suite: Stack) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(suite.gateway_address) as channel:
        yield channel


def bearer(credential: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {credential}"),)


def new_subdomain() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


async def create_tenant(
    channel: grpc.aio.Channel, platform_key: str, **overrides: object
) -> tenant_pb2.CreateTenantResponse:
    request = tenant_pb2.CreateTenantRequest(
        tenant=tenant_pb2.Tenant(name="Test Tenant", subdomain=new_subdomain()),
        admin_email="admin@example.com",
        admin_password="Sup3rSecret",
    )
    for key, value in overrides.items():
        if key == "tenant":
            request.tenant.CopyFrom(value)  # type: ignore[arg-type]
        else:
            setattr(request, key, value)
    return await tenant_pb2_grpc.TenantServiceStub(channel).CreateTenant(  # type: ignore[no-any-return]
        request, metadata=bearer(platform_key), timeout=30
    )
