"""`crm use-key`, `crm login` and `crm status`: which credential the CLI sends, and the
gateway's view of the suite."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.client import (
    GATEWAY_OPTION,
    HOME_OPTION,
    PLATFORM_KEY_OPTION,
    call,
    console,
    err_console,
    gateway_address,
    platform_key,
    store_credential,
)


def register(app: typer.Typer) -> None:
    app.command("use-key")(use_key)
    app.command("login")(login)
    app.command("status")(status)


def use_key(key: Annotated[str, typer.Argument(help="A tenant API key (crm_...).")]) -> None:
    """Save an API key for later commands."""
    path = store_credential(key, "api_key")
    console.print(f"saved to {path}")


def login(
    subdomain: Annotated[str, typer.Option()],
    email: Annotated[str, typer.Option()],
    password: Annotated[str, typer.Option(prompt=True, hide_input=True)],
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = Path(".crm"),
) -> None:
    """Sign in with e-mail and password; saves the session token for later commands."""
    import grpc

    from crm.v1 import tenant_pb2, tenant_pb2_grpc

    with grpc.insecure_channel(gateway_address(home, gateway)) as channel:
        try:
            reply = tenant_pb2_grpc.TenantServiceStub(channel).Authenticate(
                tenant_pb2.AuthenticateRequest(subdomain=subdomain, email=email, password=password),
                timeout=30,
            )
        except grpc.RpcError as exc:
            err_console.print(f"[red]{exc.code().name}[/red]: {exc.details()}")
            raise typer.Exit(1) from exc
    path = store_credential(reply.session_token, "session")
    console.print(f"signed in; session saved to {path} (expires {reply.expire_time.ToJsonString()})")


def status(
    key: PLATFORM_KEY_OPTION = None,
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = Path(".crm"),
) -> None:
    """Show the gateway's backends, shards and their health."""
    from crm.v1 import gateway_pb2, gateway_pb2_grpc

    reply = call(
        gateway_address(home, gateway),
        platform_key(home, key),
        gateway_pb2_grpc.GatewayServiceStub,
        "GetGatewayStatus",
        gateway_pb2.GetGatewayStatusRequest(),
    )
    table = Table("kind", "shard", "address", "health")
    for backend in reply.backends:
        colour = "green" if backend.health == "SERVING" else "red"
        shard = backend.shard_name + ("" if backend.shard_active or not backend.shard_name else " (inactive)")
        table.add_row(backend.kind, shard, backend.address, f"[{colour}]{backend.health}[/{colour}]")
    console.print(table)
    console.print(f"api audit backlog: {reply.api_audit_backlog}, dropped: {reply.api_audit_dropped}")
