"""The CustomObjectService servicer: translates messages to use-case calls and back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc

from crm.v1 import custom_object_pb2 as pb
from crm.v1 import custom_object_pb2_grpc
from services.custom_object.service_layer.common import to_definition
from services.custom_object.service_layer.definitions import DefinitionUseCases, FieldView
from services.custom_object.service_layer.records import RecordUseCases, RecordView
from shared import protoconv
from shared.fieldtypes import (
    FieldDefinition,
    from_field_value,
    to_field_value,
    values_from_proto,
    values_to_proto,
)

_RULE_KEYS = (
    "min_length", "max_length", "pattern", "min_value", "max_value", "min_date", "max_date", "max_selections",
)  # fmt: skip


def _str(value: Any) -> str:
    return "" if value is None else str(value)


def object_message(row: Mapping[str, Any]) -> pb.CustomObject:
    return pb.CustomObject(
        id=str(row["id"]),
        name=row["name"],
        label=row["label"],
        plural_label=row["plural_label"],
        description=row["description"] or "",
        api_name=row["api_name"],
        is_active=row["is_active"],
        allow_reports=row["allow_reports"],
        allow_activities=row["allow_activities"],
        record_name_field=row["record_name_field"] or "",
        icon=row["icon"] or "",
        color=row["color"] or "",
        create_time=protoconv.timestamp(row["created_at"]),
        update_time=protoconv.timestamp(row["updated_at"]),
        created_by=_str(row["created_by"]),
        updated_by=_str(row["updated_by"]),
        etag=protoconv.etag(row["version"]),
    )


def object_values(message: pb.CustomObject) -> dict[str, Any]:
    values: dict[str, Any] = {
        "name": message.name,
        "label": message.label,
        "plural_label": message.plural_label,
        "description": message.description,
        "api_name": message.api_name,
        "record_name_field": message.record_name_field,
        "icon": message.icon,
        "color": message.color,
    }
    for flag in ("is_active", "allow_reports", "allow_activities"):
        values[flag] = getattr(message, flag) if message.HasField(flag) else True
    return values


def rules_message(rules: Mapping[str, Any]) -> pb.ValidationRules:
    message = pb.ValidationRules()
    for key in _RULE_KEYS:
        if rules.get(key) is None:
            continue
        if key in ("min_length", "max_length", "max_selections"):
            setattr(message, key, int(rules[key]))
        else:
            setattr(message, key, str(rules[key]))
    return message


def rules_values(message: pb.ValidationRules) -> dict[str, Any]:
    return {key: getattr(message, key) for key in _RULE_KEYS if message.HasField(key)}  # type: ignore[arg-type]


def field_message(view: FieldView) -> pb.CustomField:
    row = view.row
    definition = to_definition(row, view.options)
    metadata = row["metadata"] or {}
    message = pb.CustomField(
        id=str(row["id"]),
        object_type=row["object_type"],
        custom_object_id=_str(row["custom_object_id"]),
        field_name=row["field_name"],
        field_label=row["field_label"],
        field_type=row["field_type"],
        data_type=row["data_type"],
        is_required=row["is_required"],
        is_unique=row["is_unique"],
        is_indexed=row["is_indexed"],
        help_text=row["help_text"] or "",
        field_order=row["field_order"],
        validation_rules=rules_message(row["validation_rules"] or {}),
        display_options=protoconv.struct(row["display_options"] or {}),
        is_active=row["is_active"],
        options=[
            pb.PicklistOption(
                value=o["option_value"],
                label=o["option_label"],
                order=o["option_order"],
                is_default=o["is_default"],
                is_active=o["is_active"],
            )
            for o in view.options
        ],
        reference_object_type=row["reference_object_type"] or "",
        relationship_id=_str(row["relationship_id"]),
        metadata=pb.FieldMetadata(
            created_version=metadata.get("created_version", ""),
            last_modified_version=metadata.get("last_modified_version", ""),
            usage_count=row["usage_count"],
            last_used_time=protoconv.timestamp(row["last_used_at"]),
            performance_impact=metadata.get("performance_impact", ""),
            compliance_tags=metadata.get("compliance_tags", []),
        ),
        create_time=protoconv.timestamp(row["created_at"]),
        update_time=protoconv.timestamp(row["updated_at"]),
        etag=protoconv.etag(row["version"]),
    )
    if row["default_value"] is not None:
        message.default_value.CopyFrom(to_field_value(row["default_value"], definition.field_type))
    return message


def field_values(message: pb.CustomField) -> dict[str, Any]:
    return {
        "object_type": message.object_type,
        "field_name": message.field_name,
        "field_label": message.field_label,
        "field_type": message.field_type,
        "data_type": message.data_type,
        "is_required": message.is_required,
        "is_unique": message.is_unique,
        "is_indexed": message.is_indexed,
        "default_value": from_field_value(message.default_value)
        if message.HasField("default_value")
        else None,
        "help_text": message.help_text,
        "field_order": message.field_order,
        "validation_rules": rules_values(message.validation_rules),
        "display_options": protoconv.from_struct(message.display_options),
        "is_active": message.is_active if message.HasField("is_active") else True,
        "options": [
            {
                "value": o.value,
                "label": o.label,
                "order": o.order,
                "is_default": o.is_default,
                "is_active": o.is_active if o.HasField("is_active") else True,
            }
            for o in message.options
        ],
        "compliance_tags": list(message.metadata.compliance_tags),
    }


def relationship_message(row: Mapping[str, Any]) -> pb.CustomRelationship:
    return pb.CustomRelationship(
        id=str(row["id"]),
        relationship_name=row["relationship_name"],
        from_object_type=row["from_object_type"],
        to_object_type=row["to_object_type"],
        relationship_type=row["relationship_type"],
        cardinality=row["cardinality"],
        cascade_delete=row["cascade_delete"],
        is_required=row["is_required"],
        description=row["description"] or "",
        field_name=row.get("field_name") or "",
        holder_object_type=row["holder_object_type"] or "",
        create_time=protoconv.timestamp(row["created_at"]),
        etag=protoconv.etag(row["version"]),
    )


def record_message(view: RecordView, definitions: list[FieldDefinition] | None = None) -> pb.Record:
    """`definitions`, the view's fields as definitions, once for a whole page of records."""
    row = view.row
    if definitions is None:
        definitions = [to_definition(f.row, f.options) for f in view.fields]
    name_field = view.custom_object.get("record_name_field")
    display = row["record_data"].get(name_field) if name_field else None
    return pb.Record(
        id=str(row["id"]),
        object_type=view.custom_object["api_name"],
        custom_object_id=str(row["custom_object_id"]),
        fields=values_to_proto(row["record_data"], definitions),
        display_name="" if display is None else str(display),
        create_time=protoconv.timestamp(row["created_at"]),
        update_time=protoconv.timestamp(row["updated_at"]),
        created_by=_str(row["created_by"]),
        updated_by=_str(row["updated_by"]),
        etag=protoconv.etag(row["version"]),
    )


def link_message(row: Mapping[str, Any]) -> pb.RecordLink:
    return pb.RecordLink(
        id=str(row["id"]),
        relationship_id=str(row["relationship_id"]),
        from_record_id=str(row["from_record_id"]),
        to_record_id=str(row["to_record_id"]),
        data={k: to_field_value(v) for k, v in (row["relationship_data"] or {}).items() if v is not None},
        create_time=protoconv.timestamp(row["created_at"]),
    )


class CustomObjectServicer(custom_object_pb2_grpc.CustomObjectServiceServicer):
    def __init__(self, definitions: DefinitionUseCases, records: RecordUseCases) -> None:
        self._definitions = definitions
        self._records = records

    # --- objects ---

    async def CreateCustomObject(
        self, request: pb.CreateCustomObjectRequest, context: grpc.aio.ServicerContext
    ) -> pb.CustomObject:
        return object_message(
            await self._definitions.create_custom_object(object_values(request.custom_object))
        )

    async def GetCustomObject(
        self, request: pb.GetCustomObjectRequest, context: grpc.aio.ServicerContext
    ) -> pb.CustomObject:
        return object_message(await self._definitions.get_custom_object(request.id))

    async def ListCustomObjects(
        self, request: pb.ListCustomObjectsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListCustomObjectsResponse:
        page = await self._definitions.list_custom_objects(
            request.page_size, request.page_token, request.show_inactive
        )
        return pb.ListCustomObjectsResponse(
            custom_objects=[object_message(r) for r in page.items],
            next_page_token=page.next_page_token,
            total_size=page.total_size,
        )

    async def UpdateCustomObject(
        self, request: pb.UpdateCustomObjectRequest, context: grpc.aio.ServicerContext
    ) -> pb.CustomObject:
        message = request.custom_object
        values = object_values(message)
        for flag in ("is_active", "allow_reports", "allow_activities"):
            values[flag] = getattr(message, flag)
        row = await self._definitions.update_custom_object(
            message.id, message.etag, values, list(request.update_mask.paths)
        )
        return object_message(row)

    async def DeleteCustomObject(
        self, request: pb.DeleteCustomObjectRequest, context: grpc.aio.ServicerContext
    ) -> pb.CustomObject:
        return object_message(
            await self._definitions.delete_custom_object(request.id, request.etag, request.force)
        )

    # --- fields ---

    async def CreateCustomField(
        self, request: pb.CreateCustomFieldRequest, context: grpc.aio.ServicerContext
    ) -> pb.CustomField:
        return field_message(await self._definitions.create_custom_field(field_values(request.field)))

    async def ListCustomFields(
        self, request: pb.ListCustomFieldsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListCustomFieldsResponse:
        page = await self._definitions.list_custom_fields(
            request.object_type, request.page_size, request.page_token, request.show_inactive
        )
        return pb.ListCustomFieldsResponse(
            fields=[field_message(v) for v in page.items],
            next_page_token=page.next_page_token,
            total_size=page.total_size,
        )

    async def UpdateCustomField(
        self, request: pb.UpdateCustomFieldRequest, context: grpc.aio.ServicerContext
    ) -> pb.CustomField:
        values = field_values(request.field)
        values["is_active"] = request.field.is_active
        view = await self._definitions.update_custom_field(
            request.field.id, request.field.etag, values, list(request.update_mask.paths)
        )
        return field_message(view)

    async def DeleteCustomField(
        self, request: pb.DeleteCustomFieldRequest, context: grpc.aio.ServicerContext
    ) -> pb.CustomField:
        return field_message(await self._definitions.delete_custom_field(request.id, request.etag))

    # --- relationships ---

    async def CreateCustomRelationship(
        self, request: pb.CreateCustomRelationshipRequest, context: grpc.aio.ServicerContext
    ) -> pb.CustomRelationship:
        r = request.relationship
        row = await self._definitions.create_relationship(
            {
                "relationship_name": r.relationship_name,
                "from_object_type": r.from_object_type,
                "to_object_type": r.to_object_type,
                "relationship_type": r.relationship_type,
                "cardinality": r.cardinality,
                "cascade_delete": r.cascade_delete,
                "is_required": r.is_required,
                "description": r.description,
                "field_name": r.field_name,
            }
        )
        return relationship_message(row)

    async def ListCustomRelationships(
        self, request: pb.ListCustomRelationshipsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListCustomRelationshipsResponse:
        page = await self._definitions.list_relationships(
            request.object_type, request.page_size, request.page_token
        )
        return pb.ListCustomRelationshipsResponse(
            relationships=[relationship_message(r) for r in page.items],
            next_page_token=page.next_page_token,
            total_size=page.total_size,
        )

    async def DeleteCustomRelationship(
        self, request: pb.DeleteCustomRelationshipRequest, context: grpc.aio.ServicerContext
    ) -> pb.CustomRelationship:
        return relationship_message(await self._definitions.delete_relationship(request.id))

    # --- records ---

    async def CreateRecord(
        self, request: pb.CreateRecordRequest, context: grpc.aio.ServicerContext
    ) -> pb.Record:
        view = await self._records.create_record(
            request.record.object_type, values_from_proto(request.record.fields)
        )
        return record_message(view)

    async def GetRecord(self, request: pb.GetRecordRequest, context: grpc.aio.ServicerContext) -> pb.Record:
        return record_message(await self._records.get_record(request.id))

    async def ListRecords(
        self, request: pb.ListRecordsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRecordsResponse:
        views, token, total = await self._records.list_records(
            request.object_type, request.filter, request.order_by, request.page_size, request.page_token
        )
        # A page's records share one object and its fields.
        definitions = [to_definition(f.row, f.options) for f in views[0].fields] if views else []
        return pb.ListRecordsResponse(
            records=[record_message(v, definitions) for v in views], next_page_token=token, total_size=total
        )

    async def UpdateRecord(
        self, request: pb.UpdateRecordRequest, context: grpc.aio.ServicerContext
    ) -> pb.Record:
        view = await self._records.update_record(
            request.record.id,
            request.record.etag,
            values_from_proto(request.record.fields),
            list(request.update_mask.paths),
        )
        return record_message(view)

    async def DeleteRecord(
        self, request: pb.DeleteRecordRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteRecordResponse:
        outcome = await self._records.delete_record(request.id, request.etag)
        return pb.DeleteRecordResponse(
            id=str(outcome.record_id),
            cascaded_record_ids=[str(i) for i in outcome.cascaded],
            cleared_reference_count=outcome.cleared,
        )

    # --- links ---

    async def LinkRecords(
        self, request: pb.LinkRecordsRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordLink:
        row = await self._records.link_records(
            request.relationship,
            request.from_record_id,
            request.to_record_id,
            values_from_proto(request.data),
        )
        return link_message(row)

    async def UnlinkRecords(
        self, request: pb.UnlinkRecordsRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordLink:
        row = await self._records.unlink_records(
            request.relationship, request.from_record_id, request.to_record_id
        )
        return link_message(row)

    async def ListLinkedRecords(
        self, request: pb.ListLinkedRecordsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListLinkedRecordsResponse:
        page = await self._records.list_linked_records(
            request.relationship, request.record_id, request.page_size, request.page_token
        )
        return pb.ListLinkedRecordsResponse(
            links=[link_message(r) for r in page.items],
            next_page_token=page.next_page_token,
            total_size=page.total_size,
        )
