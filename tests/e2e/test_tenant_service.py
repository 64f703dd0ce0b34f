"""The tenant service through the gateway: users, sign-in with lockout and auth events, session
tokens, API keys, tenant lifecycle, configuration and system metadata, shards, and isolation
between tenants. Every test makes its own tenants."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import grpc
import nats
import pytest
from google.protobuf import field_mask_pb2, struct_pb2

from cli.stack import Stack
from crm.v1 import events_pb2, tenant_pb2, tenant_pb2_grpc
from shared.db import asyncpg_dsn
from tests.conftest import bearer, create_tenant, new_subdomain
from tests.e2e.test_thin_slice import field_violations

pytestmark = pytest.mark.e2e

PASSWORD = "Sup3rSecret"


def stub(channel: grpc.aio.Channel) -> tenant_pb2_grpc.TenantServiceStub:
    return tenant_pb2_grpc.TenantServiceStub(channel)


def value(data: object) -> struct_pb2.Value:
    message = struct_pb2.Value()
    from google.protobuf import json_format

    json_format.ParseDict(data, message)  # type: ignore[arg-type]
    return message


async def rpc_error(call: object) -> grpc.aio.AioRpcError:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the call succeeded")


async def sign_in(channel: grpc.aio.Channel, key: str, subdomain: str, email: str, password: str) -> object:
    return await stub(channel).Authenticate(
        tenant_pb2.AuthenticateRequest(subdomain=subdomain, email=email, password=password),
        metadata=bearer(key),
        timeout=10,
    )


async def new_user(
    channel: grpc.aio.Channel, key: str, email: str, role: int = tenant_pb2.USER_ROLE_MEMBER
) -> tenant_pb2.User:
    return await stub(channel).CreateUser(  # type: ignore[no-any-return]
        tenant_pb2.CreateUserRequest(user=tenant_pb2.User(email=email, role=role), password=PASSWORD),  # type: ignore[arg-type]
        metadata=bearer(key),
        timeout=10,
    )


# --- users ------------------------------------------------------------------------------------


async def test_users_are_created_listed_and_bad_ones_refused(suite: Stack, gateway: grpc.aio.Channel) -> None:
    tenant = await create_tenant(gateway, suite.platform_admin_key)
    key = tenant.api_key
    user = await new_user(gateway, key, "ann@example.com")
    assert user.role == tenant_pb2.USER_ROLE_MEMBER and user.active and user.etag == 'W/"1"'

    duplicate = await rpc_error(new_user(gateway, key, "ANN@example.com"))
    assert duplicate.code() is grpc.StatusCode.ALREADY_EXISTS

    weak = await rpc_error(
        stub(gateway).CreateUser(
            tenant_pb2.CreateUserRequest(user=tenant_pb2.User(email="bob@example.com"), password="weakpass"),
            metadata=bearer(key),
        )
    )
    assert weak.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "upper-case" in field_violations(weak)["password"]

    bad = await rpc_error(
        stub(gateway).CreateUser(
            tenant_pb2.CreateUserRequest(
                user=tenant_pb2.User(email="not-an-email", role=9),  # type: ignore[arg-type]
                password=PASSWORD,
            ),
            metadata=bearer(key),
        )
    )
    assert bad.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(bad)) == {"user.email", "user.role"}

    listed = await stub(gateway).ListUsers(tenant_pb2.ListUsersRequest(page_size=1), metadata=bearer(key))
    assert listed.total_size == 2 and len(listed.users) == 1 and listed.next_page_token
    rest = await stub(gateway).ListUsers(
        tenant_pb2.ListUsersRequest(page_size=1, page_token=listed.next_page_token), metadata=bearer(key)
    )
    assert {listed.users[0].email, rest.users[0].email} == {"admin@example.com", "ann@example.com"}

    updated = await stub(gateway).UpdateUser(
        tenant_pb2.UpdateUserRequest(
            user=tenant_pb2.User(id=user.id, etag=user.etag, role=tenant_pb2.USER_ROLE_READ_ONLY),
            update_mask=field_mask_pb2.FieldMask(paths=["role"]),
        ),
        metadata=bearer(key),
    )
    assert updated.role == tenant_pb2.USER_ROLE_READ_ONLY and updated.etag == 'W/"2"'
    stale = await rpc_error(
        stub(gateway).UpdateUser(
            tenant_pb2.UpdateUserRequest(
                user=tenant_pb2.User(id=user.id, etag=user.etag, first_name="Ann"),
                update_mask=field_mask_pb2.FieldMask(paths=["first_name"]),
            ),
            metadata=bearer(key),
        )
    )
    assert stale.code() is grpc.StatusCode.ABORTED
    bad_mask = await rpc_error(
        stub(gateway).UpdateUser(
            tenant_pb2.UpdateUserRequest(
                user=tenant_pb2.User(id=user.id, email="x@example.com"),
                update_mask=field_mask_pb2.FieldMask(paths=["email"]),
            ),
            metadata=bearer(key),
        )
    )
    assert bad_mask.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "update_mask" in field_violations(bad_mask)


# --- sign-in and sessions -----------------------------------------------------------------------


async def auth_events(
    suite: Stack, tenant_id: str, expected: int, timeout: float = 10.0
) -> list[events_pb2.AuthEvent]:
    client = await nats.connect(suite.event_url)
    try:
        js = client.jetstream()
        sub = await js.subscribe(f"crm.auth.{tenant_id}.>", ordered_consumer=True)
        found: list[events_pb2.AuthEvent] = []
        deadline = time.monotonic() + timeout
        while len(found) < expected and time.monotonic() < deadline:
            try:
                message = await sub.next_msg(timeout=max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                break
            found.append(events_pb2.AuthEvent.FromString(message.data))
        return found
    finally:
        await client.close()


async def test_authenticate_gives_a_session_token_the_gateway_accepts(
    suite: Stack, gateway: grpc.aio.Channel
) -> None:
    tenant = await create_tenant(gateway, suite.platform_admin_key)
    signed_in = await sign_in(gateway, tenant.api_key, tenant.tenant.subdomain, "Admin@Example.com", PASSWORD)
    assert signed_in.session_token.startswith("crms_")  # type: ignore[attr-defined]
    assert signed_in.expire_time.ToSeconds() > time.time() + 3600  # type: ignore[attr-defined]
    assert signed_in.tenant_id == tenant.tenant.id  # type: ignore[attr-defined]
    listed = await stub(gateway).ListUsers(
        tenant_pb2.ListUsersRequest(),
        metadata=bearer(signed_in.session_token),  # type: ignore[attr-defined]
    )
    assert [u.email for u in listed.users] == ["admin@example.com"]

    (event,) = await auth_events(suite, tenant.tenant.id, 1)
    assert event.event_type == "login_success" and event.success
    assert event.session_id == signed_in.session_id  # type: ignore[attr-defined]
    assert event.ip_address == "127.0.0.1"
    assert PASSWORD not in event.SerializeToString().decode(errors="ignore")


async def test_five_failures_lock_the_account_and_every_attempt_is_an_auth_event(
    suite: Stack, gateway: grpc.aio.Channel
) -> None:
    tenant = await create_tenant(gateway, suite.platform_admin_key)
    subdomain = tenant.tenant.subdomain
    for _ in range(5):
        failed = await rpc_error(
            sign_in(gateway, tenant.api_key, subdomain, "admin@example.com", "Wr0ngPass")
        )
        assert failed.code() is grpc.StatusCode.UNAUTHENTICATED
    locked = await rpc_error(sign_in(gateway, tenant.api_key, subdomain, "admin@example.com", PASSWORD))
    assert locked.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "locked" in (locked.details() or "")
    unknown = await rpc_error(sign_in(gateway, tenant.api_key, subdomain, "nobody@example.com", PASSWORD))
    assert unknown.code() is grpc.StatusCode.UNAUTHENTICATED

    events = await auth_events(suite, tenant.tenant.id, 8)
    kinds = [e.event_type for e in events]
    assert kinds.count("login_failure") == 7 and kinds.count("account_locked") == 1
    reasons = {e.failure_reason for e in events if e.event_type == "login_failure"}
    assert reasons == {"wrong password", "account locked", "unknown user"}
    for event in events:
        assert "Wr0ngPass" not in event.SerializeToString().decode(errors="ignore")
        assert event.ip_address


async def test_missing_sign_in_fields_are_named(suite: Stack, gateway: grpc.aio.Channel) -> None:
    tenant = await create_tenant(gateway, suite.platform_admin_key)
    error = await rpc_error(sign_in(gateway, tenant.api_key, "", "", ""))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(error)) == {"subdomain", "email", "password"}
    # Sign-in is public at the gateway: no credential is needed to get one.
    signed_in = await stub(gateway).Authenticate(
        tenant_pb2.AuthenticateRequest(
            subdomain=tenant.tenant.subdomain, email="admin@example.com", password=PASSWORD
        ),
        timeout=10,
    )
    assert signed_in.session_token
    unknown = await rpc_error(
        sign_in(gateway, tenant.api_key, "no-such-tenant", "admin@example.com", PASSWORD)
    )
    assert unknown.code() is grpc.StatusCode.UNAUTHENTICATED


async def expire_sessions(suite: Stack, tenant_id: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(suite.db_urls(suite.database("directory"))["CRM_DB_URL"]))
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.current_tenant_id', $1, true)", tenant_id)
            await conn.execute("UPDATE tenant.sessions SET expires_at = now() - interval '1 second'")
    finally:
        await conn.close()


async def test_an_expired_session_token_is_refused(suite: Stack, gateway: grpc.aio.Channel) -> None:
    tenant = await create_tenant(gateway, suite.platform_admin_key)
    signed_in = await sign_in(gateway, tenant.api_key, tenant.tenant.subdomain, "admin@example.com", PASSWORD)
    token = signed_in.session_token  # type: ignore[attr-defined]
    await stub(gateway).ListUsers(tenant_pb2.ListUsersRequest(), metadata=bearer(token))
    await expire_sessions(suite, tenant.tenant.id)
    deadline = time.monotonic() + 10
    while True:
        try:
            await stub(gateway).ListUsers(tenant_pb2.ListUsersRequest(), metadata=bearer(token))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() is grpc.StatusCode.UNAUTHENTICATED
            break
        assert time.monotonic() < deadline, "the expired token still works"
        await asyncio.sleep(0.3)


async def test_logout_ends_the_session_and_is_an_auth_event(suite: Stack, gateway: grpc.aio.Channel) -> None:
    tenant = await create_tenant(gateway, suite.platform_admin_key)
    signed_in = await sign_in(gateway, tenant.api_key, tenant.tenant.subdomain, "admin@example.com", PASSWORD)
    token = signed_in.session_token  # type: ignore[attr-defined]
    ended = await stub(gateway).Logout(tenant_pb2.LogoutRequest(), metadata=bearer(token))
    assert ended.session_id == signed_in.session_id  # type: ignore[attr-defined]
    deadline = time.monotonic() + 8
    while True:
        try:
            await stub(gateway).ListUsers(tenant_pb2.ListUsersRequest(), metadata=bearer(token))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() is grpc.StatusCode.UNAUTHENTICATED
            break
        assert time.monotonic() < deadline, "the ended session still works"
        await asyncio.sleep(0.3)
    events = await auth_events(suite, tenant.tenant.id, 2)
    assert [e.event_type for e in events] == ["login_success", "logout"]
    # An API key is not a session: nothing to end.
    with_key = await rpc_error(
        stub(gateway).Logout(tenant_pb2.LogoutRequest(), metadata=bearer(tenant.api_key))
    )
    assert with_key.code() is grpc.StatusCode.FAILED_PRECONDITION


async def test_a_member_cannot_manage_keys_or_users(suite: Stack, gateway: grpc.aio.Channel) -> None:
    tenant = await create_tenant(gateway, suite.platform_admin_key)
    await new_user(gateway, tenant.api_key, "member@example.com")
    signed_in = await sign_in(
        gateway, tenant.api_key, tenant.tenant.subdomain, "member@example.com", PASSWORD
    )
    token = signed_in.session_token  # type: ignore[attr-defined]
    for call in (
        stub(gateway).CreateApiKey(
            tenant_pb2.CreateApiKeyRequest(api_key=tenant_pb2.ApiKey(name="mine")), metadata=bearer(token)
        ),
        stub(gateway).CreateUser(
            tenant_pb2.CreateUserRequest(user=tenant_pb2.User(email="x@example.com"), password=PASSWORD),
            metadata=bearer(token),
        ),
    ):
        error = await rpc_error(call)
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED


# --- API keys ---------------------------------------------------------------------------------


async def test_api_keys_are_shown_once_listed_by_prefix_and_revocation_stops_them(
    suite: Stack, gateway: grpc.aio.Channel
) -> None:
    tenant = await create_tenant(gateway, suite.platform_admin_key)
    created = await stub(gateway).CreateApiKey(
        tenant_pb2.CreateApiKeyRequest(api_key=tenant_pb2.ApiKey(name="etl", scopes=["read"])),
        metadata=bearer(tenant.api_key),
    )
    assert created.key.startswith(f"crm_{created.api_key.prefix}_")
    assert list(created.api_key.scopes) == ["read"]
    listed = await stub(gateway).ListApiKeys(tenant_pb2.ListApiKeysRequest(), metadata=bearer(tenant.api_key))
    assert listed.total_size == 2
    assert created.key not in str(listed)
    assert created.api_key.prefix in {k.prefix for k in listed.api_keys}

    # The new key works, and keeps working until revoked.
    await stub(gateway).ListUsers(tenant_pb2.ListUsersRequest(), metadata=bearer(created.key))
    revoked = await stub(gateway).RevokeApiKey(
        tenant_pb2.RevokeApiKeyRequest(id=created.api_key.id), metadata=bearer(tenant.api_key)
    )
    assert revoked.HasField("revoke_time")
    started = time.monotonic()
    while True:
        try:
            await stub(gateway).ListUsers(tenant_pb2.ListUsersRequest(), metadata=bearer(created.key))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() is grpc.StatusCode.UNAUTHENTICATED
            break
        assert time.monotonic() - started < 6, "a revoked key still works after 6 s"
        await asyncio.sleep(0.1)

    bad = await rpc_error(
        stub(gateway).CreateApiKey(
            tenant_pb2.CreateApiKeyRequest(api_key=tenant_pb2.ApiKey(name=" ", scopes=["root"])),
            metadata=bearer(tenant.api_key),
        )
    )
    assert bad.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(bad)) == {"api_key.name", "api_key.scopes"}
    missing = await rpc_error(
        stub(gateway).RevokeApiKey(
            tenant_pb2.RevokeApiKeyRequest(id=str(uuid.uuid4())), metadata=bearer(tenant.api_key)
        )
    )
    assert missing.code() is grpc.StatusCode.NOT_FOUND


# --- isolation ----------------------------------------------------------------------------------


async def test_a_tenant_cannot_reach_another_tenants_users_keys_or_configurations(
    suite: Stack, gateway: grpc.aio.Channel
) -> None:
    tenant_a = await create_tenant(gateway, suite.platform_admin_key)
    tenant_b = await create_tenant(gateway, suite.platform_admin_key)
    b_user = await new_user(gateway, tenant_b.api_key, "secret-person@example.com")
    await stub(gateway).SetConfiguration(
        tenant_pb2.SetConfigurationRequest(
            configuration=tenant_pb2.Configuration(
                category="integrations", key="crm_sync", value=value({"x": 1})
            )
        ),
        metadata=bearer(tenant_b.api_key),
    )
    users_seen = await stub(gateway).ListUsers(
        tenant_pb2.ListUsersRequest(), metadata=bearer(tenant_a.api_key)
    )
    assert "secret-person@example.com" not in {u.email for u in users_seen.users}
    update = await rpc_error(
        stub(gateway).UpdateUser(
            tenant_pb2.UpdateUserRequest(
                user=tenant_pb2.User(id=b_user.id, first_name="pwned"),
                update_mask=field_mask_pb2.FieldMask(paths=["first_name"]),
            ),
            metadata=bearer(tenant_a.api_key),
        )
    )
    assert update.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED)
    revoke = await rpc_error(
        stub(gateway).RevokeApiKey(
            tenant_pb2.RevokeApiKeyRequest(id=tenant_b.api_key_id), metadata=bearer(tenant_a.api_key)
        )
    )
    assert revoke.code() is grpc.StatusCode.NOT_FOUND
    config = await rpc_error(
        stub(gateway).GetConfiguration(
            tenant_pb2.GetConfigurationRequest(category="integrations", key="crm_sync"),
            metadata=bearer(tenant_a.api_key),
        )
    )
    assert config.code() is grpc.StatusCode.NOT_FOUND
    listed = await stub(gateway).ListConfigurations(
        tenant_pb2.ListConfigurationsRequest(category="integrations"), metadata=bearer(tenant_a.api_key)
    )
    assert list(listed.configurations) == []
    # B's key still works: A's attempt changed nothing.
    await stub(gateway).ListUsers(tenant_pb2.ListUsersRequest(), metadata=bearer(tenant_b.api_key))


# --- tenants -----------------------------------------------------------------------------------


async def test_a_suspended_tenant_is_refused_and_reactivation_restores_access(
    suite: Stack, gateway: grpc.aio.Channel
) -> None:
    tenant = await create_tenant(gateway, suite.platform_admin_key)
    admin = bearer(suite.platform_admin_key)
    suspended = await stub(gateway).UpdateTenant(
        tenant_pb2.UpdateTenantRequest(
            tenant=tenant_pb2.Tenant(id=tenant.tenant.id, status=tenant_pb2.TENANT_STATUS_SUSPENDED),
            update_mask=field_mask_pb2.FieldMask(paths=["status"]),
        ),
        metadata=admin,
    )
    assert suspended.status == tenant_pb2.TENANT_STATUS_SUSPENDED
    deadline = time.monotonic() + 6
    while True:
        try:
            await stub(gateway).ListUsers(tenant_pb2.ListUsersRequest(), metadata=bearer(tenant.api_key))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() is grpc.StatusCode.FAILED_PRECONDITION
            break
        assert time.monotonic() < deadline, "the suspended tenant is still served"
        await asyncio.sleep(0.1)
    await stub(gateway).UpdateTenant(
        tenant_pb2.UpdateTenantRequest(
            tenant=tenant_pb2.Tenant(id=tenant.tenant.id, status=tenant_pb2.TENANT_STATUS_ACTIVE),
            update_mask=field_mask_pb2.FieldMask(paths=["status"]),
        ),
        metadata=admin,
    )
    deadline = time.monotonic() + 6
    while True:
        try:
            await stub(gateway).ListUsers(tenant_pb2.ListUsersRequest(), metadata=bearer(tenant.api_key))
            break
        except grpc.aio.AioRpcError as exc:
            assert exc.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert time.monotonic() < deadline, "the reactivated tenant is still refused"
            await asyncio.sleep(0.1)


async def test_tenants_are_listed_filtered_and_bad_updates_named(
    suite: Stack, gateway: grpc.aio.Channel
) -> None:
    admin = bearer(suite.platform_admin_key)
    tenant = await create_tenant(
        gateway,
        suite.platform_admin_key,
        tenant=tenant_pb2.Tenant(
            name="Pro", subdomain=new_subdomain(), plan_type=tenant_pb2.PLAN_TYPE_PROFESSIONAL
        ),
    )
    found = await stub(gateway).ListTenants(
        tenant_pb2.ListTenantsRequest(filter=f"subdomain = {tenant.tenant.subdomain}"), metadata=admin
    )
    assert [t.id for t in found.tenants] == [tenant.tenant.id] and found.total_size == 1
    assert found.tenants[0].plan_type == tenant_pb2.PLAN_TYPE_PROFESSIONAL
    bad_filter = await rpc_error(
        stub(gateway).ListTenants(tenant_pb2.ListTenantsRequest(filter="name ~ x"), metadata=admin)
    )
    assert "filter" in field_violations(bad_filter)
    tenant_only = await rpc_error(
        stub(gateway).ListTenants(tenant_pb2.ListTenantsRequest(), metadata=bearer(tenant.api_key))
    )
    assert tenant_only.code() is grpc.StatusCode.PERMISSION_DENIED

    bad = await rpc_error(
        stub(gateway).UpdateTenant(
            tenant_pb2.UpdateTenantRequest(
                tenant=tenant_pb2.Tenant(id=tenant.tenant.id, name=" ", plan_type=7, status=9),  # type: ignore[arg-type]
                update_mask=field_mask_pb2.FieldMask(paths=["name", "plan_type", "status"]),
            ),
            metadata=admin,
        )
    )
    assert bad.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(bad)) == {"tenant.name", "tenant.plan_type", "tenant.status"}
    renamed = await stub(gateway).UpdateTenant(
        tenant_pb2.UpdateTenantRequest(
            tenant=tenant_pb2.Tenant(id=tenant.tenant.id, name="Renamed", etag=tenant.tenant.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["name"]),
        ),
        metadata=admin,
    )
    assert renamed.name == "Renamed" and renamed.etag == 'W/"2"'
    stale = await rpc_error(
        stub(gateway).UpdateTenant(
            tenant_pb2.UpdateTenantRequest(
                tenant=tenant_pb2.Tenant(id=tenant.tenant.id, name="Again", etag=tenant.tenant.etag),
                update_mask=field_mask_pb2.FieldMask(paths=["name"]),
            ),
            metadata=admin,
        )
    )
    assert stale.code() is grpc.StatusCode.ABORTED


@pytest.mark.parametrize(
    ("subdomain", "plan"),
    [("UPPER", 1), ("-leading", 1), ("x" * 101, 1), ("fine-name", 42)],
)
async def test_bad_onboarding_input_is_invalid_argument(
    suite: Stack, gateway: grpc.aio.Channel, subdomain: str, plan: int
) -> None:
    error = await rpc_error(
        create_tenant(
            gateway,
            suite.platform_admin_key,
            tenant=tenant_pb2.Tenant(name="X", subdomain=subdomain, plan_type=plan),  # type: ignore[arg-type]
        )
    )
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(error)) == ({"tenant.plan_type"} if plan == 42 else {"tenant.subdomain"})


async def test_delete_tenant_removes_it_and_its_credentials(suite: Stack, gateway: grpc.aio.Channel) -> None:
    tenant = await create_tenant(gateway, suite.platform_admin_key)
    admin = bearer(suite.platform_admin_key)
    deleted = await stub(gateway).DeleteTenant(
        tenant_pb2.DeleteTenantRequest(id=tenant.tenant.id), metadata=admin
    )
    assert deleted.id == tenant.tenant.id
    gone = await rpc_error(
        stub(gateway).GetTenant(tenant_pb2.GetTenantRequest(id=tenant.tenant.id), metadata=admin)
    )
    assert gone.code() is grpc.StatusCode.NOT_FOUND
    deadline = time.monotonic() + 6
    while True:
        try:
            await stub(gateway).ListUsers(tenant_pb2.ListUsersRequest(), metadata=bearer(tenant.api_key))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND)
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    again = await rpc_error(
        stub(gateway).DeleteTenant(tenant_pb2.DeleteTenantRequest(id=tenant.tenant.id), metadata=admin)
    )
    assert again.code() is grpc.StatusCode.NOT_FOUND


# --- configuration and metadata ----------------------------------------------------------------


async def test_default_configurations_and_encrypted_values(suite: Stack, gateway: grpc.aio.Channel) -> None:
    tenant = await create_tenant(gateway, suite.platform_admin_key)
    key = bearer(tenant.api_key)
    defaults = await stub(gateway).ListConfigurations(tenant_pb2.ListConfigurationsRequest(), metadata=key)
    by_key = {(c.category, c.key): c for c in defaults.configurations}
    assert set(by_key) == {
        ("ui_customization", "theme"),
        ("business_rules", "currency"),
        ("notifications", "email_settings"),
    }
    assert by_key[("business_rules", "currency")].value.struct_value["default"] == "USD"

    secret = await stub(gateway).SetConfiguration(
        tenant_pb2.SetConfigurationRequest(
            configuration=tenant_pb2.Configuration(
                category="integrations",
                key="email_provider",
                value=value({"provider": "sendgrid", "api_key": "SG.very-secret"}),
                is_encrypted=True,
            )
        ),
        metadata=key,
    )
    assert secret.is_encrypted and secret.value.struct_value["api_key"] == "SG.very-secret"
    read = await stub(gateway).GetConfiguration(
        tenant_pb2.GetConfigurationRequest(category="integrations", key="email_provider"), metadata=key
    )
    assert read.value.struct_value["api_key"] == "SG.very-secret"

    # At rest the value is ciphertext only.
    conn = await asyncpg.connect(asyncpg_dsn(suite.db_urls(suite.database("directory"))["CRM_DB_URL"]))
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.current_tenant_id', $1, true)", tenant.tenant.id)
            row = await conn.fetchrow(
                "SELECT config_value, encrypted_value FROM tenant.tenant_configurations "
                "WHERE config_category = 'integrations'"
            )
    finally:
        await conn.close()
    assert row is not None and row["config_value"] is None
    assert "very-secret" not in row["encrypted_value"]

    stale = await rpc_error(
        stub(gateway).SetConfiguration(
            tenant_pb2.SetConfigurationRequest(
                configuration=tenant_pb2.Configuration(
                    category="ui_customization", key="theme", value=value({}), etag='W/"99"'
                )
            ),
            metadata=key,
        )
    )
    assert stale.code() is grpc.StatusCode.ABORTED
    bad = await rpc_error(
        stub(gateway).SetConfiguration(
            tenant_pb2.SetConfigurationRequest(
                configuration=tenant_pb2.Configuration(category="Bad Category", key="")
            ),
            metadata=key,
        )
    )
    assert set(field_violations(bad)) == {
        "configuration.category",
        "configuration.key",
        "configuration.value",
    }


async def test_system_metadata_is_seeded_and_a_tenant_password_policy_applies(
    suite: Stack, gateway: grpc.aio.Channel
) -> None:
    tenant = await create_tenant(gateway, suite.platform_admin_key)
    seen = await stub(gateway).ListSystemMetadata(
        tenant_pb2.ListSystemMetadataRequest(), metadata=bearer(tenant.api_key)
    )
    keys = {(m.metadata_type, m.metadata_key): m for m in seen.system_metadata if not m.tenant_id}
    assert {"max_file_upload_size", "supported_currencies", "password_policy"} <= {k for _, k in keys}
    assert keys[("system_config", "supported_currencies")].value.list_value.values[0].string_value == "USD"

    refused = await rpc_error(
        stub(gateway).SetSystemMetadata(
            tenant_pb2.SetSystemMetadataRequest(
                system_metadata=tenant_pb2.SystemMetadata(metadata_type="x", metadata_key="y", value=value(1))
            ),
            metadata=bearer(tenant.api_key),
        )
    )
    assert refused.code() is grpc.StatusCode.PERMISSION_DENIED
    bad = await rpc_error(
        stub(gateway).SetSystemMetadata(
            tenant_pb2.SetSystemMetadataRequest(
                system_metadata=tenant_pb2.SystemMetadata(
                    tenant_id=tenant.tenant.id,
                    metadata_type="system_config",
                    metadata_key="password_policy",
                    value=value({"min_length": "long"}),
                )
            ),
            metadata=bearer(suite.platform_admin_key),
        )
    )
    assert "system_metadata.value.min_length" in field_violations(bad)
    await stub(gateway).SetSystemMetadata(
        tenant_pb2.SetSystemMetadataRequest(
            system_metadata=tenant_pb2.SystemMetadata(
                tenant_id=tenant.tenant.id,
                metadata_type="system_config",
                metadata_key="password_policy",
                value=value({"min_length": 14, "require_uppercase": True, "require_numbers": True}),
            )
        ),
        metadata=bearer(suite.platform_admin_key),
    )
    short = await rpc_error(new_user(gateway, tenant.api_key, "short@example.com"))  # PASSWORD has 11
    assert "at least 14" in field_violations(short)["password"]
    # Other tenants keep the global policy.
    other = await create_tenant(gateway, suite.platform_admin_key)
    await new_user(gateway, other.api_key, "fine@example.com")


# --- shards ---------------------------------------------------------------------------------------


async def test_shards_are_listed_with_counts_and_bad_ones_refused(
    suite: Stack, gateway: grpc.aio.Channel
) -> None:
    admin = bearer(suite.platform_admin_key)
    tenant = await create_tenant(gateway, suite.platform_admin_key)
    listed = await stub(gateway).ListShards(tenant_pb2.ListShardsRequest(), metadata=admin)
    names = {s.name for s in listed.shards}
    assert {"shard-0", "shard-1"} <= names
    home = next(s for s in listed.shards if s.id == tenant.tenant.shard_id)
    assert home.tenant_count >= 1
    # Connection settings are input-only: never returned.
    assert all(not s.database_url and not s.owner_database_url for s in listed.shards)

    bad = await rpc_error(
        stub(gateway).CreateShard(
            tenant_pb2.CreateShardRequest(
                shard=tenant_pb2.Shard(
                    name="Bad Name", core_entity_address="nohost", database_url="mysql://x"
                )
            ),
            metadata=admin,
        )
    )
    assert bad.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(bad)) == {
        "shard.name",
        "shard.core_entity_address",
        "shard.custom_object_address",
        "shard.database_url",
        "shard.owner_database_url",
    }
    taken = await rpc_error(
        stub(gateway).CreateShard(
            tenant_pb2.CreateShardRequest(
                shard=tenant_pb2.Shard(
                    name="shard-0",
                    core_entity_address="127.0.0.1:1",
                    custom_object_address="127.0.0.1:2",
                    database_url="postgresql://a@b/c",
                    owner_database_url="postgresql://a@b/c",
                )
            ),
            metadata=admin,
        )
    )
    assert taken.code() is grpc.StatusCode.ALREADY_EXISTS
    tenant_call = await rpc_error(
        stub(gateway).ListShards(tenant_pb2.ListShardsRequest(), metadata=bearer(tenant.api_key))
    )
    assert tenant_call.code() is grpc.StatusCode.PERMISSION_DENIED


async def test_a_dedicated_shard_without_room_is_resource_exhausted(
    suite: Stack, gateway: grpc.aio.Channel
) -> None:
    error = await rpc_error(
        create_tenant(
            gateway,
            suite.platform_admin_key,
            tenant=tenant_pb2.Tenant(
                name="Big", subdomain=new_subdomain(), plan_type=tenant_pb2.PLAN_TYPE_ENTERPRISE
            ),
            dedicated_shard=True,
        )
    )
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "dedicated shard" in (error.details() or "")
    basic = await rpc_error(create_tenant(gateway, suite.platform_admin_key, dedicated_shard=True))
    assert "dedicated_shard" in field_violations(basic)


# --- onboarding on the shard ---------------------------------------------------------------------


async def test_onboarding_creates_the_default_sales_pipeline_on_the_tenants_shard(
    suite: Stack, gateway: grpc.aio.Channel
) -> None:
    from crm.v1 import core_entity_pb2, core_entity_pb2_grpc

    tenant = await create_tenant(gateway, suite.platform_admin_key)
    assert tenant.default_pipeline_id
    pipeline = await core_entity_pb2_grpc.PipelineServiceStub(gateway).GetPipeline(
        core_entity_pb2.GetPipelineRequest(id=tenant.default_pipeline_id), metadata=bearer(tenant.api_key)
    )
    assert pipeline.name == "Sales Pipeline" and pipeline.is_default
    stages = [(s.name, s.probability, s.is_closed, s.is_won) for s in pipeline.stages]
    assert [(name, int(float(p)), closed, won) for name, p, closed, won in stages] == [
        ("Prospecting", 10, False, False),
        ("Qualification", 25, False, False),
        ("Proposal", 50, False, False),
        ("Negotiation", 75, False, False),
        ("Closed Won", 100, True, True),
        ("Closed Lost", 0, True, False),
    ]


async def test_a_retried_onboarding_returns_the_same_tenant_and_one_pipeline(
    suite: Stack, gateway: grpc.aio.Channel
) -> None:
    from crm.v1 import core_entity_pb2, core_entity_pb2_grpc

    request_id = str(uuid.uuid4())
    subdomain = new_subdomain()
    first = await create_tenant(
        gateway,
        suite.platform_admin_key,
        tenant=tenant_pb2.Tenant(name="Once", subdomain=subdomain),
        request_id=request_id,
    )
    again = await create_tenant(
        gateway,
        suite.platform_admin_key,
        tenant=tenant_pb2.Tenant(name="Once", subdomain=subdomain),
        request_id=request_id,
    )
    assert again.tenant.id == first.tenant.id and again.default_pipeline_id == first.default_pipeline_id
    assert again.api_key == ""  # shown once only
    pipelines = await core_entity_pb2_grpc.PipelineServiceStub(gateway).ListPipelines(
        core_entity_pb2.ListPipelinesRequest(), metadata=bearer(first.api_key)
    )
    assert [p.name for p in pipelines.pipelines] == ["Sales Pipeline"]
