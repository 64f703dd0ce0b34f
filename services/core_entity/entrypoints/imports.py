"""The ImportService servicer: a client stream of row batches in, one summary out; and the
server-streamed export."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import grpc

from crm.v1 import core_entity_pb2 as pb
from crm.v1 import core_entity_pb2_grpc as pb_grpc
from services.core_entity.domain.model import EntitySpec
from services.core_entity.service_layer.entities import CoreEntities
from services.core_entity.service_layer.imports import IMPORTABLE, BatchResult, Importer
from shared.errors import FieldViolation, InvalidArgument

ENTITY_TYPES = {
    pb.ENTITY_TYPE_ACCOUNT: "account",
    pb.ENTITY_TYPE_CONTACT: "contact",
    pb.ENTITY_TYPE_LEAD: "lead",
    pb.ENTITY_TYPE_DEAL: "deal",
    pb.ENTITY_TYPE_ACTIVITY: "activity",
}
# Rows written per transaction; rows of small stream messages are gathered up to this many, and
# a message with more is split.
BATCH_ROWS = 1000
#: Rows listed in an import's reply (ids of created records, refused rows); the counts are exact.
MAX_LISTED = 10_000


def entity_spec(value: int, field: str = "entity_type") -> EntitySpec:
    name = ENTITY_TYPES.get(value)  # type: ignore[call-overload]
    if name is None:
        raise InvalidArgument([FieldViolation(field, "must name account, contact, lead, deal or activity")])
    return IMPORTABLE[name]


class Tally:
    """An import's reply as batches complete: exact counts, and at most MAX_LISTED rows of each
    kind listed, so that a 200,000-row import does not answer with a message larger than gRPC
    accepts."""

    def __init__(self, response: pb.ImportRecordsResponse) -> None:
        self.response = response
        self.successes = 0
        self.errors = 0

    def add(self, result: BatchResult) -> None:
        self.successes += len(result.record_ids)
        self.errors += len(result.errors)
        response = self.response
        for row_index, record_id in result.record_ids.items():
            if len(response.record_ids) < MAX_LISTED:
                response.record_ids[row_index] = record_id
        for row_index, errors in sorted(result.errors.items()):
            if len(response.row_errors) >= MAX_LISTED:
                break
            response.row_errors.add(
                row_index=row_index,
                errors=[pb.ImportFieldError(field=e.field, description=e.description) for e in errors],
            )


class ImportServicer(pb_grpc.ImportServiceServicer):
    def __init__(self, entities: CoreEntities) -> None:
        self._importer = Importer(entities)

    async def ImportRecords(
        self, request_iterator: AsyncIterator[pb.ImportRecordsRequest], context: grpc.aio.ServicerContext
    ) -> pb.ImportRecordsResponse:
        spec: EntitySpec | None = None
        import_id: uuid.UUID | None = None
        response = pb.ImportRecordsResponse()
        tally = Tally(response)
        index = 0
        buffered: list[tuple[int, dict[str, str]]] = []
        # The batch being written while the next one is prepared (parsing and checking rows is
        # CPU work in this process; writing is mostly the database's).
        writing: asyncio.Task[BatchResult] | None = None
        try:
            async for message in request_iterator:
                if spec is None or import_id is None:
                    violations = []
                    try:
                        import_id = uuid.UUID(message.import_id)
                    except ValueError:
                        violations.append(
                            FieldViolation("import_id", "is required in the first message: a UUID")
                        )
                    try:
                        spec = entity_spec(message.entity_type)
                    except InvalidArgument as exc:
                        violations += exc.violations
                    if violations:
                        raise InvalidArgument(violations)
                    response.import_id = str(import_id)
                assert spec is not None and import_id is not None
                buffered += [(index + i, dict(row.values)) for i, row in enumerate(message.rows)]
                index += len(message.rows)
                while len(buffered) >= BATCH_ROWS:
                    batch, buffered = buffered[:BATCH_ROWS], buffered[BATCH_ROWS:]
                    writing = await self._next(spec, import_id, batch, writing, tally)
            if spec is None or import_id is None:
                raise InvalidArgument([FieldViolation("import_id", "the stream sent no message")])
            if buffered:
                writing = await self._next(spec, import_id, buffered, writing, tally)
            if writing is not None:
                tally.add(await writing)
                writing = None
        finally:
            if writing is not None:  # the call failed or was cancelled: so is the write
                if not writing.done():
                    writing.cancel()
                    await asyncio.wait([writing])
                if not writing.cancelled():
                    writing.exception()  # the caller hears of the first failure only
        response.success_count = tally.successes
        response.error_count = tally.errors
        return response

    async def _next(
        self,
        spec: EntitySpec,
        import_id: uuid.UUID,
        rows: list[tuple[int, dict[str, str]]],
        writing: asyncio.Task[BatchResult] | None,
        tally: Tally,
    ) -> asyncio.Task[BatchResult]:
        """Prepares a batch while the previous one is written, then starts writing it."""
        prepared = await self._importer.prepare(spec, rows)
        if writing is not None:
            tally.add(await writing)
        return asyncio.create_task(self._importer.write(import_id, prepared))

    async def ExportRecords(
        self, request: pb.ExportRecordsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ExportRecordsResponse]:
        spec = entity_spec(request.entity_type)
        if request.batch_size < 0:
            raise InvalidArgument([FieldViolation("batch_size", "must not be negative")])
        async for rows, total in self._importer.export(spec, request.batch_size):
            yield pb.ExportRecordsResponse(rows=[pb.RecordRow(values=row) for row in rows], total_size=total)
