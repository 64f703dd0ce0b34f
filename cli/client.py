"""What every client command shares: where the gateway is, which credential to send, how to
call and print."""

from __future__ import annotations

import json
import os
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


def credentials_file() -> Path:
    return Path(os.environ.get("CRM_CONFIG_DIR", "~/.config/crm")).expanduser() / "credentials.json"


def stored_credential() -> str:
    """The credential saved by `crm use-key` or `crm login`, or ''."""
    path = credentials_file()
    if not path.exists():
        return ""
    return str(json.loads(path.read_text()).get("credential", ""))


def store_credential(credential: str, kind: str) -> Path:
    path = credentials_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"credential": credential, "kind": kind}))
    path.chmod(0o600)  # a bearer credential: readable by its owner only
    return path


API_KEY_OPTION = Annotated[
    str,
    typer.Option(
        "--key",
        envvar="CRM_API_KEY",
        show_default=False,
        help="Your tenant's API key or session token (default: saved by `crm use-key` / `crm login`).",
    ),
]


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

    key = key or stored_credential()
    if not key:
        err_console.print(
            "[red]no credential[/red]: pass --key, set CRM_API_KEY, or run `crm use-key` / `crm login`"
        )
        raise typer.Exit(2)

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
