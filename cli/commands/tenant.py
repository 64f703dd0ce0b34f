"""`crm tenant ...`: onboarding and reading tenants (platform admin)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.client import (
    GATEWAY_OPTION,
    HOME_OPTION,
    PLATFORM_KEY_OPTION,
    call,
    gateway_address,
    platform_key,
    print_message,
)

tenant_app = typer.Typer(help="Tenants (platform admin).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(tenant_app, name="tenant")


@tenant_app.command("create")
def tenant_create(
    name: Annotated[str, typer.Option()],
    subdomain: Annotated[str, typer.Option()],
    admin_email: Annotated[str, typer.Option()],
    admin_password: Annotated[str, typer.Option(prompt=True, hide_input=True)],
    plan: Annotated[str, typer.Option()] = "basic",
    key: PLATFORM_KEY_OPTION = None,
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = Path(".crm"),
) -> None:
    """Onboard a tenant; prints it and its first API key (shown once)."""
    from crm.v1 import tenant_pb2, tenant_pb2_grpc

    plans = {
        "basic": tenant_pb2.PLAN_TYPE_BASIC,
        "professional": tenant_pb2.PLAN_TYPE_PROFESSIONAL,
        "enterprise": tenant_pb2.PLAN_TYPE_ENTERPRISE,
    }
    request = tenant_pb2.CreateTenantRequest(
        tenant=tenant_pb2.Tenant(
            name=name, subdomain=subdomain, plan_type=plans.get(plan, tenant_pb2.PLAN_TYPE_UNSPECIFIED)
        ),
        admin_email=admin_email,
        admin_password=admin_password,
    )
    reply = call(
        gateway_address(home, gateway),
        platform_key(home, key),
        tenant_pb2_grpc.TenantServiceStub,
        "CreateTenant",
        request,
    )
    print_message(reply)


@tenant_app.command("get")
def tenant_get(
    tenant_id: str,
    key: PLATFORM_KEY_OPTION = None,
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = Path(".crm"),
) -> None:
    """Show one tenant."""
    from crm.v1 import tenant_pb2, tenant_pb2_grpc

    request = tenant_pb2.GetTenantRequest(id=tenant_id)
    print_message(
        call(
            gateway_address(home, gateway),
            platform_key(home, key),
            tenant_pb2_grpc.TenantServiceStub,
            "GetTenant",
            request,
        )
    )
