"""`crm object|field|record|relationship ...`, `crm link|unlink`: custom objects, their fields,
relationships and records, with a tenant API key (`--key` or CRM_API_KEY).

Values are given as JSON objects (`--values '{"budget": "1500.50", "start_date": "2026-01-05"}'`):
strings, integers, booleans and lists map to the matching FieldValue kinds and numbers with a
fraction travel as decimal strings, so nothing is rounded on the way; the service converts
strings to dates, decimals and references by the field's type.
"""

from __future__ import annotations

import decimal
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.client import API_KEY_OPTION, GATEWAY_OPTION, HOME_OPTION, call, gateway_address, print_message

object_app = typer.Typer(help="Custom objects (tenant-defined entities).", no_args_is_help=True)
field_app = typer.Typer(help="Custom fields on core entity types or custom objects.", no_args_is_help=True)
record_app = typer.Typer(help="Records of custom objects.", no_args_is_help=True)
relationship_app = typer.Typer(help="Relationships between object types.", no_args_is_help=True)

HOME = Path(".crm")


def register(app: typer.Typer) -> None:
    app.add_typer(object_app, name="object")
    app.add_typer(field_app, name="field")
    app.add_typer(record_app, name="record")
    app.add_typer(relationship_app, name="relationship")
    app.command("link")(link)
    app.command("unlink")(unlink)


def _call(key: str, gateway: str | None, home: Path, method: str, request: Any) -> Any:
    from crm.v1 import custom_object_pb2_grpc

    return call(
        gateway_address(home, gateway), key, custom_object_pb2_grpc.CustomObjectServiceStub, method, request
    )


def _json_object(text: str, option: str) -> dict[str, Any]:
    try:
        value = json.loads(text, parse_float=decimal.Decimal)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"{option} is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise typer.BadParameter(f"{option} must be a JSON object")
    return value


def field_values(values: dict[str, Any]) -> dict[str, Any]:
    """JSON values as FieldValue messages (null means "no value")."""
    from crm.v1 import common_pb2

    out: dict[str, Any] = {}
    for name, value in values.items():
        message = common_pb2.FieldValue()
        if isinstance(value, bool):
            message.bool_value = value
        elif isinstance(value, int):
            message.int_value = value
        elif isinstance(value, decimal.Decimal):
            message.decimal_value = format(value, "f")
        elif isinstance(value, list):
            message.string_list_value.values.extend(str(v) for v in value)
        elif isinstance(value, str):
            message.string_value = value
        elif value is not None:
            raise typer.BadParameter(f"{name}: nested objects are not field values")
        out[name] = message
    return out


# --- objects ---------------------------------------------------------------------------------


@object_app.command("create")
def object_create(
    api_name: Annotated[str, typer.Argument(help="e.g. project__c")],
    label: Annotated[str, typer.Option()],
    plural_label: Annotated[str, typer.Option()],
    name: Annotated[str | None, typer.Option(help="Defaults to the api name.")] = None,
    description: Annotated[str, typer.Option()] = "",
    record_name_field: Annotated[str, typer.Option()] = "",
    icon: Annotated[str, typer.Option()] = "",
    color: Annotated[str, typer.Option(help="#RRGGBB")] = "",
    reports: Annotated[bool, typer.Option("--reports/--no-reports")] = True,
    activities: Annotated[bool, typer.Option("--activities/--no-activities")] = True,
    key: API_KEY_OPTION = "",
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = HOME,
) -> None:
    """Create a custom object."""
    from crm.v1 import custom_object_pb2 as pb

    request = pb.CreateCustomObjectRequest(
        custom_object=pb.CustomObject(
            api_name=api_name, name=name or api_name, label=label, plural_label=plural_label,
            description=description, record_name_field=record_name_field, icon=icon, color=color,
            allow_reports=reports, allow_activities=activities,
        )
    )  # fmt: skip
    print_message(_call(key, gateway, home, "CreateCustomObject", request))


@object_app.command("list")
def object_list(
    show_inactive: Annotated[bool, typer.Option()] = False,
    key: API_KEY_OPTION = "",
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = HOME,
) -> None:
    """List the tenant's custom objects."""
    from crm.v1 import custom_object_pb2 as pb

    request = pb.ListCustomObjectsRequest(page_size=1000, show_inactive=show_inactive)
    print_message(_call(key, gateway, home, "ListCustomObjects", request))


@object_app.command("get")
def object_get(
    object_id: Annotated[str, typer.Argument(help="id or api name")],
    key: API_KEY_OPTION = "",
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = HOME,
) -> None:
    """Show one custom object."""
    from crm.v1 import custom_object_pb2 as pb

    print_message(_call(key, gateway, home, "GetCustomObject", pb.GetCustomObjectRequest(id=object_id)))


@object_app.command("delete")
def object_delete(
    object_id: Annotated[str, typer.Argument(help="id or api name")],
    force: Annotated[bool, typer.Option(help="Delete its records too.")] = False,
    key: API_KEY_OPTION = "",
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = HOME,
) -> None:
    """Delete a custom object with its fields and relationships."""
    from crm.v1 import custom_object_pb2 as pb

    request = pb.DeleteCustomObjectRequest(id=object_id, force=force)
    print_message(_call(key, gateway, home, "DeleteCustomObject", request))


# --- fields ----------------------------------------------------------------------------------


def _options(options: list[str], default_option: str | None) -> list[Any]:
    from crm.v1 import custom_object_pb2 as pb

    parsed = []
    for order, spec in enumerate(options, start=1):
        value, _, label = spec.partition(":")
        parsed.append(
            pb.PicklistOption(
                value=value, label=label or value, order=order, is_default=value == default_option
            )
        )
    return parsed


def _rules(text: str | None) -> Any:
    from google.protobuf import json_format

    from crm.v1 import custom_object_pb2 as pb

    rules = pb.ValidationRules()
    if text:
        try:
            json_format.ParseDict(_json_object(text, "--rules"), rules)
        except json_format.ParseError as exc:
            raise typer.BadParameter(f"--rules: {exc}") from exc
    return rules


@field_app.command("add")
def field_add(
    object_type: Annotated[
        str, typer.Argument(help="account, contact, lead, deal, activity or a custom api name")
    ],
    field_name: Annotated[str, typer.Argument()],
    field_type: Annotated[str, typer.Argument(help="text, number, currency, date, picklist, ...")],
    label: Annotated[str | None, typer.Option()] = None,
    required: Annotated[bool, typer.Option()] = False,
    unique: Annotated[bool, typer.Option()] = False,
    indexed: Annotated[bool, typer.Option()] = False,
    default: Annotated[
        str | None, typer.Option(help="Default value as JSON, e.g. 5 or '\"planning\"'.")
    ] = None,
    help_text: Annotated[str, typer.Option()] = "",
    order: Annotated[int, typer.Option()] = 0,
    rules: Annotated[
        str | None, typer.Option(help='JSON, e.g. \'{"max_length": 50, "pattern": "^[A-Z]+$"}\'')
    ] = None,
    option: Annotated[list[str] | None, typer.Option(help="Picklist option value[:label]; repeat.")] = None,
    default_option: Annotated[str | None, typer.Option()] = None,
    tag: Annotated[list[str] | None, typer.Option(help="Compliance tag; repeat.")] = None,
    key: API_KEY_OPTION = "",
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = HOME,
) -> None:
    """Add a custom field."""
    from crm.v1 import custom_object_pb2 as pb

    field = pb.CustomField(
        object_type=object_type,
        field_name=field_name,
        field_label=label or field_name.replace("_", " ").title(),
        field_type=field_type,
        is_required=required,
        is_unique=unique,
        is_indexed=indexed,
        help_text=help_text,
        field_order=order,
        validation_rules=_rules(rules),
        options=_options(option or [], default_option),
        metadata=pb.FieldMetadata(compliance_tags=tag or []),
    )
    if default is not None:
        field.default_value.CopyFrom(field_values(_json_object(f'{{"v": {default}}}', "--default"))["v"])
    print_message(_call(key, gateway, home, "CreateCustomField", pb.CreateCustomFieldRequest(field=field)))


@field_app.command("list")
def field_list(
    object_type: Annotated[str, typer.Argument()] = "",
    show_inactive: Annotated[bool, typer.Option()] = False,
    key: API_KEY_OPTION = "",
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = HOME,
) -> None:
    """List fields (of one object type) with options and usage metadata."""
    from crm.v1 import custom_object_pb2 as pb

    request = pb.ListCustomFieldsRequest(object_type=object_type, page_size=1000, show_inactive=show_inactive)
    print_message(_call(key, gateway, home, "ListCustomFields", request))


@field_app.command("update")
def field_update(
    field_id: Annotated[str, typer.Argument()],
    label: Annotated[str | None, typer.Option()] = None,
    field_type: Annotated[str | None, typer.Option("--type")] = None,
    required: Annotated[bool | None, typer.Option("--required/--optional")] = None,
    unique: Annotated[bool | None, typer.Option("--unique/--not-unique")] = None,
    indexed: Annotated[bool | None, typer.Option("--indexed/--not-indexed")] = None,
    active: Annotated[bool | None, typer.Option("--active/--inactive")] = None,
    help_text: Annotated[str | None, typer.Option()] = None,
    rules: Annotated[str | None, typer.Option(help="Replaces all rules; JSON.")] = None,
    option: Annotated[
        list[str] | None, typer.Option(help="Replaces all options; value[:label], repeat.")
    ] = None,
    default_option: Annotated[str | None, typer.Option()] = None,
    etag: Annotated[str, typer.Option()] = "",
    key: API_KEY_OPTION = "",
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = HOME,
) -> None:
    """Change a field; only the options given are changed."""
    from google.protobuf import field_mask_pb2

    from crm.v1 import custom_object_pb2 as pb

    field = pb.CustomField(id=field_id, etag=etag)
    paths: list[str] = []
    scalar = {
        "field_label": label, "field_type": field_type, "is_required": required, "is_unique": unique,
        "is_indexed": indexed, "is_active": active, "help_text": help_text,
    }  # fmt: skip
    for path, value in scalar.items():
        if value is not None:
            setattr(field, path, value)
            paths.append(path)
    if rules is not None:
        field.validation_rules.CopyFrom(_rules(rules))
        paths.append("validation_rules")
    if option:
        field.options.extend(_options(option, default_option))
        paths.append("options")
    if not paths:
        raise typer.BadParameter("nothing to change")
    request = pb.UpdateCustomFieldRequest(field=field, update_mask=field_mask_pb2.FieldMask(paths=paths))
    print_message(_call(key, gateway, home, "UpdateCustomField", request))


@field_app.command("delete")
def field_delete(
    field_id: Annotated[str, typer.Argument()],
    key: API_KEY_OPTION = "",
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = HOME,
) -> None:
    """Delete a field and its values."""
    from crm.v1 import custom_object_pb2 as pb

    print_message(_call(key, gateway, home, "DeleteCustomField", pb.DeleteCustomFieldRequest(id=field_id)))


# --- records ---------------------------------------------------------------------------------


@record_app.command("create")
def record_create(
    object_type: Annotated[str, typer.Argument()],
    values: Annotated[str, typer.Option(help="Field values as a JSON object.")] = "{}",
    key: API_KEY_OPTION = "",
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = HOME,
) -> None:
    """Create a record."""
    from crm.v1 import custom_object_pb2 as pb

    record = pb.Record(object_type=object_type, fields=field_values(_json_object(values, "--values")))
    print_message(_call(key, gateway, home, "CreateRecord", pb.CreateRecordRequest(record=record)))


@record_app.command("get")
def record_get(
    record_id: Annotated[str, typer.Argument()],
    key: API_KEY_OPTION = "",
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = HOME,
) -> None:
    """Show one record."""
    from crm.v1 import custom_object_pb2 as pb

    print_message(_call(key, gateway, home, "GetRecord", pb.GetRecordRequest(id=record_id)))


@record_app.command("list")
def record_list(
    object_type: Annotated[str, typer.Argument()],
    filter_text: Annotated[
        str, typer.Option("--filter", help='e.g. "budget > 1000 AND status = planning"')
    ] = "",
    order_by: Annotated[str, typer.Option(help='e.g. "budget desc, start_date"')] = "",
    page_size: Annotated[int, typer.Option()] = 50,
    page_token: Annotated[str, typer.Option()] = "",
    key: API_KEY_OPTION = "",
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = HOME,
) -> None:
    """List records with a filter and order."""
    from crm.v1 import custom_object_pb2 as pb

    request = pb.ListRecordsRequest(
        object_type=object_type,
        filter=filter_text,
        order_by=order_by,
        page_size=page_size,
        page_token=page_token,
    )
    print_message(_call(key, gateway, home, "ListRecords", request))


@record_app.command("update")
def record_update(
    record_id: Annotated[str, typer.Argument()],
    values: Annotated[str, typer.Option(help="Values to change as a JSON object; null clears one.")],
    etag: Annotated[str, typer.Option()] = "",
    key: API_KEY_OPTION = "",
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = HOME,
) -> None:
    """Change some values of a record."""
    from google.protobuf import field_mask_pb2

    from crm.v1 import custom_object_pb2 as pb

    given = _json_object(values, "--values")
    request = pb.UpdateRecordRequest(
        record=pb.Record(id=record_id, etag=etag, fields=field_values(given)),
        update_mask=field_mask_pb2.FieldMask(paths=[f"fields.{name}" for name in given]),
    )
    print_message(_call(key, gateway, home, "UpdateRecord", request))


@record_app.command("delete")
def record_delete(
    record_id: Annotated[str, typer.Argument()],
    etag: Annotated[str, typer.Option()] = "",
    key: API_KEY_OPTION = "",
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = HOME,
) -> None:
    """Delete a record (master-detail children go with it)."""
    from crm.v1 import custom_object_pb2 as pb

    print_message(_call(key, gateway, home, "DeleteRecord", pb.DeleteRecordRequest(id=record_id, etag=etag)))


# --- relationships and links -----------------------------------------------------------------


@relationship_app.command("add")
def relationship_add(
    name: Annotated[str, typer.Argument()],
    from_object_type: Annotated[str, typer.Argument()],
    to_object_type: Annotated[str, typer.Argument()],
    relationship_type: Annotated[
        str, typer.Option("--type", help="lookup, master_detail or many_to_many")
    ] = "lookup",
    cardinality: Annotated[
        str, typer.Option(help="many_to_one, one_to_many, one_to_one, many_to_many")
    ] = "many_to_one",
    required: Annotated[bool, typer.Option()] = False,
    cascade_delete: Annotated[bool, typer.Option()] = False,
    field_name: Annotated[str, typer.Option()] = "",
    description: Annotated[str, typer.Option()] = "",
    key: API_KEY_OPTION = "",
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = HOME,
) -> None:
    """Create a relationship (lookups also create their reference field)."""
    from crm.v1 import custom_object_pb2 as pb

    if relationship_type == "many_to_many":
        cardinality = "many_to_many"
    request = pb.CreateCustomRelationshipRequest(
        relationship=pb.CustomRelationship(
            relationship_name=name, from_object_type=from_object_type, to_object_type=to_object_type,
            relationship_type=relationship_type, cardinality=cardinality, is_required=required,
            cascade_delete=cascade_delete, field_name=field_name, description=description,
        )
    )  # fmt: skip
    print_message(_call(key, gateway, home, "CreateCustomRelationship", request))


@relationship_app.command("list")
def relationship_list(
    object_type: Annotated[str, typer.Option()] = "",
    key: API_KEY_OPTION = "",
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = HOME,
) -> None:
    """List relationships (touching one object type)."""
    from crm.v1 import custom_object_pb2 as pb

    request = pb.ListCustomRelationshipsRequest(object_type=object_type, page_size=1000)
    print_message(_call(key, gateway, home, "ListCustomRelationships", request))


def link(
    relationship: Annotated[str, typer.Argument(help="id or name of a many_to_many relationship")],
    from_record_id: Annotated[str, typer.Argument()],
    to_record_id: Annotated[str, typer.Argument()],
    data: Annotated[str, typer.Option(help="The link's own data as a JSON object.")] = "{}",
    key: API_KEY_OPTION = "",
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = HOME,
) -> None:
    """Link two records through a many-to-many relationship."""
    from crm.v1 import custom_object_pb2 as pb

    request = pb.LinkRecordsRequest(
        relationship=relationship, from_record_id=from_record_id, to_record_id=to_record_id,
        data=field_values(_json_object(data, "--data")),
    )  # fmt: skip
    print_message(_call(key, gateway, home, "LinkRecords", request))


def unlink(
    relationship: Annotated[str, typer.Argument()],
    from_record_id: Annotated[str, typer.Argument()],
    to_record_id: Annotated[str, typer.Argument()],
    key: API_KEY_OPTION = "",
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = HOME,
) -> None:
    """Remove the link between two records."""
    from crm.v1 import custom_object_pb2 as pb

    request = pb.UnlinkRecordsRequest(
        relationship=relationship, from_record_id=from_record_id, to_record_id=to_record_id
    )
    print_message(_call(key, gateway, home, "UnlinkRecords", request))
