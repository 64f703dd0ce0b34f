"""The transport side of the internal DataAdminService, shared by every service that owns tenant
data: it validates and translates messages and calls the owner's `DataAdminPort`, which carries
out restore, retention, erasure and counts through the owner's own unit of work and outbox."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from typing import Protocol

import grpc

from crm.v1 import data_admin_pb2, data_admin_pb2_grpc
from shared import protoconv
from shared.errors import FieldViolation, InvalidArgument, invalid


class Erasure(Protocol):
    @property
    def counts(self) -> Mapping[str, int]: ...

    @property
    def records(self) -> Sequence[tuple[str, str]]: ...


class DataAdminPort(Protocol):
    async def restore(
        self, table_name: str, record_id: uuid.UUID, values_json: str, expected_version: int, force: bool
    ) -> int: ...

    async def purge(
        self, table_name: str, older_than: dt.datetime | None, conditions_json: str, hard: bool
    ) -> list[str]: ...

    async def anonymize(
        self, table_name: str, older_than: dt.datetime | None, conditions_json: str
    ) -> list[str]: ...

    async def erase_subject(
        self, email: str, contact_id: uuid.UUID | None, lead_id: uuid.UUID | None
    ) -> Erasure: ...

    async def count(self, table_name: str) -> int: ...


def _optional_id(value: str, path: str, violations: list[FieldViolation]) -> uuid.UUID | None:
    if not value.strip():
        return None
    try:
        return uuid.UUID(value.strip())
    except ValueError:
        violations.append(FieldViolation(path, "must be a UUID"))
        return None


def _older_than(
    request: data_admin_pb2.PurgeRecordsRequest | data_admin_pb2.AnonymizeRecordsRequest,
) -> dt.datetime | None:
    return protoconv.from_timestamp(request.older_than) if request.HasField("older_than") else None


class DataAdminServicer(data_admin_pb2_grpc.DataAdminServiceServicer):
    """Internal: called by the audit service with the internal credential, never routed by the
    gateway."""

    def __init__(self, admin: DataAdminPort) -> None:
        self._admin = admin

    async def RestoreRecord(
        self, request: data_admin_pb2.RestoreRecordRequest, context: grpc.aio.ServicerContext
    ) -> data_admin_pb2.RestoreRecordResponse:
        if request.expected_version < 0:
            raise invalid("expected_version", "must not be negative")
        try:
            record_id = uuid.UUID(request.record_id.strip())
        except ValueError as exc:
            raise invalid("record_id", "must be a UUID") from exc
        version = await self._admin.restore(
            request.table_name, record_id, request.values_json, request.expected_version, request.force
        )
        return data_admin_pb2.RestoreRecordResponse(new_version=version)

    async def PurgeRecords(
        self, request: data_admin_pb2.PurgeRecordsRequest, context: grpc.aio.ServicerContext
    ) -> data_admin_pb2.PurgeRecordsResponse:
        if request.method not in (
            data_admin_pb2.PURGE_METHOD_SOFT_DELETE,
            data_admin_pb2.PURGE_METHOD_HARD_DELETE,
        ):
            raise invalid("method", "must be soft or hard delete")
        ids = await self._admin.purge(
            request.table_name,
            _older_than(request),
            request.conditions_json,
            hard=request.method == data_admin_pb2.PURGE_METHOD_HARD_DELETE,
        )
        return data_admin_pb2.PurgeRecordsResponse(affected_count=len(ids), record_ids=ids)

    async def AnonymizeRecords(
        self, request: data_admin_pb2.AnonymizeRecordsRequest, context: grpc.aio.ServicerContext
    ) -> data_admin_pb2.AnonymizeRecordsResponse:
        ids = await self._admin.anonymize(request.table_name, _older_than(request), request.conditions_json)
        return data_admin_pb2.AnonymizeRecordsResponse(affected_count=len(ids), record_ids=ids)

    async def EraseSubject(
        self, request: data_admin_pb2.EraseSubjectRequest, context: grpc.aio.ServicerContext
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
        self, request: data_admin_pb2.CountRecordsRequest, context: grpc.aio.ServicerContext
    ) -> data_admin_pb2.CountRecordsResponse:
        return data_admin_pb2.CountRecordsResponse(count=await self._admin.count(request.table_name))
