"""The ImportService servicer: a client stream of row batches in, one summary out; and the
server-streamed export."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc

from crm.v1 import core_entity_pb2 as pb
from crm.v1 import core_entity_pb2_grpc as pb_grpc
from services.core_entity.domain.model import EntitySpec
from services.core_entity.service_layer.entities import CoreEntities
from services.core_entity.service_layer.imports import IMPORTABLE, Importer
from shared.errors import FieldViolation, InvalidArgument

ENTITY_TYPES = {
    pb.ENTITY_TYPE_ACCOUNT: "account",
    pb.ENTITY_TYPE_CONTACT: "contact",
    pb.ENTITY_TYPE_LEAD: "lead",
    pb.ENTITY_TYPE_DEAL: "deal",
    pb.ENTITY_TYPE_ACTIVITY: "activity",
}
# Rows written per transaction (and COPY); a stream message with more is split.
BATCH_ROWS = 500
#: Rows listed in an import's reply (ids of created records, refused rows); the counts are exact.
MAX_LISTED = 10_000


def entity_spec(value: int, field: str = "entity_type") -> EntitySpec:
    name = ENTITY_TYPES.get(value)  # type: ignore[call-overload]
    if name is None:
        raise InvalidArgument([FieldViolation(field, "must name account, contact, lead, deal or activity")])
    return IMPORTABLE[name]


class ImportServicer(pb_grpc.ImportServiceServicer):
    def __init__(self, entities: CoreEntities) -> None:
        self._importer = Importer(entities)

    async def ImportRecords(
        self, request_iterator: AsyncIterator[pb.ImportRecordsRequest], context: grpc.aio.ServicerContext
    ) -> pb.ImportRecordsResponse:
        spec: EntitySpec | None = None
        import_id: uuid.UUID | None = None
        response = pb.ImportRecordsResponse()
        index = 0
        successes = errors_seen = 0
        async for message in request_iterator:
            if spec is None or import_id is None:
                violations = []
                try:
                    import_id = uuid.UUID(message.import_id)
                except ValueError:
                    violations.append(FieldViolation("import_id", "is required in the first message: a UUID"))
                try:
                    spec = entity_spec(message.entity_type)
                except InvalidArgument as exc:
                    violations += exc.violations
                if violations:
                    raise InvalidArgument(violations)
                response.import_id = str(import_id)
            assert spec is not None and import_id is not None
            rows = [(index + i, dict(row.values)) for i, row in enumerate(message.rows)]
            index += len(rows)
            for start in range(0, len(rows), BATCH_ROWS):
                result = await self._importer.import_batch(spec, import_id, rows[start : start + BATCH_ROWS])
                successes += len(result.record_ids)
                errors_seen += len(result.errors)
                # The reply lists at most MAX_LISTED rows of each kind, so that a 200,000-row
                # import does not answer with a message larger than gRPC accepts.
                for row_index, record_id in result.record_ids.items():
                    if len(response.record_ids) < MAX_LISTED:
                        response.record_ids[row_index] = record_id
                for row_index, errors in sorted(result.errors.items()):
                    if len(response.row_errors) >= MAX_LISTED:
                        break
                    response.row_errors.add(
                        row_index=row_index,
                        errors=[
                            pb.ImportFieldError(field=e.field, description=e.description) for e in errors
                        ],
                    )
        if spec is None:
            raise InvalidArgument([FieldViolation("import_id", "the stream sent no message")])
        response.success_count = successes
        response.error_count = errors_seen
        return response

    async def ExportRecords(
        self, request: pb.ExportRecordsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ExportRecordsResponse]:
        spec = entity_spec(request.entity_type)
        if request.batch_size < 0:
            raise InvalidArgument([FieldViolation("batch_size", "must not be negative")])
        async for rows, total in self._importer.export(spec, request.batch_size):
            yield pb.ExportRecordsResponse(rows=[pb.RecordRow(values=row) for row in rows], total_size=total)
