"""`crm audit ...`: your tenant's audit log."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.client import API_KEY_OPTION, GATEWAY_OPTION, HOME_OPTION, call, gateway_address, print_message

audit_app = typer.Typer(help="The audit log of your tenant.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(audit_app, name="audit")


@audit_app.command("log")
def audit_log(
    key: API_KEY_OPTION,
    table: Annotated[str, typer.Option()] = "",
    record: Annotated[str, typer.Option()] = "",
    limit: Annotated[int, typer.Option()] = 50,
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = Path(".crm"),
) -> None:
    """List your tenant's audit entries, newest first."""
    from crm.v1 import audit_pb2, audit_pb2_grpc

    request = audit_pb2.ListAuditLogsRequest(page_size=limit, table_name=table, record_id=record)
    print_message(
        call(gateway_address(home, gateway), key, audit_pb2_grpc.AuditServiceStub, "ListAuditLogs", request)
    )
