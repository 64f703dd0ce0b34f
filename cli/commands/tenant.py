"""`crm tenant|shard ...` (platform admin: `--key` or CRM_PLATFORM_ADMIN_KEY, or the local
stack's key) and `crm user|apikey|config ...` (a tenant credential: `--key`, CRM_API_KEY, or the
one saved by `crm use-key` / `crm login`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.client import (
    API_KEY_OPTION,
    GATEWAY_OPTION,
    HOME_OPTION,
    PLATFORM_KEY_OPTION,
    call,
    console,
    err_console,
    gateway_address,
    platform_key,
    print_message,
)

tenant_app = typer.Typer(help="Tenants (platform admin).", no_args_is_help=True)
shard_app = typer.Typer(help="Shards (platform admin).", no_args_is_help=True)
user_app = typer.Typer(help="Users of your tenant.", no_args_is_help=True)
apikey_app = typer.Typer(help="API keys of your tenant.", no_args_is_help=True)
config_app = typer.Typer(help="Configuration of your tenant.", no_args_is_help=True)

HOME = Path(".crm")
PLANS = ("basic", "professional", "enterprise")
ROLES = ("admin", "member", "read_only")


def register(app: typer.Typer) -> None:
    app.add_typer(tenant_app, name="tenant")
    app.add_typer(shard_app, name="shard")
    app.add_typer(user_app, name="user")
    app.add_typer(apikey_app, name="apikey")
    app.add_typer(config_app, name="config")


def _platform(home: Path, gateway: str | None, key: str | None, method: str, request: Any) -> Any:
    from crm.v1 import tenant_pb2_grpc

    return call(
        gateway_address(home, gateway),
        platform_key(home, key),
        tenant_pb2_grpc.TenantServiceStub,
        method,
        request,
    )


def _tenant(home: Path, gateway: str | None, key: str, method: str, request: Any) -> Any:
    from crm.v1 import tenant_pb2_grpc

    return call(gateway_address(home, gateway), key, tenant_pb2_grpc.TenantServiceStub, method, request)


def _mask(*paths: str) -> Any:
    from google.protobuf import field_mask_pb2

    return field_mask_pb2.FieldMask(paths=list(paths))


def _json(text: str, option: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"{option} is not JSON: {exc}") from exc


# --- tenants ------------------------------------------------------------------------------------


@tenant_app.command("create")
def tenant_create(
    name: Annotated[str, typer.Option()],
    subdomain: Annotated[str, typer.Option()],
    admin_email: Annotated[str, typer.Option()],
    admin_password: Annotated[str, typer.Option(prompt=True, hide_input=True)],
    plan: Annotated[str, typer.Option(help="basic, professional or enterprise")] = "basic",
    dedicated: Annotated[bool, typer.Option(help="Enterprise only: a dedicated shard.")] = False,
    admin_first_name: Annotated[str, typer.Option()] = "",
    admin_last_name: Annotated[str, typer.Option()] = "",
    key: PLATFORM_KEY_OPTION = None,
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = HOME,
) -> None:
    """Onboard a tenant; prints it and its first API key (shown once)."""
    from crm.v1 import tenant_pb2

    if plan not in PLANS:
        raise typer.BadParameter(f"--plan must be one of {', '.join(PLANS)}")
    request = tenant_pb2.CreateTenantRequest(
        tenant=tenant_pb2.Tenant(
            name=name, subdomain=subdomain, plan_type=tenant_pb2.PlanType.Value("PLAN_TYPE_" + plan.upper())
        ),
        admin_email=admin_email,
        admin_password=admin_password,
        admin_first_name=admin_first_name,
        admin_last_name=admin_last_name,
        dedicated_shard=dedicated,
    )
    print_message(_platform(home, gateway, key, "CreateTenant", request))


@tenant_app.command("get")
def tenant_get(
    tenant_id: str, key: PLATFORM_KEY_OPTION = None, gateway: GATEWAY_OPTION = None, home: HOME_OPTION = HOME
) -> None:
    """Show one tenant."""
    from crm.v1 import tenant_pb2

    print_message(_platform(home, gateway, key, "GetTenant", tenant_pb2.GetTenantRequest(id=tenant_id)))


@tenant_app.command("list")
def tenant_list(
    filter: Annotated[str, typer.Option(help='e.g. "status = suspended AND plan_type = enterprise"')] = "",
    page_size: Annotated[int, typer.Option()] = 100,
    key: PLATFORM_KEY_OPTION = None,
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = HOME,
) -> None:
    """List tenants with their status, plan and shard."""
    from rich.table import Table

    from crm.v1 import tenant_pb2

    table = Table("id", "subdomain", "name", "plan", "status", "shard")
    token = ""
    while True:
        reply = _platform(
            home,
            gateway,
            key,
            "ListTenants",
            tenant_pb2.ListTenantsRequest(page_size=page_size, page_token=token, filter=filter),
        )
        for t in reply.tenants:
            table.add_row(
                t.id,
                t.subdomain,
                t.name,
                tenant_pb2.PlanType.Name(t.plan_type).removeprefix("PLAN_TYPE_").lower(),
                tenant_pb2.TenantStatus.Name(t.status).removeprefix("TENANT_STATUS_").lower(),
                t.shard_id,
            )
        token = reply.next_page_token
        if not token:
            break
    console.print(table)


def _set_status(tenant_id: str, status: int, key: str | None, gateway: str | None, home: Path) -> None:
    from crm.v1 import tenant_pb2

    request = tenant_pb2.UpdateTenantRequest(
        tenant=tenant_pb2.Tenant(id=tenant_id, status=status),  # type: ignore[arg-type]
        update_mask=_mask("status"),
    )
    print_message(_platform(home, gateway, key, "UpdateTenant", request))


@tenant_app.command("suspend")
def tenant_suspend(
    tenant_id: str, key: PLATFORM_KEY_OPTION = None, gateway: GATEWAY_OPTION = None, home: HOME_OPTION = HOME
) -> None:
    """Suspend a tenant: the gateway refuses its data calls until it is activated."""
    from crm.v1 import tenant_pb2

    _set_status(tenant_id, tenant_pb2.TENANT_STATUS_SUSPENDED, key, gateway, home)


@tenant_app.command("activate")
def tenant_activate(
    tenant_id: str, key: PLATFORM_KEY_OPTION = None, gateway: GATEWAY_OPTION = None, home: HOME_OPTION = HOME
) -> None:
    """Reactivate a suspended or cancelled tenant."""
    from crm.v1 import tenant_pb2

    _set_status(tenant_id, tenant_pb2.TENANT_STATUS_ACTIVE, key, gateway, home)


@tenant_app.command("update")
def tenant_update(
    tenant_id: str,
    name: Annotated[str | None, typer.Option()] = None,
    plan: Annotated[str | None, typer.Option(help="basic, professional or enterprise")] = None,
    settings: Annotated[str | None, typer.Option(help="JSON object")] = None,
    key: PLATFORM_KEY_OPTION = None,
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = HOME,
) -> None:
    """Change a tenant's name, plan or settings."""
    from google.protobuf import struct_pb2

    from crm.v1 import tenant_pb2

    tenant = tenant_pb2.Tenant(id=tenant_id)
    paths = []
    if name is not None:
        tenant.name = name
        paths.append("name")
    if plan is not None:
        if plan not in PLANS:
            raise typer.BadParameter(f"--plan must be one of {', '.join(PLANS)}")
        tenant.plan_type = tenant_pb2.PlanType.Value("PLAN_TYPE_" + plan.upper())
        paths.append("plan_type")
    if settings is not None:
        values = _json(settings, "--settings")
        if not isinstance(values, dict):
            raise typer.BadParameter("--settings must be a JSON object")
        message = struct_pb2.Struct()
        message.update(values)
        tenant.settings.CopyFrom(message)
        paths.append("settings")
    if not paths:
        raise typer.BadParameter("pass --name, --plan or --settings")
    request = tenant_pb2.UpdateTenantRequest(tenant=tenant, update_mask=_mask(*paths))
    print_message(_platform(home, gateway, key, "UpdateTenant", request))


@tenant_app.command("delete")
def tenant_delete(
    tenant_id: str,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    key: PLATFORM_KEY_OPTION = None,
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = HOME,
) -> None:
    """Delete a tenant and purge its data (audit keeps its deletion log)."""
    from crm.v1 import tenant_pb2

    if not yes:
        typer.confirm(f"Delete tenant {tenant_id} and all its data?", abort=True)
    print_message(_platform(home, gateway, key, "DeleteTenant", tenant_pb2.DeleteTenantRequest(id=tenant_id)))


@tenant_app.command("move")
def tenant_move(
    tenant_id: str,
    target_shard_id: Annotated[str, typer.Option("--to", help="The target shard id.")],
    key: PLATFORM_KEY_OPTION = None,
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = HOME,
) -> None:
    """Move a tenant to another shard online, with a progress bar."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from crm.v1 import tenant_pb2

    started = _platform(
        home,
        gateway,
        key,
        "MoveTenant",
        tenant_pb2.MoveTenantRequest(tenant_id=tenant_id, target_shard_id=target_shard_id),
    )
    finished = (tenant_pb2.TENANT_MOVE_PHASE_COMPLETED, tenant_pb2.TENANT_MOVE_PHASE_FAILED)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,} rows"),
        TimeElapsedColumn(),
    ) as progress:
        task = progress.add_task("pending", total=None)
        move = started
        while move.phase not in finished:
            time.sleep(0.3)
            move = _platform(
                home, gateway, key, "GetTenantMove", tenant_pb2.GetTenantMoveRequest(id=started.id)
            )
            phase = tenant_pb2.TenantMovePhase.Name(move.phase).removeprefix("TENANT_MOVE_PHASE_").lower()
            progress.update(
                task,
                description=phase,
                completed=move.rows_copied,
                total=max(move.rows_total, move.rows_copied) or None,
            )
    print_message(move)
    if move.phase == tenant_pb2.TENANT_MOVE_PHASE_FAILED:
        err_console.print("[red]the move failed; the tenant stays on its source shard[/red]")
        raise typer.Exit(1)
    console.print(f"moved; writes were blocked for {move.write_block_ms} ms")


# --- shards ---------------------------------------------------------------------------------------


@shard_app.command("add")
def shard_add(
    name: Annotated[str, typer.Option()],
    core_entity_address: Annotated[str, typer.Option(help="host:port")],
    custom_object_address: Annotated[str, typer.Option(help="host:port")],
    database_url: Annotated[str, typer.Option(envvar="CRM_SHARD_DB_URL", help="App role URL.")],
    owner_database_url: Annotated[str, typer.Option(envvar="CRM_SHARD_DB_OWNER_URL", help="Owner URL.")],
    max_tenants: Annotated[int, typer.Option()] = 1000,
    active: Annotated[bool, typer.Option(help="Open for automatic placement.")] = True,
    dedicated: Annotated[bool, typer.Option(help="Reserved for one enterprise tenant.")] = False,
    key: PLATFORM_KEY_OPTION = None,
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = HOME,
) -> None:
    """Register a shard: runs its migrations and opens it for routing."""
    from crm.v1 import tenant_pb2

    shard = tenant_pb2.Shard(
        name=name,
        core_entity_address=core_entity_address,
        custom_object_address=custom_object_address,
        database_url=database_url,
        owner_database_url=owner_database_url,
        max_tenants=max_tenants,
        active=active,
        dedicated=dedicated,
    )
    print_message(_platform(home, gateway, key, "CreateShard", tenant_pb2.CreateShardRequest(shard=shard)))


@shard_app.command("list")
def shard_list(
    key: PLATFORM_KEY_OPTION = None, gateway: GATEWAY_OPTION = None, home: HOME_OPTION = HOME
) -> None:
    """List shards with their tenant counts."""
    from rich.table import Table

    from crm.v1 import tenant_pb2

    reply = _platform(home, gateway, key, "ListShards", tenant_pb2.ListShardsRequest())
    table = Table("id", "name", "tenants", "max", "active", "dedicated", "core-entity", "custom-object")
    for s in reply.shards:
        table.add_row(
            s.id,
            s.name,
            str(s.tenant_count),
            str(s.max_tenants),
            "yes" if s.active else "no",
            "yes" if s.dedicated else "no",
            s.core_entity_address,
            s.custom_object_address,
        )
    console.print(table)


@shard_app.command("update")
def shard_update(
    shard_id: str,
    max_tenants: Annotated[int | None, typer.Option()] = None,
    active: Annotated[bool | None, typer.Option("--active/--inactive")] = None,
    key: PLATFORM_KEY_OPTION = None,
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = HOME,
) -> None:
    """Change a shard's capacity or open/close it for placement."""
    from crm.v1 import tenant_pb2

    shard = tenant_pb2.Shard(id=shard_id)
    paths = []
    if max_tenants is not None:
        shard.max_tenants = max_tenants
        paths.append("max_tenants")
    if active is not None:
        shard.active = active
        paths.append("active")
    if not paths:
        raise typer.BadParameter("pass --max-tenants or --active/--inactive")
    request = tenant_pb2.UpdateShardRequest(shard=shard, update_mask=_mask(*paths))
    print_message(_platform(home, gateway, key, "UpdateShard", request))


# --- users ----------------------------------------------------------------------------------------


@user_app.command("create")
def user_create(
    key: API_KEY_OPTION,
    email: Annotated[str, typer.Option()],
    password: Annotated[str, typer.Option(prompt=True, hide_input=True)],
    role: Annotated[str, typer.Option(help="admin, member or read_only")] = "member",
    first_name: Annotated[str, typer.Option()] = "",
    last_name: Annotated[str, typer.Option()] = "",
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = HOME,
) -> None:
    """Add a user to your tenant (admin)."""
    from crm.v1 import tenant_pb2

    if role not in ROLES:
        raise typer.BadParameter(f"--role must be one of {', '.join(ROLES)}")
    user = tenant_pb2.User(
        email=email,
        first_name=first_name,
        last_name=last_name,
        role=tenant_pb2.UserRole.Value("USER_ROLE_" + role.upper()),
    )
    print_message(
        _tenant(home, gateway, key, "CreateUser", tenant_pb2.CreateUserRequest(user=user, password=password))
    )


@user_app.command("list")
def user_list(key: API_KEY_OPTION, gateway: GATEWAY_OPTION = None, home: HOME_OPTION = HOME) -> None:
    """List your tenant's users."""
    from rich.table import Table

    from crm.v1 import tenant_pb2

    table = Table("id", "email", "name", "role", "active", "locked until")
    token = ""
    while True:
        reply = _tenant(
            home, gateway, key, "ListUsers", tenant_pb2.ListUsersRequest(page_size=500, page_token=token)
        )
        for u in reply.users:
            table.add_row(
                u.id,
                u.email,
                f"{u.first_name} {u.last_name}".strip(),
                tenant_pb2.UserRole.Name(u.role).removeprefix("USER_ROLE_").lower(),
                "yes" if u.active else "no",
                u.locked_until.ToJsonString() if u.HasField("locked_until") else "",
            )
        token = reply.next_page_token
        if not token:
            break
    console.print(table)


@user_app.command("update")
def user_update(
    key: API_KEY_OPTION,
    user_id: str,
    role: Annotated[str | None, typer.Option(help="admin, member or read_only")] = None,
    active: Annotated[bool | None, typer.Option("--active/--inactive")] = None,
    first_name: Annotated[str | None, typer.Option()] = None,
    last_name: Annotated[str | None, typer.Option()] = None,
    password: Annotated[bool, typer.Option("--password", help="Prompt for a new password.")] = False,
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = HOME,
) -> None:
    """Change a user's role, active flag, names or password."""
    from crm.v1 import tenant_pb2

    user = tenant_pb2.User(id=user_id)
    paths = []
    if role is not None:
        if role not in ROLES:
            raise typer.BadParameter(f"--role must be one of {', '.join(ROLES)}")
        user.role = tenant_pb2.UserRole.Value("USER_ROLE_" + role.upper())
        paths.append("role")
    if active is not None:
        user.active = active
        paths.append("active")
    for path, value in (("first_name", first_name), ("last_name", last_name)):
        if value is not None:
            setattr(user, path, value)
            paths.append(path)
    new_password = ""
    if password:
        new_password = typer.prompt("New password", hide_input=True, confirmation_prompt=True)
        paths.append("password")
    if not paths:
        raise typer.BadParameter("pass at least one change")
    request = tenant_pb2.UpdateUserRequest(user=user, update_mask=_mask(*paths), password=new_password)
    print_message(_tenant(home, gateway, key, "UpdateUser", request))


# --- API keys -------------------------------------------------------------------------------------


@apikey_app.command("create")
def apikey_create(
    key: API_KEY_OPTION,
    name: Annotated[str, typer.Option()],
    scope: Annotated[list[str] | None, typer.Option(help="read, write, admin; repeat for several")] = None,
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = HOME,
) -> None:
    """Create an API key; the key is printed once and never again."""
    from crm.v1 import tenant_pb2

    request = tenant_pb2.CreateApiKeyRequest(
        api_key=tenant_pb2.ApiKey(name=name, scopes=scope or ["read", "write"])
    )
    reply = _tenant(home, gateway, key, "CreateApiKey", request)
    print_message(reply.api_key)
    console.print(f"key (shown once): [bold]{reply.key}[/bold]")


@apikey_app.command("list")
def apikey_list(key: API_KEY_OPTION, gateway: GATEWAY_OPTION = None, home: HOME_OPTION = HOME) -> None:
    """List your tenant's API keys by prefix."""
    from rich.table import Table

    from crm.v1 import tenant_pb2

    table = Table("id", "prefix", "name", "scopes", "created", "revoked")
    token = ""
    while True:
        reply = _tenant(
            home, gateway, key, "ListApiKeys", tenant_pb2.ListApiKeysRequest(page_size=500, page_token=token)
        )
        for k in reply.api_keys:
            table.add_row(
                k.id,
                k.prefix,
                k.name,
                ",".join(k.scopes),
                k.create_time.ToJsonString(),
                k.revoke_time.ToJsonString() if k.HasField("revoke_time") else "",
            )
        token = reply.next_page_token
        if not token:
            break
    console.print(table)


@apikey_app.command("revoke")
def apikey_revoke(
    key: API_KEY_OPTION,
    api_key_id: str,
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = HOME,
) -> None:
    """Revoke an API key; the gateway refuses it within seconds."""
    from crm.v1 import tenant_pb2

    print_message(_tenant(home, gateway, key, "RevokeApiKey", tenant_pb2.RevokeApiKeyRequest(id=api_key_id)))


# --- configuration ------------------------------------------------------------------------------


@config_app.command("get")
def config_get(
    key: API_KEY_OPTION,
    category: str,
    config_key: str,
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = HOME,
) -> None:
    """Show one configuration value."""
    from crm.v1 import tenant_pb2

    request = tenant_pb2.GetConfigurationRequest(category=category, key=config_key)
    print_message(_tenant(home, gateway, key, "GetConfiguration", request))


@config_app.command("set")
def config_set(
    key: API_KEY_OPTION,
    category: str,
    config_key: str,
    value: Annotated[str, typer.Argument(help="A JSON value.")],
    encrypted: Annotated[bool, typer.Option(help="Encrypt the value at rest.")] = False,
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = HOME,
) -> None:
    """Set one configuration value (JSON)."""
    from google.protobuf import json_format, struct_pb2

    from crm.v1 import tenant_pb2

    message = struct_pb2.Value()
    json_format.ParseDict(_json(value, "VALUE"), message)
    request = tenant_pb2.SetConfigurationRequest(
        configuration=tenant_pb2.Configuration(
            category=category, key=config_key, value=message, is_encrypted=encrypted
        )
    )
    print_message(_tenant(home, gateway, key, "SetConfiguration", request))


@config_app.command("list")
def config_list(
    key: API_KEY_OPTION,
    category: Annotated[str, typer.Option()] = "",
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = HOME,
) -> None:
    """List your tenant's configuration values."""
    from crm.v1 import tenant_pb2

    print_message(
        _tenant(
            home,
            gateway,
            key,
            "ListConfigurations",
            tenant_pb2.ListConfigurationsRequest(category=category, page_size=1000),
        )
    )
