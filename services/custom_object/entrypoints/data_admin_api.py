"""The internal DataAdminService of custom-object: called by the audit service with the internal
credential (never routed by the gateway) to restore, purge, anonymize, erase and count custom
object records. Translates messages to the use cases in service_layer/data_admin.py and back."""

from __future__ import annotations

import uuid
from typing import TypeAlias

import grpc

from crm.v1 import data_admin_pb2, data_admin_pb2_grpc
from services.custom_object.service_layer.common import parse_id
from services.custom_object.service_layer.data_admin import DataAdmin
from shared import protoconv
from shared.errors import FieldViolation, InvalidArgument, invalid

Context: TypeAlias = grpc.aio.ServicerContext


def _optional_id(value: str, path: str, violations: list[FieldViolation]) -> uuid.UUID | None:
    if not value.strip():
        return None
    try:
        return uuid.UUID(value.strip())
    except ValueError:
        violations.append(FieldViolation(path, "must be a UUID"))
        return None


class DataAdminServicer(data_admin_pb2_grpc.DataAdminServiceServicer):
    def __init__(self, admin: DataAdmin) -> None:
        self._admin = admin

    async def RestoreRecord(
        self, request: data_admin_pb2.RestoreRecordRequest, context: Context
    ) -> data_admin_pb2.RestoreRecordResponse:
        if request.expected_version < 0:
            raise invalid("expected_version", "must not be negative")
        version = await self._admin.restore(
            request.table_name,
            parse_id(request.record_id.strip(), "record_id"),
            request.values_json,
            request.expected_version,
            request.force,
        )
        return data_admin_pb2.RestoreRecordResponse(new_version=version)

    async def PurgeRecords(
        self, request: data_admin_pb2.PurgeRecordsRequest, context: Context
    ) -> data_admin_pb2.PurgeRecordsResponse:
        if request.method not in (
            data_admin_pb2.PURGE_METHOD_SOFT_DELETE,
            data_admin_pb2.PURGE_METHOD_HARD_DELETE,
        ):
            raise invalid("method", "must be soft or hard delete")
        ids = await self._admin.purge(
            request.table_name,
            protoconv.from_timestamp(request.older_than) if request.HasField("older_than") else None,
            request.conditions_json,
            hard=request.method == data_admin_pb2.PURGE_METHOD_HARD_DELETE,
        )
        return data_admin_pb2.PurgeRecordsResponse(affected_count=len(ids), record_ids=ids)

    async def AnonymizeRecords(
        self, request: data_admin_pb2.AnonymizeRecordsRequest, context: Context
    ) -> data_admin_pb2.AnonymizeRecordsResponse:
        ids = await self._admin.anonymize(
            request.table_name,
            protoconv.from_timestamp(request.older_than) if request.HasField("older_than") else None,
            request.conditions_json,
        )
        return data_admin_pb2.AnonymizeRecordsResponse(affected_count=len(ids), record_ids=ids)

    async def EraseSubject(
        self, request: data_admin_pb2.EraseSubjectRequest, context: Context
    ) -> data_admin_pb2.EraseSubjectResponse:
        violations: list[FieldViolation] = []
        contact_id = _optional_id(request.contact_id, "contact_id", violations)
        lead_id = _optional_id(request.lead_id, "lead_id", violations)
        email = request.email.strip()
        if len(email) > 255:
            violations.append(FieldViolation("email", "must be at most 255 characters"))
        if violations:
            raise InvalidArgument(violations)
        erased = await self._admin.erase_subject(email, contact_id, lead_id)
        return data_admin_pb2.EraseSubjectResponse(
            counts=[
                data_admin_pb2.TableCount(table_name=t, count=n) for t, n in sorted(erased.counts.items())
            ],
            records=[data_admin_pb2.RecordRef(table_name=t, record_id=i) for t, i in erased.records],
        )

    async def CountRecords(
        self, request: data_admin_pb2.CountRecordsRequest, context: Context
    ) -> data_admin_pb2.CountRecordsResponse:
        return data_admin_pb2.CountRecordsResponse(count=await self._admin.count(request.table_name))
