"""`crm`: run the suite locally, run one service, migrate, and call the gateway."""

from __future__ import annotations

import asyncio
import importlib
import os
import pkgutil
import signal
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

app = typer.Typer(help="Multi-tenant CRM data platform.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)

from cli.client import HOME_OPTION  # noqa: E402


class ServiceName(StrEnum):
    tenant = "tenant"
    audit = "audit"
    core_entity = "core-entity"
    custom_object = "custom-object"
    gateway = "gateway"


def _build(service: ServiceName) -> Any:
    """Imports only the chosen service, reads its settings and returns its app."""
    from shared import config

    if service is ServiceName.tenant:
        from services.tenant.bootstrap import build_app as build_tenant

        return build_tenant(config.TenantSettings())
    if service is ServiceName.audit:
        from services.audit.bootstrap import build_app as build_audit

        return build_audit(config.AuditSettings())
    if service is ServiceName.core_entity:
        from services.core_entity.bootstrap import build_app as build_core

        return build_core(config.ShardServiceSettings())
    if service is ServiceName.custom_object:
        from services.custom_object.bootstrap import build_app as build_custom

        return build_custom(config.ShardServiceSettings())
    from gateway.bootstrap import build_app as build_gateway

    return build_gateway(config.GatewaySettings())


@app.command()
def serve(service: ServiceName) -> None:
    """Run one service (the container images' entry point)."""
    import uvloop
    from pydantic import ValidationError

    from shared.logging import configure_logging

    try:
        service_app = _build(service)
    except ValidationError as exc:
        missing = ", ".join("CRM_" + str(e["loc"][0]).upper() for e in exc.errors())
        err_console.print(f"[red]configuration error:[/red] set {missing}")
        raise typer.Exit(2) from exc
    settings = service_app.settings
    configure_logging(service_app.name, settings.log_level, settings.log_json)
    uvloop.run(service_app.run_until_signal())


@app.command()
def migrate(service: ServiceName) -> None:
    """Apply a service's migrations as the owner (CRM_DB_OWNER_URL; CRM_DB_URL names the app role)."""
    from shared.db import role_of
    from shared.migrations import upgrade

    if service is ServiceName.gateway:
        raise typer.BadParameter("the gateway has no database")
    owner = os.environ.get("CRM_DB_OWNER_URL")
    app_url = os.environ.get("CRM_DB_URL")
    if not owner or not app_url:
        raise typer.BadParameter("set CRM_DB_OWNER_URL and CRM_DB_URL")
    package = service.value.replace("-", "_")
    schema = {"tenant": "tenant", "audit": "audit", "core_entity": "core", "custom_object": "custom"}[package]
    location = Path(__file__).resolve().parent.parent / "services" / package / "migrations"
    asyncio.run(upgrade(location, owner, schema, role_of(app_url)))
    console.print(f"{service.value}: migrated to head")


@app.command("trust-readers")
def trust_readers(
    admin_url: Annotated[str, typer.Option(envvar="CRM_ADMIN_DATABASE_URL", help="a superuser's URL")],
    database: Annotated[str, typer.Option(help="the shard database")],
) -> None:
    """Mark the custom-field readers LEAKPROOF in a shard database (a superuser's step, after
    `crm migrate` of core-entity and custom-object), so filters on custom fields use their
    indexes under row-level security."""
    from cli.stack import field_reader_functions
    from shared.provisioning import trust_field_readers

    marked = asyncio.run(trust_field_readers(admin_url, database, field_reader_functions()))
    console.print(f"{database}: {len(marked)} readers marked LEAKPROOF")


@app.command()
def up(
    home: HOME_OPTION = Path(".crm"),
    shards: Annotated[int, typer.Option(min=1, max=16)] = 2,
    gateway_port: Annotated[int, typer.Option(envvar="CRM_GATEWAY_PORT")] = 50051,
    detach: Annotated[bool, typer.Option(help="Return once healthy; stop later with `crm down`.")] = False,
) -> None:
    """Start the whole suite: embedded PostgreSQL and NATS (or CRM_DATABASE_URL / CRM_NATS_URL),
    every service and the gateway."""
    from cli.stack import Stack

    started = time.monotonic()
    stack = Stack(
        home=home.resolve(),
        database_url=os.environ.get("CRM_DATABASE_URL") or None,
        nats_url=os.environ.get("CRM_NATS_URL") or None,
        shards=shards,
        gateway_port=gateway_port,
    )
    with console.status("starting the suite..."):
        stack.start()
    console.print(f"[green]suite up[/green] in {time.monotonic() - started:.1f}s")
    console.print(f"gateway:            {stack.gateway_address}")
    console.print(f"platform admin key: {stack.platform_admin_key}  (also in {stack.state_file})")
    console.print(f"logs:               {home / 'logs'}")
    if detach:
        return
    stack.state["up_pid"] = os.getpid()
    stack._save_state()
    stopping = False

    def request_stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    console.print("press Ctrl-C (or run `crm down`) to stop")
    while not stopping:
        time.sleep(0.2)
    with console.status("stopping..."):
        stack.stop()
    console.print("stopped")


@app.command()
def down(home: HOME_OPTION = Path(".crm")) -> None:
    """Stop a suite started by `crm up`."""
    from cli.stack import stop_recorded

    stopped = stop_recorded(home.resolve())
    console.print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


def _register_client_commands() -> None:
    """Each module in cli/commands adds its own command groups with `register(app)`."""
    import cli.commands

    for module_info in sorted(pkgutil.iter_modules(cli.commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"cli.commands.{module_info.name}").register(app)


_register_client_commands()

if __name__ == "__main__":
    app()
