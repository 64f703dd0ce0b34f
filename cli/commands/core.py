"""`crm account|contact|lead|deal|pipeline|activity ...`, `crm lead convert`, `crm deal move`,
`crm import <type> file.csv` and `crm export <type>`: your tenant's core records through the
gateway.

Fields are given as `--set name=value` (repeatable); nested parts with dots
(`--set billing_address.city=Oslo`), custom fields as `--set custom_fields.budget=1200.50`.
"""

from __future__ import annotations

import csv
import json
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.client import (
    API_KEY_OPTION,
    GATEWAY_OPTION,
    HOME_OPTION,
    call,
    err_console,
    gateway_address,
    print_message,
)

SET_OPTION = Annotated[
    list[str] | None,
    typer.Option("--set", help="field=value; repeat for more fields (dots for nested parts)."),
]
ENTITY_TYPES = {"account": 1, "contact": 2, "lead": 3, "deal": 4, "activity": 5}


@dataclass(frozen=True)
class ResourceCli:
    name: str  # account
    title: str  # Account
    plural: str  # accounts (response field)
    list_method: str  # ListAccounts
    service: str  # AccountService


RESOURCES = (
    ResourceCli("account", "Account", "accounts", "ListAccounts", "AccountService"),
    ResourceCli("contact", "Contact", "contacts", "ListContacts", "ContactService"),
    ResourceCli("lead", "Lead", "leads", "ListLeads", "LeadService"),
    ResourceCli("deal", "Deal", "deals", "ListDeals", "DealService"),
    ResourceCli("pipeline", "Pipeline", "pipelines", "ListPipelines", "PipelineService"),
    ResourceCli("activity", "Activity", "activities", "ListActivities", "ActivityService"),
)


def _pb() -> Any:
    from crm.v1 import core_entity_pb2

    return core_entity_pb2


def _stub(service: str) -> Any:
    from crm.v1 import core_entity_pb2_grpc

    return getattr(core_entity_pb2_grpc, f"{service}Stub")


def _coerce(field: Any, text: str) -> Any:
    """A command-line value as the JSON value the field's type wants."""
    from google.protobuf.descriptor import FieldDescriptor

    if field is None:
        return text
    if field.type == FieldDescriptor.TYPE_BOOL:
        return text.lower() in ("true", "1", "yes", "y")
    if field.type in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64):
        return int(text)
    if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.full_name == "google.type.Date":
        year, month, day = (int(part) for part in text.split("-"))
        return {"year": year, "month": month, "day": day}
    if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.full_name.startswith(
        "crm.v1.PostalAddress"
    ):
        return json.loads(text)
    return text


def _custom_value(text: str) -> dict[str, Any]:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return {"boolValue": lowered == "true"}
    try:
        return {"intValue": str(int(text))}
    except ValueError:
        pass
    try:
        float(text)
        return {"decimalValue": text}
    except ValueError:
        return {"stringValue": text}


def build(message_type: Any, assignments: list[str] | None) -> tuple[Any, list[str]]:
    """The message for `--set` assignments, and the top-level field paths they name."""
    from google.protobuf import json_format

    data: dict[str, Any] = {}
    paths: list[str] = []
    fields = message_type.DESCRIPTOR.fields_by_name
    for assignment in assignments or []:
        name, sep, value = assignment.partition("=")
        if not sep:
            raise typer.BadParameter(f"{assignment!r} is not field=value")
        head, _, rest = name.partition(".")
        if head == "custom_fields" and rest:
            data.setdefault("custom_fields", {})[rest] = _custom_value(value)
            paths.append(name)
        elif rest:
            sub = fields[head].message_type.fields_by_name.get(rest) if head in fields else None
            data.setdefault(head, {})[rest] = _coerce(sub, value)
            paths.append(head)
        else:
            data[name] = _coerce(fields.get(name), value)
            paths.append(name)
    try:
        message = json_format.ParseDict(data, message_type(), ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        raise typer.BadParameter(str(exc)) from exc
    return message, sorted(set(paths))


def _resource_app(resource: ResourceCli) -> typer.Typer:
    app = typer.Typer(help=f"The {resource.plural} of your tenant.", no_args_is_help=True)

    def invoke(home: Path, gateway: str | None, key: str, method: str, request: Any) -> Any:
        return call(gateway_address(home, gateway), key, _stub(resource.service), method, request)

    @app.command("create")
    def create(
        key: API_KEY_OPTION,
        set_: SET_OPTION = None,
        gateway: GATEWAY_OPTION = None,
        home: HOME_OPTION = Path(".crm"),
    ) -> None:
        """Create a record from --set field=value pairs."""
        pb = _pb()
        message, _ = build(getattr(pb, resource.title), set_)
        request = getattr(pb, f"Create{resource.title}Request")(**{resource.name: message})
        print_message(invoke(home, gateway, key, f"Create{resource.title}", request))

    @app.command("get")
    def get(
        record_id: str, key: API_KEY_OPTION, gateway: GATEWAY_OPTION = None, home: HOME_OPTION = Path(".crm")
    ) -> None:
        """Show one record."""
        request = getattr(_pb(), f"Get{resource.title}Request")(id=record_id)
        print_message(invoke(home, gateway, key, f"Get{resource.title}", request))

    @app.command("list")
    def list_(
        key: API_KEY_OPTION,
        filter_: Annotated[str, typer.Option("--filter", help='AIP-160 filter, e.g. name = "Acme".')] = "",
        order_by: Annotated[str, typer.Option(help='e.g. "name desc, create_time".')] = "",
        page_size: Annotated[int, typer.Option()] = 50,
        page_token: Annotated[str, typer.Option()] = "",
        show_deleted: Annotated[bool, typer.Option("--show-deleted")] = False,
        gateway: GATEWAY_OPTION = None,
        home: HOME_OPTION = Path(".crm"),
    ) -> None:
        """List records (one page; pass --page-token for the next)."""
        request = getattr(_pb(), f"{resource.list_method}Request")(
            filter=filter_,
            order_by=order_by,
            page_size=page_size,
            page_token=page_token,
            show_deleted=show_deleted,
        )
        print_message(invoke(home, gateway, key, resource.list_method, request))

    @app.command("update")
    def update(
        record_id: str,
        key: API_KEY_OPTION,
        set_: SET_OPTION = None,
        etag: Annotated[str, typer.Option(help="The etag you read; the current one when empty.")] = "",
        gateway: GATEWAY_OPTION = None,
        home: HOME_OPTION = Path(".crm"),
    ) -> None:
        """Change the fields given with --set (only those)."""
        from google.protobuf import field_mask_pb2

        pb = _pb()
        message, paths = build(getattr(pb, resource.title), set_)
        if not paths:
            raise typer.BadParameter("give at least one --set field=value")
        message.id = record_id
        message.etag = etag
        request = getattr(pb, f"Update{resource.title}Request")(
            **{resource.name: message, "update_mask": field_mask_pb2.FieldMask(paths=paths)}
        )
        print_message(invoke(home, gateway, key, f"Update{resource.title}", request))

    @app.command("delete")
    def delete(
        record_id: str,
        key: API_KEY_OPTION,
        etag: Annotated[str, typer.Option()] = "",
        undelete: Annotated[bool, typer.Option("--undelete", help="Bring a deleted record back.")] = False,
        gateway: GATEWAY_OPTION = None,
        home: HOME_OPTION = Path(".crm"),
    ) -> None:
        """Soft-delete a record (or --undelete it)."""
        pb = _pb()
        if undelete:
            request = getattr(pb, f"Undelete{resource.title}Request")(id=record_id)
            print_message(invoke(home, gateway, key, f"Undelete{resource.title}", request))
            return
        request = getattr(pb, f"Delete{resource.title}Request")(id=record_id, etag=etag)
        print_message(invoke(home, gateway, key, f"Delete{resource.title}", request))

    return app


APPS = {resource.name: _resource_app(resource) for resource in RESOURCES}


@APPS["lead"].command("convert")
def lead_convert(
    lead_id: str,
    key: API_KEY_OPTION,
    account_id: Annotated[str, typer.Option(help="An existing account; a new one when empty.")] = "",
    create_deal: Annotated[bool, typer.Option("--create-deal", help="Also create a deal.")] = False,
    deal_name: Annotated[str, typer.Option()] = "",
    amount: Annotated[str, typer.Option(help="The deal's amount, e.g. 1200.50.")] = "",
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = Path(".crm"),
) -> None:
    """Convert a lead to a contact (and account, and optionally a deal)."""
    pb = _pb()
    request = pb.ConvertLeadRequest(
        id=lead_id,
        account_id=account_id,
        create_deal=create_deal,
        deal=pb.Deal(name=deal_name, amount=amount),
    )
    print_message(call(gateway_address(home, gateway), key, _stub("LeadService"), "ConvertLead", request))


@APPS["deal"].command("move")
def deal_move(
    deal_id: str,
    stage_id: str,
    key: API_KEY_OPTION,
    etag: Annotated[str, typer.Option()] = "",
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = Path(".crm"),
) -> None:
    """Move a deal to another stage of its pipeline."""
    request = _pb().MoveDealStageRequest(id=deal_id, stage_id=stage_id, etag=etag)
    print_message(call(gateway_address(home, gateway), key, _stub("DealService"), "MoveDealStage", request))


@APPS["pipeline"].command("add-stage")
def pipeline_add_stage(
    pipeline_id: str,
    key: API_KEY_OPTION,
    set_: SET_OPTION = None,
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = Path(".crm"),
) -> None:
    """Add a stage (--set name=... probability=... is_closed=... is_won=... stage_order=...)."""
    pb = _pb()
    stage, _ = build(pb.PipelineStage, set_)
    request = pb.CreatePipelineStageRequest(pipeline_id=pipeline_id, stage=stage)
    print_message(
        call(gateway_address(home, gateway), key, _stub("PipelineService"), "CreatePipelineStage", request)
    )


@APPS["pipeline"].command("reorder")
def pipeline_reorder(
    pipeline_id: str,
    stage_ids: Annotated[list[str], typer.Argument(help="Every stage id, in the new order.")],
    key: API_KEY_OPTION,
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = Path(".crm"),
) -> None:
    """Put a pipeline's stages in a new order."""
    request = _pb().ReorderPipelineStagesRequest(pipeline_id=pipeline_id, stage_ids=stage_ids)
    print_message(
        call(gateway_address(home, gateway), key, _stub("PipelineService"), "ReorderPipelineStages", request)
    )


def _entity_type(name: str) -> int:
    if name not in ENTITY_TYPES:
        raise typer.BadParameter(f"must be one of {', '.join(ENTITY_TYPES)}")
    return ENTITY_TYPES[name]


def import_records(
    entity: Annotated[str, typer.Argument(help="account, contact, lead, deal or activity")],
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="CSV with a header row.")],
    key: API_KEY_OPTION,
    import_id: Annotated[str, typer.Option(help="Reuse to retry an import without duplicates.")] = "",
    batch_size: Annotated[int, typer.Option()] = 500,
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = Path(".crm"),
) -> None:
    """Import a CSV file; prints the failed rows and their errors."""
    import grpc
    from rich.progress import Progress

    pb = _pb()
    kind = _entity_type(entity)
    chosen_id = import_id or str(uuid.uuid4())
    with file.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    with Progress() as progress:
        task = progress.add_task(f"importing {len(rows)} {entity} rows", total=len(rows))

        def messages() -> Iterator[Any]:
            for start in range(0, max(len(rows), 1), batch_size):
                batch = rows[start : start + batch_size]
                yield pb.ImportRecordsRequest(
                    import_id=chosen_id,
                    entity_type=kind,
                    rows=[pb.RecordRow(values={k: v or "" for k, v in row.items() if k}) for row in batch],
                )
                progress.advance(task, len(batch))

        with grpc.insecure_channel(gateway_address(home, gateway)) as channel:
            try:
                reply = _stub("ImportService")(channel).ImportRecords(
                    messages(), metadata=(("authorization", f"Bearer {key}"),), timeout=600
                )
            except grpc.RpcError as exc:
                err_console.print(f"[red]{exc.code().name}[/red]: {exc.details()}")
                raise typer.Exit(1) from exc
    print(f"import {chosen_id}: {reply.success_count} imported, {reply.error_count} failed")
    for error in reply.row_errors:
        details = "; ".join(f"{e.field}: {e.description}" for e in error.errors)
        print(f"  row {error.row_index + 2} (line): {details}")
    if reply.error_count:
        raise typer.Exit(2)


def export_records(
    entity: Annotated[str, typer.Argument(help="account, contact, lead, deal or activity")],
    key: API_KEY_OPTION,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="CSV file; stdout when absent.")
    ] = None,
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = Path(".crm"),
) -> None:
    """Export every record of one type as CSV."""
    import grpc
    from rich.progress import Progress

    pb = _pb()
    request = pb.ExportRecordsRequest(entity_type=_entity_type(entity))
    rows: list[dict[str, str]] = []
    with (
        grpc.insecure_channel(gateway_address(home, gateway)) as channel,
        Progress(console=err_console) as progress,
    ):
        task = progress.add_task(f"exporting {entity} records", total=None)
        try:
            for batch in _stub("ImportService")(channel).ExportRecords(
                request, metadata=(("authorization", f"Bearer {key}"),), timeout=600
            ):
                progress.update(task, total=batch.total_size)
                rows += [dict(row.values) for row in batch.rows]
                progress.advance(task, len(batch.rows))
        except grpc.RpcError as exc:
            err_console.print(f"[red]{exc.code().name}[/red]: {exc.details()}")
            raise typer.Exit(1) from exc
    columns = sorted({column for row in rows for column in row}, key=lambda c: (c != "id", c))
    handle = output.open("w", newline="", encoding="utf-8") if output else sys.stdout
    try:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    finally:
        if output:
            handle.close()


def register(app: typer.Typer) -> None:
    for name, sub in APPS.items():
        app.add_typer(sub, name=name)
    app.command("import")(import_records)
    app.command("export")(export_records)
