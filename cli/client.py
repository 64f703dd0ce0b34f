"""What every client command shares: where the gateway is, which credential to send, how to
call and print."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)

HOME_OPTION = Annotated[Path, typer.Option(envvar="CRM_HOME", help="Data folder of the local stack.")]
GATEWAY_OPTION = Annotated[str | None, typer.Option(envvar="CRM_GATEWAY", help="host:port of the gateway.")]
PLATFORM_KEY_OPTION = Annotated[
    str | None, typer.Option("--key", envvar="CRM_PLATFORM_ADMIN_KEY", help="Platform admin key.")
]
API_KEY_OPTION = Annotated[str, typer.Option("--key", envvar="CRM_API_KEY", help="Your tenant's API key.")]


def gateway_address(home: Path, gateway: str | None) -> str:
    if gateway:
        return gateway
    state = home / "stack.json"
    if state.exists():
        port = json.loads(state.read_text()).get("port:gateway")
        if port:
            return f"127.0.0.1:{port}"
    return "127.0.0.1:50051"


def platform_key(home: Path, key: str | None) -> str:
    if key:
        return key
    state = home / "stack.json"
    if state.exists():
        return str(json.loads(state.read_text())["platform_admin_key"])
    raise typer.BadParameter("pass --key or set CRM_PLATFORM_ADMIN_KEY")


def call(gateway: str, key: str, stub_factory: Any, method: str, request: Any) -> Any:
    import grpc

    with grpc.insecure_channel(gateway) as channel:
        try:
            return getattr(stub_factory(channel), method)(
                request, metadata=(("authorization", f"Bearer {key}"),), timeout=30
            )
        except grpc.RpcError as exc:
            err_console.print(f"[red]{exc.code().name}[/red]: {exc.details()}")
            raise typer.Exit(1) from exc


def print_message(message: Any) -> None:
    from google.protobuf import json_format

    console.print_json(json_format.MessageToJson(message, preserving_proto_field_name=True))
