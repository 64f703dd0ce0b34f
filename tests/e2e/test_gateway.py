"""The gateway as a client sees it: reflection of the whole suite, its status view, per-tenant
rate limits, message limits, API audit records, shard outages and TLS."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import nats
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from cli.stack import Stack
from crm.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    events_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    tenant_pb2,
    tenant_pb2_grpc,
)
from gateway.bootstrap import build_app
from gateway.routing import SERVICE_BACKENDS
from shared.config import GatewaySettings
from tests.conftest import bearer, create_tenant, new_subdomain

pytestmark = pytest.mark.e2e


async def eventually_served(call: Callable[[], Awaitable[object]], seconds: float = 20.0) -> None:
    """Retries a call that may meet UNAVAILABLE while the gateway reconnects to a restarted backend."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            await call()
            return
        except grpc.aio.AioRpcError as exc:
            assert exc.code() is grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, exc
            await asyncio.sleep(0.3)


async def test_reflection_lists_every_service_of_the_suite(suite: Stack, gateway: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(gateway)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = set()
    async for response in responses:
        names |= {s.name for s in response.list_services_response.service}
    assert {
        "crm.v1.TenantService",
        "crm.v1.AuditService",
        "crm.v1.GatewayService",
        "grpc.health.v1.Health",
    } <= names
    assert {name for name in SERVICE_BACKENDS if name in names} == {
        name for name in SERVICE_BACKENDS if name in names
    }
    assert "crm.v1.DirectoryService" not in names  # internal: never exposed


async def test_internal_services_are_not_routed(suite: Stack, gateway: grpc.aio.Channel) -> None:
    call = gateway.unary_unary("/crm.v1.DirectoryService/ListShardRoutes")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(b"", metadata=bearer(suite.platform_admin_key), timeout=5)
    assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED


async def test_status_shows_every_backend_healthy(suite: Stack, gateway: grpc.aio.Channel) -> None:
    stub = gateway_pb2_grpc.GatewayServiceStub(gateway)
    status = await stub.GetGatewayStatus(
        gateway_pb2.GetGatewayStatusRequest(), metadata=bearer(suite.platform_admin_key)
    )
    kinds = sorted((b.kind, b.shard_name) for b in status.backends)
    assert kinds == sorted(
        [("tenant", ""), ("audit", "")]
        + [(kind, f"shard-{i}") for i in range(2) for kind in ("core_entity", "custom_object")]
    )
    assert {b.health for b in status.backends} == {"SERVING"}
    created = await create_tenant(gateway, suite.platform_admin_key)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetGatewayStatus(gateway_pb2.GetGatewayStatusRequest(), metadata=bearer(created.api_key))
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED


async def test_a_flooding_tenant_is_limited_and_others_are_not(
    suite: Stack, gateway: grpc.aio.Channel
) -> None:
    flooder = await create_tenant(gateway, suite.platform_admin_key)
    neighbour = await create_tenant(gateway, suite.platform_admin_key)
    stub = audit_pb2_grpc.AuditServiceStub(gateway)

    async def one(key: str) -> grpc.StatusCode:
        try:
            # A generous deadline: 220 calls at once on a loaded CI machine must not time out,
            # which would hide what the test is about (the limiter's answer).
            await stub.ListAuditLogs(
                audit_pb2.ListAuditLogsRequest(page_size=1), metadata=bearer(key), timeout=60
            )
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                status = rpc_status.from_call(exc)
                assert status is not None
                assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)
            return exc.code()

    # One call first caches the credential in the gateway: otherwise all the calls wait on the
    # directory together and, on a loaded machine, reach the limiter slowly enough to be let
    # through by the refill. 400 calls exceed the basic plan (burst 100, 50/s) unless the
    # gateway handles fewer than about 65 calls a second.
    assert await one(flooder.api_key) is grpc.StatusCode.OK
    flood = await asyncio.gather(*(one(flooder.api_key) for _ in range(400)))
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in flood
    assert set(flood) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert await one(neighbour.api_key) is grpc.StatusCode.OK


async def test_oversized_messages_are_refused(suite: Stack, gateway: grpc.aio.Channel) -> None:
    huge = tenant_pb2.CreateTenantRequest(
        tenant=tenant_pb2.Tenant(name="x" * (5 * 1024 * 1024), subdomain=new_subdomain())
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await tenant_pb2_grpc.TenantServiceStub(gateway).CreateTenant(
            huge, metadata=bearer(suite.platform_admin_key), timeout=10
        )
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_every_call_leaves_an_api_audit_record(suite: Stack, gateway: grpc.aio.Channel) -> None:
    created = await create_tenant(gateway, suite.platform_admin_key)
    stub = tenant_pb2_grpc.TenantServiceStub(gateway)
    await stub.GetTenant(
        tenant_pb2.GetTenantRequest(id=created.tenant.id),
        metadata=(*bearer(created.api_key), ("x-request-id", "ok-call")),
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetTenant(
            tenant_pb2.GetTenantRequest(id="not-a-uuid"),
            metadata=(*bearer(created.api_key), ("x-request-id", "bad-call")),
        )
    client = await nats.connect(suite.event_url)
    try:
        sub = await client.jetstream().pull_subscribe(
            f"crm.api.{created.tenant.id}",
            stream="CRM_EVENTS",
            config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL),
        )
        seen: dict[str, events_pb2.ApiCallEvent] = {}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and {"ok-call", "bad-call"} - set(seen):
            try:
                for message in await sub.fetch(50, timeout=1):
                    event = events_pb2.ApiCallEvent.FromString(message.data)
                    seen[event.request_id] = event
            except nats.errors.TimeoutError:
                pass
    finally:
        await client.close()
    ok, bad = seen["ok-call"], seen["bad-call"]
    assert ok.status_code == "OK" and ok.endpoint == "/crm.v1.TenantService/GetTenant"
    assert ok.tenant_id == created.tenant.id and ok.api_key_id == created.api_key_id
    assert ok.response_size > 0 and ok.request_size > 0 and ok.ip_address == "127.0.0.1"
    assert bad.status_code == "NOT_FOUND" and bad.error_message


async def test_one_shard_down_leaves_the_other_serving(suite: Stack, gateway: grpc.aio.Channel) -> None:
    status = await gateway_pb2_grpc.GatewayServiceStub(gateway).GetGatewayStatus(
        gateway_pb2.GetGatewayStatusRequest(), metadata=bearer(suite.platform_admin_key)
    )
    shard_names = {b.shard_id: b.shard_name for b in status.backends if b.shard_id}
    by_shard: dict[str, str] = {}
    for _ in range(12):
        created = await create_tenant(gateway, suite.platform_admin_key)
        by_shard.setdefault(shard_names[created.tenant.shard_id], created.api_key)
        if len(by_shard) == 2:
            break
    assert set(by_shard) == {"shard-0", "shard-1"}
    list_accounts = gateway.unary_unary("/crm.v1.AccountService/ListAccounts")
    down = suite.services["core-entity@shard-0"]
    down.stop()
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await list_accounts(b"", metadata=bearer(by_shard["shard-0"]), timeout=5)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        try:
            await list_accounts(b"", metadata=bearer(by_shard["shard-1"]), timeout=5)
        except grpc.aio.AioRpcError as exc:  # whatever the backend answers, it is reachable
            assert exc.code() is not grpc.StatusCode.UNAVAILABLE
    finally:
        down.start()
        suite.wait_healthy([down.name])
    # The gateway reconnects within its short backoff once the backend is back.
    await eventually_served(lambda: list_accounts(b"", metadata=bearer(by_shard["shard-0"]), timeout=5))


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "gateway.crt", directory / "gateway.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


async def test_tls_on_the_external_port(suite: Stack) -> None:
    cert_path, key_path = _self_signed(Path(tempfile.mkdtemp()))
    settings = GatewaySettings(
        port=0,
        internal_token=suite.internal_token,
        tenant_address=suite.services["tenant"].address,
        audit_address=suite.services["audit"].address,
        platform_admin_key=suite.platform_admin_key,
        nats_url=suite.event_url,
        tls_cert_file=str(cert_path),
        tls_key_file=str(key_path),
    )
    app = build_app(settings)
    port = await app.start()
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert_path.read_bytes())
        async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
            created = await create_tenant(channel, suite.platform_admin_key)
            assert created.tenant.id
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plaintext:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await create_tenant(plaintext, suite.platform_admin_key)
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        await app.stop()


async def test_a_backend_restarted_under_load_fails_cleanly_then_recovers(
    suite: Stack, gateway: grpc.aio.Channel
) -> None:
    created = await create_tenant(gateway, suite.platform_admin_key)
    stub = audit_pb2_grpc.AuditServiceStub(gateway)
    codes: list[grpc.StatusCode] = []
    stop = asyncio.Event()

    async def load() -> None:
        while not stop.is_set():
            try:
                await stub.ListAuditLogs(
                    audit_pb2.ListAuditLogsRequest(page_size=1), metadata=bearer(created.api_key), timeout=5
                )
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
            await asyncio.sleep(0.02)

    worker = asyncio.create_task(load())
    await asyncio.sleep(0.3)
    await asyncio.to_thread(suite.restart_service, "audit")
    await asyncio.sleep(0.5)
    stop.set()
    await worker
    # Failures during the restart are retryable, never INTERNAL or UNKNOWN; calls succeed after.
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
    await eventually_served(
        lambda: stub.ListAuditLogs(
            audit_pb2.ListAuditLogsRequest(page_size=1), metadata=bearer(created.api_key), timeout=5
        )
    )


async def test_grpcurl_style_calls_work_from_reflection_alone(suite: Stack) -> None:
    """What grpcurl does: resolve every service's descriptors through reflection (no local
    protos), build the request from JSON, call it, and print the reply as JSON."""
    from google.protobuf import descriptor_pool, json_format, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    def run() -> str:
        with grpc.insecure_channel(suite.gateway_address) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            pool = descriptor_pool.DescriptorPool(database)
            for name in database.get_services():
                service = pool.FindServiceByName(name)  # "describe" for every service
                assert service.methods
            method = pool.FindServiceByName("crm.v1.TenantService").FindMethodByName("CreateTenant")
            request_class = message_factory.GetMessageClass(method.input_type)
            response_class = message_factory.GetMessageClass(method.output_type)
            request = json_format.Parse(
                '{"tenant": {"name": "Acme", "subdomain": "' + new_subdomain() + '"}, '
                '"admin_email": "admin@acme.io", "admin_password": "Sup3rSecret"}',
                request_class(),
            )
            call = channel.unary_unary(
                "/crm.v1.TenantService/CreateTenant",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=response_class.FromString,
            )
            reply = call(request, metadata=bearer(suite.platform_admin_key), timeout=30)
            return json_format.MessageToJson(reply)

    printed = await asyncio.to_thread(run)
    assert '"apiKey": "crm_' in printed and '"subdomain": "t-' in printed


async def test_a_stale_route_is_refreshed_and_the_call_retried_once(
    suite: Stack, gateway: grpc.aio.Channel
) -> None:
    """A move flips the tenant's epoch; a gateway still holding the old route is refused by the
    shard guard (STALE_SHARD_EPOCH), refreshes the route and lands the call on the retry."""
    import asyncpg

    from shared.db import asyncpg_dsn

    created = await create_tenant(gateway, suite.platform_admin_key)
    list_accounts = gateway.unary_unary("/crm.v1.AccountService/ListAccounts")
    await list_accounts(b"", metadata=bearer(created.api_key), timeout=10)  # the route is now cached
    status = await gateway_pb2_grpc.GatewayServiceStub(gateway).GetGatewayStatus(
        gateway_pb2.GetGatewayStatusRequest(), metadata=bearer(suite.platform_admin_key)
    )
    shard = next(b.shard_name for b in status.backends if b.shard_id == created.tenant.shard_id)

    def as_admin(database: str) -> str:
        return asyncpg_dsn(suite.admin_dsn).rsplit("/", 1)[0] + f"/{database}"

    async def bump(database: str, sql: str) -> None:
        conn = await asyncpg.connect(as_admin(database))
        try:
            assert await conn.execute(sql, uuid.UUID(created.tenant.id)) == "UPDATE 1"
        finally:
            await conn.close()

    # The shard moves on to an epoch the directory does not know yet: every route is stale, so
    # even the retry is refused, retryably.
    shard_sql = "UPDATE shard.tenants SET epoch = epoch + 1 WHERE tenant_id = $1"
    await bump(suite.database(shard.replace("-", "_")), shard_sql)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await list_accounts(b"", metadata=bearer(created.api_key), timeout=10)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    # The directory flips too, without the control event that would drop the cached route at
    # once: the cached route is stale, the call is refused, the route refreshed, the retry lands.
    directory_sql = "UPDATE tenant.tenant_shards SET epoch = epoch + 1 WHERE tenant_id = $1"
    await bump(suite.database("directory"), directory_sql)
    await list_accounts(b"", metadata=bearer(created.api_key), timeout=10)
