"""Reads custom field definitions from the same shard's custom-object service over gRPC.

Calls carry the internal credential and the current caller's tenant and request id, as the
gateway's would. The channel is created on first use, inside the running event loop (a channel
made before the loop runs fails every call)."""

from __future__ import annotations

from typing import Any

import grpc

from crm.v1 import custom_object_pb2, custom_object_pb2_grpc
from services.core_entity.adapters.indexes import IndexedFieldDefinition
from shared import fieldtypes
from shared.context import INTERNAL_TOKEN_KEY, REQUEST_ID_KEY, TENANT_ID_KEY, current_call
from shared.errors import Unavailable
from shared.fieldtypes import FieldDefinition, PicklistOption
from shared.grpc_server import insecure_channel

_RULE_FIELDS = (
    "min_length",
    "max_length",
    "pattern",
    "min_value",
    "max_value",
    "min_date",
    "max_date",
    "max_selections",
)


def definition_from(message: custom_object_pb2.CustomField) -> IndexedFieldDefinition:
    rules: dict[str, Any] = {
        name: getattr(message.validation_rules, name)
        for name in _RULE_FIELDS
        if message.validation_rules.HasField(name)  # type: ignore[arg-type]
    }
    default = (
        fieldtypes.from_field_value(message.default_value) if message.HasField("default_value") else None
    )
    return IndexedFieldDefinition(
        name=message.field_name,
        field_type=message.field_type,
        required=message.is_required,
        unique=message.is_unique,
        default=default,
        rules=rules,
        options=tuple(
            PicklistOption(
                value=o.value, label=o.label, order=o.order, is_default=o.is_default, is_active=o.is_active
            )
            for o in message.options
        ),
        reference_to=message.reference_object_type or None,
        is_active=message.is_active,
        field_id=message.id,
        is_indexed=message.is_indexed,
    )


class GrpcDefinitionSource:
    def __init__(self, address: str, internal_token: str, timeout: float = 5.0) -> None:
        self._address = address
        self._token = internal_token
        self._timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._stub: custom_object_pb2_grpc.CustomObjectServiceStub | None = None

    def _client(self) -> custom_object_pb2_grpc.CustomObjectServiceStub:
        if self._stub is None:
            self._channel = insecure_channel(self._address)
            self._stub = custom_object_pb2_grpc.CustomObjectServiceStub(self._channel)
        return self._stub

    async def definitions(self, tenant_id: str, entity_type: str) -> list[FieldDefinition]:
        metadata = (
            (INTERNAL_TOKEN_KEY, self._token),
            (TENANT_ID_KEY, tenant_id),
            (REQUEST_ID_KEY, current_call().request_id),
        )
        found: list[FieldDefinition] = []
        token = ""
        while True:
            try:
                page = await self._client().ListCustomFields(
                    custom_object_pb2.ListCustomFieldsRequest(
                        object_type=entity_type, page_size=1000, page_token=token, show_inactive=True
                    ),
                    metadata=metadata,
                    timeout=self._timeout,
                )
            except grpc.aio.AioRpcError as exc:
                raise Unavailable(
                    f"custom field definitions are unavailable ({exc.code().name}); retry shortly",
                    reason="CUSTOM_FIELDS_UNAVAILABLE",
                ) from exc
            found += [definition_from(f) for f in page.fields]
            token = page.next_page_token
            if not token:
                return found

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
